"""SharpnessMeasures / ComplexityMeasures during training: logged to callback_metrics and history.csv, training
bit-identical with and without them, resumable series; InitialWeights writes model_init.ckpt. Under the loss
contract: an autoencoder's sharpness equals references from its own loss, measures that need class logits are
refused (by name) or skipped (of "all") at setup, and a bad loss or parameter selection is one line."""

from __future__ import annotations

import csv
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from flatlit.callbacks import ComplexityMeasures, HistoryCSV, InitialWeights, SharpnessMeasures
from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily
from flatlit.sharpness import list_measures
from flatlit.utils.errors import ConfigError
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


def test_a_preset_gives_the_callbacks_the_papers_names_and_settings():
    """The preset's measures of each callback's kind, under the paper's labels, with its pinned settings; the run
    records (Jiang's step counts) are left to ``flatlit measure``; a conflicting setting is one line."""
    from flatlit.sharpness.presets import get_preset

    sharp, comp = SharpnessMeasures(preset="jiang2019"), ComplexityMeasures(preset="jiang2019")
    labels = [e.label for e in get_preset("jiang2019").entries if not e.measure.startswith("record:")]
    assert sorted([*sharp.measures, *comp.measures]) == sorted(labels)
    assert comp.measures["log_prod_of_spec"].settings["scale"] == "half_log_m"
    assert set(SharpnessMeasures(preset="lpf2022", measures=["low_pass"]).measures) == {"low_pass"}
    with pytest.raises(ConfigError, match=r"SharpnessMeasures\(measures\)\.low_pass\.sigma: 0\.1 conflicts"):
        SharpnessMeasures(preset="lpf2022", measures={"low_pass": {"sigma": 0.1}})
    with pytest.raises(
        ConfigError, match=r"ComplexityMeasures\(preset\): preset 'andriushchenko2023' has no complexity"
    ):
        ComplexityMeasures(preset="andriushchenko2023")


# ---- the loss contract: an autoencoder (batches are the inputs, MSE reconstruction) ---------------------------------
class AutoEncoderModule(pl.LightningModule):
    """Batches are input tensors only; the loss is the MSE reconstruction (curvature_loss says so)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 6)
        ).double()

    def forward(self, x):
        return self.net(x)

    def curvature_loss(self, x):
        return torch.nn.functional.mse_loss(self(x), x)

    def training_step(self, x, batch_idx):
        loss = self.curvature_loss(x)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Inputs(torch.utils.data.Dataset):
    def __init__(self, n: int = 48) -> None:
        self.x = torch.randn(n, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def fit_autoencoder(callbacks, max_epochs: int = 2):
    pl.seed_everything(0)
    module = AutoEncoderModule()
    init = {k: v.clone() for k, v in module.state_dict().items()}
    loader = torch.utils.data.DataLoader(Inputs(), batch_size=12, shuffle=True)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=loader)
    return module, trainer, init


def mse_sample_loss(module, batches, names):
    """θ_S (flattened) ↦ the sample's size-weighted MSE reconstruction loss (eval mode), other parameters fixed."""
    base = {n: p.detach() for n, p in module.named_parameters()}

    def loss(theta):
        params, i = dict(base), 0
        for n in names:
            k = base[n].numel()
            params[n] = theta[i : i + k].view_as(base[n])
            i += k
        total = sum(
            torch.nn.functional.mse_loss(torch.func.functional_call(module, params, (x,)), x) * len(x) for x in batches
        )
        return total / sum(len(x) for x in batches)

    return loss, torch.cat([base[n].reshape(-1) for n in names])


def test_autoencoder_sharpness_during_training_equals_references():
    cb = SharpnessMeasures(
        measures={"theta_h_theta": {}, "sam_sharpness": {"rho": 0.05}},
        num_samples=24,
        batch_size=12,
        every_n_epochs=None,
    )
    sub = SharpnessMeasures(
        measures={"theta_h_theta": {}}, num_samples=24, batch_size=12, every_n_epochs=None, params="net.3.*"
    )
    _, _, init = fit_autoencoder([cb, sub], max_epochs=1)
    reference = AutoEncoderModule()
    reference.load_state_dict(init)
    reference.eval()
    batches = cb._batches
    assert all(isinstance(b, torch.Tensor) for b in batches)
    names = [n for n, _ in reference.named_parameters()]
    loss, theta = mse_sample_loss(reference, batches, names)
    hess = torch.func.hessian(loss)(theta)
    assert cb.history["values"][0]["theta_h_theta"] == pytest.approx(float(theta @ hess @ theta), rel=1e-9)
    g = torch.func.grad(loss)(theta)
    gain = float(loss(theta + 0.05 * g / g.norm()) - loss(theta))
    assert cb.history["values"][0]["sam_sharpness"] == pytest.approx(gain, rel=1e-9)
    last = ["net.3.weight", "net.3.bias"]  # params="net.3.*": the last layer alone
    loss, theta = mse_sample_loss(reference, batches, last)
    hess = torch.func.hessian(loss)(theta)
    assert sub.history["values"][0]["theta_h_theta"] == pytest.approx(float(theta @ hess @ theta), rel=1e-9)


def test_autoencoder_refuses_requested_logit_measures_in_one_line():
    for cls, name in ((ComplexityMeasures, "margin"), (ComplexityMeasures, "bound_neyshabur2015")):
        cb = cls(measures=[name, "param_norm"], num_samples=24, batch_size=12)
        with pytest.raises(ConfigError) as err:
            fit_autoencoder([cb], max_epochs=1)
        msg = str(err.value)
        assert msg.startswith(f"{cls.__name__}(measures): measure '{name}' needs class logits and labels"), msg
        assert "outputs_and_targets(self, batch)" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"SharpnessMeasures\(measures\): measure 'prediction_entropy' needs"):
        fit_autoencoder([SharpnessMeasures(measures=["prediction_entropy"], num_samples=24, batch_size=12)], 1)


def test_autoencoder_skips_inapplicable_measures_of_all_with_one_note(caplog):
    cbs = [
        SharpnessMeasures(num_samples=24, batch_size=12, every_n_epochs=None),
        ComplexityMeasures(num_samples=24, batch_size=12, every_n_epochs=None),
    ]
    with caplog.at_level("INFO"):
        fit_autoencoder(cbs, max_epochs=1)
    assert set(cbs[0].skipped) == {"minimum_sharpness", "prediction_entropy"}
    assert set(cbs[1].skipped) == {
        "margin",
        "bound_bartlett2017",
        "bound_bartlett_mendelson",
        "bound_neyshabur2015",
        "bound_neyshabur2018",
        "spec_init",
        "spec_orig",
    }
    for cb in cbs:
        notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{type(cb).__name__}: skipping")]
        assert len(notes) == 1 and "\n" not in notes[0], notes
        assert all(name in notes[0] for name in cb.skipped) and "outputs_and_targets" in notes[0]
        measured = set(cb.history["values"][0])
        assert measured == set(cb.measures) - set(cb.skipped)
        assert all(math.isfinite(v) for v in cb.history["values"][0].values()), cb.history["values"][0]


def test_autoencoder_training_is_bit_identical_with_the_callbacks():
    plain, _, _ = fit_autoencoder([])
    cbs = [
        SharpnessMeasures(num_samples=24, batch_size=12, params="net.*"),  # every measure that applies, each epoch
        ComplexityMeasures(num_samples=24, batch_size=12),
    ]
    observed, _, _ = fit_autoencoder(cbs)
    for (k, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(cbs[0].history["step"]) == 3


def test_bad_batch_loss_and_empty_params_are_one_line():
    bad_loss = SharpnessMeasures(
        measures=["sam_sharpness"], num_samples=24, batch_size=12, batch_loss=lambda m, x: (m(x) - x).pow(2)
    )
    with pytest.raises(ConfigError) as err:
        fit_autoencoder([bad_loss], max_epochs=1)
    assert str(err.value).startswith("SharpnessMeasures(batch_loss): must return the batch-mean loss as a scalar")
    assert "\n" not in str(err.value)
    nothing = ComplexityMeasures(measures=["param_norm"], num_samples=24, batch_size=12, params="discriminator.*")
    with pytest.raises(ConfigError) as err:
        fit_autoencoder([nothing], max_epochs=1)
    assert str(err.value).startswith("ComplexityMeasures(params): selects no parameter of AutoEncoderModule")
    assert "\n" not in str(err.value)
