"""Shake-Shake residual networks for CIFAR (Gastaldi 2017, "Shake-Shake regularization", arXiv 1705.07485).

``shake_shake26_2x96d`` is the LPF-SGD Table 5 row (SPEC §5.8): a 26-layer network of 3 stages × 4 blocks, each block
two residual branches ReLU→conv3×3→BN→ReLU→conv3×3→BN of 96/192/384 channels, ≈ 26.2 M parameters (the paper's
26.2 M for "26 2×96d"). Branches are mixed per image ("Shake-Shake-Image"): forward α·b₁ + (1−α)·b₂ with α ~ U(0, 1),
backward with an independent β ~ U(0, 1); in eval mode α = β = ½. Down-sampling shortcuts are the paper's: ReLU, then
two 1×1 convs of half the width on the strided input and on the input shifted by one pixel, concatenated, BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatlit.models.registry import register_model


def shake(b1: torch.Tensor, b2: torch.Tensor, training: bool) -> torch.Tensor:
    """α·b₁ + (1−α)·b₂ in value, β·∂ + (1−β)·∂ in gradient (α, β ~ U(0, 1) per image); ½(b₁ + b₂) in eval mode.

    Written as ``β·b₁ + (1−β)·b₂ + stopgrad((α−β)(b₁ − b₂))`` instead of a custom autograd Function, so it is twice
    differentiable and works under ``torch.func`` (the curvature engine's HVPs)."""
    if not training:
        return 0.5 * (b1 + b2)
    shape = (b1.shape[0],) + (1,) * (b1.ndim - 1)
    alpha = torch.rand(shape, dtype=b1.dtype, device=b1.device)
    beta = torch.rand(shape, dtype=b1.dtype, device=b1.device)
    return beta * b1 + (1 - beta) * b2 + ((alpha - beta) * (b1 - b2)).detach()


def _branch(c_in: int, c: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(c_in, c, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, 1, 1, bias=False),
        nn.BatchNorm2d(c),
    )


class ShiftedShortcut(nn.Module):
    """Gastaldi's down-sampling shortcut: ReLU; 1×1 conv (c/2) of the strided input ‖ 1×1 conv (c/2) of the input
    shifted by one pixel (so the two halves see different pixels); BN."""

    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(c_in, c - c // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        a = self.conv1(x[:, :, :: self.stride, :: self.stride])
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        b = self.conv2(shifted[:, :, :: self.stride, :: self.stride])
        return self.bn(torch.cat([a, b], 1))


class ShakeBlock(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.branch1, self.branch2 = _branch(c_in, c, stride), _branch(c_in, c, stride)
        self.shortcut = nn.Identity() if (stride == 1 and c_in == c) else ShiftedShortcut(c_in, c, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shake(self.branch1(x), self.branch2(x), self.training) + self.shortcut(x)


class ShakeShake(nn.Module):
    """Shake-Shake ResNet of ``depth`` = 6n + 2 layers (n blocks per stage), stage widths w, 2w, 4w, a 16-channel
    3×3 stem with BN, ReLU + global average pool + linear head; He-normal (fan-out) convs, BN γ = 1, β = 0."""

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"Shake-Shake depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        blocks, c_in = [], 16
        for i, c in enumerate([width, 2 * width, 4 * width]):
            for j in range(n):
                blocks.append(ShakeBlock(c_in, c, 2 if (i > 0 and j == 0) else 1))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.blocks(self.stem(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("shake_shake")
def shake_shake(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, depth: int = 26, width: int = 32
) -> nn.Module:
    """Shake-Shake ``depth`` (6n+2) × 2 branches of base width ``width`` (``26 2×32d`` by default)."""
    return ShakeShake(depth, width, num_classes, in_channels)


@register_model("shake_shake26_2x96d")
def shake_shake26_2x96d(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Shake-Shake 26 2×96d (≈ 26.2 M parameters on CIFAR-10), LPF-SGD Table 5."""
    return ShakeShake(26, 96, num_classes, in_channels)
