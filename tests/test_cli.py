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
