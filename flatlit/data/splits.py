"""Pure, seeded index and label manipulations shared by every DataModule.

All functions are deterministic given their seed, so a run (and its resume) sees the same split, subset and
corrupted labels. Corruption follows Zhang et al. 2017 ("Understanding deep learning requires rethinking
generalization") as used by Neyshabur et al. 2017 and LPF-SGD's ``train_ln.py``: each label is replaced, with
probability ``p``, by a label drawn uniformly from all classes (it may coincide with the true one).
"""

from __future__ import annotations

import torch

from flatlit.utils.errors import ConfigError


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into (train, val) index tensors with a seeded permutation.

    Args:
        n: number of examples in the official training set.
        val_size: an absolute count (int) or a fraction of ``n`` (float in [0, 1)). ``0`` gives no validation split.
        seed: seed of the permutation (``data.init_args.split_seed``).
    """
    if isinstance(val_size, float) and not isinstance(val_size, bool):
        if not 0.0 <= val_size < 1.0:
            raise ConfigError(f"data.init_args.val_size: a fraction must lie in [0, 1), got {val_size}.")
        n_val = round(val_size * n)
    else:
        n_val = int(val_size)
    if n_val < 0 or n_val >= n:
        raise ConfigError(
            f"data.init_args.val_size: must be in [0, {n - 1}] for a training set of {n} examples, got {val_size}."
        )
    if n_val == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def subset_indices(indices: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Return a seeded random subset of ``indices`` of the given size (``None`` keeps all)."""
    if size is None:
        return indices
    if size <= 0 or size > len(indices):
        raise ConfigError(
            f"data.init_args.train_subset: asked for {size} examples but the training split holds "
            f"{len(indices)}; choose a value in [1, {len(indices)}] or reduce data.init_args.val_size."
        )
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
    return indices[perm[:size].sort().values]


def check_fraction(name: str, value: float) -> float:
    """Validate a probability-like config value."""
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"data.init_args.{name}: must lie in [0, 1], got {value}.")
    return float(value)


def corrupt_labels(targets: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace each label with probability ``fraction`` by a uniformly random class (seeded).

    ``fraction=1`` gives fully random labels. Returns a new tensor; ``targets`` is not modified.
    """
    check_fraction("label_noise", fraction)
    if fraction == 0.0:
        return targets.clone()
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(len(targets), generator=g) < fraction
    random = torch.randint(0, num_classes, (len(targets),), generator=g)
    return torch.where(mask, random, targets)
