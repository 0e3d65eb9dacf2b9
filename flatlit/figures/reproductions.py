"""The figures of ``experiments/reproductions/``: one function per claim, in flatlit's one style.

Each takes plain arrays (what the reproduction's analysis read from its runs) and returns a matplotlib Figure on an
Agg canvas; :func:`flatlit.figures.style.save` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from flatlit.figures.style import DPI, STYLE, WIDE, color, new_figure


def eos_figure(series: Sequence[Mapping[str, np.ndarray | float]]) -> Figure:
    """Cohen et al. 2021's Fig. 1: training loss (left) and the top Hessian eigenvalue λ₁ (right) against the
    gradient-descent step, one colour per step size η, with the stability threshold 2/η dashed in the same colour.

    Each entry of ``series``: ``lr`` (η), ``loss_steps``, ``loss``, ``eig_steps``, ``lambda_1``."""
    fig, (ax_loss, ax_eig) = new_figure(WIDE, ncols=2)
    for i, s in enumerate(sorted(series, key=lambda s: -float(s["lr"]))):
        lr = float(s["lr"])
        c = color(i)
        ax_loss.plot(s["loss_steps"], s["loss"], color=c, lw=1.0, label=f"η = {lr:.4g}")
        ax_eig.plot(s["eig_steps"], s["lambda_1"], color=c, lw=1.2)  # colour = η, as in the loss panel
        ax_eig.axhline(2.0 / lr, color=c, ls="--", lw=1.0, label=f"2/η = {2.0 / lr:.3g}")
    ax_loss.set(xlabel="gradient-descent step", ylabel="training loss (square loss)", title="Training loss")
    ax_loss.set_yscale("log")
    ax_eig.set(xlabel="gradient-descent step", ylabel="λ₁ of the training-loss Hessian", title="Sharpness λ₁")
    ax_loss.legend(loc="upper right")
    ax_eig.legend(loc="lower right", title="dashed: stability threshold")
    fig.suptitle("Full-batch GD reaches the edge of stability: λ₁ rises to 2/η and hovers there")
    return fig


def groups_figure(
    points: Mapping[str, Mapping[str, Sequence[float]]],
    intervals: Mapping[str, Mapping[str, Mapping[str, float]]],
    panels: Sequence[tuple[str, str]],
    group_label: str,
    title: str,
) -> Figure:
    """One panel per (column, axis label) of ``panels``: each group's seeds as dots and its mean with the 95 %
    interval as a bar, groups along x in the order of ``points`` (``points[group][column]`` = per-seed values;
    ``intervals[group][column]`` = :func:`flatlit.analysis.verdict.mean_interval`)."""
    fig, axes = new_figure((3.3 * len(panels), 3.8), ncols=len(panels))
    groups = list(points)
    for ax, (col, label) in zip(axes, panels):
        for i, g in enumerate(groups):
            ys = list(points[g].get(col, []))
            ax.scatter([i] * len(ys), ys, color=color(i), s=18, alpha=0.7, zorder=3)
            iv = intervals.get(g, {}).get(col)
            if iv is not None:
                err = [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]]
                ax.errorbar([i + 0.15], [iv["mean"]], yerr=err, fmt="s", color=color(i), capsize=4, ms=5, zorder=4)
        ax.set_xticks(
            range(len(groups)),
            groups,
            rotation=25 if len(groups) > 3 else 0,
            ha="right" if len(groups) > 3 else "center",
        )
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set(xlabel=group_label, ylabel=label)
    fig.suptitle(title + "  (dots: seeds; squares: mean with 95 % t-interval)")
    return fig


def rescaling_figure(ratios: Mapping[str, Mapping[str, float]], labels: Mapping[str, str]) -> Figure:
    """Each measure at the rescaled network (hidden layer ×α, next layer ×1/α: the same function) over its value at
    α = 1, against α on log axes; a scale-invariant measure is the flat line at 1."""
    fig, (ax,) = new_figure()
    for i, (name, rs) in enumerate(ratios.items()):
        alphas = sorted(float(a) for a in rs)
        ax.plot(alphas, [rs[str(a)] for a in alphas], "o-", color=color(i), label=labels.get(name, name))
    ax.axhline(1.0, color="0.4", ls=":", lw=1.0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(
        xlabel="rescaling α (hidden layer ×α, output layer ×1/α)",
        ylabel="value / value at α = 1",
        title="Which sharpness measures see a function-preserving rescaling",
    )
    ax.legend()
    return fig


def series_figure(
    series: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    labels: Mapping[str, str],
    x_label: str,
    title: str,
    ncols: int = 3,
    xlog: bool = True,
) -> Figure:
    """A grid of panels, one per column of ``series`` (``series[column][line] = (xs, ys)``), each with one coloured
    line per ``line`` (the same colour in every panel), x on a log scale (``xlog``) or linear."""
    columns = list(series)
    rows = (len(columns) + ncols - 1) // ncols
    fig = Figure(figsize=(3.6 * ncols, 3.0 * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    with matplotlib.rc_context(STYLE):
        lines = sorted({name for c in columns for name in series[c]})
        for i, col in enumerate(columns):
            ax = fig.add_subplot(rows, ncols, i + 1)
            for j, name in enumerate(lines):
                if name in series[col]:
                    xs, ys = series[col][name]
                    ax.plot(xs, ys, "o-", color=color(j), label=name, ms=4)
            xs_all = sorted({float(x) for name in series[col] for x in series[col][name][0]})
            if xlog:
                ax.set_xscale("log")
            if xlog and 0 < len(xs_all) <= 8 and xs_all[0] > 0:  # few x values (sizes): label exactly those
                ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(xlabel=x_label, ylabel=labels.get(col, col), title=labels.get(col, col))
            if i == 0:
                handles, names = ax.get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=len(lines))  # below the panels, off the curves
        fig.suptitle(title)
    return fig


def ranking_figure(table) -> Figure:
    """Kendall τ (bars, 95 % bootstrap interval) and granulated Ψ (diamonds) of every measure with the gap, one row
    per measure sorted by τ; ``table``: the DataFrame of :func:`flatlit.analysis.correlation.correlation_table`."""
    rows = table.sort_values("tau")
    fig, (ax,) = new_figure((8.0, 0.26 * len(rows) + 1.6))
    y = np.arange(len(rows))
    err = [rows["tau"] - rows["tau_lo"], rows["tau_hi"] - rows["tau"]]
    ax.barh(y, rows["tau"], xerr=err, color=color(0), alpha=0.75, capsize=2, label="overall τ (95 % bootstrap)")
    ax.scatter(rows["Psi"], y, marker="D", color=color(1), s=18, zorder=3, label="granulated Ψ")
    ax.set_yticks(y, rows["measure"])
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set(xlabel="Kendall correlation with the generalization gap (train − test accuracy)", ylabel="measure")
    ax.set_title("Which measures rank the gap of the sweep")
    ax.legend(loc="lower right")
    return fig
