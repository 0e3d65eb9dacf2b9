"""CIFAR residual networks.

- ``cifar_resnet18/50/101``: the kuangliu-style ResNets of LPF-SGD (SPEC §5.9; He et al. 2016, arXiv 1512.03385):
  3×3 stem with 64 channels and no max-pool, stages [2,2,2,2] (basic) / [3,4,6,3] / [3,4,23,3] (bottleneck),
  4×4 average pool.
- ``cifar_resnet20/32/44``: He et al.'s 6n+2 CIFAR ResNets (16-32-64 channels, option-A-like 1×1 projection here),
  with ``batch_norm`` off and ``init_scale`` as in Jastrzebski et al.'s ``resnet32_nobn`` (scaled He-normal), and
  ``relu_noise`` for SmoothOut's NoisyReLU.
- ``wrn16_8``, ``wrn28_10``: Wide ResNets (Zagoruyko & Komodakis 2016, arXiv 1605.07146), pre-activation blocks.
- ``resnet18_narrow(width, skip, batch_norm)``: the narrow ResNet-18 of LPF-SGD's sharpness-vs-generalization grid
  (Bisla et al. 2022, arXiv 2201.08025, §5; SPEC §5.7, F54): stages of 8w/16w/32w/64w channels, every conv with a
  bias, Kaiming-normal (fan-out) conv init, and switchable skip connections and BatchNorm.
- ``resnet18_dd(k)``: the double-descent ResNet-18 of stage widths k/2k/4k/8k (Nakkiran et al. 2019,
  arXiv 1912.02292; LPF-SGD's width sweep): bias-free convs, BatchNorm, PyTorch's default init.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatlit.models.noisy_relu import relu
from flatlit.models.registry import register_model


def _norm(c: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3×3 convs; ``skip=False`` drops the residual connection (a plain block); ``bias`` defaults to
    ``not batch_norm``."""

    expansion = 1

    def __init__(
        self,
        c_in: int,
        c: int,
        stride: int = 1,
        batch_norm: bool = True,
        skip: bool = True,
        bias: bool | None = None,
        relu_noise: float = 0.0,
    ) -> None:
        super().__init__()
        bias = (not batch_norm) if bias is None else bias
        self.act1, self.act2 = relu(relu_noise), relu(relu_noise)
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=bias)
        self.bn1 = _norm(c, batch_norm)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=bias)
        self.bn2 = _norm(c, batch_norm)
        self.skip = skip
        self.shortcut = nn.Sequential()
        if skip and (stride != 1 or c_in != c):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=bias), _norm(c, batch_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x) if self.skip else out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, c: int, stride: int = 1, batch_norm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 1, bias=False)
        self.bn1 = _norm(c, batch_norm)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = _norm(c, batch_norm)
        self.conv3 = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn3 = _norm(4 * c, batch_norm)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != 4 * c:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, 4 * c, 1, stride, bias=False), _norm(4 * c, batch_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Generic CIFAR ResNet: 3×3 stem, one stage per entry of ``widths``, global average pool, linear head."""

    def __init__(
        self,
        block: type,
        num_blocks: list[int],
        widths: list[int],
        num_classes: int,
        in_channels: int,
        batch_norm: bool = True,
        init_scale: float | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        bias = block_kwargs.get("bias")
        self.act = relu(block_kwargs.get("relu_noise", 0.0))
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=(not batch_norm) if bias is None else bias)
        self.bn1 = _norm(widths[0], batch_norm)
        c_in, stages = widths[0], []
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, w, 2 if (i > 0 and j == 0) else 1, batch_norm, **block_kwargs))
                c_in = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(c_in, num_classes)
        if init_scale is not None:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    fan_in = m.weight[0].numel()
                    nn.init.normal_(m.weight, 0.0, init_scale * math.sqrt(2.0 / fan_in))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.act(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class NarrowResNet18(CifarResNet):
    """:func:`resnet18_narrow`'s network, with LPF-SGD's function-preserving :meth:`norm`."""

    def norm(self) -> nn.Module:
        """A copy computing the same function with unit-"norm" filters (LPF-SGD's ``norm()``: per output unit
        p = ‖W_j‖₂ + |b_j|, BN p = |γ| + |β|, divided out and restored by constant channel scales; see
        :func:`flatlit.sharpness.norms.lpf_normalize`). The measures of the sharpness grid run on this copy."""
        from flatlit.sharpness.norms import lpf_normalize  # models do not depend on the measures at import time

        return lpf_normalize(self)


def _kuangliu(block: type, blocks: list[int]):
    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, batch_norm: bool = True) -> nn.Module:
        return CifarResNet(block, blocks, [64, 128, 256, 512], num_classes, in_channels, batch_norm)

    return build


register_model("cifar_resnet18")(_kuangliu(BasicBlock, [2, 2, 2, 2]))
register_model("cifar_resnet50")(_kuangliu(Bottleneck, [3, 4, 6, 3]))
register_model("cifar_resnet101")(_kuangliu(Bottleneck, [3, 4, 23, 3]))


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@register_model("resnet18_narrow")
def resnet18_narrow(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: int = 8,
    skip: bool = True,
    batch_norm: bool = True,
) -> nn.Module:
    """LPF-SGD's narrow ResNet-18: stages of 8·width, 16·width, 32·width, 64·width channels (width 8 is the usual
    ResNet-18), convs with bias, Kaiming-normal fan-out conv init, BN γ = 1, β = 0; ``skip`` and ``batch_norm``
    switch the residual connections and the BatchNorm layers (the 2×2 of the paper's grid). ``model.norm()`` returns
    the function-preserving normalised copy the paper measures."""
    w = _positive("width", width)
    model = NarrowResNet18(
        BasicBlock,
        [2, 2, 2, 2],
        [8 * w, 16 * w, 32 * w, 64 * w],
        num_classes,
        in_channels,
        batch_norm,
        skip=skip,
        bias=True,
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18_dd")
def resnet18_dd(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, k: int = 64) -> nn.Module:
    """ResNet-18 of stage widths k, 2k, 4k, 8k (k = 64 is the usual ResNet-18) for the double-descent width sweep
    (Nakkiran et al. 2019, arXiv 1912.02292; LPF-SGD §5): bias-free convs with BatchNorm, PyTorch's default init."""
    k = _positive("k", k)
    return CifarResNet(BasicBlock, [2, 2, 2, 2], [k, 2 * k, 4 * k, 8 * k], num_classes, in_channels, True, bias=False)


def _he(n: int):
    def build(
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        batch_norm: bool = True,
        init_scale: float | None = None,
        relu_noise: float = 0.0,
    ) -> nn.Module:
        """He et al.'s CIFAR ResNet-(6n+2); ``relu_noise`` > 0: every ReLU a NoisyReLU (SmoothOut's --relu_noise)."""
        return CifarResNet(
            BasicBlock, [n, n, n], [16, 32, 64], num_classes, in_channels, batch_norm, init_scale, relu_noise=relu_noise
        )

    return build


register_model("cifar_resnet20")(_he(3))
register_model("cifar_resnet32")(_he(5))
register_model("cifar_resnet44")(_he(7))


class WideBlock(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None if (stride == 1 and c_in == c) else nn.Conv2d(c_in, c, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-d-k: depth d = 6n+4, widths 16, 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(c_in, w, 2 if (i > 0 and j == 0) else 1, dropout))
                c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.bn, self.linear = nn.BatchNorm2d(c_in), nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("wrn16_8")
def wrn16_8(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 8, num_classes, in_channels, dropout)


@register_model("wrn28_10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0) -> nn.Module:
    return WideResNet(28, 10, num_classes, in_channels, dropout)
