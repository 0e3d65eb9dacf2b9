"""``flatlit robustness`` on a checkpoint of ``flatlit fit``: robustness.json in the documented format, the cache
(a second call computes nothing, a killed call keeps its finished entries), and one-line errors."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

import flatlit.landscape.robustness as R
from flatlit.cli import main, run
from flatlit.data import MNISTDataModule
from flatlit.runs import sha256
from flatlit.runs.robustness import sample_test_split
from tests.fakedata import make_mnist
from tests.test_cli import write_config

ARGS = ["--num_samples", "40", "--batch_size", "16", "--draws", "2", "--steps", "2"]
ARGS += ["--scales", "0", "0.05", "--eps", "0", "8/255", "--eps_l2", "0.5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step ``flatlit fit`` run (MLP with BatchNorm) on fake MNIST: its ``last.ckpt``."""
    tmp = tmp_path_factory.mktemp("robustness")
    make_mnist(str(tmp / "mnist"))
    cfg = write_config(
        tmp,
        str(tmp / "mnist"),
        model={"arch_kwargs": {"width": 8, "batch_norm": True}},
        trainer={
            "max_epochs": 1,
            "limit_train_batches": 3,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
            ],
        },
    )
    cli = run(["fit", "--config", cfg])
    return glob.glob(os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt"))[0]


def robustness(ckpt, output, *extra):
    main(["robustness", "--ckpt_path", ckpt, "--output", str(output), *ARGS, *extra])


def test_writes_the_documented_format_and_prints_a_table(trained, tmp_path, capsys):
    out = tmp_path / "robustness.json"
    robustness(trained, out)
    data = json.load(open(out))
    assert set(data) == {"version", "checkpoint", "clean", "weight_noise", "adversarial", "cache"}
    assert data["version"] == 1
    assert data["checkpoint"] == {"path": os.path.abspath(trained), "sha256": sha256(trained)}
    clean = data["clean"]
    assert set(clean) == {"acc", "loss", "num_samples"} and clean["num_samples"] == 40
    assert 0 <= clean["acc"] <= 1 and clean["loss"] > 0
    noise = data["weight_noise"]
    assert [(r["kind"], r["scale"]) for r in noise] == [(k, s) for k in R.NOISE_KINDS for s in (0.0, 0.05)]
    for r in noise:
        assert set(r) == {"kind", "scale", "draws", "acc_mean", "acc_std", "loss_mean", "loss_std"}
        assert r["draws"] == 2 and isinstance(r["draws"], int)
        if r["scale"] == 0:  # no noise: the clean numbers
            assert (r["acc_mean"], r["acc_std"], r["loss_mean"]) == (clean["acc"], 0.0, clean["loss"])
    assert noise[1]["loss_std"] > 0  # the uniform draws differ
    adv = data["adversarial"]
    expected = [("fgsm", 0.0, None), ("fgsm", 8 / 255, None), ("pgd_linf", 0.0, 2), ("pgd_linf", 8 / 255, 2)]
    assert [(r["attack"], r["eps"], r["steps"]) for r in adv] == [*expected, ("pgd_l2", 0.5, 2)]
    for r in adv:
        assert set(r) == {"attack", "eps", "steps", "clean_acc", "robust_acc", "num_samples"}
        assert r["num_samples"] == 40 and r["clean_acc"] == pytest.approx(clean["acc"], abs=1 / 40)
        assert r["robust_acc"] == r["clean_acc"] if r["eps"] == 0 else r["robust_acc"] <= r["clean_acc"]
    table = capsys.readouterr().out
    assert "clean: acc" in table and "pgd_l2" in table and "multiplicative" in table
    assert table.strip().endswith(f"written: {out}")


def test_a_second_call_is_cached_and_a_killed_call_keeps_its_finished_entries(trained, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    real, real_adv = R.weight_noise_robustness, R.adversarial_robustness
    calls = []

    def dies_on_third(*a, **k):
        calls.append(a[2:4])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(R, "weight_noise_robustness", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        robustness(trained, out)
    kept = json.load(open(out))
    assert [(r["kind"], r["scale"]) for r in kept["weight_noise"]] == [("uniform", 0.0), ("uniform", 0.05)]
    assert kept["adversarial"] == [] and len(kept["cache"]) == 3  # clean + two noise entries

    calls.clear()
    monkeypatch.setattr(R, "weight_noise_robustness", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
    robustness(trained, out)
    assert calls == [("multiplicative", 0.0), ("multiplicative", 0.05)]  # only what was missing
    full = json.load(open(out))
    assert full["weight_noise"][:2] == kept["weight_noise"]

    def fail(*a, **k):
        raise AssertionError("recomputed a cached entry")

    for name in ("accuracy_and_loss", "weight_noise_robustness", "adversarial_robustness"):
        monkeypatch.setattr(R, name, fail)
    robustness(trained, out)  # everything from the cache
    assert json.load(open(out)) == full
    # a new setting computes only its own entry; the file then lists what was asked, the cache keeps everything
    calls.clear()
    monkeypatch.setattr(R, "adversarial_robustness", lambda *a, **k: calls.append(a[2:4]) or real_adv(*a, **k))
    robustness(trained, out, "--eps_l2", "0.25", "--attacks", "pgd_l2")
    assert calls == [("pgd_l2", 0.25)]
    again = json.load(open(out))
    assert [(r["attack"], r["eps"]) for r in again["adversarial"]] == [("pgd_l2", 0.25)]
    assert again["weight_noise"] == full["weight_noise"] and len(again["cache"]) == len(full["cache"]) + 1


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("flatlit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line_naming_the_argument(trained, tmp_path, capsys):
    cases = [
        (["--attacks", "cw"], "--attacks: unknown attack 'cw'; choose from fgsm, pgd_linf, pgd_l2."),
        (["--noise", "gaussian"], "--noise: unknown noise kind 'gaussian'"),
        (["--eps", "-0.1"], "--eps: must be >= 0, got -0.1."),
        (["--eps_l2", "big"], "--eps_l2: 'big' is not a number"),
        (["--scales", "0.01", "-1"], "--scales: must be >= 0, got -1."),
        (["--draws", "0"], "--draws: must be >= 1, got 0."),
        (["--draws", "two"], "argument --draws: invalid int value: 'two'"),
        (["--num_samples", "100000"], "--num_samples: asked for 100000 test examples but the test split holds 60"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["robustness", "--ckpt_path", trained, "--output", str(tmp_path / "x.json"), *extra])
        assert exc.value.code == 2
        assert message in error_line(capsys), extra
    with pytest.raises(SystemExit):
        main(["robustness", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert "ckpt_path: no checkpoint file" in error_line(capsys)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("normalize", ["dataset", "center", "none"])
def test_the_test_sample_de_normalises_to_its_pixels(tmp_path, normalize):
    images, labels = make_mnist(str(tmp_path), n_train=240, n_test=60)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=False, normalize=normalize)
    if normalize == "center":
        with pytest.raises(RuntimeError, match="setup"):
            dm.normalization  # noqa: B018
    batches = sample_test_split(dm, 20, 8, seed=3)
    assert [len(y) for _, y in batches] == [8, 8, 4]
    pos = torch.randperm(60, generator=torch.Generator().manual_seed(3))[:20].sort().values
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(y, torch.as_tensor(labels[240:])[pos].long())
    pixels = torch.as_tensor(images[240:])[pos][:, None].float() / 255
    torch.testing.assert_close(R.to_pixels(x, dm.normalization), pixels, rtol=0, atol=1e-6)
    if normalize == "dataset":
        mean, std = dm.normalization
        assert mean.flatten().tolist() == pytest.approx([0.1307]) and std.flatten().tolist() == pytest.approx([0.3081])
        assert not torch.equal(x, pixels)
    if normalize == "none":
        assert dm.normalization is None and torch.equal(x, pixels)
