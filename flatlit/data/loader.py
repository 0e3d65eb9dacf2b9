"""In-memory batch loader: the fast path for MNIST, Fashion-MNIST and CIFAR.

The whole split lives as one uint8 tensor on the training device; a batch is one index op plus batched tensor
augmentation (:class:`~flatlit.data.transforms.BatchTransform`). There is no per-image Python or PIL work and no
worker processes. Shuffling is seeded by ``(seed, epoch)`` and the augmentation of batch ``b`` by
``(seed, epoch, rank, b)``, so every batch is a pure function of its position: the loader is *stateful* in
Lightning's sense (``state_dict``/``load_state_dict``, saved in every checkpoint by the fit loop), and a run killed
mid-epoch resumes at the next batch with the same permutation and augmentation draws. Under DDP each rank takes its
``rank::world_size`` share of the permutation, padded like :class:`torch.utils.data.DistributedSampler` so all
ranks see equal batch counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from flatlit.data.transforms import BatchTransform


class EpochSampler:
    """Seeded per-epoch permutation, sharded over ranks. Lightning calls :meth:`set_epoch` each epoch."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def num_samples(self) -> int:
        return math.ceil(self.n / self.world_size)

    def indices(self) -> torch.Tensor:
        if self.shuffle:
            idx = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch))
        else:
            idx = torch.arange(self.n)
        total = self.num_samples() * self.world_size
        if total > self.n:  # pad by wrapping, as DistributedSampler does
            idx = torch.cat([idx, idx[: total - self.n]])
        return idx[self.rank : total : self.world_size]


class InMemoryLoader:
    """Iterable of ``(x, y)`` batches over tensors held in memory.

    Args:
        images: NCHW uint8 (or float in [0, 1]) tensor, already on the target device.
        targets: int64 labels on the same device.
        batch_size: examples per batch.
        transform: batch transform applied to each batch.
        shuffle: reshuffle every epoch.
        drop_last: drop the last incomplete batch.
        seed: base seed for the permutation and augmentation randomness.
        rank, world_size: DDP sharding.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        transform: BatchTransform,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.targets = images, targets
        self.batch_size, self.transform, self.drop_last = batch_size, transform, drop_last
        self.sampler = EpochSampler(len(images), shuffle, seed, rank, world_size)
        self.batch_sampler = None  # Lightning inspects these two attributes (set_epoch, shuffle detection)
        self.seed, self.rank = seed, rank
        self._position = 0  # batches handed out in the current pass over the data
        self._resume: tuple[int, int] | None = None  # (epoch, batches) restored from a checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Where the current pass stands: its epoch and the number of batches already handed out."""
        return {"epoch": self.sampler.epoch, "batches_yielded": self._position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the next pass after the batches the checkpointed run had already consumed.

        Applied only if the next pass is of the same epoch (Lightning sets the epoch before the first batch): a
        checkpoint taken at the end of an epoch then starts the next epoch from its first batch.
        """
        self._resume = (int(state_dict.get("epoch", 0)), int(state_dict.get("batches_yielded", 0)))

    def batch_seed(self, batch: int) -> int:
        """Seed of batch ``batch``'s augmentation randomness: a function of (seed, epoch, rank, batch) only."""
        return ((self.seed * 1_000_003 + 7919 * self.sampler.epoch + 104_729 * self.rank) * 1_000_033 + batch) % (
            2**63 - 1
        )

    def __len__(self) -> int:
        n = self.sampler.num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.sampler.epoch:
            start = min(self._resume[1], len(self))
        self._resume = None
        self._position = start
        device = self.images.device
        idx = self.sampler.indices().to(device)
        gen = torch.Generator(device=device)
        for b in range(start, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            gen.manual_seed(self.batch_seed(b))
            batch = self.transform(self.images[sel], gen), self.targets[sel]
            self._position = b + 1
            yield batch
