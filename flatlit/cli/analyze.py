"""``flatlit analyze``: which measure ranks the generalization gap of a sweep's trials best.

    flatlit analyze runs/sweeps/fashion_mnist_small
    flatlit analyze SWEEP_DIR --target gen_gap_acc test_acc --bootstrap 1000 --seed 0 --output SWEEP_DIR/analysis
    flatlit analyze SWEEP_DIR --average seed_everything --color_by lr     # LPF-SGD: average the seeds first

The work is :func:`flatlit.analysis.sweep_report.analyze`: it reads every finished trial of a sweep and writes to
``--output`` (default ``SWEEP_DIR/analysis``) ``trials.csv``/``.md``, ``correlations.csv``/``.md`` (Kendall's τ-b,
Jiang et al.'s granulated τ and Spearman's ρ per measure and target, with bootstrap intervals), the figures
``scatter_<target>.png``, ``tau_<target>.png``, ``psi_<target>.png`` and ``summary.json``. The bootstrap reports
its progress on stderr: a bar with its ETA on a terminal, one line per measure otherwise. Bad input is one
``flatlit: error: ...`` line (exit code 2). In Python, the same tables are DataFrames:
:func:`flatlit.analysis.sweep_frame` and :func:`flatlit.analysis.correlation_table`.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from flatlit.analysis.sweep_report import analyze
from flatlit.analysis.sweep_table import METRICS
from flatlit.utils.errors import FlatlitError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every flatlit error
        sys.stderr.write(f"flatlit: error: {message} (see `flatlit analyze --help`)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flatlit analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep's output folder (or a tree of run directories)")
    p.add_argument(
        "--target",
        nargs="+",
        default=["gen_gap_acc"],
        help=f"final metric(s) to rank: {', '.join(METRICS)} or another final/* column (default gen_gap_acc)",
    )
    p.add_argument("--output", default=None, help="output folder (default SWEEP_DIR/analysis)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--measures", nargs="+", default=None, help="measure columns to analyse (default: all)")
    p.add_argument("--color_by", default=None, help="hyperparameter colouring the scatter plots (key or short name)")
    p.add_argument(
        "--converged_only",
        action="store_true",
        help="leave out trials that did not meet the sweep's stopping rule (converged false in final_metrics.json)",
    )
    p.add_argument(
        "--average",
        nargs="+",
        default=None,
        metavar="HPARAM",
        help="average trials over these hyperparameters first (e.g. the seed, as LPF-SGD does)",
    )
    return p


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"{summary['trials']} trials ({summary['source']}), {len(summary['measures'])} measures")
    for target, info in summary["targets"].items():
        print(f"\n{target}:")
        print(f"  {'measure':30s} {'n':>4s} {'τ':>7s} {'95 % CI':>17s} {'Ψ':>7s}")
        for r in info["ranking"][:10]:
            ci = f"[{r['tau_lo']:+.2f}, {r['tau_hi']:+.2f}]" if math.isfinite(r["tau_lo"]) else ""
            print(f"  {r['measure'][:30]:30s} {r['n']:4d} {r['tau']:+7.3f} {ci:>17s} {r['Psi']:+7.3f}")
        if len(info["ranking"]) > 10:
            print(f"  ... ({len(info['ranking']) - 10} more in correlations.md)")
        if info["best"]:
            print(f"  best: {info['best']} (τ = {info['tau']:+.3f})")
    for n in summary["notes"]:
        print(f"note: {n}")
    print(f"written: {summary['output']}")


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``flatlit analyze``; returns the summary (tests call it directly)."""
    opts = build_parser().parse_args(args)
    try:
        summary = analyze(
            opts.sweep_dir,
            opts.target,
            opts.output,
            opts.bootstrap,
            opts.seed,
            opts.measures,
            opts.color_by,
            opts.average,
            opts.converged_only,
            progress=True,
        )
    except FlatlitError as err:
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None
    _print_summary(summary)
    return summary
