"""Figures of loss-landscape results: lines, contours, 3-D surfaces and overlays (Agg canvas, no pyplot state).

Every function takes a results ``.npz`` path or a :class:`~flatlit.landscape.surface.LandscapeResult` and an output
PNG path, and returns the PNG path(s) written. Lines: training loss on a log axis (linear when a value is ≤ 0) and
accuracy on a twin axis, as in Li et al. 2018 (arXiv 1712.09913) Fig. 2/3 and SmoothOut's ``visualize_sharpness.py``
(SPEC §1.4); eigen lines add the quadratic model L₀ + ½λα². Planes: filled contours with contour lines, a colour bar
and the origin marked (Li et al. Fig. 5), and a 3-D surface.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from flatlit.figures.style import DPI
from flatlit.landscape.surface import LandscapeResult, as_result


def _labels(r: LandscapeResult) -> tuple[str, str]:
    labels = r.meta.get("labels") or {}
    if r.meta.get("mode") == "interpolate" or r.meta.get("direction_kind") == "interpolate":
        default = "interpolation α (0 = A, 1 = B)"
    elif r.meta.get("direction_kind") == "eigen":
        default = "α (unit Hessian eigenvector)"
    else:
        default = (
            "α (filter-normalised direction)" if (r.meta.get("direction_meta") or {}).get("norm") == "filter" else "α"
        )
    return labels.get("alpha", default), labels.get("beta", default.replace("α", "β"))


def _save(fig: Figure, out_png: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = f"{out_png}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    os.replace(tmp, out_png)
    return out_png


def _title(r: LandscapeResult) -> str:
    mode = r.meta.get("mode", "line" if r.ndim == 1 else "plane")
    parts = [str(mode), f"bn={r.meta.get('bn', '?')}", f"n={r.meta.get('num_samples', '?')}"]
    if not r.complete:
        parts.append(f"{int(r.done.sum())}/{r.done.size} points")
    return ", ".join(parts)


def _log_ok(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return finite.size > 0 and bool((finite > 0).all())


def _log_axis(ax, values: np.ndarray) -> None:
    """A log y axis with plain tick labels (1.9, not 1.9 × 10⁰); minor ticks labelled within one decade only."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    finite = values[np.isfinite(values)]
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if finite.max() / finite.min() < 10 else NullFormatter())


def line_figure(result: LandscapeResult | str, title: str | None = None) -> Figure:
    """The figure of :func:`plot_line` (not saved)."""
    r = as_result(result)
    if r.ndim != 1:
        raise ValueError("plot_line needs a 1-D result (a line); use plot_contour for a plane")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    xlabel, _ = _labels(r)
    (h_loss,) = ax.plot(r.alphas, r.loss, "-o", ms=3, color="C0", label="training loss")
    handles = [h_loss]
    lams = r.meta.get("direction_meta", {}).get("eigenvalues")
    sel = r.meta.get("direction_meta", {}).get("selected") or [0]
    i0 = int(np.argmin(np.abs(r.alphas)))
    at_origin = abs(r.alphas[i0]) <= 1e-9 * float(np.abs(r.alphas).max())
    if r.meta.get("direction_kind") == "eigen" and lams and at_origin and sel[0] < len(lams):
        lam = lams[sel[0]]
        l0 = float(r.loss[i0])
        (h_q,) = ax.plot(r.alphas, l0 + 0.5 * lam * r.alphas**2, "--", color="C2", label=f"L₀ + ½λα², λ = {lam:.3g}")
        handles.append(h_q)
    if _log_ok(r.loss):
        _log_axis(ax, r.loss)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss" + (" (log)" if ax.get_yscale() == "log" else ""))
    if np.isfinite(r.acc).any():
        ax2 = ax.twinx()
        (h_acc,) = ax2.plot(r.alphas, r.acc, "-s", ms=3, color="C1", label="training accuracy")
        ax2.set_ylabel("training accuracy")
        ax2.set_ylim(-0.02, 1.02)
        handles.append(h_acc)
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    if r.meta.get("mode") == "interpolate":
        ax.axvline(1.0, color="0.6", lw=0.8, ls=":")
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper center", fontsize=9)
    ax.set_title(title or _title(r), fontsize=11)
    return fig


def plot_line(result: LandscapeResult | str, out_png: str, title: str | None = None) -> str:
    """A 1-D result: loss (left, log axis when positive) and accuracy (right, twin axis) against α; eigen lines add
    L₀ + ½λα²."""
    return _save(line_figure(result, title), out_png)


def _grid(r: LandscapeResult) -> tuple[np.ndarray, np.ndarray, np.ma.MaskedArray]:
    X, Y = np.meshgrid(r.alphas, r.betas, indexing="ij")
    return X, Y, np.ma.masked_invalid(r.loss)


def _levels(z: np.ma.MaskedArray, num: int = 30) -> np.ndarray:
    lo, hi = float(z.min()), float(z.max())
    if not np.isfinite(lo) or hi <= lo:
        return np.linspace(lo - 0.5, lo + 0.5, 3)
    return np.linspace(lo, hi, num)


def contour_figure(result: LandscapeResult | str, title: str | None = None) -> Figure:
    """The figure of :func:`plot_contour` (not saved)."""
    r = as_result(result)
    if r.ndim != 2:
        raise ValueError("plot_contour needs a 2-D result (a plane)")
    X, Y, Z = _grid(r)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    if Z.count() >= 4:
        levels = _levels(Z)
        filled = ax.contourf(X, Y, Z, levels=levels, cmap="viridis")
        ax.contour(X, Y, Z, levels=levels[::3], colors="k", linewidths=0.5)
        fig.colorbar(filled, ax=ax, label="training loss")
    ax.plot([0.0], [0.0], marker="*", color="red", ms=10, ls="none", label="origin (the checkpoint)")
    xl, yl = _labels(r)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.legend(loc="upper right", fontsize=9)
    ax.set_title(title or _title(r), fontsize=11)
    return fig


def plot_contour(result: LandscapeResult | str, out_png: str, title: str | None = None) -> str:
    """A 2-D result: filled contours of the loss, contour lines, a colour bar "training loss", the origin marked."""
    return _save(contour_figure(result, title), out_png)


def surface_figure(result: LandscapeResult | str, title: str | None = None) -> Figure:
    """The figure of :func:`plot_surface3d` (not saved)."""
    r = as_result(result)
    if r.ndim != 2:
        raise ValueError("plot_surface3d needs a 2-D result (a plane)")
    X, Y, Z = _grid(r)
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(X, Y, Z.filled(np.nan), cmap="viridis", linewidth=0, antialiased=True)
    xl, yl = _labels(r)
    ax.set_xlabel(xl, fontsize=10)
    ax.set_ylabel(yl, fontsize=10)
    ax.set_zlabel("training loss", fontsize=10)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(5))
    ax.set_title(title or _title(r), fontsize=11)
    return fig


def plot_surface3d(result: LandscapeResult | str, out_png: str, title: str | None = None) -> str:
    """A 2-D result as a 3-D surface of the loss."""
    return _save(surface_figure(result, title), out_png)


def lines_figure(paths: Sequence[LandscapeResult | str], labels: Sequence[str] | None = None) -> Figure:
    """The figure of :func:`plot_lines` (not saved)."""
    results = [as_result(p) for p in paths]
    if not results:
        raise ValueError("plot_lines needs at least one result")
    if labels is None:
        labels = [os.path.basename(p) if isinstance(p, str) else f"line {i + 1}" for i, p in enumerate(paths)]
    if len(labels) != len(results):
        raise ValueError(f"{len(results)} results but {len(labels)} labels")
    for r in results:
        if r.ndim != 1:
            raise ValueError("plot_lines needs 1-D results (lines)")
    show_acc = any(np.isfinite(r.acc).any() for r in results)
    fig = Figure(figsize=(6, 6 if show_acc else 4))
    axes = fig.subplots(2 if show_acc else 1, 1, sharex=True, squeeze=False)[:, 0]
    for i, (r, lab) in enumerate(zip(results, labels)):
        axes[0].plot(r.alphas, r.loss, "-", color=f"C{i}", label=lab)
        if show_acc:
            axes[1].plot(r.alphas, r.acc, "-", color=f"C{i}", label=lab)
    if all(_log_ok(r.loss) for r in results):
        _log_axis(axes[0], np.concatenate([r.loss for r in results]))
    axes[0].set_ylabel("training loss")
    if show_acc:  # the accuracies sit near the top of their panel: the legend goes below them, off the curves
        axes[1].legend(fontsize=9, loc="lower center", ncols=min(len(results), 3))
    else:
        axes[0].legend(fontsize=9)
    kind = "interpolation" if results[0].meta.get("mode") == "interpolate" else "1-D loss landscape"
    axes[0].set_title(f"{kind} of each solution ({_title(results[0])})", fontsize=11)
    if show_acc:
        axes[1].set_ylabel("training accuracy")
        axes[1].set_ylim(-0.02, 1.02)
    axes[-1].set_xlabel(_labels(results[0])[0])
    return fig


def plot_lines(paths: Sequence[LandscapeResult | str], labels: Sequence[str] | None, out_png: str) -> str:
    """Several 1-D results on one figure (e.g. SGD vs SAM): loss on a log axis (top) and accuracy (bottom); labels
    None uses the file names."""
    return _save(lines_figure(paths, labels), out_png)


def plot_landscape_file(npz_path: str, out_png: str) -> list[str]:
    """The figure(s) of a results file: a line plot for a 1-D result; for a plane, the contour plot at
    ``out_png`` and the 3-D surface at ``<out_png stem>_3d.png``. Returns the PNG paths written."""
    r = LandscapeResult.load(npz_path)
    if r.ndim == 1:
        return [plot_line(r, out_png)]
    stem, ext = os.path.splitext(out_png)
    return [plot_contour(r, out_png), plot_surface3d(r, f"{stem}_3d{ext or '.png'}")]
