"""Norm-based complexity measures: products of layer norms, path norms, parameter norm/count, distance from init.

References:
    * Neyshabur, Bhojanapalli, McAllester, Srebro, "Exploring Generalization in Deep Learning", NeurIPS 2017,
      arXiv 1706.08947 (measures and bounds; reference code ``bneyshabur/generalization-bounds``).
    * Neyshabur, Tomioka, Srebro, "Norm-Based Capacity Control in Neural Networks", COLT 2015, arXiv 1503.00036
      (L_{p,q} norms, path norms and their treatment of biases).
    * Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic Generalization Measures and Where to Find Them",
      ICLR 2020, arXiv 1912.02178 (margin percentile, ``*_over_margin`` squared variants).
    * Bartlett & Mendelson 2002 (JMLR 3); Bartlett, Foster, Telgarsky 2017, arXiv 1706.08498.

The measures see the network's Linear/Conv *layers* (:func:`~flatlit.sharpness.operator_norms.find_layers`, with
their per-layer norms in :mod:`flatlit.sharpness.operator_norms`); the margin is in :mod:`flatlit.sharpness.margins`
and the generalization bounds in :mod:`flatlit.sharpness.bounds`.

BatchNorm: the norm products, path norms and bounds default to ``bn="fold"``: BatchNorm is folded into the
preceding layer first (:func:`flatlit.sharpness.base.fold_batchnorm`, Neyshabur's ``reparam``), so the layer
weights carry the BN scale; the initial weights (distance from init, the bounds) are folded the same way, with the
initial model's BN statistics (:func:`flatlit.sharpness.base.fold_state`, :func:`init_tensors`).
With ``bn="eval"`` the BN parameters are simply not part of any layer norm. ``lpf_normalize`` (LPF-SGD's
``norm()``) is the other function-preserving reparametrisation (SPEC F35).

Products over layers can overflow: the norm products report ``log`` of the product by default (``log=True``).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatlit.sharpness.base import Cost, MeasureInputs, MeasureResult, register_measure
from flatlit.sharpness.margins import (  # noqa: F401 (margin, sample_margins, margin_percentile re-exported)
    MARGIN_DOC,
    _check_margin_rank,
    _check_percentile,
    margin,
    margin_percentile,
    margin_value,
    sample_margins,
)
from flatlit.sharpness.operator_norms import (  # noqa: F401 (the layer helpers re-exported)
    LAYER_TYPES,
    Layer,
    OperatorNorm,
    _layer_spectral_norm,
    _layers_of,
    conv_operator_norm,
    conv_spectral_norm,
    find_layers,
    largest_singular_value,
    lpq_norm,
    schatten_norm,
    spectral_norm,
)

_DEFAULT_BN_EPS = 1e-5  # BatchNorm eps is not in a state_dict: for an nn.Identity without the FoldedBatchNorm eps


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
    _check_margin_rank(settings["margin_rank"])
    cost = Cost()
    extra = {**extra, "log_unnormalized": log_value}
    if over_margin:
        gamma = margin_value(
            inputs.model, inputs.batches, settings["percentile"], settings["margin_rank"], inputs.logits_of
        )
        extra["margin"] = gamma
        cost = Cost(forwards=1)
        log_value = log_value - math.log(gamma) if gamma > 0 else float("inf")
    if squared:
        log_value *= 2
    return MeasureResult(name, log_value if log else _exp(log_value), None, cost, dict(settings), extra)


_PRODUCT_DOC = f"""

    The products run over the Linear/Conv layers' weight tensors only (no biases; with ``bn="fold"`` the BN scale is
    inside them). Settings shared by the norm products: ``over_margin`` (default False) divides the product by the
    margin γ (the ``percentile``-th percentile, default 5, of f_y − max_{{j≠y}} f_j over the sample; Neyshabur et al.
    2017 report Π‖W_l‖/γ); ``squared`` (default False) squares the result (Jiang et al. 2019's
    ``log_prod_of_*_over_margin``, eqs. 31/36, is ``over_margin=True, squared=True``: log Π‖W_l‖²/γ²); ``log``
    (default True) reports the natural log of the result (products over many layers overflow) rather than the
    result. A margin ≤ 0 makes a margin-normalised value +inf; ``over_margin`` needs class logits
    (``inputs.logits_fn``, as for ``margin``) and is refused (one line) for a model without them. ``bn`` defaults to
    ``"fold"`` (BN folded into the preceding layer first). ``extra``: the per-layer norms (by module name),
    ``log_unnormalized`` = Σ_l log‖W_l‖ and ``margin``. Cost: none (no data) unless ``over_margin`` (one forward
    pass over the sample). {MARGIN_DOC}"""

_PRODUCT_DEFAULTS = dict(over_margin=False, squared=False, log=True, percentile=5.0, margin_rank=None, bn="fold")


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


def _spectral_norms(
    inputs: MeasureInputs, settings: dict[str, Any], of: Callable[[Layer], Layer] | None = None
) -> tuple[dict[str, float], int]:
    """σ_max per layer (by module name, forward order) and the number of layers whose Lanczos run hit
    ``power_iters`` first; ``of(layer)`` (default: the layer) is the layer whose σ_max is taken (e.g. W − W⁰)."""
    reshaped = _check_bool("reshaped", settings["reshaped"])
    iters, tol = int(settings["power_iters"]), float(settings["tol"])
    if iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {settings['power_iters']!r}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {settings['tol']!r}")
    layers = _layers_of(inputs, need_shapes=not reshaped)
    seed = int(settings["seed"])
    of = of or (lambda layer: layer)
    found = {layer.name: _layer_spectral_norm(of(layer), reshaped, iters, tol, seed, warn=True) for layer in layers}
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
    them; ``over_margin`` (default False) divides by the margin γ, the ``percentile``-th (default 5) percentile of
    the sample margins (one forward pass over the sample); ``squared`` (default False) squares the result (for
    p = 2: Jiang et al. 2019's eq. 44 path norm Σ Π w², and with ``over_margin`` their eq. 43 ratio); ``log``
    (default False) reports the natural log. A margin ≤ 0 makes a margin-normalised value +inf. ``bn`` defaults to
    ``"fold"``. ``extra``: ``path_norm`` (the plain norm), ``margin``. {MARGIN_DOC}"""
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
        margin_rank=None,
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


def _squared_norms(name: str, inputs: MeasureInputs, from_init: bool, settings: dict[str, Any]) -> MeasureResult:
    """Σ ‖θ − θ₀‖² (``from_init``) or Σ ‖θ‖² per module (by module name), over the measured parameters (only the
    Linear/Conv ``.weight`` with ``weights_only``); the total and per-module norms, or their squares (``squared``)."""
    named = inputs.named_params
    if _check_bool("weights_only", settings["weights_only"]):
        weights = {f"{layer.name}.weight" for layer in find_layers(inputs.model)}
        named = [(n, p) for n, p in named if n in weights]
        if not named:
            raise ValueError(f"measure {name!r}: weights_only=True, but no Linear/Conv weight is among the parameters")
    root = (lambda v: v) if _check_bool("squared", settings["squared"]) else math.sqrt
    init = init_tensors(inputs.model, inputs.init_state, [n for n, _ in named]) if from_init else {}
    per_module: dict[str, float] = {}
    for n, p in named:
        module = n.rpartition(".")[0] or n
        sq = float((p.detach().double() - init[n] if from_init else p.detach().double()).pow(2).sum())
        per_module[module] = per_module.get(module, 0.0) + sq
    extra = {k: root(v) for k, v in per_module.items()}
    return MeasureResult(name, root(sum(per_module.values())), None, Cost(), dict(settings), extra)


def distance_from_init(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """‖θ − θ₀‖₂ over all trainable parameters (Nagarajan & Kolter 2019, arXiv 1901.01672; SPEC F39/F41).
    Needs ``inputs.init_state``; with ``bn="fold"`` the initial weights are folded too (:func:`init_tensors`). Jiang
    et al. 2019 (arXiv 1912.02178) eq. 40 ``fro_dist`` = Σ_l ‖W_l − W_l⁰‖_F² is ``bn="fold", weights_only=True,
    squared=True``. Cost: none (no data)."""
    return _squared_norms("distance_from_init", inputs, True, settings)


def param_norm(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """‖θ‖₂ over all trainable parameters (SPEC F41). Jiang et al. 2019 (arXiv 1912.02178) eq. 42 ``param_norm`` =
    Σ_l ‖W_l‖_F² is ``bn="fold", weights_only=True, squared=True``. Cost: none (no data)."""
    return _squared_norms("param_norm", inputs, False, settings)


_NORM_DOC = """

    Settings: ``weights_only`` (default False) keeps only the ``.weight`` tensors of the Linear/Conv layers (no
    biases, no BatchNorm parameters; after folding with ``bn="fold"``); ``squared`` (default False) reports the
    squared norm. ``extra``: the same quantity for each module's parameters (by module name)."""
for _fn in (distance_from_init, param_norm):
    _fn.__doc__ = (_fn.__doc__ or "") + _NORM_DOC
    register_measure(_fn.__name__, kind="complexity", weights_only=False, squared=False)(_fn)


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
