"""Directions of a loss-landscape plot: filter-normalised random directions, Hessian eigenvectors, and the line
between two checkpoints; saved with their metadata so a surface can be redrawn or extended.

Filter normalisation (Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018, arXiv 1712.09913, §4): draw d ~ N(0, I) with the shape of every weight tensor w, then rescale each
filter (slice along dim 0: a conv filter, a row of a linear layer) to the norm of the matching filter of w,

    d_i ← d_i / ‖d_i‖ · ‖w_i‖,

so that a step α·d moves every filter by the same fraction α of its own norm and the plot does not depend on the
scale invariance of ReLU/BatchNorm networks. 1-D parameters (biases, BatchNorm γ/β) are zeroed by default
(``bias_bn="ignore"``, Li et al.'s ``biasbn``) or normalised by the same rule (``"filter"``: per element,
d_i ← sign(d_i)·|w_i|). Other normalisations: ``"layer"`` (d ← d/‖d‖·‖w‖ per tensor), ``"model"`` (one factor
‖w‖/‖d‖ over all tensors) and ``None`` (the raw Gaussian draw).

A :class:`DirectionSet` names the ``state_dict`` entries it moves. For random and eigen directions these are the
trainable parameters (BatchNorm buffers are not moved). For the line between two checkpoints it is the whole
``state_dict``, BatchNorm running statistics included (SPEC F42), and the set holds the end point θ_B itself:
points are ``torch.lerp(θ_A, θ_B, α)``, exact at α = 0 and α = 1.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flatlit.utils.errors import ConfigError

NORMS = ("filter", "layer", "model", None)
BIAS_BN = ("ignore", "filter")
KINDS = ("random", "eigen", "interpolate")
FORMAT = "flatlit-directions"
VERSION = 1
#: the normalisation of a direction set that does not record one (an eigenvectors_step*.pt, a hand-made set)
UNKNOWN_NORMALISATION = "unknown/as saved"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DirectionSet:
    """Directions over named ``state_dict`` entries of a model.

    Attributes:
        kind: ``random``, ``eigen`` or ``interpolate``.
        names: the ``state_dict`` keys the directions move (the others stay at the origin).
        shapes: their shapes.
        vectors: ``vectors[i][j]`` is direction i on tensor ``names[j]``; for ``interpolate`` the single "vector"
            is the end point θ_B (see the module docstring).
        meta: seed, normalisation, eigenvalues, source files, ... (JSON-serialisable).
        signature: ``(name, shape)`` of every trainable parameter of the model the set was made for, so loading it
            for another architecture fails clearly.
        normalisation: how the directions were scaled (``filter``, ``layer``, ``model``, ``none``, ``unit`` for
            Hessian eigenvectors), saved in the file by :func:`save_directions`; None when not known (see
            :func:`direction_normalisation`).
    """

    kind: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    vectors: list[list[torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)
    signature: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    normalisation: str | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    def select(self, *indices: int) -> DirectionSet:
        """The set restricted to the directions ``indices`` (e.g. one eigenvector); ``meta["selected"]`` records
        them."""
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"direction {i} out of range: the set holds {len(self)}")
        meta = {**self.meta, "selected": [int(i) for i in indices]}
        return DirectionSet(
            self.kind,
            self.names,
            self.shapes,
            [self.vectors[i] for i in indices],
            meta,
            self.signature,
            self.normalisation,
        )

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the names, shapes and direction values: identifies a surface's directions."""
        h = hashlib.sha256()
        h.update(repr((self.kind, self.names, [tuple(s) for s in self.shapes])).encode())
        for vec in self.vectors:
            for t in vec:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def direction_normalisation(directions: DirectionSet) -> str:
    """The normalisation the set was made with: its ``normalisation`` (as written in its file), else the ``norm``
    its metadata records (random sets saved before the field existed; None is ``"none"``), else
    :data:`UNKNOWN_NORMALISATION` (``"unknown/as saved"``)."""
    if directions.normalisation:
        return str(directions.normalisation)
    if "norm" in directions.meta:
        norm = directions.meta["norm"]
        return "none" if norm is None else str(norm)
    return UNKNOWN_NORMALISATION


def model_signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every trainable parameter, in order."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---- normalisation ------------------------------------------------------------------------------------------------
def normalize_direction(
    direction: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    norm: str | None = "filter",
    bias_bn: str = "ignore",
    eps: float = 1e-10,
) -> list[torch.Tensor]:
    """Rescale ``direction`` to the scale of ``weights`` (Li et al. 2018, §4; see the module docstring).

    Args:
        direction, weights: matching lists of tensors.
        norm: ``filter`` (d_i ← d_i/‖d_i‖·‖w_i‖ for every slice i along dim 0), ``layer`` (per tensor), ``model``
            (one factor over all tensors) or None (unchanged).
        bias_bn: ``ignore`` (1-D tensors, i.e. biases and BatchNorm γ/β, are zeroed) or ``filter`` (normalised by
            the same rule as the weights; per element under ``filter``).
        eps: added to ‖d‖ (as in Li et al.'s code) so a zero draw gives zero.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(str, NORMS))}, got {norm!r}")
    if bias_bn not in BIAS_BN:
        raise ValueError(f"bias_bn must be one of {', '.join(BIAS_BN)}, got {bias_bn!r}")
    out: list[torch.Tensor] = []
    for d, w in zip(direction, weights):
        d = d.clone()
        if d.dim() <= 1 and bias_bn == "ignore":
            d.zero_()
        elif norm == "filter":
            if d.dim() == 0:
                d.mul_(w.abs() / (d.abs() + eps))
            else:
                dims = tuple(range(1, d.dim()))
                d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True) if dims else d.abs()
                w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True) if dims else w.abs()
                d.mul_(w_norm / (d_norm + eps))
        elif norm == "layer":
            d.mul_(w.norm() / (d.norm() + eps))
        out.append(d)
    if norm == "model":
        kept = [(d, w) for d, w in zip(out, weights) if not (d.dim() <= 1 and bias_bn == "ignore")]
        d_norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d, _ in kept))
        w_norm = math.sqrt(sum(float(w.double().pow(2).sum()) for _, w in kept))
        for d, _ in kept:
            d.mul_(w_norm / (d_norm + eps))
    return out


def random_directions(
    model: nn.Module,
    num: int = 1,
    seed: int = 0,
    norm: str | None = "filter",
    bias_bn: str = "ignore",
    params: Sequence[nn.Parameter] | None = None,
) -> DirectionSet:
    """``num`` seeded Gaussian directions over the trainable parameters (or over ``params`` only, e.g. from
    :func:`flatlit.objective.select_parameters`: the others do not move), normalised to the current weights.

    The draws come from a CPU ``torch.Generator`` seeded with ``seed`` in float64 (direction 1, then 2, tensor by
    tensor in the model's parameter order), so every device, dtype and rank gets the same directions; the global RNG
    is not touched.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if params is None:
        named = _trainable(model)
    else:
        ids = {id(p) for p in params}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
        if len(named) != len(ids):
            raise ValueError("params: every parameter must be a parameter of the model")
        if not named:
            raise ValueError("params: selects no parameter")
    gen = torch.Generator().manual_seed(seed)
    weights = [p.detach() for _, p in named]
    vectors = []
    for _ in range(num):
        draw = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in weights]
        normed = normalize_direction(draw, [w.double().cpu() for w in weights], norm, bias_bn)
        vectors.append([d.to(device=w.device, dtype=w.dtype) for d, w in zip(normed, weights)])
    return DirectionSet(
        "random",
        [n for n, _ in named],
        [tuple(p.shape) for _, p in named],
        vectors,
        {"seed": seed, "norm": norm, "bias_bn": bias_bn},
        model_signature(model),
        "none" if norm is None else norm,
    )


# ---- Hessian eigenvectors -----------------------------------------------------------------------------------------
def eigen_directions(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn | None = None,
    k: int = 2,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    params: Sequence[nn.Parameter] | None = None,
    *,
    batch_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    owner: str = "eigen_directions",
) -> DirectionSet:
    """The top-k Hessian eigenvectors (unit norm in parameter space) of the mean loss on ``batches``, by Lanczos
    with full reorthogonalisation (:mod:`flatlit.curvature`; BatchNorm on running statistics, dropout off).
    ``meta`` holds the eigenvalues (descending), residuals and the number of HVPs.

    The loss is ``loss_fn(model(x), y)`` on ``(x, y)`` batches (default cross-entropy), or ``batch_loss(model,
    batch)`` on batches of any structure (e.g. the ``loss_of`` of :func:`flatlit.objective.resolve_objective`). The
    second derivatives run under :func:`flatlit.objective.twice_differentiable` (the math attention kernel; an op
    without a double backward is one ConfigError naming it and ``owner``)."""
    from flatlit.curvature import HessianOperator, lanczos
    from flatlit.objective import twice_differentiable

    closure = None if batch_loss is None else (lambda batch: batch_loss(model, batch))
    op = HessianOperator(model, batches, loss_fn or F.cross_entropy, params, batch_loss=closure)
    if not 1 <= k <= op.numel:
        raise ValueError(f"k must lie in [1, {op.numel}], got {k}")
    with twice_differentiable(owner):
        res = lanczos(op.matvec, op.numel, k, max(max_iter, k), tol, seed, "LA", op.dtype, op.device)
    ids = {id(p) for p in op.params}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    assert res.eigenvectors is not None
    vectors = [_unflatten(v, [p for _, p in named]) for v in res.eigenvectors]
    meta = {
        "eigenvalues": [float(x) for x in res.eigenvalues],
        "residuals": [float(x) for x in res.residuals],
        "hvps": int(res.num_matvecs),
        "converged": bool(res.converged),
        "seed": seed,
    }
    return DirectionSet(
        "eigen",
        [n for n, _ in named],
        [tuple(p.shape) for _, p in named],
        vectors,
        meta,
        model_signature(model),
        "unit",
    )


def _unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].view_as(t).to(device=t.device, dtype=t.dtype).clone())
        i += t.numel()
    return out


def load_eigenvectors(path: str, model: nn.Module, k: int | None = None) -> DirectionSet:
    """Eigenvectors saved by :class:`~flatlit.callbacks.HessianEigenvalues` (``eigenvectors_step{N}.pt``: a k × n
    tensor of flat Ritz vectors), as a direction set for ``model``.

    The flat vectors run over the callback's parameters: all trainable ones, or without BatchNorm parameters and/or
    biases (``exclude_bn``/``exclude_bias``); the subset is found from n. The eigenvalues are read from
    ``eigenvalues.npz`` in the same folder (the row of step N) when it is there. Raises ConfigError naming the file
    when n fits none of the subsets.
    """
    from flatlit.curvature import select_params

    try:
        vecs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{path!r} is not a readable eigenvector file ({type(err).__name__}: {err}).") from None
    if not isinstance(vecs, torch.Tensor) or vecs.dim() != 2:
        raise ConfigError(f"{path!r} does not hold a k × n tensor of eigenvectors (eigenvectors_step{{N}}.pt).")
    n = vecs.shape[1]
    named = None
    for exclude_bn, exclude_bias in ((False, False), (True, False), (False, True), (True, True)):
        ids = {id(p) for p in select_params(model, exclude_bn, exclude_bias)}
        cand = [(name, p) for name, p in model.named_parameters() if id(p) in ids]
        if sum(p.numel() for _, p in cand) == n:
            named = cand
            break
    if named is None:
        total = sum(p.numel() for _, p in _trainable(model))
        raise ConfigError(
            f"{path!r} holds eigenvectors of length {n}, but this model has {total} trainable parameters (and no "
            "subset without BatchNorm parameters or biases has that size): it was saved for another model."
        )
    k = vecs.shape[0] if k is None else k
    if not 1 <= k <= vecs.shape[0]:
        raise ConfigError(f"{path!r} holds {vecs.shape[0]} eigenvectors; asked for {k}.")
    weights = [p.detach() for _, p in named]
    vectors = [_unflatten(v, weights) for v in vecs[:k]]
    meta: dict[str, Any] = {"source": os.path.abspath(path)}
    match = re.search(r"step(\d+)", os.path.basename(path))
    npz = os.path.join(os.path.dirname(os.path.abspath(path)), "eigenvalues.npz")
    if match and os.path.isfile(npz):
        with np.load(npz) as data:
            steps = list(data["steps"] if "steps" in data else data["step"])
            if int(match.group(1)) in steps:
                row = steps.index(int(match.group(1)))
                meta["eigenvalues"] = [float(x) for x in np.asarray(data["eigenvalues"])[row][:k]]
    return DirectionSet(
        "eigen", [n for n, _ in named], [tuple(p.shape) for _, p in named], vectors, meta, model_signature(model)
    )


# ---- two checkpoints ----------------------------------------------------------------------------------------------
def interpolation_direction(model: nn.Module, end_state: dict[str, torch.Tensor]) -> DirectionSet:
    """The line from the model's current weights θ_A to ``end_state`` θ_B over every ``state_dict`` entry (BatchNorm
    running statistics and counters included; which of them move is the evaluator's ``bn`` policy).

    Floating entries are interpolated with ``torch.lerp`` (θ(α) = θ_A + α(θ_B − θ_A), exact at both ends); integer
    entries (``num_batches_tracked``) take the nearer end point. Raises ConfigError naming the first entry of the
    model that ``end_state`` lacks or holds with another shape.
    """
    names, shapes, ends = [], [], []
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in end_state:
            raise ConfigError(f"the second checkpoint has no entry {name!r} (shape {tuple(t.shape)}): another model.")
        e = end_state[name]
        if tuple(e.shape) != tuple(t.shape):
            raise ConfigError(
                f"entry {name!r} has shape {tuple(e.shape)} in the second checkpoint and {tuple(t.shape)} in the "
                "first: another architecture."
            )
        names.append(name)
        shapes.append(tuple(t.shape))
        ends.append(e.detach().to(device=t.device, dtype=t.dtype).clone())
    return DirectionSet("interpolate", names, shapes, [ends], {}, model_signature(model))


# ---- files --------------------------------------------------------------------------------------------------------
def save_directions(directions: DirectionSet, path: str) -> None:
    """Save the set (tensors on the CPU) with its metadata and its normalisation (:func:`direction_normalisation`,
    ``"unknown/as saved"`` when not known) to ``path`` (``.pt``), atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": directions.kind,
        "names": list(directions.names),
        "shapes": [list(s) for s in directions.shapes],
        "vectors": [[t.detach().cpu() for t in vec] for vec in directions.vectors],
        "meta": directions.meta,
        "signature": [[n, list(s)] for n, s in directions.signature],
        "normalisation": direction_normalisation(directions),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def is_direction_file(path: str) -> bool:
    """Whether ``path`` was written by :func:`save_directions` (not e.g. an ``eigenvectors_step*.pt``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_directions(path: str, model: nn.Module) -> DirectionSet:
    """A set saved by :func:`save_directions`, checked against ``model`` and moved to its device and dtypes.

    Raises:
        ConfigError: naming the file and the first parameter whose name or shape differs (another architecture), or
            when the file is not a direction set.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{path!r} is not a readable direction file ({type(err).__name__}: {err}).") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ConfigError(f"{path!r} is not a flatlit direction file (written by save_directions).")
    mine = model_signature(model)
    theirs = [(n, tuple(s)) for n, s in obj.get("signature", [])]
    for i in range(max(len(mine), len(theirs))):
        a = theirs[i] if i < len(theirs) else None
        b = mine[i] if i < len(mine) else None
        if a != b:
            if a is None:
                what = f"the model's parameter {b[0]!r} {b[1]} is not in the file"
            elif b is None:
                what = f"parameter {a[0]!r} {a[1]} of the file is not in the model"
            elif a[0] != b[0]:
                what = f"parameter {i} is {a[0]!r} in the file and {b[0]!r} in the model"
            else:
                what = f"parameter {a[0]!r} has shape {a[1]} in the file and {b[1]} in the model"
            raise ConfigError(f"direction file {path!r} was made for another model: {what}.")
    state = model.state_dict(keep_vars=True)
    names, shapes = list(obj["names"]), [tuple(s) for s in obj["shapes"]]
    for name, shape in zip(names, shapes):
        if name not in state or tuple(state[name].shape) != shape:
            got = tuple(state[name].shape) if name in state else "missing"
            raise ConfigError(
                f"direction file {path!r} was made for another model: entry {name!r} {shape} in the file, {got} in "
                "the model."
            )
    vectors = [
        [t.to(device=state[n].device, dtype=state[n].dtype) for n, t in zip(names, vec)] for vec in obj["vectors"]
    ]
    normalisation = obj.get("normalisation")
    if normalisation == UNKNOWN_NORMALISATION:
        normalisation = None
    return DirectionSet(obj["kind"], names, shapes, vectors, dict(obj.get("meta", {})), mine, normalisation)
