"""Normalisation and augmentation presets, as batched tensor ops (fast path) and torchvision transforms.

Presets (SPEC §3.5, §5.9):

- ``augment``: ``none``; ``basic`` = random crop with 4-pixel zero padding + horizontal flip (RandomCrop(32, 4) +
  RandomHorizontalFlip, as in LPF-SGD / kuangliu); ``cutout`` = basic + Cutout (DeVries & Taylor 2017, arXiv
  1708.04552; a 16×16 square, 8×8 for CIFAR-100, applied with p=0.5 after normalisation as in LPF-SGD's
  ``wrn_dataaug``); ``autoaugment`` = AutoAugment (Cubuk et al. 2019, arXiv 1805.09501, CIFAR-10 policy) + basic +
  cutout (LPF-SGD forces cutout on with AA).
- ``normalize``: ``none`` (pixels in [0, 1]), ``dataset`` (the dataset's usual mean/std), ``imagenet``, ``center``
  (per-pixel mean and global std of the training split, Jastrzebski et al.'s "center").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flatlit.utils.errors import ConfigError

AUGMENT_PRESETS = ("none", "basic", "cutout", "autoaugment")
NORMALIZE_PRESETS = ("none", "dataset", "imagenet", "center")

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The per-dataset statistics used by the reference repositories (SPEC §5.9; Fashion-MNIST from its train set).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "tiny_imagenet": IMAGENET_STATS,
    "imagenet": IMAGENET_STATS,
}


def check_choice(key: str, value: str, choices: Sequence[str]) -> str:
    """Raise a ConfigError naming ``key`` if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}: unknown value {value!r}; choose one of {', '.join(choices)}.")
    return value


def resolve_stats(
    normalize: str, dataset: str, images: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return (mean, std) tensors broadcastable to NCHW (or None for ``none``).

    ``center`` needs the training images (uint8 or float in [0, 1], NCHW): per-pixel mean, one global std.
    """
    check_choice("data.init_args.normalize", normalize, NORMALIZE_PRESETS)
    if normalize == "none":
        return None
    if normalize == "center":
        if images is None:
            raise ConfigError("data.init_args.normalize: 'center' is only available for in-memory datasets.")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        mean = x.mean(dim=0, keepdim=True)
        return mean, (x - mean).std().reshape(1, 1, 1, 1)
    mean, std = IMAGENET_STATS if normalize == "imagenet" else DATASET_STATS[dataset]
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of a zero-padded NCHW batch back to its size (RandomCrop(size, padding))."""
    b, c, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=gen.device).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    return xp[
        torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols
    ]


def random_hflip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image of an NCHW batch horizontally with probability ``p``."""
    mask = (torch.rand(x.shape[0], generator=gen, device=gen.device) < p).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Zero a ``size``×``size`` square (clipped at the border) at a random centre, per image, with probability p."""
    b, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (b,), generator=gen, device=gen.device).to(dev)
    cx = torch.randint(0, w, (b,), generator=gen, device=gen.device).to(dev)
    apply = (torch.rand(b, generator=gen, device=gen.device) < p).to(dev)
    ys = torch.arange(h, device=dev)[None, :]
    xs = torch.arange(w, device=dev)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy + size - size // 2)[:, None])
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx + size - size // 2)[:, None])
    hole = in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None]
    return x.masked_fill(hole[:, None], 0.0)


class BatchTransform:
    """Augment and normalise a batch held as tensors (uint8 in [0, 255] or float in [0, 1]), on its device.

    Args:
        augment: one of :data:`AUGMENT_PRESETS` (``none`` for evaluation).
        stats: (mean, std) from :func:`resolve_stats`, or None.
        cutout_size: side of the Cutout square.
        crop_padding: zero padding of the random crop.
        noise_std: std of fresh Gaussian noise added to the [0, 1] image before normalisation (0 = off).
    """

    def __init__(
        self,
        augment: str = "none",
        stats: tuple[torch.Tensor, torch.Tensor] | None = None,
        cutout_size: int = 16,
        crop_padding: int = 4,
        noise_std: float = 0.0,
    ) -> None:
        self.augment = check_choice("data.init_args.augment", augment, AUGMENT_PRESETS)
        self.stats = stats
        self.cutout_size = cutout_size
        self.crop_padding = crop_padding
        self.noise_std = noise_std
        self._aa = None
        if augment == "autoaugment":
            from torchvision.transforms import v2

            self._aa = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self._aa is not None and x.dtype == torch.uint8:
            assert gen is not None, "training augmentation needs a generator"
            x = self._autoaugment(x, gen)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment != "none":
            assert gen is not None, "training augmentation needs a generator"
            x = random_hflip(random_crop(x, self.crop_padding, gen), gen)
        if self.noise_std > 0:
            assert gen is not None
            x = x + self.noise_std * torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        if self.stats is not None:
            mean, std = self.stats
            x = (x - mean.to(x.device)) / std.to(x.device)
        if self.augment in ("cutout", "autoaugment"):
            x = cutout(x, self.cutout_size, gen)
        return x

    def _autoaugment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """AutoAugment, image by image on tensors (no PIL): one sub-policy per image.

        torchvision draws the sub-policy, its probabilities and signs from the global CPU RNG; they are drawn here
        under a fork of that RNG seeded from ``gen`` (one draw of ``gen`` per batch), so the augmentation is a
        function of the batch generator alone and the global RNG is left as it was.
        """
        assert self._aa is not None
        seed = int(torch.randint(0, 2**62, (), generator=gen, device=gen.device))
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: the ops themselves draw nothing
            torch.default_generator.manual_seed(seed)
            return torch.stack([self._aa(img) for img in x])


class Cutout(torch.nn.Module):
    """Cutout for a single CHW tensor image (PIL/folder pipeline), p=0.5, applied after normalisation."""

    def __init__(self, size: int = 16, p: float = 0.5) -> None:
        super().__init__()
        self.size, self.p = size, p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gen = torch.default_generator
        return cutout(img[None], self.size, gen, self.p)[0]


def folder_transforms(augment: str, normalize: str, dataset: str, train: bool, crop: int, resize: int | None):
    """torchvision transform pipelines for folder (JPEG) datasets: TinyImageNet and ImageNet.

    ImageNet (``resize`` set) uses RandomResizedCrop(crop)+flip for augmented training and Resize(resize) +
    CenterCrop(crop) otherwise (SPEC §5.9: LPF-SGD evaluates with Resize 256 + CenterCrop 224). TinyImageNet keeps
    64×64 and uses RandomCrop(64, 4)+flip for ``basic``. Returns ``(pre, post)``: ``pre`` ends with ToTensor
    (pixels in [0, 1], where input noise is added), ``post`` normalises and applies Cutout.
    """
    from torchvision import transforms as T

    check_choice("data.init_args.augment", augment, AUGMENT_PRESETS)
    stats = resolve_stats(normalize, dataset)
    ops: list = []
    if train and augment != "none":
        if resize is not None:
            ops += [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
        else:
            ops += [T.RandomCrop(crop, padding=4), T.RandomHorizontalFlip()]
        if augment == "autoaugment":
            ops.insert(0, T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    elif resize is not None:
        ops += [T.Resize(resize), T.CenterCrop(crop)]
    ops.append(T.ToTensor())
    post: list = []
    if stats is not None:
        post.append(T.Normalize(stats[0].flatten().tolist(), stats[1].flatten().tolist()))
    if train and augment in ("cutout", "autoaugment"):
        post.append(Cutout(16))
    return T.Compose(ops), T.Compose(post)
