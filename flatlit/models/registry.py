"""A small model registry (timm-style): ``register_model``, ``list_models``, ``create_model``.

Every builder takes ``num_classes``, ``in_channels`` and ``image_size`` (linked from the DataModule by the CLI)
plus its own keyword arguments. Names that are not registered fall back to ``timm.create_model`` and then to
``torchvision.models.get_model``; the prefixes ``timm/`` and ``torchvision/`` pick one explicitly.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from flatlit.utils.errors import ConfigError

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


_SIZES = ("num_classes", "in_channels", "image_size")


def _check_kwargs(name: str, fn: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments that the builder ``fn`` does not take (unless it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    bad = sorted(set(kwargs) - set(params))
    if bad:
        accepted = [k for k, p in params.items() if k not in _SIZES and p.kind is not inspect.Parameter.VAR_POSITIONAL]
        raise ConfigError(
            f"model.init_args.arch_kwargs: model {name!r} has no argument {', '.join(map(repr, bad))}; "
            f"accepted keys: {', '.join(accepted) or '(none)'}."
        )


def create_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name (see :func:`_create`); a builder that rejects its ``kwargs`` values (a wrong type,
    an impossible size) is a ConfigError naming ``model.init_args.arch_kwargs``."""
    try:
        model = _create(name, num_classes, in_channels, image_size, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        if isinstance(err, ConfigError) or not kwargs:
            raise
        raise ConfigError(
            f"model.init_args.arch_kwargs: model {name!r} rejects {kwargs} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})."
        ) from None
    if sum(p.numel() for p in model.parameters()) == 0:
        raise ConfigError(f"model.init_args.arch_kwargs: model {name!r} with {kwargs} has no parameters.")
    return model


def _create(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name.

    Sizes left at None are not passed to a registered builder, so its own defaults apply (e.g. LeNet: 1×28×28);
    timm and torchvision models default to 10 classes and 3 input channels.

    Raises:
        ConfigError: the name is not registered and neither timm nor torchvision knows it, or ``kwargs`` holds
            a key that the registered builder does not accept.
    """
    if name in _REGISTRY:
        fn = _REGISTRY[name]
        _check_kwargs(name, fn, kwargs)
        given = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        return fn(**{k: v for k, v in given.items() if v is not None}, **kwargs)
    num_classes = 10 if num_classes is None else num_classes
    in_channels = 3 if in_channels is None else in_channels
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
