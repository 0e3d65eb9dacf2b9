"""Figures of a checkpoint's robustness: accuracy under weight noise and under adversarial attacks, one colour per
run (pure functions over arrays, drawn by the report).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from flatlit.figures.style import SINGLE, STYLE, color, legend, log_axis, new_figure, spans_decades


# ---- robustness -------------------------------------------------------------------------------------------------
@dataclass
class NoiseCurve:
    """Accuracy (fraction) under weight noise of one kind for one run, with the clean accuracy."""

    label: str
    kind: str
    scale: np.ndarray
    acc_mean: np.ndarray
    acc_std: np.ndarray
    clean_acc: float | None = None
    run: int = 0


def weight_noise_figure(curves: Sequence[NoiseCurve]) -> Figure:
    """Accuracy vs weight-noise scale (mean ± std over draws), dotted: clean accuracy; log x over decades."""
    fig, (ax,) = new_figure(SINGLE)
    styles = ("-", "--", "-.")  # dotted is the clean accuracy
    kinds = sorted({c.kind for c in curves})
    runs = sorted({c.run for c in curves})
    log_x = spans_decades(np.concatenate([c.scale for c in curves]), 10.0)
    with matplotlib.rc_context(STYLE):
        handles: list = []
        seen: set[int] = set()
        for c in curves:
            col = color(c.run)
            ls = styles[kinds.index(c.kind) % len(styles)]
            shift = (runs.index(c.run) - (len(runs) - 1) / 2) * 0.012  # runs side by side, error bars apart
            x = c.scale * 10**shift if log_x else c.scale + shift * np.ptp(c.scale if len(c.scale) > 1 else [0, 1])
            y, err = c.acc_mean * 100, c.acc_std * 100
            ax.errorbar(x, y, yerr=err, color=col, ls=ls, marker="o", ms=3.5, lw=1.6, capsize=3)
            if c.clean_acc is not None and c.run not in seen:
                ax.axhline(c.clean_acc * 100, color=col, ls=":", lw=1.0, alpha=0.8)
            if c.run not in seen:
                handles.append(Line2D([], [], color=col, lw=2, label=c.label))
                seen.add(c.run)
        if len(kinds) > 1:
            handles += [
                Line2D([], [], color="0.3", ls=styles[k % len(styles)], label=f"noise: {kind}")
                for k, kind in enumerate(kinds)
            ]
        if any(c.clean_acc is not None for c in curves):
            handles.append(Line2D([], [], color="0.3", ls=":", lw=1.0, label="clean accuracy"))
        if log_x:
            log_axis(ax, "x")
        xlabel = {
            "uniform": "noise scale s: w + s·u, u ~ U(−1, 1) (weight units)",
            "multiplicative": "relative noise scale s: w·(1 + s·u), u ~ U(−1, 1)",
        }.get(kinds[0] if len(kinds) == 1 else "", "noise scale s (uniform: weight units; multiplicative: relative)")
        ax.set(
            xlabel=xlabel,
            ylabel="accuracy (%)",
            title="Accuracy under random weight noise (mean ± std over draws)",
        )
        legend(ax, handles=handles, loc="lower left")
    return fig


@dataclass
class Attack:
    """Robust accuracy (fraction) of one run under one attack at several ε."""

    label: str
    attack: str
    eps: np.ndarray
    robust_acc: np.ndarray
    run: int = 0
    clean_acc: float | None = None


def _eps_label(names: Sequence[str]) -> str:
    l2 = any("l2" in n.lower() for n in names)
    return "radius ε (pixel units, [0, 1] images" + ("; L2 for the l2 attacks, else L∞)" if l2 else ", L∞)")


def adversarial_figure(attacks: Sequence[Attack]) -> Figure:
    """Robust accuracy per attack: vs ε when some attack has several ε, else grouped bars (one colour per run)."""
    fig, (ax,) = new_figure(SINGLE)
    names = sorted({a.attack for a in attacks})
    run_labels = {a.run: a.label for a in attacks}
    with matplotlib.rc_context(STYLE):
        if any(len(np.unique(a.eps)) > 1 for a in attacks):
            markers = "osD^v<>p*h"
            styles = ("-", "--", ":", "-.")
            for a in attacks:
                k = names.index(a.attack)
                o = np.argsort(a.eps)
                ax.plot(
                    a.eps[o],
                    a.robust_acc[o] * 100,
                    color=color(a.run),
                    ls=styles[k % 4],
                    marker=markers[k % 10],
                    ms=4,
                    lw=1.6,
                )
            handles = [Line2D([], [], color=color(i), lw=2, label=lab) for i, lab in sorted(run_labels.items())]
            handles += [
                Line2D([], [], color="0.3", ls=styles[k % 4], marker=markers[k % 10], ms=4, label=n)
                for k, n in enumerate(names)
            ]
            if spans_decades(np.concatenate([a.eps for a in attacks]), 10.0):
                log_axis(ax, "x")
            ax.set(xlabel=_eps_label(names), ylabel="robust accuracy (%)")
            legend(ax, handles=handles, loc="upper right")
        else:
            groups = sorted({(a.attack, float(e)) for a in attacks for e in a.eps})
            runs = sorted(run_labels)
            width = 0.8 / max(1, len(runs))
            for j, run in enumerate(runs):
                ys = []
                for g in groups:
                    v = [
                        float(r)
                        for a in attacks
                        if a.run == run and a.attack == g[0]
                        for e, r in zip(a.eps, a.robust_acc)
                        if float(e) == g[1]
                    ]
                    ys.append(v[0] * 100 if v else np.nan)
                x = np.arange(len(groups)) + (j - (len(runs) - 1) / 2) * width
                ax.bar(x, ys, width=width * 0.95, color=color(run), label=run_labels[run])
            ax.set_xticks(np.arange(len(groups)), [f"{n}\nε={e:.3g}" for n, e in groups])
            ax.set(xlabel="attack and " + _eps_label(names), ylabel="robust accuracy (%)")
            legend(ax, loc="upper right")
        ax.set_title("Accuracy under adversarial attacks")
    return fig
