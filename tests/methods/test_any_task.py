"""The families on a task that is not image classification: regression with MSE on dict batches, a user's own
network passed as ``arch``, hand-computed SAM / LPF-SGD / SmoothOut steps through ``training_loss``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flatlit.methods import LPFSGD, SAM, EntropySGD, SGDFamily, SmoothOut
from flatlit.methods._perturb import lpf_noise, smoothout_noise
from flatlit.utils.batching import batch_size, cat_outputs, split_batch
from tests.helpers import quiet_trainer


class DictRegression(Dataset):
    """y = x·w* + 0.1·noise, served as {"inputs": x, "target": y} dicts."""

    def __init__(self, n=64, d=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.arange(1.0, d + 1) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "target": self.y[i]}


class RegressionMixin:
    """The recipe: override training_loss (any batch structure) and accuracy_inputs (None: no accuracy)."""

    def training_loss(self, batch):
        pred = self.model(batch["inputs"]).squeeze(-1)
        return F.mse_loss(pred, batch["target"]), pred

    def accuracy_inputs(self, outputs, batch):
        return None


class RegSGD(RegressionMixin, SGDFamily):
    pass


class RegSAM(RegressionMixin, SAM):
    pass


class RegLPF(RegressionMixin, LPFSGD):
    pass


class RegSmoothOut(RegressionMixin, SmoothOut):
    pass


class RegEntropy(RegressionMixin, EntropySGD):
    pass


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def loader(bs=16, n=64):
    return DataLoader(DictRegression(n), batch_size=bs, shuffle=False)


def sgd(lr):
    return lambda p: torch.optim.SGD(p, lr=lr)


def grad_at(model, values, batch):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(m.parameters(), values):
            p.copy_(v)
    loss = F.mse_loss(m(batch["inputs"]).squeeze(-1), batch["target"])
    return torch.autograd.grad(loss, list(m.parameters()))


def first(bs=16):
    return next(iter(loader(bs)))


def one_step(module, bs=16):
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(module, train_dataloaders=loader(bs))
    return [p.detach().clone() for p in module.model.parameters()]


def test_sam_step_on_a_regression_with_dict_batches_equals_hand_computed():
    rho, lr = 0.1, 0.05
    module = RegSAM(arch=net(), rho=rho, optimizer=sgd(lr))
    w0 = [p.detach().clone() for p in module.model.parameters()]
    model0, batch = copy.deepcopy(module.model), first()
    g = grad_at(model0, w0, batch)
    norm = torch.cat([gi.flatten() for gi in g]).norm()
    g2 = grad_at(model0, [w + rho * gi / (norm + 1e-12) for w, gi in zip(w0, g)], batch)
    expected = [w - lr * gi for w, gi in zip(w0, g2)]
    for a, b in zip(one_step(module), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lpf_step_on_a_regression_chunks_every_tensor_of_the_dict():
    lr, gamma, m = 0.05, 0.05, 4
    module = RegLPF(arch=net(), gamma=gamma, num_samples=m, noise_seed=3, optimizer=sgd(lr))
    w0 = [p.detach().clone() for p in module.model.parameters()]
    model0, batch = copy.deepcopy(module.model), first()
    gen = torch.Generator().manual_seed(3 * 1_000_003)
    total = [torch.zeros_like(w) for w in w0]
    for chunk in split_batch(batch, sections=m):
        noise = lpf_noise(w0, gamma, gen)
        g = grad_at(model0, [w + n for w, n in zip(w0, noise)], chunk)
        total = [t + gi * batch_size(chunk) / 16 for t, gi in zip(total, g)]
    expected = [w - lr * t for w, t in zip(w0, total)]
    for a, b in zip(one_step(module), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_smoothout_step_on_a_regression_with_ghost_batches():
    lr, a = 0.05, 0.02
    module = RegSmoothOut(arch=net(), a=a, ghost_batch_size=6, noise_seed=5, optimizer=sgd(lr))
    w0 = [p.detach().clone() for p in module.model.parameters()]
    model0, batch = copy.deepcopy(module.model), first()
    gen = torch.Generator().manual_seed(5 * 1_000_003)
    total = [torch.zeros_like(w) for w in w0]
    for chunk in split_batch(batch, size=6):  # 6 + 6 + 4 examples
        noise = smoothout_noise(w0, a, 1.0, "none", "uniform", gen)
        g = grad_at(model0, [w + n for w, n in zip(w0, noise)], chunk)
        total = [t + gi * batch_size(chunk) / 16 for t, gi in zip(total, g)]
    expected = [w - lr * t for w, t in zip(w0, total)]
    for a_, b in zip(one_step(module), expected):
        torch.testing.assert_close(a_, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "cls, kw",
    [
        (RegSGD, {}),
        (RegSAM, {"rho": 0.05}),
        (RegLPF, {"gamma": 0.001, "num_samples": 2}),
        (RegSmoothOut, {}),
        (RegEntropy, {"L": 2, "sgld_lr": 0.05, "eps": 0.0, "optimizer": sgd(2.0)}),  # outer lr × g = 1, as the original
    ],
    ids=["sgd", "sam", "lpf", "smoothout", "entropy"],
)
def test_every_family_trains_the_regression_and_logs_without_accuracy(cls, kw):
    module = cls(arch=net(), **{"optimizer": sgd(0.02), **kw})
    trainer = quiet_trainer(max_epochs=6)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    metrics = trainer.callback_metrics
    assert "train/acc" not in metrics and "val/acc" not in metrics and "gen_gap" not in metrics
    with torch.no_grad():
        before = F.mse_loss(net()(DictRegression().x).squeeze(-1), DictRegression().y)
    assert float(metrics["val/loss"]) < 0.5 * float(before)
    assert float(metrics["train/loss"]) < 0.5 * float(before)


def test_split_batch_and_cat_outputs_keep_the_structure():
    batch = {"a": torch.arange(10), "b": (torch.zeros(10, 2), torch.ones(10)), "meta": "x"}
    parts = split_batch(batch, sections=3)
    assert [batch_size(p) for p in parts] == [4, 3, 3]
    assert parts[1]["b"][0].shape == (3, 2) and parts[2]["meta"] == "x"
    assert torch.equal(cat_outputs([p["a"] for p in parts]), batch["a"])
    assert [batch_size(p) for p in split_batch(batch, size=4)] == [4, 4, 2]
    assert [batch_size(p) for p in split_batch(batch, sections=12)] == [1] * 10  # empty chunks dropped
    with pytest.raises(ValueError):
        split_batch(batch)
