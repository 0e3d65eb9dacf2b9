"""Small module utilities shared by the training families and the curvature engine (no Lightning here)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def is_bn_param(module: nn.Module) -> set[int]:
    """ids of the parameters owned by BatchNorm layers."""
    return {id(p) for m in module.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}


@contextmanager
def frozen_bn_stats(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run a pass without changing BatchNorm running statistics (buffers saved and restored exactly)."""
    if not enabled:
        yield
        return
    saved = [
        (b, b.detach().clone())
        for m in module.modules()
        if isinstance(m, _BatchNorm)
        for b in m.buffers(recurse=False)
        if b is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), NumPy and Python RNG states on exit."""
    state = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        np.random.get_state(),
        random.getstate(),
    )
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])
        np.random.set_state(state[2])
        random.setstate(state[3])


@contextmanager
def rank0_buffers(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Under torch.distributed, run with rank 0's buffers on every rank (BatchNorm statistics drift apart between
    DDP's per-forward broadcasts, so an eval-mode pass after a step would otherwise see a different network on each
    rank); each rank's own buffers are restored after, bit for bit."""
    import torch.distributed as dist

    if not (enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    buffers = [b for b in module.buffers() if b.numel() > 0]
    saved = [b.detach().clone() for b in buffers]
    try:
        for b in buffers:
            dist.broadcast(b.data, src=0)
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)
