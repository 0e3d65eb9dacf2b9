"""Jiang et al.'s sums and ratios of squared layer norms: spectral/Frobenius sums, ``fro_over_spec``, ``spec_init``,
``spec_orig`` and ``dist_spec_init``.

References:
    * Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic Generalization Measures and Where to Find Them",
      ICLR 2020, arXiv 1912.02178, appendix C (eqs. 29-41; the numbers below are theirs).
    * Dziugaite, Drouin, Neal, Rajkumar, Caballero, Wang, Mitliagkas, Roy, "In Search of Robust Measures of
      Generalization", NeurIPS 2020, arXiv 2010.11924 (their released code implements Jiang's list; its conventions
      are the ones followed here).
    * Bartlett, Foster, Telgarsky 2017, arXiv 1706.08498; Neyshabur, Bhojanapalli, Srebro 2018, arXiv 1707.09564
      (the spectrally-normalised bounds behind ``spec_init`` / ``spec_orig``).

Conventions (as for the norm products of :mod:`flatlit.sharpness.norms`): the W_l are the weight tensors of the d
Linear/Conv layers only (no biases, no BatchNorm), reshaped to (out, -1); ``bn`` defaults to ``"fold"`` (BatchNorm
folded into the preceding layer first, for the initial weights W_l⁰ too); norms are squared as in Jiang et al.; the
margin γ is a ``percentile`` (default 5) or a ``margin_rank`` of the sample margins (:func:`margin_value`).
Jiang et al.'s own setting is ``bn="fold", reshaped=True, margin_rank=0.1``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from flatlit.sharpness.base import Cost, MeasureInputs, MeasureResult, register_measure
from flatlit.sharpness.margins import MARGIN_DOC, _check_margin_rank, _check_percentile, margin_value
from flatlit.sharpness.norms import (
    _SPECTRAL_DEFAULTS,
    _check_bool,
    _exp,
    _log,
    _over_margin,
    _spectral_norms,
    init_tensors,
)
from flatlit.sharpness.operator_norms import Layer, _layers_of, find_layers

_MARGIN_DEFAULTS = dict(percentile=5.0, margin_rank=None)
_SPECTRAL_DOC = """Spectral settings as in ``spectral_norm_product``: ``reshaped`` (default False: the operator
    norm of a convolution on its input size, by Lanczos to a relative ``tol`` = 1e-7 in at most ``power_iters`` =
    1000 steps from ``seed`` = 0, ``extra["unconverged"]`` counting the layers that hit the cap; True: the largest
    singular value of the (out, -1) reshaped kernel, as in Jiang et al.'s main measures; the reference code's
    ``_FFT`` variants take the circular-convolution operator norm instead). Linear layers: σ_max of W, exact."""
_MARGIN_SETTINGS = (
    """γ is the ``percentile``-th percentile (default 5) of the margins f_y − max_{j≠y} f_j over the sample;
    """
    + MARGIN_DOC
)


def _margin(inputs: MeasureInputs, settings: dict[str, Any]) -> float:
    return margin_value(inputs.model, inputs.batches, settings["percentile"], settings["margin_rank"], inputs.logits_of)


def _check(settings: dict[str, Any], *flags: str) -> None:
    """Validate the boolean ``flags`` and the margin settings before anything is computed."""
    for flag in flags:
        _check_bool(flag, settings[flag])
    if "percentile" in settings:
        _check_percentile(settings["percentile"])
        _check_margin_rank(settings["margin_rank"])


def _weights(inputs: MeasureInputs, names: list[str]) -> dict[str, torch.Tensor]:
    """The (out, -1) float64 weight matrix of each layer in ``names``."""
    modules = dict(inputs.model.named_modules())
    return {n: modules[n].weight.detach().double().reshape(modules[n].weight.shape[0], -1) for n in names}


def _init_weights(inputs: MeasureInputs) -> dict[str, torch.Tensor]:
    """W_l⁰ of every Linear/Conv layer (by module name, (out, -1), float64); ValueError naming ``init_state``."""
    names = [layer.name for layer in find_layers(inputs.model)]
    init = init_tensors(inputs.model, inputs.init_state, [f"{n}.weight" for n in names])
    return {n: init[f"{n}.weight"].reshape(init[f"{n}.weight"].shape[0], -1) for n in names}


def _result(name: str, log_value: float, log: bool, settings: dict, extra: dict, margin: bool) -> MeasureResult:
    if math.isnan(log_value):  # a zero factor times an infinite one (a layer with σ = 0: −inf + inf)
        log_value = math.inf
    value = log_value if log else _exp(log_value)
    return MeasureResult(name, value, None, Cost(forwards=1 if margin else 0), dict(settings), extra)


# ---- sums of squared norms (eqs. 34-35, 38-39) ----------------------------------------------------------------------
def _sum_of(name: str, inputs: MeasureInputs, norms: dict[str, float], extra: dict, settings: dict) -> MeasureResult:
    """log d + (1/d)(Σ_l log‖W_l‖² [− 2 log γ])."""
    over_margin, log = settings["over_margin"], settings["log"]
    d = len(norms)
    log_product = sum(2 * _log(v) for v in norms.values())
    extra = {**norms, **extra, "depth": float(d), "log_product": log_product}
    total = log_product
    if over_margin:
        gamma = _margin(inputs, settings)
        extra["margin"] = gamma
        total = total - 2 * math.log(gamma) if gamma > 0 else math.inf
    return _result(name, math.log(d) + total / d, log, settings, extra, over_margin)


_SUM_DOC = """

    The log form is Jiang et al.'s; without the log the value is d · (Π_l ‖W_l‖² [/ γ²])^{1/d}: by the AM-GM
    inequality the smallest Σ_l ‖c_l W_l‖² [/ γ^{2/d}] over the layer rescalings with Π_l c_l = 1 (which keep a
    bias-free ReLU network's function).
    Settings: ``over_margin`` (default False) subtracts 2 log γ inside the 1/d (their "_over_margin" variant);
    ``log`` (default True) reports the log; ``bn`` defaults to ``"fold"``. A margin ≤ 0 makes the
    margin-normalised value +inf; ``over_margin`` needs class logits (refused, one line, without them). {margin}
    ``extra``: the per-layer norms ‖W_l‖ (by module name, not squared), ``depth`` = d, ``log_product`` =
    Σ_l log‖W_l‖², ``margin``. Cost: none (no data) unless ``over_margin`` (one forward pass over the sample)."""


def sum_of_spectral(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """log d + (1/d) Σ_l log‖W_l‖₂², with ``over_margin``: log d + (1/d)(Σ_l log‖W_l‖₂² − 2 log γ) (Jiang et al.
    2019, arXiv 1912.02178, eqs. 35 and 34, ``log_sum_of_spec[_over_margin]``), ‖·‖₂ the spectral norm.

    {spectral}"""
    _check(settings, "over_margin", "log")
    norms, unconverged = _spectral_norms(inputs, settings)
    return _sum_of("sum_of_spectral", inputs, norms, {"unconverged": float(unconverged)}, settings)


def sum_of_frobenius(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """log d + (1/d) Σ_l log‖W_l‖_F², with ``over_margin``: log d + (1/d)(Σ_l log‖W_l‖_F² − 2 log γ) (Jiang et al.
    2019, arXiv 1912.02178, eqs. 39 and 38, ``log_sum_of_fro[_over_margin]``)."""
    _check(settings, "over_margin", "log")
    norms = {layer.name: float(layer.matrix().norm()) for layer in _layers_of(inputs)}
    return _sum_of("sum_of_frobenius", inputs, norms, {}, settings)


# ---- ratios of Frobenius to spectral norms (eqs. 29, 30, 33) --------------------------------------------------------
def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def frobenius_over_spectral(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """Σ_l ‖W_l‖_F² / ‖W_l‖₂² (Jiang et al. 2019, arXiv 1912.02178, eq. 33, ``fro_over_spec``): the sum of the
    layers' stable ranks. A layer with ‖W_l‖₂ = 0 makes it +inf.

    {spectral} ``bn`` defaults to ``"fold"``. ``extra``: each layer's term ‖W_l‖_F²/‖W_l‖₂² (by module name),
    ``depth``, ``unconverged``. Cost: none (no data)."""
    spec, unconverged = _spectral_norms(inputs, settings)
    fro = _weights(inputs, list(spec))
    terms = {n: _ratio(float(fro[n].pow(2).sum()), spec[n] ** 2) for n in spec}
    extra = {**terms, "depth": float(len(terms)), "unconverged": float(unconverged)}
    return MeasureResult("frobenius_over_spectral", sum(terms.values()), None, Cost(), dict(settings), extra)


def _spec_main(name: str, inputs: MeasureInputs, settings: dict[str, Any], from_init: bool) -> MeasureResult:
    """log(Π_l ‖W_l‖₂² / γ² · Σ_l ‖W_l − R_l‖_F² / ‖W_l‖₂²) with R_l = W_l⁰ (``from_init``) or 0."""
    _check(settings, "log")
    init = _init_weights(inputs) if from_init else None  # the init_state error before any work
    spec, unconverged = _spectral_norms(inputs, settings)
    weights = _weights(inputs, list(spec))
    ratios = {}
    for n, w in weights.items():
        diff = w - init[n] if init is not None else w
        ratios[n] = _ratio(float(diff.pow(2).sum()), spec[n] ** 2)
    gamma = _margin(inputs, settings)
    log_product = sum(2 * _log(v) for v in spec.values())
    log_value = log_product + _log(sum(ratios.values()))
    log_value = log_value - 2 * math.log(gamma) if gamma > 0 else math.inf
    extra = {f"spectral/{n}": v for n, v in spec.items()} | {f"ratio/{n}": v for n, v in ratios.items()}
    extra |= {"depth": float(len(spec)), "log_product": log_product, "margin": gamma, "unconverged": float(unconverged)}
    return _result(name, log_value, settings["log"], settings, extra, True)


_SPEC_MAIN_DOC = """

    Always divides by the margin, so it needs class logits (refused, one line, without them); a margin ≤ 0 makes it
    +inf. Settings: ``log`` (default True) reports the log (Jiang et al.'s form; the product overflows otherwise);
    ``bn`` defaults to ``"fold"``. {margin} {spectral}
    ``extra``: ``spectral/<layer>`` = ‖W_l‖₂, ``ratio/<layer>`` = the layer's term of the sum, ``depth`` = d,
    ``log_product`` = Σ_l log‖W_l‖₂², ``margin`` = γ, ``unconverged``. Cost: one forward pass over the sample."""


def spec_init(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """log(Π_l ‖W_l‖₂² / γ² · Σ_l ‖W_l − W_l⁰‖_F² / ‖W_l‖₂²) (Jiang et al. 2019, arXiv 1912.02178, eq. 29,
    ``log_spec_init_main``; after Bartlett et al. 2017 and Neyshabur et al. 2018). Needs ``inputs.init_state``
    (folded like the weights under ``bn="fold"``); a ValueError naming it when absent."""
    return _spec_main("spec_init", inputs, settings, from_init=True)


def spec_orig(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """log(Π_l ‖W_l‖₂² / γ² · Σ_l ‖W_l‖_F² / ‖W_l‖₂²) (Jiang et al. 2019, arXiv 1912.02178, eq. 30,
    ``log_spec_orig_main``): ``spec_init`` with the origin in place of the initial weights."""
    return _spec_main("spec_orig", inputs, settings, from_init=False)


# ---- spectral distance from initialisation (eq. 41) -----------------------------------------------------------------
def _difference_layer(layer: Layer, w0: torch.Tensor) -> Layer:
    """A copy of ``layer`` whose weight is W − W⁰ (float64): the same stride/padding/groups and input size, so its
    operator norm is that of the difference kernel."""
    module = copy.deepcopy(layer.module)
    diff = layer.module.weight.detach().double() - w0.reshape(layer.module.weight.shape)
    module.weight = nn.Parameter(diff, requires_grad=False)
    return Layer(layer.name, module, layer.in_shape)


def dist_spec_init(inputs: MeasureInputs, **settings: Any) -> MeasureResult:
    """Σ_l ‖W_l − W_l⁰‖₂² (Jiang et al. 2019, arXiv 1912.02178, eq. 41, ``dist_spec_init``): the squared spectral
    norms of the layers' moves from initialisation. Needs ``inputs.init_state`` (folded like the weights under
    ``bn="fold"``); a ValueError naming it when absent.

    {spectral} With ``reshaped=False`` a convolution's term is the operator norm of the convolution by the
    difference kernel W_l − W_l⁰ on the layer's input size. ``bn`` defaults to ``"fold"``. ``extra``: each layer's
    term ‖W_l − W_l⁰‖₂² (by module name), ``depth``, ``unconverged``. Cost: none (no data)."""
    init = _init_weights(inputs)
    diffs, unconverged = _spectral_norms(inputs, settings, of=lambda layer: _difference_layer(layer, init[layer.name]))
    terms = {n: v**2 for n, v in diffs.items()}
    extra = {**terms, "depth": float(len(terms)), "unconverged": float(unconverged)}
    return MeasureResult("dist_spec_init", sum(terms.values()), None, Cost(), dict(settings), extra)


def _spectral_shape(settings: dict[str, Any]) -> bool | str:
    return False if settings.get("reshaped") else "conv"


_SPEC_DEFAULTS = {**_MARGIN_DEFAULTS, **_SPECTRAL_DEFAULTS}
for _fn, _extra_doc, _defaults, _logits, _shape in (
    (sum_of_spectral, _SUM_DOC, {"over_margin": False, "log": True, **_SPEC_DEFAULTS}, _over_margin, _spectral_shape),
    (sum_of_frobenius, _SUM_DOC, {"over_margin": False, "log": True, **_MARGIN_DEFAULTS}, _over_margin, False),
    (frobenius_over_spectral, "", _SPECTRAL_DEFAULTS, False, _spectral_shape),
    (spec_init, _SPEC_MAIN_DOC, {"log": True, **_SPEC_DEFAULTS}, True, _spectral_shape),
    (spec_orig, _SPEC_MAIN_DOC, {"log": True, **_SPEC_DEFAULTS}, True, _spectral_shape),
    (dist_spec_init, "", _SPECTRAL_DEFAULTS, False, _spectral_shape),
):
    _doc = (_fn.__doc__ or "") + _extra_doc
    _fn.__doc__ = _doc.replace("{spectral}", _SPECTRAL_DOC).replace("{margin}", _MARGIN_SETTINGS)
    register_measure(
        _fn.__name__, kind="complexity", needs_logits=_logits, needs_input_shape=_shape, **_defaults, bn="fold"
    )(_fn)
