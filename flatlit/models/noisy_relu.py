"""NoisyReLU: a ReLU with a random slope per element in training (SmoothOut's ``--relu_noise``; Wen et al. 2018,
"SmoothOut: Smoothing Out Sharp Minima to Improve Generalization in Deep Learning", arXiv 1805.07898; SPEC §1.5, F13).
"""

from __future__ import annotations

import torch
from torch import nn


class NoisyReLU(nn.Module):
    """``relu(x · u)`` with ``u ~ U(1 − noise, 1 + noise)`` drawn per element in train mode; a plain ReLU in eval mode.

    The slope is drawn from the global torch RNG (seeded by Lightning like dropout), so resume is exact."""

    def __init__(self, noise: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"relu_noise must lie in [0, 1] (the slope U(1-noise, 1+noise) stays >= 0), got {noise}")
        self.noise = float(noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.noise == 0.0:
            return torch.relu(x)
        u = torch.empty_like(x).uniform_(1.0 - self.noise, 1.0 + self.noise)
        return torch.relu(x * u)

    def extra_repr(self) -> str:
        return f"noise={self.noise}"


def relu(noise: float = 0.0) -> nn.Module:
    """``nn.ReLU()`` when ``noise`` is 0, else ``NoisyReLU(noise)``."""
    return NoisyReLU(noise) if noise > 0 else nn.ReLU()
