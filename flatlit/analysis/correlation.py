"""Which measure ranks a target best: the correlations of every measure with one target over a sweep's trials.

:func:`analyze_target` correlates each measure column of a trials DataFrame (:attr:`~flatlit.analysis.sweep_table.
Sweep.frame`) with a target column (Kendall's τ-b, the granulated τ of Jiang et al. 2019 and Spearman's ρ with
bootstrap intervals, :mod:`flatlit.analysis.stats`) and sorts the measures by |τ|; :meth:`TargetResult.to_frame` is
that ranking as a DataFrame (the rows of ``correlations.csv``), and :func:`correlation_table` is the whole table for
one or more targets. :func:`average_over` first averages trials over some hyperparameters (the seeds, as LPF-SGD
does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from flatlit.analysis.formatting import short_names
from flatlit.analysis.stats import Correlation, codes, correlate, spearman_rho
from flatlit.analysis.sweep_table import Sweep, column_roles, numeric

NAN2 = (math.nan, math.nan)


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

    def to_frame(self, names: Mapping[str, str] | None = None) -> pd.DataFrame:
        """One row per measure, in the order of the ranking: ``target, measure, n`` (points with both values),
        ``missing`` (points without the measure), ``tau, tau_lo, tau_hi, tau_p, spearman, spearman_lo, spearman_hi,
        Psi, Psi_lo, Psi_hi`` and per hyperparameter ``psi/<h>, psi/<h>_lo, psi/<h>_hi, groups/<h>`` (``<h>`` its
        short name from ``names``, by default :func:`~flatlit.analysis.formatting.short_names`). NaN: undefined, or
        no bootstrap."""
        names = short_names(self.hparams) if names is None else names
        columns = ["target", "measure", "n", "missing", "tau", "tau_lo", "tau_hi", "tau_p"]
        columns += ["spearman", "spearman_lo", "spearman_hi", "Psi", "Psi_lo", "Psi_hi"]
        for h in self.hparams:
            columns += [f"psi/{names[h]}", f"psi/{names[h]}_lo", f"psi/{names[h]}_hi", f"groups/{names[h]}"]
        records = []
        for m, c, missing in self.results:
            g = c.granulated
            row = [self.target.removeprefix("final/"), m.removeprefix("measure/"), c.n, missing]
            row += [c.tau, *c.tau_ci, c.tau_p, c.rho, *c.rho_ci, g.Psi, *c.Psi_ci]
            for h in self.hparams:
                row += [g.psi.get(h, math.nan), *c.psi_ci.get(h, NAN2), g.groups.get(h, 0)]
            records.append(row)
        return pd.DataFrame.from_records(records, columns=columns)


def average_over(sweep: Sweep, keys: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """The trials averaged (NaN-aware mean of metrics and measures) over the hyperparameters ``keys``: one row per
    setting of the other hyperparameters (in order of first appearance) with a ``trials`` count, and those other
    hyperparameters (LPF-SGD averages its grid over seeds before correlating)."""
    rest = [h for h in sweep.hparams if h not in keys]
    frame = sweep.frame
    values = pd.DataFrame({c: numeric(frame, c) for c in [*sweep.metrics, *sweep.measures]}, index=frame.index)
    by = [frame[h] for h in rest] if rest else np.zeros(len(frame), dtype=int)
    groups = values.groupby(by, sort=False, dropna=False)
    out = groups.mean()
    out["trials"] = groups.size()
    return out.reset_index(drop=not rest), rest


def nuisance_keys(hparams: Sequence[str]) -> list[str]:
    """The hyperparameters that are random seeds (``seed`` in the key): they fix the groups of the granulated τ
    like any other key and get their own ψ, but Ψ leaves them out — they are repetitions, not design choices."""
    return [h for h in hparams if "seed" in h.rsplit(".", 1)[-1].lower()]


def analyze_target(
    frame: pd.DataFrame,
    hparams: Sequence[str],
    measures: Sequence[str],
    target: str,
    bootstrap: int,
    seed: int,
    progress: Callable[[str, Correlation], None] | None = None,
) -> TargetResult:
    """Every measure column of ``frame`` against the ``target`` column, sorted by |τ|; ``progress`` (if given) is
    called after each measure with its name and correlation."""
    y = numeric(frame, target)
    hp = {h: frame[h].tolist() for h in hparams}
    nuisance = nuisance_keys(hparams)
    results = []
    for m in measures:
        x = numeric(frame, m)
        c = correlate(x, y, hp, bootstrap=bootstrap, seed=seed, nuisance=nuisance)
        results.append((m, c, int((~np.isfinite(x)).sum())))
        if progress is not None:
            progress(f"{target.removeprefix('final/')} ~ {m.removeprefix('measure/')}", c)
    results.sort(key=lambda t: (not math.isfinite(t[1].tau), -abs(t[1].tau) if math.isfinite(t[1].tau) else 0))
    return TargetResult(target, len(frame), list(hparams), results)


def correlation_table(
    frame: pd.DataFrame,
    targets: str | Sequence[str] = "gen_gap_acc",
    measures: Sequence[str] | None = None,
    hparams: Sequence[str] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Kendall's τ-b, Spearman's ρ and the granulated τ (ψ per hyperparameter, Ψ) of every measure with every
    target over the rows of a trials DataFrame, with seeded bootstrap 95 % intervals: the table of
    ``correlations.csv`` (:meth:`TargetResult.to_frame`, the targets one after the other, each sorted by |τ|).

    ``targets``, ``measures``: column names, with or without their ``final/`` and ``measure/`` prefixes (default:
    every ``measure/*`` column); ``hparams``: the columns that group the granulated τ (default: by name, see
    :func:`~flatlit.analysis.sweep_table.column_roles`). ``bootstrap=0`` skips the intervals."""
    roles = column_roles(frame)
    hparams = roles["hparams"] if hparams is None else list(hparams)
    measures = roles["measures"] if measures is None else [m if m in frame else f"measure/{m}" for m in measures]
    targets = [targets] if isinstance(targets, str) else list(targets)
    cols = [t if t in frame else f"final/{t}" for t in targets]
    absent = [c for c in [*hparams, *measures, *cols] if c not in frame]
    if absent:
        raise KeyError(f"not columns of the frame: {', '.join(absent)}")
    names = short_names(hparams)
    parts = [analyze_target(frame, hparams, measures, c, bootstrap, seed).to_frame(names) for c in cols]
    return pd.concat(parts, ignore_index=True)


def default_color_key(frame: pd.DataFrame, hparams: list[str], target: str) -> str | None:
    """The hyperparameter to colour scatter points by: among those with 2–10 values, the one whose values are most
    associated with the target (largest |Spearman ρ| of its value codes, or of its values when numeric)."""
    y = numeric(frame, target)
    best, score = None, -1.0
    for h in hparams:
        vals = frame[h].tolist()
        k = len(set(codes(vals)))
        if not 2 <= k <= 10:
            continue
        num = numeric(frame, h)
        x = num if np.isfinite(num).all() else codes(vals).astype(float)
        rho = spearman_rho(x, y)
        s = abs(rho) if math.isfinite(rho) else 0.0
        if s > score:
            best, score = h, s
    return best or (hparams[0] if hparams else None)
