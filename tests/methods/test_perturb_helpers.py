import math

import pytest
import torch

from flatlit.methods._perturb import (
    cosine_inc,
    filter_sigma,
    lpf_noise,
    sam_epsilon,
    sam_scales,
    smoothout_noise,
    smoothout_scale,
)
from flatlit.utils.nn import frozen_bn_stats


def test_sam_epsilon_plain_and_adaptive_closed_forms():
    torch.manual_seed(0)
    w = [torch.randn(3, 4), torch.randn(3)]
    g = [torch.randn(3, 4), torch.randn(3)]
    eps, norm = sam_epsilon(g, 0.1, sam_scales(w, ["fc.weight", "fc.bias"], "none", 0.0))
    flat = torch.cat([t.flatten() for t in g])
    torch.testing.assert_close(norm, flat.norm())
    torch.testing.assert_close(torch.cat([e.flatten() for e in eps]), 0.1 * flat / flat.norm())
    # davda54 element-wise ASAM: eps = rho |w|^2 g / || |w| g ||
    eps, _ = sam_epsilon(g, 0.1, sam_scales(w, ["fc.weight", "fc.bias"], "elementwise", 0.0))
    tw = torch.cat([t.abs().flatten() for t in w])
    torch.testing.assert_close(torch.cat([e.flatten() for e in eps]), 0.1 * tw**2 * flat / (tw * flat).norm())
    # official ASAM: T = |w| + eta on weights only, identity on the bias
    eps, _ = sam_epsilon(g, 0.5, sam_scales(w, ["fc.weight", "fc.bias"], "asam", 0.01))
    t = torch.cat([(w[0].abs() + 0.01).flatten(), torch.ones(3)])
    torch.testing.assert_close(torch.cat([e.flatten() for e in eps]), 0.5 * t**2 * flat / (t * flat).norm())


def test_lpf_noise_has_per_filter_std():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 5, 5) * torch.tensor([0.1, 1.0, 3.0, 10.0]).view(4, 1, 1, 1)
    b = torch.randn(7)
    gamma = 0.01
    draws = torch.stack([torch.cat([n.flatten() for n in lpf_noise([w, b], gamma, gen)]) for _ in range(400)])
    wn = draws[:, : w.numel()].view(400, 4, -1)
    for j in range(4):
        expected = gamma * w[j].norm()
        assert abs(wn[:, j].std().item() / expected.item() - 1) < 0.03
    assert abs(draws[:, w.numel() :].std().item() / (gamma * b.norm()).item() - 1) < 0.05
    assert abs(draws.mean().item()) < 0.01
    assert filter_sigma(w, gamma).shape == (4, 1, 1, 1)


def test_cosine_inc_schedule():
    assert cosine_inc(0, 100, 0.5, 16) == 0.5
    assert math.isclose(cosine_inc(100, 100, 0.5, 16), 8.0)
    assert math.isclose(cosine_inc(50, 100, 0.5, 16), 0.5 * (15 * 0.5 + 1))
    assert cosine_inc(70, 100, 0.5, 1) == 0.5


def test_smoothout_noise_forms():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6)
    (n,) = smoothout_noise([w], 0.1, 1.0, "none", "uniform", gen)
    assert n.abs().max() <= 0.1 and abs(n.std().item() - 0.1 / math.sqrt(3)) < 0.01
    (n,) = smoothout_noise([w], 0.1, 1.0, "weight", "uniform", gen)
    assert (n.abs() <= 0.1 * w.abs() + 1e-7).all()
    (n,) = smoothout_noise([w], 0.1, 0.5, "filter", "normal", gen)
    torch.testing.assert_close(n.norm(dim=1), 0.05 * w.norm(dim=1), rtol=1e-4, atol=1e-6)
    (n,) = smoothout_noise([w], 0.1, 1.0, "tensor", "uniform", gen)
    assert n.abs().max() <= 0.1 * w.norm() and n.abs().max() > 0.05 * w.norm()
    assert smoothout_scale("constant", 5, 10) == 1.0
    assert math.isclose(smoothout_scale("anneal", 3, 10, 0.55), (1 / 4**0.55) ** 0.5)
    assert smoothout_scale("tanh", 0, 100) < 0.01 and smoothout_scale("tanh", 100, 100) > 0.99
    with pytest.raises(ValueError):
        smoothout_noise([w], 0.1, 1.0, "bogus", "uniform", gen)


def test_frozen_bn_stats_restores_buffers():
    bn = torch.nn.BatchNorm1d(3)
    before = [b.clone() for b in bn.buffers()]
    with frozen_bn_stats(bn):
        bn(torch.randn(8, 3))
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))
    bn(torch.randn(8, 3))
    assert not torch.equal(before[0], bn.running_mean)
