"""Models: small reference networks and CIFAR ResNets behind a registry that falls back to timm/torchvision."""

from flatlit.models import resnet, small, transformer  # noqa: F401  (registers the builders)
from flatlit.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
