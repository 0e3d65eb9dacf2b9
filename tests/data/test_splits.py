import pytest
import torch

from flatlit.data.splits import corrupt_labels, split_indices, subset_indices
from flatlit.utils.errors import ConfigError


def test_split_sizes_disjoint_and_seeded():
    tr, va = split_indices(100, 20, seed=3)
    assert len(tr) == 80 and len(va) == 20
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(100))
    _tr2, va2 = split_indices(100, 20, seed=3)
    assert torch.equal(va, va2)
    _, va3 = split_indices(100, 20, seed=4)
    assert not torch.equal(va, va3)
    assert len(split_indices(100, 0.25, seed=0)[1]) == 25
    assert len(split_indices(100, 0, seed=0)[1]) == 0


@pytest.mark.parametrize("bad", [-1, 100, 1.5])
def test_split_rejects_bad_sizes(bad):
    with pytest.raises(ConfigError, match="val_size"):
        split_indices(100, bad, seed=0)


def test_subset_is_seeded_subset():
    idx = torch.arange(10, 60)
    sub = subset_indices(idx, 10, seed=1)
    assert len(sub) == 10 and set(sub.tolist()) <= set(idx.tolist())
    assert torch.equal(sub, subset_indices(idx, 10, seed=1))
    assert subset_indices(idx, None, seed=1) is idx
    with pytest.raises(ConfigError, match=r"train_subset: asked for 51 examples but the training split holds 50"):
        subset_indices(idx, 51, seed=0)


def test_label_noise_fraction_and_reproducibility():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    noisy = corrupt_labels(y, 0.3, 10, seed=5)
    # replaced w.p. 0.3 by a uniform class, which keeps the label w.p. 1/10: expected change rate 0.27
    changed = (noisy != y).float().mean().item()
    assert abs(changed - 0.27) < 0.015
    assert torch.equal(noisy, corrupt_labels(y, 0.3, 10, seed=5))
    assert not torch.equal(noisy, corrupt_labels(y, 0.3, 10, seed=6))
    assert torch.equal(corrupt_labels(y, 0.0, 10, seed=5), y)
    rand = corrupt_labels(y, 1.0, 10, seed=5)
    assert abs((rand == y).float().mean().item() - 0.1) < 0.015
    assert rand.min() >= 0 and rand.max() <= 9


@pytest.mark.parametrize("bad", [-0.1, 1.2])
def test_label_noise_out_of_range(bad):
    with pytest.raises(ConfigError, match=r"label_noise: must lie in \[0, 1\]"):
        corrupt_labels(torch.zeros(5, dtype=torch.long), bad, 10, 0)
