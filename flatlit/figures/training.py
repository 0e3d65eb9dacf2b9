"""Figures of a run's training: loss and accuracy curves, Hessian eigenvalues with the edge of stability, the
Hessian trace, the spectral density and the measures logged during training (pure functions over arrays, drawn by
the report).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from flatlit.figures.style import (
    DPI,
    LEGEND_RIGHT,
    SINGLE,
    STYLE,
    WIDE,
    color,
    lam,
    legend,
    log_axis,
    new_figure,
    spans_decades,
)


# ---- training curves --------------------------------------------------------------------------------------------
@dataclass
class Curves:
    """Per-epoch training and validation curves of one run (accuracy as a fraction; NaN where missing)."""

    label: str
    epoch: np.ndarray
    train_loss: np.ndarray
    val_loss: np.ndarray
    train_acc: np.ndarray
    val_acc: np.ndarray


def curves_figure(runs: Sequence[Curves], loss_label: str) -> Figure:
    """Loss (left) and accuracy (right) per epoch: one colour per run, solid = train, dashed = validation."""
    fig, (ax_l, ax_a) = new_figure(WIDE, 2)
    with matplotlib.rc_context(STYLE):
        losses = []
        for i, r in enumerate(runs):
            c = color(i)
            for ax, ys, scale in ((ax_l, (r.train_loss, r.val_loss), 1.0), (ax_a, (r.train_acc, r.val_acc), 100.0)):
                for y, ls in zip(ys, ("-", "--")):
                    ok = np.isfinite(y)
                    if ok.any():
                        ax.plot(r.epoch[ok], y[ok] * scale, ls, color=c, marker="o", ms=3.5, lw=1.6)
            losses += [r.train_loss, r.val_loss]
        if spans_decades(np.concatenate(losses) if losses else np.array([]), 10.0):
            log_axis(ax_l)
        ax_l.set(xlabel="epoch", ylabel=loss_label, title="Loss")
        ax_a.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
        for ax in (ax_l, ax_a):
            ax.xaxis.get_major_locator().set_params(integer=True)
        handles = [Line2D([], [], color=color(i), lw=2, label=r.label) for i, r in enumerate(runs)]
        handles += [
            Line2D([], [], color="0.3", ls="-", label="train"),
            Line2D([], [], color="0.3", ls="--", label="validation"),
        ]
        legend(ax_a, handles=handles, loc="lower right")
        fig.suptitle("Training and validation curves")
    return fig


# ---- Hessian eigenvalues and the edge of stability --------------------------------------------------------------
@dataclass
class Threshold:
    """An edge-of-stability threshold ``factor/η``: a constant, or a step curve over training steps."""

    formula: str  # e.g. "(2+2β)/η"
    steps: np.ndarray  # step-curve abscissae (steps-post); one point for a constant threshold
    values: np.ndarray

    @property
    def constant(self) -> bool:
        return len(np.unique(self.values)) == 1


@dataclass
class Eigen:
    """Top-k Hessian eigenvalues of one run over training steps (``eigenvalues``: steps × k, descending)."""

    label: str
    steps: np.ndarray
    eigenvalues: np.ndarray
    threshold: Threshold | None = None


def eigen_figure(runs: Sequence[Eigen]) -> Figure:
    """λ_1 (thick) and λ_2..k (thin) per run over training steps, with the edge-of-stability threshold (dashed)."""
    fig, (ax,) = new_figure(LEGEND_RIGHT)
    with matplotlib.rc_context(STYLE):
        many = len(runs) > 1
        handles: list = []
        ks = [r.eigenvalues.shape[1] for r in runs]
        all_lam = np.concatenate([r.eigenvalues.ravel() for r in runs])
        for i, r in enumerate(runs):
            c = color(i)
            for j in range(r.eigenvalues.shape[1]):
                lw, alpha = (2.0, 1.0) if j == 0 else (1.0, max(0.35, 0.75 - 0.15 * j))
                lab = (f"{r.label}: {lam(1)}" if many else lam(1)) if j == 0 else (None if many else lam(j + 1))
                (h,) = ax.plot(
                    r.steps,
                    r.eigenvalues[:, j],
                    color=c,
                    lw=lw,
                    alpha=alpha,
                    marker="o" if j == 0 else None,
                    ms=3,
                    label=lab,
                )
                if lab:
                    handles.append(h)
        if many and max(ks) > 1:
            handles.append(
                Line2D([], [], color="0.4", lw=1.0, alpha=0.6, label=f"{lam(2)}…{lam(max(ks))} (thin lines)")
            )
        # thresholds: one grey line when every run has the same constant one
        th = [(i, r.threshold) for i, r in enumerate(runs) if r.threshold is not None]
        shared = (
            len(th) == len(runs)
            and all(t.constant for _, t in th)
            and len({(t.formula, float(t.values[0])) for _, t in th}) == 1
        )
        top = float(np.nanmax(all_lam)) if np.isfinite(all_lam).any() else 1.0
        xmax = max(float(np.nanmax(r.steps)) for r in runs if len(r.steps)) if any(len(r.steps) for r in runs) else 1
        off_scale: list[str] = []
        cap = max(top * 4.0, top + 1e-12)
        for n, (i, t) in enumerate(th):
            if shared and n > 0:
                break
            c = "0.25" if shared else color(i)
            who = " (all runs)" if shared and many else ("" if not many else f" ({runs[i].label})")
            if t.constant:
                v = float(t.values[0])
                lab = f"{t.formula} = {v:.4g}{who}"
                if v <= cap:
                    handles.append(ax.axhline(v, color=c, ls="--", lw=1.5, label=lab))
                else:
                    off_scale.append(lab)
            else:
                x = np.append(t.steps, max(xmax, float(t.steps[-1])))
                y = np.append(t.values, t.values[-1])
                lab = f"{t.formula}(t){who}"
                (h,) = ax.plot(x, y, color=c, ls="--", lw=1.5, drawstyle="steps-post", label=lab)
                handles.append(h)
                if float(np.nanmin(t.values)) > cap:
                    off_scale.append(f"{lab} ≥ {float(np.nanmin(t.values)):.4g}")
        thr_vals = [float(np.nanmin(t.values)) for _, t in th]
        visible = [v for v in thr_vals if v <= cap]
        if spans_decades(np.concatenate([all_lam, visible]), 10.0):  # λ and the threshold both readable
            log_axis(ax)
        ymax = max([top, *visible]) * 1.12
        if ax.get_yscale() == "linear":
            ax.set_ylim(min(0.0, float(np.nanmin(all_lam)) * 1.1), ymax)
        else:
            ax.set_ylim(top=ymax * 1.5)
        if off_scale:
            ax.text(
                0.01,
                0.98,
                "above the axis: " + "; ".join(off_scale),
                transform=ax.transAxes,
                va="top",
                ha="left",
                fontsize=9,
                color="0.25",
            )
        ax.set(
            xlabel="training step (optimizer updates)",
            ylabel="Hessian eigenvalue λ (loss / weight²)",
            title="Top Hessian eigenvalues during training",
        )
        legend(ax, handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


# ---- Hessian trace ----------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """Hutchinson estimates of tr H (with standard errors, NaN when unknown) over training steps."""

    label: str
    steps: np.ndarray
    trace: np.ndarray
    std_error: np.ndarray


def trace_figure(runs: Sequence[Trace]) -> Figure:
    """tr H per run over training steps, with a ±1 standard-error band."""
    fig, (ax,) = new_figure(SINGLE)
    with matplotlib.rc_context(STYLE):
        for i, r in enumerate(runs):
            c = color(i)
            ax.plot(r.steps, r.trace, "-o", color=c, ms=3.5, lw=1.6, label=r.label)
            se = np.nan_to_num(r.std_error, nan=0.0)
            if (se > 0).any():
                ax.fill_between(r.steps, r.trace - se, r.trace + se, color=c, alpha=0.18, lw=0)
        if any((np.nan_to_num(r.std_error) > 0).any() for r in runs):
            ax.fill_between([], [], [], color="0.5", alpha=0.25, label="±1 standard error")
        if spans_decades(np.concatenate([r.trace for r in runs]), 30.0):
            log_axis(ax)
        ax.set(
            xlabel="training step (optimizer updates)",
            ylabel="Hessian trace tr H (loss / weight²)",
            title="Hessian trace during training (Hutchinson)",
        )
        legend(ax, loc="best")
    return fig


# ---- spectral density -------------------------------------------------------------------------------------------
@dataclass
class Spectrum:
    """One SLQ spectral density: the grid and the density on it (``lambda_1``: the Lanczos λ₁ of that step)."""

    label: str
    grid: np.ndarray
    density: np.ndarray
    lambda_1: float | None = None


def spectrum_figure(spectra: Sequence[Spectrum], colors: Sequence[str], title: str) -> Figure:
    """Spectral densities on a log density axis down to 10⁻¹⁰ of the peak, so that the few outliers (mass ~1/P for
    P parameters) show next to the bulk; dotted: the Lanczos λ₁ at the same step when known."""
    fig, (ax,) = new_figure(SINGLE)
    with matplotlib.rc_context(STYLE):
        peak = max(float(np.nanmax(s.density)) for s in spectra)
        floor = peak * 1e-10
        marked = False
        for s, c in zip(spectra, colors):
            d = np.where(s.density > floor, s.density, np.nan)
            ax.plot(s.grid, d, color=c, lw=1.5, label=s.label)
            if s.lambda_1 is not None and np.isfinite(s.lambda_1):
                ax.axvline(s.lambda_1, color=c, ls=":", lw=1.3)
                marked = True
        if marked:
            ax.plot([], [], color="0.3", ls=":", lw=1.3, label=f"{lam(1)} by Lanczos (same step)")
        ax.set_yscale("log")
        ax.set_ylim(floor, peak * 5)
        ax.set(xlabel="Hessian eigenvalue λ (loss / weight²)", ylabel="spectral density (per unit λ)", title=title)
        legend(ax, loc="upper center")
    return fig


# ---- measures during training -----------------------------------------------------------------------------------
@dataclass
class Metric:
    """One scalar column of history.csv (per epoch) for one run."""

    label: str
    epoch: np.ndarray
    values: np.ndarray


def metrics_figure(panels: dict[str, list[tuple[int, Metric]]], title: str) -> Figure:
    """Small multiples: one panel per metric (at most 3 per row), one colour per run index."""
    n = len(panels)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(6.4, 3.6 * ncols + 0.4), 2.9 * nrows + 0.6), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        runs: dict[int, str] = {}
        for k, (name, series) in enumerate(panels.items()):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            vals = []
            for i, m in series:
                ok = np.isfinite(m.values)
                ax.plot(m.epoch[ok], m.values[ok], "-o", color=color(i), ms=3, lw=1.4)
                runs[i] = m.label
                vals.append(m.values[ok])
            if vals and spans_decades(np.concatenate(vals), 30.0):
                log_axis(ax)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel("value (measure units)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        handles = [Line2D([], [], color=color(i), lw=2, marker="o", ms=3, label=lab) for i, lab in sorted(runs.items())]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)))
        fig.suptitle(title)
    return fig
