import pytest
import torch

from flatlit.data.transforms import BatchTransform, cutout, random_crop, random_hflip, resolve_stats
from flatlit.errors import ConfigError


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
