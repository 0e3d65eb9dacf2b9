"""``flatlit sweep``: a grid and/or random search over any ``flatlit fit`` key, one normal run per trial.

    flatlit sweep --config experiments/sweeps/fmnist_mlp_width.yaml --workers 2
    flatlit sweep --config SWEEP.yaml --dry_run                 # the trials and the first command, nothing run
    flatlit sweep --config SWEEP.yaml --executor slurm          # one Slurm job per trial (submitit job array)

The driver is :func:`flatlit.sweeps.driver.run_sweep`. Every trial is ``python -m flatlit.cli fit --config BASE
--KEY=VALUE ...`` with its own run directory ``<output>/trials/trial-NNNN`` (config.yaml, history.csv, TensorBoard
events, checkpoints/, trial.log, final_metrics.json), then ``flatlit measure`` on its final checkpoint when the sweep
file lists measures. The sweep adds a GeneralizationTargets callback (final train/test metrics over the full splits in
eval mode; optional stopping rule) and, when the base config has none, a ModelCheckpoint with ``save_last``. Rerunning
the same command skips finished trials, continues interrupted ones from their checkpoint and retries failed ones (up to
``--retries`` times per run). Attempts are recorded in an Optuna study (``study.log``); finished trials are rows of
``results.csv``. Bad input is refused before any trial starts: one ``flatlit: error: ...`` line naming the key (exit
code 2). A sweep with failed trials ends with exit code 1. docs/sweeps.md has the file format and the results' columns.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flatlit.sweeps.driver import SweepOptions, run_sweep
from flatlit.utils.errors import FlatlitError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatlit sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the sweep file (YAML; see docs/sweeps.md)")
    p.add_argument("--workers", type=int, default=1, help="trials run at the same time (default 1)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local", help="local processes or submitit")
    p.add_argument("--retries", type=int, default=2, help="times a failed trial is tried again in this run")
    p.add_argument("--output", default=None, help="sweep directory (default: the file's output:)")
    p.add_argument("--dry_run", action="store_true", help="check the sweep and list its trials; run nothing")
    return p


def main(args: list[str] | None = None) -> dict[str, Any] | None:
    """Entry point of ``flatlit sweep``; returns the summary (tests call it directly)."""
    opts = build_parser().parse_args(args)
    try:
        summary = run_sweep(SweepOptions(**vars(opts)))
    except FlatlitError as err:
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None
    if summary is not None and summary.get("failed"):
        raise SystemExit(1)
    return summary
