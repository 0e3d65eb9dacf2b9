"""The analysis folder of a sweep: its trials and correlation tables, figures and summary (``flatlit analyze``).

:func:`analyze` reads every finished trial of a sweep (:func:`~flatlit.analysis.sweep_table.load_sweep`: the sweep's
``trials.jsonl`` or ``results.csv``, or else a tree of run directories), and writes to ``output`` (default
``SWEEP_DIR/analysis``):

- ``trials.csv`` / ``trials.md``: one row per trial: hyperparameters (dotted config keys), run directory, final
  metrics (``final/...``) and measures (``measure/<name>``);
- ``correlations.csv`` / ``correlations.md``: per measure and target, Kendall's τ-b, Jiang et al.'s granulated τ
  (ψ per hyperparameter and their mean Ψ; arXiv 1912.02178 §4) and Spearman's ρ, each with a seeded percentile
  bootstrap 95 % interval, sorted by |τ|, naming the measure that ranks the target best;
- ``scatter_<target>.png`` (measure vs target, one panel per measure, coloured by a hyperparameter),
  ``tau_<target>.png`` (τ and Ψ with their intervals) and ``psi_<target>.png`` (ψ per hyperparameter);
- ``summary.json`` (what was read and the best measure per target).

Missing or non-finite values (a measure not computed for a trial, an infinite bound) are left out pairwise and
counted. Bad input raises one :class:`~flatlit.utils.errors.ConfigError`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from flatlit.analysis.correlation import (
    analyze_target,
    average_over,
    correlation_rows,
    default_color_key,
    nuisance_keys,
)
from flatlit.analysis.formatting import fmt_value, markdown_table, short_names
from flatlit.analysis.stats import codes
from flatlit.analysis.sweep_table import load_sweep, trials_table
from flatlit.figures.correlation import psi_figure, scatter_figure, tau_figure
from flatlit.figures.style import save
from flatlit.utils.errors import ConfigError

VERSION = 1


def _ci(v: float, ci: tuple[float, float]) -> str:
    if not math.isfinite(v):
        return "—"
    if not all(math.isfinite(c) for c in ci):
        return f"{v:+.3f}"
    return f"{v:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _nuisance_note(hps: Sequence[str], names: dict[str, str]) -> str:
    keys = nuisance_keys(hps)
    if not keys:
        return ""
    shown = ", ".join(f"`{names[h]}`" for h in keys)
    return f" ({shown} fix the groups and get a ψ column but are left out of Ψ: repetitions, not hyperparameters)"


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(
            ["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v) for v in r]
        )
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_parquet(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    cols = {
        h: [r[i] if not isinstance(r[i], (dict, list)) else json.dumps(r[i]) for r in rows]
        for i, h in enumerate(header)
    }
    cols = {
        h: (v if len({type(x) for x in v if x is not None}) <= 1 else [None if x is None else str(x) for x in v])
        for h, v in cols.items()
    }
    pq.write_table(pa.table(cols), path)
    return True


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
) -> dict[str, Any]:
    """Run the analysis and write its files; returns the summary (also written as ``summary.json``)."""
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap: must be >= 0 (0 skips the intervals), got {bootstrap}.")
    sweep = load_sweep(sweep_dir)
    if converged_only:
        if "converged" not in sweep.info:
            raise ConfigError(
                "--converged_only: these trials have no convergence record (final_metrics.json of the "
                "GeneralizationTargets callback, which `flatlit sweep` adds); leave the flag out."
            )
        kept = [r for r in sweep.rows if r.get("converged") in (True, "True", "true", 1)]
        if not kept:
            raise ConfigError("--converged_only: no trial met its stopping rule; leave the flag out to see them all.")
        if len(kept) < len(sweep.rows):
            sweep.notes.append(
                f"--converged_only: {len(sweep.rows) - len(kept)} trial(s) that never converged left out."
            )
        sweep.rows = kept
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
    header, rows = trials_table(sweep)
    _write_csv(os.path.join(outdir, "trials.csv"), header, rows)
    md_header = [names.get(h, h) if h in names else h.removeprefix("measure/") for h in header]
    md = [
        f"# Trials of {os.path.abspath(sweep_dir)}",
        "",
        f"{len(sweep.rows)} finished trials read from {sweep.source}. Hyperparameters: "
        + (", ".join(f"`{names[h]}` = `{h}`" for h in sweep.hparams) or "none (no configuration value differs)")
        + ". Accuracies are fractions; gen_gap_acc = train_acc − test_acc, gen_gap_loss = test_loss − train_loss.",
        "",
        markdown_table(md_header, [[fmt_value(v) for v in r] for r in rows]),
    ]
    md += [f"- {n}" for n in sweep.notes]
    _write_text(os.path.join(outdir, "trials.md"), "\n".join(md) + "\n")
    written += ["trials.csv", "trials.md"]
    if _write_parquet(os.path.join(outdir, "trials.parquet"), header, rows):
        written.append("trials.parquet")

    data_rows, hps = average_over(sweep, avg) if avg else (sweep.rows, sweep.hparams)
    summary: dict[str, Any] = {
        "version": VERSION,
        "sweep": os.path.abspath(sweep_dir),
        "source": sweep.source,
        "trials": len(sweep.rows),
        "points": len(data_rows),
        "averaged_over": avg,
        "hyperparameters": {names[h]: h for h in sweep.hparams},
        "measures": [m.removeprefix("measure/") for m in chosen],
        "bootstrap": {"resamples": bootstrap, "seed": seed, "level": 0.95},
        "notes": list(sweep.notes),
        "targets": {},
    }
    if not chosen:
        summary["notes"].append("No measures in these trials: correlations skipped (run `flatlit measure`).")
    csv_header: list[str] | None = None
    csv_rows: list[list[Any]] = []
    md = [f"# Which measure ranks the generalization gap? ({os.path.basename(os.path.normpath(sweep_dir))})", ""]
    counts = [f"`{names[h]}` ({len(set(codes([r.get(h) for r in data_rows])))} values)" for h in hps]
    md.append(
        f"{len(sweep.rows)} trials ({sweep.source})"
        + (f", averaged over {', '.join(names[a] for a in avg)} into {len(data_rows)} points" if avg else "")
        + f"; hyperparameters: {', '.join(counts) or 'none'}."
        f" τ: Kendall's τ-b over all points; Ψ: Jiang et al. 2019's granulated τ (arXiv 1912.02178 §4), the mean over"
        " hyperparameters i of ψ_i, itself the mean τ over the groups of points where only hyperparameter i changes"
        + _nuisance_note(hps, names)
        + f"; ρ: Spearman. Intervals: 95 % percentile bootstrap, {bootstrap} resamples of the points, seed {seed}."
    )
    md.append("")
    for col in cols if chosen else []:
        res = analyze_target(data_rows, hps, chosen, col, bootstrap, seed)
        h, r = correlation_rows(res, names)
        csv_header = csv_header or h
        csv_rows += r
        target = col.removeprefix("final/")
        best = res.best
        md += [f"## {target}", ""]
        if best:
            m, c = best
            sign = "larger values go with a larger" if c.tau > 0 else "larger values go with a smaller"
            md.append(
                f"**{m.removeprefix('measure/')} ranks {target} best**: τ = {c.tau:+.3f} "
                f"(95 % CI {c.tau_ci[0]:+.2f} to {c.tau_ci[1]:+.2f}, p = {c.tau_p:.2g}, n = {c.n}); {sign} {target}."
            )
        else:
            md.append(f"No measure has a defined τ with {target} (fewer than 2 points or constant values).")
        md.append("")
        table = [["measure", "n", "τ [95 % CI]", "ρ [95 % CI]", "Ψ [95 % CI]", *(f"ψ {names[h]}" for h in hps)]]
        for m, c, missing in res.results:
            g = c.granulated
            table.append(
                [
                    m.removeprefix("measure/"),
                    f"{c.n}" + (f" ({missing} missing)" if missing else ""),
                    _ci(c.tau, c.tau_ci),
                    _ci(c.rho, c.rho_ci),
                    _ci(g.Psi, c.Psi_ci),
                    *(("—" if not math.isfinite(g.psi[h]) else f"{g.psi[h]:+.2f} ({g.groups[h]})") for h in hps),
                ]
            )
        md.append(markdown_table(table[0], table[1:]))
        md.append("ψ columns: value (number of groups averaged). — : undefined (no group of comparable points).")
        if res.points < 10:
            md.append(f"Only {res.points} points: τ takes few values and its intervals are wide; read it as a hint.")
        md.append("")
        color_key = color or default_color_key(data_rows, hps, col)
        figs = {
            f"tau_{target}.png": tau_figure(res),
            f"scatter_{target}.png": scatter_figure(data_rows, res, color_key, names),
        }
        if hps:
            figs[f"psi_{target}.png"] = psi_figure(res, names)
        for fname, fig in figs.items():
            save(fig, os.path.join(outdir, fname))
            written.append(fname)
            md += [f"![{fname}]({fname})", ""]
        summary["targets"][target] = {
            "best": best[0].removeprefix("measure/") if best else None,
            "tau": best[1].tau if best else None,
            "tau_ci": list(best[1].tau_ci) if best else None,
            "Psi": best[1].granulated.Psi if best else None,
            "color_by": names.get(color_key, color_key) if color_key else None,
            "ranking": [
                {
                    "measure": m.removeprefix("measure/"),
                    "n": c.n,
                    "tau": c.tau,
                    "tau_lo": c.tau_ci[0],
                    "tau_hi": c.tau_ci[1],
                    "Psi": c.granulated.Psi,
                }
                for m, c, _ in res.results
            ],
        }
    if csv_header:
        _write_csv(os.path.join(outdir, "correlations.csv"), csv_header, csv_rows)
        md += [f"- {n}" for n in summary["notes"]]
        _write_text(os.path.join(outdir, "correlations.md"), "\n".join(md) + "\n")
        written += ["correlations.csv", "correlations.md"]
    summary["files"] = sorted(written)
    summary["output"] = os.path.abspath(outdir)
    _write_text(os.path.join(outdir, "summary.json"), json.dumps(summary, indent=1, sort_keys=True, default=float))
    return summary
