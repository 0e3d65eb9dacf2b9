"""Shared DataModule logic: validation split, training subset, label noise, input noise, presets.

Subclasses only say how to read the official train and test splits. Two families:

- :class:`InMemoryDataModule` (MNIST, Fashion-MNIST, CIFAR): uint8 tensors on the training device and
  :class:`~flatlit.data.loader.InMemoryLoader` batches (the fast path).
- :class:`FolderDataModule` (TinyImageNet, ImageNet): JPEG folders through torchvision transforms and torchdata's
  ``StatefulDataLoader`` with a rank-aware ``StatefulDistributedSampler``, so Lightning checkpoints the loader's
  position and a run killed mid-epoch resumes at the next batch; each example's augmentation is seeded by
  ``(seed, epoch, example)``, so it does not depend on worker processes, their number or a restart.

The validation split is taken from the official training set (``val_size``, ``split_seed``); when it is 0 the
official test split serves as the validation set, as in the reference repositories. Label noise and input noise
touch the training split only; the corrupted label vector is kept in the DataModule's ``state_dict`` (so it is in
every checkpoint) and written to ``<log_dir>/train_labels.pt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from flatlit.data.loader import InMemoryLoader
from flatlit.data.splits import check_fraction, corrupt_labels, split_indices, subset_indices
from flatlit.data.transforms import (
    AUGMENT_PRESETS,
    NORMALIZE_PRESETS,
    BatchTransform,
    check_choice,
    folder_transforms,
    resolve_stats,
)
from flatlit.utils.errors import ConfigError

log = logging.getLogger(__name__)


class FlatlitDataModule(pl.LightningDataModule):
    """Base DataModule for image classification with the knobs of flat-minima studies.

    Args:
        data_dir: where the dataset files live (or are downloaded to).
        batch_size: training batch size (per process under DDP).
        eval_batch_size: validation/test batch size (defaults to ``batch_size``).
        num_workers: DataLoader workers (folder datasets only; the in-memory path needs none).
        val_size: validation examples held out of the training set (count, or fraction if a float < 1).
            0 uses the official test split for validation.
        split_seed: seed of the train/validation split.
        train_subset: train on a seeded random subset of this many examples (None = all).
        subset_seed: seed of the subset.
        label_noise: probability that a training label is replaced by a uniformly random class.
        random_labels: shorthand for ``label_noise=1`` (Zhang et al. 2017 random labels).
        label_seed: seed of the label corruption.
        input_noise: std of additive Gaussian noise on training images in [0, 1], before normalisation.
        input_noise_mode: ``fixed`` (one draw per example, kept for the whole run, as LPF-SGD's data-noise
            study) or ``fresh`` (a new draw every batch).
        noise_seed: seed of the fixed input noise.
        augment: ``none | basic | cutout | autoaugment`` (training split only).
        normalize: ``none | dataset | imagenet | center``.
        download: try to download missing files (users with internet).
        seed: seed of shuffling and augmentation randomness.
    """

    dataset_name: str = ""
    num_classes: int = 0
    in_channels: int = 3
    image_size: int = 32
    cutout_size: int = 16

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int | float = 0,
        split_seed: int = 0,
        train_subset: int | None = None,
        subset_seed: int = 0,
        label_noise: float = 0.0,
        random_labels: bool = False,
        label_seed: int = 0,
        input_noise: float = 0.0,
        input_noise_mode: str = "fixed",
        noise_seed: int = 0,
        augment: str = "none",
        normalize: str = "dataset",
        download: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.init_args.batch_size: must be >= 1, got {batch_size}.")
        if input_noise < 0:
            raise ConfigError(f"data.init_args.input_noise: must be >= 0, got {input_noise}.")
        if train_subset is not None and train_subset < 1:
            raise ConfigError(f"data.init_args.train_subset: must be >= 1 or null, got {train_subset}.")
        self.data_dir = os.path.expanduser(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self.train_subset = train_subset
        self.subset_seed = subset_seed
        self.label_noise = 1.0 if random_labels else check_fraction("label_noise", label_noise)
        self.label_seed = label_seed
        self.input_noise = float(input_noise)
        self.input_noise_mode = check_choice("data.init_args.input_noise_mode", input_noise_mode, ("fixed", "fresh"))
        self.noise_seed = noise_seed
        self.augment = check_choice("data.init_args.augment", augment, AUGMENT_PRESETS)
        self.normalize = check_choice("data.init_args.normalize", normalize, NORMALIZE_PRESETS)
        self.download = download
        self.seed = seed
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None
        self.train_targets: torch.Tensor | None = None  # possibly corrupted
        self.clean_train_targets: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def normalization(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) of the evaluation transform x ↦ (x − mean) / std on [0, 1] pixels, as copies broadcastable
        to NCHW ((1, C, 1, 1); a per-pixel mean and one std for ``center``), or None for ``normalize='none'``.
        Read-only; ``center`` is known after ``setup()``."""
        stats = getattr(self, "_stats", None)
        if stats is None:
            if self.normalize == "center":
                raise RuntimeError("normalization: 'center' statistics come from the data; call setup() first.")
            stats = resolve_stats(self.normalize, self.dataset_name)
        return None if stats is None else (stats[0].clone(), stats[1].clone())

    # ---- split / subset / labels, shared by both families -------------------------------------------------------
    def _make_split(self, all_targets: torch.Tensor) -> None:
        train_idx, val_idx = split_indices(len(all_targets), self.val_size, self.split_seed)
        train_idx = subset_indices(train_idx, self.train_subset, self.subset_seed)
        clean = all_targets[train_idx]
        restored = self.train_targets
        self.train_indices, self.val_indices, self.clean_train_targets = train_idx, val_idx, clean
        if restored is not None and len(restored) == len(clean):  # labels restored from a checkpoint
            self.train_targets = restored
        else:
            self.train_targets = corrupt_labels(clean, self.label_noise, self.num_classes, self.label_seed)
        if self.label_noise > 0:
            flipped = (self.train_targets != clean).float().mean().item()
            rank_zero_info(
                f"flatlit: label noise {self.label_noise:g} (seed {self.label_seed}): "
                f"{flipped:.1%} of {len(clean)} training labels differ from the true ones."
            )
            self._save_labels()

    def _save_labels(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        # only into a logger's run directory (without a logger, log_dir is the working directory); trainer.log_dir
        # is a broadcast under DDP: every rank asks, rank 0 writes
        log_dir = trainer.log_dir if trainer.loggers else None
        if log_dir is None or trainer.global_rank != 0:
            return
        os.makedirs(log_dir, exist_ok=True)
        torch.save(
            {
                "train_indices": self.train_indices,
                "targets": self.train_targets,
                "clean_targets": self.clean_train_targets,
                "label_noise": self.label_noise,
                "label_seed": self.label_seed,
            },
            os.path.join(log_dir, "train_labels.pt"),
        )

    def state_dict(self) -> dict[str, Any]:
        if self.train_targets is None or self.label_noise == 0:
            return {}
        return {"train_targets": self.train_targets.cpu(), "train_indices": self.train_indices.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        targets = state_dict.get("train_targets")
        if targets is not None:
            self.train_targets = targets
            self._on_labels_restored()

    def _on_labels_restored(self) -> None:
        """Hook for subclasses that cache labels elsewhere."""

    def curvature_indices(self, num_samples: int, seed: int) -> torch.Tensor:
        """A seeded random subset (positions in the training split) for curvature measurements."""
        n = len(self.train_indices) if self.train_indices is not None else 0
        if num_samples > n or num_samples < 1:
            raise ConfigError(
                f"num_samples: asked for {num_samples} curvature samples but the training split holds {n}; "
                f"choose a value in [1, {n}]."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return perm[:num_samples].sort().values

    def curvature_batches(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        augment: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed sample of the training split as (x, y) batches, with the evaluation transform (or the training
        augmentation when ``augment``); under DDP each rank gets its share ``rank::world_size`` (CPU tensors)."""
        raise NotImplementedError

    def evaluation_batches(
        self, split: str = "train", batch_size: int | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every example of the ``train`` split (as trained on: subset, noisy labels, fixed input noise) or the
        ``test`` split, in order, under the evaluation transform; this rank's share ``rank::world_size`` without
        padding, so sums over ranks count each example once. Batches of ``batch_size`` (default
        ``eval_batch_size``) are yielded one at a time (CPU tensors), never the whole split at once."""
        raise NotImplementedError

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _device(self) -> torch.device:
        trainer = self.trainer
        if trainer is None:
            return torch.device("cpu")
        return trainer.strategy.root_device


class InMemoryDataModule(FlatlitDataModule):
    """Small datasets held as uint8 tensors on the training device, batched with tensor ops."""

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (uint8 NCHW images, int64 labels) of the official train or test split."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and not hasattr(self, "_train_images"):
            images, targets = self._read(train=True)
            self._all_images, self._all_targets = images, targets
            self._make_split(targets)
            train_images = images[self.train_indices]
            self._stats = resolve_stats(self.normalize, self.dataset_name, train_images)
            if self.input_noise > 0 and self.input_noise_mode == "fixed":
                g = torch.Generator().manual_seed(self.noise_seed)
                noise = torch.randn(train_images.shape, generator=g)
                train_images = train_images.float().div_(255.0).add_(noise, alpha=self.input_noise)
            self._train_images = train_images
            if len(self.val_indices) > 0:
                self._val_images, self._val_targets = images[self.val_indices], targets[self.val_indices]
        if stage in (None, "test") or (stage in ("fit", "validate") and len(self.val_indices) == 0):
            if not hasattr(self, "_test_images"):
                self._test_images, self._test_targets = self._read(train=False)
            if not hasattr(self, "_stats"):
                self._stats = resolve_stats(self.normalize, self.dataset_name, self._test_images)

    def _loader(self, images: torch.Tensor, targets: torch.Tensor, train: bool) -> InMemoryLoader:
        device = self._device()
        rank, world = self._rank_world()
        transform = BatchTransform(
            self.augment if train else "none",
            self._stats,
            cutout_size=self.cutout_size,
            noise_std=self.input_noise if (train and self.input_noise_mode == "fresh") else 0.0,
        )
        return InMemoryLoader(
            images.to(device),
            targets.to(device),
            self.batch_size if train else self.eval_batch_size,
            transform,
            shuffle=train,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )

    def train_dataloader(self) -> InMemoryLoader:
        return self._loader(self._train_images, self.train_targets, train=True)

    def val_dataloader(self) -> InMemoryLoader:
        if len(self.val_indices) == 0:
            return self._loader(self._test_images, self._test_targets, train=False)
        return self._loader(self._val_images, self._val_targets, train=False)

    def test_dataloader(self) -> InMemoryLoader:
        return self._loader(self._test_images, self._test_targets, train=False)

    def curvature_batches(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        augment: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pos = self.curvature_indices(num_samples, seed)[rank::world_size]
        images, targets = self._train_images[pos], self.train_targets[pos]
        transform = BatchTransform(self.augment if augment else "none", self._stats, cutout_size=self.cutout_size)
        gen = torch.Generator().manual_seed(seed + 1)
        return [
            (transform(images[i : i + batch_size].cpu(), gen), targets[i : i + batch_size].cpu())
            for i in range(0, len(pos), batch_size)
        ]

    def evaluation_batches(
        self, split: str = "train", batch_size: int | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_choice("split", split, ("train", "test"))
        if split == "test" and not hasattr(self, "_test_images"):
            self.setup("test")
        images, targets = (
            (self._train_images, self.train_targets) if split == "train" else (self._test_images, self._test_targets)
        )
        pos = torch.arange(len(targets))[rank::world_size]
        transform = BatchTransform("none", self._stats)
        size = batch_size or self.eval_batch_size
        for i in range(0, len(pos), size):
            sel = pos[i : i + size].to(images.device)
            yield transform(images[sel]).cpu(), targets[sel.to(targets.device)].cpu()


class EpochIndexSampler(StatefulDistributedSampler):
    """torchdata's stateful, rank-sharded, (seed + epoch)-shuffled sampler yielding ``(index, epoch)`` keys.

    The epoch travels with the index so the dataset can seed each example's augmentation; being a
    ``DistributedSampler`` it is kept by Lightning as is under DDP (sharded by the ``rank``/``num_replicas`` given).
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for i in super().__iter__():
            yield i, epoch


class EpochStatefulDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` whose state carries the sampler's epoch and whose iterator starts lazily.

    Lightning restores a loader's state and calls ``iter()`` before it calls ``set_epoch`` for the resumed epoch,
    and a loader with workers draws indices as soon as its iterator exists. Here the iterator is created at the
    first ``next()`` (after ``set_epoch``), and a restored position is applied only to a pass of the epoch it was
    saved in: a checkpoint taken after the last batch of an epoch starts the next epoch from its first batch.
    """

    _pending: dict[str, Any] | None = None
    _pending_epoch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:  # restored, not yet iterated: the restored position still holds
            return {**self._pending, "flatlit_epoch": self._pending_epoch}
        return {**super().state_dict(), "flatlit_epoch": self.sampler.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._pending_epoch = state.pop("flatlit_epoch", None)
        self._pending = state

    def __iter__(self) -> Iterator[Any]:
        def lazy() -> Iterator[Any]:
            pending, self._pending = self._pending, None
            if pending is not None and self._pending_epoch == self.sampler.epoch:
                super(EpochStatefulDataLoader, self).load_state_dict(pending)
            yield from super(EpochStatefulDataLoader, self).__iter__()

        return lazy()


def example_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one training example's augmentation and fresh noise in one epoch."""
    return ((seed * 1_000_003 + epoch) * 2_000_003 + index) % (2**63 - 1)


class _IndexedDataset(Dataset):
    """A view of ``base`` restricted to ``indices`` with replaced ``targets`` and fixed per-example noise.

    Keys are positions ``i`` (evaluation) or ``(i, epoch)`` pairs from :class:`EpochIndexSampler` (training): then
    the random transforms and fresh noise run under a CPU RNG seeded by :func:`example_seed` (forked, so the
    caller's RNG is untouched when there are no workers).
    """

    def __init__(
        self,
        base: Dataset,
        indices: torch.Tensor,
        targets: torch.Tensor,
        transform,
        noise: float = 0.0,
        noise_seed: int = 0,
        fresh: bool = False,
        seed: int = 0,
    ) -> None:
        self.base, self.indices, self.targets = base, indices.tolist(), targets.tolist()
        self.transform, self.noise, self.noise_seed, self.fresh = transform, noise, noise_seed, fresh
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            i, epoch = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(example_seed(self.seed, epoch, self.indices[i]))
                return self._get(i)
        return self._get(key)

    def _get(self, i: int):
        pre, post = self.transform
        x = pre(self.base.load(self.indices[i]))
        if self.noise > 0:  # on [0, 1] pixels, before normalisation; fixed noise is seeded by the example index
            g = None if self.fresh else torch.Generator().manual_seed(self.noise_seed * 1_000_003 + self.indices[i])
            x = x + self.noise * torch.randn(x.shape, generator=g)
        return post(x), self.targets[i]


class FolderDataModule(FlatlitDataModule):
    """JPEG-folder datasets (TinyImageNet, ImageNet) through torchvision transforms and DataLoaders.

    Subclasses implement :meth:`_dataset` returning an object with ``targets`` (list of int) and ``load(i)``
    (a PIL image).
    """

    resize: int | None = None

    def _dataset(self, split: str):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.normalize == "center":
            raise ConfigError(
                "data.init_args.normalize: 'center' needs the whole training set in memory; use 'dataset' or "
                "'imagenet' for folder datasets."
            )
        if stage in (None, "fit", "validate") and not hasattr(self, "_train_base"):
            self._train_base = self._dataset("train")
            self._make_split(torch.as_tensor(self._train_base.targets))
        if not hasattr(self, "_test_base") and (
            stage in (None, "test") or len(self.val_indices if self.val_indices is not None else []) == 0
        ):
            self._test_base = self._dataset("val")

    def _tf(self, train: bool):
        return folder_transforms(
            self.augment if train else "none", self.normalize, self.dataset_name, train, self.image_size, self.resize
        )

    def _dl(self, ds: Dataset, train: bool) -> DataLoader:
        if train:
            rank, world = self._rank_world()
            sampler = EpochIndexSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
            return EpochStatefulDataLoader(
                ds,
                batch_size=self.batch_size,
                sampler=sampler,
                # the workers' base seed comes from this generator, not the global RNG (dropout's stream): with
                # per-example seeds the base seed does not matter, and a resumed run's RNG stays in step
                generator=torch.Generator().manual_seed(self.seed),
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=self.num_workers > 0,
            )
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds: never from the global RNG
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        ds = _IndexedDataset(
            self._train_base,
            self.train_indices,
            self.train_targets,
            self._tf(True),
            self.input_noise,
            self.noise_seed,
            self.input_noise_mode == "fresh",
            self.seed,
        )
        return self._dl(ds, True)

    def _eval_ds(self, base, indices=None) -> Dataset:
        idx = torch.arange(len(base.targets)) if indices is None else indices
        targets = torch.as_tensor(base.targets)[idx]
        return _IndexedDataset(base, idx, targets, self._tf(False))

    def val_dataloader(self) -> DataLoader:
        if len(self.val_indices) == 0:
            return self._dl(self._eval_ds(self._test_base), False)
        return self._dl(self._eval_ds(self._train_base, self.val_indices), False)

    def test_dataloader(self) -> DataLoader:
        return self._dl(self._eval_ds(self._test_base), False)

    def evaluation_batches(
        self, split: str = "train", batch_size: int | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        check_choice("split", split, ("train", "test"))
        if split == "test":
            if not hasattr(self, "_test_base"):
                self.setup("test")
            idx = torch.arange(len(self._test_base.targets))[rank::world_size]
            ds = _IndexedDataset(self._test_base, idx, torch.as_tensor(self._test_base.targets)[idx], self._tf(False))
        else:
            fixed = self.input_noise if self.input_noise_mode == "fixed" else 0.0  # part of the data trained on
            pos = torch.arange(len(self.train_indices))[rank::world_size]
            ds = _IndexedDataset(
                self._train_base,
                self.train_indices[pos],
                self.train_targets[pos],
                self._tf(False),
                fixed,
                self.noise_seed,
            )
        yield from DataLoader(ds, batch_size=batch_size or self.eval_batch_size, num_workers=self.num_workers)

    def curvature_batches(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        augment: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pos = self.curvature_indices(num_samples, seed)[rank::world_size]
        ds = _IndexedDataset(self._train_base, self.train_indices[pos], self.train_targets[pos], self._tf(augment))
        return list(DataLoader(ds, batch_size=batch_size, num_workers=self.num_workers))
