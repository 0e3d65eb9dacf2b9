"""Hessian-vector products of a mean loss over a fixed list of batches.

H = ∇²_θ [ Σ_b n_b L_b(θ) / Σ_b n_b ] (+ λ I when the L2 penalty ½λ‖θ‖² is included), where L_b is the mean loss
of batch b. A batch is an ``(x, y)`` pair with ``loss_fn(model(x), y)`` by default, or anything (dicts, tuples of
several tensors) with a ``batch_loss(batch)`` closure that evaluates ``model`` and returns the mean loss; n_b is
the leading size of the batch's first tensor. Two backends, checked against each other in the tests:

- ``double``: double backward, Hv = ∇_θ ⟨∇_θ L, v⟩ (Pearlmutter 1994);
- ``func``: forward-over-reverse with ``torch.func.jvp(torch.func.grad(L), θ, v)``.

BatchNorm runs in eval mode (running statistics) and dropout is off by default, so the operator is a fixed
symmetric matrix; ``bn_mode="train"`` uses batch statistics (dropout still off) and restores the BN buffers.
Under ``torch.distributed`` each rank holds its own batches and the weighted sums are all-reduced explicitly:
autograd HVPs bypass DDP's gradient hooks, so the operator must run on the unwrapped module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatlit.nn_utils import frozen_bn_stats, is_bn_param

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = Any  # an (x, y) pair, or any collection a ``batch_loss`` closure understands
BatchLoss = Callable[[Any], torch.Tensor]


class NonDeterministicOperatorError(RuntimeError):
    """Two matvecs of the same vector disagree."""


@contextmanager
def evaluation_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Put ``model`` in a deterministic mode and restore every module's ``training`` flag (and BN buffers)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        with frozen_bn_stats(model):
            model.eval()
            if bn_mode == "train":
                for m in model.modules():
                    if isinstance(m, _BatchNorm):
                        m.train()
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def batch_size(batch: Any) -> int:
    """Examples in ``batch``: the leading size of its first tensor (depth-first over tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = batch_size(value)
        if n:
            return n
    return 0


class _Closure(nn.Module):
    """Holds ``model`` as a submodule so ``torch.func.functional_call`` swaps its parameters around ``fn(batch)``."""

    def __init__(self, model: nn.Module, fn: BatchLoss) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(batch)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vec[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


class HessianOperator:
    """Symmetric linear operator v ↦ H v for the loss of ``model`` on fixed ``batches``.

    Args:
        model: the network (the unwrapped module, not a DDP wrapper).
        batches: the fixed batches of this process: (x, y) pairs, or what ``batch_loss`` takes.
        loss_fn: ``loss_fn(model(x), y)`` returning the batch-mean loss (default cross-entropy).
        batch_loss: ``batch_loss(batch)``: the batch-mean loss of ``model`` on any batch (overrides ``loss_fn``).
        params: parameters to differentiate (default: all that require grad); see :func:`select_params`.
        weight_decay: λ of an included L2 penalty ½λ‖θ‖² (adds λv).
        bn_mode: ``eval`` (running statistics) or ``train`` (batch statistics, buffers restored).
        backend: ``double`` or ``func``.
        distributed: all-reduce over ``torch.distributed`` (default: when it is initialised).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        loss_fn: LossFn | None = None,
        params: Sequence[nn.Parameter] | None = None,
        weight_decay: float = 0.0,
        bn_mode: str = "eval",
        backend: str = "double",
        distributed: bool | None = None,
        batch_loss: BatchLoss | None = None,
    ) -> None:
        if backend not in ("double", "func"):
            raise ValueError(f"backend must be 'double' or 'func', got {backend!r}")
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        self.model, self.batches = model, list(batches)
        self.loss_fn = loss_fn or F.cross_entropy
        self.batch_loss: BatchLoss = batch_loss or self._pair_loss
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        self.weight_decay, self.bn_mode, self.backend = weight_decay, bn_mode, backend
        self.distributed = (dist.is_available() and dist.is_initialized()) if distributed is None else distributed
        self.num_matvecs = 0
        p0 = self.params[0]
        self.dtype, self.device = p0.dtype, p0.device
        self.numel = sum(p.numel() for p in self.params)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.numel, self.numel)

    def _pair_loss(self, batch: Batch) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.model(x), y)

    def _batch_hvp_double(self, batch: Batch, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        loss = self.batch_loss(batch)
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return list(torch.autograd.grad(dot, self.params, allow_unused=True))

    def _batch_hvp_func(self, batch: Batch, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.func import functional_call, grad, jvp

        closure = _Closure(self.model, self.batch_loss)
        names = {id(p): n for n, p in closure.named_parameters()}
        keys = [names[id(p)] for p in self.params]
        primals = {k: p.detach() for k, p in zip(keys, self.params)}
        tangents = dict(zip(keys, vs))

        def loss_of(ps: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(closure, ps, (batch,), strict=False)

        _, hv = jvp(grad(loss_of), (primals,), (tangents,))
        return [hv[k] for k in keys]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector ``v`` (length ``numel``, any float dtype; returned in ``v``'s dtype)."""
        vs = unflatten(v.to(self.dtype), self.params)
        total = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        weight = torch.zeros((), dtype=self.dtype, device=self.device)
        hvp = self._batch_hvp_double if self.backend == "double" else self._batch_hvp_func
        with torch.inference_mode(False), torch.enable_grad(), evaluation_mode(self.model, self.bn_mode):
            for batch in self.batches:
                hv = hvp(batch, vs)
                hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params)]
                n = float(batch_size(batch))
                total.add_(flatten(hv).detach(), alpha=n)
                weight += n
        if self.distributed:
            stacked = torch.cat([total, weight.view(1)])
            dist.all_reduce(stacked)
            total, weight = stacked[:-1], stacked[-1]
        out = total / weight
        if self.weight_decay:
            out = out + self.weight_decay * v.to(self.dtype)
        self.num_matvecs += 1
        return out.to(v.dtype)

    __matmul__ = matvec

    def check_determinism(self, seed: int = 0, rtol: float | None = None) -> None:
        """Two matvecs of one vector must agree; raise a clear error naming the likely cause otherwise."""
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(self.numel, generator=g, dtype=torch.float64).to(self.device, self.dtype)
        a, b = self.matvec(v), self.matvec(v)
        self.num_matvecs -= 2
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return  # a non-finite operator (diverged weights) is reported by the solvers' NaN results
        tol = rtol if rtol is not None else (1e-10 if self.dtype == torch.float64 else 1e-4)
        err = (a - b).norm() / a.norm().clamp_min(1e-30)
        if not torch.isfinite(err) or err > tol:
            raise NonDeterministicOperatorError(
                f"Hessian-vector products of the same vector differ (relative {err.item():.2e} > {tol:.0e}). "
                "Likely causes: dropout or another random layer active during the HVP, BatchNorm in train mode "
                "with changing batches, data augmentation in the curvature batches, or non-deterministic kernels "
                "(set torch.use_deterministic_algorithms(True) or use float64)."
            )


def select_params(model: nn.Module, exclude_bn: bool = False, exclude_bias: bool = False) -> list[nn.Parameter]:
    """Trainable parameters, optionally without BatchNorm parameters and/or biases."""
    bn = is_bn_param(model)
    return [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and not (exclude_bn and id(p) in bn) and not (exclude_bias and n.endswith("bias"))
    ]


def gradient_time_reference(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn | None = None
) -> None:
    """One plain gradient over the same batches (the cost unit used by the benchmarks)."""
    loss_fn = loss_fn or F.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad(), evaluation_mode(model):
        for x, y in batches:
            torch.autograd.grad(loss_fn(model(x), y), params)
