"""The curvature callbacks in plain-Lightning projects (issue 13): a run with them is bit-identical to a run without
(weights, buffers, optimizer state, every module's train flag, RNG), and the eigenvalues equal those of the exact
Hessian (``torch.func.hessian`` + ``eigvalsh``) of each module's own loss on the callback's sample."""

from __future__ import annotations

import csv
import os
import threading

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.func import functional_call, hessian

from flatlit.callbacks import HessianEigenvalues, HessianTrace, HistoryCSV
from flatlit.utils.errors import ConfigError
from tests.callbacks.projects import (
    DictForward,
    LabelSmoothing,
    Net,
    Regression,
    RegressionWithoutLoss,
    ShuffleGeneratorDM,
)
from tests.helpers import quiet_trainer

NUM_PARAMS = 6 * 5 + 5 + 5 + 5  # first layer, BN affine, biases: the output layer depends on the project


def callbacks(**kw):
    eig = HessianEigenvalues(top_k=3, num_samples=40, batch_size=16, max_iter=200, tol=1e-10, **kw)
    return [eig, HessianTrace(num_probes=3, num_samples=24, batch_size=8, every_n_steps=3)]


def run(module_cls, dm_kw=None, cbs=(), **trainer_kw):
    pl.seed_everything(0)
    module = module_cls()
    trainer = quiet_trainer(max_epochs=2, callbacks=list(cbs), deterministic=True, **trainer_kw)
    trainer.fit(module, datamodule=ShuffleGeneratorDM(**(dm_kw or {})))
    return module, trainer, torch.get_rng_state()


def assert_identical(a, b) -> None:
    (ma, ta, rng_a), (mb, tb, rng_b) = a, b
    for (name, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), name  # weights and BatchNorm buffers
    sa, sb = ta.optimizers[0].state_dict()["state"], tb.optimizers[0].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert [m.training for m in ma.modules()] == [m.training for m in mb.modules()]
    assert torch.equal(rng_a, rng_b)
    assert torch.equal(ta.datamodule.gen.get_state(), tb.datamodule.gen.get_state())


def exact_top(module, batches, loss_of, k=3):
    """Top-k eigenvalues of the exact Hessian of the size-weighted mean loss over ``batches`` (eval mode)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = dict(module.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    total = sum(len(b[1]) if not isinstance(b, dict) else len(next(iter(b.values()))) for b in batches)

    def f(theta):
        ps, i = {}, 0
        for n in names:
            ps[n], i = theta[i : i + params[n].numel()].view_as(params[n]), i + params[n].numel()

        def fwd(x):
            return functional_call(module, ps, (x,))

        return (
            sum(
                (len(b[1]) if not isinstance(b, dict) else len(next(iter(b.values())))) * loss_of(fwd, b)
                for b in batches
            )
            / total
        )

    was = [m.training for m in module.modules()]
    module.eval()
    try:
        return torch.linalg.eigvalsh(hessian(f)(flat)).flip(0)[:k]
    finally:
        for m, t in zip(module.modules(), was):
            m.training = t


PROJECTS = {
    # name: (module, datamodule kwargs, the module's own loss as a function of forward and batch)
    "shuffle-generator": (Net, {}, lambda fwd, b: F.cross_entropy(fwd(b[0]), b[1])),
    "frozen-bn": (lambda: Net(frozen_bn=True), {}, lambda fwd, b: F.cross_entropy(fwd(b[0]), b[1])),
    "manual-optimization": (lambda: Net(manual=True), {}, lambda fwd, b: F.cross_entropy(fwd(b[0]), b[1])),
    "dict-batch": (
        lambda: Net(dict_batch=("image", "label")),
        {"dict_keys": ("image", "label")},
        lambda fwd, b: F.cross_entropy(fwd(b["image"]), b["label"]),
    ),
    "dict-forward": (
        DictForward,
        {"dict_keys": ("features", "target")},
        lambda fwd, b: F.cross_entropy(fwd(b), b["target"]),
    ),
    "regression": (Regression, {"regression": True}, lambda fwd, b: F.mse_loss(fwd(b[0]), b[1])),
    "label-smoothing": (LabelSmoothing, {}, lambda fwd, b: F.cross_entropy(fwd(b[0]), b[1], label_smoothing=0.2)),
}


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_never_perturbs_and_measures_the_modules_own_loss(project):
    module_cls, dm_kw, loss_of = PROJECTS[project]
    plain = run(module_cls, dm_kw)
    cbs = callbacks()
    observed = run(module_cls, dm_kw, cbs)
    assert_identical(plain, observed)
    eig = cbs[0]
    assert eig.num_measurements == 3 and cbs[1].num_measurements >= 2  # start + 2 epochs; every 3 steps
    module = observed[0]
    if project == "frozen-bn":
        assert not module.net[1].training
    expected = exact_top(module, eig._batches, loss_of)
    torch.testing.assert_close(eig.last_result.eigenvalues, expected, rtol=1e-7, atol=1e-10)


def test_sample_drawn_without_the_training_loader():
    dm = ShuffleGeneratorDM()
    dm.setup("fit")
    before = dm.gen.get_state()
    cb = HessianEigenvalues(num_samples=40, batch_size=16)
    trainer = quiet_trainer(max_epochs=1)
    trainer.datamodule = dm  # what Trainer.fit does
    trainer.strategy._lightning_module = None
    batches = cb._draw(trainer, seed=0)
    assert torch.equal(dm.gen.get_state(), before)
    assert sum(len(y) for _, y in batches) == 40 and len({tuple(x[0].tolist()) for x, _ in batches}) == 3


def test_monitors_loggers_and_history_see_the_values_at_the_epoch_step(tmp_path):
    eig = HessianEigenvalues(top_k=2, num_samples=32, batch_size=16, max_iter=200, tol=1e-10)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="hessian/lambda_1", mode="min", save_top_k=1)
    history = HistoryCSV()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet_trainer(max_epochs=3, callbacks=[eig, best, history], logger=logger, enable_checkpointing=True)
    pl.seed_everything(0)
    trainer.fit(Net(), datamodule=ShuffleGeneratorDM())
    lambdas = [e[0] for e in eig.history["eigenvalues"]]  # before training, then after each epoch
    # Lightning keeps logged values as float32 tensors
    assert float(trainer.callback_metrics["hessian/lambda_1"]) == pytest.approx(lambdas[-1], rel=1e-6)
    assert float(best.best_model_score) == pytest.approx(min(lambdas[1:]), rel=1e-6)
    # TensorBoard: hessian/lambda_1 at the steps of the epoch metric train_loss_epoch, plus the value before training
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir)
    events.Reload()
    hess = {e.step: e.value for e in events.Scalars("hessian/lambda_1")}
    epoch_steps = [e.step for e in events.Scalars("train_loss_epoch")]
    assert sorted(hess) == [0, *epoch_steps]
    assert [hess[s] for s in epoch_steps] == pytest.approx(lambdas[1:], rel=1e-6)
    with open(os.path.join(trainer.log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["-1", "0", "1", "2"]  # the value before training has its own row
    assert [float(r["hessian/lambda_1"]) for r in rows] == pytest.approx(lambdas, rel=1e-6)
    assert "train_loss" in rows[1] and "train_loss_step" not in rows[1] and "train_loss_epoch" not in rows[1]


def test_early_stopping_on_lambda_1():
    eig = HessianEigenvalues(top_k=1, num_samples=32, batch_size=16, at_train_start=False)
    stop = EarlyStopping(monitor="hessian/lambda_1", mode="min", stopping_threshold=1e9)  # any λ₁ stops the run
    trainer = quiet_trainer(max_epochs=5, callbacks=[eig, stop])
    trainer.fit(Net(), datamodule=ShuffleGeneratorDM())
    assert trainer.current_epoch == 1 and stop.stopped_epoch == 0 and eig.num_measurements == 1


@pytest.mark.parametrize(
    "kw, steps",
    [
        ({"every_n_steps": 2}, [0, 2, 4]),  # every_n_epochs defaults to off when every_n_steps is set
        ({"every_n_steps": 2, "every_n_epochs": 1}, [0, 2, 4]),  # epoch ends fall on measured steps: no repeat
        ({"every_n_steps": 3, "every_n_epochs": 1}, [0, 2, 3, 4]),
    ],
)
def test_schedule_measures_each_step_once(tmp_path, kw, steps):
    eig = HessianEigenvalues(top_k=1, num_samples=16, batch_size=16, **kw)
    history = HistoryCSV()
    logger = TensorBoardLogger(str(tmp_path), name="s")
    trainer = quiet_trainer(max_steps=4, limit_train_batches=2, callbacks=[eig, history], logger=logger)
    trainer.fit(Net(), datamodule=ShuffleGeneratorDM())
    assert eig.history["step"] == steps


def test_history_keeps_step_suffixed_names_and_writes_atomically(tmp_path):
    class Logs(Net):
        def training_step(self, batch, batch_idx):
            self.log("train/passes_per_step", 2.0, on_step=False, on_epoch=True, batch_size=8)
            return super().training_step(batch, batch_idx)

    history = HistoryCSV()
    trainer = quiet_trainer(max_epochs=1, callbacks=[history], logger=TensorBoardLogger(str(tmp_path), name="h"))
    trainer.fit(Logs(), datamodule=ShuffleGeneratorDM())
    with open(history.path(trainer)) as f:
        row = next(csv.DictReader(f))
    assert row["train/passes_per_step"] == "2.0" and "train_loss" in row and "train_loss_step" not in row

    # a reader polling the file while it is rewritten never sees a partial copy
    path = history.path(trainer)
    history.rows = [{"epoch": i, "step": i, **{f"m{j}": float(i * j) for j in range(20)}} for i in range(3000)]
    seen, done = [], threading.Event()

    def read():
        while not done.is_set():
            with open(path) as f:
                seen.append(len(f.read().splitlines()))

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(30):
        history._write(path)
    done.set()
    reader.join()
    assert seen and set(seen) <= {2, 3001}


def test_a_loss_that_cannot_apply_names_loss_fn_and_the_shapes():
    trainer = quiet_trainer(max_epochs=1, callbacks=[HessianEigenvalues(num_samples=16, batch_size=8)])
    with pytest.raises(ConfigError) as err:
        trainer.fit(RegressionWithoutLoss(), datamodule=ShuffleGeneratorDM(regression=True))
    msg = str(err.value)
    assert "loss_fn" in msg and "outputs (8, 1) float64" in msg and "targets (8, 1) float64" in msg


def test_a_batch_that_cannot_be_unpacked_names_its_type_and_the_hooks():
    trainer = quiet_trainer(max_epochs=1, callbacks=[HessianEigenvalues(num_samples=16, batch_size=8)])
    with pytest.raises(ConfigError) as err:
        trainer.fit(Net(dict_batch=("a", "b")), datamodule=ShuffleGeneratorDM(dict_keys=("a", "b")))
    msg = str(err.value)
    assert "dict with keys ['a', 'b']" in msg and "batch_loss" in msg and "curvature_loss" in msg


def test_batch_loss_callable_and_zero_operator_warning():
    def batch_loss(module, batch):
        return F.cross_entropy(module(batch["a"]), batch["b"])

    cb = HessianEigenvalues(top_k=2, num_samples=16, batch_size=8, batch_loss=batch_loss, max_iter=200, tol=1e-10)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(Net(dict_batch=("a", "b")), datamodule=ShuffleGeneratorDM(dict_keys=("a", "b")))
    expected = exact_top(trainer.lightning_module, cb._batches, lambda fwd, b: F.cross_entropy(fwd(b["a"]), b["b"]), 2)
    torch.testing.assert_close(cb.last_result.eigenvalues, expected, rtol=1e-7, atol=1e-10)

    one_output = HessianEigenvalues(top_k=1, num_samples=16, batch_size=8, loss_fn=F.cross_entropy)
    with pytest.warns(UserWarning, match="identically zero"):
        quiet_trainer(max_epochs=1, callbacks=[one_output]).fit(  # softmax of one output is constant
            RegressionWithoutLoss(), datamodule=ShuffleGeneratorDM(regression=True)
        )


def test_progress_lines(caplog):
    cb = HessianEigenvalues(top_k=2, num_samples=16, batch_size=8, progress_every=0.0, every_n_epochs=None)
    with caplog.at_level("INFO"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(Net(), datamodule=ShuffleGeneratorDM())
    lines = [r.getMessage() for r in caplog.records if "HVPs" in r.getMessage()]
    assert lines and "HessianEigenvalues at step 0: 1 HVPs" in lines[0]
    assert any("residual" in ln for ln in lines)


def test_step_measurements_logged_once_and_two_instances_apart(tmp_path):
    top = HessianEigenvalues(top_k=1, num_samples=16, batch_size=16, every_n_steps=4, at_train_start=False)
    bottom = HessianEigenvalues(top_k=1, num_samples=16, batch_size=16, which="SA", max_iter=50)
    logger = TensorBoardLogger(str(tmp_path), name="g")
    trainer = quiet_trainer(max_steps=8, callbacks=[top, bottom], logger=logger, log_every_n_steps=1)
    trainer.fit(Net(), datamodule=ShuffleGeneratorDM())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir)
    events.Reload()
    steps = [e.step for e in events.Scalars("hessian/lambda_1")]
    assert steps == [3, 7]  # one point per measurement (global steps 4 and 8), at Lightning's step for that batch
    assert float(trainer.callback_metrics["hessian/lambda_1"]) == pytest.approx(top.history["eigenvalues"][-1][0])
    assert float(trainer.callback_metrics["hessian/lambda_min_1"]) == pytest.approx(
        bottom.history["eigenvalues"][-1][0], rel=1e-6
    )
    assert bottom.history["eigenvalues"][-1][0] < top.history["eigenvalues"][-1][0]
