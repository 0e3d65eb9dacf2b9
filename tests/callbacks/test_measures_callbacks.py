"""SharpnessMeasures / ComplexityMeasures during training: logged to callback_metrics and history.csv, training
bit-identical with and without them, resumable series; InitialWeights writes model_init.ckpt."""

from __future__ import annotations

import csv
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from flatlit.callbacks import ComplexityMeasures, HistoryCSV, InitialWeights, SharpnessMeasures
from flatlit.data import MNISTDataModule
from flatlit.errors import ConfigError
from flatlit.methods import SGDFamily
from flatlit.sharpness import list_measures
from tests.helpers import quiet_trainer
from tests.sharpness.common import cheap


def sharp():
    names = [n for n in ("sam_sharpness", "average_sharpness", "hessian_trace") if n in list_measures()]
    return SharpnessMeasures(measures={n: cheap(n) for n in names}, num_samples=32, batch_size=16)


def complexity():
    names = [n for n in ("margin", "distance_from_init", "param_norm") if n in list_measures()]
    return ComplexityMeasures(measures={n: cheap(n) for n in names}, num_samples=32, batch_size=16)


def fit(mnist_dir, tmp_path, callbacks, name):
    pl.seed_everything(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 8, "batch_norm": True})
    trainer = quiet_trainer(
        max_epochs=2,
        limit_val_batches=2,
        callbacks=[*callbacks, HistoryCSV(), InitialWeights()],
        logger=CSVLogger(str(tmp_path), name=name),
    )
    trainer.fit(module, datamodule=MNISTDataModule(data_dir=mnist_dir, batch_size=32, download=False))
    return module, trainer


def test_measures_logged_and_training_unperturbed(mnist_dir, tmp_path):
    plain, _ = fit(mnist_dir, tmp_path, [], "plain")
    cbs = [sharp(), complexity()]
    observed, trainer = fit(mnist_dir, tmp_path, cbs, "observed")
    for (k, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), k
    for cb in cbs:
        assert len(cb.history["step"]) == 3  # before training and after each epoch
        for name in cb.measures:
            key = f"{cb.prefix}/{name}"
            assert float(trainer.callback_metrics[key]) == pytest.approx(cb.history["values"][-1][name], rel=1e-6)
    with open(os.path.join(trainer.log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["-1", "0", "1"]
    assert all(r[f"sharpness/{n}"] for r in rows for n in cbs[0].measures)
    init = torch.load(os.path.join(trainer.log_dir, "model_init.ckpt"))["state_dict"]
    if "distance_from_init" in cbs[1].measures:
        assert cbs[1].history["values"][0]["distance_from_init"] == 0.0
        assert cbs[1].history["values"][-1]["distance_from_init"] > 0
    assert set(init) == set(observed.state_dict())


def test_bad_measure_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"SharpnessMeasures\(measures\): unknown measure 'no_such'"):
        SharpnessMeasures(measures=["no_such"])
    name = list_measures("sharpness")[0]
    with pytest.raises(ConfigError, match="unknown setting"):
        SharpnessMeasures(measures={name: {"bogus": 1}})
