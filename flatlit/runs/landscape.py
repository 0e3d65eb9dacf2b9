"""Loss and accuracy along lines and planes around a checkpoint, or between two (what ``flatlit landscape`` runs).

Modes: ``line``/``plane``: one/two seeded Gaussian filter-normalised directions (Li et al. 2018, arXiv 1712.09913);
``interpolate``: θ(α) = (1 − α)θ_A + αθ_B over the whole state_dict, BatchNorm statistics included (SPEC F42);
``eigen``: one line along each of the top-k Hessian eigenvectors (Lanczos, or ``--directions`` an
``eigenvectors_step*.pt`` of the HessianEigenvalues callback), one file each, with λ_i in its meta (SPEC F44).
With ``--directions FILE`` in line/plane mode the normalisation (and ``bias_bn``) recorded in the results and named
in the axis labels are the file's, not the ``--norm``/``--bias_bn`` flags' (which only shape directions drawn
here); a file that does not record them (an ``eigenvectors_step*.pt``, an old or hand-made set) says
``unknown/as saved``.
``--alphas a:b:n`` is ``n`` evenly spaced points from a to b (both included). The model and data are rebuilt from
the run's ``config.yaml`` and the loss is the mean training loss on a fixed seeded sample of the training split: the
module's own loss by flatlit's one resolution order (:func:`flatlit.objective.resolve_objective`: ``curvature_loss``
where the module defines it, else a flatlit family's ``training_loss``), on batches of any structure (e.g. the dict
batches of a sequence-to-sequence task). The accuracy is that of the module's class logits (a family's
``accuracy_inputs``: token accuracy for a sequence model); a module without them gets the loss only.

Results go to ``RUN/landscapes/<mode>_<checkpoint>_<hash of the arguments>.npz`` (or ``--output``; eigen mode
appends ``_e1``, ``_e2``, ...) with the directions beside it (``.directions.pt``) and the figures (``.png``). The
file is rewritten every ``--save_every`` points: rerunning the same command after a kill continues where it
stopped. Other arguments give another default file name (the hash), hence a fresh file; an ``--output`` written
with other arguments is an error naming the first difference (``--recompute`` overwrites it). The arguments are
those of the command (:class:`LandscapeOptions`); bad ones raise one :class:`~flatlit.utils.errors.ConfigError`.
Progress goes to stderr: a bar with an ETA on a terminal, else a line every 10 s (points done, elapsed, ETA).

The results also go to the TensorBoard of the (first) checkpoint's run (:mod:`flatlit.runs.tensorboard`; one stderr
line instead when the run has none). ``<kind>`` is the mode (``line``, ``plane``, ``interpolate``) or, in eigen mode,
``eigen_e1``, ``eigen_e2``, ...; a later call of the same kind replaces every value of its tags:

- ``landscape/<kind>/loss``, ``landscape/<kind>/alpha`` and, where the module gives an accuracy,
  ``landscape/<kind>/acc``: a 1-D curve (not a plane), with step = the index i of α along the curve (0 .. n−1),
  so ``alpha`` at step i is the α of the loss at step i;
- images at the checkpoint's global step (unless ``no_plot``): ``landscape/<kind>`` (the line, or the plane's
  contours), ``landscape/plane_3d`` (the plane's surface) and ``landscape/eigen`` (the eigen lines overlaid).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flatlit.runs.load import CheckpointOptions, load_run, sha256, to_device
from flatlit.utils.errors import ConfigError

MODES = ("line", "plane", "interpolate", "eigen")
DEFAULT_RANGE = {"line": (-1.0, 1.0), "plane": (-1.0, 1.0), "eigen": (-1.0, 1.0), "interpolate": (-0.5, 1.5)}
DEFAULT_RESOLUTION = {"line": 51, "plane": 21, "eigen": 51, "interpolate": 41}


@dataclass
class LandscapeOptions(CheckpointOptions):
    """What to compute: the flags of ``flatlit landscape`` (:mod:`flatlit.cli.landscape` documents each)."""

    ckpt_path: list[str]
    mode: str = "line"
    resolution: int | None = None
    alphas: str | None = None
    betas: str | None = None
    bn: str | None = None
    norm: str = "filter"
    bias_bn: str = "ignore"
    directions: str | None = None
    top_k: int = 2
    save_every: int = 10
    no_plot: bool = False


@dataclass
class LandscapeOutput:
    """The results files written (one per direction in eigen mode), their figures and the results themselves."""

    results: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    surfaces: list[Any] = field(default_factory=list)


def parse_range(text: str, arg: str) -> np.ndarray:
    """``a:b:n`` → ``n`` evenly spaced points from a to b; ConfigError naming ``arg`` otherwise."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        a, b = float(parts[0]), float(parts[1])
        n = int(parts[2])
    except ValueError:
        raise ConfigError(
            f"{arg}: expected a:b:n (n evenly spaced points from a to b, e.g. -1:1:51), got {text!r}."
        ) from None
    if n < 2:
        raise ConfigError(f"{arg}: empty range {text!r}: the number of points n must be >= 2, got {n}.")
    if not (np.isfinite(a) and np.isfinite(b)) or a == b:
        raise ConfigError(f"{arg}: empty range {text!r}: the ends a and b must be finite and differ.")
    return grid(a, b, n)


def grid(a: float, b: float, n: int) -> np.ndarray:
    """``np.linspace(a, b, n)`` with values within rounding of 0 set to exactly 0 (the origin itself)."""
    values = np.linspace(a, b, n)
    values[np.abs(values) <= 1e-12 * max(abs(a), abs(b))] = 0.0
    return values


def _check(opts: LandscapeOptions) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Validate the arguments that need no model; returns (alphas, betas or None, bn policy)."""
    ckpts = opts.ckpt_path
    if not ckpts:
        raise ConfigError("--ckpt_path: required (the checkpoint to analyse); see `flatlit landscape --help`.")
    if opts.mode == "interpolate" and len(ckpts) != 2:
        raise ConfigError(
            f"--ckpt_path: --mode interpolate needs two checkpoints (--ckpt_path A --ckpt_path B), got {len(ckpts)}."
        )
    if opts.mode != "interpolate" and len(ckpts) != 1:
        raise ConfigError(
            f"--ckpt_path: --mode {opts.mode} takes one checkpoint, got {len(ckpts)}; two are for --mode interpolate."
        )
    for key in ("num_samples", "batch_size", "save_every", "top_k"):
        if getattr(opts, key) < 1:
            raise ConfigError(f"--{key}: must be >= 1, got {getattr(opts, key)}.")
    if opts.resolution is not None and opts.resolution < 2:
        raise ConfigError(f"--resolution: must be >= 2, got {opts.resolution}.")
    bn = opts.bn or ("interpolate" if opts.mode == "interpolate" else "eval")
    if bn == "interpolate" and opts.mode != "interpolate":
        raise ConfigError(f"--bn: 'interpolate' applies to --mode interpolate only (got --mode {opts.mode}).")
    if opts.directions and opts.mode == "interpolate":
        raise ConfigError("--directions: --mode interpolate takes its direction from the two checkpoints.")
    if opts.directions and not os.path.isfile(opts.directions):
        raise ConfigError(f"--directions: no file at {opts.directions!r}.")
    if opts.betas is not None and opts.mode != "plane":
        raise ConfigError(f"--betas: applies to --mode plane only (got --mode {opts.mode}).")
    lo, hi = DEFAULT_RANGE[opts.mode]
    res = opts.resolution or DEFAULT_RESOLUTION[opts.mode]
    alphas = parse_range(opts.alphas, "--alphas") if opts.alphas else grid(lo, hi, res)
    betas = None
    if opts.mode == "plane":
        betas = (
            parse_range(opts.betas, "--betas") if opts.betas else (alphas.copy() if opts.alphas else grid(lo, hi, res))
        )
    return alphas, betas, bn


def _default_output(opts: LandscapeOptions, folder: str, key: dict[str, Any]) -> str:
    stems = "_".join(os.path.splitext(os.path.basename(c))[0] for c in opts.ckpt_path)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join(folder, "landscapes", f"{opts.mode}_{stems}_{digest}.npz")


class _Progress:
    """A tqdm bar on a terminal; otherwise a line every 10 s: points done/total, elapsed, ETA."""

    def __init__(self, name: str) -> None:
        self.name, self.tty, self.bar = name, sys.stderr.isatty(), None
        self.start = self.last = time.perf_counter()
        self.first: int | None = None
        self.printed = -1

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = done - 1 if done > 0 else 0  # points already in the file when this call started
        if self.tty:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=self.first, desc=self.name, unit="point", file=sys.stderr)
            self.bar.update(done - self.bar.n)
            return
        if (now - self.last < 10.0 and done < total) or done == self.printed:
            return
        self.last, self.printed = now, done
        new = max(done - self.first, 1)
        eta = (now - self.start) / new * (total - done)
        sys.stderr.write(
            f"{self.name}: {done}/{total} points ({100 * done / total:.0f}%), {now - self.start:.0f} s, "
            f"ETA {eta:.0f} s\n"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def compute_landscapes(opts: LandscapeOptions) -> LandscapeOutput:
    """Compute (or continue) the landscape(s) ``opts`` asks for, write them and, unless ``no_plot``, their figures."""
    alphas, betas, bn = _check(opts)
    from flatlit.config import read_checkpoint
    from flatlit.landscape import (
        UNKNOWN_NORMALISATION,
        compute_surface,
        direction_normalisation,
        eigen_directions,
        interpolation_direction,
        is_direction_file,
        load_directions,
        load_eigenvectors,
        random_directions,
        save_directions,
    )

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module, dm, folder, config_path = load_run(
        opts.ckpt_path[0], opts.config, device, arg="--ckpt_path", trust=opts.trust_code
    )
    dm.setup("fit")
    try:
        sample = dm.curvature_batches(opts.num_samples, opts.batch_size, opts.seed)
    except ConfigError as err:
        raise ConfigError(f"--{err}") from None
    batches = [to_device(b, device) for b in sample]
    if not batches:
        raise ConfigError("--num_samples: the sample is empty.")
    objective, functions = _objective(module, batches[0])
    norm = None if opts.norm == "none" else opts.norm
    ckpts = [os.path.abspath(c) for c in opts.ckpt_path]
    meta: dict[str, Any] = {
        "mode": opts.mode,
        "checkpoints": ckpts,
        "checkpoint_sha256": [sha256(c) for c in ckpts],
        "config": os.path.abspath(config_path),
        "directions_file": os.path.abspath(opts.directions) if opts.directions else None,
        "normalisation": norm if opts.mode in ("line", "plane") else None,
        "bias_bn": opts.bias_bn if opts.mode in ("line", "plane") else None,
        "bn": bn,
        "num_samples": opts.num_samples,
        "sample_seed": opts.seed,
        "top_k": opts.top_k if opts.mode == "eigen" else None,
    }
    key = {**meta, "alphas": alphas.tolist(), "betas": None if betas is None else betas.tolist()}
    output = opts.output or _default_output(opts, folder, key)
    dir_path = f"{os.path.splitext(output)[0]}.directions.pt"
    resuming = os.path.isfile(output if opts.mode != "eigen" else _eigen_path(output, 0)) and not opts.recompute

    # ---- directions
    if opts.mode == "interpolate":
        try:
            end = read_checkpoint(opts.ckpt_path[1], trust=opts.trust_code)["state_dict"]
        except ConfigError as err:
            raise ConfigError(str(err).replace("ckpt_path:", "--ckpt_path:", 1)) from None
        try:
            directions = interpolation_direction(module, end)
        except ConfigError as err:
            raise ConfigError(
                f"--ckpt_path: {opts.ckpt_path[1]!r} does not fit the model of {opts.ckpt_path[0]!r}: {err}"
            ) from None
    else:
        source = opts.directions or (dir_path if resuming and os.path.isfile(dir_path) else None)
        if source is not None:
            try:
                directions = (
                    load_directions(source, module)
                    if is_direction_file(source)
                    else load_eigenvectors(source, module, None)
                )
            except ConfigError as err:
                raise ConfigError(f"--directions: {err}") from None
        elif opts.mode == "eigen":
            sys.stderr.write(
                f"landscape: top-{opts.top_k} Hessian eigenvectors by Lanczos on {opts.num_samples} examples\n"
            )
            directions = eigen_directions(
                module,
                batches,
                k=opts.top_k,
                seed=opts.seed,
                batch_loss=objective.loss_of,
                owner="flatlit landscape --mode eigen",
            )
        else:
            num = 2 if opts.mode == "plane" else 1
            directions = random_directions(module, num, opts.seed, norm, opts.bias_bn)
        need = {"line": 1, "plane": 2, "eigen": opts.top_k}[opts.mode]
        if opts.mode == "eigen" and directions.kind != "eigen":
            raise ConfigError(
                f"--directions: {source!r} holds {directions.kind} directions; --mode eigen needs Hessian eigenvectors."
            )
        if len(directions) < need:
            raise ConfigError(
                f"--{'top_k' if opts.mode == 'eigen' else 'directions'}: {opts.mode} needs {need} direction(s); "
                f"{source!r} holds {len(directions)}."
            )
        if source != dir_path:
            save_directions(directions, dir_path)
        if opts.directions and opts.mode in ("line", "plane"):  # the file's normalisation, not the flags'
            meta["normalisation"] = direction_normalisation(directions)
            meta["bias_bn"] = directions.meta.get("bias_bn", UNKNOWN_NORMALISATION)

    # ---- surfaces
    jobs: list[tuple[str, Any, dict[str, Any]]] = []
    if opts.mode == "eigen":
        lams = directions.meta.get("eigenvalues")
        for i in range(opts.top_k):
            extra = {"eigen_index": i + 1, "eigenvalues": lams, "labels": {"alpha": f"α (unit eigenvector e{i + 1})"}}
            jobs.append((_eigen_path(output, i), directions.select(i), {**meta, **extra}))
    else:
        labels = _axis_labels(opts.mode, meta["normalisation"], described=bool(opts.directions))
        jobs.append((output, directions, {**meta, "labels": labels}))
    out = LandscapeOutput()
    written, figures = out.results, out.figures
    images: list[tuple[str, str]] = []  # (TensorBoard tag, PNG path)
    for j, (path, dirs, info) in enumerate(jobs):
        progress = _Progress(f"landscape {os.path.basename(path)}")
        try:
            result = compute_surface(
                module,
                batches,
                dirs,
                alphas,
                betas,
                batch_loss=functions.batch_loss,
                logits_fn=functions.logits_fn,
                bn=bn,
                path=path,
                meta=info,
                save_every=opts.save_every,
                overwrite=opts.recompute,
                seed=opts.seed,
                progress=progress,
            )
        except ConfigError as err:
            raise ConfigError(f"--output: {err}") from None
        finally:
            progress.close()
        written.append(path)
        kind = f"eigen_e{j + 1}" if opts.mode == "eigen" else opts.mode
        if not opts.no_plot:
            from flatlit.figures.landscape import plot_landscape_file

            pngs = plot_landscape_file(path, f"{os.path.splitext(path)[0]}.png")
            figures += pngs
            images += zip((f"landscape/{kind}", f"landscape/{kind}_3d"), pngs)
        out.surfaces.append(result)
    if opts.mode == "eigen" and not opts.no_plot and len(written) > 1:
        from flatlit.figures.landscape import plot_lines

        lams = directions.meta.get("eigenvalues") or []
        labels = [f"e{i + 1}" + (f" (λ = {lams[i]:.3g})" if i < len(lams) else "") for i in range(len(written))]
        figures.append(plot_lines(written, labels, f"{os.path.splitext(output)[0]}_eigen.png"))
        images.append(("landscape/eigen", figures[-1]))
    _to_tensorboard(opts, out, images)
    return out


def _to_tensorboard(opts: LandscapeOptions, out: LandscapeOutput, images: list[tuple[str, str]]) -> None:
    """The call's curves and figures in the run's TensorBoard, in the layout of the module docstring."""
    from flatlit.runs.tensorboard import PosthocBoard

    board = PosthocBoard("landscape", opts.ckpt_path[0], trust=opts.trust_code, replace="tag")
    if board.available:
        for j, result in enumerate(out.surfaces):
            if result.ndim != 1:
                continue
            tag = f"landscape/{f'eigen_e{j + 1}' if opts.mode == 'eigen' else opts.mode}"
            with_acc = bool(np.isfinite(result.acc).any())
            for i in np.flatnonzero(result.done):
                board.scalar(f"{tag}/loss", result.loss[i], step=i)
                board.scalar(f"{tag}/alpha", result.alphas[i], step=i)
                if with_acc:
                    board.scalar(f"{tag}/acc", result.acc[i], step=i)
        for tag, png in images:
            with open(png, "rb") as f:
                board.png(tag, f.read())
    board.write(", ".join(os.path.basename(p) for p in out.results))


_NORM_WORDS = {
    "filter": "filter-normalised",
    "layer": "layer-normalised",
    "model": "model-normalised",
    "none": "unnormalised",
    "unit": "unit-norm",
}


def _axis_labels(mode: str, normalisation: str | None, described: bool) -> dict[str, str]:
    """Axis labels naming the directions' normalisation (``meta["normalisation"]``). Directions drawn here keep
    their historical labels (only ``filter`` is named); directions from a file (``described``) always say what the
    file records, ``unknown/as saved`` included."""
    if mode == "interpolate":
        return {"alpha": "interpolation α (0 = A, 1 = B)"}
    axes = {"alpha": ("α", 1), "beta": ("β", 2)} if mode == "plane" else {"alpha": ("α", 0)}
    if normalisation == "filter" or (described and normalisation in _NORM_WORDS):
        words = _NORM_WORDS[normalisation] + " direction"
        return {k: f"{sym} ({words}{f' {i}' if i else ''})" for k, (sym, i) in axes.items()}
    if described:
        return {
            k: f"{sym} (direction{f' {i}' if i else ''}, normalisation {normalisation})" for k, (sym, i) in axes.items()
        }
    return {k: sym for k, (sym, _) in axes.items()}


def _objective(module: torch.nn.Module, batch: Any) -> tuple[Any, Any]:
    """The module's objective (checked on one batch: one line when its loss fails or is not a scalar) and the
    evaluation functions of the landscape (the accuracy, where the module gives class logits)."""
    from flatlit.landscape.evaluation import evaluation_functions
    from flatlit.objective import resolve_objective
    from flatlit.sharpness.base import observed

    objective = resolve_objective(module, "flatlit landscape")
    with observed(module):  # the module is left as it was
        module.eval()
        objective.check(batch)
    functions = evaluation_functions(objective, batch)
    if functions.no_accuracy is not None:
        sys.stderr.write(f"landscape: {functions.no_accuracy}; the landscape shows the loss only.\n")
    return objective, functions


def _eigen_path(output: str, i: int) -> str:
    stem, ext = os.path.splitext(output)
    return f"{stem}_e{i + 1}{ext or '.npz'}"
