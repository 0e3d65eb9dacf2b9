"""Reading a shared checkpoint or run directory never runs code from it (``flatlit.utils.safe_loading``).

A checkpoint whose unpickling would create a file and a run whose ``config.yaml`` names ``subprocess.Popen`` as the
model: ``measure``, ``landscape``, ``robustness``, ``report`` and ``fit --ckpt_path`` create nothing and stop with one
line naming the file and ``--trust_code``; with the flag, a legitimate checkpoint of an older flatlit (NumPy objects in
it) still loads.
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from flatlit.cli import main, run
from flatlit.utils.safe_loading import (
    UntrustedFileError,
    check_config_classes,
    is_trusted_class_path,
    load_checkpoint,
    trust_packages,
)
from tests.test_cli import write_config


class _Trap:
    """Unpickling this object opens (creates) ``marker`` for writing: code from the file running on load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run of ``flatlit fit`` (its run directory and last.ckpt)."""
    from tests.fakedata import make_mnist

    tmp = tmp_path_factory.mktemp("run")
    mnist = tmp / "mnist"
    make_mnist(str(mnist))
    trainer = {
        "max_steps": 2,
        "limit_val_batches": 1,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}],
    }
    cli = run(["fit", "--config", write_config(tmp, str(mnist), trainer=trainer)])
    return cli.trainer.log_dir, os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt"), str(mnist)


def copy_run(trained, tmp_path) -> tuple[str, str]:
    folder = str(tmp_path / "shared_run")
    shutil.copytree(trained[0], folder)
    return folder, os.path.join(folder, "checkpoints", "last.ckpt")


def poison_checkpoint(ckpt_path: str, marker: str) -> None:
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["extra"] = _Trap(marker)
    torch.save(ckpt, ckpt_path)


def poison_config(folder: str, marker: str) -> None:
    path = os.path.join(folder, "config.yaml")
    cfg = yaml.safe_load(open(path))
    cfg["model"] = {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", marker]}}
    yaml.safe_dump(cfg, open(path, "w"))


def commands(folder: str, ckpt: str) -> dict[str, list[str]]:
    sample = ["--num_samples", "8", "--batch_size", "8"]
    config = os.path.join(folder, "config.yaml")
    return {
        "measure": ["measure", "--ckpt_path", ckpt, "--measures", "param_norm", *sample],
        "landscape": ["landscape", "--ckpt_path", ckpt, "--mode", "line", "--alphas", "-1:1:3", *sample],
        "robustness": ["robustness", "--ckpt_path", ckpt, "--noise", "uniform", "--scales", "0.01", "--draws", "1",
                       "--num_samples", "8"],
        "fit": ["fit", "--config", config, "--ckpt_path", ckpt, "--trainer.max_steps", "3"],
    }  # fmt: skip


def one_error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("flatlit: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", ["measure", "landscape", "robustness", "fit"])
def test_a_checkpoint_that_would_run_code_is_refused(trained, tmp_path, capsys, command):
    folder, ckpt = copy_run(trained, tmp_path)
    marker = str(tmp_path / "pwned")
    poison_checkpoint(ckpt, marker)
    argv = commands(folder, ckpt)[command]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert not os.path.exists(marker)
    line = one_error_line(capsys)
    assert ckpt in line and "--trust_code" in line and "io.open" in line


@pytest.mark.parametrize("command", ["measure", "landscape", "robustness"])
def test_a_config_naming_any_class_is_refused(trained, tmp_path, capsys, command):
    folder, ckpt = copy_run(trained, tmp_path)
    marker = str(tmp_path / "pwned")
    poison_config(folder, marker)
    with pytest.raises(SystemExit) as exc:
        main(commands(folder, ckpt)[command])
    assert exc.value.code == 2
    assert not os.path.exists(marker)
    line = one_error_line(capsys)
    assert "config.yaml" in line and "subprocess.Popen" in line and "--trust_code" in line


def test_report_reads_a_poisoned_run_without_running_it(trained, tmp_path):
    """``flatlit report`` reads only CSV, JSON, NPZ (no pickles) and YAML (safe loader) from a run directory."""
    folder, ckpt = copy_run(trained, tmp_path)
    marker = str(tmp_path / "pwned")
    poison_checkpoint(ckpt, marker)
    poison_config(folder, marker)
    torch.save({"state_dict": {}, "extra": _Trap(marker)}, os.path.join(folder, "model_init.ckpt"))
    main(["report", folder, "--output", str(tmp_path / "report")])
    assert not os.path.exists(marker)
    assert glob.glob(str(tmp_path / "report" / "report.*"))


def test_validate_refuses_a_checkpoint_naming_an_untrusted_class(trained, tmp_path, capsys):
    """Lightning builds ``validate``/``test`` models from the checkpoint's saved ``_class_path``."""
    folder, ckpt = copy_run(trained, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["_class_path"] = "subprocess.Popen"
    torch.save(state, ckpt)
    with pytest.raises(SystemExit):
        main(["validate", "--config", os.path.join(folder, "config.yaml"), "--ckpt_path", ckpt])
    line = one_error_line(capsys)
    assert "subprocess.Popen" in line and "--trust_code" in line


def old_checkpoint(trained, tmp_path) -> tuple[str, str]:
    """A legitimate checkpoint of an older flatlit: NumPy's RNG state stored as NumPy objects, not tensors."""
    folder, ckpt = copy_run(trained, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    state["numpy_rng"] = np.random.RandomState(0).get_state()
    torch.save(state, ckpt)
    return folder, ckpt


def test_trust_code_loads_an_old_checkpoint(trained, tmp_path, capsys):
    folder, ckpt = old_checkpoint(trained, tmp_path)
    argv = commands(folder, ckpt)["measure"]
    with pytest.raises(SystemExit):
        main(argv)
    assert "numpy" in one_error_line(capsys)
    from flatlit.cli.measure import main as measure

    results = measure([*argv[1:], "--trust_code"])
    assert np.isfinite(results["param_norm"]["value"])


def test_fit_resumes_an_old_checkpoint_with_trust_code(trained, tmp_path):
    folder, ckpt = old_checkpoint(trained, tmp_path)
    cli = run([*commands(folder, ckpt)["fit"], "--trust_code"])
    assert cli.trainer.global_step == 3


def test_a_damaged_file_is_not_called_untrusted(tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(b"\x80\x02}q\x00(X")  # a pickle cut short
    with pytest.raises(Exception) as exc:
        load_checkpoint(str(path))
    assert not isinstance(exc.value, UntrustedFileError)


def test_allowlist(monkeypatch):
    assert is_trusted_class_path("torch.optim.SGD") and is_trusted_class_path("flatlit.methods.SAM")
    assert is_trusted_class_path("SAM")  # jsonargparse's short name: among already imported subclasses
    assert not is_trusted_class_path("subprocess.Popen") and not is_trusted_class_path("torchx.Evil")
    config = {"model": {"class_path": "mylab.models.Net", "init_args": {"arch": {"class_path": "os.system"}}}}
    with pytest.raises(UntrustedFileError, match=r"mylab\.models\.Net, os\.system"):
        check_config_classes(config, "config.yaml")
    check_config_classes(config, "config.yaml", trust=True)
    monkeypatch.setenv("FLATLIT_TRUSTED_PACKAGES", "mylab, os")
    check_config_classes(config, "config.yaml")
    monkeypatch.delenv("FLATLIT_TRUSTED_PACKAGES")
    monkeypatch.setattr("flatlit.utils.safe_loading._EXTRA", [])
    trust_packages("mylab", "os")
    check_config_classes(config, "config.yaml")
