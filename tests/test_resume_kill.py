"""A ``flatlit fit`` process killed with SIGKILL at a random training step and resumed from its last step-interval
checkpoint ends bit-identical to an uninterrupted run: weights, optimizer state and history.csv (issue 12)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from tests.fakedata import make_tiny_imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCH_KWARGS = {"simple_cnn": {"filters": 4, "n_dense": 16, "dropout": 0.5}}  # dropout: the RNG stream matters
FAMILIES = {
    "sgd": {"class_path": "flatlit.methods.SGDFamily", "init_args": {}},
    "sam": {"class_path": "flatlit.methods.SAM", "init_args": {"rho": 0.05}},
    "lpf": {"class_path": "flatlit.methods.LPFSGD", "init_args": {"gamma": 0.01, "num_samples": 2, "inc": 5}},
}


def config(tmp_path, family: str, data: dict, name: str, arch: str = "lenet", every: int = 3) -> str:
    model = FAMILIES[family]
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": name},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "every_n_train_steps": every,
                        "save_last": True,
                    },
                }
            ],
        },
        "model": {
            "class_path": model["class_path"],
            "init_args": {
                "arch": arch,
                "arch_kwargs": ARCH_KWARGS.get(arch),
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
                "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}},
                **model["init_args"],
            },
        },
        "data": data,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def flatlit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flatlit.cli", "fit", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def run_dir(tmp_path, name: str):
    """The run directory; ModelCheckpoint writes to its ``checkpoints`` folder (its default), so a resumed run
    continues it (the CLI's ``continue_run_directory``) and finds the history.csv the killed run wrote."""
    return tmp_path / "runs" / name / "version_0"


def final_state(tmp_path, name: str):
    ckpt = torch.load(run_dir(tmp_path, name) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert os.listdir(tmp_path / "runs" / name) == ["version_0"]  # one run directory, continued by the resumed run
    with open(run_dir(tmp_path, name) / "history.csv") as f:
        history = f.read()
    return ckpt, history


def assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys() and opt_a
    for k in opt_a:
        for field, value in opt_a[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[k][field])), (k, field)


def kill_and_resume(tmp_path, family: str, data: dict, kill_step: int, arch: str = "lenet", every: int = 3) -> dict:
    """Run ``family`` uninterrupted, then killed at ``kill_step`` and resumed from its newest checkpoint (written every
    ``every`` training steps); assert both runs end identical and return the checkpoint the resumed run started from."""
    full = flatlit("--config", config(tmp_path, family, data, "full", arch, every))
    assert full.returncode == 0, full.stderr[-3000:]

    killed_cfg = config(tmp_path, family, data, "killed", arch, every)
    killed = flatlit(
        "--config",
        killed_cfg,
        "--trainer.callbacks+=tests.helpers.KillAtStep",
        f"--trainer.callbacks.init_args.step={kill_step}",
    )
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no cleanup, no final checkpoint
    last = run_dir(tmp_path, "killed") / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)  # the checkpoint the run resumes from
    assert 0 < saved["global_step"] <= kill_step
    resumed = flatlit("--config", killed_cfg, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr

    (a, hist_a), (b, hist_b) = final_state(tmp_path, "full"), final_state(tmp_path, "killed")
    assert_same_run(a, b)
    assert hist_a == hist_b
    return saved


def mnist_data(mnist_dir: str) -> dict:
    return {
        "class_path": "flatlit.data.MNISTDataModule",
        "init_args": {
            "data_dir": mnist_dir,
            "batch_size": 16,
            "download": False,
            "augment": "cutout",
            "label_noise": 0.2,
            "input_noise": 0.05,
            "input_noise_mode": "fresh",
            "val_size": 32,
        },
    }


STEPS_PER_EPOCH = (240 - 32) // 16


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sigkill_mid_epoch_resumes_bit_identical(tmp_path, mnist_dir, family):
    step = random.Random(family).randrange(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 1)  # inside epoch 2
    kill_and_resume(tmp_path, family, mnist_data(mnist_dir), step)


def test_sigkill_after_a_checkpoint_on_an_epochs_last_batch(tmp_path, mnist_dir):
    """Lightning resumes such a checkpoint in the next epoch without rerunning the epoch's end: the epoch-interval
    scheduler of a manual-optimization family must already be stepped, and the epoch's history row kept."""
    step = random.Random(7).randrange(STEPS_PER_EPOCH + 2, 2 * STEPS_PER_EPOCH - 1)
    saved = kill_and_resume(tmp_path, "sam", mnist_data(mnist_dir), step, every=STEPS_PER_EPOCH)
    # it really resumed from epoch 0's last batch: before that epoch's end hooks (scheduler, history row) ran
    assert saved["global_step"] == STEPS_PER_EPOCH and saved["epoch"] == 0
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]


def test_sigkill_folder_dataset_with_workers(tmp_path):
    make_tiny_imagenet(str(tmp_path / "tin"), classes=3, per_class=8)
    data = {
        "class_path": "flatlit.data.TinyImageNetDataModule",
        "init_args": {
            "data_dir": str(tmp_path / "tin"),
            "batch_size": 5,  # 5 batches an epoch: step checkpoints (every 3) never fall on an epoch's last batch
            "num_workers": 2,
            "download": False,
            "augment": "cutout",
            "input_noise": 0.05,
            "input_noise_mode": "fresh",
        },
    }
    kill_and_resume(tmp_path, "sgd", data, kill_step=random.Random(1).randrange(7, 10), arch="simple_cnn")
