"""``flatlit landscape`` and ``flatlit robustness`` on a sequence-to-sequence checkpoint (dict batches, the task's
``training_loss``/``accuracy_inputs``): finite losses and token accuracies, the weight-noise part of robustness, and
the attacks refused (asked for) or skipped (by default) with one line each."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from flatlit.cli import main as flatlit_main
from flatlit.cli import run
from flatlit.cli.landscape import main as landscape_main
from flatlit.landscape import LandscapeResult
from tests.test_cli import error_line

SAMPLE = ["--num_samples", "24", "--batch_size", "12", "--device", "cpu"]


@pytest.fixture(scope="module")
def seq2seq_ckpt(tmp_path_factory):
    """``last.ckpt`` of a 4-step ``flatlit fit`` of a tiny Transformer on the synthetic translation task."""
    tmp = tmp_path_factory.mktemp("seq2seq_run")
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp / "runs"), "name": "s2s"},
            },
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
            ],
        },
        "model": {
            "class_path": "flatlit.tasks.Seq2SeqAdam",
            "init_args": {
                "arch": "seq2seq_transformer",
                "arch_kwargs": {
                    "d_model": 16,
                    "nhead": 2,
                    "num_encoder_layers": 1,
                    "num_decoder_layers": 1,
                    "dim_feedforward": 32,
                    "dropout": 0.1,
                },
                "label_smoothing": 0.1,
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.003}},
            },
        },
        "data": {
            "class_path": "flatlit.data.SyntheticTranslationDataModule",
            "init_args": {"num_train": 96, "num_val": 16, "num_test": 32, "max_length": 6, "batch_size": 24},
        },
    }
    path = tmp / "s2s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = run(["fit", "--config", str(path)])
    return os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt")


def test_landscape_line_and_eigen_on_a_seq2seq_checkpoint(seq2seq_ckpt, capsys):
    out = landscape_main(["--ckpt_path", seq2seq_ckpt, "--mode", "line", "--resolution", "3", *SAMPLE])
    r = LandscapeResult.load(out["results"][0])
    assert r.complete and np.isfinite(r.loss).all() and (r.loss > 0).all()
    assert np.isfinite(r.acc).all() and ((r.acc >= 0) & (r.acc <= 1)).all()  # token accuracy
    assert r.meta["num_samples"] == 24 and out["figures"]
    assert capsys.readouterr().err.count("landscape: ") == 0  # accuracy available: no note
    eig = landscape_main(
        ["--ckpt_path", seq2seq_ckpt, "--mode", "eigen", "--top_k", "1", "--alphas=-0.1:0.1:3", "--no_plot", *SAMPLE]
    )
    e = LandscapeResult.load(eig["results"][0])
    assert np.isfinite(e.loss).all() and e.meta["direction_meta"]["eigenvalues"][0] > 0


def test_landscape_origin_is_the_module_loss_on_the_sample(seq2seq_ckpt):
    from flatlit.runs import load_run

    out = landscape_main(["--ckpt_path", seq2seq_ckpt, "--alphas=-0.5:0.5:3", "--no_plot", *SAMPLE])
    r = LandscapeResult.load(out["results"][0])
    module, dm, _, _ = load_run(seq2seq_ckpt, None, torch.device("cpu"))
    dm.setup("fit")
    batches = dm.curvature_batches(24, 12, 0)
    module.eval()
    with torch.no_grad():
        total = sum(float(module.training_loss(b)[0]) * len(b["src"]) for b in batches)
    assert r.loss[1] == pytest.approx(total / 24, rel=1e-5)


ROBUST = ["--num_samples", "24", "--batch_size", "12", "--draws", "2", "--scales", "0", "0.05", "--device", "cpu"]


def test_robustness_runs_weight_noise_and_skips_the_default_attacks(seq2seq_ckpt, tmp_path, capsys):
    output = tmp_path / "robustness.json"
    flatlit_main(["robustness", "--ckpt_path", seq2seq_ckpt, "--output", str(output), *ROBUST])
    data = json.load(open(output))
    clean = data["clean"]
    assert clean["num_samples"] == 24 and math.isfinite(clean["loss"]) and 0 <= clean["acc"] <= 1
    assert len(data["weight_noise"]) == 4 and data["adversarial"] == []
    for r in data["weight_noise"]:
        assert all(math.isfinite(r[k]) for k in ("acc_mean", "acc_std", "loss_mean", "loss_std"))
        if r["scale"] == 0:
            assert (r["loss_mean"], r["acc_mean"]) == (clean["loss"], clean["acc"])
    err = capsys.readouterr().err
    skipped = [ln for ln in err.splitlines() if ln.startswith("robustness: skipped")]
    assert [ln.split(":")[1].strip().split()[-1] for ln in skipped] == ["fgsm", "pgd_linf", "pgd_l2"]
    assert all("image inputs and class logits" in ln for ln in skipped)


def test_robustness_refuses_an_asked_for_attack_in_one_line(seq2seq_ckpt, tmp_path, capsys):
    output = tmp_path / "robustness.json"
    with pytest.raises(SystemExit) as exc:
        flatlit_main(["robustness", "--ckpt_path", seq2seq_ckpt, "--output", str(output), *ROBUST, "--attacks", "fgsm"])
    assert exc.value.code == 2
    line = error_line(capsys)
    assert line.startswith("flatlit: error: --attacks: fgsm: the adversarial attacks need image inputs and class")
    assert "Seq2SeqAdam's batches are dicts with keys ['src', 'tgt']" in line
    assert not output.exists()
