"""Models: small reference networks, CIFAR ResNets, Shake-Shake, PyramidNet and a seq2seq Transformer behind a registry
that falls back to timm/torchvision."""

from flatlit.models import pyramidnet, resnet, shake_shake, small, transformer  # noqa: F401  (registers the builders)
from flatlit.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
