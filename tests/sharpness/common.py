"""A tiny float64 classification problem and cheap settings shared by the generic measure tests."""

from __future__ import annotations

import torch
from torch import nn

from flatlit.sharpness import MeasureInputs, get_measure

# settings that make the Monte-Carlo / iterative measures cheap in tests (applied where a measure has them)
CHEAP = {
    "draws": 4,
    "steps": 4,
    "probes": 4,
    "repeats": 2,
    "maxiter": 3,
    "max_iter": 3,
    "bisection_steps": 6,
    "max_steps": 200,
    "search_steps": 8,
}


def cheap(name: str) -> dict:
    return {k: v for k, v in CHEAP.items() if k in get_measure(name).defaults}


def bn_mlp_model(seed: int = 0) -> nn.Module:
    """Flatten → Linear(6, 5) → BatchNorm → ReLU → Dropout(0.2) → Linear(5, 3), float64, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.2), nn.Linear(5, 3)
    ).double()


def problem(seed: int = 0, n: int = 48, batch: int = 12) -> tuple[nn.Module, list, dict]:
    """An MLP with BatchNorm and dropout (float64), 48 examples in 4 batches, its initial weights."""
    g = torch.Generator().manual_seed(seed)
    model = bn_mlp_model(seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x[:, 0] += 0.8 * torch.sign(x[:, 0])  # a gap around each class boundary: separable with a margin
    x[:, 1] += 0.8 * torch.sign(x[:, 1] - 0.5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(400):  # fit the sample: positive margins, a minimum worth measuring
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    return model.eval(), batches, init


def inputs_for(model, batches, init) -> MeasureInputs:
    return MeasureInputs(model, batches, init_state=init, test_batches=batches, num_train=1000)
