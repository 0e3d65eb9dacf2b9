"""Perturbation families against hand computations and direct re-implementations."""

import copy
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from flatlit.data import MNISTDataModule
from flatlit.methods import LPFSGD, SAM, EntropySGD, SmoothOut
from flatlit.methods._perturb import lpf_noise, smoothout_noise
from flatlit.utils.errors import ConfigError
from tests.helpers import quiet_trainer

ARCH = {"arch": "mlp", "arch_kwargs": {"width": 16, "batch_norm": True}}


def sgd(lr=0.1, momentum=0.0):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum)


def trainer(**kw):
    return quiet_trainer(**{"limit_val_batches": 0, **kw})


def first_batch(mnist_dir, batch_size=48):
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=batch_size, download=False)
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def grads_at(model, params_values, x, y):
    """Gradient of the mean CE of a copy of ``model`` with the given parameter values (train mode)."""
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, v in zip(m.parameters(), params_values):
            p.copy_(v)
    loss = F.cross_entropy(m(x), y)
    return torch.autograd.grad(loss, list(m.parameters())), m


def one_step(module, dm):
    trainer(max_steps=1).fit(module, datamodule=dm)
    return [p.detach().clone() for p in module.model.parameters()]


@pytest.mark.parametrize("adaptive", ["none", "elementwise", "asam"])
def test_sam_step_equals_hand_computed(mnist_dir, adaptive):
    torch.manual_seed(0)
    rho, lr, eta = 0.05 if adaptive == "none" else 0.5, 0.1, 0.01
    module = SAM(**ARCH, rho=rho, adaptive=adaptive, eta=eta, optimizer=sgd(lr))
    model0 = copy.deepcopy(module.model)
    w0 = [p.detach().clone() for p in model0.parameters()]
    names = [n for n, _ in model0.named_parameters()]
    dm, (x, y) = first_batch(mnist_dir)
    g, after_pass1 = grads_at(model0, w0, x, y)
    if adaptive == "none":
        t = [torch.ones_like(w) for w in w0]
    elif adaptive == "elementwise":
        t = [w.abs() for w in w0]
    else:
        t = [w.abs() + eta if "weight" in n else torch.ones_like(w) for n, w in zip(names, w0)]
    norm = torch.cat([(ti * gi).flatten() for ti, gi in zip(t, g)]).norm()
    eps = [rho * ti**2 * gi / (norm + 1e-12) for ti, gi in zip(t, g)]
    g2, _ = grads_at(model0, [w + e for w, e in zip(w0, eps)], x, y)
    expected = [w - lr * gi for w, gi in zip(w0, g2)]
    got = one_step(module, dm)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # default bn_stats="first": running statistics are those of pass 1 only
    torch.testing.assert_close(module.model[2].running_mean, after_pass1[2].running_mean)


def test_sam_bn_stats_both_updates_twice(mnist_dir):
    torch.manual_seed(0)
    module = SAM(**ARCH, bn_stats="both", optimizer=sgd(0.1))
    dm, _ = first_batch(mnist_dir)
    one_step(module, dm)
    assert module.model[2].num_batches_tracked.item() == 2
    module = SAM(**ARCH, optimizer=sgd(0.1))
    one_step(module, dm)
    assert module.model[2].num_batches_tracked.item() == 1


def test_lpf_step_uses_mean_gradient_at_noisy_points(mnist_dir):
    torch.manual_seed(0)
    lr, gamma, m_samples = 0.1, 0.05, 3
    module = LPFSGD(**ARCH, gamma=gamma, num_samples=m_samples, noise_seed=4, optimizer=sgd(lr))
    model0 = copy.deepcopy(module.model)
    w0 = [p.detach().clone() for p in model0.parameters()]
    dm, (x, y) = first_batch(mnist_dir)
    gen = torch.Generator().manual_seed(4 * 1_000_003)
    total = [torch.zeros_like(w) for w in w0]
    for xc, yc in zip(torch.tensor_split(x, m_samples), torch.tensor_split(y, m_samples)):
        noise = lpf_noise(w0, gamma, gen)
        g, _ = grads_at(model0, [w + n for w, n in zip(w0, noise)], xc, yc)
        total = [t + gi * len(yc) / len(y) for t, gi in zip(total, g)]
    expected = [w - lr * t for w, t in zip(w0, total)]
    got = one_step(module, dm)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_smoothout_restores_exactly_and_steps_with_the_noisy_gradient(mnist_dir):
    torch.manual_seed(0)
    module = SmoothOut(**ARCH, a=0.05, optimizer=sgd(0.0))
    dm, (x, y) = first_batch(mnist_dir)
    w0 = [p.detach().clone() for p in module.model.parameters()]
    for a, b in zip(one_step(module, dm), w0):
        assert torch.equal(a, b)  # lr 0: noise added and removed leaves the weights bit-identical
    torch.manual_seed(0)
    lr = 0.1
    module = SmoothOut(**ARCH, a=0.05, adapt="filter", noise_seed=2, optimizer=sgd(lr))
    model0 = copy.deepcopy(module.model)
    named = list(model0.named_parameters())
    w0 = [p.detach().clone() for _, p in named]
    bn_ids = {2}  # BatchNorm1d is model[2]: its weight and bias are excluded by default
    perturbed = [i for i, (n, _) in enumerate(named) if int(n.split(".")[0]) not in bn_ids]
    gen = torch.Generator().manual_seed(2 * 1_000_003)
    noise = smoothout_noise([w0[i] for i in perturbed], 0.05, 1.0, "filter", "uniform", gen)
    noisy = list(w0)
    for i, n in zip(perturbed, noise):
        noisy[i] = w0[i] + n
    g, _ = grads_at(model0, noisy, x, y)
    assert all(gi.abs().sum() > 0 for gi in g)
    expected = [w - lr * gi for w, gi in zip(w0, g)]
    for a, b in zip(one_step(module, dm), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def entropy_sgd_reference(model, batches, L, lr, momentum, wd, eps, g0, g1, gmax, llr, alpha, mom_sgld, wd_sgld, gen):
    """SPEC §5.4 written out directly: plain tensors, no Lightning, one outer step per L batches."""
    w = [p.detach().clone() for p in model.parameters()]
    buf = [torch.zeros_like(p) for p in w]
    t = 0
    for start in range(0, len(batches), L):
        g = min(g0 * (1 + g1) ** t, gmax)
        wc = [p.clone() for p in w]
        mu = [p.clone() for p in w]
        mdw = [torch.zeros_like(p) for p in w]
        for x, y in batches[start : start + L]:
            grads, _ = grads_at(model, w, x, y)
            for i in range(len(w)):
                dw = grads[i] - g * (wc[i] - w[i]) + wd_sgld * w[i]
                mdw[i] = mom_sgld * mdw[i] + dw
                mdw[i] = mdw[i] + eps / math.sqrt(0.5 * llr) * torch.randn(w[i].shape, generator=gen)
                w[i] = w[i] - llr * mdw[i]
                mu[i] = alpha * mu[i] + (1 - alpha) * w[i]
        for i in range(len(w)):
            d = (wc[i] - mu[i]) + wd * wc[i]
            buf[i] = momentum * buf[i] + d if t > 0 else d
            w[i] = wc[i] - lr * g * buf[i]
        t += 1
    return w


def test_entropy_sgd_matches_direct_reimplementation(mnist_dir):
    torch.manual_seed(0)
    cfg = dict(
        L=3, eps=1e-3, g0=0.5, g1=0.1, gmax=2.38, sgld_lr=0.1, alpha=0.75, sgld_momentum=0.9, sgld_weight_decay=1e-4
    )
    lr, mom, wd = 0.1, 0.9, 5e-4
    module = EntropySGD(
        **ARCH, **cfg, noise_seed=3, optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=mom, weight_decay=wd)
    )
    model0 = copy.deepcopy(module.model)
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=40, download=False)  # 6 batches per epoch
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    expected = entropy_sgd_reference(
        model0,
        batches,
        3,
        lr,
        mom,
        wd,
        cfg["eps"],
        cfg["g0"],
        cfg["g1"],
        cfg["gmax"],
        cfg["sgld_lr"],
        cfg["alpha"],
        cfg["sgld_momentum"],
        cfg["sgld_weight_decay"],
        torch.Generator().manual_seed(3 * 1_000_003),
    )
    t = trainer(max_epochs=1)
    t.fit(module, datamodule=dm)
    assert t.global_step == 2  # 6 batches = 2 outer steps of L = 3
    for a, b in zip(module.model.parameters(), expected):
        torch.testing.assert_close(a.detach(), b, rtol=1e-4, atol=1e-6)


FAMILIES = [
    (SAM, {"rho": 0.05}),
    (SAM, {"rho": 0.5, "adaptive": "asam"}),
    (SAM, {"rho": 0.05, "schedule": "looksam", "interval": 2}),
    (SAM, {"rho": 0.05, "schedule": "ae_sam"}),
    (SAM, {"rho": 0.05, "schedule": "rst", "switch_prob": 0.5}),
    (LPFSGD, {"gamma": 0.01, "num_samples": 2}),
    (SmoothOut, {"a": 0.01}),
    (EntropySGD, {"L": 2, "g0": 1.0, "gmax": 1.0}),
]
QUAD_LR = {EntropySGD: 1.0}  # the outer step is lr·g·(w_c − μ_w), a small multiple of the gradient


class _Quadratic:
    """Mixin: the loss is ½ Σ c_i (θ_i − 1)² over the parameters (the data and logits are ignored)."""

    def loss_fn(self, logits, y):
        total = 0.0 * logits.sum()
        for k, p in enumerate(self.model.parameters()):
            total = total + 0.5 * (1 + k) * ((p - 1) ** 2).sum()
        return total


@pytest.mark.parametrize("cls, kw", FAMILIES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_quadratic_decreases_and_global_step_counts_updates(mnist_dir, cls, kw):
    torch.manual_seed(0)
    quad = type(f"Quad{cls.__name__}", (_Quadratic, cls), {})
    module = quad(arch="mlp", arch_kwargs={"width": 4}, optimizer=sgd(QUAD_LR.get(cls, 0.02)), **kw)
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=16, download=False)  # 15 batches per epoch
    with torch.no_grad():
        start = module.loss_fn(torch.zeros(1), None).item()
    t = trainer(max_epochs=2)
    t.fit(module, datamodule=dm)
    with torch.no_grad():
        end = module.loss_fn(torch.zeros(1), None).item()
    assert end < 0.5 * start
    per_epoch = math.ceil(15 / kw["L"]) if cls is EntropySGD else 15
    assert t.global_step == 2 * per_epoch


@pytest.mark.parametrize("cls, kw", FAMILIES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_resume_is_exact(tmp_path, mnist_dir, cls, kw):
    def run(max_epochs, ckpt=None, ckpt_dir="a"):
        pl.seed_everything(0)
        module = cls(
            arch="lenet",
            optimizer=sgd(0.05, 0.9),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
            **kw,
        )
        dm = MNISTDataModule(data_dir=mnist_dir, batch_size=48, download=False)
        t = trainer(
            max_epochs=max_epochs,
            deterministic=True,
            enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / ckpt_dir, save_last=True)],
        )
        if ckpt:
            torch.manual_seed(999)
        t.fit(module, datamodule=dm, ckpt_path=ckpt)
        return module, t

    full, _ = run(3)
    run(1, ckpt_dir="b")
    resumed, t = run(3, ckpt=str(tmp_path / "b" / "last.ckpt"), ckpt_dir="b")
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    opt_state = t.optimizers[0].state_dict()["state"]
    assert all(set(s) == {"momentum_buffer"} for s in opt_state.values())  # no perturbation buffers


def test_bf16_mixed_runs_and_16_true_is_refused(mnist_dir):
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=48, download=False)
    module = SAM(**ARCH, optimizer=sgd(0.1))
    trainer(max_steps=2, precision="bf16-mixed").fit(module, datamodule=dm)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    module._trainer = SimpleNamespace(precision="16-true")  # 16-mixed works: tests/methods/test_amp.py
    with pytest.raises(ConfigError, match=r"trainer.precision: SAM .* precision='16-true' has none"):
        module.setup("fit")


def test_clipping_and_accumulation(mnist_dir):
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=24, download=False)  # 10 batches per epoch
    torch.manual_seed(0)
    module = SAM(**ARCH, optimizer=sgd(1.0), gradient_clip_val=1e-3, accumulate_grad_batches=3)
    w0 = [p.detach().clone() for p in module.model.parameters()]
    t = trainer(max_steps=1)
    t.fit(module, datamodule=dm)
    step = torch.cat([(p.detach() - w).flatten() for p, w in zip(module.model.parameters(), w0)])
    assert step.norm().item() <= 1e-3 * 1.0001  # lr 1: the step is the clipped gradient
    t = trainer(max_epochs=1)
    t.fit(SAM(**ARCH, optimizer=sgd(0.1), accumulate_grad_batches=3), datamodule=dm)
    assert t.global_step == 4  # 3 + 3 + 3 + the last batch


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (SAM, {"rho": -0.1}, "rho"),
        (SAM, {"adaptive": "bogus"}, "adaptive"),
        (LPFSGD, {"num_samples": 0}, "num_samples"),
        (LPFSGD, {"gamma": -1.0}, "gamma"),
        (SmoothOut, {"adapt": "bogus"}, "adapt"),
        (SmoothOut, {"schedule": "bogus"}, "schedule"),
        (EntropySGD, {"L": 0}, "L"),
    ],
)
def test_bad_arguments_name_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=f"model.init_args.{key}"):
        cls(**kwargs)


def test_lpf_m_must_divide_batch(mnist_dir):
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=48, download=False)
    with pytest.raises(ConfigError, match=r"num_samples: M=5 must divide data.init_args.batch_size=48"):
        trainer(max_steps=1).fit(LPFSGD(**ARCH, num_samples=5), datamodule=dm)


@pytest.mark.parametrize("cls, kw", [(LPFSGD, {"num_samples": 3}), (SmoothOut, {"ghost_batch_size": 16})])
def test_bn_stats_on_noisy_passes_as_configured(mnist_dir, cls, kw):
    dm, _ = first_batch(mnist_dir)  # batch 48: three chunks of 16
    torch.manual_seed(0)
    module = cls(**ARCH, optimizer=sgd(0.1), **kw)
    one_step(module, dm)
    assert module.model[2].num_batches_tracked.item() == 3  # the original: every noisy pass updates the statistics
    torch.manual_seed(0)
    module = cls(**ARCH, optimizer=sgd(0.1), bn_stats_on_noisy_pass=False, **kw)
    bn0 = copy.deepcopy(module.model)
    one_step(module, dm)
    assert module.model[2].num_batches_tracked.item() == 1  # one clean pass instead
    _, (x, _y) = first_batch(mnist_dir)
    bn0.train()(x)  # the clean pass at the initial weights gives the same running mean
    torch.testing.assert_close(module.model[2].running_mean, bn0[2].running_mean)
