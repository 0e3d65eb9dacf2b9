"""The one style of flatlit's figures: sizes, dpi, fonts, the colour of run i, log axes, deterministic PNGs.

Every figure is a matplotlib :class:`~matplotlib.figure.Figure` on an Agg canvas (no pyplot state, safe in any
process), built under :data:`STYLE`, with one colour per run, labelled axes with units, a legend and a title, and
saved at a fixed size and dpi without a timestamp, so the same inputs give the same PNG bytes.
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

DPI = 120
#: figure sizes in inches (the PNG is size × DPI pixels)
WIDE = (9.6, 4.0)
SINGLE = (7.2, 4.2)
LEGEND_RIGHT = (9.0, 4.2)  # a single plot with its legend outside, on the right
#: matplotlib's default cycle (C0, C1, ...), so run i has the same colour here and in the landscape overlays
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.titlesize": 12,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.framealpha": 0.85,
    "svg.hashsalt": "flatlit",
}
#: smallest font size (pt) of any text in a figure; the tests check it
MIN_FONT_PT = 9.0


def color(i: int) -> str:
    """The colour of the i-th run."""
    return COLORS[i % len(COLORS)]


def new_figure(size: tuple[float, float] = SINGLE, ncols: int = 1) -> tuple[Figure, list]:
    """A figure with ``ncols`` axes side by side, under flatlit's style (constrained layout)."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=size, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save(fig: Figure, path: str) -> str:
    """Write ``fig`` as a PNG of exactly figsize × DPI pixels, without metadata that would change between runs (the
    folder is created when missing)."""
    if isinstance(path, (str, os.PathLike)):  # (a file object, e.g. a BytesIO for TensorBoard, is written as it is)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with matplotlib.rc_context(STYLE):
        fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return path


SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def lam(i: int) -> str:
    """``λ₁``, ``λ₂``, ... (Unicode subscripts render in every font, unlike ``λ_1``)."""
    return "λ" + str(i).translate(SUBSCRIPTS)


def spans_decades(values: np.ndarray, ratio: float = 30.0) -> bool:
    """Whether positive finite ``values`` span more than ``ratio`` (then a log axis reads better)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return v.size > 1 and bool((v > 0).all()) and v.max() / v.min() > ratio


def log_axis(ax, axis: str = "y") -> None:
    """A log axis labelled at 1, 2, 5 × 10ⁿ in plain numbers (readable values, not only powers of ten)."""
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def legend(ax, **kwargs) -> None:
    """``ax.legend(**kwargs)`` under :data:`STYLE` (its font sizes)."""
    with matplotlib.rc_context(STYLE):
        ax.legend(**kwargs)
