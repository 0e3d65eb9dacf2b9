"""A small model registry (timm-style): ``register_model``, ``list_models``, ``create_model``.

Every builder takes ``num_classes``, ``in_channels`` and ``image_size`` (linked from the DataModule by the CLI)
plus its own keyword arguments. Names that are not registered fall back to ``timm.create_model`` and then to
``torchvision.models.get_model``; the prefixes ``timm/`` and ``torchvision/`` pick one explicitly.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from flatlit.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of the flatlit-registered models (timm and torchvision names work too)."""
    return sorted(_REGISTRY)


def _timm(name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def _torchvision(name: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise ConfigError(
            f"model.init_args.arch: torchvision model {name!r} expects 3 input channels, the data has {in_channels}."
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build a model by name.

    Raises:
        ConfigError: the name is not registered and neither timm nor torchvision knows it.
    """
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if name.startswith("timm/"):
        return _timm(name[5:], num_classes, in_channels, **kwargs)
    if name.startswith("torchvision/"):
        return _torchvision(name[12:], num_classes, in_channels, **kwargs)
    import timm
    import torchvision

    if name in timm.list_models():
        return _timm(name, num_classes, in_channels, **kwargs)
    if name in torchvision.models.list_models():
        return _torchvision(name, num_classes, in_channels, **kwargs)
    close = difflib.get_close_matches(name, list_models() + timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model.init_args.arch: unknown model {name!r}.{hint} flatlit models: {', '.join(list_models())}; "
        f"any timm or torchvision model name also works (prefix timm/ or torchvision/ to choose)."
    )
