"""Hessian-based sharpness measures, the Fisher-Rao norm and ε-flatness along the gradient.

Every Hessian here is that of the size-weighted mean loss over the fixed sample, H = ∇²_θ L(θ), applied through
:class:`flatlit.curvature.HessianOperator` (double-backward HVPs, all-reduced under ``torch.distributed``) on the
trainable parameters θ. The operator runs in the BatchNorm mode the measure was called with (``bn``): running
statistics for ``eval``/``fold``, batch statistics for ``train``; dropout is off. Probes are drawn on the CPU from a
seeded generator, so every rank uses the same ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from flatlit.curvature import HessianOperator, hutchinson
from flatlit.curvature.hvp import flatten
from flatlit.objective import twice_differentiable
from flatlit.sharpness.base import (
    Cost,
    MeasureInputs,
    MeasureResult,
    all_reduce_sum,
    generator,
    mc_stats,
    narrow_batch,
    perturbed,
    randn_like,
    register_measure,
)
from flatlit.utils.batching import batch_size


# ---- helpers --------------------------------------------------------------------------------------------------------
def _check_int(measure: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{measure}: setting {name!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive(measure: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{measure}: setting {name!r} must be a positive finite number, got {value!r}")
    return float(value)


def _bn_mode(model: nn.Module) -> str:
    """``train`` when :func:`compute_measure` left a BatchNorm on batch statistics (``bn="train"``), else ``eval``."""
    return "train" if any(isinstance(m, _BatchNorm) and m.training for m in model.modules()) else "eval"


def hessian_operator(inputs: MeasureInputs) -> HessianOperator:
    """The Hessian of the sample loss (:meth:`MeasureInputs.loss_of`: the batch loss when given) on
    ``inputs.params``, in the measure's BatchNorm mode. Apply it under :func:`flatlit.objective.twice_differentiable`
    (the measures here do)."""
    model = inputs.model
    batch_loss = None if inputs.batch_loss is None else (lambda batch: inputs.batch_loss(model, batch))
    return HessianOperator(
        model,
        inputs.batches,
        inputs.loss_fn,
        inputs.params,
        bn_mode=_bn_mode(model),
        distributed=None,
        batch_loss=batch_loss,
    )


# ---- Hessian trace, Frobenius norm, θᵀHθ ---------------------------------------------------------------------------
@register_measure("hessian_trace", probes=50, seed=0)
def hessian_trace(inputs: MeasureInputs, probes: int = 50, seed: int = 0) -> MeasureResult:
    """Trace of the Hessian of the sample loss by Hutchinson's estimator (SPEC F25).

    tr H ≈ (1/m) Σ_k z_kᵀ H z_k with m Rademacher probes z_k (Hutchinson 1989; as in PyHessian, Yao et al.,
    arXiv 1912.07145), via :func:`flatlit.curvature.hutchinson` on a :class:`HessianOperator`. The standard error is
    the estimator's: sample std of z_kᵀHz_k / √m.

    Settings: ``probes`` (50) Rademacher probes, each one HVP over the sample (≥ 2, for the standard error);
    ``seed`` (0) of the probe generator.

    Cost: ``probes`` HVPs.
    """
    _check_int("hessian_trace", "probes", probes, 2)
    _check_int("hessian_trace", "seed", seed, 0)
    op = hessian_operator(inputs)
    with twice_differentiable("hessian_trace"):
        res = hutchinson(op.matvec, op.numel, probes, seed, op.dtype, op.device)
    return MeasureResult(
        "hessian_trace",
        float(res.estimate),
        float(res.std_error),
        Cost(hvps=res.num_matvecs),
        {"probes": probes, "seed": seed},
        {"num_params": float(op.numel)},
    )


@register_measure("hessian_frobenius", probes=10, seed=0)
def hessian_frobenius(inputs: MeasureInputs, probes: int = 10, seed: int = 0) -> MeasureResult:
    """Frobenius norm of the Hessian of the sample loss, ‖H‖_F = sqrt(E_v ‖H v‖²) with v ~ N(0, I) (SPEC F24).

    E‖Hv‖² = tr(HᵀH) = ‖H‖_F² for standard Gaussian v; the estimate is sqrt of the mean of ‖Hv_k‖² over the probes,
    as in LPF-SGD's ``fro_norm`` (Bisla et al. 2022, arXiv 2201.08025; 10 probes). The squared estimate is unbiased;
    its standard error (sample std of ‖Hv_k‖² / √m) is in ``extra["frobenius_sq_std_error"]``, and ``std_error`` of
    the norm itself follows by the delta method: SE(sqrt(s)) ≈ SE(s) / (2 sqrt(s)).

    Settings: ``probes`` (10) Gaussian probes, each one HVP over the sample (≥ 2); ``seed`` (0) of the probe
    generator.

    Extra: ``frobenius_sq`` (the estimate of ‖H‖_F²) and its standard error ``frobenius_sq_std_error``.

    Cost: ``probes`` HVPs.
    """
    _check_int("hessian_frobenius", "probes", probes, 2)
    _check_int("hessian_frobenius", "seed", seed, 0)
    op = hessian_operator(inputs)
    gen = generator(seed)
    like = torch.empty(op.numel, dtype=op.dtype, device=op.device)
    squares = []
    with twice_differentiable("hessian_frobenius"):
        for _ in range(probes):
            hv = op.matvec(randn_like(like, gen))
            squares.append(float(hv.double().pow(2).sum()))
    sq, sq_se = mc_stats(squares)
    value = math.sqrt(max(sq, 0.0))
    se = sq_se / (2 * value) if value > 0 else float("nan")
    return MeasureResult(
        "hessian_frobenius",
        value,
        se,
        Cost(hvps=probes),
        {"probes": probes, "seed": seed},
        {"frobenius_sq": sq, "frobenius_sq_std_error": sq_se},
    )


@register_measure("theta_h_theta")
def theta_h_theta(inputs: MeasureInputs) -> MeasureResult:
    """θᵀHθ, the curvature of the sample loss along the weights themselves (SPEC F26).

    LPF-SGD's ``fim`` / "FRN" measure (Bisla et al. 2022, arXiv 2201.08025, §5.6 of the SPEC): one HVP with v = θ
    over the trainable parameters (``inputs.params``), of whatever loss the inputs carry (a ``batch_loss`` of any
    batch structure included; no logits needed). ``extra["normalised"]`` is θᵀHθ / ‖θ‖² (the Rayleigh quotient
    along θ, which does not grow with the weight scale the way θᵀHθ does), and ``extra["theta_norm_sq"]`` is ‖θ‖².
    Deterministic.

    Cost: 1 HVP.
    """
    op = hessian_operator(inputs)
    theta = flatten([p.detach() for p in inputs.params])
    with twice_differentiable("theta_h_theta"):
        hv = op.matvec(theta)
    value = float(torch.dot(theta.double(), hv.double()))
    norm_sq = float(theta.double().pow(2).sum())
    return MeasureResult(
        "theta_h_theta",
        value,
        None,
        Cost(hvps=1),
        {},
        {"normalised": value / norm_sq if norm_sq > 0 else float("nan"), "theta_norm_sq": norm_sq},
    )


# ---- Fisher-Rao norm ------------------------------------------------------------------------------------------------
@register_measure("fisher_rao_norm", kind="complexity")
def fisher_rao_norm(inputs: MeasureInputs) -> MeasureResult:
    """Empirical Fisher-Rao norm (squared) of Liang, Poggio, Rakhlin & Stokes (AISTATS 2019, arXiv 1711.01530).

    ‖θ‖²_fr = (1/n) Σ_i ⟨θ, ∇_θ ℓ(f_θ(x_i), y_i)⟩² = θᵀ F̂ θ with F̂ the empirical Fisher (1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ over
    the sample (Liang et al. eq. 5.3; the "Fisher-Rao norm" measure of Jiang et al., arXiv 1912.02178), on the
    trainable parameters. For a bias-free ReLU network with L+1 weight layers, ⟨θ, ∇_θ ℓ_i⟩ = (L+1) ⟨∂ℓ_i/∂f, f⟩
    (Liang et al. Lemma 2.1), so the value equals (L+1)² (1/n) Σ_i ⟨∂ℓ_i/∂f, f(x_i)⟩²; this identity is not applied,
    the inner products are computed for any architecture. ``extra["norm"]`` is sqrt of the value.

    Computation: one forward-mode pass per batch (``torch.autograd.forward_ad`` through
    ``torch.func.functional_call``, tangent = θ) gives the outputs f_i and their directional derivatives J_i θ; the
    per-example output gradients ∂ℓ_i/∂f_i = n_b ∂L_b/∂f_i come from one cheap backward of the batch loss through
    the outputs only, and ⟨θ, ∇_θ ℓ_i⟩ = ⟨∂ℓ_i/∂f_i, J_i θ⟩. This needs ``loss_fn`` to be the mean over the batch of a
    per-example loss (the :class:`MeasureInputs` convention). With ``bn="train"`` the J_i θ include the batch
    statistics' dependence on θ. Squares and counts are all-reduced. Deterministic.

    With a ``batch_loss`` (batches of any structure: an autoencoder, a language model, a module's
    ``curvature_loss``) the per-example loss ℓ_i is the batch loss of example i alone (the batch cut to it,
    :func:`~flatlit.sharpness.base.narrow_batch`), and ⟨θ, ∇_θ ℓ_i⟩ comes from one backward pass per example (no
    logits needed); this needs ``bn="eval"`` or ``"fold"`` (one-example batch statistics are meaningless). For a
    batch-mean loss of per-example terms both ways give the same value.

    Cost: 1 forward + 1 gradient (a forward-mode pass, primal and tangent, plus a backward of the loss to the outputs);
    with a ``batch_loss``, ``per_example`` = 1 (a gradient for each example).
    """
    if inputs.batch_loss is not None:
        return _fisher_rao_generic(inputs)
    named = inputs.named_params
    dev = named[0][1].device
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    for x, y in inputs.batches:
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p.detach(), p.detach()) for n, p in named}
            out_dual = functional_call(inputs.model, duals, (x,), strict=False)
            out, jtheta = fwAD.unpack_dual(out_dual)
            out = out.detach()
            jtheta = torch.zeros_like(out) if jtheta is None else jtheta.detach()
        with torch.enable_grad():
            leaf = out.clone().requires_grad_(True)
            (dl_df,) = torch.autograd.grad(inputs.loss_fn(leaf, y) * len(y), leaf)
        per_example = (dl_df.double() * jtheta.double()).reshape(len(y), -1).sum(1)
        acc[0] += per_example.pow(2).sum()
        acc[1] += len(y)
    acc = all_reduce_sum(acc)
    value = float(acc[0] / acc[1])
    # cost: one forward-mode pass (primal + tangent: a forward and about a backward's worth) and a backward of the
    # loss to the outputs only, counted as 1 forward + 1 gradient
    return MeasureResult("fisher_rao_norm", value, None, Cost(forwards=1, gradients=1), {}, {"norm": math.sqrt(value)})


def _fisher_rao_generic(inputs: MeasureInputs) -> MeasureResult:
    """(1/n) Σ_i ⟨θ, ∇_θ L({i})⟩² with L({i}) the batch loss of example i alone: one backward per example."""
    if _bn_mode(inputs.model) == "train":
        raise ValueError(
            "fisher_rao_norm with a batch_loss takes one example at a time: use bn='eval' or bn='fold', not bn='train'"
        )
    params = inputs.params
    theta = [p.detach() for p in params]
    acc = torch.zeros(2, dtype=torch.float64, device=inputs.device)
    for batch in inputs.batches:
        for i in range(batch_size(batch)):
            with torch.enable_grad():
                loss = inputs.loss_of(inputs.model, narrow_batch(batch, i, 1))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            inner = sum((g.double() * t.double()).sum() for g, t in zip(grads, theta) if g is not None)
            acc[0] += torch.as_tensor(inner, dtype=torch.float64, device=acc.device) ** 2
            acc[1] += 1
    acc = all_reduce_sum(acc)
    value = float(acc[0] / acc[1])
    return MeasureResult("fisher_rao_norm", value, None, Cost(per_example=1), {}, {"norm": math.sqrt(value)})


# ---- ε-flatness along the gradient ----------------------------------------------------------------------------------
@register_measure("epsilon_flatness", epsilon=0.1, tol=1e-6, max_iter=100)
def epsilon_flatness(
    inputs: MeasureInputs, epsilon: float = 0.1, tol: float = 1e-6, max_iter: int = 100
) -> MeasureResult:
    """ε-flatness along the gradient (SPEC F28; LPF-SGD's ``eps_flat``, Bisla et al. 2022, arXiv 2201.08025).

    With g = ∇L(θ) the gradient of the sample loss, find the step η > 0 with L(θ + η g) − L(θ) = ε: η starts at 1
    and is multiplied by 5 while the increase is below ε (a non-finite increase counts as above), then bisection on
    [0, η_max] until |ΔL − ε| ≤ ``tol``, the interval reaches float precision, or ``max_iter`` loss evaluations
    were spent. The value is 1 / (η ‖g‖) = 1 / r, the inverse of the distance r = η‖g‖ travelled along the
    normalised gradient g/‖g‖ to raise the loss by ε (higher = sharper). When the loss never rises by ε the value is
    0 (``extra["bracketed"] = 0``); at an exact stationary point (g = 0) it is NaN.

    Settings: ``epsilon`` (0.1) the loss increase; ``tol`` (1e-6) on |ΔL − ε|; ``max_iter`` (100) loss evaluations
    (expansion plus bisection).

    Extra: ``eta`` (step in units of g, LPF's η), ``radius`` (η‖g‖), ``grad_norm``, ``loss`` (L(θ)),
    ``loss_increase`` (ΔL at the returned η), ``bracketed`` (1/0), ``evaluations``.

    Cost: 1 gradient plus one forward per loss evaluation (``extra["evaluations"]``).
    """
    eps = _check_positive("epsilon_flatness", "epsilon", epsilon)
    tol = _check_positive("epsilon_flatness", "tol", tol)
    _check_int("epsilon_flatness", "max_iter", max_iter, 1)
    settings = {"epsilon": epsilon, "tol": tol, "max_iter": max_iter}
    params = inputs.params
    loss0, grads = inputs.sample_loss_and_grad()
    gnorm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    extra = {"grad_norm": gnorm, "loss": loss0}
    if gnorm == 0.0 or not math.isfinite(gnorm):
        nan = float("nan")
        extra.update(eta=nan, radius=nan, loss_increase=nan, bracketed=0.0, evaluations=0.0)
        return MeasureResult("epsilon_flatness", nan, None, Cost(gradients=1), settings, extra)

    evaluations = 0

    def increase(eta: float) -> float:
        nonlocal evaluations
        evaluations += 1
        with perturbed(params, [g * eta for g in grads]):
            d = inputs.sample_loss() - loss0
        return d if math.isfinite(d) else math.inf

    hi, d_hi = 1.0, increase(1.0)
    while d_hi < eps and evaluations < max_iter:
        hi *= 5.0
        d_hi = increase(hi)
    if d_hi < eps:  # never rose by ε within the budget
        extra.update(eta=math.inf, radius=math.inf, loss_increase=d_hi, bracketed=0.0, evaluations=float(evaluations))
        return MeasureResult("epsilon_flatness", 0.0, None, Cost(forwards=evaluations, gradients=1), settings, extra)

    lo, eta, d = 0.0, hi, d_hi
    while abs(d - eps) > tol and evaluations < max_iter:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:  # interval at float precision
            break
        eta, d = mid, increase(mid)
        if d < eps:
            lo = mid
        else:
            hi = mid
    radius = eta * gnorm
    extra.update(eta=eta, radius=radius, loss_increase=d, bracketed=1.0, evaluations=float(evaluations))
    return MeasureResult(
        "epsilon_flatness", 1.0 / radius, None, Cost(forwards=evaluations, gradients=1), settings, extra
    )


__all__ = [
    "epsilon_flatness",
    "fisher_rao_norm",
    "hessian_frobenius",
    "hessian_operator",
    "hessian_trace",
    "theta_h_theta",
]
