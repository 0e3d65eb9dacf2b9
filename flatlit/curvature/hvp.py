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

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatlit.objective import twice_differentiable
from flatlit.utils.batching import batch_size
from flatlit.utils.nn import frozen_bn_stats, is_bn_param

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_MODE_CACHE: dict[tuple, str] = {}  # (parameter shapes, device, dtype, block width) -> the faster matmat mode
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


def _math_attention(loss: BatchLoss) -> BatchLoss:
    """``loss`` evaluated under PyTorch's math attention kernel: the fused ``scaled_dot_product_attention``
    kernels have no double backward (:func:`flatlit.objective.twice_differentiable`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def wrapped(batch: Batch) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            return loss(batch)

    return wrapped


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
        chunk_size: columns of a :meth:`matmat` block sharing one forward/first backward (default: all).
        matmat_mode: ``auto`` (the faster of the two, timed once), ``vmap`` or ``loop`` (see :meth:`matmat`).
        distributed: all-reduce over ``torch.distributed`` (default: when it is initialised).
        cache_graph: keep the gradient graph of every batch (forward + first backward with ``create_graph``) after
            the first product, so later products cost one second backward each (``double`` backend). None (auto):
            cache while the saved tensors fit in ``graph_budget`` bytes, else recompute per product; True/False
            force it. The cache is rebuilt when a parameter or buffer changes in place (tracked by
            ``Tensor._version``) and freed by :meth:`release` or with the operator.
        graph_budget: bytes the cached graphs may hold (default: half the free GPU memory, a quarter of the free
            host memory on CPU).
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
        chunk_size: int | None = None,
        matmat_mode: str = "auto",
        cache_graph: bool | None = None,
        graph_budget: int | None = None,
    ) -> None:
        if backend not in ("double", "func"):
            raise ValueError(f"backend must be 'double' or 'func', got {backend!r}")
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        self.model, self.batches = model, list(batches)
        self.loss_fn = loss_fn or F.cross_entropy
        self.batch_loss: BatchLoss = _math_attention(batch_loss or self._pair_loss)
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        self.weight_decay, self.bn_mode, self.backend = weight_decay, bn_mode, backend
        self.distributed = (dist.is_available() and dist.is_initialized()) if distributed is None else distributed
        if matmat_mode not in ("auto", "vmap", "loop"):
            raise ValueError(f"matmat_mode must be 'auto', 'vmap' or 'loop', got {matmat_mode!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.chunk_size, self.matmat_mode = chunk_size, matmat_mode
        self.cache_graph, self.graph_budget = cache_graph, graph_budget
        self._graphs: list[tuple[list[torch.Tensor], list[int], float]] | None = None
        self._graph_versions: tuple[int, ...] | None = None
        self.graph_bytes = 0  # bytes the cached graphs hold (0: no cache)
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

    # ---- the cached gradient graphs --------------------------------------------------------------------------------
    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in (*self.params, *self.model.buffers()))

    def _budget(self) -> int:
        if self.graph_budget is not None:
            return int(self.graph_budget)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free // 2
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError, AttributeError):  # no sysconf: a conservative 1 GiB
            return 1 << 30

    def _cached_graphs(self) -> list[tuple[list[torch.Tensor], list[int], float]] | None:
        """The per-batch gradient graphs (grads with graph, indices of those with a graph, batch size), built on
        first use and rebuilt when the weights or buffers changed; None when caching is off or over budget."""
        if self.backend != "double" or self.cache_graph is False:
            return None
        if self._graphs is not None and self._graph_versions == self._versions():
            return self._graphs
        self.release()
        budget = None if self.cache_graph else self._budget()
        seen: set[int] = set()
        size = 0

        def pack(t: torch.Tensor) -> torch.Tensor:  # count each saved storage once
            nonlocal size
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                size += t.untyped_storage().nbytes()
            return t

        graphs = []
        with torch.inference_mode(False), torch.enable_grad(), evaluation_mode(self.model, self.bn_mode):
            for batch in self.batches:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = self.batch_loss(batch)
                    grads = list(torch.autograd.grad(loss, self.params, create_graph=True))
                graphs.append((grads, [i for i, g in enumerate(grads) if g.requires_grad], float(batch_size(batch))))
                if budget is not None and size > budget:
                    self.cache_graph = False  # does not fit: recompute per product from now on
                    return None
        self._graphs, self._graph_versions, self.graph_bytes = graphs, self._versions(), size
        return graphs

    def release(self) -> None:
        """Free the cached gradient graphs (the next product rebuilds them if caching is on)."""
        self._graphs, self._graph_versions, self.graph_bytes = None, None, 0

    def _cached_products(self, cols: list[torch.Tensor], k: int | None) -> torch.Tensor | None:
        """Σ_b n_b H_b v (k None: ``cols`` holds one vector's blocks) or the (k, n) block Σ_b n_b H_b V on the
        cached graphs: one second backward per vector and batch; None when there is no cache."""
        graphs = self._cached_graphs()
        if graphs is None:
            return None
        total = torch.zeros(self.numel if k is None else (k, self.numel), dtype=self.dtype, device=self.device)
        with torch.inference_mode(False):
            for grads, used, n in graphs:
                for j in range(1 if k is None else k):
                    if not used:
                        continue
                    vj = [cols[i] if k is None else cols[i][j] for i in used]
                    hv = torch.autograd.grad(
                        [grads[i] for i in used], self.params, vj, retain_graph=True, allow_unused=True
                    )
                    flat = flatten([torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params)])
                    (total if k is None else total[j]).add_(flat, alpha=n)
        return total

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector ``v`` (length ``numel``, any float dtype; returned in ``v``'s dtype)."""
        with twice_differentiable("HessianOperator"):
            return self._matvec(v, cached=True)

    def _matvec(self, v: torch.Tensor, cached: bool) -> torch.Tensor:
        vs = unflatten(v.to(self.dtype), self.params)
        weight = torch.tensor(sum(float(batch_size(b)) for b in self.batches), dtype=self.dtype, device=self.device)
        total = self._cached_products(vs, None) if cached else None
        if total is None:
            total = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            hvp = self._batch_hvp_double if self.backend == "double" else self._batch_hvp_func
            with torch.inference_mode(False), torch.enable_grad(), evaluation_mode(self.model, self.bn_mode):
                for batch in self.batches:
                    hv = hvp(batch, vs)
                    hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params)]
                    total.add_(flatten(hv).detach(), alpha=float(batch_size(batch)))
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

    def _batch_hmm(self, batch: Batch, cols: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
        """[H_b v_1 … H_b v_k] for one batch, paying the forward and the first backward once: every column is a
        vector-Jacobian product of the same gradient g(θ) = ∇L_b(θ) (H is symmetric, so vᵀ∂g/∂θ = (Hv)ᵀ).
        ``vmap``: ``torch.func.vjp`` of ``torch.func.grad`` once, its pullback vectorised over the columns by
        ``torch.func.vmap`` (reverse-over-reverse, batched); ``loop``: autograd double backward on one retained
        graph, one column after the other. ``cols[i]`` holds the block of parameter i, shape (k, *p.shape)."""
        if mode == "vmap":
            from torch.func import functional_call, grad, vjp, vmap

            closure = _Closure(self.model, self.batch_loss)
            names = {id(p): n for n, p in closure.named_parameters()}
            keys = [names[id(p)] for p in self.params]
            primals = {k: p.detach() for k, p in zip(keys, self.params)}

            def loss_of(ps: dict[str, torch.Tensor]) -> torch.Tensor:
                return functional_call(closure, ps, (batch,), strict=False)

            _, pullback = vjp(grad(loss_of), primals)
            (hv,) = vmap(pullback)(dict(zip(keys, cols)))
            return [hv[k] for k in keys]
        loss = self.batch_loss(batch)
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        used = [i for i, g in enumerate(grads) if g.requires_grad]  # a gradient without graph has zero Hessian rows
        out = [torch.zeros_like(c) for c in cols]
        k = cols[0].shape[0]
        for j in range(k if used else 0):
            hv = torch.autograd.grad(
                [grads[i] for i in used],
                self.params,
                [cols[i][j] for i in used],
                retain_graph=j < k - 1,
                allow_unused=True,
            )
            for o, h in zip(out, hv):
                if h is not None:
                    o[j] = h
        return out

    def _auto_mode(self, batch: Batch, cols: list[torch.Tensor]) -> str:
        """The faster of ``vmap`` and ``loop`` for this model, device and block width, timed once per process."""
        key = (tuple(tuple(p.shape) for p in self.params), str(self.device), self.dtype, cols[0].shape[0])
        if key not in _MODE_CACHE:
            if cols[0].shape[0] == 1:
                _MODE_CACHE[key] = "loop"
            else:
                times = {}
                for m in ("loop", "vmap", "loop", "vmap"):  # the second round is warm
                    t = time.perf_counter()
                    try:
                        self._batch_hmm(batch, cols, m)
                    except RuntimeError:  # an op without a batching rule: vmap is not an option here
                        times[m] = float("inf")
                        continue
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    times[m] = time.perf_counter() - t
                _MODE_CACHE[key] = min(times, key=times.__getitem__)
        return _MODE_CACHE[key]

    def matmat(self, V: torch.Tensor, chunk_size: int | None = None, mode: str | None = None) -> torch.Tensor:
        """H V for a block ``V`` of shape (n, k) (column j: a vector), returned in ``V``'s dtype.

        Per batch of the sample the forward pass and the first backward are done once per chunk of ``chunk_size``
        columns (default: all k; lower it to bound memory, which grows with chunk_size × the model's activations),
        and each column costs only a second backward. ``mode``: ``vmap`` or ``loop`` (see :meth:`_batch_hmm`);
        default ``self.matmat_mode`` (``auto``: time both once on the first batch and keep the faster). The
        ``func`` backend computes the columns one by one with :meth:`matvec` (a reference, not fast). Same BN
        mode, L2 term, parameter filter and all-reduce as :meth:`matvec`; counts k operator applications.
        """
        with twice_differentiable("HessianOperator"):
            return self._matmat(V, chunk_size, mode)

    def _matmat(self, V: torch.Tensor, chunk_size: int | None, mode: str | None) -> torch.Tensor:
        if V.ndim != 2 or V.shape[0] != self.numel:
            raise ValueError(f"matmat expects a ({self.numel}, k) block, got shape {tuple(V.shape)}")
        k = V.shape[1]
        if self.backend == "func":
            return torch.stack([self.matvec(V[:, j]) for j in range(k)], dim=1)
        chunk = max(1, min(k, chunk_size or self.chunk_size or k))
        Vt = V.T.to(self.dtype).contiguous()  # (k, n)
        sizes = [p.numel() for p in self.params]
        weight = torch.tensor(sum(float(batch_size(b)) for b in self.batches), dtype=self.dtype, device=self.device)
        every = [c.reshape(k, *p.shape) for c, p in zip(Vt.split(sizes, 1), self.params)]
        total = self._cached_products(every, k)
        if total is None:
            total = torch.zeros(k, self.numel, dtype=self.dtype, device=self.device)
            with torch.inference_mode(False), torch.enable_grad(), evaluation_mode(self.model, self.bn_mode):
                for batch in self.batches:
                    n = float(batch_size(batch))
                    for s in range(0, k, chunk):
                        cols = [c[s : s + chunk] for c in every]
                        use = mode or self.matmat_mode
                        if use == "auto":
                            use = self._auto_mode(batch, cols)
                        hv = self._batch_hmm(batch, cols, use)
                        flat = torch.cat([h.reshape(h.shape[0], -1) for h in hv], dim=1)
                        total[s : s + chunk].add_(flat.detach(), alpha=n)
        if self.distributed:
            stacked = torch.cat([total.reshape(-1), weight.view(1)])
            dist.all_reduce(stacked)
            total, weight = stacked[:-1].view(k, self.numel), stacked[-1]
        out = total / weight
        if self.weight_decay:
            out = out + self.weight_decay * Vt
        self.num_matvecs += k
        return out.T.to(V.dtype)

    def check_determinism(self, seed: int = 0, rtol: float | None = None) -> None:
        """Two matvecs of one vector must agree; raise a clear error naming the likely cause otherwise."""
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(self.numel, generator=g, dtype=torch.float64).to(self.device, self.dtype)
        a, b = self._matvec(v, cached=False), self._matvec(v, cached=False)  # two forwards: randomness shows
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
