"""``flatlit sweep``: expansion, bad input, resumability after SIGKILL, retries of failing trials, the submitit path.

Trials are real ``flatlit fit`` processes on the fake MNIST: width-8 MLPs, 1–2 epochs of 2 batches.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import time

import lightning.pytorch as pl
import pytest
import torch
import yaml

from flatlit.cli.sweep import main
from flatlit.sweeps.spec import expand, load_spec
from flatlit.sweeps.study import Book
from flatlit.sweeps.trial import last_error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- callbacks the trial processes import (tests.test_sweep.*) ------------------------------------------------------
class Boom(pl.Callback):
    """Raises when training starts with seed ``seed`` (a trial that fails every time)."""

    def __init__(self, seed: int = -1) -> None:
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.initial_seed() == self.seed:
            raise RuntimeError(f"boom at seed {self.seed}")


class _Once(pl.Callback):
    """Acts once per run directory (a marker file there), in trial ``trial`` at the start of epoch ``epoch``."""

    def __init__(self, trial: str = "trial-0000", epoch: int = 1) -> None:
        self.trial, self.epoch = trial, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        marker = os.path.join(trainer.log_dir, f"{type(self).__name__}.done")
        if trainer.current_epoch == self.epoch and trainer.log_dir.endswith(self.trial) and not os.path.exists(marker):
            open(marker, "w").close()
            self.act()

    def act(self) -> None:
        raise NotImplementedError


class KillSweep(_Once):
    """SIGKILL of the sweep's driver (this trial's parent) and of this running trial."""

    def act(self) -> None:
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


class Preempt(_Once):
    """SIGUSR2 to this trial's submitit job (its parent), as Slurm sends before a timeout or on preemption; the job
    stops this process (SIGTERM: Lightning stops before the next batch)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.trainer = trainer
        super().on_train_epoch_start(trainer, pl_module)

    def act(self) -> None:
        os.kill(os.getppid(), signal.SIGUSR2)
        deadline = time.time() + 60
        while not self.trainer.received_sigterm and time.time() < deadline:
            time.sleep(0.05)


# ---- helpers --------------------------------------------------------------------------------------------------------
def base_config(tmp_path, mnist_dir, epochs: int = 1, callbacks: list | None = None, name: str = "base") -> str:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": epochs,
            "limit_train_batches": 2,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks or [],
        },
        "model": {
            "class_path": "flatlit.methods.SGDFamily",
            "init_args": {
                "arch": "mlp",
                "arch_kwargs": {"width": 8},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
            },
        },
        "data": {
            "class_path": "flatlit.data.MNISTDataModule",
            "init_args": {"data_dir": mnist_dir, "batch_size": 32, "download": False},
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def sweep_file(tmp_path, base: str, name: str = "sweep", **fields) -> str:
    spec = {"config": os.path.basename(base), "output": f"out/{name}", **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def results(output: str) -> dict[str, dict[str, str]]:
    with open(os.path.join(output, "results.csv")) as f:
        return {r["trial"]: r for r in csv.DictReader(f)}


def fit_commands(output: str, trial: str) -> list[str]:
    with open(os.path.join(output, "trials", trial, "trial.log")) as f:
        return [ln for ln in f if ln.startswith("# ") and " fit " in ln]


def _run_driver(args: list[str]) -> None:
    try:
        main(args)
    except SystemExit:
        pass


def driver(*args: str) -> multiprocessing.Process:
    """The sweep's driver in a forked copy of this process (no start-up imports), to be killed."""
    proc = multiprocessing.get_context("fork").Process(target=_run_driver, args=(list(args),))
    proc.start()
    return proc


def processes_with(text: str) -> list[int]:
    """Live processes whose command line mentions ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except (OSError, ValueError):
            continue
    return found


@pytest.fixture(autouse=True)
def _trials_import_tests(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT)  # trial processes import the callbacks above
    monkeypatch.chdir(ROOT)


METRICS = ("final/train_loss", "final/train_acc", "final/test_loss", "final/test_acc", "final/gen_gap_acc")


# ---- expansion ----------------------------------------------------------------------------------------------------
def test_grid_expands_to_exactly_the_expected_trials_and_random_search_is_seeded(tmp_path, mnist_dir):
    base = base_config(tmp_path, mnist_dir)
    grid = {"seed_everything": [0, 1], "model.init_args.optimizer.init_args.lr": [0.01, 0.05, 0.1]}
    trials = expand(load_spec(sweep_file(tmp_path, base, grid=grid)))
    assert [t.params for t in trials] == [
        {"seed_everything": s, "model.init_args.optimizer.init_args.lr": lr} for s in (0, 1) for lr in (0.01, 0.05, 0.1)
    ]
    space = {
        "model.init_args.optimizer.init_args.lr": {"low": 1e-3, "high": 1.0, "log": True},
        "model.init_args.arch_kwargs.width": {"low": 4, "high": 64, "log": True},
        "data.init_args.label_noise": {"low": 0.0, "high": 0.5},
        "model.init_args.arch": {"choices": ["mlp", "lenet"]},
    }

    def draws(seed: int, grid=None):
        spec = load_spec(
            sweep_file(
                tmp_path, base, name=f"r{seed}", grid=grid, random={"num_trials": 5, "seed": seed, "space": space}
            )
        )
        return [t.params for t in expand(spec)]

    a, b, c = draws(0), draws(0), draws(1)
    assert a == b and a != c and len(a) == 5  # seeded
    for p in a:
        assert 1e-3 <= p["model.init_args.optimizer.init_args.lr"] <= 1.0
        assert (
            isinstance(p["model.init_args.arch_kwargs.width"], int)
            and 4 <= p["model.init_args.arch_kwargs.width"] <= 64
        )
        assert 0.0 <= p["data.init_args.label_noise"] <= 0.5 and p["model.init_args.arch"] in ("mlp", "lenet")
    assert len({p["model.init_args.optimizer.init_args.lr"] for p in a}) == 5
    both = draws(0, grid={"seed_everything": [0, 1]})  # every random draw at every grid point, draw-major
    assert len(both) == 10 and [p["seed_everything"] for p in both] == [0, 1] * 5
    assert [{k: v for k, v in p.items() if k != "seed_everything"} for p in both[::2]] == a


# ---- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"grid": {"model.init_args.optimizer.init_args.lrr": [0.1]}}, "grid.model.init_args.optimizer.init_args.lrr:"),
        ({"grid": {}}, "grid: empty"),
        ({"grid": {"seed_everything": []}}, "grid.seed_everything: empty list"),
        ({"grid": {"data.init_args.label_noise": [0.1, 1.5]}}, "grid.data.init_args.label_noise: value 1.5"),
        ({"grid": {"model.init_args.arch": ["mlp", "lenett"]}}, "grid.model.init_args.arch: value 'lenett'"),
        ({"grid": {"seed_everything": [0]}, "measures": ["sam_sharpnes"]}, "measures.sam_sharpnes: unknown measure"),
        ({"grid": {"seed_everything": [0]}, "generalization": {"stop_eror": 0.01}}, "generalization:"),
        ({"grid": {"seed_everything": [0]}, "preset": "jiang2020"}, "unknown preset 'jiang2020'"),
        (
            {"grid": {"seed_everything": [0]}, "preset": "jiang2019", "measures": {"fro_dist": {"squared": False}}},
            "measures.fro_dist.squared: False conflicts with preset jiang2019",
        ),
        ({"grd": {"seed_everything": [0]}}, "grd: unknown sweep key"),
        ({"grid": {"seed_everything": [0]}, "bad_base": True}, "config: "),
    ],
)
def test_bad_input_is_refused_before_any_trial_with_one_line_naming_the_key(
    tmp_path, mnist_dir, capsys, fields, message
):
    base = base_config(tmp_path, mnist_dir)
    if fields.pop("bad_base", False):
        cfg = yaml.safe_load(open(base))
        cfg["data"]["init_args"]["batchsize"] = 3
        open(base, "w").write(yaml.safe_dump(cfg))
    path = sweep_file(tmp_path, base, **fields)
    with pytest.raises(SystemExit) as exc:
        main(["--config", path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"flatlit: error: {message}"), err
    assert "batchsize" in lines[0] if "config: " in message else True
    assert not os.path.exists(tmp_path / "out")  # no trial started, nothing written


def test_dry_run_lists_the_trials_and_the_command(tmp_path, mnist_dir, capsys):
    base = base_config(tmp_path, mnist_dir)
    path = sweep_file(tmp_path, base, grid={"seed_everything": [0, 1]}, measures={"margin": {"percentile": 10}})
    summary = main(["--config", path, "--dry_run"])
    out = capsys.readouterr().out
    assert summary["trials"] == 2 and "trial-0001  new" in out and "--seed_everything=0" in out
    assert "GeneralizationTargets" in out and "ModelCheckpoint" in out and "flatlit.cli measure" in out
    assert not os.path.exists(tmp_path / "out")


def test_a_preset_sweep_measures_the_papers_labels_and_records_the_step_counts(tmp_path, mnist_dir, capsys):
    base = base_config(tmp_path, mnist_dir)
    path = sweep_file(tmp_path, base, grid={"seed_everything": [0]}, preset="jiang2019", measures=["fro_dist"])
    main(["--config", path, "--dry_run"])
    out = capsys.readouterr().out
    assert "--preset jiang2019 --measures fro_dist" in out
    assert "loss_milestones" in out and "0.01" in out  # the trial records what the preset reads


def test_last_error_line():
    tb = (
        "Seed set to 0\nTraceback (most recent call last):\n  File x\n    raise RuntimeError('a')\nRuntimeError: boom\n"
    )
    assert last_error_line(tb) == "RuntimeError: boom"
    assert (
        last_error_line("x\nflatlit: error: data.init_args.x: bad\n(see ...)\n")
        == "flatlit: error: data.init_args.x: bad"
    )


# ---- running, killing, restarting -----------------------------------------------------------------------------------
def test_sweep_killed_and_restarted_finishes_every_trial_once_with_the_same_results(tmp_path, mnist_dir, capsys):
    base = base_config(tmp_path, mnist_dir)
    grid = {"seed_everything": [0, 1]}
    # the reference: trial-0001's hyperparameters in an uninterrupted sweep of its own
    summary = main(["--config", sweep_file(tmp_path, base, name="reference", grid={"seed_everything": [1]})])
    assert summary["done"] == 1 and summary["failed"] == 0
    ref = results(summary["output"])["trial-0000"]
    assert ref["seed_everything"] == "1"
    out = capsys.readouterr().out
    assert "trial-0000 done" in out and "1/1 done, 0 running, 0 failed, 0 pending" in out

    # the driver is SIGKILLed as soon as the first trial has finished (the second one starts, and dies with it)
    killed = sweep_file(tmp_path, base, name="killed", grid=grid)
    output = str(tmp_path / "out" / "killed")
    proc = driver("--config", killed, "--workers", "1")
    first = os.path.join(output, "trials", "trial-0000", "final_metrics.json")
    deadline = time.time() + 120
    while not os.path.exists(first) and proc.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    time.sleep(0.5)
    assert processes_with(output) == []  # no orphan trial keeps writing to the sweep
    main(["--config", killed, "--workers", "1"])  # the same command again
    again = results(output)
    assert list(again) == ["trial-0000", "trial-0001"]
    assert {k: again["trial-0001"][k] for k in METRICS} == {k: ref[k] for k in METRICS}
    assert len(fit_commands(output, "trial-0000")) == 1  # finished trials are not run again
    attempts = Book(load_spec(killed)).attempts()
    complete = [a.user_attrs["trial_id"] for a in attempts if a.state.name == "COMPLETE"]
    assert sorted(complete) == ["trial-0000", "trial-0001"]  # exactly once each


def test_failing_trial_is_reported_with_its_reason_and_retried(tmp_path, mnist_dir, capsys):
    boom = {"class_path": "tests.test_sweep.Boom", "init_args": {"seed": 1}}
    base = base_config(tmp_path, mnist_dir, callbacks=[boom])
    path = sweep_file(tmp_path, base, grid={"seed_everything": [1]})
    with pytest.raises(SystemExit) as exc:
        main(["--config", path, "--retries", "1"])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert out.count("trial-0000 failed (attempt ") == 2
    assert "trial-0000 failed (attempt 1): RuntimeError: boom at seed 1 [trials/trial-0000/trial.log]; retrying" in out
    assert "giving up after 2 attempt(s)" in out and "trial-0000 failed: RuntimeError: boom at seed 1" in out
    assert "0/1 done, 0 running, 1 failed, 0 pending" in out
    output = str(tmp_path / "out" / "sweep")
    assert list(results(output)) == []
    fails = Book(load_spec(path)).attempts()
    assert [(a.state.name, a.user_attrs["attempt"]) for a in fails] == [("FAIL", 1), ("FAIL", 2)]
    assert all(a.user_attrs["failure"] == "RuntimeError: boom at seed 1" for a in fails)


def test_submitit_debug_executor_end_to_end(tmp_path, mnist_dir):
    base = base_config(tmp_path, mnist_dir)
    path = sweep_file(tmp_path, base, grid={"seed_everything": [0]}, slurm={"cluster": "debug", "timeout_min": 5})
    summary = main(["--config", path, "--executor", "slurm"])
    assert summary["done"] == 1
    row = results(summary["output"])["trial-0000"]
    assert 0 <= float(row["final/test_acc"]) <= 1 and row["final/epochs"] == "1"
    attempt = Book(load_spec(path)).latest()["trial-0000"]
    assert attempt.user_attrs["job_id"].startswith("DEBUG_") and attempt.user_attrs["status"] == "done"


def test_submitit_local_executor_runs_and_requeues_a_preempted_trial(tmp_path, mnist_dir):
    preempt = {"class_path": "tests.test_sweep.Preempt", "init_args": {"epoch": 1}}
    base = base_config(tmp_path, mnist_dir, epochs=2, callbacks=[preempt])
    path = sweep_file(tmp_path, base, grid={"seed_everything": [0]}, slurm={"cluster": "local", "timeout_min": 10})
    summary = main(["--config", path, "--executor", "slurm"])
    assert summary["done"] == 1
    commands = fit_commands(summary["output"], "trial-0000")
    assert len(commands) == 2 and "--ckpt_path" not in commands[0] and "checkpoints/last.ckpt" in commands[1]
    with open(os.path.join(summary["output"], "trials", "trial-0000", "history.csv")) as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
    attempt = Book(load_spec(path)).latest()["trial-0000"]
    assert attempt.user_attrs["attempt"] == 1 and attempt.state.name == "COMPLETE"  # one job, requeued in place


def test_sigkill_of_driver_and_running_trial_mid_training_resumes_from_last_ckpt(tmp_path, mnist_dir):
    # one trial: the trials never started are covered by the test above; here the killed trial resumes mid-training
    grid = {"seed_everything": [0]}
    plain = base_config(tmp_path, mnist_dir, epochs=2, name="plain")
    # as many workers as the killed sweep: a trial's CPU threads (cores // workers) change its float32 sums
    ref = main(["--config", sweep_file(tmp_path, plain, name="reference", grid=grid), "--workers", "1"])
    kill = {"class_path": "tests.test_sweep.KillSweep", "init_args": {"trial": "trial-0000", "epoch": 1}}
    base = base_config(tmp_path, mnist_dir, epochs=2, callbacks=[kill], name="killing")
    path = sweep_file(tmp_path, base, name="killed", grid=grid)
    proc = driver("--config", path, "--workers", "1")
    proc.join(timeout=300)
    assert proc.exitcode == -signal.SIGKILL
    output = str(tmp_path / "out" / "killed")
    trial = os.path.join(output, "trials", "trial-0000")
    assert not os.path.exists(os.path.join(trial, "final_metrics.json"))
    assert torch.load(os.path.join(trial, "checkpoints", "last.ckpt"), weights_only=False)["epoch"] == 0  # mid-run
    summary = main(["--config", path, "--workers", "1"])
    assert summary["done"] == 1
    commands = fit_commands(output, "trial-0000")
    assert len(commands) == 2 and "checkpoints/last.ckpt" in commands[1]
    a, b = results(ref["output"]), results(output)
    assert {k: a["trial-0000"][k] for k in METRICS} == {k: b["trial-0000"][k] for k in METRICS}
    reference = os.path.join(ref["output"], "trials", "trial-0000")
    ca = torch.load(os.path.join(reference, "checkpoints", "last.ckpt"), weights_only=False)
    cb = torch.load(os.path.join(trial, "checkpoints", "last.ckpt"), weights_only=False)
    assert all(torch.equal(v, cb["state_dict"][k]) for k, v in ca["state_dict"].items())
    with open(os.path.join(reference, "final_metrics.json")) as f:
        expected = json.load(f)
    with open(os.path.join(trial, "final_metrics.json")) as f:
        assert json.load(f) == expected
