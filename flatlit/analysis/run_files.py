"""What a run directory holds (``history.csv``, ``eigenvalues.npz``, spectra, ``config.yaml``, the measures,
robustness and landscape files of its checkpoint) read into a :class:`Run`, unreadable pieces as notes."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from flatlit.analysis.stability import default_label
from flatlit.utils.errors import ConfigError


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
