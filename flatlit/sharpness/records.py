"""Measures of the training *run*, not of the weights: read from what the run recorded.

Jiang et al. 2019 ("Fantastic generalization measures and where to find them", arXiv 1912.02178, §C.8) count
optimization steps: the steps to reach a training cross-entropy of 0.1 and the steps from 0.1 to 0.01, among the best
predictors of the generalization gap in their tables. A checkpoint cannot tell them; the run records them with
:class:`~flatlit.callbacks.generalization.GeneralizationTargets` ``(loss_milestones=[0.1, 0.01])``: the global step of
the first check at which the full-pass training loss was ≤ each value, in ``final_metrics.json`` under
``loss_milestones``. A preset entry names a record as ``record:<name>`` with its settings.
"""

from __future__ import annotations

import math
from typing import Any

RECORDS: dict[str, dict[str, Any]] = {
    "record:steps_to_loss": {"loss": 0.1},
    "record:steps_between_losses": {"start": 0.1, "end": 0.01},
}


def check_record(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The record's settings merged with its defaults; ValueError (one line) for an unknown record or setting."""
    if name not in RECORDS:
        raise ValueError(f"unknown run record {name!r}; known: {', '.join(RECORDS)}")
    unknown = sorted(set(settings) - set(RECORDS[name]))
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(RECORDS[name])}")
    merged = {**RECORDS[name], **settings}
    for key, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name}: {key} must be a loss >= 0, got {value!r}")
    return merged


def milestones_needed(name: str, settings: dict[str, Any]) -> list[float]:
    """The training losses whose first crossing the record needs."""
    merged = check_record(name, settings)
    return [float(v) for v in merged.values()]


def _step(milestones: dict[str, Any], loss: float) -> float | None:
    entry = milestones.get(repr(float(loss)))
    return None if entry is None else float(entry["step"])


def read_record(name: str, settings: dict[str, Any], final: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """(value, extra) of record ``name`` from a run's ``final_metrics.json`` content ``final``.

    ``steps_to_loss``: the global step at which the training loss first was ≤ ``loss``; ``steps_between_losses``:
    that step for ``end`` minus the one for ``start``. A milestone the run recorded but never reached gives +inf
    (the loss never got there: the slowest possible). ValueError (one line) when the run did not record it."""
    merged = check_record(name, settings)
    recorded = final.get("loss_milestones")
    needed = [float(v) for v in merged.values()]
    missing = [v for v in needed if not isinstance(recorded, dict) or repr(v) not in recorded]
    if missing:
        raise ValueError(
            f"needs the training run's record of the steps to training loss {', '.join(f'{v:g}' for v in missing)}, "
            "which this run does not have: train with GeneralizationTargets(loss_milestones=[0.1, 0.01]) "
            "(flatlit fit --trainer.callbacks+=...), or measure without it (--measures with the other labels)"
        )
    steps = {v: _step(recorded, v) for v in needed}
    if name == "record:steps_to_loss":
        s = steps[float(merged["loss"])]
        return (math.inf if s is None else s), {}
    start, end = steps[float(merged["start"])], steps[float(merged["end"])]
    if start is None or end is None:
        return math.inf, {"start_step": math.nan if start is None else start}
    return end - start, {"start_step": start, "end_step": end}
