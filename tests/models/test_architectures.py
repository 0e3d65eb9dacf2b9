"""The LPF-SGD Table 5 and SmoothOut architectures: parameter counts from independent formulas and against the
counts their papers publish, Shake-Shake's forward/backward mixing, PyramidNet's widths, NoisyReLU, and the narrow
ResNet-18's function-preserving norm()."""

import pytest
import torch
from torch import nn

from flatlit.models import create_model
from flatlit.models.noisy_relu import NoisyReLU
from flatlit.models.shake_shake import shake
from flatlit.utils.errors import ConfigError


def count(model, bn=True):
    return sum(
        p.numel() for m in model.modules() if bn or not isinstance(m, nn.BatchNorm2d) for p in m.parameters(False)
    )


def conv(c_in, c, k):
    return c_in * c * k * k


def test_shake_shake26_2x96d_count_matches_the_formula_and_the_paper():
    model = create_model("shake_shake26_2x96d", 10, 3, 32)
    total, c_in = conv(3, 16, 3) + 2 * 16, 16
    for c in [96, 192, 384]:
        for _ in range(4):
            total += 2 * (conv(c_in, c, 3) + conv(c, c, 3) + 4 * c)  # two branches, two BNs each
            if c_in != c:
                total += conv(c_in, c // 2, 1) * 2 + 2 * c  # the two half-width 1x1 shortcut convs and their BN
            c_in = c
    total += 384 * 10 + 10
    assert count(model) == total
    assert abs(total - 26.2e6) / 26.2e6 < 0.005  # Gastaldi 2017, Table 1: "26 2x96d", 26.2M
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_shake_mixes_alpha_forward_and_an_independent_beta_backward_per_image():
    torch.manual_seed(0)
    b1 = torch.randn(6, 3, 4, 4, requires_grad=True)
    b2 = torch.randn(6, 3, 4, 4, requires_grad=True)
    out = shake(b1, b2, training=True)
    alpha = (out - b2) / (b1 - b2)
    a = alpha.flatten(1)
    torch.testing.assert_close(a, a[:, :1].expand_as(a))  # one alpha per image
    assert ((a >= 0) & (a <= 1)).all() and a[:, 0].std() > 0.05
    out.sum().backward()
    beta = b1.grad.flatten(1)
    torch.testing.assert_close(beta, beta[:, :1].expand_as(beta))
    torch.testing.assert_close(b1.grad + b2.grad, torch.ones_like(b1))
    assert (beta[:, 0] - a[:, 0]).abs().max() > 0.05  # the backward coefficient is not the forward one
    torch.testing.assert_close(shake(b1, b2, training=False), 0.5 * (b1 + b2))
    model = create_model("shake_shake", 10, 3, 32, depth=8, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))  # eval is deterministic
    model.train()
    assert not torch.equal(model(x), model(x))


def _pyramid_widths(n, alpha):
    widths, w = [], 16.0
    for _ in range(3 * n):
        w += alpha / (3 * n)
        widths.append(round(w))
    return widths


def test_pyramidnet110_basic_alpha48_count_and_widths():
    model = create_model("pyramidnet110", 10, 3, 32)
    widths = _pyramid_widths(18, 48)
    assert widths[-1] == 64 and widths[0] == 17
    total, c_in = conv(3, 16, 3) + 2 * 16, 16
    for c in widths:
        total += conv(c_in, c, 3) + conv(c, c, 3) + 2 * c_in + 4 * c  # BN(c_in), conv, BN, ReLU, conv, BN
        c_in = c
    total += 2 * 64 + 64 * 10 + 10  # final BN and the linear head
    assert count(model) == total
    assert 1.7e6 <= total < 1.8e6  # Han et al. 2017, Table 4: "PyramidNet (alpha=48) 110", 1.7M
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 54  # 110 layers with the head: stem + 108 convs + linear


def test_pyramidnet272_bottleneck_alpha200_count_matches_the_paper():
    model = create_model("pyramidnet272", 100, 3, 32)
    assert model.linear.in_features == 4 * 216
    weights = count(model, bn=False) - (864 * 100 + 100) + 864 * 10 + 10  # the CIFAR-10 count the paper reports
    assert abs(weights - 26.0e6) / 26.0e6 < 0.005  # Han et al. 2017, Table 4: "(bottleneck, alpha=200) 272", 26.0M


def test_pyramidnet_shortcut_pools_and_pads_channels():
    model = create_model("pyramidnet", 10, 3, 32, depth=20, alpha=12).eval()
    block = model.blocks[3]  # the first block of stage 2: strides and widens
    x = torch.randn(2, block.residual[0].num_features, 16, 16)
    out = block(x)
    shortcut = nn.functional.avg_pool2d(x, 2, 2)
    expected = block.residual(x) + nn.functional.pad(shortcut, (0, 0, 0, 0, 0, out.shape[1] - x.shape[1]))
    torch.testing.assert_close(out, expected)
    with pytest.raises(ConfigError, match="9n\\+2"):
        create_model("pyramidnet", 10, 3, 32, depth=21, bottleneck=True)


def test_cifar_shallow_is_the_smoothout_net():
    model = create_model("cifar_shallow", 10, 3, 32)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3136, 384), (384, 192), (192, 10)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size, m.bias) for m in convs] == [((5, 5), None)] * 2
    total = conv(3, 64, 5) + conv(64, 64, 5) + 4 * 64 + (3136 * 384 + 384) + 2 * 384 + (384 * 192 + 192) + 2 * 192
    assert count(model) == total + 192 * 10 + 10 == 1_389_066
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert create_model("cifar_shallow", 10, 1, 28)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_noisy_relu_random_slope_in_training_plain_relu_in_eval():
    act = NoisyReLU(0.2)
    x = torch.cat([torch.linspace(0.1, 3, 500), -torch.linspace(0.1, 3, 500)])
    torch.manual_seed(0)
    y = act(x)
    slope = y[:500] / x[:500]
    assert (y[500:] == 0).all() and slope.min() >= 0.8 - 1e-6 and slope.max() <= 1.2 + 1e-6
    assert slope.std() > 0.1  # U(0.8, 1.2) has std 0.115
    torch.manual_seed(0)
    torch.testing.assert_close(act(x), y)  # the global RNG drives it: seeded runs repeat
    torch.testing.assert_close(act.eval()(x), torch.relu(x))
    with pytest.raises(ValueError, match="relu_noise"):
        NoisyReLU(1.5)
    torch.manual_seed(1)
    noisy = create_model("cifar_resnet20", 10, 3, 32, relu_noise=0.1)
    torch.manual_seed(1)
    plain = create_model("cifar_resnet20", 10, 3, 32)
    assert sum(isinstance(m, NoisyReLU) for m in noisy.modules()) == 1 + 2 * 9
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(noisy.eval()(x), plain.eval()(x))
    noisy.train(), plain.train()
    assert not torch.allclose(noisy(x), plain(x))
    assert create_model("cifar_shallow", 10, 3, 32, relu_noise=0.1)[3].noise == 0.1


@pytest.mark.parametrize("batch_norm", [True, False])
def test_narrow_resnet18_norm_preserves_the_function_with_unit_filters(batch_norm):
    torch.manual_seed(0)
    model = create_model("resnet18_narrow", 10, 3, 32, width=1, batch_norm=batch_norm)
    model.train()
    model(torch.randn(16, 3, 32, 32))  # non-trivial BN running statistics
    model.eval()
    normed = model.norm().eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(normed(x), model(x), rtol=1e-4, atol=1e-5)
    for m in normed.modules():
        if isinstance(m, nn.Conv2d):
            p = m.weight.flatten(1).norm(dim=1) + m.bias.abs()
            torch.testing.assert_close(p, torch.ones_like(p))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == (1 + 8 * 2 + 3 if batch_norm else 0)
