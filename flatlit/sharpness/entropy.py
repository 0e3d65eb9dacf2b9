"""Entropy measures: the local entropy of the loss landscape and the entropy of the model's predictions."""

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


__all__ = ["local_entropy", "prediction_entropy"]
