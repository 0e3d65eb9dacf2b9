"""Tiny problems shared by the landscape tests: a conv net with BatchNorm and dropout, and a quadratic."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn


def small_net(seed: int = 0) -> nn.Module:
    """Conv (3 filters) → BN → ReLU → dropout → linear, float64, with non-trivial BN running statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    ).double()
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(8, 1, 6, 6, dtype=torch.float64) * 2 + 0.5)
    return net.eval()


def small_batches(n: int = 24, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


class Quadratic(nn.Module):
    """out_i = θ for every example; with :func:`quadratic_loss` the loss is mean_i ½(θ − y_i)ᵀA(θ − y_i)."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(len(x), -1)


def spd(n: int, seed: int = 0) -> torch.Tensor:
    """A symmetric positive definite matrix with distinct eigenvalues (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.5, 4.0, n, dtype=torch.float64)) @ q.T


def quadratic_loss(A: torch.Tensor):
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = out - y
        return 0.5 * ((r @ A) * r).sum(1).mean()

    return loss


def quadratic_batches(n: int, dim: int, batch: int, seed: int = 2, center: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if center is not None:
        y = y - y.mean(0) + center
    x = torch.zeros(n, 1, dtype=torch.float64)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def snapshot(model: nn.Module) -> dict:
    """Everything an analysis must leave unchanged: tensors, flags, .grad objects and values, RNG states."""
    return {
        "tensors": [t.detach().clone() for t in [*model.parameters(), *model.buffers()]],
        "flags": [m.training for m in model.modules()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = [*model.parameters(), *model.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(after, before["tensors"])), "weights or buffers changed"
    assert [m.training for m in model.modules()] == before["flags"], "train/eval flags changed"
    for p, (g, v) in zip(model.parameters(), before["grads"]):
        assert p.grad is g, ".grad object replaced"
        assert g is None or torch.equal(g, v), ".grad values changed"
    assert torch.equal(torch.get_rng_state(), before["rng"][0]), "torch RNG changed"
    assert np.array_equal(np.random.get_state()[1], before["rng"][1]), "NumPy RNG changed"
    assert random.getstate() == before["rng"][2], "Python RNG changed"
