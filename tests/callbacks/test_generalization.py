"""GeneralizationTargets: final train/test metrics over the full splits in eval mode, the stopping rules, and
observe-never-perturb."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from flatlit.callbacks import GeneralizationTargets, HistoryCSV
from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily
from flatlit.utils.errors import ConfigError
from tests.helpers import quiet_trainer, run_torchrun

STEPS = 3  # training batches per epoch


def module() -> SGDFamily:
    return SGDFamily(
        arch="mlp",
        arch_kwargs={"width": 8, "batch_norm": True},  # BatchNorm: eval mode (running statistics) matters
        optimizer=lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
    )


def datamodule(mnist_dir: str) -> MNISTDataModule:
    # augmentation, noisy labels and a subset: the evaluation must use the eval transform and the labels trained on
    return MNISTDataModule(
        data_dir=mnist_dir, batch_size=32, augment="cutout", label_noise=0.2, train_subset=200, download=False
    )


def fit(mnist_dir, tmp_path, callbacks, epochs: int, ckpt_path=None, name: str = "run"):
    pl.seed_everything(0)
    m, dm = module(), datamodule(mnist_dir)
    t = quiet_trainer(
        max_epochs=epochs,
        limit_train_batches=STEPS,
        limit_val_batches=0,
        logger=CSVLogger(str(tmp_path), name=name, version=0),
        callbacks=[*callbacks, HistoryCSV()],
        deterministic=True,
    )
    t.fit(m, datamodule=dm, ckpt_path=ckpt_path)
    return m, dm, t


def hand_eval(m, x, y) -> tuple[float, float]:
    was = m.training
    m.eval()
    with torch.no_grad():
        logits = m(x)
    m.train(was)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def test_final_metrics_equal_a_hand_evaluation_of_the_full_splits(mnist_dir, tmp_path):
    cb = GeneralizationTargets(batch_size=64)  # batches of 64 over 200 examples: a partial last batch
    m, dm, t = fit(mnist_dir, tmp_path, [cb], epochs=2)
    # by hand: every training example (noisy labels) under the evaluation transform, then the whole test split
    batches = dm.curvature_batches(len(dm.train_indices), 1000)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(y) == 200 and torch.equal(y, dm.train_targets) and not torch.equal(y, dm.clean_train_targets)
    train_loss, train_acc = hand_eval(m, x, y)
    test = list(dm.test_dataloader())
    test_loss, test_acc = hand_eval(m, torch.cat([b[0] for b in test]), torch.cat([b[1] for b in test]))
    expected = {
        "final/train_loss": train_loss,
        "final/train_acc": train_acc,
        "final/test_loss": test_loss,
        "final/test_acc": test_acc,
        "final/gen_gap_acc": train_acc - test_acc,
        "final/gen_gap_loss": test_loss - train_loss,
    }
    assert cb.final_metrics == pytest.approx(expected, rel=1e-5, abs=1e-6)
    log_dir = t.log_dir
    with open(os.path.join(log_dir, "final_metrics.json")) as f:
        record = json.load(f)
    assert {k: record[k] for k in expected} == cb.final_metrics
    assert record["epochs"] == 2 and record["global_step"] == 2 * STEPS and not record["converged"]
    assert record["num_train"] == 200 and record["num_test"] == 60
    with open(os.path.join(log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[0]["final/test_acc"] == ""  # merged into the last epoch's row
    assert float(rows[-1]["final/train_acc"]) == pytest.approx(train_acc)
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        logged = [r for r in csv.DictReader(f) if r.get("final/test_acc")]
    assert len(logged) == 1 and float(logged[0]["final/test_acc"]) == pytest.approx(test_acc)
    assert float(logged[0]["step"]) == 2 * STEPS


def test_does_not_perturb_training(mnist_dir, tmp_path):
    plain, _, t0 = fit(mnist_dir, tmp_path, [], epochs=3, name="plain")
    rng_plain = torch.get_rng_state()
    cb = GeneralizationTargets(stop_loss=0.0, every_n_epochs=1)  # checks every epoch, never met (loss > 0)
    observed, _, t1 = fit(mnist_dir, tmp_path, [cb], epochs=3, name="observed")
    assert torch.equal(rng_plain, torch.get_rng_state())
    assert cb.converged is None and t1.current_epoch == 3
    for (name, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm buffers
    s0, s1 = t0.optimizers[0].state_dict()["state"], t1.optimizers[0].state_dict()["state"]
    assert all(torch.equal(s0[k]["momentum_buffer"], s1[k]["momentum_buffer"]) for k in s0)
    with open(os.path.join(t1.log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["full_train/loss"] != "" for r in rows] == [True, True, True]


def full_train_series(mnist_dir, tmp_path, epochs: int) -> list[dict[str, float]]:
    """Per-epoch full-pass training loss and accuracy (logged by a rule-free callback checking every epoch), read
    exactly from history.csv."""
    cb = GeneralizationTargets(every_n_epochs=1, test=False)
    _, _, t = fit(mnist_dir, tmp_path, [cb], epochs, name="series")
    with open(os.path.join(t.log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    series = [{"loss": float(r["full_train/loss"]), "acc": float(r["full_train/acc"])} for r in rows]
    # the last check and the final evaluation are one pass: what was logged is the float64 value itself, unrounded
    assert series[-1] == {"loss": cb.final_metrics["final/train_loss"], "acc": cb.final_metrics["final/train_acc"]}
    return series


@pytest.mark.parametrize("rule", ["stop_loss", "stop_error"])
def test_stopping_rule_stops_at_the_right_epoch_and_saves_converged(mnist_dir, tmp_path, rule):
    series = full_train_series(mnist_dir, tmp_path, epochs=5)
    value = [s["loss"] if rule == "stop_loss" else 1 - s["acc"] for s in series]  # as the rule computes it
    # the threshold is the exact value logged at an epoch after the first that improves on every earlier one: the rule
    # compares that very value (float64, written unrounded), so it fires at that epoch, and not just below the value
    records = [e for e in range(1, 4) if value[e] < min(value[:e])]
    assert records, value
    expected = records[-1]
    threshold = value[expected]
    below = GeneralizationTargets(**{rule: math.nextafter(threshold, -math.inf)})
    fit(mnist_dir, tmp_path, [below], epochs=expected + 1, name="below")
    assert below.converged is None  # fires only if the rule compares another value than the logged one
    cb = GeneralizationTargets(**{rule: threshold})
    m, _, t = fit(mnist_dir, tmp_path, [cb], epochs=5, name="stopped")
    assert cb.converged == {"epoch": expected, "step": (expected + 1) * STEPS}
    assert t.current_epoch == expected + 1 and t.global_step == (expected + 1) * STEPS
    ckpt = torch.load(os.path.join(t.log_dir, "checkpoints", "converged.ckpt"), weights_only=False)
    assert ckpt["global_step"] == (expected + 1) * STEPS
    plain, _, _ = fit(mnist_dir, tmp_path, [], epochs=expected + 1, name="plain")  # bit for bit until the stop
    for key, value in plain.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"{key}"], value), key
        assert torch.equal(m.state_dict()[key], value), key
    with open(os.path.join(t.log_dir, "final_metrics.json")) as f:
        record = json.load(f)
    assert record["converged"] and record["converged_epoch"] == expected and record["epochs"] == expected + 1
    # a run resumed from its converged checkpoint is finished: no further step, the final metrics again
    again = GeneralizationTargets(**{rule: threshold})
    _, _, t2 = fit(mnist_dir, tmp_path, [again], 5, ckpt_path=os.path.join(t.log_dir, "checkpoints", "converged.ckpt"))
    assert t2.global_step == (expected + 1) * STEPS and again.converged == cb.converged
    assert again.final_metrics == pytest.approx(cb.final_metrics)


def test_loss_milestones_record_the_first_check_below_each_loss(mnist_dir, tmp_path):
    """Jiang et al.'s step counts: the global step of the first epoch-end check with full_train/loss ≤ each value,
    compared with the logged series; a value never reached is recorded as None; training is not changed."""
    series = [s["loss"] for s in full_train_series(mnist_dir, tmp_path, epochs=4)]
    first = next(e for e in range(1, 4) if series[e] < min(series[:e]))
    reached = series[first]  # first reached at epoch `first` exactly (every earlier value is larger)
    cb = GeneralizationTargets(loss_milestones=[reached, 0.0], test=False)
    m, _, t = fit(mnist_dir, tmp_path, [cb], epochs=4, name="milestones")
    key = repr(float(reached))
    assert cb.milestones == {key: {"epoch": first, "step": (first + 1) * STEPS}}
    with open(os.path.join(t.log_dir, "final_metrics.json")) as f:
        record = json.load(f)
    assert record["loss_milestones"] == {key: {"epoch": first, "step": (first + 1) * STEPS}, "0.0": None}
    with open(os.path.join(t.log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get(f"optimization/steps_to_loss_{key}")]
    assert int(logged[0]["epoch"]) == first  # first logged at that epoch (Lightning keeps the value in later rows)
    assert {int(float(r[f"optimization/steps_to_loss_{key}"])) for r in logged} == {(first + 1) * STEPS}
    assert cb.converged is None and t.current_epoch == 4  # milestones never stop training
    plain, _, _ = fit(mnist_dir, tmp_path, [], epochs=4, name="plain_m")
    for k, v in plain.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with pytest.raises(ConfigError, match=r"GeneralizationTargets\(loss_milestones\)"):
        GeneralizationTargets(loss_milestones=[-0.1])


def test_evaluation_batches_cover_each_example_once_per_rank_share(mnist_dir):
    dm = datamodule(mnist_dir)
    dm.setup("fit")
    whole = dm.curvature_batches(len(dm.train_indices), 1000)
    x, y = torch.cat([b[0] for b in whole]), torch.cat([b[1] for b in whole])
    shares = [list(dm.evaluation_batches("train", 16, rank, 3)) for rank in range(3)]
    for rank, share in enumerate(shares):
        assert torch.equal(torch.cat([b[0] for b in share]), x[rank::3])
        assert torch.equal(torch.cat([b[1] for b in share]), y[rank::3])
    test = list(dm.evaluation_batches("test", 25))
    assert [len(b[1]) for b in test] == [25, 25, 10]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"stop_loss": -1.0}, "stop_loss"),
        ({"stop_error": 1.5}, "stop_error"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ConfigError, match=rf"GeneralizationTargets\({name}\)"):
        GeneralizationTargets(**kwargs)


@pytest.mark.distributed
def test_ddp_sums_are_exact(tmp_path, mnist_dir):
    out = str(tmp_path / "ddp")
    with socket.socket() as s:  # a free port: a fixed one collides with other DDP tests running at the same time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_torchrun(os.path.abspath(__file__), [mnist_dir, out], port=port)
    res = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    assert res[0]["final"] == res[1]["final"]  # every rank: the same all-reduced values
    m = module()
    m.load_state_dict(res[0]["state"])
    dm = datamodule(mnist_dir)
    dm.setup("fit")
    whole = dm.curvature_batches(len(dm.train_indices), 1000)
    loss, acc = hand_eval(m, torch.cat([b[0] for b in whole]), torch.cat([b[1] for b in whole]))
    assert res[0]["final"]["final/train_acc"] == pytest.approx(acc) and res[0]["final"]["final/train_loss"] == (
        pytest.approx(loss, rel=1e-5)
    )
    test = list(dm.test_dataloader())
    test_loss, test_acc = hand_eval(m, torch.cat([b[0] for b in test]), torch.cat([b[1] for b in test]))
    assert res[0]["final"]["final/test_acc"] == pytest.approx(test_acc)
    assert res[0]["final"]["final/test_loss"] == pytest.approx(test_loss, rel=1e-5)
    with open(os.path.join(str(tmp_path), "logs", "version_0", "final_metrics.json")) as f:
        record = json.load(f)
    assert record["num_train"] == 200 and record["num_test"] == 60  # every example once: no padding, no drop


if __name__ == "__main__":  # the DDP worker of test_ddp_sums_are_exact (2 processes, gloo)
    data, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    cb = GeneralizationTargets(batch_size=30)  # ranks' shares of 100 and 30: a partial last batch
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=STEPS,
        limit_val_batches=0,
        strategy="ddp",
        devices=2,
        callbacks=[cb],
        logger=CSVLogger(os.path.dirname(out), name="logs", version=0),
    )
    net = module()
    trainer.fit(net, datamodule=datamodule(data))
    torch.save({"final": cb.final_metrics, "state": net.state_dict()}, f"{out}.{trainer.global_rank}")
    from tests.helpers import end_worker

    end_worker()  # else gloo may abort at exit ("terminate called without an active exception")
