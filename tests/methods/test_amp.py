"""``16-mixed`` for every perturbation family: fp16 autocast with Lightning's GradScaler on CPU, against ``32-true``
runs of the same steps, and an injected overflow that the scaler must skip."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from flatlit.methods import LPFSGD, SAM, EntropySGD, SmoothOut
from tests.helpers import quiet_trainer

FAMILIES = [
    (SAM, {"rho": 0.05}),
    (SAM, {"rho": 0.05, "adaptive": "asam"}),
    (SAM, {"rho": 0.5, "schedule": "looksam", "interval": 3}),
    (SAM, {"rho": 0.05, "schedule": "ae_sam"}),
    (LPFSGD, {"gamma": 0.002, "num_samples": 2}),
    (SmoothOut, {"a": 0.01}),
    (EntropySGD, {"L": 2, "eps": 0.0, "sgld_lr": 0.05, "lr": 2.0}),  # outer lr × g = 1, as the original
]
IDS = ["sam", "asam", "looksam", "ae_sam", "lpf", "smoothout", "entropy"]


def data(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :4].sum(1) > 0).long() + 2 * (x.flatten(1)[:, 4:8].sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def make(cls, kw):
    torch.manual_seed(0)
    kw = dict(kw)
    lr = kw.pop("lr", 0.05)
    return cls(
        arch="mlp",
        arch_kwargs={"width": 32},
        num_classes=4,
        in_channels=1,
        image_size=8,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
        **kw,
    )


def fp16_trainer(**kw):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    return quiet_trainer(plugins=[plugin], limit_val_batches=0, **kw), plugin


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.model.parameters()])


@pytest.mark.parametrize("cls, kw", FAMILIES, ids=IDS)
def test_16_mixed_follows_the_32_true_trajectory(cls, kw):
    ref = make(cls, kw)
    w0 = flat(ref)
    quiet_trainer(max_epochs=3, limit_val_batches=0).fit(ref, train_dataloaders=data())  # 30 steps
    amp = make(cls, kw)
    trainer, plugin = fp16_trainer(max_epochs=3)
    trainer.fit(amp, train_dataloaders=data())
    assert trainer.global_step == ref.trainer.global_step
    assert plugin.scaler.get_scale() == 2.0**16  # no overflow on this problem: every step was taken
    moved = (flat(ref) - w0).norm()
    assert moved > 0.1
    assert (flat(amp) - flat(ref)).norm() < 0.03 * moved  # fp16 forward passes, same updates
    if kw.get("schedule") == "ae_sam":  # the statistics of ‖g‖² are unscaled (S² = 2³² otherwise)
        assert amp._ae[0] == pytest.approx(ref._ae[0], rel=0.05)


class Overflow:
    """Mixin: at one optimizer step, the given pass's loss is multiplied by 1e36 (finite in fp32; S·1e36
    overflows, so its gradient is inf/NaN)."""

    overflow_step, overflow_pass = 2, 2

    def training_loss(self, batch):
        loss, out = super().training_loss(batch)
        self._pass = getattr(self, "_pass", 0) + 1
        if self.global_step == self.overflow_step and self._pass == self.overflow_pass:
            loss = loss * 1e36
        return loss, out

    def on_train_batch_start(self, batch, batch_idx):
        self._pass = 0
        self.before = flat(self).clone()
        self.scale_before = self.loss_scale()


@pytest.mark.parametrize(
    "cls, kw, which",
    [
        (SAM, {"rho": 0.05}, 2),  # SAM's pass 2 overflows
        (SAM, {"rho": 0.05}, 1),  # pass 1 overflows: ε is NaN, so is pass 2
        (LPFSGD, {"gamma": 0.002, "num_samples": 2}, 2),  # the second chunk
        (SmoothOut, {"a": 0.01, "ghost_batch_size": 8}, 1),
    ],
    ids=["sam_pass2", "sam_pass1", "lpf_chunk2", "smoothout_ghost1"],
)
def test_an_overflowing_pass_skips_the_step_and_lowers_the_scale(cls, kw, which):
    module = type("O" + cls.__name__, (Overflow, cls), {"overflow_pass": which})(**_args(kw))
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen[trainer.global_step - 1] = (
                torch.equal(flat(pl_module), pl_module.before),
                pl_module.scale_before,
                pl_module.loss_scale(),
            )

    trainer, _ = fp16_trainer(max_steps=5, callbacks=[Watch()])
    trainer.fit(module, train_dataloaders=data())
    assert seen[2][0] and seen[2][2] == seen[2][1] / 2  # skipped: weights untouched, scale halved
    assert not any(seen[t][0] for t in (0, 1, 3, 4))  # the other steps moved the weights
    assert torch.isfinite(flat(module)).all()
    assert trainer.global_step == 5


def _args(kw):
    torch.manual_seed(0)
    return dict(
        arch="mlp",
        arch_kwargs={"width": 32},
        num_classes=4,
        in_channels=1,
        image_size=8,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        **kw,
    )


def test_entropy_sgd_skips_an_overflowing_inner_step():
    module = type("OE", (Overflow, EntropySGD), {"overflow_pass": 1, "overflow_step": 1})(
        **_args({"L": 2, "eps": 0.0, "sgld_lr": 0.05})
    )
    trainer, plugin = fp16_trainer(max_steps=3)
    trainer.fit(module, train_dataloaders=data())
    # outer step 1 spans L = 2 inner batches, each overflowing once: two backoffs, both inner updates dropped
    assert plugin.scaler.get_scale() == 2.0**14
    assert torch.isfinite(flat(module)).all()


def test_the_scaler_state_is_in_the_checkpoint(tmp_path):
    module = make(SAM, {"rho": 0.05})
    trainer, plugin = fp16_trainer(max_steps=2, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=data())
    plugin.scaler.update(new_scale=1024.0)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert ckpt["MixedPrecision"]["scale"] == 1024.0
    resumed = make(SAM, {"rho": 0.05})
    trainer2, plugin2 = fp16_trainer(max_steps=3)
    trainer2.fit(resumed, train_dataloaders=data(), ckpt_path=tmp_path / "c.ckpt")
    assert plugin2.scaler.get_scale() == 1024.0


def test_16_true_is_refused_with_the_key():
    from types import SimpleNamespace

    from flatlit.utils.errors import ConfigError

    module = make(SAM, {})
    module._trainer = SimpleNamespace(precision="16-true")
    with pytest.raises(ConfigError, match=r"trainer.precision: .*'16-mixed'"):
        module.setup("fit")
