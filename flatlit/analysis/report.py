"""One report page for one or several runs: its sections in order, written as HTML or Markdown (``flatlit report``).

:func:`report` reads what a run directory holds (``history.csv``, ``eigenvalues.npz``, ``spectrum_step{N}.npz``,
``config.yaml``, ``checkpoints/measures.json``, ``checkpoints/robustness.json``, ``landscapes/*.npz``) and writes PNG
figures plus one page: ``report.html`` with the figures embedded (base64), or ``report.md`` next to them. Several runs
are overlaid, one colour per run, and their measures are compared side by side. A missing piece is skipped with a note
on the page; a RUN_DIR that is not a run directory raises one :class:`~flatlit.utils.errors.ConfigError`. Figures and
page are deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from flatlit.analysis.checkpoint_sections import section_landscapes, section_measures, section_robustness
from flatlit.analysis.render import Page, render_html, render_markdown
from flatlit.analysis.report_sections import (
    section_curves,
    section_eigen,
    section_runs,
    section_spectrum,
    section_trace,
    section_training_measures,
)
from flatlit.analysis.run_files import Run, load_run
from flatlit.utils.errors import ConfigError

#: figure files this command writes (``landscape_*.png`` besides); old copies are removed before a new report
FIGURES = (
    "loss_accuracy.png",
    "eigenvalues.png",
    "hessian_trace.png",
    "spectrum.png",
    "measures_training.png",
    "robustness_weight_noise.png",
    "robustness_adversarial.png",
)


def _unique_labels(runs: list[Run]) -> None:
    """Make labels unique by appending the distinguishing part of the run directories."""
    labels = [r.label for r in runs]
    if len(set(labels)) == len(labels):
        return
    common = os.path.commonpath([os.path.abspath(r.path) for r in runs])
    for r in runs:
        if labels.count(r.label) > 1:
            rel = os.path.relpath(os.path.abspath(r.path), common)
            r.label = f"{r.label} [{rel if rel != '.' else os.path.basename(r.path)}]"


def default_output(runs: list[Run]) -> str:
    """``RUN/report`` for one run; ``<common parent>/report`` for several."""
    if len(runs) == 1:
        return os.path.join(runs[0].path, "report")
    return os.path.join(os.path.commonpath([os.path.abspath(r.path) for r in runs]), "report")


def report(
    run_dirs: Sequence[str],
    labels: Sequence[str] | None = None,
    output: str | None = None,
    fmt_: str = "html",
    title: str | None = None,
) -> str:
    """Write the report of ``run_dirs`` and return the page's path."""
    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"--labels: got {len(labels)} label(s) for {len(run_dirs)} RUN_DIR(s); give one per run.")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(run_dirs)]
    if labels is None:
        _unique_labels(runs)
    outdir = output or default_output(runs)
    os.makedirs(outdir, exist_ok=True)
    for old in [*FIGURES, *(os.path.basename(p) for p in glob.glob(os.path.join(outdir, "landscape_*.png")))]:
        if os.path.isfile(os.path.join(outdir, old)):
            os.remove(os.path.join(outdir, old))
    page = Page(outdir)
    section_runs(page, runs)
    section_curves(page, runs)
    section_eigen(page, runs)
    section_trace(page, runs)
    section_spectrum(page, runs)
    section_training_measures(page, runs)
    section_measures(page, runs)
    section_robustness(page, runs)
    section_landscapes(page, runs)
    title = title or "flatlit report: " + " vs ".join(r.label for r in runs)
    if fmt_ == "html":
        path, text = os.path.join(outdir, "report.html"), render_html(page, title)
    else:
        path, text = os.path.join(outdir, "report.md"), render_markdown(page, title)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
