"""The universal ``reparametrize`` and ``scale`` settings of every measure, applied by
:func:`flatlit.sharpness.base.compute_measure` around the measure's function.

``reparametrize="lpf_norm"``: the measure runs on LPF-SGD's function-preserving unit-filter copy of the model
(Bisla et al. 2022, arXiv 2201.08025, their ``norm()``; :func:`flatlit.sharpness.norms.lpf_normalize`).
``scale``: Jiang et al. 2019's adjustment of a measure for the dataset size m (arXiv 1912.02178; in Dziugaite et
al. 2020's code, log measures ½(v − log m), the others √(v/m)).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any


def lpf_inputs(inputs: Any) -> Any:
    """``inputs`` on :func:`~flatlit.sharpness.norms.lpf_normalize` of its model (``reparametrize="lpf_norm"``).

    The copy has the same parameters in the same order (each wrapped layer's ``w.weight`` becomes ``w.0.weight``),
    so an explicit ``params`` selection maps by position. ``init_state`` is normalised with the initial model's own
    filter norms: the state_dict of ``lpf_normalize`` applied to a copy of the model holding ``init_state`` (so
    θ₀ = θ gives identical unit-filter weights); an ``init_state`` that does not load (strictly) into the model is
    passed on unchanged, and the measures that read it then name the missing entry."""
    from flatlit.sharpness.norms import lpf_normalize  # norms imports this module

    model = inputs.model
    normed = lpf_normalize(model)
    params = None
    if inputs.explicit_params:
        pairs = list(zip(model.named_parameters(), normed.named_parameters(), strict=True))
        by_id = {id(p): q for (_, p), (_, q) in pairs}
        params = [by_id[id(p)] for p in inputs.params]
    init_state = inputs.init_state
    if init_state is not None:
        twin = copy.deepcopy(model)
        try:
            twin.load_state_dict(init_state)
        except (RuntimeError, KeyError):
            pass
        else:
            init_state = {k: v.detach().clone() for k, v in lpf_normalize(twin).state_dict().items()}
    return dataclasses.replace(inputs, model=normed, init_state=init_state, params=params)


def scaled(result: Any, scale: str, m: int) -> Any:
    """``result`` adjusted for the dataset size m (``scale``), its standard error by the delta method."""
    v, se = result.value, result.std_error
    if scale == "sqrt_m":
        if v < 0:
            warnings.warn(
                f"measure {result.name!r}: scale='sqrt_m' of the negative value {v:.6g} is NaN (√(v/m) undefined)",
                RuntimeWarning,
                stacklevel=3,
            )
            value = float("nan")
        else:
            value = math.sqrt(v / m)
        if se is not None:
            se = se / (2 * math.sqrt(v * m)) if v > 0 else float("nan")
    else:  # half_log_m
        value = 0.5 * (v - math.log(m))
        if se is not None:
            se = se / 2
    extra = {**result.extra, "unscaled": v, "m": float(m)}
    return dataclasses.replace(result, value=value, std_error=se, extra=extra)
