"""Divergence is never silent: the run stops at the first non-finite training loss or gradient with one line, a
checkpoint of the last finite state and exit code 2; curvature callbacks log NaN (and warn) instead of crashing."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from flatlit.callbacks import HessianEigenvalues, HessianSpectrum, HessianTrace
from flatlit.cli import main
from flatlit.data import MNISTDataModule
from tests.helpers import quiet_trainer
from tests.test_cli import write_config


@pytest.mark.parametrize("family", ["sgd", "sam"])
def test_nonfinite_loss_stops_with_one_line_and_a_finite_checkpoint(tmp_path, mnist_dir, capsys, family):
    model = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e4}}}
    cfg = write_config(tmp_path, mnist_dir, model=model, trainer={"max_epochs": 3})
    if family != "sgd":
        text = open(cfg).read().replace("flatlit.methods.SGDFamily", "flatlit.methods.SAM")
        open(cfg, "w").write(text)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", cfg])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("flatlit: error:")]
    assert len(err) == 1, err
    line = err[0]
    assert "non-finite" in line and "at step" in line and "(epoch" in line and "last finite training loss" in line
    assert "stop_on_nonfinite: false" in line
    ckpts = glob.glob(str(tmp_path / "runs" / "**" / "last-finite-step*.ckpt"), recursive=True)
    assert len(ckpts) == 1 and ckpts[0] in line
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    step = int(line.split("at step ")[1].split()[0])
    assert state["global_step"] == step
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_stop_on_nonfinite_false_keeps_going(tmp_path, mnist_dir):
    model = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e4}}, "stop_on_nonfinite": False}
    cfg = write_config(tmp_path, mnist_dir, model=model, trainer={"max_epochs": 2})
    main(["fit", "--config", cfg])
    history = glob.glob(str(tmp_path / "runs" / "**" / "history.csv"), recursive=True)[0]
    last = open(history).read().strip().splitlines()[-1]
    assert "nan" in last.lower()


class NaNModule(pl.LightningModule):
    """A plain module whose weights turn NaN after its first step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 6), nn.ReLU(), nn.Linear(6, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.net[1].weight[0, 0] = float("nan")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_curvature_callbacks_log_nan_for_nan_weights(tmp_path, mnist_dir):
    kw = dict(num_samples=32, batch_size=16, every_n_epochs=None, every_n_steps=1)
    callbacks = [
        HessianEigenvalues(top_k=2, **kw),
        HessianTrace(num_probes=2, **kw),
        HessianSpectrum(num_runs=1, num_steps=4, **kw),
    ]
    trainer = quiet_trainer(
        max_steps=2, limit_val_batches=0, callbacks=callbacks, logger=CSVLogger(str(tmp_path), name="nan")
    )
    with pytest.warns(UserWarning, match="non-finite weights at step 2"):
        trainer.fit(NaNModule(), datamodule=MNISTDataModule(data_dir=mnist_dir, batch_size=16, download=False))
    hist = callbacks[0].history
    assert np.isfinite(hist["eigenvalues"][0]).all()  # the measurement before training
    assert np.isnan(hist["eigenvalues"][-1]).all() and len(hist["eigenvalues"]) == 3
    metrics = open(os.path.join(trainer.logger.log_dir, "metrics.csv")).read()
    assert "hessian/trace" in metrics and "nan" in metrics.lower()
