import pytest
import torch

from flatlit.data.loader import InMemoryLoader
from flatlit.data.transforms import BatchTransform, cutout, random_crop, random_hflip, resolve_stats
from flatlit.utils.errors import ConfigError


def test_random_crop_matches_explicit_crop():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, gen)
    gen2 = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (2,), generator=gen2)
    dx = torch.randint(0, 5, (2,), generator=gen2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])


def test_hflip_flips_whole_images():
    x = torch.randn(64, 1, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54


def test_cutout_zeroes_a_square():
    x = torch.ones(200, 1, 32, 32)
    out = cutout(x, 16, torch.Generator().manual_seed(0), p=1.0)
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 256 and zeros.min() >= 64  # a full 16x16 square, or one clipped at a corner


@pytest.mark.parametrize("augment", ["none", "basic", "cutout", "autoaugment"])
def test_batch_transform_shapes_and_normalisation(augment):
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    stats = resolve_stats("dataset", "cifar10")
    out = BatchTransform(augment, stats)(x, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    if augment == "none":
        expected = (x.float() / 255 - stats[0]) / stats[1]
        torch.testing.assert_close(out, expected)


def test_center_normalisation_and_bad_preset():
    x = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8)
    mean, std = resolve_stats("center", "mnist", x)
    z = (x.float() / 255 - mean) / std
    assert z.mean(0).abs().max() < 1e-5 and abs(z.std().item() - 1) < 1e-2
    with pytest.raises(ConfigError, match=r"data.init_args.augment: unknown value 'mixup'"):
        BatchTransform("mixup")


def test_autoaugment_in_memory_draws_from_the_batch_generator_only():
    """Batch b of the in-memory loader is a function of (seed, epoch, rank, b): AutoAugment's choices included, so
    the same batch comes back whatever the global RNG state (a resumed run), and the global RNG is not consumed."""
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    targets = torch.arange(24)

    def batches(global_seed: int, skip: int = 0) -> list[torch.Tensor]:
        loader = InMemoryLoader(images, targets, 6, BatchTransform("autoaugment"), shuffle=True, seed=3)
        loader.sampler.set_epoch(1)
        loader.load_state_dict({"epoch": 1, "batches_yielded": skip})
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        out = [x for x, _ in loader]
        assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
        return out

    a, b, resumed = batches(0), batches(1), batches(2, skip=2)
    assert len(a) == 4 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(torch.equal(u, v) for u, v in zip(a[2:], resumed))
    # AutoAugment does act, and differently for another batch seed (not only crop, flip and cutout)
    t = BatchTransform("autoaugment")
    aa = [t._autoaugment(images, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(aa[0], aa[1]) and not torch.equal(aa[0], aa[2]) and not torch.equal(aa[0], images)
