"""Loss and accuracy along 1-D lines and 2-D planes of weight space, evaluated in place, resumable and DDP-split.

A point of a plane is w(α, β) = w₀ + α·d₁ + β·d₂ (Li et al. 2018, arXiv 1712.09913, eq. 1 and §4); a point of a
line drops β; a point of the two-checkpoint line is θ(α) = lerp(θ_A, θ_B, α) (Goodfellow, Vinyals & Saxe 2015,
arXiv 1412.6544; SPEC F42). At each point the mean loss Σ_b n_b L_b / Σ_b n_b and the accuracy are computed on a
fixed sample with every module in eval mode (dropout off).

The loss of a batch is ``loss_fn(model(x), y)`` on ``(x, y)`` batches (default cross-entropy), or, with a
batch-level objective, ``batch_loss(model, batch)`` on batches of any structure (dicts, several inputs, inputs
only; n_b = :func:`flatlit.utils.batching.batch_size`), e.g. the ``loss_of`` of
:func:`flatlit.objective.resolve_objective`. The accuracy is then the fraction of argmax predictions equal to the
labels of ``logits_fn(model, batch) -> (logits (N, C), labels (N,)) | None`` (the objective's ``logits_of``; token
accuracy for a sequence model), and NaN (no accuracy: the plots draw no accuracy axis) without ``logits_fn`` or when
it gives None. Points are written into the model's own tensors with
``copy_``/``add_``/``lerp`` (no model copies, no ``load_state_dict`` per point), and the model comes back bit for
bit (weights, BatchNorm buffers, train/eval flags, ``.grad`` and the global RNG; :func:`~flatlit.sharpness.base.
observed`).

BatchNorm policy (``bn``):

- ``eval``: the running statistics of the origin (for the two-checkpoint line: of checkpoint A);
- ``interpolate``: two-checkpoint line only; the running statistics are interpolated with the weights;
- ``update``: the statistics are re-estimated at every point on the sample with
  ``torch.optim.swa_utils.update_bn`` (one extra forward pass per point; the RNG is seeded per point, so a model
  with dropout gives the same grid on any number of ranks).

Results file (``.npz``, written atomically every ``save_every`` points): ``alphas`` (n,), ``betas`` (m,) (empty
for a line), ``loss`` and ``acc`` of shape (n,) or (n, m) with NaN where not yet evaluated, ``done`` (bool, the
points evaluated; a diverged point is done with a NaN loss) and ``meta``, a JSON string. Rerunning with the same
arguments skips the finished points. A file written with other arguments (another meta, α or β grid) is an error
naming the first difference (``overwrite=True`` starts a fresh file instead): a surface is never silently mixed.

Under ``torch.distributed`` every rank holds the whole sample, point i goes to rank i mod world size, the values
are all-reduced every ``save_every`` points, every rank returns the full grid and rank 0 writes the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flatlit.landscape.directions import DirectionSet
from flatlit.sharpness.base import observed
from flatlit.utils.batching import batch_size
from flatlit.utils.errors import ConfigError

BN_POLICIES = ("eval", "interpolate", "update")
FILE_VERSION = 1
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLossFn = Callable[[nn.Module, Any], torch.Tensor]
LogitsFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor] | None]
Progress = Callable[[int, int], None]


@dataclass
class LandscapeResult:
    """A line or plane of loss/accuracy values (see the module docstring for the file layout)."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    acc: np.ndarray
    done: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return 1 if len(self.betas) == 0 else 2

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def save(self, path: str) -> None:
        """Write the ``.npz`` atomically (a temporary file, then ``os.replace``)."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(
            tmp,
            alphas=self.alphas,
            betas=self.betas,
            loss=self.loss,
            acc=self.acc,
            done=self.done,
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> LandscapeResult:
        """Read a results file; ConfigError naming it when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as data:
                alphas, betas = np.asarray(data["alphas"]), np.asarray(data["betas"])
                loss, acc = np.asarray(data["loss"]), np.asarray(data["acc"])
                done = np.asarray(data["done"]) if "done" in data else np.isfinite(loss)
                meta = json.loads(str(data["meta"]))
        except Exception as err:
            raise ConfigError(
                f"{path!r} is not a readable landscape file ({type(err).__name__}: {err}); delete it or write "
                "elsewhere."
            ) from None
        return cls(alphas, betas, loss, acc, done.astype(bool), meta)


def as_result(result: LandscapeResult | str) -> LandscapeResult:
    """A loaded result, from a result or the path of its file."""
    return result if isinstance(result, LandscapeResult) else LandscapeResult.load(result)


# ---- one point ----------------------------------------------------------------------------------------------------
def _scalar_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"{tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"batch_loss must return the batch-mean loss as a scalar tensor, got {what}")
    return loss.reshape(())


def _objective_terms(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    batch_loss: BatchLossFn | None,
    logits_fn: LogitsFn | None,
) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """(n·L, #correct or None, n, #labels) of one batch under a batch-level objective."""
    n = batch_size(batch)
    if batch_loss is not None:
        loss = _scalar_loss(batch_loss(model, batch))
    else:
        x, y = batch
        loss = loss_fn(model(x), y)
    pair = logits_fn(model, batch) if logits_fn is not None else None
    if pair is None:
        return loss.double() * n, None, n, 0
    logits, labels = pair
    return loss.double() * n, (logits.argmax(1) == labels).sum().double(), n, len(labels)


def evaluate(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn | None = None,
    *,
    batch_loss: BatchLossFn | None = None,
    logits_fn: LogitsFn | None = None,
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` as it is: Σ n_b L_b / Σ n_b and the fraction of argmax predictions equal
    to integer labels. No grad, local data.

    Without ``batch_loss``/``logits_fn``: ``(x, y)`` batches, L_b = ``loss_fn(model(x), y)`` (default cross-entropy),
    accuracy from ``model(x)`` (NaN when the outputs are not class scores). With them: batches of any structure,
    L_b = ``batch_loss(model, batch)`` (else ``loss_fn`` on ``(x, y)``),
    n_b = :func:`flatlit.utils.batching.batch_size`, accuracy over the labels ``logits_fn(model, batch)`` gives (NaN
    without ``logits_fn`` or when it gives None for some batch).
    """
    loss_fn = loss_fn or F.cross_entropy
    losses: list[torch.Tensor] = []
    corrects: list[torch.Tensor | None] = []
    n_total = labelled = 0
    with torch.no_grad():
        for batch in batches:
            if batch_loss is not None or logits_fn is not None:
                loss, correct, n, count = _objective_terms(model, batch, loss_fn, batch_loss, logits_fn)
            else:
                x, y = batch
                out = model(x)
                n = count = len(y)
                loss = loss_fn(out, y).double() * n
                classes = out.dim() == 2 and out.shape[1] >= 2 and y.dim() == 1 and not y.is_floating_point()
                correct = (out.argmax(1) == y).sum().double() if classes else None
            losses.append(loss)
            corrects.append(correct)
            n_total += n
            labelled += count
    if not losses:
        return float("nan"), float("nan")
    has_acc = labelled > 0 and all(c is not None for c in corrects)
    sums = [torch.stack(losses).sum()]
    if has_acc:
        sums.append(torch.stack(corrects).sum())  # type: ignore[arg-type]
    total = torch.stack(sums).cpu()
    return float(total[0]) / n_total, float(total[1]) / labelled if has_acc else float("nan")


def update_bn_statistics(model: nn.Module, batches: Sequence[Any], forward: Callable[[Any], Any]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` as ``torch.optim.swa_utils.update_bn`` does
    (statistics reset, cumulative averages, the whole model in train mode, no grad), with ``forward(batch)``
    evaluating the model on a batch of any structure; the train flags are restored."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = {m: m.momentum for m in bns}
    flags = [(m, m.training) for m in model.modules()]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(batch)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, flag in flags:
            m.training = flag


class PointWriter:
    """Writes the points of a :class:`DirectionSet` into the model's tensors in place.

    ``write(a, b)`` sets every moved tensor t to t₀ + a·d₁ + b·d₂ (``copy_`` then ``add_``, so a = b = 0 is the
    origin bit for bit), or to ``lerp(t₀, t_B, a)`` for an ``interpolate`` set. ``bn_buffers=False`` leaves the
    BatchNorm buffers at the origin.
    """

    def __init__(self, model: nn.Module, directions: DirectionSet, bn_buffers: bool = True) -> None:
        state = model.state_dict(keep_vars=True)
        buffers = {n for n, _ in model.named_buffers()}
        keep = [i for i, n in enumerate(directions.names) if bn_buffers or n not in buffers]
        self.lerp = directions.kind == "interpolate"
        self.targets = [state[directions.names[i]] for i in keep]
        self.origin = [t.detach().clone() for t in self.targets]
        self.vectors = [
            [vec[i].to(device=t.device, dtype=t.dtype) for i, t in zip(keep, self.targets)]
            for vec in directions.vectors
        ]
        self.float_idx = [i for i, t in enumerate(self.targets) if t.is_floating_point()]
        self.int_idx = [i for i, t in enumerate(self.targets) if not t.is_floating_point()]

    @torch.no_grad()
    def write(self, a: float, b: float | None = None) -> None:
        if self.lerp:
            end = self.vectors[0]
            for i in self.float_idx:
                torch.lerp(self.origin[i], end[i], a, out=self.targets[i].data)
            for i in self.int_idx:
                self.targets[i].copy_(self.origin[i] if a < 0.5 else end[i])
            return
        targets = [t.data for t in self.targets]
        torch._foreach_copy_(targets, self.origin)
        if a != 0.0:
            torch._foreach_add_(targets, self.vectors[0], alpha=a)
        if b is not None and b != 0.0:
            torch._foreach_add_(targets, self.vectors[1], alpha=b)

    @torch.no_grad()
    def restore(self) -> None:
        for t, o in zip(self.targets, self.origin):
            t.copy_(o)


# ---- the grid -----------------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key} = {old.get(key)!r} in the file, {new.get(key)!r} now"
    return None


def _world() -> tuple[int, int, bool]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _resume(path: str | None, fresh: LandscapeResult, overwrite: bool, distributed: bool) -> LandscapeResult:
    """The file's finished points when it holds the same surface; ConfigError naming the first difference."""
    rank = dist.get_rank() if distributed else 0
    payload: list[Any] = [None]
    if rank == 0:
        try:
            if path is not None and os.path.isfile(path) and not overwrite:
                old = LandscapeResult.load(path)
                diff = _first_difference(old.meta, fresh.meta)
                if diff is None and not np.array_equal(old.alphas, fresh.alphas):
                    diff = "the α grid differs"
                if diff is None and not np.array_equal(old.betas, fresh.betas):
                    diff = "the β grid differs"
                if diff is not None:
                    raise ConfigError(
                        f"{path!r} holds a landscape computed with other arguments ({diff}); write to another file, "
                        "or overwrite it (flatlit landscape --recompute)."
                    )
                payload[0] = ("ok", old.loss, old.acc, old.done)
            else:
                payload[0] = ("ok", fresh.loss, fresh.acc, fresh.done)
        except ConfigError as err:
            payload[0] = ("error", str(err))
    if distributed:
        dist.broadcast_object_list(payload, src=0)
    status, *rest = payload[0]
    if status == "error":
        raise ConfigError(rest[0])
    loss, acc, done = rest
    return LandscapeResult(fresh.alphas, fresh.betas, np.array(loss), np.array(acc), np.array(done), fresh.meta)


def compute_surface(
    model: nn.Module,
    batches: Sequence[Any],
    directions: DirectionSet,
    alphas: Sequence[float] | np.ndarray,
    betas: Sequence[float] | np.ndarray | None = None,
    *,
    loss_fn: LossFn | None = None,
    batch_loss: BatchLossFn | None = None,
    logits_fn: LogitsFn | None = None,
    bn: str = "eval",
    path: str | None = None,
    meta: dict[str, Any] | None = None,
    save_every: int = 10,
    overwrite: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> LandscapeResult:
    """Loss and accuracy on a line (``betas`` None) or plane of ``directions`` around the model's weights.

    Args:
        model: the network at the origin w₀ (θ_A for an ``interpolate`` set); unwrapped, not a DDP wrapper.
        batches: the fixed sample on the model's device (the whole sample on every rank): (x, y) batches, or
            batches of any structure with ``batch_loss``.
        directions: a :class:`DirectionSet` with ≥ 1 direction (≥ 2 for a plane; the first ones are used).
        alphas, betas: the grid coordinates along d₁ and d₂.
        loss_fn: ``loss_fn(model(x), y)``, the batch-mean loss (default cross-entropy).
        batch_loss: ``batch_loss(model, batch)``, the batch-mean loss of a batch of any structure (e.g. the
            ``loss_of`` of :func:`flatlit.objective.resolve_objective`); replaces ``loss_fn``.
        logits_fn: ``logits_fn(model, batch) -> (logits (N, C), labels (N,)) | None`` for the accuracy (e.g. the
            objective's ``logits_of``); with ``batch_loss`` and without it, the accuracy is NaN (not measured).
        bn: ``eval``, ``interpolate`` (``interpolate`` sets only) or ``update`` (see the module docstring; with
            ``batch_loss`` the statistics are re-estimated through it).
        path: the results ``.npz`` (None: nothing written); finished points found there are skipped.
        meta: the caller's description of the surface (mode, checkpoints, ...), stored in the file's ``meta`` with
            bn, the sample size, the direction kind/metadata and digest; a file with another meta is an error.
        save_every: write the file (and, under DDP, gather the values) every this many points.
        overwrite: start afresh even when ``path`` holds another surface.
        seed: seeds the BatchNorm re-estimation of point i (``bn="update"``) with ``seed + i``.
        progress: ``progress(points_done, total)`` after every point.

    Returns:
        The full grid, on every rank.
    """
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be one of {', '.join(BN_POLICIES)}, got {bn!r}")
    if bn == "interpolate" and directions.kind != "interpolate":
        raise ValueError("bn='interpolate' applies to the line between two checkpoints only")
    plane = betas is not None
    if len(directions) < (2 if plane else 1):
        raise ValueError(
            f"a {'plane' if plane else 'line'} needs {2 if plane else 1} direction(s), got {len(directions)}"
        )
    if plane and directions.kind == "interpolate":
        raise ValueError("the line between two checkpoints has one direction: pass betas=None")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    loss_fn = loss_fn or F.cross_entropy
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    b = np.asarray(betas if plane else [], dtype=np.float64).reshape(-1)
    shape = (len(a), len(b)) if plane else (len(a),)
    if len(a) == 0 or (plane and len(b) == 0):
        raise ValueError("the α and β grids must not be empty")
    rank, world, distributed = _world()
    info = {
        **_jsonable(meta or {}),
        "version": FILE_VERSION,
        "bn": bn,
        "num_samples": int(sum(batch_size(batch) for batch in batches)),
        "direction_kind": directions.kind,
        "direction_meta": _jsonable(directions.meta),
        "direction_digest": directions.select(*range(2 if plane else 1)).digest(),
        "bn_seed": seed if bn == "update" else None,
    }
    nan = np.full(shape, np.nan)
    result = _resume(path, LandscapeResult(a, b, nan, nan.copy(), np.zeros(shape, bool), info), overwrite, distributed)
    flat_loss, flat_acc, flat_done = result.loss.ravel(), result.acc.ravel(), result.done.ravel()
    pending = [i for i in range(flat_done.size) if not flat_done[i]]
    total = flat_done.size
    done_count = total - len(pending)
    chunk = math.ceil(save_every / world) * world
    dev = torch.device("cpu") if not distributed or dist.get_backend() == "gloo" else next(model.parameters()).device
    with observed(model):
        model.eval()
        writer = PointWriter(model, directions, bn_buffers=(bn == "interpolate"))
        for start in range(0, len(pending), chunk):
            part = pending[start : start + chunk]
            vals = torch.zeros(3, len(part), dtype=torch.float64, device=dev)
            for j, i in enumerate(part):
                if i % world != rank:
                    continue
                ia, ib = divmod(i, len(b)) if plane else (i, 0)
                writer.write(float(a[ia]), float(b[ib]) if plane else None)
                if bn == "update":
                    torch.manual_seed(seed + i)
                    if batch_loss is None:
                        torch.optim.swa_utils.update_bn(batches, model)
                    else:
                        update_bn_statistics(model, batches, lambda batch: batch_loss(model, batch))
                    model.eval()
                vals[0, j], vals[1, j] = evaluate(model, batches, loss_fn, batch_loss=batch_loss, logits_fn=logits_fn)
                vals[2, j] = 1.0
                if progress is not None:
                    progress(min(total, done_count + (j + 1)), total)
            if distributed:
                dist.all_reduce(vals)
            v = vals.cpu().numpy()
            flat_loss[part], flat_acc[part], flat_done[part] = v[0], v[1], v[2] > 0
            result.loss, result.acc, result.done = (
                flat_loss.reshape(shape),
                flat_acc.reshape(shape),
                flat_done.reshape(shape),
            )
            done_count += len(part)
            if path is not None and rank == 0:
                result.save(path)
            if progress is not None:
                progress(done_count, total)
        writer.restore()
    return result
