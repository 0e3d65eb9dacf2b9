"""Entropy measures: the local entropy of the loss landscape (by Monte Carlo, and the norm of its gradient by
Entropy-SGD's SGLD inner loop) and the entropy of the model's predictions."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from flatlit.sharpness.base import (
    Cost,
    MeasureInputs,
    MeasureNotApplicable,
    MeasureResult,
    all_reduce_sum,
    generator,
    perturbed,
    randn_like,
    register_measure,
)


def _check(measure: str, name: str, value: Any, minimum: float, integer: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or not math.isfinite(value) or value < minimum or (not integer and value <= 0):
        kind = f"an integer >= {minimum}" if integer else "a positive finite number"
        raise ValueError(f"{measure}: setting {name!r} must be {kind}, got {value!r}")


def _log_mean_exp(values: torch.Tensor) -> tuple[float, float]:
    """log((1/K) Σ_k exp(v_k)) by a stable log-sum-exp, and its delta-method standard error
    std(a) / (√K mean(a)) with a_k = exp(v_k − max v) (the SE of log of a Monte-Carlo mean)."""
    k = values.numel()
    lme = float(torch.logsumexp(values, 0)) - math.log(k)
    a = torch.exp(values - values.max())
    se = float(a.std() / (math.sqrt(k) * a.mean())) if k > 1 else float("nan")
    return lme, se


@register_measure("local_entropy", gamma=100.0, draws=100, seed=0, legacy=False)
def local_entropy(
    inputs: MeasureInputs, gamma: float = 100.0, draws: int = 100, seed: int = 0, legacy: bool = False
) -> MeasureResult:
    """Negative local entropy of the loss around θ (SPEC F31; Chaudhari et al., Entropy-SGD, arXiv 1611.01838), by
    Monte Carlo as in LPF-SGD's ``flat_meas/local_entropy.py::entropy`` (Bisla et al. 2022, arXiv 2201.08025).

    Draws δ_k ~ N(0, σ² I) on every trainable parameter, σ = 1/γ (LPF-SGD's noise scale; Chaudhari's kernel
    exp(−γ_c‖δ‖²/2) has σ = 1/√γ_c, i.e. pass ``gamma = √γ_c``), evaluates L_k = L(θ + δ_k) on the sample, and
    returns

        value = −log (1/K) Σ_k exp(−L_k)  ≈  −log E_δ exp(−L(θ + δ)),

    computed with a log-sum-exp. This is −F(θ) up to a constant: Chaudhari's local entropy with kernel variance σ²
    is F(θ) = log ∫ exp(−L(θ') − ‖θ' − θ‖²/(2σ²)) dθ' = log E_δ exp(−L(θ + δ)) + (d/2) log(2πσ²), whose last term
    (in ``extra["log_normaliser"]``) depends only on the parameter count d and σ. The value is a soft-min smoothing
    of the loss (min_k L_k ≤ value ≤ mean_k L_k); higher means sharper; for a flat loss it equals L(θ).

    ``legacy=True`` returns LPF-SGD's number exactly: −(LSE_k(+L_k) − log K + (d/2) log 2π − ½ log γ) (log-sum-exp of
    +L instead of −L and its normalising constant; SPEC §5.6 and §7 item 5, reproduced only behind this flag).

    Standard error: delta method on the log of the Monte-Carlo mean, SE ≈ std_k(a_k) / (√K mean_k(a_k)) with
    a_k = exp(∓L_k) (shifted by the extreme L_k for stability).

    Settings: ``gamma`` (100; LPF-SGD uses 10 for its label-noise and double-descent runs) noise scale σ = 1/γ;
    ``draws`` (100) Monte-Carlo draws K (≥ 2); ``seed`` (0) of the noise generator; ``legacy`` (False).

    Extra: ``sigma``, ``mean_loss`` (mean_k L_k: LPF's low-pass loss at this σ), ``log_normaliser``.

    Cost: ``draws`` forwards.
    """
    _check("local_entropy", "gamma", gamma, 0, integer=False)
    _check("local_entropy", "draws", draws, 2, integer=True)
    _check("local_entropy", "seed", seed, 0, integer=True)
    if not isinstance(legacy, bool):
        raise ValueError(f"local_entropy: setting 'legacy' must be a bool, got {legacy!r}")
    params = inputs.params
    sigma = 1.0 / gamma
    dim = sum(p.numel() for p in params)
    gen = generator(seed)
    losses = []
    for _ in range(draws):
        delta = [randn_like(p, gen) * sigma for p in params]
        with perturbed(params, delta):
            losses.append(inputs.sample_loss())
    ls = torch.tensor(losses, dtype=torch.float64)
    if legacy:
        lme, se = _log_mean_exp(ls)
        value = -(lme + dim / 2 * math.log(2 * math.pi) - 0.5 * math.log(gamma))
    else:
        lme, se = _log_mean_exp(-ls)
        value = -lme
    return MeasureResult(
        "local_entropy",
        value,
        se,
        Cost(forwards=draws),
        {"gamma": gamma, "draws": draws, "seed": seed, "legacy": legacy},
        {
            "sigma": sigma,
            "mean_loss": float(ls.mean()),
            "log_normaliser": dim / 2 * math.log(2 * math.pi * sigma**2),
        },
    )


@register_measure("local_entropy_grad_norm", steps=20, sgld_lr=0.1, eps=1e-4, alpha=0.75, g0=1e-4, seed=0)
def local_entropy_grad_norm(
    inputs: MeasureInputs,
    steps: int = 20,
    sgld_lr: float = 0.1,
    eps: float = 1e-4,
    alpha: float = 0.75,
    g0: float = 1e-4,
    seed: int = 0,
) -> MeasureResult:
    """μ_LE: the norm of the local-entropy gradient by Entropy-SGD's SGLD inner loop, per batch, averaged over the
    batches (SPEC §5.6 and §5.4; Chaudhari et al., Entropy-SGD, arXiv 1611.01838; LPF-SGD's
    ``local_entropy_grad_norm``, Bisla et al. 2022, arXiv 2201.08025).

    For each batch B of the sample, from the anchor θ_c = θ and μ = θ_c, ``steps`` = L SGLD steps on the batch loss
    L_B (no momentum, no weight decay):

        θ ← θ − η (∇L_B(θ) − γ (θ_c − θ) + ε/√(½η) ξ),   μ ← α μ + (1 − α) θ,   ξ ~ N(0, I),

    then θ is restored to θ_c. θ_c − μ estimates the gradient of the negative local entropy up to its factor γ
    (Chaudhari et al.: ∇(−F)(θ) = γ (θ − ⟨θ'⟩), ⟨θ'⟩ the mean of the Gibbs measure around θ, which μ tracks); the
    factor is left out, as in LPF-SGD. The value is the mean over the batches (unweighted, all ranks) of
    ‖θ_c − μ‖₂ over the trainable parameters ``inputs.params``; higher means sharper (LPF-SGD's μ_LE).

    Choices where the reference leaves room: LPF-SGD configures γ with g0 = 1e-4 and g1 = 1e-3, but its measure's
    optimizer never advances the scoping counter t, so γ = g0·(1 + g1)^0 = g0 for every batch: ``g0`` is the
    coupling γ and g1 has no effect (not a setting). Its extra gradient evaluation before the loop (unused without
    momentum) is skipped. The noise is drawn from a CPU generator seeded with ``seed`` *anew for every batch*
    (common random numbers: step by step, each parameter in order, ``randn`` of its shape), so the value does not
    depend on the order of the batches or on how they are sharded over ranks; LPF draws one stream from the global
    RNG. BatchNorm as the measure's ``bn`` (LPF: eval mode after ``norm()``, i.e. ``reparametrize="lpf_norm"``).

    Settings (LPF-SGD's values): ``steps`` (20) SGLD steps L per batch; ``sgld_lr`` (0.1) η; ``eps`` (1e-4) the
    thermal noise ε (std ε√(2η) per coordinate and step); ``alpha`` (0.75) averaging factor of μ (LPF's β1);
    ``g0`` (1e-4) coupling γ; ``seed`` (0) of the noise.

    Extra: ``batch_std`` (standard deviation of ‖θ_c − μ‖ over the batches), ``batches``. Seeded, not a Monte-Carlo
    mean: std_error is None.

    Cost: ``steps`` gradients (each batch ``steps`` times).
    """
    _check("local_entropy_grad_norm", "steps", steps, 1, integer=True)
    _check("local_entropy_grad_norm", "sgld_lr", sgld_lr, 0, integer=False)
    _check("local_entropy_grad_norm", "eps", eps, 0, integer=False)
    _check("local_entropy_grad_norm", "g0", g0, 0, integer=False)
    _check("local_entropy_grad_norm", "seed", seed, 0, integer=True)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
        raise ValueError(f"local_entropy_grad_norm: setting 'alpha' must lie in [0, 1), got {alpha!r}")
    params = inputs.params
    noise_scale = eps / math.sqrt(0.5 * sgld_lr)
    acc = torch.zeros(3, dtype=torch.float64, device=inputs.device)  # Σ_b ‖g_b‖, Σ_b ‖g_b‖², batches
    anchor = [p.detach().clone() for p in params]
    try:
        for batch in inputs.batches:
            gen = generator(seed)
            mu = [a.clone() for a in anchor]
            for _ in range(steps):
                with torch.enable_grad():
                    loss = inputs.loss_of(inputs.model, batch)
                    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
                with torch.no_grad():
                    for p, g, wc, m in zip(params, grads, anchor, mu):
                        dw = (wc - p).mul_(-g0).add_(randn_like(p, gen), alpha=noise_scale)
                        if g is not None:
                            dw.add_(g)
                        p.sub_(dw, alpha=sgld_lr)
                        m.mul_(alpha).add_(p, alpha=1 - alpha)
            norm = math.sqrt(sum(float((wc.double() - m.double()).pow(2).sum()) for wc, m in zip(anchor, mu)))
            acc += torch.tensor([norm, norm * norm, 1.0], dtype=torch.float64, device=acc.device)
            with torch.no_grad():
                for p, wc in zip(params, anchor):
                    p.copy_(wc)
    finally:
        with torch.no_grad():
            for p, wc in zip(params, anchor):
                p.copy_(wc)
    acc = all_reduce_sum(acc)
    count = float(acc[2])
    value = float(acc[0]) / count
    var = max(float(acc[1]) / count - value * value, 0.0) * count / (count - 1) if count > 1 else float("nan")
    return MeasureResult(
        "local_entropy_grad_norm",
        value,
        None,
        Cost(gradients=steps),
        {"steps": steps, "sgld_lr": sgld_lr, "eps": eps, "alpha": alpha, "g0": g0, "seed": seed},
        {"batch_std": math.sqrt(var), "batches": count},
    )


@register_measure("prediction_entropy", needs_logits=True)
def prediction_entropy(inputs: MeasureInputs) -> MeasureResult:
    """Mean Shannon entropy of the softmax predictions over the sample, in nats (SPEC F32; LPF-SGD's
    ``shannon_entropy``, Bisla et al. 2022, arXiv 2201.08025): −(1/N) Σ_i Σ_k p_ik log p_ik with p_i =
    softmax(f(x_i)) over the classes, computed from ``log_softmax`` on the class logits of
    :meth:`~flatlit.sharpness.base.MeasureInputs.logits_of` (``logits_fn``, e.g. a module's
    ``outputs_and_targets``; by default ``model(x)``, outputs with extra dimensions (N, C, ...) counting every
    position, a one-logit binary head as (0, z): the entropy of sigmoid(z)). Needs class logits: refused (one line)
    for a model that gives none, e.g. an autoencoder. Sums and counts are all-reduced. Deterministic.

    Extra: ``normalised`` (value / log K, in [0, 1], for K > 1 classes).

    Cost: 1 forward.
    """
    dev = inputs.device
    acc = torch.zeros(4, dtype=torch.float64, device=dev)  # entropy sum, positions, Σ classes, batches
    with torch.no_grad():
        for batch in inputs.batches:
            pair = inputs.logits_of(inputs.model, batch)
            if pair is None:
                raise MeasureNotApplicable("measure 'prediction_entropy' needs class logits on every batch")
            logp = F.log_softmax(pair[0].double(), dim=1)
            ent = -(logp.exp() * logp).sum(1)
            acc[0] += ent.sum()
            acc[1] += ent.numel()
            acc[2] += logp.shape[1]
            acc[3] += 1
    acc = all_reduce_sum(acc)
    value = float(acc[0] / acc[1])
    classes = round(float(acc[2] / acc[3]))
    extra = {"normalised": value / math.log(classes)} if classes > 1 else {}
    return MeasureResult("prediction_entropy", value, None, Cost(forwards=1), {}, extra)


__all__ = ["local_entropy", "local_entropy_grad_norm", "prediction_entropy"]
