"""Figures of a sweep's correlations: measure against target (one panel per measure), τ and Ψ with their intervals,
and the ψ of each hyperparameter as a heat map (what ``flatlit analyze`` draws)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from flatlit.analysis.correlation import TargetResult, nuisance_keys
from flatlit.analysis.formatting import value_labels
from flatlit.analysis.sweep_table import finite_or_nan, numeric
from flatlit.figures import style

#: short axis labels of the targets (the figure titles give the long form)
SHORT_LABELS = {
    "gen_gap_acc": "train − test acc. (%)",
    "gen_gap_loss": "test − train loss",
    "test_acc": "test accuracy (%)",
    "train_acc": "train accuracy (%)",
    "test_loss": "test loss",
    "train_loss": "train loss",
}
TARGET_LABELS = {
    "gen_gap_acc": "generalization gap: train − test accuracy (%)",
    "gen_gap_loss": "generalization gap: test − train loss",
    "test_acc": "test accuracy (%)",
    "train_acc": "train accuracy (%)",
    "test_loss": "test loss",
    "train_loss": "train loss",
}


def _percent(target: str, y: np.ndarray) -> bool:
    fin = y[np.isfinite(y)]
    return "acc" in target and fin.size > 0 and float(np.abs(fin).max()) <= 1.0


def _signed(v: float, digits: int = 2) -> str:
    """``+0.75`` / ``−0.52`` (a typographic minus, as on the axes)."""
    return f"{v:+.{digits}f}".replace("-", "−")


def _hue(values: list[Any]) -> tuple[list[Any], dict[Any, str]] | None:
    """Sorted distinct values and one colour each (numbers by value, others by name); None when > 10 values."""
    distinct = sorted(
        {repr(v): v for v in values}.values(),
        key=lambda v: (finite_or_nan(v) if math.isfinite(finite_or_nan(v)) else math.inf, str(v)),
    )
    if len(distinct) > 10:
        return None
    return distinct, {repr(v): style.color(i) for i, v in enumerate(distinct)}


def scatter_figure(frame: pd.DataFrame, res: TargetResult, color_by: str | None, names: dict[str, str]):
    """Measure (x) vs target (y) over the rows of ``frame`` (the trials, or the points ``res`` was computed on), one
    panel per measure in the order of ``res`` (at most 4 per row), points coloured by column ``color_by``; log x
    where a measure spans more than 1.5 decades; τ, its interval and Ψ in each panel's title."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator

    target = res.target.removeprefix("final/")
    y = numeric(frame, res.target)
    pct = _percent(target, y)
    y = y * 100 if pct else y
    n = len(res.results)
    ncols = min(4, n)
    nrows = (n + ncols - 1) // ncols
    hue_vals = frame[color_by].tolist() if color_by else None
    hue = _hue(hue_vals) if hue_vals is not None else None
    with matplotlib.rc_context(style.STYLE):
        fig = Figure(figsize=(3.3 * ncols + 0.6, 2.9 * nrows + 1.0), dpi=style.DPI, layout="constrained")
        FigureCanvasAgg(fig)
        cmap, norm = None, None
        if hue_vals is not None and hue is None:  # many values: a colour map with a colour bar
            num = np.array([finite_or_nan(v) for v in hue_vals])
            cmap = matplotlib.colormaps["viridis"]
            fin = num[np.isfinite(num)]
            norm = LogNorm(fin.min(), fin.max()) if style.spans_decades(fin, 10.0) else Normalize(fin.min(), fin.max())
        last = None
        for k, (m, c, missing) in enumerate(res.results):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            x = numeric(frame, m)
            ok = np.isfinite(x) & np.isfinite(y)
            if hue is not None:
                distinct, colours = hue
                cols = [colours[repr(v)] for v in np.array(hue_vals, dtype=object)[ok]]
                ax.scatter(x[ok], y[ok], c=cols, s=22, alpha=0.85, edgecolors="white", linewidths=0.4)
            elif cmap is not None:
                last = ax.scatter(
                    x[ok], y[ok], c=np.array([finite_or_nan(v) for v in hue_vals])[ok], cmap=cmap, norm=norm, s=22
                )
            else:
                ax.scatter(x[ok], y[ok], color=style.color(0), s=22, alpha=0.85)
            ax.locator_params(axis="x", nbins=4)  # five-digit values must not run into each other in a 3-inch panel
            if style.spans_decades(x[ok], 30.0):
                style.log_axis(ax, "x")
                if style.spans_decades(x[ok], 300.0):  # 1, 2, 5 × 10ⁿ would crowd a small panel
                    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,), numticks=6))
            tau = "τ undefined" if not math.isfinite(c.tau) else f"τ = {_signed(c.tau)}"
            if math.isfinite(c.tau) and all(math.isfinite(v) for v in c.tau_ci):
                tau += f" [{_signed(c.tau_ci[0])}, {_signed(c.tau_ci[1])}]"
            psi = f", Ψ = {_signed(c.granulated.Psi)}" if math.isfinite(c.granulated.Psi) else ""
            label = m.removeprefix("measure/")
            ax.set_title(f"{label}\n{tau}{psi}", fontsize=10)
            ax.set_xlabel(label + (f" ({missing} missing)" if missing else ""), fontsize=9)
            if k % ncols == 0:
                ax.set_ylabel(SHORT_LABELS.get(target, target), fontsize=9)
            ax.tick_params(labelsize=9)
        title = f"Measures vs {TARGET_LABELS.get(target, target)}: {res.points} points"
        if hue is not None and color_by:
            distinct, colours = hue
            labels = value_labels(distinct)
            handles = [
                Line2D([], [], ls="", marker="o", ms=6, color=colours[repr(v)], label=labels[repr(v)]) for v in distinct
            ]
            widest = max(len(h.get_label()) for h in handles)
            fig.legend(
                handles=handles,
                title=f"colour: {names.get(color_by, color_by)}",
                loc="outside lower center",
                ncols=max(1, min(len(handles), int(14 * (3.3 * ncols + 0.6)) // (widest + 6))),
                fontsize=9,
                title_fontsize=9,
            )
        elif last is not None and color_by:
            cb = fig.colorbar(last, ax=fig.axes, location="bottom", shrink=0.5, aspect=40)
            cb.set_label(f"colour: {names.get(color_by, color_by)}", fontsize=9)
            cb.ax.tick_params(labelsize=9)
        fig.suptitle(title, fontsize=12)
    return fig


def tau_figure(res: TargetResult):
    """Horizontal bars per measure (best |τ| at the top): overall τ-b and granulated Ψ with 95 % bootstrap
    intervals; the vertical line is τ = 0."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = res.target.removeprefix("final/")
    items = res.results
    n = len(items)
    with matplotlib.rc_context(style.STYLE):
        fig = Figure(figsize=(8.0, 1.4 + 0.42 * n), dpi=style.DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        pos = np.arange(n)[::-1].astype(float)
        h = 0.38
        for j, (label, get, ci) in enumerate(
            (
                ("overall Kendall τ-b", lambda c: c.tau, lambda c: c.tau_ci),
                ("granulated Ψ (mean of ψ per hyperparameter)", lambda c: c.granulated.Psi, lambda c: c.Psi_ci),
            )
        ):
            vals = np.array([get(c) for _, c, _ in items], float)
            lo = np.array([ci(c)[0] for _, c, _ in items], float)
            hi = np.array([ci(c)[1] for _, c, _ in items], float)
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
            err = np.where(np.isfinite(err), err, 0.0)
            yy = pos + (h / 2 if j == 0 else -h / 2)
            ax.barh(yy, np.nan_to_num(vals), height=h, color=style.color(j), label=label, alpha=0.9)
            has_ci = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(vals)
            if has_ci.any():
                ax.errorbar(vals[has_ci], yy[has_ci], xerr=err[:, has_ci], fmt="none", ecolor="0.15", capsize=2.5, lw=1)
            for yv, v in zip(yy, vals):
                if not math.isfinite(v):
                    ax.text(0.02, yv, "undefined", va="center", ha="left", fontsize=9, color="0.35")
        ax.axvline(0, color="0.3", lw=0.9)
        ax.set_yticks(pos, [m.removeprefix("measure/") for m, _, _ in items])
        ax.set_xlim(-1.05, 1.05)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(f"Kendall rank correlation with {target} ({TARGET_LABELS.get(target, target).split(' (')[0]})")
        ax.set_title(f"Kendall τ of each measure with {target} (95 % bootstrap intervals; {res.points} points)")
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    return fig


def psi_figure(res: TargetResult, names: dict[str, str]):
    """Heat map of ψ_i (rows: measures in the order of ``res``; columns: hyperparameters, then Ψ and τ), each cell
    annotated with its value and, under it, the number of groups ψ_i averages over."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = res.target.removeprefix("final/")
    most = {h: max(c.granulated.groups.get(h, 0) for _, c, _ in res.results) for h in res.hparams}
    cols = [f"{names[h]}\n({most[h]} groups)" for h in res.hparams] + [
        "Ψ\n(mean ψ" + (", seeds out)" if nuisance_keys(res.hparams) else ")"),
        "τ\n(all points)",
    ]
    mat = np.array(
        [
            [c.granulated.psi.get(h, math.nan) for h in res.hparams] + [c.granulated.Psi, c.tau]
            for _, c, _ in res.results
        ],
        float,
    )
    n, k = mat.shape
    with matplotlib.rc_context(style.STYLE):
        width = max(1.1, 0.075 * max(len(names[h]) for h in res.hparams) if res.hparams else 1.1)
        fig = Figure(figsize=(2.8 + width * k + 1.0, 1.8 + 0.42 * n), dpi=style.DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(np.ma.masked_invalid(mat), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(np.arange(k), cols)
        ax.set_yticks(np.arange(n), [m.removeprefix("measure/") for m, _, _ in res.results])
        ax.grid(False)
        ax.axvline(len(res.hparams) - 0.5, color="0.2", lw=1.2)
        for i in range(n):
            for j in range(k):
                v = mat[i, j]
                text = "—" if not math.isfinite(v) else _signed(v)
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if abs(v) > 0.6 else "0.1")
        cb = fig.colorbar(im, ax=ax, shrink=0.8)
        cb.set_label("Kendall τ")
        ax.set_title(
            f"Granulated τ with {target}: ψ = mean τ over the groups of points\nwhere only that hyperparameter changes"
        )
        ax.set_xlabel("hyperparameter varied (most groups any measure averages over)")
    return fig
