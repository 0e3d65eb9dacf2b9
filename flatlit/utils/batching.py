"""Batches of any structure: tensors, or tuples, lists and dicts of them (a task's ``training_loss`` decides).

The chunked families (LPF-SGD's M samples, SmoothOut's ghost batches) split every tensor of a batch along dim 0 and
weight each chunk's mean loss by its share of the examples; the curvature engine weights batches the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


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


def _split(value: Any, sizes: list[int]) -> list[Any]:
    if isinstance(value, torch.Tensor) and value.ndim:
        return list(value.split(sizes))
    if isinstance(value, dict):
        parts = {k: _split(v, sizes) for k, v in value.items()}
        return [type(value)({k: p[i] for k, p in parts.items()}) for i in range(len(sizes))]
    if isinstance(value, (list, tuple)):
        parts = [_split(v, sizes) for v in value]
        chunks = [[p[i] for p in parts] for i in range(len(sizes))]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            return [type(value)(*c) for c in chunks]
        return [type(value)(c) for c in chunks]
    return [value] * len(sizes)  # scalars and other objects go to every chunk


def split_batch(batch: Any, sections: int | None = None, size: int | None = None) -> list[Any]:
    """``batch`` cut along dim 0 of every tensor, into ``sections`` near-equal chunks (as ``torch.tensor_split``)
    or into chunks of ``size`` examples (as ``torch.split``); the structure is kept, empty chunks are dropped."""
    n = batch_size(batch)
    if (sections is None) == (size is None):
        raise ValueError("split_batch: give exactly one of sections and size")
    if sections is not None:
        q, r = divmod(n, sections)
        sizes = [q + 1] * r + [q] * (sections - r)
    else:
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    sizes = [s for s in sizes if s > 0]
    return _split(batch, sizes) if sizes else []


def cat_outputs(parts: Sequence[Any]) -> Any:
    """The per-chunk outputs of a model joined along dim 0 (tensors, and tuples/lists/dicts of tensors)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p.detach() for p in parts]) if first.ndim else torch.stack([p.detach() for p in parts])
    if isinstance(first, dict):
        return type(first)({k: cat_outputs([p[k] for p in parts]) for k in first})
    if isinstance(first, (list, tuple)):
        joined = [cat_outputs([p[i] for p in parts]) for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    return first
