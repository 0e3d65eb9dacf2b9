"""The report's sections on training: the runs, their loss and accuracy curves, Hessian eigenvalues against the
edge of stability, the Hessian trace and spectral density, and the measures logged during training."""

from __future__ import annotations

import os
import re

import numpy as np

from flatlit import figures
from flatlit.analysis.render import Page, fmt, pct
from flatlit.analysis.run_files import Run
from flatlit.analysis.stability import Stability, class_and_args, optimizer_and_args, short_number, stability

COHEN = "Cohen et al. 2021, arXiv 2103.00065"


def threshold_series(run: Run, st: Stability) -> tuple[figures.Threshold | None, str]:
    """The threshold to draw for a run (constant, or a step curve from history's lr column) and its caption."""
    if st.factor is None:
        return None, f"no edge-of-stability line for {run.label}: {st.explanation}."
    lr_col, step_col = run.col("lr"), run.col("step")
    rows = run.epoch_rows()
    lrs = steps = np.zeros(0)
    if lr_col is not None and step_col is not None and rows.any():
        ok = rows & np.isfinite(lr_col) & (lr_col > 0)
        lrs, steps = lr_col[ok], step_col[ok]
    varies = lrs.size > 1 and not np.allclose(lrs, lrs[0], rtol=1e-6, atol=0)
    if st.scheduled and not varies and lrs.size == 0:
        return None, f"no edge-of-stability line for {run.label}: its lr is scheduled but history.csv has no lr column."
    if varies:
        starts = np.concatenate([[0.0], steps[:-1]])  # epoch e's lr applies from the end of epoch e−1
        values = st.factor / lrs
        return (
            figures.Threshold(st.formula, starts, values),
            f"{run.label}: {st.formula}(t) from history.csv's per-epoch lr ({st.explanation}), "
            f"from {values[0]:.4g} to {values[-1]:.4g}.",
        )
    lr = st.lr if st.lr is not None else (float(lrs[0]) if lrs.size else None)
    if lr is None or lr <= 0:
        return None, f"no edge-of-stability line for {run.label}: no learning rate in its config or history."
    value = st.factor / lr
    return (
        figures.Threshold(st.formula, np.array([0.0]), np.array([value])),
        f"{run.label}: {st.formula} = {value:.4g} (η = {lr:g}; {st.explanation}).",
    )


def _last(run: Run, name: str) -> float | None:
    col = run.col(name)
    if col is None:
        return None
    v = col[run.epoch_rows() & np.isfinite(col)] if run.epoch_rows().size else col[np.isfinite(col)]
    return float(v[-1]) if v.size else None


def section_runs(page: Page, runs: list[Run]) -> None:
    page.h2("Runs")
    rows = []
    for r in runs:
        method = class_and_args((r.config or {}).get("model"))[0] or "—"
        opt, args = optimizer_and_args(r.config) if r.config else ("—", {})
        details = [f"{k} {short_number(args[k])}" for k in ("lr", "momentum") if args.get(k)]
        sched = class_and_args(((r.config or {}).get("model") or {}).get("init_args", {}).get("lr_scheduler"))[0]
        optimizer = opt + (f" ({', '.join(details)})" if details else "") + (f", {sched}" if sched else "")
        ep = r.col("epoch")
        epochs = str(int(np.nanmax(ep)) + 1) if ep is not None and np.isfinite(ep).any() and np.nanmax(ep) >= 0 else "—"
        lam = fmt(float(r.eigen[1][-1, 0])) if r.eigen is not None else "—"
        rows.append(
            [
                r.label,
                r.path,
                method,
                optimizer,
                epochs,
                pct(_last(r, "train/acc")),
                pct(_last(r, "val/acc")),
                lam,
            ]
        )
    page.table(["run", "directory", "method", "optimizer", "epochs", "train acc", "val acc", "final λ₁"], rows)
    for r in runs:
        if r.resolved_from:
            page.note(f"{r.resolved_from} is an experiment folder: reporting its newest run, {r.path}.")
        for n in r.notes:
            page.note(f"{r.label}: {n}")


def section_curves(page: Page, runs: list[Run]) -> None:
    page.h2("Training curves")
    items, missing = [], []
    for r in runs:
        rows = r.epoch_rows()
        cols = [r.col(k) for k in ("train/loss", "val/loss", "train/acc", "val/acc")]
        if not rows.any() or all(c is None or not np.isfinite(c[rows]).any() for c in cols):
            missing.append(r.label)
            continue
        nan = np.full(int(rows.sum()), np.nan)
        train_loss, val_loss, train_acc, val_acc = (nan if c is None else c[rows] for c in cols)
        items.append(figures.Curves(r.label, r.col("epoch")[rows] + 1, train_loss, val_loss, train_acc, val_acc))
    if missing:
        page.note(f"No per-epoch losses in history.csv for: {', '.join(missing)} (skipped).")
    if not items:
        return
    losses = {((r.config or {}).get("model") or {}).get("init_args", {}).get("loss", "cross_entropy") for r in runs}
    loss_label = {"mse": "loss (½·mean squared error)", "cross_entropy": "cross-entropy loss (nats)"}.get(
        losses.pop() if len(losses) == 1 else "", "loss"
    )
    page.figure(
        figures.curves_figure(items, loss_label),
        "loss_accuracy.png",
        "Loss (left) and accuracy (right) at the end of each epoch: solid = training (mean over the epoch's "
        "batches), dashed = validation.",
    )


def section_eigen(page: Page, runs: list[Run]) -> None:
    page.h2("Hessian eigenvalues and the edge of stability")
    items, captions, missing = [], [], []
    for r in runs:
        if r.eigen is None:
            missing.append(r.label)
            continue
        th, cap = threshold_series(r, stability(r.config))
        items.append(figures.Eigen(r.label, r.eigen[0], r.eigen[1], th))
        captions.append(cap)
    if missing:
        page.note(
            f"No Hessian eigenvalues (eigenvalues.npz or hessian/lambda_* in history.csv) for: {', '.join(missing)} "
            "(skipped; add the flatlit.callbacks.HessianEigenvalues callback)."
        )
    if not items:
        return
    k = max(e.eigenvalues.shape[1] for e in items)
    page.figure(
        figures.eigen_figure(items),
        "eigenvalues.png",
        f"Top-{k} Hessian eigenvalues of the training loss on the callback's fixed sample (Lanczos), thick = λ₁. "
        f"Dashed: the edge-of-stability threshold ({COHEN}): gradient descent on a quadratic with curvature above "
        "it diverges, and full-batch GD hovers at it; mini-batch SGD usually stays below. " + " ".join(captions),
    )


def section_trace(page: Page, runs: list[Run]) -> None:
    page.h2("Hessian trace")
    items, missing = [], []
    for r in runs:
        tr, step = r.col("hessian/trace"), r.col("step")
        ok = np.isfinite(tr) if tr is not None and step is not None else None
        if ok is None or not ok.any():
            missing.append(r.label)
            continue
        se = r.col("hessian/trace_se")
        items.append(figures.Trace(r.label, step[ok], tr[ok], se[ok] if se is not None else np.full(ok.sum(), np.nan)))
    if missing:
        page.note(
            f"No hessian/trace in history.csv for: {', '.join(missing)} (skipped; add flatlit.callbacks.HessianTrace)."
        )
    if items:
        page.figure(
            figures.trace_figure(items),
            "hessian_trace.png",
            "Hutchinson estimate of the Hessian trace (sum of all eigenvalues) on the callback's fixed sample; the "
            "band is ±1 standard error over the probes.",
        )


def section_spectrum(page: Page, runs: list[Run]) -> None:
    page.h2("Hessian spectral density")
    spectra: list[figures.Spectrum] = []
    colors: list[str] = []
    missing = []
    single = len(runs) == 1
    for i, r in enumerate(runs):
        if not r.spectra:
            missing.append(r.label)
            continue
        chosen = r.spectra if single else r.spectra[-1:]
        if single and len(chosen) > 4:
            idx = np.unique(np.linspace(0, len(chosen) - 1, 4).round().astype(int))
            chosen = [chosen[j] for j in idx]
        for n, (step, path) in enumerate(chosen):
            try:
                with np.load(path, allow_pickle=False) as d:
                    grid, dens = np.asarray(d["grid"], float), np.asarray(d["density"], float)
            except Exception as err:
                page.note(f"{r.label}: {os.path.basename(path)} unreadable, skipped ({type(err).__name__}).")
                continue
            if not np.isfinite(dens).any() or np.nanmax(dens) <= 0:
                page.note(f"{r.label}: {os.path.basename(path)} holds no positive density, skipped.")
                continue
            lam1 = None
            if r.eigen is not None and step in r.eigen[0]:
                lam1 = float(r.eigen[1][list(r.eigen[0]).index(step), 0])
            label = f"step {step}" if single else f"{r.label} (step {step})"
            spectra.append(figures.Spectrum(label, grid, dens, lam1))
            if single:
                import matplotlib

                colors.append(matplotlib.colormaps["viridis"](0.85 * n / max(1, len(chosen) - 1)))
            else:
                colors.append(figures.color(i))
    if missing:
        page.note(f"No spectrum_step*.npz for: {', '.join(missing)} (skipped; add flatlit.callbacks.HessianSpectrum).")
    if spectra:
        title = "Hessian spectral density (SLQ)" + ("" if single else ": last measurement of each run")
        page.figure(
            figures.spectrum_figure(spectra, colors, title),
            "spectrum.png",
            "Spectral density of the Hessian by stochastic Lanczos quadrature (Gaussian-smoothed), on a log density "
            "axis: the bulk near 0 holds almost all the mass; the few outliers on the right (mass ≈ 1/#parameters "
            "each) set λ₁.",
        )


def section_training_measures(page: Page, runs: list[Run], limit: int = 12) -> None:
    skip = re.compile(r"(_se|seconds|hvps|_passes)$")
    names = sorted(
        {k for r in runs for k in r.history if k.startswith(("sharpness/", "complexity/")) and not skip.search(k)}
    )
    if not names:
        return
    page.h2("Sharpness and complexity during training")
    if len(names) > limit:
        page.note(f"{len(names)} measures logged; showing the first {limit}: see history.csv for the rest.")
        names = names[:limit]
    panels: dict[str, list[tuple[int, figures.Metric]]] = {}
    for name in names:
        for i, r in enumerate(runs):
            col, rows = r.col(name), r.epoch_rows()
            if col is not None and rows.any() and np.isfinite(col[rows]).any():
                panels.setdefault(name, []).append((i, figures.Metric(r.label, r.col("epoch")[rows] + 1, col[rows])))
    if panels:
        page.figure(
            figures.metrics_figure(panels, "Sharpness and complexity measures at the end of each epoch"),
            "measures_training.png",
            "Measures logged by the SharpnessMeasures / ComplexityMeasures callbacks (docs/measures.md gives each "
            "one's definition and units).",
        )
