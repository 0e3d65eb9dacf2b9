"""Worst-case (adversarial-in-weight-space) sharpness: APGD over an L2 or L∞ ball, m-sharpness, and one-step SAM.

Worst-case sharpness is the largest rise of the sample loss within a ball of weight perturbations,

    S(w) = max_{δ ∈ B} L(w + δ) − L(w),   B = {‖δ‖_p ≤ ρ}  or, adaptive,  B = {‖δ / |w|‖_p ≤ ρ},

the elementwise-adaptive set of Kwon et al. (ASAM, arXiv 2102.11600) that makes S invariant to the rescalings a
ReLU network admits (layer l ×α, layer l+1 ×1/α). Following Andriushchenko et al., "A modern look at the
relationship between sharpness and generalization" (ICML 2023, arXiv 2302.07011), the maximum is approximated by
Auto-PGD (Croce & Hein, arXiv 2003.01690) run in weight space; with ``m`` set it is m-sharpness (Foret et al.,
arXiv 2010.01412): the maximum is taken separately on each chunk of m examples and the gains are averaged.

Two iterations (:mod:`flatlit.sharpness.apgd`): flatlit's default, Croce & Hein's APGD written on δ' with
δ = T ⊙ δ' (T = |w| when adaptive, 1 otherwise), so the constraint is always the plain ball ‖δ'‖_p ≤ ρ and its
projection is exact (a rescaling for L2, a clamp for L∞); and ``iteration="andriushchenko"``, the update rules of
Andriushchenko et al.'s evaluation code, which reproduces their numbers.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from flatlit.sharpness.apgd import (  # noqa: F401 (apgd_* re-exported: imported from here by tests and users)
    MOMENTUM,
    PROGRESS_RATIO,
    _dot,
    _random_start,
    andriushchenko_ascent,
    apgd_ascent,
    apgd_checkpoints,
)
from flatlit.sharpness.base import (
    Batch,
    Cost,
    MeasureInputs,
    MeasureNotApplicable,
    MeasureResult,
    all_reduce_sum,
    distributed,
    loss_and_grad,
    mean_loss,
    narrow_batch,
    perturbed,
    register_measure,
)
from flatlit.utils.batching import batch_size

NORMS = ("l2", "linf")
ITERATIONS = ("apgd", "andriushchenko")


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
def normalized_logits(logits: torch.Tensor) -> torch.Tensor:
    """Andriushchenko et al.'s logit normalisation (their ``--normalize_logits``): each example's logits centred
    (minus their mean over the classes) and divided by their L2 norm (at least 1e-10)."""
    z = logits - logits.mean(dim=-1, keepdim=True)
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-10)


def _normalized_ce(inputs: MeasureInputs, name: str) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
    """batch_loss(model, batch): the cross-entropy of the normalised class logits of ``inputs.logits_of``."""

    def batch_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        pair = inputs.logits_of(model, batch)
        if pair is None:
            raise MeasureNotApplicable(f"measure {name!r} with normalize_logits=True needs class logits and labels")
        logits, labels = pair
        return F.cross_entropy(normalized_logits(logits), labels)

    return batch_loss


def worst_case_sharpness(
    inputs: MeasureInputs,
    name: str,
    rho: float,
    norm: str,
    adaptive: bool,
    m: int | None,
    steps: int,
    seed: int | None,
    iteration: str = "apgd",
    normalize_logits: bool = False,
) -> MeasureResult:
    """max_{‖δ/T‖_p ≤ ρ} L(w + δ) − L(w) (T = |w| if ``adaptive`` else 1) by ``iteration`` (``apgd``:
    :func:`~flatlit.sharpness.apgd.apgd_ascent`; ``andriushchenko``:
    :func:`~flatlit.sharpness.apgd.andriushchenko_ascent`); per chunk of m examples when ``m`` is set (chunk gains
    averaged with the chunk sizes as weights); with ``normalize_logits`` L is the cross-entropy of the normalised
    class logits (:func:`normalized_logits`). Cost: steps + 1 gradients (+1 forward with a random start), in passes
    over the sample whatever m is."""
    rho = check_positive("rho", rho)
    norm = check_choice("norm", norm, NORMS)
    adaptive = check_bool("adaptive", adaptive)
    steps = check_int("steps", steps, 1)
    seed = check_seed("seed", seed, allow_none=True)
    iteration = check_choice("iteration", iteration, ITERATIONS)
    normalize_logits = check_bool("normalize_logits", normalize_logits)
    if m is not None:
        m = check_int("m", m, 1)
    if iteration == "andriushchenko" and seed is not None:
        raise ValueError(f"seed must be None with iteration='andriushchenko' (it starts at δ = 0), got {seed!r}")
    params = inputs.params
    scale = [p.detach().abs() for p in params] if adaptive else [torch.ones_like(p) for p in params]
    batch_loss = _normalized_ce(inputs, name) if normalize_logits else inputs.batch_loss

    def sample_loss_and_grad(batches, ps, reduce):
        return loss_and_grad(inputs.model, ps, batches, inputs.loss_fn, reduce, batch_loss=batch_loss)

    def sample_loss(batches, reduce):
        return mean_loss(inputs.model, batches, inputs.loss_fn, reduce, batch_loss=batch_loss)

    def climb(batches: Sequence[Batch], reduce: bool) -> tuple[float, float]:
        """(loss at the start, best loss found) on ``batches``."""
        if iteration == "andriushchenko":

            def loss_grad_w(d: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
                with perturbed(params, d):
                    return sample_loss_and_grad(batches, params, reduce)

            f_start, f_best, _ = andriushchenko_ascent(loss_grad_w, scale, rho, norm, adaptive, steps)
            return f_start, f_best

        def loss_grad(d: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
            with perturbed(params, [t * s for t, s in zip(d, scale)]):
                f, g = sample_loss_and_grad(batches, params, reduce)
            return f, [gi * s for gi, s in zip(g, scale)]  # chain rule: ∂L/∂δ' = T ⊙ ∇L(w + T ⊙ δ')

        start = [torch.zeros_like(p) for p in params] if seed is None else _random_start(params, rho, norm, seed)
        f_start, f_best, _ = apgd_ascent(loss_grad, start, rho, norm, steps)
        return f_start, f_best

    if m is None:
        f_start, worst = climb(inputs.batches, True)
        clean = f_start if seed is None else sample_loss(inputs.batches, True)
        worst = max(worst, clean)  # δ = 0 is feasible
    else:
        acc = torch.zeros(3, dtype=torch.float64)  # Σ n_c·clean_c, Σ n_c·worst_c, Σ n_c
        for pieces in chunks_of(inputs.batches, m):
            f_start, worst_c = climb(pieces, False)
            clean_c = f_start if seed is None else sample_loss(pieces, False)
            n_c = sum(batch_size(b) for b in pieces)
            acc += torch.tensor([n_c * clean_c, n_c * max(worst_c, clean_c), n_c], dtype=torch.float64)
        if distributed():
            acc = all_reduce_sum(acc.to(inputs.device)).cpu()
        clean, worst = float(acc[0] / acc[2]), float(acc[1] / acc[2])
    settings = {
        "rho": rho,
        "norm": norm,
        "adaptive": adaptive,
        "m": m,
        "steps": steps,
        "seed": seed,
        "iteration": iteration,
        "normalize_logits": normalize_logits,
    }
    cost = Cost(forwards=0 if seed is None else 1, gradients=steps + 1)
    return MeasureResult(name, worst - clean, None, cost, settings, {"clean_loss": clean, "perturbed_loss": worst})


_WORST_CASE_DOC = """

    Settings: ``rho`` ({rho}) the radius of the {ball}; ``m`` (None) the m of m-sharpness:
    None takes one maximum over the whole sample, an integer takes it separately on each chunk of m consecutive
    examples of this rank's sample and averages the gains weighted by chunk size (the paper evaluates m = 128 on
    1024 examples); ``steps`` (20) iterations, the paper's ``n_iters``; ``seed`` (None) None starts at δ = 0
    (the paper's default, its ``--sharpness_rand_init`` being off), an integer starts APGD at a uniform random
    point of the ball drawn from that seed (``iteration="apgd"`` only); ``iteration`` ("apgd") the ascent
    iteration, below; ``normalize_logits`` (False) the paper's ``--normalize_logits``: the loss maximised and
    reported becomes the cross-entropy of the normalised class logits, (z − mean_c z)/‖z − mean_c z‖₂ per example,
    in place of the model's own loss (it needs class logits and labels, ``inputs.logits_fn``, and is refused with
    one line without them). ``bn`` as for every measure (the paper evaluates in eval mode: ``bn="eval"``).

    Iterations. ``"apgd"`` (default): Auto-PGD as Croce & Hein write it (:func:`~flatlit.sharpness.apgd.apgd_ascent`),
    on δ' = δ/T with the exact projection onto ‖δ'‖_p ≤ ρ; η starts at 2ρ, momentum x⁺ = P(x + ¾(z − x) +
    ¼(x − x⁻)), and at the checkpoints ⌈p_j·steps⌉ η is halved when under 75 % of the steps since the last one rose
    over the previous iterate (or the best loss did not move), the iterate then restarting from the best point.
    ``"andriushchenko"``: the update rules of the paper's code (``sharpness.py``,
    :func:`~flatlit.sharpness.apgd.andriushchenko_ascent`), in weight space from δ = 0 with η = 2ρ: momentum
    δ⁺ = ¾z + ¼δ⁻ (δ⁻ the iterate before the current one; no second projection); the step-size test, one step later
    than APGD's, counts new best losses rather than rises; on halving only the next gradient is taken at the best
    point, the iterate and its momentum carry on; the L2 step is η·T ⊙ g/‖g‖₂ (the plain gradient norm) and,
    adaptive, is projected (Euclidean, in weight space) onto the ellipsoid ‖δ/|w|‖₂ ≤ ρ by their bisection on the
    Lagrange multiplier, to 1e-5 in the norm, where ``apgd`` steps along T ⊙ (T ⊙ g)/‖T ⊙ g‖₂.
    {differs}
    The default APGD is the better maximiser: in our comparisons it found values at least as large, never smaller;
    ``iteration="andriushchenko"`` reproduces the paper's number, with ``m=128`` (their evaluation: 1024 examples
    in chunks of 128), ``steps=20`` and the same ``rho`` (``normalize_logits=True`` for their normalised-logit
    columns).

    Value: the gain max L(w + δ) − L(w) (≥ 0; the best loss over the iterates); extra: ``clean_loss`` and
    ``perturbed_loss`` (sample means, over chunks when m is set). Not Monte-Carlo: std_error is None.

    Cost: steps + 1 gradient passes (the start point, then one per iteration; the zero start's first pass also gives
    the clean loss), plus 1 forward pass with a random start; either iteration."""


def _needs_logits(settings: dict[str, Any]) -> bool | str:
    """Worst-case sharpness reads (and differentiates) class logits only with ``normalize_logits``."""
    return "differentiable" if settings.get("normalize_logits") else False


def _register_worst_case(
    name: str, norm: str, adaptive: bool, rho: float, summary: str, ball: str, differs: str
) -> None:
    def measure(
        inputs: MeasureInputs,
        rho: float = rho,
        m: int | None = None,
        steps: int = 20,
        seed=None,
        iteration: str = "apgd",
        normalize_logits: bool = False,
    ):
        return worst_case_sharpness(inputs, name, rho, norm, adaptive, m, steps, seed, iteration, normalize_logits)

    measure.__name__ = name
    differs = textwrap.fill(differs, 112).replace("\n", "\n    ")
    measure.__doc__ = summary + _WORST_CASE_DOC.format(rho=rho, ball=ball, differs=differs)
    register_measure(
        name,
        needs_logits=_needs_logits,
        rho=rho,
        m=None,
        steps=20,
        seed=None,
        iteration="apgd",
        normalize_logits=False,
    )(measure)


_SAME_STEP = (
    "For this measure the step and the projection of the two iterations agree; only the momentum and the step-size "
    "rules differ, and the values are close (within 2 % on a small trained MLP at m = 128)."
)
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
    _SAME_STEP,
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
    _SAME_STEP,
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
    (
        "For this measure the step and the projection differ as well: in δ' = δ/|w| their step follows g, not the "
        "steepest-ascent direction |w| ⊙ g, so the default finds markedly larger values (19–28 % on a small "
        "trained MLP at m = 128 for ρ = 0.25–2, 3–7 % with normalised logits; an independent check found 27–38 % on "
        "the paper's models), and their value, unlike the set, is not invariant to layer rescalings. Weights equal "
        "to 0 are not perturbed and stay out of the ellipsoid's norm (their code would divide by 0 there)."
    ),
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
    _SAME_STEP,
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
