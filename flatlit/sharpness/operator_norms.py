"""The Linear/Conv layers of a network and their per-layer norms: L_{p,q}, Schatten and operator (spectral) norms.

The norm measures see the network's *layers*: its ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``
modules, in forward order (found with forward hooks on a forward pass of two all-zero inputs of
``inputs.input_shape``; registration order when no input shape is known); a module called twice counts once; depth
d = number of layers. Layer matrices are the weights reshaped to ``(out, -1)`` (the incoming weights of output unit j
form row j), computed in float64. The spectral norm of a convolution is its operator norm on the layer's actual input
size, by Lanczos on AᵀA (:func:`conv_operator_norm`), or that of the reshaped kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatlit.sharpness.base import MeasureInputs

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d), 3: (F.conv3d, F.conv_transpose3d)}


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
