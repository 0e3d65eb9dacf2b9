"""The loss contract (``flatlit.objective``): resolution order, logits of one-logit heads, parameter selection, the
math attention kernel for double backward, and one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlit.objective import class_logits, resolve_objective, select_parameters, twice_differentiable
from flatlit.utils.errors import ConfigError


class Plain(nn.Module):
    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, out))

    def forward(self, x):
        return self.net(x)


class WithHook(Plain):
    def curvature_loss(self, batch):
        return F.cross_entropy(self(batch["image"]), batch["label"], label_smoothing=0.1)


class WithLossFn(Plain):
    def loss_fn(self, out, y):
        return F.cross_entropy(out, y, label_smoothing=0.2)


def xy(n: int = 6, out_classes: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, out_classes, (n,), generator=g)


def test_resolution_order():
    x, y = xy()
    m = WithHook()
    batch = {"image": x, "label": y}
    explicit = resolve_objective(m, "CB", batch_loss=lambda mod, b: mod(b["image"]).pow(2).mean())
    assert explicit.source == "CB(batch_loss)"
    assert torch.equal(explicit.loss(batch), m(x).pow(2).mean())
    hook = resolve_objective(m, "CB")
    assert hook.source == "WithHook.curvature_loss"
    assert torch.equal(hook.loss(batch), F.cross_entropy(m(x), y, label_smoothing=0.1))
    explicit_fn = resolve_objective(m, "CB", loss_fn=F.nll_loss)
    assert torch.equal(explicit_fn.loss((x, y)), F.nll_loss(m(x), y))
    attr = resolve_objective(WithLossFn(), "CB")
    assert attr.source == "WithLossFn.loss_fn"
    assert torch.equal(attr.loss((x, y)), F.cross_entropy(attr.module(x), y, label_smoothing=0.2))
    default = resolve_objective(Plain(), "CB")
    assert default.default_cross_entropy and torch.equal(default.loss((x, y)), F.cross_entropy(default.module(x), y))


def test_flatlit_family_uses_training_loss_and_accuracy_inputs():
    from flatlit.methods import SGDFamily

    module = SGDFamily(arch=nn.Linear(4, 3), num_classes=3, label_smoothing=0.3)
    x, y = xy()
    obj = resolve_objective(module, "CB")
    assert obj.source == "SGDFamily.training_loss"
    assert torch.allclose(obj.loss((x, y)), F.cross_entropy(module(x), y, label_smoothing=0.3))
    logits, labels = obj.logits((x, y))
    assert torch.equal(logits, module(x)) and torch.equal(labels, y)


def test_one_logit_head_is_binary():
    z = torch.tensor([2.0, -1.0, 0.5, -3.0])
    y = torch.tensor([1, 0, 0, 0])
    logits, labels = class_logits(z.view(-1, 1), y)
    assert torch.equal(logits.argmax(1), (torch.sigmoid(z) > 0.5).long())
    assert torch.allclose(F.cross_entropy(logits, labels), F.binary_cross_entropy_with_logits(z, y.float()))
    assert class_logits(z, y.float()) is not None  # float 0/1 labels too
    assert class_logits(z, torch.tensor([0, 1, 2, 0])) is None  # not binary
    assert class_logits(torch.randn(4, 3), torch.randn(4)) is None  # regression
    assert class_logits(torch.randn(4, 7, 3), torch.randint(0, 3, (4, 7))) is None  # a sequence: needs a hook


def test_default_cross_entropy_is_refused_on_non_logits():
    obj = resolve_objective(Plain(out=1), "HessianTrace")
    x, _ = xy()
    with pytest.raises(ConfigError, match=r"HessianTrace\(loss_fn\): cross-entropy \(the default\) cannot apply"):
        obj.check((x, torch.randn(6, 1)))


def test_check_refuses_a_non_scalar_loss_and_unreached_parameters():
    m = Plain()
    x, y = xy()
    obj = resolve_objective(
        m,
        "SharpnessMeasures",
        batch_loss=lambda mod, b: F.mse_loss(mod(b[0]), b[1].float()[:, None].expand(-1, 3), reduction="none"),
    )
    with pytest.raises(
        ConfigError, match=r"SharpnessMeasures\(batch_loss\): must return the batch-mean loss as a scalar"
    ):
        obj.check((x, y))
    extra = nn.Linear(2, 2)
    m.unused = extra
    obj = resolve_objective(m, "HessianEigenvalues")
    with pytest.raises(
        ConfigError, match=r"HessianEigenvalues\(params\): .* does not reach unused.weight, unused.bias"
    ):
        obj.check((x, y), select_parameters(m))
    obj.check((x, y), select_parameters(m, "net.*"))


def test_select_parameters():
    m = Plain()
    assert len(select_parameters(m)) == 6
    assert select_parameters(m, "net.3.*") == [m.net[3].weight, m.net[3].bias]
    assert select_parameters(m, lambda mod: mod.net[0].parameters()) == [m.net[0].weight, m.net[0].bias]
    assert select_parameters(m, exclude_bn=True, exclude_bias=True) == [m.net[0].weight, m.net[3].weight]
    m.net[0].requires_grad_(False)  # a frozen backbone is left out by default
    assert len(select_parameters(m)) == 4
    with pytest.raises(ConfigError, match=r"LossLandscape\(params\): selects no parameter of Plain"):
        select_parameters(m, "discriminator.*", owner="LossLandscape")


def test_attention_is_twice_differentiable():
    """HVPs through F.scaled_dot_product_attention: the fused CPU kernel has no double backward."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    k, v = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)

    def hvp() -> torch.Tensor:
        loss = F.scaled_dot_product_attention(q, k, v).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, q, create_graph=True)
        return torch.autograd.grad(grad.sum(), q)[0]

    with twice_differentiable():
        out = hvp()

    def reference(qq):  # the attention written out
        w = torch.softmax(qq @ k.transpose(-1, -2) / 8**0.5, -1)
        return (w @ v).pow(2).sum()

    expected = torch.func.hessian(reference)(q.detach()).reshape(q.numel(), q.numel()).sum(0).view_as(q)
    assert torch.allclose(out, expected, atol=1e-4)


def test_an_op_without_double_backward_is_one_line():
    class NoDouble(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.pow(3)

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("derivative for aten::my_fused_op is not implemented")

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ConfigError, match=r"HessianTrace: the loss uses my_fused_op, which PyTorch cannot"):
        with twice_differentiable("HessianTrace"):
            NoDouble.apply(x).sum().backward()
