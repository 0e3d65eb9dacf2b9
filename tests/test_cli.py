import csv
import glob
import os

import pytest
import yaml

from flatlit.cli import main, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "experiments", "**", "*.yaml"), recursive=True)
    if os.sep + "_base" + os.sep not in p
    # sweep files are `flatlit sweep` input (tests/test_sweep.py); their base experiments are checked here
    and os.path.dirname(p) != os.path.join(ROOT, "experiments", "sweeps")
    and os.path.basename(p) != "sweep.yaml"  # a reproduction's sweep (tests/reproductions/)
)


def write_config(tmp_path, mnist_dir, model=None, data=None, trainer=None):
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t"},
            },
            **(trainer or {}),
        },
        "model": {
            "class_path": "flatlit.methods.SGDFamily",
            "init_args": {
                "arch": "mlp",
                "arch_kwargs": {"width": 16},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
                **(model or {}),
            },
        },
        "data": {
            "class_path": "flatlit.data.MNISTDataModule",
            "init_args": {"data_dir": mnist_dir, "batch_size": 32, "download": False, **(data or {})},
        },
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def error_line(capsys) -> str:
    """The one ``flatlit: error: ...`` line on stderr (log lines such as ``Seed set to 0`` aside); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING", "GPU ", "TPU "))]
    assert len(lines) == 1 and lines[0].startswith("flatlit: error: "), err
    return lines[0]


def test_fit_end_to_end_fast_dev_run(tmp_path, mnist_dir):
    cli = run(["fit", "--config", write_config(tmp_path, mnist_dir), "--trainer.fast_dev_run", "2"])
    assert cli.trainer.global_step == 2
    assert cli.model.model[1].in_features == 784 and cli.model.model[-1].out_features == 10  # linked from data


def test_fit_writes_config_history_and_tensorboard(tmp_path, mnist_dir):
    cfg = write_config(
        tmp_path,
        mnist_dir,
        trainer={"max_epochs": 2, "limit_train_batches": 3},
        data={"val_size": 40, "label_noise": 0.1},
    )
    cli = run(["fit", "--config", cfg])
    log_dir = cli.trainer.log_dir
    files = set(os.listdir(log_dir))
    assert {"config.yaml", "history.csv", "train_labels.pt"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    with open(os.path.join(log_dir, "history.csv")) as f:
        rows = f.read().strip().splitlines()
    assert len(rows) == 3 and {"epoch", "train/loss", "train/acc", "val/acc", "gen_gap", "lr"} <= set(
        rows[0].split(",")
    )
    saved = yaml.safe_load(open(os.path.join(log_dir, "config.yaml")))
    assert saved["data"]["init_args"]["label_noise"] == 0.1


def test_timm_and_pytorch_optimizer_from_yaml(tmp_path, mnist_dir):
    for opt in (
        "pytorch_optimizer.AdaBound",
        "pytorch_optimizer.AdaShift",
        "timm.optim.Lamb",
        "torch.optim.Adagrad",
    ):
        cfg = write_config(tmp_path, mnist_dir, model={"optimizer": {"class_path": opt, "init_args": {"lr": 0.01}}})
        cli = run(["fit", "--config", cfg, "--trainer.fast_dev_run", "1"])
        assert type(cli.trainer.optimizers[0]).__name__ == opt.rsplit(".", 1)[1]


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_every_shipped_config_prints(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", path, "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: flatlit." in out


def test_unknown_config_key(tmp_path, mnist_dir, capsys):
    cfg = write_config(tmp_path, mnist_dir, data={"batchsize": 3})
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", cfg])
    assert exc.value.code == 2
    assert "batchsize" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ({"model": {"arch": "lenett"}}, "model.init_args.arch: unknown model 'lenett'. Did you mean lenet"),
        ({"data": {"label_noise": 1.5}}, r"data.init_args.label_noise: must lie in [0, 1], got 1.5"),
        ({"data": {"train_subset": 100000}}, "data.init_args.train_subset: asked for 100000 examples"),
        ({"data": {"data_dir": "/nonexistent"}}, "MNIST files"),
    ],
)
def test_bad_input_is_one_line(tmp_path, mnist_dir, capsys, override, message):
    cfg = write_config(tmp_path, mnist_dir, **override)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", cfg, "--trainer.fast_dev_run", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


# ---- --ckpt_path and resuming ------------------------------------------------------------------------------------
def fit_once(tmp_path, mnist_dir, model=None, logger="TensorBoardLogger", epochs=1):
    """A 2-step fit that keeps last.ckpt; returns its run directory."""
    trainer = {
        "max_epochs": epochs,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}],
        "logger": {
            "class_path": f"lightning.pytorch.loggers.{logger}",
            "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t"},
        },
    }
    cli = run(["fit", "--config", write_config(tmp_path, mnist_dir, model=model, trainer=trainer)])
    return cli.trainer.log_dir


def resume_error(capsys, cfg, ckpt, *extra):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", cfg, "--ckpt_path", str(ckpt), *extra])
    assert exc.value.code == 2
    return error_line(capsys)


def test_missing_ckpt_path_is_one_line(tmp_path, mnist_dir, capsys):
    missing = tmp_path / "runs" / "nope.ckpt"
    err = resume_error(capsys, write_config(tmp_path, mnist_dir), missing)
    assert f"ckpt_path: no checkpoint file at '{missing}'" in err


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unreadable_checkpoint_is_one_line(tmp_path, mnist_dir, capsys, damage):
    log_dir = fit_once(tmp_path, mnist_dir)
    last = os.path.join(log_dir, "checkpoints", "last.ckpt")
    data = open(last, "rb").read()
    with open(last, "wb") as f:
        f.write(b"" if damage == "empty" else data[: len(data) // 2])
    err = resume_error(capsys, write_config(tmp_path, mnist_dir), last)
    assert f"ckpt_path: '{last}' is not a readable checkpoint" in err
    assert "Pass another checkpoint, e.g. epoch=0-step=2.ckpt in the same folder" in err


def test_negative_max_epochs_is_one_line(tmp_path, mnist_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", write_config(tmp_path, mnist_dir), "--trainer.max_epochs", "-2"])
    assert exc.value.code == 2
    assert "flatlit: error: trainer.max_epochs: must be a non-negative integer or -1. You passed in -2" in error_line(
        capsys
    )


ADAM = {"optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}}
SGD_MOMENTUM = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}}


@pytest.mark.parametrize("stored_config", [True, False], ids=["flatlit-checkpoint", "hparams-only"])
def test_other_optimizer_than_the_checkpoint_is_refused(tmp_path, mnist_dir, capsys, stored_config):
    import torch

    last = os.path.join(fit_once(tmp_path, mnist_dir, model=SGD_MOMENTUM), "checkpoints", "last.ckpt")
    ckpt = torch.load(last, weights_only=False)
    assert "flatlit_config" in ckpt and ckpt["hyper_parameters"]["_class_path"] == "flatlit.methods.SGDFamily"
    if not stored_config:  # a checkpoint of an older flatlit or of a plain Trainer: only the optimizer state tells
        del ckpt["flatlit_config"]
        torch.save(ckpt, last)
    err = resume_error(capsys, write_config(tmp_path, mnist_dir, model=ADAM), last, "--trainer.max_epochs", "2")
    assert "model.init_args.optimizer.class_path: 'torch.optim.Adam' (checkpoint: " in err
    assert ("'torch.optim.SGD'" if stored_config else "dampening, momentum, nesterov") in err


@pytest.mark.parametrize(
    "trained, config, extra, key",
    [
        ({"arch": "lenet", "arch_kwargs": {}}, {}, [], "model.init_args.arch: 'mlp' (checkpoint: 'lenet')"),
        ({}, {}, ["--model.init_args.arch_kwargs", "{width: 32}"], "model.init_args.arch_kwargs: {'width': 32}"),
        ({}, {}, ["--model.init_args.optimizer.init_args.lr", "0.1"], "model.init_args.optimizer.init_args.lr: 0.1"),
        ({}, {}, ["--data.init_args.batch_size", "16"], "data.init_args.batch_size: 16 (checkpoint: 32)"),
    ],
    ids=["arch", "arch_kwargs", "lr", "batch_size"],
)
def test_checkpoint_does_not_override_the_config(tmp_path, mnist_dir, capsys, trained, config, extra, key):
    last = os.path.join(fit_once(tmp_path, mnist_dir, model=trained), "checkpoints", "last.ckpt")
    err = resume_error(capsys, write_config(tmp_path, mnist_dir, model=config), last, *extra)
    assert key in err and "pass the run's own config.yaml" in err


def test_sgd_config_refuses_a_sam_checkpoint(tmp_path, mnist_dir, capsys):
    log_dir = fit_once(tmp_path, mnist_dir)
    sam = yaml.safe_load(open(os.path.join(log_dir, "config.yaml")))
    sam["model"]["class_path"] = "flatlit.methods.SAM"
    path = tmp_path / "sam.yaml"
    path.write_text(yaml.safe_dump(sam))
    cli = run(["fit", "--config", str(path), "--trainer.logger.init_args.name", "sam"])
    assert type(cli.model).__name__ == "SAM"
    last = os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt")
    err = resume_error(capsys, write_config(tmp_path, mnist_dir), last)
    assert "model.class_path: 'flatlit.methods.SGDFamily' (checkpoint: 'flatlit.methods.SAM')" in err


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger"])
def test_resume_continues_the_run_directory(tmp_path, mnist_dir, logger):
    log_dir = fit_once(tmp_path, mnist_dir, logger=logger)
    config = os.path.join(log_dir, "config.yaml")
    last = os.path.join(log_dir, "checkpoints", "last.ckpt")
    # allowed on resume: trainer settings and where the data lives
    os.rename(mnist_dir, mnist_dir + "_moved")
    moved = ["--data.init_args.data_dir", mnist_dir + "_moved", "--data.init_args.num_workers", "1"]
    cli = run(["fit", "--config", config, "--ckpt_path", last, "--trainer.max_epochs", "2", *moved])
    assert cli.trainer.global_step == 4 and cli.trainer.log_dir == log_dir
    assert os.listdir(os.path.dirname(log_dir)) == [os.path.basename(log_dir)]  # no version_1
    with open(os.path.join(log_dir, "history.csv")) as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
    if logger == "CSVLogger":  # Lightning's CSV writer deletes an existing metrics.csv: the first part's rows stay
        with open(os.path.join(log_dir, "metrics.csv")) as f:
            assert sorted({r["epoch"] for r in csv.DictReader(f)}) == ["0", "1"]
