"""``flatlit report``: one page of figures and tables for one or several runs.

    flatlit report runs/demo/sgd/version_0
    flatlit report runs/demo/sgd/version_0 runs/demo/sam/version_0 --output runs/demo/report
    flatlit report RUN_A RUN_B --labels "SGD" "SAM" --format markdown

The work is :func:`flatlit.analysis.report.report`: it reads what a run directory holds (``history.csv``,
``eigenvalues.npz``, ``spectrum_step{N}.npz``, ``config.yaml``, ``checkpoints/measures.json``,
``checkpoints/robustness.json``, ``landscapes/*.npz``) and writes PNG figures plus one page: ``report.html`` with the
figures embedded (base64), or ``report.md`` next to them. Several runs are overlaid, one colour per run, and their
measures are compared side by side. A missing piece is skipped with a note on the page; a RUN_DIR that is not a run
directory is one ``flatlit: error: ...`` line (exit code 2). Figures and page are deterministic: the same inputs give
the same bytes.
"""

from __future__ import annotations

import argparse
import sys

from flatlit.analysis.report import report
from flatlit.utils.errors import FlatlitError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatlit report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<experiment>/version_N)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: from each config)")
    p.add_argument("--output", default=None, help="output folder (default: RUN_DIR/report, or <common parent>/report)")
    p.add_argument("--format", choices=("html", "markdown"), default="html", help="page format")
    p.add_argument("--title", default=None, help="page title")
    return p


def main(args: list[str] | None = None) -> str:
    """Entry point of ``flatlit report``; prints and returns the page's path (tests call it directly)."""
    opts = build_parser().parse_args(args)
    try:
        path = report(opts.run_dirs, opts.labels, opts.output, opts.format, opts.title)
    except FlatlitError as err:
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None
    print(f"report: {path}")
    return path
