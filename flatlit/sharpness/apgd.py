"""The two ascent iterations of the worst-case sharpness measures (:mod:`flatlit.sharpness.worst_case`).

* :func:`apgd_ascent`: Auto-PGD as written by Croce & Hein ("Reliable evaluation of adversarial robustness with an
  ensemble of diverse parameter-free attacks", ICML 2020, arXiv 2003.01690, Alg. 1), on δ' with δ = T ⊙ δ' so that
  every constraint set is a plain ball with an exact projection. flatlit's default.
* :func:`andriushchenko_ascent`: the update rules of the evaluation code of Andriushchenko et al., "A modern look at
  the relationship between sharpness and generalization" (ICML 2023, arXiv 2302.07011), written from their
  description and code (``sharpness.py``, ``eval_APGD_sharpness`` / ``weight_ascent_step_momentum``): an APGD
  variant in weight space with a different momentum, a different step-size test and, for the adaptive L2 set, a
  Euclidean projection onto the ellipsoid ‖δ/|w|‖₂ ≤ ρ found by bisection. Reproduces their numbers.

Both maximise a loss φ given by ``loss_grad(δ) -> (φ(δ), ∇φ(δ))`` over lists of tensors shaped like the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from flatlit.sharpness.base import generator, randn_like

LossGrad = Callable[[list[torch.Tensor]], tuple[float, list[torch.Tensor]]]

MOMENTUM = 0.75  # APGD's α: x_{k+1} = P(x_k + α(z_{k+1} − x_k) + (1 − α)(x_k − x_{k−1}))
PROGRESS_RATIO = 0.75  # APGD's ρ in condition 1: halve when fewer than 75 % of the steps since a checkpoint rose
BISECTION_TOL = 1e-5  # Andriushchenko et al.: stop the ellipsoid bisection when |‖δ/|w|‖₂ − ρ| ≤ 1e-5
BISECTION_CAP = 1000  # a safeguard only: their bisection ends after a few dozen halvings


# ---- shared helpers --------------------------------------------------------------------------------------------------
def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _project(d: list[torch.Tensor], rho: float, norm: str) -> list[torch.Tensor]:
    if norm == "linf":
        return [t.clamp(-rho, rho) for t in d]
    n = math.sqrt(_dot(d, d))
    return [t * (rho / n) for t in d] if n > rho else d


def _ascent_direction(g: list[torch.Tensor], norm: str) -> list[torch.Tensor]:
    if norm == "linf":
        return [t.sign() for t in g]
    n = math.sqrt(_dot(g, g))
    return [t / n for t in g] if n > 0 else [torch.zeros_like(t) for t in g]


def _random_start(params: Sequence[torch.Tensor], rho: float, norm: str, seed: int) -> list[torch.Tensor]:
    """A uniform draw from the ball ‖δ'‖ ≤ ρ (seeded, on the CPU: the same on every rank)."""
    gen = generator(seed)
    if norm == "linf":
        return [(2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1).mul_(rho).to(p.device) for p in params]
    z = [randn_like(p, gen) for p in params]
    numel = sum(p.numel() for p in params)
    radius = rho * float(torch.rand((), generator=gen, dtype=torch.float64)) ** (1.0 / numel)
    return [t * (radius / math.sqrt(_dot(z, z))) for t in z]


# ---- APGD (Croce & Hein 2020) ----------------------------------------------------------------------------------------
def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step: w_j = ⌈p_j·steps⌉ with p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (Croce & Hein 2020, §3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({min(steps, math.ceil(round(q * steps, 9))) for q in p[1:]} - {0})


def apgd_ascent(
    loss_grad: LossGrad,
    start: list[torch.Tensor],
    rho: float,
    norm: str,
    steps: int,
) -> tuple[float, float, list[torch.Tensor]]:
    """Maximise φ(δ') = ``loss_grad(δ')[0]`` over ‖δ'‖_p ≤ ρ by APGD (Croce & Hein 2020, Alg. 1).

    Step η starts at 2ρ; the ascent step is η·g/‖g‖₂ (L2) or η·sign(g) (L∞), followed by projection and momentum
    α = 0.75. At each checkpoint (:func:`apgd_checkpoints`) η is halved and the iterate reloaded from the best point
    (its gradient kept; the momentum restarts from it) when (1) fewer than 75 % of the steps since the previous
    checkpoint increased φ, or (2) η was not halved at the previous checkpoint and the best φ did not improve since.
    Memory: about nine copies of the parameters (iterates, best point, gradients, scale).

    Returns (φ at the start, the best φ, the best δ'); ``loss_grad`` is called steps + 1 times.
    """
    f_x, g_x = loss_grad(start)
    f_start = f_x
    x, x_prev = start, start
    f_best, x_best, g_best = f_x, x, g_x
    checkpoints = set(apgd_checkpoints(steps))
    eta, last_cp, rises = 2.0 * rho, 0, 0
    halved_last, f_best_last = False, f_best  # condition 2 applies from the first checkpoint on (w_0 = 0)
    for k in range(steps):
        u = _ascent_direction(g_x, norm)
        z = _project([a + eta * b for a, b in zip(x, u)], rho, norm)
        if k == 0:
            x_new = z
        else:
            x_new = [a + MOMENTUM * (c - a) + (1 - MOMENTUM) * (a - b) for a, b, c in zip(x, x_prev, z)]
            x_new = _project(x_new, rho, norm)
        f_new, g_new = loss_grad(x_new)
        rises += f_new > f_x
        x_prev, x, f_x, g_x = x, x_new, f_new, g_new
        if f_new > f_best:
            f_best, x_best, g_best = f_new, x_new, g_new
        if k + 1 in checkpoints:
            stalled = rises < PROGRESS_RATIO * (k + 1 - last_cp)
            no_gain = not halved_last and f_best <= f_best_last
            halved_last = stalled or no_gain
            f_best_last, last_cp, rises = f_best, k + 1, 0
            if halved_last:
                eta /= 2
                x, x_prev, f_x, g_x = x_best, x_best, f_best, g_best
    return f_start, f_best, x_best


# ---- Andriushchenko et al. 2023 --------------------------------------------------------------------------------------
def andriushchenko_checkpoints(steps: int) -> list[int]:
    """The 0-based iteration indices i after which Andriushchenko et al.'s loop tests the step size (so after i + 1
    steps): ⌈p_j·steps⌉ for p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), in plain floating point
    (no rounding), generated while the last one is < steps and differs from the one before; indices ≥ steps never
    come."""
    p, w = [0.0, 0.22], [0, math.ceil(steps * 0.22)]
    while w[-1] < steps and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * steps))
    return sorted(set(w[1:]))


def _safe_ratio(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """d / s where s > 0, else 0 (a weight equal to 0 is never perturbed: its step has the factor |w| = 0)."""
    return torch.where(s > 0, d / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(d))


def project_ellipsoid(d: list[torch.Tensor], scale: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """The Euclidean projection of δ onto {‖δ/s‖₂ ≤ ρ} as Andriushchenko et al. compute it: δ itself when inside,
    else δ_i / (1 + 2λ/s_i²) with the multiplier λ found by their bisection.

    λ starts at 0.1 in the bracket [0, 10]; each round evaluates the candidate at λ, then moves λ to the middle of
    [λ, upper] (candidate outside: λ becomes the lower end) or of [lower, λ] (inside: λ becomes the upper end),
    doubling the upper end and its limit when the upper end is within 0.01 of the limit (10, 20, 40, ...); it stops
    when the candidate's norm is within 1e-5 of ρ (from either side) and returns that candidate. Entries with
    s_i = 0 stay 0 and do not count in the norm (their code would divide 0 by 0 there)."""
    ratio = [_safe_ratio(t, s) for t, s in zip(d, scale)]
    norm = math.sqrt(_dot(ratio, ratio))
    if not norm > rho:
        return d
    inv_sq = [_safe_ratio(torch.ones_like(s), s) ** 2 for s in scale]  # 1/s², 0 where s = 0
    lam, lo, hi, hi_limit = 0.1, 0.0, 10.0, 10.0
    out = d
    for _ in range(BISECTION_CAP):
        if abs(norm - rho) <= BISECTION_TOL:
            return out
        out = [t / (1 + 2 * lam * c) for t, c in zip(d, inv_sq)]
        ratio = [_safe_ratio(t, s) for t, s in zip(out, scale)]
        norm = math.sqrt(_dot(ratio, ratio))
        if norm > rho:
            lam, lo = (lam + hi) / 2, lam
        else:
            lam, hi = (lo + lam) / 2, lam
        if hi_limit - hi < 1e-2:
            hi_limit, hi = 2 * hi_limit, 2 * hi
    return out if norm <= rho else [t * (rho / norm) for t in out]  # safeguard, not reached in practice


def andriushchenko_ascent(
    loss_grad: LossGrad,
    scale: list[torch.Tensor],
    rho: float,
    norm: str,
    adaptive: bool,
    steps: int,
) -> tuple[float, float, list[torch.Tensor]]:
    """Maximise φ(δ) = ``loss_grad(δ)[0]`` over {‖δ/s‖_p ≤ ρ} (s = ``scale``: |w| when ``adaptive``, ones
    otherwise) in weight space, with the update rules of Andriushchenko et al. 2023 (arXiv 2302.07011, their
    ``eval_APGD_sharpness``); ``loss_grad`` returns the weight-space gradient g = ∇L(w + δ).

    From δ₀ = δ₋₁ = 0 with η = 2ρ, for i = 0, ..., steps − 1:

    * z = P(δ_i + η·s ⊙ g/(‖g‖₂ + 1e-12)) for L2, z = P(δ_i + η·s ⊙ sign(g)) for L∞, where g is the gradient at
      the gradient point (δ_i, or the best point after a halving) and ‖g‖₂ the plain gradient norm (not that of
      s ⊙ g). P is the rescaling onto ‖δ‖₂ ≤ ρ (plain L2), the bisection :func:`project_ellipsoid` (adaptive L2)
      or the clamp to |δ| ≤ ρ·s (L∞).
    * δ_{i+1} = 0.75·z + 0.25·δ_{i−1} (a convex combination, no second projection; the first step is 0.75·z).
    * φ(δ_{i+1}) is evaluated; a strict rise over the best φ makes δ_{i+1} the best point and counts one update.
    * At i in :func:`andriushchenko_checkpoints` (previous one i', 0 at first): η is halved when the updates since
      i' number fewer than 0.75·(i − i'), or when η was not halved at i' and the best φ is the same as at i' (a
      test the first already implies, as no new best means no update). On
      halving their code reloads the best weights, which only moves where the next gradient is taken: the next
      step still starts from δ_{i+1} and the momentum still uses δ_i.

    Returns (φ(0), the best φ (φ(0) when nothing rose), the best δ); ``loss_grad`` is called steps + 1 times
    (at δ = 0, then at each new iterate; the last gradient is not used)."""
    delta = [torch.zeros_like(s) for s in scale]
    prev = delta
    f_start, g = loss_grad(delta)
    f_best, d_best, g_best = f_start, delta, g
    eta = 2.0 * rho
    checks = set(andriushchenko_checkpoints(steps))
    eta_at_check, best_at_check, last_check, updates = eta, f_best, 0, 0
    for i in range(steps):
        if norm == "l2":
            coef = eta / (math.sqrt(_dot(g, g)) + 1e-12)
            z = [d + coef * gi * s for d, gi, s in zip(delta, g, scale)]
            if not adaptive:
                n = math.sqrt(_dot(z, z))
                z = [t * (rho / n) for t in z] if n > rho else z
            else:
                z = project_ellipsoid(z, scale, rho)
        else:
            z = [d + eta * gi.sign() * s for d, gi, s in zip(delta, g, scale)]
            z = [torch.maximum(torch.minimum(t, rho * s), -rho * s) for t, s in zip(z, scale)]
        prev, delta = delta, [MOMENTUM * a + (1 - MOMENTUM) * b for a, b in zip(z, prev)]
        f, g = loss_grad(delta)
        if f > f_best:
            f_best, d_best, g_best = f, delta, g
            updates += 1
        if i in checks:
            stalled = updates < PROGRESS_RATIO * (i - last_check)
            no_gain = eta_at_check == eta and best_at_check == f_best
            eta_at_check, best_at_check, last_check, updates = eta, f_best, i, 0
            if stalled or no_gain:
                eta *= 0.5
                g = g_best  # the next gradient is taken at the best point (their reload); δ, δ_prev stay
    return f_start, f_best, d_best
