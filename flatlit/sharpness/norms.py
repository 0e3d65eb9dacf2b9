"""Norm-based complexity measures, the margin, path norms and the generalization bounds of Neyshabur et al. 2017.

References:
    * Neyshabur, Bhojanapalli, McAllester, Srebro, "Exploring Generalization in Deep Learning", NeurIPS 2017,
      arXiv 1706.08947 (measures and bounds; reference code ``bneyshabur/generalization-bounds``).
    * Neyshabur, Tomioka, Srebro, "Norm-Based Capacity Control in Neural Networks", COLT 2015, arXiv 1503.00036
      (L_{p,q} norms, path norms and their treatment of biases).
    * Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic Generalization Measures and Where to Find Them",
      ICLR 2020, arXiv 1912.02178 (margin percentile, ``*_over_margin`` squared variants).
    * Bartlett & Mendelson 2002 (JMLR 3); Bartlett, Foster, Telgarsky 2017, arXiv 1706.08498; Neyshabur,
      Bhojanapalli, Srebro 2018, arXiv 1707.09564; Golowich, Rakhlin, Shamir 2018, arXiv 1712.06541 (depth factor).

The measures see the network's *layers*: its ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` modules, in
forward order (found with forward hooks on a forward pass of two all-zero inputs of ``inputs.input_shape``; registration
order when no input shape is known); a module called twice counts once; depth d = number of layers. Layer matrices
are the weights reshaped to ``(out, -1)`` (the incoming weights of output unit j form row j), computed in float64.

BatchNorm: the norm products, path norms and bounds default to ``bn="fold"``: BatchNorm is folded into the
preceding layer first (:func:`flatlit.sharpness.base.fold_batchnorm`, Neyshabur's ``reparam``), so the layer
weights carry the BN scale; the initial weights (distance from init, the bounds) are folded the same way, with the
initial model's BN statistics (:func:`flatlit.sharpness.base.fold_state`, :func:`init_tensors`).
With ``bn="eval"`` the BN parameters are simply not part of any layer norm. ``lpf_normalize`` (LPF-SGD's
``norm()``) is the other function-preserving reparametrisation (SPEC F35).

Products over layers can overflow: the norm products report ``log`` of the product by default (``log=True``), and
the bounds are evaluated as exp(Σ log) in float64 (``+inf`` on overflow) with ``log_bound`` in ``extra``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatlit.sharpness.base import (
    Batch,
    Cost,
    LogitsFn,
    MeasureInputs,
    MeasureNotApplicable,
    MeasureResult,
    default_logits,
    distributed,
    register_measure,
    sample_size,
)

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d), 3: (F.conv3d, F.conv_transpose3d)}
_DEFAULT_BN_EPS = 1e-5  # BatchNorm eps is not in a state_dict: for an nn.Identity without the FoldedBatchNorm eps


# ---- layers ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """A Linear/Conv layer: its module name, the module and the shape of one input example at that layer (or None)."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...] | None = None

    def matrix(self) -> torch.Tensor:
        """The weight reshaped to (out, -1), float64, detached."""
        w = self.module.weight.detach().double()
        return w.reshape(w.shape[0], -1)


def find_layers(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[Layer]:
    """The Linear/Conv layers of ``model`` in forward order, with the input shape of one example at each layer.

    With ``input_shape`` the order and shapes come from forward hooks on one no-grad forward of two all-zero inputs
    (two so that BatchNorm in train mode accepts them); layers not reached by the forward are left out and a layer
    called twice counts once. Without it, or when the model's forward does not take such an input (token ids,
    several inputs): registration order and ``in_shape=None``.
    """
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if input_shape is None:
        return [Layer(n, m) for n, m in named]
    found: dict[int, Layer] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if id(module) not in found:
                found[id(module)] = Layer(name, module, tuple(args[0].shape[1:]))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    p = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, dtype=p.dtype, device=p.device))
    except Exception:  # a model whose forward does not take such inputs (tokens, several inputs)
        return [Layer(n, m) for n, m in named]
    finally:
        for h in handles:
            h.remove()
    return list(found.values())


def _layers_of(inputs: MeasureInputs, need_shapes: bool = False) -> list[Layer]:
    convs = any(isinstance(m, LAYER_TYPES[1:]) for m in inputs.model.modules())
    if need_shapes and convs and inputs.input_shape is None:
        raise ValueError("this measure needs `input_shape` (the shape of one input) to trace the layers' input sizes")
    layers = find_layers(inputs.model, inputs.input_shape)
    if not layers:
        raise ValueError("the model has no nn.Linear / nn.Conv layers to measure")
    return layers


# ---- per-layer norms ------------------------------------------------------------------------------------------------
def lpq_norm(w: torch.Tensor, p: float, q: float) -> float:
    """‖W‖_{p,q} = ‖(‖w_j‖_p)_j‖_q over the rows j of the (out, -1) matrix (Neyshabur et al. 2015)."""
    w = w.reshape(w.shape[0], -1).double()
    return float(torch.linalg.vector_norm(torch.linalg.vector_norm(w, ord=p, dim=1), ord=q))


def schatten_norm(w: torch.Tensor, p: float) -> float:
    """The l_p norm of the singular values of the (out, -1) matrix (p = inf: spectral, 1: trace/nuclear)."""
    w = w.reshape(w.shape[0], -1).double()
    return float(torch.linalg.vector_norm(torch.linalg.svdvals(w), ord=p))


@dataclass(frozen=True)
class OperatorNorm:
    """The result of :func:`conv_operator_norm`: ``sigma`` (the estimate of σ_max), ``residual`` (the relative
    residual ‖AᵀAx − σ²x‖ / σ² of its unit Ritz vector x), ``steps`` (products with AᵀA) and ``converged``
    (``residual <= tol`` within the step cap)."""

    sigma: float
    residual: float
    steps: int
    converged: bool


_KRYLOV_DIM = 64  # Lanczos vectors kept before a restart (memory: this many copies of one input)


def conv_operator_norm(
    conv: nn.Module, in_shape: Sequence[int], iters: int = 1000, tol: float = 1e-7, seed: int = 0
) -> OperatorNorm:
    """Operator 2-norm σ_max of the convolution ``x ↦ conv(x)`` (bias excluded) as a linear map on inputs of shape
    ``in_shape`` = (C, *spatial): the largest eigenvalue of AᵀA by Lanczos in float64, with a checked tolerance.

    A is ``F.conv{n}d`` with the layer's stride/padding/dilation/groups and Aᵀ its adjoint ``F.conv_transpose{n}d``
    (``output_padding`` chosen to give back the input size); for non-zero padding modes or string paddings Aᵀ is the
    autograd vector-Jacobian product of A. Lanczos (a Krylov-accelerated power iteration) with full
    reorthogonalisation, restarted from the top Ritz vector every 64 steps, starts from a standard normal vector from
    ``torch.Generator().manual_seed(seed)``. It stops when the top Ritz pair (θ, x) has relative residual
    ‖AᵀAx − θx‖ / θ ≤ ``tol``, which guarantees that √θ lies within a relative ``tol`` of a singular value of A (the
    largest: Lanczos finds the top of the spectrum first), or when ``iters`` products with AᵀA are spent; then
    ``converged`` is False. A plain power iteration stalls on random convolutions, whose top singular values lie
    within 0.1 % of each other (its relative change per step becomes small long before the estimate is accurate);
    Lanczos reaches 1e-7 in 50-100 steps there. Cost: ``steps`` conv + conv_transpose pairs on one input.
    """
    w = conv.weight.detach().double()
    nd = w.ndim - 2
    fwd, tr = _CONV[nd]
    explicit = getattr(conv, "padding_mode", "zeros") == "zeros" and not isinstance(conv.padding, str)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters!r}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")

    def apply(v: torch.Tensor) -> torch.Tensor:
        if explicit:
            return fwd(v, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return conv._conv_forward(v, w, None)

    def adjoint(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if explicit:
            out_pad = [
                i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                for i, o, s, p, d, k in zip(
                    v.shape[2:], u.shape[2:], conv.stride, conv.padding, conv.dilation, w.shape[2:]
                )
            ]
            return tr(u, w, None, conv.stride, conv.padding, out_pad, conv.groups, conv.dilation)
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(apply(v), v, u)
        return g

    shape = (1, *in_shape)
    n = math.prod(in_shape)

    def gram(v: torch.Tensor) -> torch.Tensor:  # AᵀA v on flat vectors
        x = v.view(shape)
        return adjoint(apply(x), x).reshape(-1)

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(w.device)
    v = v / v.norm()
    m = min(n, _KRYLOV_DIM)
    steps, theta, residual = 0, 0.0, math.inf
    with torch.no_grad():
        while True:
            basis = torch.empty((m, n), dtype=torch.float64, device=w.device)
            basis[0] = v
            alphas: list[float] = []
            betas: list[float] = []
            for j in range(m):
                z = gram(basis[j])
                steps += 1
                alphas.append(float(z @ basis[j]))
                for _ in range(2):  # full reorthogonalisation, twice (classical Gram-Schmidt)
                    z = z - basis[: j + 1].T @ (basis[: j + 1] @ z)
                beta = float(z.norm())
                t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
                if betas:
                    off = torch.tensor(betas, dtype=torch.float64)
                    t = t + torch.diag(off, 1) + torch.diag(off, -1)
                ritz, vecs = torch.linalg.eigh(t)
                theta, top = float(ritz[-1]), vecs[:, -1]
                # an invariant Krylov subspace (e.g. all of a small input space): its Ritz values are exact
                breakdown = beta <= 1e-12 * max(abs(a) for a in alphas)
                residual = beta * abs(float(top[-1])) / theta if theta > 0 else (0.0 if breakdown else math.inf)
                if residual <= tol or breakdown or steps >= iters or j == m - 1:
                    break
                betas.append(beta)
                basis[j + 1] = z / beta
            if residual <= tol or breakdown or steps >= iters:
                break
            x = basis[: j + 1].T @ top.to(basis.device)  # restart from the top Ritz vector
            v = x / x.norm()
    return OperatorNorm(math.sqrt(max(theta, 0.0)), residual, steps, residual <= tol or breakdown)


def _warn_unconverged(what: str, est: OperatorNorm, iters: int, tol: float) -> None:
    import warnings

    warnings.warn(
        f"the spectral norm of {what} did not converge: relative residual {est.residual:.2e} > tol={tol:g} after "
        f"power_iters={iters} products with AᵀA (σ = {est.sigma:.6g} is a lower bound); raise power_iters or tol.",
        RuntimeWarning,
        stacklevel=3,
    )


def conv_spectral_norm(
    conv: nn.Module, in_shape: Sequence[int], iters: int = 1000, tol: float = 1e-7, seed: int = 0
) -> float:
    """σ_max of the convolution on inputs of shape ``in_shape`` by :func:`conv_operator_norm` (Lanczos on AᵀA to a
    relative residual ``tol``, at most ``iters`` steps); a RuntimeWarning when the step cap is hit first."""
    est = conv_operator_norm(conv, in_shape, iters=iters, tol=tol, seed=seed)
    if not est.converged:
        _warn_unconverged("a convolution", est, iters, tol)
    return est.sigma


def largest_singular_value(w: torch.Tensor) -> float:
    """σ_max(W) = √λ_max of the smaller Gram matrix (W Wᵀ or WᵀW) in float64: exact to rounding like
    ``torch.linalg.matrix_norm(W, 2)`` (the Gram matrix's largest eigenvalue has relative error ~ machine ε), and
    4-5× faster for a wide layer (128×9216: 4.7 ms against 21.6 ms) because it skips the full SVD."""
    w = w.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt())


def spectral_norm(layer: Layer, reshaped: bool = False, iters: int = 1000, tol: float = 1e-7, seed: int = 0) -> float:
    """σ_max of a layer: the operator norm for convolutions (:func:`conv_spectral_norm` at the layer's input size,
    to a relative tolerance ``tol``, warning when ``iters`` steps do not reach it) unless ``reshaped`` (then, and
    for Linear layers, the largest singular value of the (out, -1) matrix, exact to rounding)."""
    return _layer_spectral_norm(layer, reshaped, iters, tol, seed, warn=True).sigma


def _layer_spectral_norm(layer: Layer, reshaped: bool, iters: int, tol: float, seed: int, warn: bool) -> OperatorNorm:
    if reshaped or isinstance(layer.module, nn.Linear):
        return OperatorNorm(largest_singular_value(layer.matrix()), 0.0, 0, True)
    if layer.in_shape is None:
        raise ValueError("the exact convolution spectral norm needs `input_shape`; pass reshaped=True otherwise")
    est = conv_operator_norm(layer.module, layer.in_shape, iters=iters, tol=tol, seed=seed)
    if warn and not est.converged:
        _warn_unconverged(f"layer {layer.name!r}", est, iters, tol)
    return est


# ---- margins --------------------------------------------------------------------------------------------------------
def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor over ranks (rank order; sizes may differ). Identity without torch.distributed."""
    if not distributed():
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    largest = max(int(s) for s in sizes)
    padded = torch.zeros(largest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def sample_margins(model: nn.Module, batches: Sequence[Batch], logits_fn: LogitsFn | None = None) -> torch.Tensor:
    """f_y(x) − max_{j≠y} f_j(x) for every example of the sample, all ranks (float64, rank order): one forward.

    The class logits and labels of a batch are ``logits_fn(model, batch)`` when given (e.g. a module's
    ``outputs_and_targets``), else ``model(x)`` against ``y``
    (:func:`~flatlit.sharpness.base.default_logits`); a one-logit binary head counts as the two-class logits (0, z),
    whose margin is ±z. A batch without class logits is a :class:`~flatlit.sharpness.base.MeasureNotApplicable`."""
    local = []
    with torch.no_grad():
        for batch in batches:
            pair = logits_fn(model, batch) if logits_fn is not None else default_logits(model, batch)
            if pair is None:
                raise MeasureNotApplicable(
                    "the margin needs class logits and labels; define outputs_and_targets(self, batch) -> "
                    "(logits, labels) on the module"
                )
            out, y = pair[0].double(), pair[1].long()
            true = out.gather(1, y.view(-1, 1)).squeeze(1)
            other = out.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
            local.append(true - other)
    p = next(model.parameters())
    t = torch.cat(local) if local else torch.zeros(0, dtype=torch.float64, device=p.device)
    return _all_gather_cat(t)


def _check_percentile(percentile: float) -> float:
    if not 0 <= float(percentile) <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    return float(percentile)


def margin_percentile(
    model: nn.Module, batches: Sequence[Batch], percentile: float = 5.0, logits_fn: LogitsFn | None = None
) -> float:
    """The ``percentile``-th percentile (numpy's linear interpolation) of :func:`sample_margins`."""
    m = sample_margins(model, batches, logits_fn)
    if m.numel() == 0:
        raise ValueError("the margin needs a non-empty sample (`batches`)")
    return float(np.percentile(m.cpu().numpy(), _check_percentile(percentile)))


@register_measure("margin", kind="complexity", needs_logits=True, percentile=5.0)
def margin(inputs: MeasureInputs, *, percentile: float) -> MeasureResult:
    """Output margin γ: the ``percentile``-th percentile over the sample of f_y(x) − max_{j≠y} f_j(x).

    Jiang et al. 2019 (arXiv 1912.02178, §C.1 uses the 10th percentile) and Neyshabur et al. 2017 (arXiv 1706.08947,
    5th percentile on the training set; SPEC F36). Default ``percentile=5`` (numpy linear interpolation). Under
    torch.distributed the margins of all ranks are gathered before the percentile, so every rank agrees.
    The logits and labels come from ``inputs.logits_fn`` (e.g. a module's ``outputs_and_targets``), by default
    ``model(x)`` against ``y``; a one-logit binary head is the two-class (0, z), margin ±z. Needs class logits:
    refused (one line) for a model that gives none, e.g. an autoencoder.
    ``extra``: mean, min and the fraction of non-positive margins. Cost: one forward pass over the sample.
    """
    m = sample_margins(inputs.model, inputs.batches, inputs.logits_of)
    if m.numel() == 0:
        raise ValueError("the margin needs a non-empty sample (`batches`)")
    q = _check_percentile(percentile)
    arr = m.cpu().numpy()
    return MeasureResult(
        "margin",
        float(np.percentile(arr, q)),
        None,
        Cost(forwards=1),
        {"percentile": q},
        {"mean": float(arr.mean()), "min": float(arr.min()), "fraction_nonpositive": float((arr <= 0).mean())},
    )


# ---- products of layer norms ----------------------------------------------------------------------------------------
def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def _finish_product(
    name: str,
    inputs: MeasureInputs,
    log_value: float,
    extra: dict[str, float],
    settings: dict[str, Any],
) -> MeasureResult:
    """Apply the shared ``over_margin`` / ``squared`` / ``log`` settings to log(value) and build the result."""
    over_margin = _check_bool("over_margin", settings["over_margin"])
    squared = _check_bool("squared", settings["squared"])
    log = _check_bool("log", settings["log"])
    _check_percentile(settings["percentile"])
    cost = Cost()
    extra = {**extra, "log_unnormalized": log_value}
    if over_margin:
        gamma = margin_percentile(inputs.model, inputs.batches, settings["percentile"], inputs.logits_of)
        extra["margin"] = gamma
        cost = Cost(forwards=1)
        log_value = log_value - math.log(gamma) if gamma > 0 else float("inf")
    if squared:
        log_value *= 2
    return MeasureResult(name, log_value if log else _exp(log_value), None, cost, dict(settings), extra)


_PRODUCT_DOC = """

    Settings shared by the norm products: ``over_margin`` (default False) divides the product by the margin γ (the
    ``percentile``-th percentile, default 5, of f_y − max_{j≠y} f_j over the sample; Neyshabur et al. 2017 report
    Π‖W_l‖/γ); ``squared`` (default False) squares the result (Jiang et al. 2019's ``log_prod_of_*_over_margin`` is
    ``over_margin=True, squared=True``: log Π‖W_l‖²/γ²); ``log`` (default True) reports the natural log of the
    result (products over many layers overflow) rather than the result. A margin ≤ 0 makes a margin-normalised
    value +inf; ``over_margin`` needs class logits (``inputs.logits_fn``, as for ``margin``) and is refused (one
    line) for a model without them. ``bn`` defaults to ``"fold"`` (BN folded into the preceding layer first).
    ``extra``: the per-layer norms (by module name), ``log_unnormalized`` = Σ_l log‖W_l‖ and ``margin``. Cost: none
    (no data) unless ``over_margin`` (one forward pass over the sample)."""

_PRODUCT_DEFAULTS = dict(over_margin=False, squared=False, log=True, percentile=5.0, bn="fold")


def _over_margin(settings: dict[str, Any]) -> bool:
    """A norm product or path norm needs class logits only when it divides by the margin."""
    return bool(settings.get("over_margin"))


def _register_product(name: str, per_layer: Callable[[Layer], float], doc: str) -> None:
    def measure(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
        layers = _layers_of(inputs)
        norms = {layer.name: per_layer(layer) for layer in layers}
        return _finish_product(name, inputs, sum(_log(v) for v in norms.values()), norms, settings)

    measure.__doc__ = doc + _PRODUCT_DOC
    measure.__name__ = name.replace(".", "_")
    register_measure(name, kind="complexity", needs_logits=_over_margin, **_PRODUCT_DEFAULTS)(measure)


_register_product(
    "l1inf_norm_product",
    lambda layer: lpq_norm(layer.matrix(), 1, math.inf),
    """Π_l ‖W_l‖_{1,∞}: max over output units of the L1 norm of their incoming weights (Bartlett & Mendelson 2002;
    Neyshabur et al. 2017, arXiv 1706.08947, SPEC F37).""",
)
_register_product(
    "frobenius_norm_product",
    lambda layer: lpq_norm(layer.matrix(), 2, 2),
    """Π_l ‖W_l‖_F (Neyshabur et al. 2015, arXiv 1503.00036; Neyshabur et al. 2017, arXiv 1706.08947, SPEC F37).""",
)
_register_product(
    "l3_1.5_norm_product",
    lambda layer: lpq_norm(layer.matrix(), 3, 1.5),
    """Π_l ‖W_l‖_{3,1.5} = Π_l (Σ_j ‖w_j‖_3^{1.5})^{1/1.5} (Neyshabur et al. 2015, arXiv 1503.00036; SPEC F37).""",
)
_register_product(
    "schatten1.5_norm_product",
    lambda layer: schatten_norm(layer.matrix(), 1.5),
    """Π_l ‖σ(W_l)‖_{1.5}, the Schatten-1.5 norm of the (out, -1) matrix (Neyshabur et al. 2017, arXiv 1706.08947,
    "L_1.5 operator norm", SPEC F37).""",
)
_register_product(
    "trace_norm_product",
    lambda layer: schatten_norm(layer.matrix(), 1),
    """Π_l ‖σ(W_l)‖_1, the trace (nuclear) norm of the (out, -1) matrix (Neyshabur et al. 2017, arXiv 1706.08947,
    SPEC F37).""",
)


def spectral_norm_product(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """Π_l σ_max(W_l), the product of the layers' operator 2-norms (Bartlett et al. 2017, arXiv 1706.08498;
    Neyshabur et al. 2017, arXiv 1706.08947; Jiang et al. 2019 eq. 32; SPEC F37).

    Convolutions: by default (``reshaped=False``) the operator norm of the convolution as a linear map on its
    actual input size (traced from ``input_shape``), by Lanczos on AᵀA with conv and conv_transpose, run until the
    relative residual of the top Ritz pair is ≤ ``tol`` = 1e-7 (which puts the estimate within a relative 1e-7 of
    a singular value, in practice of σ_max to ~1e-12), at most ``power_iters`` = 1000 products with AᵀA (the
    setting keeps the name of the power iteration it replaced; 50-100 steps are typical), start vector from
    ``seed`` = 0. A layer that hits the cap first gives a RuntimeWarning naming it and counts in
    ``extra["unconverged"]`` (0 otherwise). ``reshaped=True`` uses the cheaper largest singular value of the
    (out, -1) reshaped kernel, as the reference code of Neyshabur et al. does (it differs from the operator norm in
    general; Sedghi et al. 2019, arXiv 1805.10408). Linear layers: the largest singular value of W (exact). The
    forward of two all-zero inputs that traces the input sizes counts as 0 passes over the sample."""
    norms, unconverged = _spectral_norms(inputs, settings)
    extra = {**norms, "unconverged": float(unconverged)}
    return _finish_product("spectral_norm_product", inputs, sum(_log(v) for v in norms.values()), extra, settings)


def _spectral_norms(inputs: MeasureInputs, settings: dict[str, Any]) -> tuple[dict[str, float], int]:
    """σ_max per layer (by module name) and the number of layers whose Lanczos run hit ``power_iters`` first."""
    reshaped = _check_bool("reshaped", settings["reshaped"])
    iters, tol = int(settings["power_iters"]), float(settings["tol"])
    if iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {settings['power_iters']!r}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {settings['tol']!r}")
    layers = _layers_of(inputs, need_shapes=not reshaped)
    seed = int(settings["seed"])
    found = {layer.name: _layer_spectral_norm(layer, reshaped, iters, tol, seed, warn=True) for layer in layers}
    return {name: est.sigma for name, est in found.items()}, sum(not est.converged for est in found.values())


spectral_norm_product.__doc__ = (spectral_norm_product.__doc__ or "") + _PRODUCT_DOC
_SPECTRAL_DEFAULTS = dict(reshaped=False, power_iters=1000, tol=1e-7, seed=0)
register_measure(
    "spectral_norm_product",
    kind="complexity",
    needs_logits=_over_margin,
    needs_input_shape=lambda settings: False if settings.get("reshaped") else "conv",
    **_SPECTRAL_DEFAULTS,
    **_PRODUCT_DEFAULTS,
)(spectral_norm_product)


# ---- path norms -----------------------------------------------------------------------------------------------------
def path_norm(model: nn.Module, input_shape: Sequence[int], p: float, bias: bool = True) -> float:
    """L_p path norm (Σ over input→output paths of Π |w|^p)^{1/p}: a float64 copy of ``model`` in which every
    trainable parameter θ is replaced by |θ|^p is run on one all-ones input of ``input_shape``, the outputs are
    summed, and the sum is raised to 1/p (Neyshabur et al. 2015, arXiv 1503.00036).

    Biases (``bias=True``) are edges from a constant-one unit of their layer (Neyshabur 2015): a path may start at
    any layer's bias unit, so |b|^p enters the same forward pass; ``bias=False`` zeroes the Linear/Conv biases
    instead. Exact for networks of Linear/Conv layers, ReLU (identity on the non-negative activations), flatten and
    sum/average pooling; max pooling picks one path. Other trainable parameters (e.g. un-folded BN γ, β) are also
    raised to |θ|^p as in the reference code, while BN running statistics are applied unchanged: fold BN first.
    """
    tmp = copy.deepcopy(model).to(torch.float64)
    layer_biases = {id(m.bias) for m in tmp.modules() if isinstance(m, LAYER_TYPES) and m.bias is not None}
    with torch.no_grad():
        for param in tmp.parameters():
            if not param.requires_grad:
                continue
            if not bias and id(param) in layer_biases:
                param.zero_()
            else:
                param.abs_().pow_(p)
        ones = torch.ones(1, *input_shape, dtype=torch.float64, device=next(tmp.parameters()).device)
        total = float(tmp(ones).sum())
    if total < 0:
        raise ValueError("the |θ|^p network gave a negative output sum (un-folded BatchNorm?); use bn='fold'")
    return total ** (1.0 / p)


def _register_path_norm(name: str, p: float) -> None:
    def measure(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
        bias = _check_bool("bias", settings["bias"])
        if inputs.input_shape is None:
            raise ValueError(f"{name} needs `input_shape` (the shape of one input) for its all-ones input")
        value = path_norm(inputs.model, inputs.input_shape, p, bias=bias)
        return _finish_product(name, inputs, _log(value), {"path_norm": value}, settings)

    measure.__doc__ = f"""L_{p:g} path norm (Σ over input→output paths of Π_edges |w|^{p:g})^{{1/{p:g}}} (Neyshabur et
    al. 2015, arXiv 1503.00036; Neyshabur et al. 2017, arXiv 1706.08947; SPEC F38), see :func:`path_norm`: one
    forward of a |θ|^p copy on an all-ones input of ``input_shape``, outputs summed. That single-input forward is
    counted as 0 passes over the sample. Cost: zero, unless ``over_margin`` (one forward pass over the sample).

    Settings: ``bias`` (default True) counts biases as edges from constant-one units (Neyshabur 2015), False drops
    them; ``over_margin`` (default False) divides by the ``percentile``-th (default 5) percentile margin γ (one
    forward pass over the sample); ``squared`` (default False) squares the result (for p = 2: Jiang et al. 2019's
    path norm Σ Π w², and with ``over_margin`` their eq. 43 ratio); ``log`` (default False) reports the natural log.
    A margin ≤ 0 makes a margin-normalised value +inf. ``bn`` defaults to ``"fold"``. ``extra``: ``path_norm`` (the
    plain norm), ``margin``."""
    measure.__name__ = name.replace(".", "_")
    register_measure(
        name,
        kind="complexity",
        needs_logits=_over_margin,
        needs_input_shape=True,
        bias=True,
        over_margin=False,
        squared=False,
        log=False,
        percentile=5.0,
        bn="fold",
    )(measure)


for _p in (1, 1.5, 2):
    _register_path_norm(f"path_norm_{_p:g}", float(_p))


# ---- parameters and distance from initialisation --------------------------------------------------------------------
def init_tensors(model: nn.Module, init_state: dict[str, torch.Tensor] | None, names: Sequence[str]) -> dict:
    """The initial value (float64, on the parameter's device) of each parameter in ``names`` of ``model``.

    ``init_state`` is the state_dict at initialisation, of the model as measured: :func:`compute_measure` with
    ``bn="fold"`` hands the measures an ``init_state`` already folded by
    :func:`~flatlit.sharpness.base.fold_state` (the same fold as the weights, with the initial BN statistics), which
    is used as it is. For a direct call with the *original* model's state_dict and a
    :func:`~flatlit.sharpness.base.fold_batchnorm` copy, a Linear/Conv followed inside an ``nn.Sequential`` by a
    :class:`~flatlit.sharpness.base.FoldedBatchNorm` (or an ``nn.Identity``) at whose name ``init_state`` holds
    BatchNorm statistics gets its initial weight and bias folded here (Neyshabur's ``reparam`` of the init model),
    in float64 with the folded BN's own eps (1e-5 for a plain ``nn.Identity``). ValueError naming ``init_state`` when
    it is None or lacks a parameter.
    """
    if init_state is None:
        raise ValueError("this measure needs `init_state` (the model's state_dict at initialisation)")
    params = dict(model.named_parameters())
    folded: dict[str, torch.Tensor] = {}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{seq_name}." if seq_name else ""
        names_in_seq = list(seq._modules)
        for prev_name, name in itertools.pairwise(names_in_seq):
            prev, cur = seq._modules[prev_name], seq._modules[name]
            bn = prefix + name
            if not (isinstance(prev, LAYER_TYPES) and isinstance(cur, nn.Identity)):
                continue
            if f"{bn}.running_var" not in init_state:
                continue
            var = init_state[f"{bn}.running_var"].double()
            gamma = init_state.get(f"{bn}.weight", torch.ones_like(var)).double()
            beta = init_state.get(f"{bn}.bias", torch.zeros_like(var)).double()
            mean = init_state[f"{bn}.running_mean"].double()
            scale = gamma / torch.sqrt(var + getattr(cur, "eps", _DEFAULT_BN_EPS))
            w0 = init_state[f"{prefix}{prev_name}.weight"].double()
            b0 = init_state.get(f"{prefix}{prev_name}.bias")
            b0 = torch.zeros_like(mean) if b0 is None else b0.double()
            folded[f"{prefix}{prev_name}.weight"] = w0 * scale.view(-1, *([1] * (w0.ndim - 1)))
            folded[f"{prefix}{prev_name}.bias"] = (b0 - mean) * scale + beta
    out = {}
    for n in names:
        value = folded.get(n, init_state.get(n))
        if value is None:
            raise ValueError(f"`init_state` has no entry for parameter {n!r}")
        out[n] = value.detach().to(device=params[n].device, dtype=torch.float64).reshape(params[n].shape)
    return out


def _module_of(name: str) -> str:
    return name.rpartition(".")[0] or name


@register_measure("distance_from_init", kind="complexity")
def distance_from_init(inputs: MeasureInputs) -> MeasureResult:
    """‖θ − θ₀‖₂ over all trainable parameters (Nagarajan & Kolter 2019, arXiv 1901.01672; Jiang et al. 2019
    eq. 40 squares it; SPEC F39/F41). Needs ``inputs.init_state``. ``extra``: the distance of each module's
    parameters (by module name). With ``bn="fold"`` the initial weights are folded too (:func:`init_tensors`).
    Cost: none (no data)."""
    named = inputs.named_params
    init = init_tensors(inputs.model, inputs.init_state, [n for n, _ in named])
    per_module: dict[str, float] = {}
    for n, p in named:
        d2 = float((p.detach().double() - init[n]).pow(2).sum())
        per_module[_module_of(n)] = per_module.get(_module_of(n), 0.0) + d2
    total = math.sqrt(sum(per_module.values()))
    return MeasureResult(
        "distance_from_init", total, None, Cost(), {}, {k: math.sqrt(v) for k, v in per_module.items()}
    )


@register_measure("param_norm", kind="complexity")
def param_norm(inputs: MeasureInputs) -> MeasureResult:
    """‖θ‖₂ over all trainable parameters (Jiang et al. 2019 eq. 42 squares it; SPEC F41). ``extra``: the norm of
    each module's parameters. Cost: none."""
    per_module: dict[str, float] = {}
    for n, p in inputs.named_params:
        per_module[_module_of(n)] = per_module.get(_module_of(n), 0.0) + float(p.detach().double().pow(2).sum())
    total = math.sqrt(sum(per_module.values()))
    return MeasureResult("param_norm", total, None, Cost(), {}, {k: math.sqrt(v) for k, v in per_module.items()})


def layer_param_count(layers: Sequence[Layer]) -> int:
    """Weights and biases of the Linear/Conv layers (the reference's ``nparam``; BN excluded)."""
    return sum(
        layer.module.weight.numel() + (0 if layer.module.bias is None else layer.module.bias.numel())
        for layer in layers
    )


@register_measure("param_count", kind="complexity")
def param_count(inputs: MeasureInputs) -> MeasureResult:
    """Number of trainable parameters (Jiang et al. 2019 eq. 20; SPEC F39). ``extra``: ``depth`` (number of
    Linear/Conv layers) and ``layer_params`` (their weights and biases only, BN excluded). Cost: none."""
    layers = find_layers(inputs.model, inputs.input_shape)
    count = sum(p.numel() for p in inputs.params)
    extra = {"depth": float(len(layers)), "layer_params": float(layer_param_count(layers))}
    return MeasureResult("param_count", float(count), None, Cost(), {}, extra)


# ---- generalization bounds (Neyshabur et al. 2017, "Exploring generalization in deep learning") --------------------
_BOUND_DOC = """

    Common to the four bounds (Neyshabur et al. 2017, arXiv 1706.08947, §2 and the reference code
    ``bneyshabur/generalization-bounds``; SPEC §4.1, F40): constants and additive log factors are dropped; γ is the
    ``percentile``-th percentile (default 5) of the margins f_y − max_{j≠y} f_j over the sample (class logits from
    ``inputs.logits_fn``, as for ``margin``: the bounds are refused, one line, for a model without them); m is
    ``inputs.num_train`` (default: the sample size); d is the number of Linear/Conv layers; α = √(d + log(C·H·W)) with
    C·H·W the input dimension (``input_shape``; Golowich et al. 2018's depth dependency); layer matrices are the
    (out, -1) reshaped weights. ``bn`` defaults to ``"fold"`` (the reference reparametrises BN into the preceding
    layer, for the initial weights as well). The value is exp(Σ log terms) in float64 (+inf on overflow, or when
    γ ≤ 0); ``extra`` has ``log_bound``, ``margin``, ``m``, ``depth`` and the per-layer terms. Cost: one forward
    pass over the sample (the margin)."""


def _bound_context(inputs: MeasureInputs, percentile: float, need_shapes: bool = False) -> dict[str, Any]:
    if inputs.input_shape is None:
        raise ValueError("the bounds need `input_shape` (the shape of one input) for the input dimension")
    layers = _layers_of(inputs, need_shapes=need_shapes)
    m = inputs.num_train if inputs.num_train is not None else sample_size(inputs.batches)
    if m < 1:
        raise ValueError(f"the bounds need a training-set size `num_train` >= 1, got {m}")
    gamma = margin_percentile(inputs.model, inputs.batches, percentile, inputs.logits_of)
    d = len(layers)
    alpha = math.sqrt(d + math.log(math.prod(inputs.input_shape)))
    return {"layers": layers, "m": m, "gamma": gamma, "d": d, "alpha": alpha}


def _bound_result(
    name: str, ctx: dict[str, Any], log_terms: Sequence[float], settings: dict, extra: dict[str, float]
) -> MeasureResult:
    gamma = ctx["gamma"]
    log_bound = sum(log_terms) - math.log(gamma) if gamma > 0 else float("inf")
    if math.isnan(log_bound):  # a zero factor times an infinite one
        log_bound = float("inf")
    extra = {**extra, "log_bound": log_bound, "margin": gamma, "m": float(ctx["m"]), "depth": float(ctx["d"])}
    return MeasureResult(name, _exp(log_bound), None, Cost(forwards=1), dict(settings), extra)


def _bound_bm(inputs: MeasureInputs, *, percentile: float) -> MeasureResult:
    """Bartlett & Mendelson 2002 ℓ1,∞ bound: α · Π_l ‖W_l‖_{1,∞} / (γ √m)."""
    ctx = _bound_context(inputs, _check_percentile(percentile))
    norms = {layer.name: lpq_norm(layer.matrix(), 1, math.inf) for layer in ctx["layers"]}
    logs = [math.log(ctx["alpha"]), *(_log(v) for v in norms.values()), -0.5 * math.log(ctx["m"])]
    return _bound_result("bound_bartlett_mendelson", ctx, logs, {"percentile": percentile}, norms)


def _bound_n15(inputs: MeasureInputs, *, norm: str, percentile: float) -> MeasureResult:
    """Neyshabur et al. 2015 bounds: ``norm="frobenius"`` (default): α · Π_l ‖W_l‖_F / (γ √m);
    ``norm="l3_1.5"``: α · Π_l ‖W_l‖_{3,1.5} / (γ m^{1/3})."""
    pq = {"frobenius": (2, 2, 0.5), "l3_1.5": (3, 1.5, 1 / 3)}
    if norm not in pq:
        raise ValueError(f"norm must be one of {', '.join(pq)}, got {norm!r}")
    p, q, root = pq[norm]
    ctx = _bound_context(inputs, _check_percentile(percentile))
    norms = {layer.name: lpq_norm(layer.matrix(), p, q) for layer in ctx["layers"]}
    logs = [math.log(ctx["alpha"]), *(_log(v) for v in norms.values()), -root * math.log(ctx["m"])]
    return _bound_result("bound_neyshabur2015", ctx, logs, {"norm": norm, "percentile": percentile}, norms)


def _spectral_and_distances(inputs: MeasureInputs, ctx: dict[str, Any], settings: dict[str, Any]) -> tuple:
    layers = ctx["layers"]
    spec, unconverged = _spectral_norms(inputs, settings)
    init = init_tensors(inputs.model, inputs.init_state, [f"{layer.name}.weight" for layer in layers])
    diffs = {layer.name: layer.matrix() - init[f"{layer.name}.weight"].reshape_as(layer.matrix()) for layer in layers}
    return spec, diffs, unconverged


def _bound_b17(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """Bartlett et al. 2017 spectrally-normalised bound (arXiv 1706.08498):
    log(m)·log(n_param) · Π_l σ_l / γ · (Σ_l (‖W_l − W_l⁰‖_{2,1} / σ_l)^{2/3})^{3/2} / √m, with σ_l the spectral
    norm, ‖·‖_{2,1} the sum over output units of the L2 norm of their incoming weights and n_param the number of
    Linear/Conv weights and biases. Needs ``inputs.init_state``. ``reshaped`` (default True, as the reference code)
    takes σ_l of the reshaped kernel; False the convolution operator norm by Lanczos (``power_iters``, ``tol``,
    ``seed`` and ``extra["unconverged"]`` as in ``spectral_norm_product``)."""
    ctx = _bound_context(inputs, _check_percentile(settings["percentile"]), need_shapes=not settings["reshaped"])
    spec, diffs, unconverged = _spectral_and_distances(inputs, ctx, settings)
    ratios = {n: lpq_norm(diffs[n], 2, 1) / spec[n] for n in spec}
    ratio = sum(r ** (2 / 3) for r in ratios.values()) ** 1.5
    beta = math.log(ctx["m"]) * math.log(layer_param_count(ctx["layers"]))
    logs = [_log(beta), *(_log(v) for v in spec.values()), _log(ratio), -0.5 * math.log(ctx["m"])]
    extra = {**{f"spectral/{n}": v for n, v in spec.items()}, **{f"ratio/{n}": v for n, v in ratios.items()}}
    extra["unconverged"] = float(unconverged)
    return _bound_result("bound_bartlett2017", ctx, logs, settings, extra)


def _bound_n18(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """Neyshabur et al. 2018 PAC-Bayes spectral bound (arXiv 1707.09564):
    d · Π_l σ_l / γ · √(Σ_l h_l ‖W_l − W_l⁰‖_F² / σ_l²) / √m, with h_l the number of output units of layer l.
    Needs ``inputs.init_state``. ``reshaped`` (default True, as the reference code), ``power_iters``, ``tol``,
    ``seed`` and ``extra["unconverged"]``: as in ``bound_bartlett2017``."""
    ctx = _bound_context(inputs, _check_percentile(settings["percentile"]), need_shapes=not settings["reshaped"])
    spec, diffs, unconverged = _spectral_and_distances(inputs, ctx, settings)
    terms = {n: diffs[n].shape[0] * float(diffs[n].pow(2).sum()) / spec[n] ** 2 for n in spec}
    ratio = math.sqrt(sum(terms.values()))
    logs = [math.log(ctx["d"]), *(_log(v) for v in spec.values()), _log(ratio), -0.5 * math.log(ctx["m"])]
    extra = {**{f"spectral/{n}": v for n, v in spec.items()}, **{f"ratio/{n}": v for n, v in terms.items()}}
    extra["unconverged"] = float(unconverged)
    return _bound_result("bound_neyshabur2018", ctx, logs, settings, extra)


for _name, _fn, _defaults in (
    ("bound_bartlett_mendelson", _bound_bm, {}),
    ("bound_neyshabur2015", _bound_n15, {"norm": "frobenius"}),
    ("bound_bartlett2017", _bound_b17, {**_SPECTRAL_DEFAULTS, "reshaped": True}),
    ("bound_neyshabur2018", _bound_n18, {**_SPECTRAL_DEFAULTS, "reshaped": True}),
):
    _fn.__doc__ = (_fn.__doc__ or "") + _BOUND_DOC
    register_measure(
        _name, kind="complexity", needs_logits=True, needs_input_shape=True, **_defaults, percentile=5.0, bn="fold"
    )(_fn)


# ---- LPF-SGD's function-preserving normalisation (SPEC §5.6, F35) ---------------------------------------------------
class ChannelScale(nn.Module):
    """Multiply channel j of the input (dim 1; the last dim after a Linear) by the constant ``scale[j]`` (a buffer,
    not a parameter): LPF-SGD's fixed depthwise 1×1 convolution / diagonal linear map."""

    def __init__(self, scale: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return x * self.scale.view(shape)


def lpf_normalize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing the same function with unit-"norm" filters: LPF-SGD's ``norm()`` (Bisla et al.
    2022, "Low-Pass Filtering SGD for Recovering Flat Optima", arXiv 2201.08025; SPEC §5.6, F35).

    Every Linear/Conv layer gets, per output unit j, p_j = ‖W_j‖₂ + |b_j| (W_j the whole incoming filter; |b_j| = 0
    without bias); W_j and b_j are divided by p_j and the layer is replaced by ``nn.Sequential(layer,
    ChannelScale(p))``. Every BatchNorm gets p = |γ| + |β| per channel, γ, β /= p, and the same wrapper. The p's are
    buffers, not parameters, so measures see unit-norm filters; units with p_j = 0 are left as they are (p_j = 1).
    The wrapper changes parameter names (``0.weight`` → ``0.0.weight``). Apply :func:`fold_batchnorm` *before*, if at
    all: a wrapped layer is no longer folded by it (which keeps the function intact either way).
    """
    out = copy.deepcopy(model)

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if isinstance(child, LAYER_TYPES):
                w = child.weight.detach()
                p = w.reshape(w.shape[0], -1).norm(dim=1)
                if child.bias is not None:
                    p = p + child.bias.detach().abs()
            elif isinstance(child, _BatchNorm) and child.affine:
                p = child.weight.detach().abs() + child.bias.detach().abs()
            else:
                visit(child)
                continue
            p = torch.where(p > 0, p, torch.ones_like(p))
            with torch.no_grad():
                child.weight.div_(p.view(-1, *([1] * (child.weight.ndim - 1))))
                if child.bias is not None:
                    child.bias.div_(p)
            dim = -1 if isinstance(child, nn.Linear) else 1
            parent._modules[name] = nn.Sequential(child, ChannelScale(p, channel_dim=dim))

    visit(out)
    return out
