"""The cheaper SAM schedules: passes per step, LookSAM's reused component, AE-SAM's and RST's decisions, each
against an independent recomputation."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from flatlit.methods import SAM
from flatlit.utils.errors import ConfigError
from tests.helpers import quiet_trainer
from tests.methods.test_any_task import DictRegression, RegressionMixin, loader, net, sgd


class RegSAM(RegressionMixin, SAM):
    """Counts forward passes and backward calls per training step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes: list[tuple[int, int]] = []
        self._fw = self._bw = 0

    def training_loss(self, batch):
        self._fw += 1
        return super().training_loss(batch)

    def manual_backward(self, loss, *args, **kwargs):
        self._bw += 1
        return super().manual_backward(loss, *args, **kwargs)

    def on_train_batch_end(self, *args):
        self.passes.append((self._fw, self._bw))
        self._fw = self._bw = 0


def fit(module, steps=12, bs=8):
    quiet_trainer(max_steps=steps, limit_val_batches=0).fit(module, train_dataloaders=loader(bs))
    return [fw for fw, _ in module.passes], [bw for _, bw in module.passes]


def loss_grad(model, batch):
    m = copy.deepcopy(model)
    loss = F.mse_loss(m(batch["inputs"]).squeeze(-1), batch["target"])
    return list(torch.autograd.grad(loss, list(m.parameters())))


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, [2] * 12),
        ({"schedule": "interval", "interval": 5}, [2, 1, 1, 1, 1, 2, 1, 1, 1, 1, 2, 1]),
        ({"schedule": "looksam", "interval": 3}, [2, 1, 1] * 4),
    ],
    ids=["every", "interval5", "looksam3"],
)
def test_passes_per_step(kw, expected):
    forwards, backwards = fit(RegSAM(arch=net(), optimizer=sgd(0.05), **kw))
    assert forwards == expected and backwards == expected  # a non-SAM step is exactly one forward/backward


def test_rst_draws_are_bernoulli_per_step_and_reproducible():
    module = RegSAM(arch=net(), optimizer=sgd(0.05), schedule="rst", switch_prob=0.5, noise_seed=3)
    forwards, backwards = fit(module, steps=40)
    draws = []
    for t in range(40):
        gen = torch.Generator().manual_seed(3 * 1_000_003 + 7_777_777 + t)
        draws.append(2 if float(torch.rand((), generator=gen)) < 0.5 else 1)
    assert forwards == draws and backwards == draws
    assert 10 <= draws.count(2) <= 30
    again = RegSAM(arch=net(), optimizer=sgd(0.05), schedule="rst", switch_prob=0.5, noise_seed=3)
    assert fit(again, steps=40)[0] == forwards
    never = RegSAM(arch=net(), optimizer=sgd(0.05), schedule="rst", switch_prob=0.0)
    assert fit(never, steps=10)[0] == [1] * 10


def test_looksam_reuses_the_orthogonal_component_as_defined():
    """Two steps of LookSAM (k = 2) by hand: a SAM step storing g_v, then g + α‖g‖/‖g_v‖ g_v."""
    rho, lr, alpha = 0.1, 0.05, 0.7
    module = RegSAM(arch=net(), rho=rho, optimizer=sgd(lr), schedule="looksam", interval=2, looksam_alpha=alpha)
    model = copy.deepcopy(module.model)
    b0, b1 = list(loader(8))[:2]
    g = flat(loss_grad(model, b0))
    w0 = flat(model.parameters()).detach()
    eps = rho * g / (g.norm() + 1e-12)
    torch.nn.utils.vector_to_parameters(w0 + eps, model.parameters())
    gs = flat(loss_grad(model, b0))
    gv = gs - (g @ gs) / (g @ g) * g
    assert abs(float(gv @ g)) < 1e-5 * float(gv.norm() * g.norm())  # orthogonal to g (float32)
    w1 = w0 - lr * gs
    torch.nn.utils.vector_to_parameters(w1, model.parameters())
    g1 = flat(loss_grad(model, b1))
    w2 = w1 - lr * (g1 + alpha * g1.norm() / gv.norm() * gv)
    fit(module, steps=2)
    torch.testing.assert_close(flat(module.model.parameters()).detach(), w2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat(module._gv), gv, rtol=1e-4, atol=1e-7)


def test_ae_sam_decisions_follow_the_moving_mean_and_variance_of_the_squared_gradient_norm():
    steps, lr, rho = 16, 0.05, 0.05
    module = RegSAM(arch=net(), rho=rho, optimizer=sgd(lr), schedule="ae_sam")
    model = copy.deepcopy(module.model)
    forwards, _ = fit(module, steps=steps)
    mu = var = 0.0
    batches = (list(loader(8)) * 2)[:steps]
    for t, batch in enumerate(batches):  # replay the run by hand
        g = loss_grad(model, batch)
        s = float(flat(g) @ flat(g))
        mu = 0.9 * mu + 0.1 * s
        var = 0.9 * var + 0.1 * (s - mu) ** 2
        c = 1.0 - 2.0 * t / steps
        sam = s >= mu + c * math.sqrt(var)
        assert forwards[t] == (2 if sam else 1), t
        if sam:
            w = flat(model.parameters()).detach()
            gf = flat(g)
            torch.nn.utils.vector_to_parameters(w + rho * gf / (gf.norm() + 1e-12), model.parameters())
            g = loss_grad(model, batch)
            torch.nn.utils.vector_to_parameters(w, model.parameters())
        with torch.no_grad():
            for p, gi in zip(model.parameters(), g):
                p.sub_(lr * gi)
    assert 1 in forwards and 2 in forwards
    torch.testing.assert_close(flat(module.model.parameters()).detach(), flat(model.parameters()), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"schedule": "sometimes"}, "schedule"),
        ({"schedule": "interval", "interval": 0}, "interval"),
        ({"schedule": "rst", "switch_prob": 1.5}, "switch_prob"),
        ({"schedule": "looksam", "accumulate_grad_batches": 2}, "accumulate_grad_batches"),
        ({"schedule": "ae_sam", "ae_delta": 1.0}, "ae_delta"),
    ],
)
def test_bad_schedule_arguments_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=rf"model.init_args.{key}"):
        SAM(arch=net(), **kw)


def test_interval_with_accumulation_keeps_one_decision_per_update():
    module = RegSAM(arch=net(), optimizer=sgd(0.05), schedule="interval", interval=2, accumulate_grad_batches=2)
    pl.seed_everything(0)
    forwards, _ = fit(module, steps=4)
    assert forwards == [2, 2, 1, 1, 2, 2, 1, 1]  # 4 updates of 2 micro-batches


def test_dataset_is_shared():
    assert len(DictRegression()) == 64
