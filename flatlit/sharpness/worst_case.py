"""Worst-case (adversarial-in-weight-space) sharpness: APGD over an L2 or L∞ ball, m-sharpness, and one-step SAM.

Worst-case sharpness is the largest rise of the sample loss within a ball of weight perturbations,

    S(w) = max_{δ ∈ B} L(w + δ) − L(w),   B = {‖δ‖_p ≤ ρ}  or, adaptive,  B = {‖δ / |w|‖_p ≤ ρ},

the elementwise-adaptive set of Kwon et al. (ASAM, arXiv 2102.11600) that makes S invariant to the rescalings a
ReLU network admits (layer l ×α, layer l+1 ×1/α). Following Andriushchenko et al., "A modern look at the
relationship between sharpness and generalization" (ICML 2023, arXiv 2302.07011), the maximum is approximated by
Auto-PGD (Croce & Hein, arXiv 2003.01690) run in weight space; with ``m`` set it is m-sharpness (Foret et al.,
arXiv 2010.01412): the maximum is taken separately on each chunk of m examples and the gains are averaged.

The optimisation is written on δ' with δ = T ⊙ δ' (T = |w| when adaptive, 1 otherwise), so the constraint is always
the plain ball ‖δ'‖_p ≤ ρ and its projection is exact (a rescaling for L2, a clamp for L∞).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flatlit.sharpness.base import (
    Batch,
    Cost,
    MeasureInputs,
    MeasureResult,
    all_reduce_sum,
    distributed,
    generator,
    narrow_batch,
    perturbed,
    randn_like,
    register_measure,
)
from flatlit.utils.batching import batch_size

NORMS = ("l2", "linf")
MOMENTUM = 0.75  # APGD's α: x_{k+1} = P(x_k + α(z_{k+1} − x_k) + (1 − α)(x_k − x_{k−1}))
PROGRESS_RATIO = 0.75  # APGD's ρ in condition 1: halve when fewer than 75 % of the steps since a checkpoint rose


# ---- setting checks (shared by the sharpness families in this package) ---------------------------------------------
def check_positive(name: str, value: Any) -> float:
    """``value`` as a float; ValueError naming the setting unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int; ValueError naming the setting unless it is an integer ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


# ---- APGD in weight space --------------------------------------------------------------------------------------------
def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step: w_j = ⌈p_j·steps⌉ with p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (Croce & Hein 2020, §3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({min(steps, math.ceil(round(q * steps, 9))) for q in p[1:]} - {0})


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


def apgd_ascent(
    loss_grad: Callable[[list[torch.Tensor]], tuple[float, list[torch.Tensor]]],
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


# ---- sample chunks for m-sharpness -----------------------------------------------------------------------------------
def chunks_of(batches: Sequence[Batch], m: int) -> list[list[Batch]]:
    """This rank's sample cut into consecutive chunks of m examples (pieces of the batches, of any structure:
    :func:`~flatlit.sharpness.base.narrow_batch`; the last chunk may be smaller). Chunks may straddle batches; a
    piece never exceeds its batch, so memory stays that of one batch."""
    out: list[list[Batch]] = [[]]
    room = m
    for batch in batches:
        start, size = 0, batch_size(batch)
        while start < size:
            take = min(room, size - start)
            out[-1].append(narrow_batch(batch, start, take))
            start += take
            room -= take
            if room == 0:
                out.append([])
                room = m
    return [c for c in out if c]


# ---- worst-case sharpness --------------------------------------------------------------------------------------------
def worst_case_sharpness(
    inputs: MeasureInputs,
    name: str,
    rho: float,
    norm: str,
    adaptive: bool,
    m: int | None,
    steps: int,
    seed: int | None,
) -> MeasureResult:
    """max_{‖δ/T‖_p ≤ ρ} L(w + δ) − L(w) by APGD (T = |w| if ``adaptive`` else 1); per chunk of m examples when
    ``m`` is set (chunk gains averaged with the chunk sizes as weights). Cost: steps + 1 gradients (+1 forward with a
    random start), in passes over the sample whatever m is."""
    rho = check_positive("rho", rho)
    norm = check_choice("norm", norm, NORMS)
    adaptive = check_bool("adaptive", adaptive)
    steps = check_int("steps", steps, 1)
    seed = check_seed("seed", seed, allow_none=True)
    if m is not None:
        m = check_int("m", m, 1)
    params = inputs.params
    scale = [p.detach().abs() for p in params] if adaptive else [torch.ones_like(p) for p in params]

    def climb(lg: Callable[[Sequence[torch.Tensor]], tuple[float, list[torch.Tensor]]]) -> tuple[float, float]:
        """(loss at the start, best loss found) for the objective ``lg`` (loss and gradient at the current weights)."""

        def loss_grad(d: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
            with perturbed(params, [t * s for t, s in zip(d, scale)]):
                f, g = lg(params)
            return f, [gi * s for gi, s in zip(g, scale)]  # chain rule: ∂L/∂δ' = T ⊙ ∇L(w + T ⊙ δ')

        start = [torch.zeros_like(p) for p in params] if seed is None else _random_start(params, rho, norm, seed)
        f_start, f_best, _ = apgd_ascent(loss_grad, start, rho, norm, steps)
        return f_start, f_best

    if m is None:
        f_start, worst = climb(lambda ps: inputs.sample_loss_and_grad(params=ps))
        clean = f_start if seed is None else inputs.sample_loss()
        worst = max(worst, clean)  # δ = 0 is feasible
    else:
        acc = torch.zeros(3, dtype=torch.float64)  # Σ n_c·clean_c, Σ n_c·worst_c, Σ n_c
        for pieces in chunks_of(inputs.batches, m):
            f_start, worst_c = climb(
                lambda ps, pieces=pieces: inputs.sample_loss_and_grad(pieces, params=ps, reduce=False)
            )
            clean_c = f_start if seed is None else inputs.sample_loss(pieces, reduce=False)
            n_c = sum(batch_size(b) for b in pieces)
            acc += torch.tensor([n_c * clean_c, n_c * max(worst_c, clean_c), n_c], dtype=torch.float64)
        if distributed():
            acc = all_reduce_sum(acc.to(inputs.device)).cpu()
        clean, worst = float(acc[0] / acc[2]), float(acc[1] / acc[2])
    settings = {"rho": rho, "norm": norm, "adaptive": adaptive, "m": m, "steps": steps, "seed": seed}
    cost = Cost(forwards=0 if seed is None else 1, gradients=steps + 1)
    return MeasureResult(name, worst - clean, None, cost, settings, {"clean_loss": clean, "perturbed_loss": worst})


_WORST_CASE_DOC = """

    Settings: ``rho`` ({rho}) the radius of the {ball}; ``m`` (None) the m of m-sharpness:
    None takes one maximum over the whole sample, an integer takes it separately on each chunk of m consecutive
    examples of this rank's sample and averages the gains weighted by chunk size (the paper uses m = 128 on 1024
    examples); ``steps`` (20) APGD iterations, the paper's ``n_iters``; ``seed`` (None) None starts APGD at δ = 0
    (the paper's default, its ``--sharpness_rand_init`` being off), an integer starts at a uniform random point of
    the ball drawn from that seed. ``bn`` as for every measure.

    Value: the gain max L(w + δ) − L(w) (≥ 0); extra: ``clean_loss`` and ``perturbed_loss`` (sample means, over
    chunks when m is set). Not Monte-Carlo: std_error is None.

    Cost: steps + 1 gradient passes (the start point, then one per iteration; the zero start's first pass also gives
    the clean loss), plus 1 forward pass with a random start."""


def _register_worst_case(name: str, norm: str, adaptive: bool, rho: float, summary: str, ball: str) -> None:
    def measure(inputs: MeasureInputs, rho: float = rho, m: int | None = None, steps: int = 20, seed=None):
        return worst_case_sharpness(inputs, name, rho, norm, adaptive, m, steps, seed)

    measure.__name__ = name
    measure.__doc__ = summary + _WORST_CASE_DOC.format(rho=rho, ball=ball)
    register_measure(name, rho=rho, m=None, steps=20, seed=None)(measure)


_register_worst_case(
    "worst_case_l2",
    "l2",
    False,
    0.1,
    """Worst-case L2 sharpness max_{‖δ‖₂ ≤ ρ} L(w + δ) − L(w) by APGD (Andriushchenko et al. 2023,
    arXiv 2302.07011; APGD: Croce & Hein 2020, arXiv 2003.01690; m-sharpness: Foret et al., arXiv 2010.01412).

    The ascent step is η·g/‖g‖₂ over all trainable parameters jointly; η starts at 2ρ and is halved by APGD's
    checkpoint rule, with momentum 0.75 and reloads of the best point (:func:`apgd_ascent`). ρ = 0.1 is the default
    of the paper's ``eval_sharpness.py`` (its CIFAR-10 sweeps use 0.025–2).""",
    "L2 ball ‖δ‖₂ ≤ ρ",
)
_register_worst_case(
    "worst_case_linf",
    "linf",
    False,
    0.001,
    """Worst-case L∞ sharpness max_{‖δ‖∞ ≤ ρ} L(w + δ) − L(w) by APGD (Andriushchenko et al. 2023,
    arXiv 2302.07011; APGD: Croce & Hein 2020, arXiv 2003.01690; m-sharpness: Foret et al., arXiv 2010.01412).

    The ascent step is η·sign(g), the projection a clamp to [−ρ, ρ]; η starts at 2ρ (:func:`apgd_ascent`).
    ρ = 0.001 lies in the paper's ResNet-18/CIFAR-10 sweep (0.0005–0.004).""",
    "L∞ ball ‖δ‖∞ ≤ ρ",
)
_register_worst_case(
    "adaptive_worst_case_l2",
    "l2",
    True,
    1.0,
    """Adaptive worst-case L2 sharpness max_{‖δ/|w|‖₂ ≤ ρ} L(w + δ) − L(w) by APGD (Andriushchenko et al. 2023,
    arXiv 2302.07011, with Kwon et al.'s elementwise-adaptive set, arXiv 2102.11600; APGD: Croce & Hein 2020,
    arXiv 2003.01690).

    Optimised on δ' with δ = |w| ⊙ δ', ‖δ'‖₂ ≤ ρ (exact projection; the ascent direction is |w| ⊙ ∇L normalised).
    Invariant to the layer rescalings of ReLU networks; weights equal to 0 are not perturbed. ρ = 1.0 lies in the
    paper's ResNet-18/CIFAR-10 sweep (0.25–2).""",
    "ellipsoid ‖δ/|w|‖₂ ≤ ρ",
)
_register_worst_case(
    "adaptive_worst_case_linf",
    "linf",
    True,
    0.002,
    """Adaptive worst-case L∞ sharpness max_{|δ_i| ≤ ρ|w_i|} L(w + δ) − L(w) by APGD (Andriushchenko et al. 2023,
    arXiv 2302.07011, the measure they found best correlated; Kwon et al., arXiv 2102.11600; APGD: Croce & Hein
    2020, arXiv 2003.01690).

    Optimised on δ' with δ = |w| ⊙ δ', ‖δ'‖∞ ≤ ρ (ascent step η·sign(|w| ⊙ ∇L), clamp projection). Invariant to
    the layer rescalings of ReLU networks. ρ = 0.002 lies in the paper's ResNet-18/CIFAR-10 sweep (0.001–0.008).""",
    "box |δ_i| ≤ ρ|w_i|",
)


# ---- one-step SAM sharpness ------------------------------------------------------------------------------------------
@register_measure("sam_sharpness", rho=0.05, adaptive=False)
def sam_sharpness(inputs: MeasureInputs, rho: float = 0.05, adaptive: bool = False) -> MeasureResult:
    """One-step (SAM) sharpness L(w + ε̂) − L(w), the first-order solution of the L2 worst case (Foret et al.,
    arXiv 2010.01412; adaptive: Kwon et al., ASAM, arXiv 2102.11600).

    ε̂ = ρ·g/‖g‖₂ with g = ∇L(w) over the whole sample; adaptive: ε̂ = ρ·T²g/‖Tg‖₂ with T = diag(|w|), the
    maximiser of the linearised loss over ‖T⁻¹ε‖₂ ≤ ρ (scale-invariant for ReLU networks).

    Settings: ``rho`` (0.05, SAM's default radius; ASAM typically uses 0.5 with ``adaptive``); ``adaptive`` (False).
    Value: the gain; extra: ``clean_loss``, ``perturbed_loss``, ``grad_norm`` (‖g‖₂, or ‖Tg‖₂ when adaptive).
    Deterministic (std_error None). Cost: 1 gradient pass (which also gives L(w)) + 1 forward pass.
    """
    rho = check_positive("rho", rho)
    adaptive = check_bool("adaptive", adaptive)
    params = inputs.params
    clean, g = inputs.sample_loss_and_grad()
    if adaptive:
        tg = [gi * p.detach().abs() for gi, p in zip(g, params)]
        norm_g = math.sqrt(_dot(tg, tg))
        direction = [t * p.detach().abs() for t, p in zip(tg, params)]
    else:
        norm_g = math.sqrt(_dot(g, g))
        direction = g
    eps = [d * (rho / norm_g) if norm_g > 0 else torch.zeros_like(d) for d in direction]
    with perturbed(params, eps):
        worst = inputs.sample_loss()
    return MeasureResult(
        "sam_sharpness",
        worst - clean,
        None,
        Cost(forwards=1, gradients=1),
        {"rho": rho, "adaptive": adaptive},
        {"clean_loss": clean, "perturbed_loss": worst, "grad_norm": norm_g},
    )
