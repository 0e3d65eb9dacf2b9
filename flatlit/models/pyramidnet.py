"""PyramidNets for CIFAR (Han, Kim & Kim 2017, "Deep Pyramidal Residual Networks", arXiv 1610.02915).

The width grows additively by α/(3n) channels per block instead of doubling at each stage. Blocks are the paper's
pre-activation-style "BN→conv→BN→ReLU→conv→BN" (basic) or "BN→1×1→BN→ReLU→3×3→BN→ReLU→1×1(×4)→BN" (bottleneck),
with no ReLU after the addition; the shortcut is the identity, 2×2 average pooling when the block strides, and zero
channels appended for the extra width. ShakeDrop is not included.

- ``pyramidnet110``: depth 110, basic blocks, α = 48: 1.77 M parameters on CIFAR-10, 1.76 M without the BN affine
  parameters (the paper's Table 4 row "PyramidNet (α = 48) 110" lists 1.7 M; LPF-SGD Table 5).
- ``pyramidnet272``: depth 272, bottleneck blocks, α = 200: 26.2 M parameters, 26.0 M without the BN affine
  parameters, which is the count the paper publishes ("PyramidNet (bottleneck, α = 200) 272 26.0M"; LPF-SGD Table 5).
- ``pyramidnet``: any ``depth``, ``alpha`` and ``bottleneck``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flatlit.models.registry import register_model


class PyramidBlock(nn.Module):
    """One pyramidal residual unit from ``c_in`` to ``c · expansion`` channels (``expansion`` 1 basic, 4 bottleneck)."""

    def __init__(self, c_in: int, c: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        if bottleneck:
            layers = [
                nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, c, 1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, stride, 1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.BatchNorm2d(4 * c),
            ]
        else:
            layers = [
                nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, c, 3, stride, 1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c),
            ]
        self.residual = nn.Sequential(*layers)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        shortcut = F.avg_pool2d(x, 2, 2, ceil_mode=True) if self.stride != 1 else x
        extra = out.shape[1] - shortcut.shape[1]
        if extra > 0:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, extra))
        return out + shortcut


class PyramidNet(nn.Module):
    """PyramidNet of ``depth`` (6n+2 basic, 9n+2 bottleneck) with widening factor ``alpha``: block k of the 3n has
    round(16 + k·α/(3n)) channels (×4 out for bottlenecks); 16-channel 3×3 stem with BN; BN→ReLU→average pool→linear.
    Convs He-normal (fan-out), BN γ = 1, β = 0, linear bias 0, as in the paper's code."""

    def __init__(self, depth: int, alpha: float, bottleneck: bool, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        per, what = (9, "9n+2 (bottleneck)") if bottleneck else (6, "6n+2 (basic)")
        if depth < per + 2 or (depth - 2) % per:
            raise ValueError(f"PyramidNet depth must be {what}, got {depth}")
        n = (depth - 2) // per
        step = alpha / (3 * n)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        blocks, c_in, width = [], 16, 16.0
        for k in range(3 * n):
            width += step
            c = round(width)
            blocks.append(PyramidBlock(c_in, c, 2 if (k > 0 and k % n == 0) else 1, bottleneck))
            c_in = c * (4 if bottleneck else 1)
        self.blocks = nn.Sequential(*blocks)
        self.head_bn = nn.BatchNorm2d(c_in)
        self.linear = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.head_bn(self.blocks(self.stem(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("pyramidnet")
def pyramidnet(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    depth: int = 110,
    alpha: float = 48.0,
    bottleneck: bool = False,
) -> nn.Module:
    """PyramidNet of any ``depth``, widening factor ``alpha`` and block type."""
    return PyramidNet(depth, alpha, bottleneck, num_classes, in_channels)


@register_model("pyramidnet110")
def pyramidnet110(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """PyramidNet-110, basic blocks, α = 48 (1.77 M parameters)."""
    return PyramidNet(110, 48.0, False, num_classes, in_channels)


@register_model("pyramidnet272")
def pyramidnet272(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """PyramidNet-272, bottleneck blocks, α = 200 (26.2 M parameters; 26.0 M without BN γ, β)."""
    return PyramidNet(272, 200.0, True, num_classes, in_channels)
