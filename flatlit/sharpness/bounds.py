"""The generalization bounds of Neyshabur et al. 2017 ("Exploring Generalization in Deep Learning") as measures.

References:
    * Neyshabur, Bhojanapalli, McAllester, Srebro, "Exploring Generalization in Deep Learning", NeurIPS 2017,
      arXiv 1706.08947 (measures and bounds; reference code ``bneyshabur/generalization-bounds``).
    * Bartlett & Mendelson 2002 (JMLR 3); Neyshabur, Tomioka, Srebro 2015, arXiv 1503.00036; Bartlett, Foster,
      Telgarsky 2017, arXiv 1706.08498; Neyshabur, Bhojanapalli, Srebro 2018, arXiv 1707.09564; Golowich, Rakhlin,
      Shamir 2018, arXiv 1712.06541 (depth factor).

The bounds default to ``bn="fold"`` like the norm products (:mod:`flatlit.sharpness.norms`), and products over
layers are evaluated as exp(Σ log) in float64 (``+inf`` on overflow) with ``log_bound`` in ``extra``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flatlit.sharpness.base import Cost, MeasureInputs, MeasureResult, register_measure, sample_size
from flatlit.sharpness.margins import _check_percentile, margin_percentile
from flatlit.sharpness.norms import (
    _SPECTRAL_DEFAULTS,
    _exp,
    _log,
    _spectral_norms,
    init_tensors,
    layer_param_count,
)
from flatlit.sharpness.operator_norms import _layers_of, lpq_norm

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
