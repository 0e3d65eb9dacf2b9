"""``flatlit report``: one page of figures and tables for one or several runs.

    flatlit report runs/demo/sgd/version_0
    flatlit report runs/demo/sgd/version_0 runs/demo/sam/version_0 --output runs/demo/report
    flatlit report RUN_A RUN_B --labels "SGD" "SAM" --format markdown

Reads what a run directory holds (``history.csv``, ``eigenvalues.npz``, ``spectrum_step{N}.npz``, ``config.yaml``,
``checkpoints/measures.json``, ``checkpoints/robustness.json``, ``landscapes/*.npz``) and writes PNG figures plus one
page: ``report.html`` with the figures embedded (base64), or ``report.md`` next to them. Several runs are overlaid,
one colour per run, and their measures are compared side by side. A missing piece is skipped with a note on the
page; a RUN_DIR that is not a run directory is one ``flatlit: error: ...`` line (exit code 2). Figures and page
are deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import base64
import csv
import glob
import html
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from flatlit import plots
from flatlit.errors import ConfigError, FlatlitError

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
COHEN = "Cohen et al. 2021, arXiv 2103.00065"
#: optimizers whose update is (heavy-ball or Nesterov) momentum SGD: the ones with a 2/η-type threshold
SGD_LIKE = ("SGD", "SGDW")
ADAPTIVE_HINT = ("adam", "adagrad", "rmsprop", "adabound", "adashift", "adadelta", "lamb", "lion", "sophia", "nadam")
METHOD_NAMES = {
    "SAM": "SAM",
    "LPFSGD": "LPF-SGD",
    "SmoothOut": "SmoothOut",
    "EntropySGD": "Entropy-SGD",
    "NSGD": "NSGD",
}


# ---- reading a run -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What one run directory holds (``None``/empty where absent) and the notes about what could not be read."""

    path: str
    label: str = ""
    config: dict[str, Any] | None = None
    history: dict[str, np.ndarray] = field(default_factory=dict)
    eigen: tuple[np.ndarray, np.ndarray] | None = None  # (steps, eigenvalues steps × k)
    spectra: list[tuple[int, str]] = field(default_factory=list)  # (step, npz path), by step
    measures: dict[str, Any] | None = None
    robustness: dict[str, Any] | None = None
    landscapes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resolved_from: str | None = None

    def col(self, name: str) -> np.ndarray | None:
        return self.history.get(name)

    def epoch_rows(self) -> np.ndarray:
        """Mask of the per-epoch rows of history.csv (epoch ≥ 0; epoch −1 is the measurement before training)."""
        ep = self.col("epoch")
        return np.zeros(0, bool) if ep is None else ep >= 0


def resolve_run_dir(path: str) -> tuple[str, str | None]:
    """The run directory named by ``path``: itself, the run of a checkpoint file or ``checkpoints/`` folder, or the
    newest ``version_N`` of an experiment folder. Raises :class:`ConfigError` (one line) when there is none."""
    if not os.path.exists(path):
        raise ConfigError(f"RUN_DIR {path!r}: does not exist.")
    if os.path.isfile(path) and path.endswith(".ckpt"):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.basename(os.path.normpath(path)) == "checkpoints":
        path = os.path.dirname(os.path.abspath(path))
    if _is_run(path):
        return path, None
    if os.path.isdir(path):
        versions = [d for d in glob.glob(os.path.join(path, "version_*")) if _is_run(d)]
        if versions:
            newest = max(versions, key=lambda d: int(re.sub(r"\D", "", os.path.basename(d)) or -1))
            return newest, path
    raise ConfigError(
        f"RUN_DIR {path!r}: not a run directory (no history.csv, config.yaml or eigenvalues.npz); pass a "
        "runs/<experiment>/version_N folder written by `flatlit fit`."
    )


def _is_run(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("history.csv", "config.yaml", "eigenvalues.npz")
    )


def read_history(path: str) -> dict[str, np.ndarray]:
    """history.csv as float columns (NaN where empty), rows sorted by (epoch, step)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = sorted({k for r in rows for k in r if k is not None})

    def num(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    table = {k: np.array([num(r.get(k)) for r in rows], dtype=float) for k in cols}
    if "epoch" in table and "step" in table and rows:
        order = np.lexsort((table["step"], table["epoch"]))
        table = {k: v[order] for k, v in table.items()}
    return table


def load_run(path: str, label: str | None = None) -> Run:
    """Read a run directory; unreadable pieces become notes (the run directory itself must exist)."""
    folder, parent = resolve_run_dir(path)
    run = Run(path=folder, resolved_from=parent)
    parts = os.path.abspath(folder).split(os.sep)
    name = "/".join(parts[-2:]) if parts[-1].startswith("version_") else parts[-1]

    def attempt(what: str, fn) -> Any:
        try:
            return fn()
        except Exception as err:  # a broken file is skipped, not fatal
            first = (str(err).splitlines() or [""])[0][:160]
            run.notes.append(f"{what}: unreadable, skipped ({type(err).__name__}: {first}).")
            return None

    cfg_path = os.path.join(folder, "config.yaml")
    if os.path.isfile(cfg_path):
        run.config = attempt("config.yaml", lambda: _read_yaml(cfg_path))
    hist_path = os.path.join(folder, "history.csv")
    if os.path.isfile(hist_path):
        run.history = attempt("history.csv", lambda: read_history(hist_path)) or {}
    eig_path = os.path.join(folder, "eigenvalues.npz")
    if os.path.isfile(eig_path):
        run.eigen = attempt("eigenvalues.npz", lambda: _read_eigen(eig_path))
    if run.eigen is None:
        run.eigen = _eigen_from_history(run.history)
    for p in glob.glob(os.path.join(folder, "spectrum_step*.npz")):
        m = re.search(r"spectrum_step(\d+)\.npz$", p)
        if m:
            run.spectra.append((int(m.group(1)), p))
    run.spectra.sort()
    meas = os.path.join(folder, "checkpoints", "measures.json")
    if os.path.isfile(meas):
        run.measures = attempt("checkpoints/measures.json", lambda: _read_json(meas, "results"))
    rob = os.path.join(folder, "checkpoints", "robustness.json")
    if os.path.isfile(rob):
        run.robustness = attempt("checkpoints/robustness.json", lambda: _read_json(rob, "clean"))
    landscapes = glob.glob(os.path.join(folder, "landscapes", "*.npz"))
    run.landscapes = sorted(p for p in landscapes if ".tmp" not in os.path.basename(p))  # not a file being written
    run.label = label or (default_label(run.config) if run.config else name)
    return run


def _read_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError("not a mapping")
    return data


def _read_json(path: str, required: str) -> dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or required not in data:
        raise ValueError(f"no {required!r} entry")
    return data


def _read_eigen(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    with np.load(path, allow_pickle=False) as d:
        steps = d["steps"] if "steps" in d else d["step"]
        eig = np.asarray(d["eigenvalues"], dtype=float)
    if eig.size == 0:
        return None
    eig = eig.reshape(len(steps), -1)
    return np.asarray(steps, dtype=float), -np.sort(-eig, axis=1)


def _eigen_from_history(h: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    cols = sorted((int(m.group(1)), k) for k in h if (m := re.fullmatch(r"hessian/lambda_(\d+)", k)))
    if not cols or "step" not in h:
        return None
    eig = np.stack([h[k] for _, k in cols], axis=1)
    ok = np.isfinite(eig).all(axis=1)
    return (h["step"][ok], eig[ok]) if ok.any() else None


# ---- labels and the edge-of-stability threshold from the config ------------------------------------------------
def _init_args(node: Any) -> tuple[str, dict[str, Any]]:
    """(class name, init_args) of a ``class_path``/``init_args`` node (or a bare class path string)."""
    if isinstance(node, str):
        return node.rsplit(".", 1)[-1], {}
    if isinstance(node, dict):
        return str(node.get("class_path", "")).rsplit(".", 1)[-1], dict(node.get("init_args") or {})
    return "", {}


def _optimizer(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The (base) optimizer's class name and arguments; flatlit's default is SGD(lr=0.01, momentum=0.9)."""
    model = config.get("model") or {}
    node = (model.get("init_args") or {}).get("optimizer") if isinstance(model, dict) else None
    if not node:
        return "SGD", {"lr": 0.01, "momentum": 0.9}
    return _init_args(node)


def _g(v: Any) -> str:
    return f"{float(v):g}" if isinstance(v, (int, float)) else str(v)


def default_label(config: dict[str, Any]) -> str:
    """The method and its key settings, e.g. ``"SGD lr=0.05"``, ``"SAM ρ=0.05"``, ``"Adam lr=0.001"``."""
    method, margs = _init_args(config.get("model"))
    opt, oargs = _optimizer(config)
    lr = f" lr={_g(oargs['lr'])}" if "lr" in oargs else ""
    if method == "SAM":
        kind = "SAM" if margs.get("adaptive", "none") == "none" else "ASAM"
        return f"{kind} ρ={_g(margs.get('rho', 0.05))}"
    if method == "LPFSGD":
        return f"LPF-SGD γ={_g(margs.get('gamma', 0.002))}"
    if method == "SmoothOut":
        return f"SmoothOut a={_g(margs.get('a', 0.01))}"
    if method == "EntropySGD":
        return f"Entropy-SGD L={_g(margs.get('L', 5))}"
    if method == "NSGD":
        return f"NSGD γ={_g(margs.get('overshoot', 1.0))}"
    return f"{opt or method or 'run'}{lr}"


@dataclass(frozen=True)
class Stability:
    """The edge-of-stability threshold ``factor/η`` of a run's optimizer (``factor`` None: no threshold)."""

    factor: float | None
    formula: str
    lr: float | None
    scheduled: bool
    explanation: str


def stability(config: dict[str, Any] | None) -> Stability:
    """The sharpness above which (full-batch) gradient descent with the run's optimizer cannot be stable.

    Plain GD: 2/η. Heavy-ball momentum β (PyTorch SGD, dampening d): (2+2β)/(η(1−d)); Nesterov:
    (2+2β)/(η(1+2β)) (Cohen et al. 2021, arXiv 2103.00065, App. on momentum; the largest stable curvature of the
    linear recurrence on a quadratic). Adaptive optimizers have no such line (their threshold depends on the
    preconditioner).
    """
    if not config:
        return Stability(None, "", None, False, "no config.yaml, so the optimizer is unknown")
    method, _ = _init_args(config.get("model"))
    opt, args = _optimizer(config)
    model_args = (config.get("model") or {}).get("init_args") or {}
    scheduled = bool(model_args.get("lr_scheduler"))
    lr = args.get("lr")
    lr = float(lr) if isinstance(lr, (int, float)) else None
    if opt not in SGD_LIKE:
        kind = "an adaptive optimizer" if any(h in opt.lower() for h in ADAPTIVE_HINT) else "not (momentum) SGD"
        return Stability(
            None, "", lr, scheduled, f"{opt} is {kind}: the 2/η threshold holds for (momentum) gradient descent only"
        )
    beta = float(args.get("momentum") or 0.0)
    damp = float(args.get("dampening") or 0.0)
    nesterov = bool(args.get("nesterov", False))
    if beta == 0:
        factor, formula, expl = 2.0, "2/η", "gradient descent without momentum"
    elif nesterov:  # PyTorch refuses Nesterov with dampening
        factor, formula = (2 + 2 * beta) / (1 + 2 * beta), "(2+2β)/(η(1+2β))"
        expl = f"Nesterov momentum β = {beta:g}"
    elif damp:
        factor, formula = (2 + 2 * beta) / (1 - damp), "(2+2β)/(η(1−d))"
        expl = f"heavy-ball momentum β = {beta:g}, dampening d = {damp:g}"
    else:
        factor, formula = 2 + 2 * beta, "(2+2β)/η"
        expl = f"heavy-ball momentum β = {beta:g}"
    if method and method != "SGDFamily":
        expl += f"; the line is the threshold of {METHOD_NAMES.get(method, method)}'s base optimizer"
    return Stability(factor, formula, lr, scheduled, expl)


def threshold_series(run: Run, st: Stability) -> tuple[plots.Threshold | None, str]:
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
            plots.Threshold(st.formula, starts, values),
            f"{run.label}: {st.formula}(t) from history.csv's per-epoch lr ({st.explanation}), "
            f"from {values[0]:.4g} to {values[-1]:.4g}.",
        )
    lr = st.lr if st.lr is not None else (float(lrs[0]) if lrs.size else None)
    if lr is None or lr <= 0:
        return None, f"no edge-of-stability line for {run.label}: no learning rate in its config or history."
    value = st.factor / lr
    return (
        plots.Threshold(st.formula, np.array([0.0]), np.array([value])),
        f"{run.label}: {st.formula} = {value:.4g} (η = {lr:g}; {st.explanation}).",
    )


# ---- page blocks --------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """One element of the page: heading, paragraph, note, figure or table."""

    kind: str  # h2 | p | note | figure | table
    text: str = ""
    file: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


class Page:
    """The page being assembled (blocks in order) and the figure files written."""

    def __init__(self, outdir: str) -> None:
        self.outdir = outdir
        self.blocks: list[Block] = []
        self.figures: list[str] = []

    def h2(self, text: str) -> None:
        self.blocks.append(Block("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def table(self, header: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.blocks.append(Block("table", caption, header=header, rows=rows))

    def figure(self, fig: Any, name: str, caption: str) -> None:
        plots.save(fig, os.path.join(self.outdir, name))
        self.add_file(name, caption)

    def add_file(self, name: str, caption: str) -> None:
        self.figures.append(name)
        self.blocks.append(Block("figure", caption, file=name))


def fmt(v: Any, se: Any = None) -> str:
    """A measure value with 4 significant digits (± its standard error when known)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if not isinstance(v, (int, float)):
        return str(v)
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    text = f"{v:.4g}"
    if isinstance(se, (int, float)) and math.isfinite(se) and se > 0:
        text += f" ± {se:.2g}"
    return text


def relative_difference(ref: Any, value: Any) -> float | None:
    """(value − ref)/|ref|, or None when either is missing or not finite, or ref is 0."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (ref, value)) or ref == 0:
        return None
    return (value - ref) / abs(ref)


def fmt_rel(d: float | None) -> str:
    return "—" if d is None else f"{100 * d:+.3g} %"


def _last(run: Run, name: str) -> float | None:
    col = run.col(name)
    if col is None:
        return None
    v = col[run.epoch_rows() & np.isfinite(col)] if run.epoch_rows().size else col[np.isfinite(col)]
    return float(v[-1]) if v.size else None


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


def section_runs(page: Page, runs: list[Run]) -> None:
    page.h2("Runs")
    rows = []
    for r in runs:
        method = _init_args((r.config or {}).get("model"))[0] or "—"
        opt, args = _optimizer(r.config) if r.config else ("—", {})
        details = [f"{k} {_g(args[k])}" for k in ("lr", "momentum") if args.get(k)]
        sched = _init_args(((r.config or {}).get("model") or {}).get("init_args", {}).get("lr_scheduler"))[0]
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
                _pct(_last(r, "train/acc")),
                _pct(_last(r, "val/acc")),
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
        items.append(plots.Curves(r.label, r.col("epoch")[rows] + 1, train_loss, val_loss, train_acc, val_acc))
    if missing:
        page.note(f"No per-epoch losses in history.csv for: {', '.join(missing)} (skipped).")
    if not items:
        return
    losses = {((r.config or {}).get("model") or {}).get("init_args", {}).get("loss", "cross_entropy") for r in runs}
    loss_label = {"mse": "loss (½·mean squared error)", "cross_entropy": "cross-entropy loss (nats)"}.get(
        losses.pop() if len(losses) == 1 else "", "loss"
    )
    page.figure(
        plots.curves_figure(items, loss_label),
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
        items.append(plots.Eigen(r.label, r.eigen[0], r.eigen[1], th))
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
        plots.eigen_figure(items),
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
        items.append(plots.Trace(r.label, step[ok], tr[ok], se[ok] if se is not None else np.full(ok.sum(), np.nan)))
    if missing:
        page.note(
            f"No hessian/trace in history.csv for: {', '.join(missing)} (skipped; add flatlit.callbacks.HessianTrace)."
        )
    if items:
        page.figure(
            plots.trace_figure(items),
            "hessian_trace.png",
            "Hutchinson estimate of the Hessian trace (sum of all eigenvalues) on the callback's fixed sample; the "
            "band is ±1 standard error over the probes.",
        )


def section_spectrum(page: Page, runs: list[Run]) -> None:
    page.h2("Hessian spectral density")
    spectra: list[plots.Spectrum] = []
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
            spectra.append(plots.Spectrum(label, grid, dens, lam1))
            if single:
                import matplotlib

                colors.append(matplotlib.colormaps["viridis"](0.85 * n / max(1, len(chosen) - 1)))
            else:
                colors.append(plots.color(i))
    if missing:
        page.note(f"No spectrum_step*.npz for: {', '.join(missing)} (skipped; add flatlit.callbacks.HessianSpectrum).")
    if spectra:
        title = "Hessian spectral density (SLQ)" + ("" if single else ": last measurement of each run")
        page.figure(
            plots.spectrum_figure(spectra, colors, title),
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
    panels: dict[str, list[tuple[int, plots.Metric]]] = {}
    for name in names:
        for i, r in enumerate(runs):
            col, rows = r.col(name), r.epoch_rows()
            if col is not None and rows.any() and np.isfinite(col[rows]).any():
                panels.setdefault(name, []).append((i, plots.Metric(r.label, r.col("epoch")[rows] + 1, col[rows])))
    if panels:
        page.figure(
            plots.metrics_figure(panels, "Sharpness and complexity measures at the end of each epoch"),
            "measures_training.png",
            "Measures logged by the SharpnessMeasures / ComplexityMeasures callbacks (docs/measures.md gives each "
            "one's definition and units).",
        )


def _measure_rows(run: Run) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for key, r in sorted((run.measures or {}).get("results", {}).items()):
        if not isinstance(r, dict):
            continue
        name = r.get("name") or key
        ident = json.dumps({"settings": r.get("settings"), "sample": r.get("sample")}, sort_keys=True, default=str)
        out[(name, ident)] = r
    return out


def measures_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side measures table: one value column per run and, for each further run,
    its relative difference to the first run, (v − v₁)/|v₁|."""
    per_run = [_measure_rows(r) for r in runs]
    keys = sorted({k for m in per_run for k in m})
    names = [k[0] for k in keys]
    header = ["measure", *(r.label for r in runs)]
    header += [f"Δ {r.label} vs {runs[0].label}" for r in runs[1:]]
    rows = []
    for key in keys:
        name = key[0]
        if names.count(name) > 1:
            settings = json.loads(key[1]).get("settings") or {}
            name += " (" + ", ".join(f"{k}={_g(v)}" for k, v in sorted(settings.items()) if v is not None) + ")"
        vals = [m.get(key) for m in per_run]
        row = [name] + [fmt(v.get("value"), v.get("std_error")) if v else "—" for v in vals]
        ref = vals[0].get("value") if vals[0] else None
        row += [fmt_rel(relative_difference(ref, v.get("value") if v else None)) for v in vals[1:]]
        rows.append(row)
    return header, rows


def section_measures(page: Page, runs: list[Run]) -> None:
    page.h2("Sharpness and complexity measures")
    have = [r for r in runs if r.measures and r.measures.get("results")]
    missing = [r.label for r in runs if r not in have]
    if missing:
        page.note(
            f"No checkpoints/measures.json for: {', '.join(missing)} (skipped; run `flatlit measure --ckpt_path "
            "RUN/checkpoints/last.ckpt`)."
        )
    if not have:
        return
    header, rows = measures_table(have)
    ckpts = "; ".join(
        f"{r.label}: {os.path.basename(str((r.measures.get('checkpoint') or {}).get('path', '?')))}" for r in have
    )
    cap = f"Measures of the checkpoints ({ckpts}), value ± standard error where the measure estimates one."
    if len(have) > 1:
        cap += f" Δ: relative difference to {have[0].label}, (v − v₁)/|v₁|."
    page.table(header, rows, cap)


def _floats(entries: list[dict[str, Any]], key: str) -> np.ndarray:
    """``entries[i][key]`` as floats, NaN where missing."""
    return np.array([float(e[key]) if isinstance(e.get(key), (int, float)) else np.nan for e in entries])


def section_robustness(page: Page, runs: list[Run]) -> None:
    page.h2("Robustness")
    have = [(i, r) for i, r in enumerate(runs) if r.robustness]
    missing = [r.label for r in runs if not r.robustness]
    if missing:
        page.note(
            f"No checkpoints/robustness.json for: {', '.join(missing)} (skipped; run `flatlit robustness "
            "--ckpt_path RUN/checkpoints/last.ckpt`)."
        )
    if not have:
        return
    labels = [r.label for _, r in have]
    clean = [(r.robustness.get("clean") or {}) for _, r in have]
    page.table(
        ["", *labels],
        [
            ["clean accuracy", *(_pct(c.get("acc")) for c in clean)],
            ["clean loss", *(fmt(c.get("loss")) for c in clean)],
            ["samples", *(str(c.get("num_samples", "—")) for c in clean)],
        ],
        "Clean accuracy and loss of each checkpoint on the robustness sample.",
    )
    # weight noise
    curves: list[plots.NoiseCurve] = []
    wn_rows: dict[tuple[str, float], list[str]] = {}
    for j, (i, r) in enumerate(have):
        by_kind: dict[str, list[dict]] = {}
        for e in r.robustness.get("weight_noise") or []:
            by_kind.setdefault(str(e.get("kind", "noise")), []).append(e)
        for kind, es in sorted(by_kind.items()):
            es = sorted(es, key=lambda e: float(e.get("scale", 0)))
            scale, mean, std = (_floats(es, k) for k in ("scale", "acc_mean", "acc_std"))
            curves.append(plots.NoiseCurve(r.label, kind, scale, mean, np.nan_to_num(std), clean[j].get("acc"), i))
            for e in es:
                row = wn_rows.setdefault((kind, float(e["scale"])), ["—"] * len(have))
                row[j] = f"{100 * float(e['acc_mean']):.2f} ± {100 * float(e.get('acc_std') or 0):.2f} %"
    if curves:
        page.table(
            ["noise", "scale", *labels],
            [[k, f"{s:g}", *v] for (k, s), v in sorted(wn_rows.items())],
            "Accuracy under random weight noise, mean ± std over the draws.",
        )
        page.figure(
            plots.weight_noise_figure(curves),
            "robustness_weight_noise.png",
            "Accuracy when random noise of the given scale is added to the weights (mean ± std over draws, "
            "SmoothOut's evaluation); dotted: the clean accuracy. A flatter minimum typically loses less.",
        )
    # adversarial
    attacks: list[plots.Attack] = []
    adv_rows: dict[tuple[str, float, Any], list[str]] = {}
    for j, (i, r) in enumerate(have):
        by_attack: dict[str, list[dict]] = {}
        for e in r.robustness.get("adversarial") or []:
            by_attack.setdefault(str(e.get("attack", "attack")), []).append(e)
        for name, es in sorted(by_attack.items()):
            es = sorted(es, key=lambda e: float(e.get("eps", 0)))
            eps, acc = _floats(es, "eps"), _floats(es, "robust_acc")
            attacks.append(plots.Attack(r.label, name, eps, acc, i, clean[j].get("acc")))
            for e in es:
                row = adv_rows.setdefault((name, float(e["eps"]), e.get("steps")), ["—"] * len(have))
                row[j] = _pct(e.get("robust_acc"))
    if attacks:
        page.table(
            ["attack", "ε", "steps", *labels],
            [
                [a, f"{e:.4g}", "—" if s is None else str(s), *v]
                for (a, e, s), v in sorted(adv_rows.items(), key=lambda kv: str(kv[0]))
            ],
            "Robust accuracy under adversarial input perturbations of radius ε.",
        )
        page.figure(
            plots.adversarial_figure(attacks),
            "robustness_adversarial.png",
            "Accuracy on adversarially perturbed inputs (ε in pixel units of [0, 1] images).",
        )
    if not curves and not attacks:
        page.note("robustness.json holds no weight-noise or adversarial results.")


def _meta(path: str) -> dict[str, Any]:
    """A landscape file's meta (plus ``_1d`` and ``_alphas``); empty when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"])) if "meta" in d else {}
            meta["_1d"] = "betas" not in d or np.asarray(d["betas"]).size == 0
            meta["_alphas"] = np.asarray(d["alphas"], dtype=float).round(12).tolist() if "alphas" in d else []
        return meta
    except Exception:
        return {}


#: meta entries that tell two runs' 1-D landscapes are the same measurement (everything but the checkpoints)
OVERLAY_KEYS = ("mode", "normalisation", "bias_bn", "bn", "num_samples", "sample_seed", "eigen_index", "_alphas")


def _landscape_caption(meta: dict[str, Any], stem: str, runs: list[Run], owner: Run) -> str:
    mode = meta.get("mode", "?")
    names = {os.path.abspath(os.path.join(r.path, "checkpoints")): r.label for r in runs}

    def who(ckpt: str) -> str:
        label = names.get(os.path.dirname(os.path.abspath(ckpt)))
        return f"{label} [{os.path.basename(ckpt)}]" if label else ckpt

    ckpts = meta.get("checkpoints") or []
    n = meta.get("num_samples")
    sample = f" on {n} training examples" if n else ""
    if mode == "interpolate" and len(ckpts) == 2:
        return (
            f"Training loss and accuracy{sample} along the straight line θ(α) = (1 − α)θ_A + αθ_B from A = "
            f"{who(ckpts[0])} at α = 0 to B = {who(ckpts[1])} at α = 1 ({stem}.npz)."
        )
    if mode == "eigen":
        where = f"along Hessian eigenvector e{meta.get('eigen_index', '?')}"
    elif mode == "plane":
        where = "on a plane of two random filter-normalised directions"
    else:
        where = "along a random filter-normalised direction"
    return f"{owner.label}: training loss and accuracy{sample} {where} ({stem}.npz)."


def section_landscapes(page: Page, runs: list[Run]) -> None:
    page.h2("Loss landscapes")
    have = [(i, r) for i, r in enumerate(runs) if r.landscapes]
    missing = [r.label for r in runs if not r.landscapes]
    if missing:
        page.note(
            f"No landscapes/*.npz for: {', '.join(missing)} (skipped; run `flatlit landscape --ckpt_path "
            "RUN/checkpoints/last.ckpt`)."
        )
    if not have:
        return
    try:
        from flatlit.landscape import plots as lplots
    except Exception as err:
        page.note(f"Landscapes found but flatlit.landscape.plots is unavailable ({type(err).__name__}: {err}).")
        return
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, r in have:
        for path in r.landscapes:
            stem = os.path.splitext(os.path.basename(path))[0]
            meta = _meta(path)
            out = f"landscape_run{i + 1}_{_slug(stem)}.png"
            try:
                written = lplots.plot_landscape_file(path, os.path.join(page.outdir, out))
            except Exception as err:
                page.note(f"{r.label}: landscapes/{stem}.npz could not be drawn ({type(err).__name__}: {err}).")
                continue
            caption = _landscape_caption(meta, stem, runs, r)
            for w in written or []:
                page.add_file(os.path.basename(w), caption)
            if meta.get("_1d") and meta.get("mode") != "interpolate":
                key = json.dumps({k: meta.get(k) for k in OVERLAY_KEYS}, sort_keys=True, default=str)
                groups.setdefault(key, []).append((i, path))
    # the runs' 1-D landscapes measured the same way, overlaid
    for n, (key, items) in enumerate(sorted(groups.items())):
        if len({i for i, _ in items}) < 2:
            continue
        mode = json.loads(key).get("mode", "line")
        out = f"landscape_overlay_{n + 1}_{_slug(str(mode))}.png"
        try:
            lplots.plot_lines([p for _, p in items], [runs[i].label for i, _ in items], os.path.join(page.outdir, out))
        except Exception as err:
            page.note(f"The {mode} landscapes could not be overlaid ({type(err).__name__}: {err}).")
            continue
        page.add_file(
            out,
            f"The runs' {mode} landscapes overlaid (same grid, sample and seeded direction, normalised to each run's "
            "weights).",
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ---- rendering ----------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.92em;color:#444;margin-top:.3em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.6em 0;font-size:.92em}
.caption{font-size:.92em;color:#444}
"""


def _is_num(text: str) -> bool:
    return bool(re.match(r"^[−+\-]?[\d.∞—]", text))


def render_html(page: Page, title: str) -> str:
    e = html.escape
    head = f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head>'
    out = ["<!DOCTYPE html>", head, f"<body><h1>{e(title)}</h1>"]
    for b in page.blocks:
        if b.kind == "h2":
            out.append(f"<h2>{e(b.text)}</h2>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "note":
            out.append(f'<div class="note">Note: {e(b.text)}</div>')
        elif b.kind == "figure":
            with open(os.path.join(page.outdir, b.file), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            out.append(
                f'<figure id="{e(b.file)}"><img alt="{e(b.file)}" src="data:image/png;base64,{data}">'
                f"<figcaption><b>{e(b.file)}</b>: {e(b.text)}</figcaption></figure>"
            )
        elif b.kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
            for row in b.rows:
                cells = "".join(
                    f'<td class="num">{e(c)}</td>' if k and _is_num(c) else f"<td>{e(c)}</td>"
                    for k, c in enumerate(row)
                )
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
            if b.text:
                out.append(f'<p class="caption">{e(b.text)}</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(page: Page, title: str) -> str:
    out = [f"# {title}", ""]
    for b in page.blocks:
        if b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "note":
            out += [f"> **Note:** {b.text}", ""]
        elif b.kind == "figure":
            out += [f"![{b.file}]({b.file})", "", f"*{b.file}*: {b.text}", ""]
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            numeric = [k > 0 and all(_is_num(row[k]) for row in b.rows if k < len(row)) for k in range(len(b.header))]
            out.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
            if b.text:
                out += [f"*{b.text}*", ""]
    return "\n".join(out).rstrip() + "\n"


# ---- command -------------------------------------------------------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatlit report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<experiment>/version_N)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: from each config)")
    p.add_argument("--output", default=None, help="output folder (default: RUN_DIR/report, or <common parent>/report)")
    p.add_argument("--format", choices=("html", "markdown"), default="html", help="page format")
    p.add_argument("--title", default=None, help="page title")
    return p


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


if __name__ == "__main__":
    main()
