"""Which measure ranks a target best: the correlations of every measure with one target over a sweep's trials.

:func:`analyze_target` correlates each measure column with a target column (Kendall's τ-b, the granulated τ of Jiang
et al. 2019 and Spearman's ρ with bootstrap intervals, :mod:`flatlit.analysis.stats`) and sorts the measures by |τ|;
:func:`average_over` first averages trials over some hyperparameters (the seeds, as LPF-SGD does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flatlit.analysis.stats import Correlation, codes, correlate, spearman_rho
from flatlit.analysis.sweep_table import Sweep, finite_or_nan


@dataclass
class TargetResult:
    """Correlations of every measure with one target (sorted by |τ|, undefined last)."""

    target: str
    points: int
    hparams: list[str]
    results: list[tuple[str, Correlation, int]]  # (measure column, correlation, missing count)

    @property
    def best(self) -> tuple[str, Correlation] | None:
        ok = [(m, c) for m, c, _ in self.results if math.isfinite(c.tau)]
        return ok[0] if ok else None


def average_over(sweep: Sweep, keys: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows averaged (NaN-aware mean of metrics and measures) over the hyperparameters ``keys``, and the remaining
    hyperparameters (LPF-SGD averages its grid over seeds before correlating)."""
    rest = [h for h in sweep.hparams if h not in keys]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in sweep.rows:
        groups.setdefault(tuple(repr(r.get(h)) for h in rest), []).append(r)
    out = []
    for members in groups.values():
        row = {h: members[0].get(h) for h in rest}
        for col in [*sweep.metrics, *sweep.measures]:
            vals = np.array([finite_or_nan(m.get(col)) for m in members])
            row[col] = float(vals[np.isfinite(vals)].mean()) if np.isfinite(vals).any() else math.nan
        row["trials"] = len(members)
        out.append(row)
    return out, rest


def nuisance_keys(hparams: Sequence[str]) -> list[str]:
    """The hyperparameters that are random seeds (``seed`` in the key): they fix the groups of the granulated τ
    like any other key and get their own ψ, but Ψ leaves them out — they are repetitions, not design choices."""
    return [h for h in hparams if "seed" in h.rsplit(".", 1)[-1].lower()]


def analyze_target(
    rows: list[dict[str, Any]], hparams: list[str], measures: list[str], target: str, bootstrap: int, seed: int
) -> TargetResult:
    y = np.array([finite_or_nan(r.get(target)) for r in rows])
    hp = {h: [r.get(h) for r in rows] for h in hparams}
    nuisance = nuisance_keys(hparams)
    results = []
    for m in measures:
        x = np.array([finite_or_nan(r.get(m)) for r in rows])
        c = correlate(x, y, hp, bootstrap=bootstrap, seed=seed, nuisance=nuisance)
        results.append((m, c, int((~np.isfinite(x)).sum())))
    results.sort(key=lambda t: (not math.isfinite(t[1].tau), -abs(t[1].tau) if math.isfinite(t[1].tau) else 0))
    return TargetResult(target, len(rows), hparams, results)


def correlation_rows(res: TargetResult, names: dict[str, str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``correlations.csv`` for one target."""
    header = ["target", "measure", "n", "missing", "tau", "tau_lo", "tau_hi", "tau_p"]
    header += ["spearman", "spearman_lo", "spearman_hi", "Psi", "Psi_lo", "Psi_hi"]
    for h in res.hparams:
        s = names[h]
        header += [f"psi/{s}", f"psi/{s}_lo", f"psi/{s}_hi", f"groups/{s}"]
    rows = []
    for m, c, missing in res.results:
        g = c.granulated
        row: list[Any] = [res.target.removeprefix("final/"), m.removeprefix("measure/"), c.n, missing]
        row += [c.tau, *c.tau_ci, c.tau_p, c.rho, *c.rho_ci, g.Psi, *c.Psi_ci]
        for h in res.hparams:
            row += [g.psi.get(h, math.nan), *c.psi_ci.get(h, (math.nan, math.nan)), g.groups.get(h, 0)]
        rows.append(row)
    return header, rows


def default_color_key(sweep_rows: list[dict[str, Any]], hparams: list[str], target: str) -> str | None:
    """The hyperparameter to colour scatter points by: among those with 2–10 values, the one whose values are most
    associated with the target (largest |Spearman ρ| of its value codes, or of its values when numeric)."""
    y = np.array([finite_or_nan(r.get(target)) for r in sweep_rows])
    best, score = None, -1.0
    for h in hparams:
        vals = [r.get(h) for r in sweep_rows]
        k = len(set(codes(vals)))
        if not 2 <= k <= 10:
            continue
        num = np.array([finite_or_nan(v) for v in vals])
        x = num if np.isfinite(num).all() else codes(vals).astype(float)
        rho = spearman_rho(x, y)
        s = abs(rho) if math.isfinite(rho) else 0.0
        if s > score:
            best, score = h, s
    return best or (hparams[0] if hparams else None)
