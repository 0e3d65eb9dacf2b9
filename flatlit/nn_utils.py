"""Small module utilities shared by the training families and the curvature engine (no Lightning here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
