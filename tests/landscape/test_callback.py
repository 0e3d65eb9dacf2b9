"""LossLandscape during training: the image reaches TensorBoard and the log directory, training is bit-identical
with and without it (and a callback that does perturb is caught), state_dict round-trips, bad arguments fail."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from flatlit.callbacks import LossLandscape
from flatlit.data import MNISTDataModule
from flatlit.landscape import LandscapeResult
from flatlit.methods import SGDFamily
from flatlit.utils.errors import ConfigError
from tests.helpers import quiet_trainer

# conv + BatchNorm + dropout: a callback touching the weights, the BN buffers or the global RNG changes the result
ARCH = {"filters": 2, "n_dense": 8, "batch_norm": True, "dropout": 0.5}


def fit(mnist_dir, tmp_path, callbacks, name):
    pl.seed_everything(0)
    module = SGDFamily(arch="simple_cnn", arch_kwargs=ARCH)
    trainer = quiet_trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=callbacks,
        logger=TensorBoardLogger(str(tmp_path), name=name),
    )
    trainer.fit(module, datamodule=MNISTDataModule(data_dir=mnist_dir, batch_size=16, download=False))
    return module, trainer


class Perturbs(pl.Callback):
    """A control: draws one number from the global RNG at each epoch end (what LossLandscape must not do)."""

    def on_train_epoch_end(self, trainer, pl_module):
        torch.rand(1)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_landscape_draws_into_tensorboard_and_never_perturbs(mnist_dir, tmp_path):
    plain, _ = fit(mnist_dir, tmp_path, [], "plain")
    cb = LossLandscape(every_n_epochs=1, resolution=5, num_samples=32, batch_size=16, bn="update")
    observed, trainer = fit(mnist_dir, tmp_path, [cb], "observed")
    assert same(plain, observed)
    control, _ = fit(mnist_dir, tmp_path, [Perturbs()], "control")
    assert not same(plain, control)  # the comparison above can fail

    pngs = sorted(glob.glob(os.path.join(trainer.log_dir, "landscape", "epoch*.png")))
    assert [os.path.basename(p) for p in pngs] == ["epoch000.png", "epoch001.png"]
    r = LandscapeResult.load(pngs[-1][:-4] + ".npz")
    assert r.complete and r.loss.shape == (5,) and r.meta["step"] == 6 and r.meta["bn"] == "update"
    assert cb.history["epoch"] == [0, 1] and cb.history["loss"][-1] == r.loss.tolist()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("landscape/line")] == [3, 6]
    origin = [e.value for e in events.Scalars("landscape/loss_origin")]
    assert origin[-1] == pytest.approx(r.loss[2], rel=1e-6)


def test_state_dict_and_arguments():
    cb = LossLandscape(alphas=[-0.5, 0.0, 0.5])
    assert np.array_equal(cb.alphas, [-0.5, 0.0, 0.5])
    cb.history["epoch"].append(3)
    other = LossLandscape()
    other.load_state_dict(cb.state_dict())
    assert other.history["epoch"] == [3]
    for kwargs, name in [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"span": (1.0, 1.0)}, "span"),
        ({"resolution": 1}, "resolution"),
        ({"alphas": [0.5]}, "alphas"),
        ({"bn": "interpolate"}, "bn"),
        ({"norm": "unit"}, "norm"),
    ]:
        with pytest.raises(ConfigError, match=rf"LossLandscape\({name}\)"):
            LossLandscape(**kwargs)
