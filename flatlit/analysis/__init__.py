"""Reading runs and sweeps into tables, and turning them into reports (what ``flatlit report`` and ``analyze`` run).

- runs: :mod:`~flatlit.analysis.run_files` (what a run directory holds), :mod:`~flatlit.analysis.stability` (the
  optimizer's label and edge-of-stability threshold);
- sweeps: :mod:`~flatlit.analysis.sweep_table` (the trials as one pandas DataFrame), :mod:`~flatlit.analysis.stats`
  (rank correlations, granulated τ, bootstrap), :mod:`~flatlit.analysis.correlation` (every measure against a
  target, as a DataFrame), :mod:`~flatlit.analysis.formatting` (names and values for people);
- reports: :mod:`~flatlit.analysis.report_sections` and :mod:`~flatlit.analysis.checkpoint_sections` (the page's
  sections), :mod:`~flatlit.analysis.render` (HTML and Markdown), :mod:`~flatlit.analysis.report` (one run report),
  :mod:`~flatlit.analysis.sweep_report` (a sweep's analysis folder).

In a notebook::

    from flatlit.analysis import correlation_table, sweep_frame

    trials = sweep_frame("runs/sweeps/fashion_mnist_small")  # one row per trial, the columns of trials.csv
    taus = correlation_table(trials, "gen_gap_acc", bootstrap=1000)  # the rows of correlations.csv

The figures they draw are in :mod:`flatlit.figures`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: the sweep API, imported on first use (pandas and SciPy stay out of ``import flatlit.analysis.report``)
_LAZY = {
    "load_sweep": "flatlit.analysis.sweep_table",
    "sweep_frame": "flatlit.analysis.sweep_table",
    "Sweep": "flatlit.analysis.sweep_table",
    "correlation_table": "flatlit.analysis.correlation",
    "analyze": "flatlit.analysis.sweep_report",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
