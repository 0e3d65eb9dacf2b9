"""Evaluating a model for the measures: sample losses and gradients, observe-never-perturb, BatchNorm, noise.

Every loss evaluation of a measure sums ``n_b L_b`` over the batches of the sample and, under ``torch.distributed``,
over ranks (:func:`all_reduce_sum`), so every rank computes the same value. :func:`observed` restores the model bit
for bit around a measure and :func:`set_bn_policy` puts it in its measuring mode; :func:`fold_batchnorm` and
:func:`fold_state` fold BatchNorm into the preceding layer (for the model and for its initial weights alike).
Randomness comes from a seeded CPU ``torch.Generator`` (:func:`generator`), so every device and rank agrees.
Nothing here imports the registry (:mod:`flatlit.sharpness.base`), which re-exports these names.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatlit.utils.batching import batch_size
from flatlit.utils.nn import preserved_rng

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> batch-mean loss
Batch = Any  # an (x, y) pair, or any structure a ``batch_loss`` understands
BN_POLICIES = ("eval", "train", "fold")


# ---- observe, never perturb ----------------------------------------------------------------------------------------
@contextmanager
def observed(model: nn.Module) -> Iterator[None]:
    """Restore, on exit, every parameter and buffer bit for bit, every module's train flag, every ``.grad``
    (the same tensor objects) and the torch/NumPy/Python RNG states."""
    params = list(model.parameters())
    saved = [t.detach().clone() for t in params] + [b.detach().clone() for b in model.buffers()]
    grads = [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    flags = [(m, m.training) for m in model.modules()]
    try:
        with preserved_rng():
            yield
    finally:
        with torch.no_grad():
            for t, v in zip([*params, *model.buffers()], saved):
                t.copy_(v)
        for p, (g, value) in zip(params, grads):
            p.grad = g
            if g is not None:
                with torch.no_grad():
                    g.copy_(value)
        for m, flag in flags:
            m.training = flag


def set_bn_policy(model: nn.Module, bn: str) -> None:
    """Evaluation mode for a measure: dropout off; BatchNorm on running statistics (``eval``, ``fold``) or on batch
    statistics (``train``; the buffers it updates are restored by :func:`observed`)."""
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be one of {', '.join(BN_POLICIES)}, got {bn!r}")
    model.eval()
    if bn == "train":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()


class FoldedBatchNorm(nn.Identity):
    """The identity left in place of a BatchNorm folded by :func:`fold_batchnorm`; remembers the BN's ``eps`` (which
    a state_dict does not hold) so initial weights can be folded with the same ε."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) in which every BatchNorm that directly follows a Conv/Linear layer inside an
    ``nn.Sequential`` is folded into that layer (w' = γ w / √(σ² + ε), b' = γ (b − μ) / √(σ² + ε) + β) and replaced
    by the identity (:class:`FoldedBatchNorm`): the same function, with the BN scale visible in the weights
    (Neyshabur's ``reparam``, SPEC F35). BatchNorms that cannot be folded this way are kept."""
    import copy

    return _fold_in_place(copy.deepcopy(model))


def fold_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a full state_dict of ``model``'s architecture, e.g. its initial weights) folded exactly as
    :func:`fold_batchnorm` folds ``model``: the state_dict of ``fold_batchnorm`` applied to a copy of ``model``
    holding ``state``, so each BN is folded with the statistics, γ, β and ε *of that state* (the initial model's
    own), in the model's dtype and on its device, by the same operations (at θ = θ₀ both sides agree bit for bit).
    A ``state`` that does not load into ``model`` (missing or extra entries, other shapes) is returned unchanged."""
    import copy

    twin = copy.deepcopy(model)
    try:
        twin.load_state_dict(state)
    except (RuntimeError, KeyError):
        return state
    return {k: v.detach().clone() for k, v in _fold_in_place(twin).state_dict().items()}


def _fold_in_place(folded: nn.Module) -> nn.Module:
    folded.eval()
    with torch.no_grad():
        for seq in folded.modules():
            if not isinstance(seq, nn.Sequential):
                continue
            names = list(seq._modules)
            for prev_name, name in itertools.pairwise(names):
                prev, bn = seq._modules[prev_name], seq._modules[name]
                if not isinstance(bn, _BatchNorm) or not isinstance(prev, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                    continue
                if bn.running_mean is None:
                    continue
                scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
                    bn.running_var + bn.eps
                )
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                prev.weight.mul_(scale.view(-1, *([1] * (prev.weight.ndim - 1))))
                bias = prev.bias if prev.bias is not None else torch.zeros_like(bn.running_mean)
                new_bias = (bias - bn.running_mean) * scale + shift
                if prev.bias is None:
                    prev.bias = nn.Parameter(new_bias)
                else:
                    prev.bias.copy_(new_bias)
                seq._modules[name] = FoldedBatchNorm(bn.eps)
    return folded


# ---- evaluation over the sample ------------------------------------------------------------------------------------
def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity without torch.distributed)."""
    if distributed():
        dist.all_reduce(t)
    return t


def sample_size(batches: Sequence[Batch]) -> int:
    """Examples in the sample over all ranks (:func:`flatlit.utils.batching.batch_size` of each batch)."""
    n = torch.tensor(float(sum(batch_size(b) for b in batches)), dtype=torch.float64)
    return int(all_reduce_sum(n).item())


def batch_loss_of(model: nn.Module, batch: Batch, loss_fn: LossFn | None = None, batch_loss: BatchLossFn | None = None):
    """The batch-mean loss of ``model`` on one batch: ``batch_loss(model, batch)`` when given, else
    ``loss_fn(model(x), y)`` (default cross-entropy) with ``x, y = batch``."""
    if batch_loss is not None:
        return batch_loss(model, batch)
    x, y = batch
    return (loss_fn or F.cross_entropy)(model(x), y)


def mean_loss(
    model: nn.Module,
    batches: Sequence[Batch],
    loss_fn: LossFn | None = None,
    reduce: bool = True,
    *,
    batch_loss: BatchLossFn | None = None,
) -> float:
    """Σ_b n_b L_b / Σ_b n_b over the sample (all ranks; this rank's ``batches`` only when ``reduce`` is False),
    no grad: one forward pass. L_b is ``batch_loss(model, batch)`` when given, else ``loss_fn(model(x), y)``
    (default cross-entropy); n_b = :func:`flatlit.utils.batching.batch_size`."""
    dev = next(model.parameters()).device
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for batch in batches:
            n = batch_size(batch)
            acc[0] += _scalar(batch_loss_of(model, batch, loss_fn, batch_loss), batch_loss).double() * n
            acc[1] += n
    if reduce:
        acc = all_reduce_sum(acc)
    return float(acc[0] / acc[1])


def _scalar(loss: Any, batch_loss: BatchLossFn | None) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        what = "batch_loss" if batch_loss is not None else "loss_fn"
        raise ValueError(f"{what} must return the batch-mean loss as a scalar tensor, got {shape}")
    return loss.reshape(())


def loss_and_grad(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[Batch],
    loss_fn: LossFn | None = None,
    reduce: bool = True,
    *,
    batch_loss: BatchLossFn | None = None,
) -> tuple[float, list[torch.Tensor]]:
    """Mean loss and its gradient over the sample by ``torch.autograd.grad`` (``.grad`` untouched): over all ranks,
    or over this rank's ``batches`` only when ``reduce`` is False (e.g. m-sharpness chunks, which differ by rank).
    The loss of a batch is ``batch_loss(model, batch)`` when given, else ``loss_fn(model(x), y)``."""
    dev = params[0].device
    grads = [torch.zeros_like(p) for p in params]
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    for batch in batches:
        n = batch_size(batch)
        with torch.enable_grad():
            loss = _scalar(batch_loss_of(model, batch, loss_fn, batch_loss), batch_loss)
            g = torch.autograd.grad(loss, list(params), allow_unused=True)
        for buf, gi in zip(grads, g):
            if gi is not None:
                buf.add_(gi, alpha=n)
        acc[0] += loss.detach().double() * n
        acc[1] += n
    flat = torch.cat([acc.to(grads[0].dtype), *[g.reshape(-1) for g in grads]])
    if reduce:
        flat = all_reduce_sum(flat)
    total = float(flat[1])
    out, i = [], 2
    for g in grads:
        out.append(flat[i : i + g.numel()].view_as(g) / total)
        i += g.numel()
    return float(flat[0]) / total, out


def narrow_batch(batch: Batch, start: int, length: int) -> Batch:
    """Examples ``start`` to ``start + length`` of ``batch``: every tensor with a leading dimension is sliced along
    dim 0, tuples/lists/dicts keep their structure, other values are kept."""
    if isinstance(batch, torch.Tensor):
        return batch[start : start + length] if batch.ndim else batch
    if isinstance(batch, dict):
        return type(batch)({k: narrow_batch(v, start, length) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        parts = [narrow_batch(v, start, length) for v in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*parts)
        return type(batch)(parts)
    return batch


@contextmanager
def perturbed(params: Sequence[torch.Tensor], delta: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily add ``delta`` to ``params`` (restored exactly from a copy, not by subtraction)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def mc_stats(samples: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of Monte-Carlo samples."""
    t = torch.tensor(list(samples), dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(t))) if len(t) > 1 else float("nan")
    return float(t.mean()), se


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the CPU (draws are made on the CPU and moved, so every device and rank agrees)."""
    return torch.Generator().manual_seed(seed)


def randn_like(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
