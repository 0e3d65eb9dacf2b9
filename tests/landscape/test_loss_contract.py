"""LossLandscape and the landscape evaluators under the loss contract (:mod:`flatlit.objective`): the module's own
loss on batches of any structure (dicts, inputs only), no accuracy where there are no class logits, ``params``
moving only the selected parameters, and one-line errors at setup instead of crashes mid-run."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flatlit.callbacks import LossLandscape
from flatlit.landscape import compute_surface, evaluate, random_directions
from flatlit.landscape.evaluation import evaluation_functions
from flatlit.landscape.plots import line_figure
from flatlit.landscape.robustness import accuracy_and_loss, weight_noise_robustness
from flatlit.objective import resolve_objective
from flatlit.utils.batching import batch_size
from flatlit.utils.errors import ConfigError
from tests.helpers import quiet_trainer

ALPHAS = [-0.5, 0.0, 0.5]


class Recorder(Logger):
    """Keeps every ``log_metrics`` call; files go to ``save_dir``."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._save_dir, self.metrics = save_dir, []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return self._save_dir

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]


# ---- a classifier on dict batches with a label-smoothed curvature_loss ----------------------------------------------
class DictData(Dataset):
    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"feats": self.x[i], "cls": self.y[i]}


class DictClassifier(pl.LightningModule):
    """Trains on ``{"feats", "cls"}`` with label smoothing 0.2 (dropout and BatchNorm: eval mode matters)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))

    def curvature_loss(self, batch):
        return F.cross_entropy(self.net(batch["feats"]), batch["cls"], label_smoothing=0.2)

    def outputs_and_targets(self, batch):
        return self.net(batch["feats"]), batch["cls"]

    def training_step(self, batch, batch_idx):
        return self.curvature_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def hand_mean(fn, batches) -> float:
    """Σ n_b fn(b) / Σ n_b in float64."""
    total = sum(float(fn(b)) * batch_size(b) for b in batches)
    return total / sum(batch_size(b) for b in batches)


def test_dict_batches_log_the_label_smoothed_loss_of_the_module(tmp_path):
    torch.manual_seed(0)
    module = DictClassifier()
    logger = Recorder(str(tmp_path))
    cb = LossLandscape(alphas=ALPHAS, num_samples=20, batch_size=8, seed=3)
    trainer = quiet_trainer(max_epochs=2, logger=logger, callbacks=[cb], log_every_n_steps=1)
    trainer.fit(module, DataLoader(DictData(), batch_size=8, shuffle=True))
    batches = cb._batches
    assert isinstance(batches[0], dict) and sum(batch_size(b) for b in batches) == 20
    module.eval()
    with torch.no_grad():
        own = hand_mean(module.curvature_loss, batches)
        plain = hand_mean(lambda b: F.cross_entropy(module.net(b["feats"]), b["cls"]), batches)
        correct = sum(int((module.net(b["feats"]).argmax(1) == b["cls"]).sum()) for b in batches)
    origin = logger.values("landscape/loss_origin")
    assert len(origin) == 2
    assert origin[-1] == pytest.approx(own, rel=1e-6, abs=1e-7)
    assert abs(own - plain) > 1e-3 and abs(origin[-1] - plain) > 1e-3  # not plain cross-entropy
    result = cb.last_result
    assert result.meta["loss"] == "DictClassifier.curvature_loss"
    assert result.acc[1] == pytest.approx(correct / 20)


# ---- an autoencoder: batches are inputs only, no accuracy ---------------------------------------------------------
class Inputs(Dataset):
    def __init__(self, n: int = 40, seed: int = 1) -> None:
        self.x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class AutoEncoder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Dropout(0.2))
        self.decoder = nn.Linear(4, 6)

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch), batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class HookedAutoEncoder(AutoEncoder):
    def curvature_loss(self, batch):
        return F.mse_loss(self(batch), batch)


def reconstruction(m, batch):
    return F.mse_loss(m(batch), batch)


def fit_autoencoder(tmp_path, callbacks, cls=AutoEncoder, epochs=2):
    pl.seed_everything(0)
    module = cls()
    logger = Recorder(str(tmp_path)) if callbacks else False
    trainer = quiet_trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(module, DataLoader(Inputs(), batch_size=8, shuffle=True))
    return module, trainer


@pytest.mark.parametrize("via", ["curvature_loss", "batch_loss"])
def test_autoencoder_landscape_runs_with_the_reconstruction_loss_and_no_accuracy(tmp_path, via):
    cls = HookedAutoEncoder if via == "curvature_loss" else AutoEncoder
    kw = {"batch_loss": reconstruction} if via == "batch_loss" else {}
    cb = LossLandscape(alphas=ALPHAS, num_samples=16, batch_size=8, at_train_start=True, bn="update", **kw)
    module, trainer = fit_autoencoder(tmp_path, [cb], cls)
    assert cb.history["epoch"] == [0, 0, 1] and all(len(v) == 3 for v in cb.history["loss"])
    assert all(math.isnan(a) for accs in cb.history["acc"] for a in accs)
    assert np.isfinite(cb.last_result.loss).all()
    module.eval()
    with torch.no_grad():
        own = hand_mean(lambda b: reconstruction(module, b), cb._batches)
    origin = trainer.logger.values("landscape/loss_origin")
    assert origin[-1] == pytest.approx(own, rel=1e-6)
    assert len(line_figure(cb.last_result).axes) == 1  # no accuracy axis


def test_training_is_bit_identical_with_and_without_the_landscape(tmp_path):
    plain, _ = fit_autoencoder(tmp_path / "a", [], HookedAutoEncoder)
    cb = LossLandscape(alphas=ALPHAS, num_samples=16, batch_size=8, at_train_start=True, bn="update")
    observed, _ = fit_autoencoder(tmp_path / "b", [cb], HookedAutoEncoder)
    assert len(cb.history["loss"]) == 3
    for a, b in zip(plain.parameters(), observed.parameters()):
        assert torch.equal(a, b)


def test_params_move_only_the_selected_sub_network(tmp_path):
    seen: list[tuple[bool, bool]] = []
    origin: dict[str, torch.Tensor] = {}

    def watched(m, batch):
        # every evaluation: the encoder at its value at the draw, the decoder moved or not
        if not origin:  # the check at setup, before any draw
            return reconstruction(m, batch)
        enc = all(torch.equal(p, origin[n]) for n, p in m.named_parameters() if n.startswith("encoder."))
        dec = all(torch.equal(p, origin[n]) for n, p in m.named_parameters() if n.startswith("decoder."))
        seen.append((enc, dec))
        return reconstruction(m, batch)

    class Snapshot(pl.Callback):  # runs before LossLandscape at each epoch end: the weights of the draw
        def on_train_epoch_end(self, trainer, pl_module):
            origin.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    cb = LossLandscape(alphas=ALPHAS, num_samples=16, batch_size=8, batch_loss=watched, params="decoder.*", seed=5)
    module, _ = fit_autoencoder(tmp_path, [Snapshot(), cb])
    draws = seen[-2 * 3 * 2 :]  # the 2 draws × 3 points × 2 batches
    assert len(seen) == len(draws) and all(enc for enc, _ in seen)
    assert [dec for _, dec in draws] == [False, False, True, True, False, False] * 2
    # the line equals a hand evaluation that moves the decoder alone by α·d
    d = random_directions(module, 1, 5, params=list(module.decoder.parameters()))
    assert d.names == ["decoder.weight", "decoder.bias"]
    module.eval()
    expected = []
    with torch.no_grad():
        w0 = module.decoder.weight.detach().clone()
        for a in ALPHAS:
            module.decoder.weight.copy_(w0 + a * d.vectors[0][0])  # biases do not move (bias_bn="ignore")
            expected.append(hand_mean(lambda b: reconstruction(module, b), cb._batches))
        module.decoder.weight.copy_(w0)
    np.testing.assert_allclose(cb.last_result.loss, expected, rtol=1e-6)


def test_batch_loss_is_accepted_and_a_non_scalar_one_is_one_line_at_setup(tmp_path):
    LossLandscape(batch_loss=reconstruction)  # was a TypeError

    def per_example(m, batch):
        return ((m(batch) - batch) ** 2).mean(1)

    with pytest.raises(ConfigError) as err:
        fit_autoencoder(tmp_path, [LossLandscape(batch_loss=per_example, num_samples=16, batch_size=8)])
    message = str(err.value)
    assert "\n" not in message and message.startswith("LossLandscape(batch_loss): must return the batch-mean loss")
    assert "(8,)" in message


def test_a_module_without_a_loss_is_one_line_naming_batch_loss(tmp_path):
    with pytest.raises(ConfigError) as err:
        fit_autoencoder(tmp_path, [LossLandscape(num_samples=16, batch_size=8)])
    assert "\n" not in str(err.value) and "LossLandscape(batch_loss=...)" in str(err.value)


def test_params_selecting_nothing_is_one_line_at_setup(tmp_path):
    cb = LossLandscape(num_samples=16, batch_size=8, batch_loss=reconstruction, params="generator.*")
    with pytest.raises(ConfigError, match=r"^LossLandscape\(params\): selects no parameter"):
        fit_autoencoder(tmp_path, [cb])


# ---- the evaluators on their own ----------------------------------------------------------------------------------
def test_evaluators_take_a_batch_objective_and_match_the_pair_path():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    data = DictData(n=20)
    pairs = [(data.x[i : i + 8].double(), data.y[i : i + 8]) for i in range(0, 20, 8)]
    dicts = [{"feats": x, "cls": y} for x, y in pairs]

    def loss(m, b):
        return F.cross_entropy(m(b["feats"]), b["cls"])

    def logits(m, b):
        return m(b["feats"]), b["cls"]

    assert evaluate(net, dicts, batch_loss=loss, logits_fn=logits) == pytest.approx(evaluate(net, pairs))
    assert math.isnan(evaluate(net, dicts, batch_loss=loss)[1])
    d = random_directions(net, 1, seed=2)
    a = compute_surface(net, pairs, d, ALPHAS)
    b = compute_surface(net, dicts, d, ALPHAS, batch_loss=loss, logits_fn=logits)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-12)
    np.testing.assert_allclose(b.acc, a.acc, rtol=1e-12)
    assert b.meta["num_samples"] == 20
    clean = accuracy_and_loss(net, dicts, batch_loss=loss, logits_fn=logits)
    assert (clean.acc, clean.loss) == pytest.approx(tuple(accuracy_and_loss(net, pairs).as_dict().values())[:2])
    noisy = weight_noise_robustness(net, dicts, "uniform", 0.05, 2, batch_loss=loss, logits_fn=logits)
    assert noisy.as_dict() == pytest.approx(weight_noise_robustness(net, pairs, "uniform", 0.05, 2).as_dict())
    assert math.isnan(weight_noise_robustness(net, dicts, "uniform", 0.05, 2, batch_loss=loss).acc_mean)


def test_a_family_shares_one_forward_pass_for_loss_and_accuracy():
    from flatlit.methods import SGDFamily

    torch.manual_seed(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 8}, num_classes=3, in_channels=1, image_size=4)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    objective = resolve_objective(module, "test")
    fns = evaluation_functions(objective, batches[0])
    calls = []
    real = module.training_loss
    module.training_loss = lambda batch: (calls.append(1), real(batch))[1]
    module.eval()
    shared = evaluate(module, batches, batch_loss=fns.batch_loss, logits_fn=fns.logits_fn)
    assert len(calls) == 2  # one forward per batch
    separate = evaluate(module, batches, batch_loss=objective.loss_of, logits_fn=objective.logits_of)
    assert shared == separate and shared == pytest.approx(evaluate(module.model, batches, module.loss_fn))
