"""The analysis folder of a sweep: its trials and correlation tables, figures and summary (``flatlit analyze``).

:func:`analyze` reads every finished trial of a sweep (:func:`~flatlit.analysis.sweep_table.load_sweep`: the sweep's
``trials.jsonl`` or ``results.csv``, or else a tree of run directories), and writes to ``output`` (default
``SWEEP_DIR/analysis``):

- ``trials.csv`` / ``trials.md``: one row per trial: hyperparameters (dotted config keys), run directory, final
  metrics (``final/...``) and measures (``measure/<name>``): the DataFrame :attr:`~flatlit.analysis.sweep_table.
  Sweep.frame`;
- ``correlations.csv`` / ``correlations.md``: per measure and target, Kendall's τ-b, Jiang et al.'s granulated τ
  (ψ per hyperparameter and their mean Ψ; arXiv 1912.02178 §4) and Spearman's ρ, each with a seeded percentile
  bootstrap 95 % interval, sorted by |τ|, naming the measure that ranks the target best: the DataFrames of
  :meth:`~flatlit.analysis.correlation.TargetResult.to_frame`, one target after the other;
- ``trials.parquet`` and ``correlations.parquet`` when pandas finds a Parquet engine (pyarrow or fastparquet);
- ``scatter_<target>.png`` (measure vs target, one panel per measure, coloured by a hyperparameter),
  ``tau_<target>.png`` (τ and Ψ with their intervals) and ``psi_<target>.png`` (ψ per hyperparameter);
- ``summary.json`` (what was read and the best measure per target).

Missing or non-finite values (a measure not computed for a trial, an infinite bound) are left out pairwise and
counted. Bad input raises one :class:`~flatlit.utils.errors.ConfigError`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from flatlit.analysis.correlation import (
    analyze_target,
    average_over,
    default_color_key,
    nuisance_keys,
)
from flatlit.analysis.formatting import fmt_value, markdown_table, short_names
from flatlit.analysis.stats import Correlation, codes
from flatlit.analysis.sweep_table import load_sweep
from flatlit.figures.correlation import psi_figure, scatter_figure, tau_figure
from flatlit.figures.style import save
from flatlit.utils.errors import ConfigError

VERSION = 1


def _ci(v: float, lo: float, hi: float) -> str:
    if not math.isfinite(v):
        return "—"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:+.3f}"
    return f"{v:+.3f} [{lo:+.2f}, {hi:+.2f}]"


def _nuisance_note(hps: Sequence[str], names: dict[str, str]) -> str:
    keys = nuisance_keys(hps)
    if not keys:
        return ""
    shown = ", ".join(f"`{names[h]}`" for h in keys)
    return f" ({shown} fix the groups and get a ψ column but are left out of Ψ: repetitions, not hyperparameters)"


def _replace(path: str, write: Any) -> None:
    """``write(tmp)`` then rename onto ``path``: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _replace(path, write)


def write_csv(frame: pd.DataFrame, path: str) -> None:
    """``frame`` as CSV: no index, NaN as an empty cell, floats in full precision (``pd.read_csv`` gives it back)."""
    _replace(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))


def write_parquet(frame: pd.DataFrame, path: str) -> bool:
    """``frame`` as Parquet when pandas finds an engine (pyarrow or fastparquet, neither a dependency of flatlit);
    False without one. A column holding values of several types (numbers and text) is written as text."""
    frame = frame.copy()
    for c in [c for c in frame.columns if pd.api.types.is_object_dtype(frame[c])]:
        kinds = {type(v) for v in frame[c].tolist() if not (isinstance(v, float) and math.isnan(v))}
        if len(kinds) > 1:
            frame[c] = frame[c].map(lambda v: v if isinstance(v, float) and math.isnan(v) else str(v))
    try:
        _replace(path, lambda tmp: frame.to_parquet(tmp, index=False))
    except ImportError:
        return False
    return True


class _Progress:
    """Progress of the bootstrap, one step per (target, measure): a tqdm bar with its ETA on a terminal, otherwise
    (a log file) one line per step on stderr."""

    def __init__(self, total: int, bootstrap: int) -> None:
        self.total, self.done, self.bootstrap = total, 0, bootstrap
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="bootstrap", unit="measure", file=sys.stderr)

    def __call__(self, what: str, c: Correlation) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
            return
        spent = time.perf_counter() - self.start
        eta = spent / self.done * (self.total - self.done)
        sys.stderr.write(
            f"analyze {self.done}/{self.total}: {what}: τ = {c.tau:+.3f} ({self.bootstrap} resamples; "
            f"{spent:.1f} s, ETA {eta:.0f} s)\n"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _resolve_hparam(arg: str, value: str, hparams: list[str], names: dict[str, str]) -> str:
    for h in hparams:
        if value in (h, names[h]):
            return h
    shown = ", ".join(names[h] for h in hparams) or "(none: no configuration value differs between the trials)"
    raise ConfigError(f"{arg}: {value!r} is not a hyperparameter of this sweep; choose from {shown}.")


def analyze(
    sweep_dir: str,
    targets: Sequence[str] = ("gen_gap_acc",),
    output: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    measures: Sequence[str] | None = None,
    color_by: str | None = None,
    average: Sequence[str] | None = None,
    converged_only: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the analysis and write its files; returns the summary (also written as ``summary.json``). ``progress``:
    report the bootstrap on stderr (a bar on a terminal, a line per measure otherwise)."""
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap: must be >= 0 (0 skips the intervals), got {bootstrap}.")
    sweep = load_sweep(sweep_dir)
    if converged_only:
        if "converged" not in sweep.info:
            raise ConfigError(
                "--converged_only: these trials have no convergence record (final_metrics.json of the "
                "GeneralizationTargets callback, which `flatlit sweep` adds); leave the flag out."
            )
        kept = sweep.frame["converged"].map(lambda v: v in (True, "True", "true", 1))
        if not kept.any():
            raise ConfigError("--converged_only: no trial met its stopping rule; leave the flag out to see them all.")
        if not kept.all():
            sweep.notes.append(f"--converged_only: {int((~kept).sum())} trial(s) that never converged left out.")
        sweep.frame = sweep.frame[kept].reset_index(drop=True)
    trials = sweep.frame
    names = short_names(sweep.hparams)
    cols = []
    for t in targets:
        col = t if t.startswith("final/") else f"final/{t}"
        if col not in sweep.metrics or not np.isfinite(sweep.column(col)).any():
            have = [m.removeprefix("final/") for m in sweep.metrics if np.isfinite(sweep.column(m)).any()]
            raise ConfigError(
                f"--target: {t!r} is not a final metric of these trials; choose from {', '.join(have) or '(none)'}."
            )
        cols.append(col)
    chosen = sweep.measures
    if measures:
        chosen = []
        for m in measures:
            col = m if m.startswith("measure/") else f"measure/{m}"
            hits = [c for c in sweep.measures if c == col or c.startswith(col + "[")]
            if not hits:
                have = ", ".join(c.removeprefix("measure/") for c in sweep.measures) or "(none)"
                raise ConfigError(f"--measures: {m!r} was not measured in these trials; choose from {have}.")
            chosen += [c for c in hits if c not in chosen]
    avg = [_resolve_hparam("--average", a, sweep.hparams, names) for a in (average or [])]
    color = _resolve_hparam("--color_by", color_by, sweep.hparams, names) if color_by else None
    if color in avg:
        raise ConfigError(f"--color_by: {color_by!r} is averaged over (--average); colour by another hyperparameter.")

    outdir = output or os.path.join(sweep_dir, "analysis")
    os.makedirs(outdir, exist_ok=True)
    written: list[str] = []
    write_csv(trials, os.path.join(outdir, "trials.csv"))
    cells = pd.DataFrame({c: [fmt_value(v) for v in trials[c].tolist()] for c in trials.columns}, dtype=object)
    cells.columns = [names.get(c, c.removeprefix("measure/")) for c in trials.columns]
    md = [
        f"# Trials of {os.path.abspath(sweep_dir)}",
        "",
        f"{len(trials)} finished trials read from {sweep.source}. Hyperparameters: "
        + (", ".join(f"`{names[h]}` = `{h}`" for h in sweep.hparams) or "none (no configuration value differs)")
        + ". Accuracies are fractions; gen_gap_acc = train_acc − test_acc, gen_gap_loss = test_loss − train_loss.",
        "",
        markdown_table(cells),
    ]
    md += [f"- {n}" for n in sweep.notes]
    _write_text(os.path.join(outdir, "trials.md"), "\n".join(md) + "\n")
    written += ["trials.csv", "trials.md"]
    if write_parquet(trials, os.path.join(outdir, "trials.parquet")):
        written.append("trials.parquet")

    points, hps = average_over(sweep, avg) if avg else (trials, sweep.hparams)
    summary: dict[str, Any] = {
        "version": VERSION,
        "sweep": os.path.abspath(sweep_dir),
        "source": sweep.source,
        "trials": len(trials),
        "points": len(points),
        "averaged_over": avg,
        "hyperparameters": {names[h]: h for h in sweep.hparams},
        "measures": [m.removeprefix("measure/") for m in chosen],
        "bootstrap": {"resamples": bootstrap, "seed": seed, "level": 0.95},
        "notes": list(sweep.notes),
        "targets": {},
    }
    if not chosen:
        summary["notes"].append("No measures in these trials: correlations skipped (run `flatlit measure`).")
    tables: list[pd.DataFrame] = []
    md = [f"# Which measure ranks the generalization gap? ({os.path.basename(os.path.normpath(sweep_dir))})", ""]
    counts = [f"`{names[h]}` ({len(set(codes(points[h].tolist())))} values)" for h in hps]
    md.append(
        f"{len(trials)} trials ({sweep.source})"
        + (f", averaged over {', '.join(names[a] for a in avg)} into {len(points)} points" if avg else "")
        + f"; hyperparameters: {', '.join(counts) or 'none'}."
        f" τ: Kendall's τ-b over all points; Ψ: Jiang et al. 2019's granulated τ (arXiv 1912.02178 §4), the mean over"
        " hyperparameters i of ψ_i, itself the mean τ over the groups of points where only hyperparameter i changes"
        + _nuisance_note(hps, names)
        + f"; ρ: Spearman. Intervals: 95 % percentile bootstrap, {bootstrap} resamples of the points, seed {seed}."
    )
    md.append("")
    steps = len(cols) * len(chosen)
    bar = _Progress(steps, bootstrap) if progress and bootstrap > 0 and steps else None
    try:
        for col in cols if chosen else []:
            res = analyze_target(points, hps, chosen, col, bootstrap, seed, bar)
            table = res.to_frame(names)
            tables.append(table)
            target = col.removeprefix("final/")
            md += [f"## {target}", "", _best_sentence(table, target), ""]
            md += [markdown_table(_correlation_cells(table, hps, names))]
            md.append("ψ columns: value (number of groups averaged). — : undefined (no group of comparable points).")
            if res.points < 10:
                md.append(
                    f"Only {res.points} points: τ takes few values and its intervals are wide; read it as a hint."
                )
            md.append("")
            color_key = color or default_color_key(points, hps, col)
            figs = {
                f"tau_{target}.png": tau_figure(res),
                f"scatter_{target}.png": scatter_figure(points, res, color_key, names),
            }
            if hps:
                figs[f"psi_{target}.png"] = psi_figure(res, names)
            for fname, fig in figs.items():
                save(fig, os.path.join(outdir, fname))
                written.append(fname)
                md += [f"![{fname}]({fname})", ""]
            summary["targets"][target] = _target_summary(table)
            summary["targets"][target]["color_by"] = names.get(color_key, color_key) if color_key else None
    finally:
        if bar is not None:
            bar.close()
    if tables:
        correlations = pd.concat(tables, ignore_index=True)
        write_csv(correlations, os.path.join(outdir, "correlations.csv"))
        md += [f"- {n}" for n in summary["notes"]]
        _write_text(os.path.join(outdir, "correlations.md"), "\n".join(md) + "\n")
        written += ["correlations.csv", "correlations.md"]
        if write_parquet(correlations, os.path.join(outdir, "correlations.parquet")):
            written.append("correlations.parquet")
    summary["files"] = sorted(written)
    summary["output"] = os.path.abspath(outdir)
    _write_text(os.path.join(outdir, "summary.json"), json.dumps(summary, indent=1, sort_keys=True, default=float))
    return summary


def _best(table: pd.DataFrame) -> pd.Series | None:
    """The first row of a target's correlation table (sorted by |τ|) whose τ is defined."""
    ok = table[np.isfinite(table["tau"].to_numpy(dtype=float))]
    return ok.iloc[0] if len(ok) else None


def _best_sentence(table: pd.DataFrame, target: str) -> str:
    best = _best(table)
    if best is None:
        return f"No measure has a defined τ with {target} (fewer than 2 points or constant values)."
    sign = "larger values go with a larger" if best.tau > 0 else "larger values go with a smaller"
    return (
        f"**{best.measure} ranks {target} best**: τ = {best.tau:+.3f} (95 % CI {best.tau_lo:+.2f} to "
        f"{best.tau_hi:+.2f}, p = {best.tau_p:.2g}, n = {best.n}); {sign} {target}."
    )


def _correlation_cells(table: pd.DataFrame, hps: Sequence[str], names: dict[str, str]) -> pd.DataFrame:
    """The Markdown table of one target: measure, n (missing), τ, ρ and Ψ with their intervals, ψ per hyperparameter
    with its number of groups."""
    cells = pd.DataFrame(
        {
            "measure": table["measure"],
            "n": [f"{n}" + (f" ({k} missing)" if k else "") for n, k in zip(table["n"], table["missing"])],
            "τ [95 % CI]": list(map(_ci, table["tau"], table["tau_lo"], table["tau_hi"])),
            "ρ [95 % CI]": list(map(_ci, table["spearman"], table["spearman_lo"], table["spearman_hi"])),
            "Ψ [95 % CI]": list(map(_ci, table["Psi"], table["Psi_lo"], table["Psi_hi"])),
        },
        dtype=object,
    )
    for h in hps:
        s = names[h]
        psi = zip(table[f"psi/{s}"], table[f"groups/{s}"])
        cells[f"ψ {s}"] = ["—" if not math.isfinite(v) else f"{v:+.2f} ({g})" for v, g in psi]
    return cells


def _target_summary(table: pd.DataFrame) -> dict[str, Any]:
    """``summary.json``'s entry of one target: the best measure and the ranking, from its correlation table."""
    best = _best(table)
    return {
        "best": best.measure if best is not None else None,
        "tau": float(best.tau) if best is not None else None,
        "tau_ci": [float(best.tau_lo), float(best.tau_hi)] if best is not None else None,
        "Psi": float(best.Psi) if best is not None else None,
        "ranking": [
            {"measure": r.measure, "n": int(r.n), "tau": r.tau, "tau_lo": r.tau_lo, "tau_hi": r.tau_hi, "Psi": r.Psi}
            for r in table[["measure", "n", "tau", "tau_lo", "tau_hi", "Psi"]].itertuples(index=False)
        ],
    }
