"""PAC-Bayes flatness measures: find the Gaussian noise level that raises the loss (or drops the accuracy) by ε, then
evaluate a bound.

Both measures find σ by bisection so that the Monte-Carlo estimate

    Δ(σ) = (1/K) Σ_k L(θ + δ_k(σ)) − L(θ) = ε                     (``target_metric="loss"``, the default), or
    Δ(σ) = A(θ) − (1/K) Σ_k A(θ + δ_k(σ)) = ε                     (``target_metric="accuracy"``),

A the training accuracy over the sample (the fraction of examples whose arg-max class logit, from
``inputs.logits_of``, is the label; an example with a NaN logit counts as wrong), with the SAME K seeded draws z_k
for every σ (common random numbers: δ_k(σ) = s(σ) ⊙ z_k, drawn as :func:`flatlit.sharpness.average.noisy_losses`
documents: draw k takes ``randn_like(p, gen)`` for each parameter in ``inputs.params`` order from one
``generator(seed)``), so Δ is a deterministic function of σ and the search does not chase Monte-Carlo noise (with
the loss it is smooth; with the accuracy it is a step function with steps of 1/(K·n), n the sample size). The search
starts at ``sigma_init``, doubles σ while Δ < ε, halves it while Δ > ε before a lower bracket exists, then bisects
geometrically (σ = √(σ_lo·σ_hi)); it stops when |Δ − ε| ≤ tolerance·ε (``tolerance`` is relative in both modes) or
after ``bisection_steps`` evaluations of Δ, keeping the σ whose Δ came closest to ε (``extra["converged"]`` says
which). A non-finite Δ counts as too much noise. An accuracy drop that cannot reach ε (a clean accuracy within ε of
chance, or a sample so small that no step of Δ lands within the tolerance) ends unconverged, with the closest σ.

Which parameters: flatlit perturbs every trainable parameter (``inputs.params``: weights, biases and BatchNorm γ/β,
or with ``bn="fold"`` the folded weights and biases) and, by default, sums ‖θ − θ₀‖² (and counts ω) over the same
parameters; an explicit ``MeasureInputs(params=...)`` restricts both together. ``weights_only=True`` restricts only
the distance terms ‖θ − θ₀‖², ω and the magnitude-aware sum to the ``.weight`` of the Linear/Conv layers
(:data:`flatlit.sharpness.operator_norms.LAYER_TYPES`) among those parameters; the noise still perturbs every
parameter. That is what ``nitarshan/robust-generalization-measures`` does: its ``_perturbed_model`` adds noise to all
of ``model.parameters()`` (after its BN folding, so the folded BN's γ = 1, β = 0 are perturbed too), while its
distance terms and ω run over the parameters whose names contain neither ``bias`` nor ``bn`` (the same as the
Linear/Conv weights for networks of Linear/Conv/BN layers; it would also keep e.g. a LayerNorm or embedding weight,
which ``weights_only`` leaves out). LPF-SGD's ``pac_bayes`` also perturbs every parameter.

Jiang et al.'s conventions ("Fantastic generalization measures and where to find them", ICLR 2020, arXiv
1912.02178, §C, eqs. 48/49, 53, 56/57, 61; as coded in ``nitarshan/robust-generalization-measures``'
``_pacbayes_sigma`` and ``get_all_measures``) are the settings ``target_metric="accuracy"`` (ε = 0.1 drop of the
training accuracy), ``tolerance=0.1`` (their stop |Δ − 0.1| < 1e-2 is absolute: 1e-2 on a 0.1 target is the relative
0.1), ``draws=10``, ``bound="jiang"``, ``weights_only=True``, ``bn="fold"`` (their ``_reparam`` folds BN), and
``reference="init"`` (eqs. 48, 56) or ``"zero"`` (eqs. 49, 57), or ``value="flatness"`` (1/σ², eqs. 53, 61). Their
adjustment for the training-set size (√(v/m) for these non-log measures) is not part of these measures: it is
:func:`~flatlit.sharpness.base.compute_measure`'s universal ``scale="sqrt_m"`` setting. Differences that remain, on
purpose:

- Noise: flatlit's noise has std σ as in the paper (N(0, σ²I)); the released code uses σ² as the std (it passes
  σ² where ``torch.normal`` expects the std; magnitude-aware, σ'²w_i² + ε² where the paper's std is
  √(σ'²w_i² + ε²)) — kept, on purpose: flatlit's σ is the paper's σ, whereas the σ the code reports is the square
  root of the std its noise actually has.
- Search: the code bisects arithmetically on σ ∈ [0, 2] (σ the midpoint, 15 evaluations, so σ < 2 always), with
  fresh draws for every σ from one generator seeded once, and targets the *absolute* displacement
  |mean perturbed accuracy − clean accuracy| (an accuracy *rise* of 0.1 would also count); flatlit's search is the
  unbounded geometric one above, with common random numbers and the signed drop.
- Data: the code's accuracies are over its whole training loader; flatlit's over the sample ``inputs.batches``;
  m = ``inputs.num_train`` (else the sample size) in log(m/σ).

LPF-SGD's ``pac_bayes`` (SPEC 5.6) bisects arithmetically on [tiny, 100] to an absolute tolerance 1e-6 with fresh
draws per σ, targets a rise of the loss, and its θ₀ is always 0 (a bug; ``reference="zero"`` reproduces it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from flatlit.sharpness.average import Scale, noisy_losses, noisy_values
from flatlit.sharpness.base import (
    Cost,
    MeasureInputs,
    MeasureNotApplicable,
    MeasureResult,
    all_reduce_sum,
    register_measure,
    sample_size,
)
from flatlit.sharpness.norms import init_tensors
from flatlit.sharpness.operator_norms import LAYER_TYPES
from flatlit.sharpness.worst_case import check_bool, check_choice, check_int, check_positive, check_seed

REFERENCES = ("init", "zero")
TARGET_METRICS = ("loss", "accuracy")
BOUNDS = ("flatlit", "jiang")
VALUES = ("bound", "flatness")


def reference_weights(inputs: MeasureInputs, reference: str) -> list[torch.Tensor]:
    """θ₀ for each trainable parameter: the initial weights (``init``, from ``inputs.init_state``) or zeros.

    With ``bn="fold"`` the initial weights are folded like the current ones, with the initial model's BN statistics
    (:func:`flatlit.sharpness.base.fold_state`, or :func:`flatlit.sharpness.norms.init_tensors` for a raw initial
    state_dict), so θ = θ₀ gives ‖θ − θ₀‖ = 0."""
    reference = check_choice("reference", reference, REFERENCES)
    named = inputs.named_params
    if reference == "zero":
        return [torch.zeros_like(p) for _, p in named]
    if inputs.init_state is None:
        raise ValueError(
            'reference="init" needs the initial weights: pass MeasureInputs(init_state=...) or use reference="zero"'
        )
    try:
        init = init_tensors(inputs.model, inputs.init_state, [name for name, _ in named])
    except ValueError as err:
        raise ValueError(f'{err}; use reference="zero" or pass matching initial weights') from None
    return [init[name].to(p.dtype) for name, p in named]


def distance_selection(inputs: MeasureInputs, weights_only: bool) -> list[bool]:
    """For each parameter of ``inputs.named_params``, whether the distance terms (‖θ − θ₀‖², ω) count it: all of
    them, or with ``weights_only`` the ``.weight`` of the Linear/Conv layers only (ValueError when there is none)."""
    named = inputs.named_params
    if not weights_only:
        return [True] * len(named)
    layer_weights = {
        f"{name}.weight" if name else "weight"
        for name, module in inputs.model.named_modules()
        if isinstance(module, LAYER_TYPES)
    }
    keep = [name in layer_weights for name, _ in named]
    if not any(keep):
        raise ValueError(
            "weights_only=True: none of the measured parameters is the weight of a Linear/Conv layer; "
            "use weights_only=False"
        )
    return keep


def sample_accuracy(inputs: MeasureInputs, name: str) -> float:
    """The fraction of the sample's examples (all ranks) whose arg-max class logit (``inputs.logits_of``) is the
    label; an example with a NaN logit counts as wrong. One no-grad forward pass."""
    acc = torch.zeros(2, dtype=torch.float64, device=inputs.device)
    with torch.no_grad():
        for batch in inputs.batches:
            pair = inputs.logits_of(inputs.model, batch)
            if pair is None:
                raise MeasureNotApplicable(
                    f"measure {name!r} with target_metric='accuracy' needs class logits and labels on every batch; "
                    "define outputs_and_targets(self, batch) -> (logits, labels) or use target_metric='loss'"
                )
            logits, labels = pair
            right = (logits.argmax(dim=1) == labels.to(logits.device).reshape(-1)) & ~logits.isnan().any(dim=1)
            acc[0] += right.sum()
            acc[1] += right.numel()
    acc = all_reduce_sum(acc)
    return float(acc[0] / acc[1])


def noisy_accuracies(inputs: MeasureInputs, std: Scale, draws: int, seed: int, name: str) -> list[float]:
    """:func:`sample_accuracy` at θ + δ_k for k = 1..draws, with exactly the draws of
    :func:`flatlit.sharpness.average.noisy_losses` (:func:`~flatlit.sharpness.average.noisy_values`).
    Cost: ``draws`` forward passes."""
    return noisy_values(inputs, std, draws, seed, lambda: sample_accuracy(inputs, name))


def bisect_sigma(
    gap_of: Callable[[float], float], target: float, tolerance: float, sigma_init: float, steps: int
) -> tuple[float, float, bool, int]:
    """(σ, Δ(σ), converged, evaluations of Δ) for the search described in the module docstring, Δ = ``gap_of(σ)``."""
    lo, hi, sigma = 0.0, math.inf, sigma_init
    best: tuple[float, float, float] | None = None  # (|Δ − ε|, σ, Δ)
    converged, evaluations = False, 0
    for _ in range(steps):
        gap = gap_of(sigma)
        evaluations += 1
        miss = abs(gap - target) if math.isfinite(gap) else math.inf
        if best is None or miss < best[0]:
            best = (miss, sigma, gap)
        if miss <= tolerance * target:
            converged = True
            break
        if math.isfinite(gap) and gap < target:
            lo = sigma
        else:
            hi = sigma
        if math.isinf(hi):
            sigma = 2 * sigma
        elif lo == 0.0:
            sigma = hi / 2
        else:
            sigma = math.sqrt(lo * hi)
    assert best is not None
    return best[1], best[2], converged, evaluations


def search_sigma(
    inputs: MeasureInputs, name: str, std_of: Callable[[float], Scale], metric: str, search: dict[str, Any]
) -> tuple[float, dict[str, float], int]:
    """(σ, extra, forward passes): :func:`bisect_sigma` on the loss rise or the accuracy drop (module docstring).
    extra: ``sigma``, ``flatness`` (1/σ²), ``converged``, ``evaluations`` and, for the loss, ``delta_loss``,
    ``clean_loss``; for the accuracy, ``accuracy_drop``, ``clean_accuracy``, ``perturbed_accuracy``."""
    draws, seed = search["draws"], search["seed"]
    if metric == "loss":
        clean = inputs.sample_loss()

        def gap_of(s: float) -> float:
            losses = noisy_losses(inputs, std_of(s), draws, seed)
            return sum(losses) / len(losses) - clean

    else:
        clean = sample_accuracy(inputs, name)

        def gap_of(s: float) -> float:
            accuracies = noisy_accuracies(inputs, std_of(s), draws, seed, name)
            return clean - sum(accuracies) / len(accuracies)

    sigma, reached, converged, evals = bisect_sigma(
        gap_of, search["target"], search["tolerance"], search["sigma_init"], search["bisection_steps"]
    )
    if metric == "loss":
        extra = {"delta_loss": reached, "clean_loss": clean}
    else:
        extra = {"accuracy_drop": reached, "clean_accuracy": clean, "perturbed_accuracy": clean - reached}
    extra = {
        "sigma": sigma,
        "flatness": 1 / sigma**2,
        **extra,
        "converged": float(converged),
        "evaluations": float(evals),
    }
    return sigma, extra, 1 + draws * evals


def _check_settings(
    target, tolerance, draws, seed, sigma_init, bisection_steps, reference, target_metric, bound, value, weights_only
) -> dict[str, Any]:
    return {
        "target": check_positive("target", target),
        "tolerance": check_positive("tolerance", tolerance),
        "draws": check_int("draws", draws, 1),
        "seed": check_seed("seed", seed),
        "sigma_init": check_positive("sigma_init", sigma_init),
        "bisection_steps": check_int("bisection_steps", bisection_steps, 1),
        "reference": check_choice("reference", reference, REFERENCES),
        "target_metric": check_choice("target_metric", target_metric, TARGET_METRICS),
        "bound": check_choice("bound", bound, BOUNDS),
        "value": check_choice("value", value, VALUES),
        "weights_only": check_bool("weights_only", weights_only),
    }


def _needs_logits(settings: dict[str, Any]) -> bool:
    """The PAC-Bayes measures read class logits only when they search on the accuracy."""
    return settings.get("target_metric") == "accuracy"


def _num_train(inputs: MeasureInputs) -> int:
    return int(inputs.num_train) if inputs.num_train is not None else sample_size(inputs.batches)


def _differences(inputs: MeasureInputs, theta0: list[torch.Tensor], keep: list[bool]) -> list[torch.Tensor]:
    """θ − θ₀ (float64, flattened) for the parameters the distance terms count."""
    return [(p.detach() - q).double().reshape(-1) for p, q, k in zip(inputs.params, theta0, keep) if k]


@register_measure(
    "pac_bayes_sharpness",
    needs_logits=_needs_logits,
    target=0.1,
    tolerance=0.05,
    draws=10,
    seed=0,
    sigma_init=1e-3,
    bisection_steps=30,
    reference="init",
    delta=1e-6,
    target_metric="loss",
    bound="flatlit",
    value="bound",
    weights_only=False,
)
def pac_bayes_sharpness(
    inputs: MeasureInputs,
    target: float = 0.1,
    tolerance: float = 0.05,
    draws: int = 10,
    seed: int = 0,
    sigma_init: float = 1e-3,
    bisection_steps: int = 30,
    reference: str = "init",
    delta: float = 1e-6,
    target_metric: str = "loss",
    bound: str = "flatlit",
    value: str = "bound",
    weights_only: bool = False,
) -> MeasureResult:
    """PAC-Bayes sharpness (SPEC 5.6, F29; LPF-SGD's ``pac_bayes``, after Jiang et al., "Fantastic generalization
    measures and where to find them", ICLR 2020, arXiv 1912.02178, eqs. 48, 49 and 53, and Dziugaite & Roy, arXiv
    1703.11008). σ is the std of isotropic noise N(0, σ²I) on every trainable parameter such that the loss rises
    (or the training accuracy drops) by ε on average over the draws (bisection with common random numbers, module
    docstring); a flatter minimum tolerates more noise: larger σ, smaller value. The value is

        bound="flatlit" (default, LPF-SGD's):   ‖θ − θ₀‖² / (4σ²) + log(2N/δ),
        bound="jiang" (Jiang et al. eq. 48 with reference="init", eq. 49 with "zero"):
                                                ‖θ − θ₀‖² / (4σ²) + log(N/σ) + 10,
        value="flatness" (eq. 53):              1/σ²,

    N = ``inputs.num_train`` (the training-set size m), else the sample size. The noise has std σ as in the paper;
    Jiang et al.'s released code passes σ² as the std (module docstring) — kept, on purpose.

    Settings: ``target_metric`` ("loss": Δ is the rise of the loss; "accuracy": the drop of the training
    accuracy, Jiang et al.'s, which needs class logits and is refused, one line, for a model without them);
    ``target`` (ε = 0.1: LPF-SGD's loss rise, Jiang et al.'s accuracy drop); ``tolerance`` (0.05: stop when
    |Δ − ε| ≤ 0.05·ε, relative in both modes; Jiang et al.'s absolute 1e-2 on ε = 0.1 is ``tolerance=0.1``);
    ``draws`` (10 Monte-Carlo draws per σ, LPF-SGD's ``mcmc_itr`` and Jiang et al.'s ``montecarlo_samples``);
    ``seed`` (0) of the draws; ``bisection_steps`` (30) the most evaluations of Δ; ``reference`` ("init": θ₀ =
    ``inputs.init_state``, the prior mean; "zero": θ₀ = 0); ``weights_only`` (False: the distance terms run over
    every perturbed parameter; True: over the Linear/Conv ``.weight``s only, as Jiang et al.'s code; the noise
    perturbs every parameter either way); ``value`` ("bound"; "flatness": 1/σ², which needs no θ₀);
    ``sigma_init`` (1e-3, LPF-SGD's starting σ); ``bound`` ("flatlit" or "jiang", above); ``delta`` (δ = 1e-6,
    LPF-SGD's confidence; an additive constant of the "flatlit" bound only). Jiang et al.'s measures:
    ``target_metric="accuracy", tolerance=0.1, bound="jiang", weights_only=True, bn="fold"`` (module docstring).

    Value: the bound or 1/σ² (deterministic for a seed: std_error None). extra: ``sigma``, ``flatness`` (1/σ²),
    ``converged`` (1/0), ``evaluations``; with the loss ``delta_loss`` (Δ reached) and ``clean_loss``; with the
    accuracy ``accuracy_drop`` (Δ reached), ``clean_accuracy`` and ``perturbed_accuracy`` (the mean over the
    draws); with value="bound" ``dist_sq`` (‖θ − θ₀‖² over the parameters the distance counts) and ``kl_term``
    (‖θ − θ₀‖²/(4σ²)). Cost: 1 + draws·evaluations forward passes (at most 1 + 10·30 with the defaults).
    """
    settings = _check_settings(
        target,
        tolerance,
        draws,
        seed,
        sigma_init,
        bisection_steps,
        reference,
        target_metric,
        bound,
        value,
        weights_only,
    )
    settings["delta"] = delta = check_positive("delta", delta)
    if value == "bound":
        theta0 = reference_weights(inputs, reference)
        keep = distance_selection(inputs, weights_only)
    sigma, extra, forwards = search_sigma(inputs, "pac_bayes_sharpness", lambda s: lambda p: s, target_metric, settings)
    if value == "flatness":
        result = extra["flatness"]
    else:
        dist_sq = float(sum((d**2).sum() for d in _differences(inputs, theta0, keep)))
        kl = dist_sq / (4 * sigma**2)
        n = _num_train(inputs)
        tail = math.log(2 * n / delta) if bound == "flatlit" else math.log(n / sigma) + 10
        result = kl + tail
        extra.update(dist_sq=dist_sq, kl_term=kl)
    return MeasureResult("pac_bayes_sharpness", result, None, Cost(forwards=forwards), settings, extra)


@register_measure(
    "pac_bayes_magnitude",
    needs_logits=_needs_logits,
    target=0.1,
    tolerance=0.05,
    draws=10,
    seed=0,
    sigma_init=0.1,
    bisection_steps=30,
    reference="init",
    mag_eps=1e-3,
    target_metric="loss",
    bound="flatlit",
    value="bound",
    weights_only=False,
)
def pac_bayes_magnitude(
    inputs: MeasureInputs,
    target: float = 0.1,
    tolerance: float = 0.05,
    draws: int = 10,
    seed: int = 0,
    sigma_init: float = 0.1,
    bisection_steps: int = 30,
    reference: str = "init",
    mag_eps: float = 1e-3,
    target_metric: str = "loss",
    bound: str = "flatlit",
    value: str = "bound",
    weights_only: bool = False,
) -> MeasureResult:
    """Magnitude-aware PAC-Bayes bound of Jiang et al., "Fantastic generalization measures and where to find them"
    (ICLR 2020, arXiv 1912.02178), eqs. 56, 57 and 61 (``PACBAYES_MAG_*`` in
    ``nitarshan/robust-generalization-measures``). σ' is such that the loss rises (or the training accuracy drops)
    by ε on average over noise u with u_i ~ N(0, σ'²θ_i² + ε_m²), i.e. std √(σ'²θ_i² + ε_m²), on every trainable
    parameter (bisection on σ' with common random numbers, module docstring). The noise has the paper's std; the
    released code passes σ'²θ_i² + ε_m² as the std — kept, on purpose. The value is

        ¼ Σ_{i=1}^{ω} log( (ε_m² + (σ'² + 1)·‖θ − θ₀‖²/ω) / (ε_m² + σ'²(θ_i − θ̄_i)²) ) + log(N/σ') + 10,

    the sum and ω (their number) over the parameters the distance counts (``weights_only``), ε_m = ``mag_eps``,
    θ₀ the ``reference`` and θ̄ the denominator's reference: with bound="flatlit" (default) θ̄ = θ₀ (with
    reference="zero", θ in both numerator and denominator); with bound="jiang" θ̄ = θ_init always (eq. 56 with
    reference="init"; eq. 57, the code's ``PACBAYES_MAG_ORIG``, with "zero": ‖θ‖² above, (θ_i − θ_init,i)² below,
    so it needs ``inputs.init_state`` too). The two bounds differ only with reference="zero".
    value="flatness" (eq. 61): 1/σ'². N = ``inputs.num_train`` (m), else the sample size; the log(N/σ') + 10 tail
    is the paper's and that repository's, not log(2N/δ).

    Settings: ``target_metric`` ("loss": Δ is the rise of the loss; "accuracy": the drop of the training
    accuracy, Jiang et al.'s, which needs class logits and is refused, one line, for a model without them);
    ``target`` (ε = 0.1: LPF-SGD's loss rise, Jiang et al.'s accuracy drop); ``tolerance`` (0.05: stop when
    |Δ − ε| ≤ 0.05·ε, relative in both modes; Jiang et al.'s absolute 1e-2 on ε = 0.1 is ``tolerance=0.1``);
    ``draws`` (10 Monte-Carlo draws per σ, LPF-SGD's ``mcmc_itr`` and Jiang et al.'s ``montecarlo_samples``);
    ``seed`` (0) of the draws; ``bisection_steps`` (30) the most evaluations of Δ; ``reference`` ("init": θ₀ =
    ``inputs.init_state``, the prior mean; "zero": θ₀ = 0); ``weights_only`` (False: the distance terms run over
    every perturbed parameter; True: over the Linear/Conv ``.weight``s only, as Jiang et al.'s code; the noise
    perturbs every parameter either way); ``value`` ("bound"; "flatness": 1/σ'², which needs no θ₀);
    ``sigma_init`` (0.1; σ' is relative to |θ_i|); ``bound`` ("flatlit" or "jiang", above); ``mag_eps`` (1e-3, the
    paper's ε). Jiang et al.'s measures: ``target_metric="accuracy", tolerance=0.1, bound="jiang",
    weights_only=True, bn="fold"`` (module docstring).

    Value: the bound or 1/σ'² (std_error None). extra: ``sigma`` (σ'), ``flatness``, ``converged``,
    ``evaluations``, ``delta_loss`` and ``clean_loss`` or ``accuracy_drop``, ``clean_accuracy`` and
    ``perturbed_accuracy`` (as ``pac_bayes_sharpness``); with value="bound" ``dist_sq`` (‖θ − θ₀‖²) and ``omega``
    (ω). Cost: 1 + draws·evaluations forward passes.
    """
    settings = _check_settings(
        target,
        tolerance,
        draws,
        seed,
        sigma_init,
        bisection_steps,
        reference,
        target_metric,
        bound,
        value,
        weights_only,
    )
    settings["mag_eps"] = mag_eps = check_positive("mag_eps", mag_eps)
    if value == "bound":
        theta0 = reference_weights(inputs, reference)
        keep = distance_selection(inputs, weights_only)
        below = theta0
        if bound == "jiang" and reference == "zero":
            if inputs.init_state is None:
                raise ValueError(
                    'bound="jiang" with reference="zero" (eq. 57) keeps θ − θ_init in the denominator and needs the '
                    'initial weights: pass MeasureInputs(init_state=...) or use bound="flatlit"'
                )
            below = reference_weights(inputs, "init")

    def std_of(s: float) -> Scale:
        return lambda p: torch.sqrt(s**2 * p.double() ** 2 + mag_eps**2).to(p.dtype)

    sigma, extra, forwards = search_sigma(inputs, "pac_bayes_magnitude", std_of, target_metric, settings)
    if value == "flatness":
        result = extra["flatness"]
    else:
        diffs = _differences(inputs, theta0, keep)
        den = diffs if below is theta0 else _differences(inputs, below, keep)
        omega = sum(d.numel() for d in diffs)
        dist_sq = float(sum((d**2).sum() for d in diffs))
        numerator = mag_eps**2 + (sigma**2 + 1) * dist_sq / omega
        log_sum = float(sum(torch.log(numerator / (mag_eps**2 + sigma**2 * d**2)).sum() for d in den))
        result = 0.25 * log_sum + math.log(_num_train(inputs) / sigma) + 10
        extra.update(dist_sq=dist_sq, omega=float(omega))
    return MeasureResult("pac_bayes_magnitude", result, None, Cost(forwards=forwards), settings, extra)
