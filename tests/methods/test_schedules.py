"""Schedules over the run (LPF-SGD's CosineInc, SmoothOut's tanh ramp) count optimizer updates, not batches, however
the run is bounded; LPF-SGD's ``inc`` follows the original's ``--inc`` (the README's α)."""

from __future__ import annotations

import math
import os

import pytest
import yaml

from flatlit.data import MNISTDataModule
from flatlit.methods import LPFSGD, EntropySGD, SmoothOut
from flatlit.methods._perturb import cosine_inc
from tests.helpers import quiet_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fit(module, mnist_dir, **trainer_kw):
    """240 fake MNIST examples in batches of 6: 40 batches an epoch."""
    seen: list[tuple[int, float]] = []
    original = module.current_gamma if hasattr(module, "current_gamma") else module.current_scale

    def spy():
        value = original()
        seen.append((module.global_step, value))
        return value

    if hasattr(module, "current_gamma"):
        module.current_gamma = spy
    else:
        module.current_scale = spy
    trainer = quiet_trainer(limit_val_batches=0, **trainer_kw)
    trainer.fit(module, datamodule=MNISTDataModule(data_dir=mnist_dir, batch_size=6, download=False))
    return trainer, seen


@pytest.mark.parametrize(
    "trainer_kw, updates",
    [
        ({"max_epochs": 2}, 2 * 10),  # the case: accumulation 4 over 40 batches
        ({"max_epochs": 2, "limit_train_batches": 10}, 2 * 3),  # 10 batches: updates after 4, 8 and the last
        ({"max_epochs": 5, "max_steps": 13}, 13),
    ],
)
def test_cosine_inc_counts_optimizer_updates(mnist_dir, trainer_kw, updates):
    module = LPFSGD(arch="mlp", arch_kwargs={"width": 8}, gamma=0.01, inc=15, accumulate_grad_batches=4)
    trainer, seen = fit(module, mnist_dir, **trainer_kw)
    assert trainer.global_step == updates == module.total_updates()
    if "max_steps" not in trainer_kw:
        assert trainer.estimated_stepping_batches != updates  # Lightning's count (batches) would be wrong here
    assert seen[0] == (0, 0.01)
    for step, gamma in seen:
        assert gamma == cosine_inc(step, updates, 0.01, 15)
    assert math.isclose(cosine_inc(trainer.global_step, updates, 0.01, 15), 0.15)  # reaches α·γ₀ at the end


def test_smoothout_tanh_and_entropy_sgd_totals(mnist_dir):
    module = SmoothOut(arch="mlp", arch_kwargs={"width": 8}, a=0.01, schedule="tanh", accumulate_grad_batches=3)
    trainer, seen = fit(module, mnist_dir, max_epochs=2)
    assert trainer.global_step == module.total_updates() == 2 * 14  # ceil(40 / 3)
    assert seen[-1][1] > 0.99 * (math.tanh(10 * (27 / 28 - 0.5)) + 1) / 2
    entropy = EntropySGD(arch="mlp", arch_kwargs={"width": 8}, L=5)  # an outer step every L=5 batches
    trainer = quiet_trainer(limit_val_batches=0, max_epochs=1)
    trainer.fit(entropy, datamodule=MNISTDataModule(data_dir=mnist_dir, batch_size=6, download=False))
    assert trainer.global_step == entropy.total_updates() == 8


def original_cosine_inc(step: int, total: int, std0: float, args_inc: float) -> float:
    """LPF-SGD's ``CosineInc(std, num_epochs, steps_per_epoch, inc=args.inc - 1)``: base·(sf·inc + 1)."""
    inc = args_inc - 1
    sf = (1 - math.cos(math.pi * step / total)) / 2
    return std0 * (sf * inc + 1)


def test_alpha_convention_matches_the_original():
    cfg = yaml.safe_load(open(os.path.join(ROOT, "experiments", "lpf_sgd", "cifar10_wrn16_8_basic_lpf.yaml")))
    args = cfg["model"]["init_args"]
    assert args["inc"] == 15  # the README's --inc 15 (α = 15); the WRN-16-8 run log shows inc=15
    total = 200 * 391
    for step in (0, 1, total // 3, total // 2, total - 1, total):
        ours = cosine_inc(step, total, args["gamma"], args["inc"])
        assert math.isclose(ours, original_cosine_inc(step, total, args["gamma"], 15), rel_tol=1e-12)
    assert math.isclose(cosine_inc(total, total, 1.0, args["inc"]), 15.0)
