"""Small reference networks: LeNet, MLP, SimpleCNN, Neyshabur's FC and VGG, the CS-439 *Batch CNNs.

Every builder takes ``activation`` (default ``relu``; see :data:`ACTIVATIONS`), e.g. ``tanh`` for the
edge-of-stability runs of Cohen et al. 2021. Activations have no parameters, so state_dict keys do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flatlit.models.noisy_relu import NoisyReLU, relu
from flatlit.models.registry import register_model
from flatlit.utils.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
    "linear": nn.Identity,
    "noisy_relu": NoisyReLU,  # slope U(0.9, 1.1) per element in training (flatlit.models.noisy_relu)
}


def make_activation(name: str) -> nn.Module:
    """A new activation module by name (``relu``, ``tanh``, ``elu``, ``gelu``, ``noisy_relu``, ``identity``/``linear``,
    ...)."""
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"model.init_args.arch_kwargs.activation: unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}."
        )
    return ACTIVATIONS[name]()


class LeNet(nn.Module):
    """The LeNet of LPF-SGD's MNIST runs (SPEC §5.9): conv32-conv64 (3×3) → maxpool → drop .25 → FC128 → drop .5."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, activation: str = "relu"
    ) -> None:
        super().__init__()
        s = (image_size - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            make_activation(activation),
            nn.Conv2d(32, 64, 3),
            make_activation(activation),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * s * s, 128), make_activation(activation), nn.Dropout(0.5), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet")
def lenet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, activation: str = "relu") -> nn.Module:
    return LeNet(num_classes, in_channels, image_size, activation)


@register_model("mlp")
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    width: int = 512,
    depth: int = 1,
    batch_norm: bool = False,
    activation: str = "relu",
) -> nn.Module:
    """Fully connected network with ``depth`` hidden layers of ``width`` units (optional BN before the activation)."""
    layers: list[nn.Module] = [nn.Flatten()]
    d_in = in_channels * image_size * image_size
    make_activation(activation)  # a bad name fails even when depth == 0
    for _ in range(depth):
        layers += [nn.Linear(d_in, width)] + ([nn.BatchNorm1d(width)] if batch_norm else [])
        layers.append(make_activation(activation))
        d_in = width
    layers.append(nn.Linear(d_in, num_classes))
    return nn.Sequential(*layers)


@register_model("simple_cnn")
def simple_cnn(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    filters: int = 32,
    kernel_size: int = 3,
    n1: int = 1,
    n2: int = 1,
    n_dense: int = 128,
    batch_norm: bool = False,
    dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Module:
    """Jastrzebski et al.'s SimpleCNN (SPEC §3.5; arXiv 1807.05031).

    [conv k same → (BN) → ReLU → conv k valid → (BN) → ReLU]×n1, maxpool 2, the same with 2F filters ×n2, maxpool 2,
    Dense(n_dense) → (BN) → ReLU → (Dropout) → Dense(classes). Glorot-uniform init. ``root``: F=32, k=3;
    ``medium``: F=100, k=5. ``activation`` replaces every ReLU.
    """
    make_activation(activation)
    layers: list[nn.Module] = []
    c, s = in_channels, image_size
    for stage, n in ((1, n1), (2, n2)):
        f = filters * stage
        for _ in range(n):
            for pad in (kernel_size // 2, 0):
                layers.append(nn.Conv2d(c, f, kernel_size, padding=pad))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(f))
                layers.append(make_activation(activation))
                c = f
                s = s if pad else s - kernel_size + 1
        layers.append(nn.MaxPool2d(2))
        s //= 2
    if s < 1:
        raise ValueError(f"simple_cnn: image_size {image_size} is too small for kernel_size {kernel_size}")
    layers += [nn.Flatten(), nn.Linear(c * s * s, n_dense)]
    layers += ([nn.BatchNorm1d(n_dense)] if batch_norm else []) + [make_activation(activation)]
    layers += ([nn.Dropout(dropout)] if dropout > 0 else []) + [nn.Linear(n_dense, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


class _BatchCNN(nn.Module):
    """The CS-439 CNNs (SPEC §2.2): blocks Conv→ReLU→BN (conv biases on), two-layer head.

    ``legacy_logsoftmax_dim0`` reproduces the original ``log_softmax(x, dim=0)`` over the batch (a bug);
    the default returns plain logits.
    """

    def __init__(
        self,
        plan: list,
        padding: int,
        head: int,
        num_classes: int,
        in_channels: int,
        image_size: int,
        legacy_logsoftmax_dim0: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, s = in_channels, image_size
        for v in plan:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                s //= 2
            else:
                layers += [nn.Conv2d(c, v, 3, padding=padding), make_activation(activation), nn.BatchNorm2d(v)]
                c, s = v, s - 2 + 2 * padding
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(c * s * s, head), make_activation(activation), nn.Linear(head, num_classes)
        )
        self.legacy_logsoftmax_dim0 = legacy_logsoftmax_dim0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.features(x))
        return F.log_softmax(out, dim=0) if self.legacy_logsoftmax_dim0 else out


@register_model("simple_batch")
def simple_batch(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    legacy_logsoftmax_dim0: bool = False,
    activation: str = "relu",
) -> nn.Module:
    plan = [16, 32, "M", 64, 128, "M"]
    return _BatchCNN(plan, 0, 128, num_classes, in_channels, image_size, legacy_logsoftmax_dim0, activation)


@register_model("middle_batch")
def middle_batch(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    legacy_logsoftmax_dim0: bool = False,
    activation: str = "relu",
) -> nn.Module:
    plan = [16, 32, "M", 64, 128, "M", 256, 512, "M"]
    return _BatchCNN(plan, 1, 512, num_classes, in_channels, image_size, legacy_logsoftmax_dim0, activation)


@register_model("complex_batch")
def complex_batch(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    legacy_logsoftmax_dim0: bool = False,
    activation: str = "relu",
) -> nn.Module:
    plan = [16, 32, 32, "M", 64, 128, 128, "M", 256, 512, 512, "M"]
    return _BatchCNN(plan, 1, 512, num_classes, in_channels, image_size, legacy_logsoftmax_dim0, activation)


@register_model("neyshabur_fc")
def neyshabur_fc(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, hidden: int = 1024, activation: str = "relu"
) -> nn.Module:
    """Neyshabur et al.'s two-layer perceptron (SPEC §4.1): Linear(C·H·W → hidden) → ReLU → Linear."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        make_activation(activation),
        nn.Linear(hidden, num_classes),
    )


@register_model("neyshabur_vgg")
def neyshabur_vgg(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, activation: str = "relu"
) -> nn.Module:
    """Neyshabur et al.'s VGG (SPEC §4.1): conv3×3 64,64,M,128,128,M,256,256,M,512,512,A, no conv BN;
    M = MaxPool2 + Dropout .5, A = MaxPool4 + Dropout .5; head Linear 512→512 → BN1d → ReLU → Dropout .5 → Linear.
    Expects 32×32 inputs (the reference resizes to 32)."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "A"):
        if v == "M":
            layers += [nn.MaxPool2d(2), nn.Dropout(0.5)]
        elif v == "A":
            layers += [nn.MaxPool2d(4), nn.Dropout(0.5)]
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), make_activation(activation)]
            c = v
    s = image_size // 32
    layers += [
        nn.Flatten(),
        nn.Linear(512 * s * s, 512),
        nn.BatchNorm1d(512),
        make_activation(activation),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    ]
    return nn.Sequential(*layers)


@register_model("cifar_shallow")
def cifar_shallow(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, relu_noise: float = 0.0
) -> nn.Module:
    """SmoothOut's shallow AlexNet-style CIFAR net (``cifar10_shallow``/``cifar100_shallow``; Wen et al. 2018,
    arXiv 1805.07898; SPEC §1.7): [conv5×5(64, pad 2, no bias) → maxpool 3/2 → BN → ReLU] ×2, then FC(64·7·7 = 3136 →
    384) → BN → ReLU → Dropout .5 → FC(384 → 192) → BN → ReLU → Dropout .5 → FC(192 → classes) for 32×32 inputs.
    ``relu_noise`` > 0 makes every ReLU a :class:`~flatlit.models.noisy_relu.NoisyReLU`."""
    s = image_size
    for _ in range(2):
        s = (s - 3) // 2 + 1  # conv 5x5 pad 2 keeps the size; maxpool 3 stride 2 without padding
    if s < 1:
        raise ValueError(f"cifar_shallow: image_size {image_size} is too small (needs at least 7)")
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(2):
        layers += [nn.Conv2d(c, 64, 5, padding=2, bias=False), nn.MaxPool2d(3, 2), nn.BatchNorm2d(64), relu(relu_noise)]
        c = 64
    layers += [nn.Flatten(), nn.Linear(64 * s * s, 384), nn.BatchNorm1d(384), relu(relu_noise), nn.Dropout(0.5)]
    layers += [nn.Linear(384, 192), nn.BatchNorm1d(192), relu(relu_noise), nn.Dropout(0.5), nn.Linear(192, num_classes)]
    return nn.Sequential(*layers)
