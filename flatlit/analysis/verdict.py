"""A reproduction's verdict: ``verdict.json`` (claim, paper, verdict, numbers, figures) and intervals over seeds.

Every ``experiments/reproductions/<name>/`` writes ``runs/reproductions/<name>/verdict.json`` =
``{"claim": str, "paper": str, "verdict": "reproduced" | "partly" | "not reproduced", "numbers": {...},
"figures": [paths]}`` through :func:`write_verdict`, which refuses anything else (so a reproduction cannot record a
malformed verdict). :func:`mean_interval` gives the mean over seeds with a Student-t interval, the intervals the
READMEs quote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

VERDICTS = ("reproduced", "partly", "not reproduced")


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` (one per seed) with the two-sided Student-t ``level`` interval of the mean
    (mean ± t_{n−1} · s/√n); a single value gets an interval of zero width and ``n = 1``."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(x.size)}


def _check_numbers(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be strings, got {k!r}")
            _check_numbers(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_numbers(v, f"{where}[{i}]")
    elif not isinstance(value, (int, float, str, bool)) and value is not None:
        raise ValueError(f"{where}: {type(value).__name__} is not a JSON number, string or bool")


def check_verdict(record: Mapping[str, Any]) -> None:
    """ValueError (one line) unless ``record`` has exactly the verdict.json schema."""
    keys = {"claim", "paper", "verdict", "numbers", "figures"}
    if set(record) != keys:
        raise ValueError(f"verdict.json: keys must be {sorted(keys)}, got {sorted(record)}")
    for key in ("claim", "paper"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"verdict.json: {key} must be a non-empty string")
    if record["verdict"] not in VERDICTS:
        raise ValueError(f"verdict.json: verdict must be one of {VERDICTS}, got {record['verdict']!r}")
    if not isinstance(record["numbers"], Mapping):
        raise ValueError("verdict.json: numbers must be a mapping")
    _check_numbers(record["numbers"], "verdict.json: numbers")
    figures = record["figures"]
    if not isinstance(figures, list) or not all(isinstance(f, str) for f in figures):
        raise ValueError("verdict.json: figures must be a list of paths")


def write_verdict(
    output: str, claim: str, paper: str, verdict: str, numbers: Mapping[str, Any], figures: Sequence[str]
) -> str:
    """Write ``<output>/verdict.json`` (figure paths relative to ``output`` when inside it); returns its path."""
    rel = [os.path.relpath(f, output) if os.path.abspath(f).startswith(os.path.abspath(output)) else f for f in figures]
    record = {"claim": claim, "paper": paper, "verdict": verdict, "numbers": dict(numbers), "figures": rel}
    check_verdict(record)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "verdict.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=False, allow_nan=True)
    os.replace(tmp, path)
    return path


def group_intervals(rows: Sequence[Mapping[str, Any]], by: str, columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For each value of ``by`` (e.g. the batch size), :func:`mean_interval` of every column over the rows (seeds)
    of that group: ``{str(group): {column: {mean, low, high, n}}}``; non-finite cells are left out."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[by]), []).append(row)
    out: dict[str, dict[str, Any]] = {}
    for group, members in groups.items():
        out[group] = {}
        for col in columns:
            values = [float(r[col]) for r in members if r.get(col) not in (None, "") and math.isfinite(float(r[col]))]
            if values:
                out[group][col] = mean_interval(values)
    return out


def above(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Interval ``a`` lies entirely above interval ``b`` (a difference the seeds support)."""
    return a["low"] > b["high"]


# ---- what every experiments/reproductions/<name>/analyze.py shares -------------------------------------------------
def reproduction_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The command line of a reproduction's ``analyze.py``: ``--sweep`` (the sweep's output, default
    ``runs/reproductions/<name>/sweep``) and ``--output`` (verdict.json and figures, ``runs/reproductions/<name>``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--sweep", default=f"runs/reproductions/{name}/sweep", help="the sweep's output directory")
    p.add_argument("--output", default=f"runs/reproductions/{name}", help="where verdict.json and the figures go")
    return p


def sweep_results(sweep: str, name: str):
    """The finished trials of the reproduction's sweep as a DataFrame (:func:`~flatlit.analysis.sweep_table
    .sweep_frame`); SystemExit with one line when the sweep has not run."""
    from flatlit.analysis.sweep_table import sweep_frame

    if not os.path.isfile(os.path.join(sweep, "results.csv")):
        raise SystemExit(f"no results in {sweep}: run the sweep first (make reproduce-{name})")
    return sweep_frame(sweep)


def report_verdict(
    output: str,
    claim: str,
    paper: str,
    verdict: str,
    numbers: Mapping[str, Any],
    figures: Sequence[str],
    shown: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`write_verdict`, then print ``shown`` (default: the numbers) as JSON and the verdict line; returns
    ``{"verdict", "numbers"}`` (what the reproductions' ``main`` returns to their tests)."""
    path = write_verdict(output, claim, paper, verdict, numbers, figures)
    json.dump(numbers if shown is None else shown, sys.stdout, indent=1, default=str)
    print(f"\nverdict: {verdict} ({path})")
    return {"verdict": verdict, "numbers": numbers}
