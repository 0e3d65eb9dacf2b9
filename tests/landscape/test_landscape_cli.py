"""``flatlit landscape`` on checkpoints of a tiny ``flatlit fit`` run: every mode writes its results and figures,
a rerun resumes, interpolation ends equal the checkpoints, and bad input is one line naming the argument."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from torch import nn

import flatlit.landscape.surface
from flatlit.cli import main as flatlit_main
from flatlit.cli import run
from flatlit.cli.landscape import main
from flatlit.landscape import LandscapeResult, random_directions, save_directions
from tests.fakedata import make_mnist
from tests.test_cli import error_line, write_config

SAMPLE = ["--num_samples", "40", "--batch_size", "20"]


@pytest.fixture(scope="module")
def run_ckpts(tmp_path_factory):
    """(last.ckpt, model_init.ckpt) of a 3-step fit of a BatchNorm MLP on fake MNIST."""
    tmp = tmp_path_factory.mktemp("landscape_run")
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
    log_dir = cli.trainer.log_dir
    return os.path.join(log_dir, "checkpoints", "last.ckpt"), os.path.join(log_dir, "model_init.ckpt")


def test_line_writes_results_and_figure_and_resumes(run_ckpts, monkeypatch, capsys):
    last, _ = run_ckpts
    out = main(["--ckpt_path", last, "--mode", "line", "--resolution", "5", *SAMPLE])
    (path,) = out["results"]
    run_dir = os.path.dirname(os.path.dirname(last))
    assert os.path.dirname(path) == os.path.join(run_dir, "landscapes") and os.path.basename(path).startswith(
        "line_last_"
    )
    assert out["figures"] == [path[:-4] + ".png"] and os.path.isfile(out["figures"][0])
    assert os.path.isfile(path[:-4] + ".directions.pt")
    r = LandscapeResult.load(path)
    assert r.complete and r.loss.shape == (5,) and len(r.betas) == 0 and np.isfinite(r.acc).all()
    m = r.meta
    assert m["mode"] == "line" and m["checkpoints"] == [os.path.abspath(last)] and m["bn"] == "eval"
    assert m["normalisation"] == "filter" and m["num_samples"] == 40 and m["sample_seed"] == 0
    assert m["labels"]["alpha"] == "α (filter-normalised direction)"
    assert f"written: {path}" in capsys.readouterr().out

    def fail(*a, **k):
        raise AssertionError("re-evaluated a finished point")

    monkeypatch.setattr(flatlit.landscape.surface, "evaluate", fail)
    again = flatlit_main(["landscape", "--ckpt_path", last, "--mode", "line", "--resolution", "5", *SAMPLE])
    assert again is None and np.array_equal(LandscapeResult.load(path).loss, r.loss)


def test_plane_and_interpolation_ends(run_ckpts):
    last, init = run_ckpts
    plane = main(["--ckpt_path", last, "--mode", "plane", "--resolution", "3", "--no_plot", *SAMPLE])
    p = LandscapeResult.load(plane["results"][0])
    assert p.loss.shape == (3, 3) and p.complete and plane["figures"] == []
    common = ["--alphas", "0:1:2", "--no_plot", *SAMPLE]
    at_last = LandscapeResult.load(main(["--ckpt_path", last, "--mode", "line", *common])["results"][0])
    at_init = LandscapeResult.load(main(["--ckpt_path", init, "--mode", "line", *common])["results"][0])
    res = main(["--ckpt_path", init, "--ckpt_path", last, "--mode", "interpolate", *common])
    r = LandscapeResult.load(res["results"][0])
    assert r.meta["bn"] == "interpolate" and r.meta["labels"]["alpha"] == "interpolation α (0 = A, 1 = B)"
    assert r.loss[0] == at_init.loss[0] and r.loss[1] == at_last.loss[0]  # α = 0 is A, α = 1 is B, bit for bit
    assert r.acc[1] == at_last.acc[0]


def test_directions_file_labels_come_from_the_file_not_the_flags(run_ckpts, tmp_path):
    """--directions FILE: the normalisation (and bias_bn) recorded and the axis labels are the file's; the flags'
    --norm/--bias_bn (default filter/ignore) describe nothing here. A file that does not record its normalisation
    is labelled 'unknown/as saved'."""
    last, _ = run_ckpts
    common = ["--alphas", "0:1:2", "--no_plot", *SAMPLE]
    flags = ["--norm", "layer", "--bias_bn", "filter", "--output", str(tmp_path / "layer.npz")]
    made = main(["--ckpt_path", last, "--mode", "plane", *flags, *common])
    layer_file = str(tmp_path / "layer.directions.pt")
    saved = torch.load(layer_file, map_location="cpu", weights_only=True)
    assert saved["normalisation"] == "layer"  # stored in the file
    assert LandscapeResult.load(made["results"][0]).meta["normalisation"] == "layer"

    out = main(["--ckpt_path", last, "--mode", "line", "--directions", layer_file, *common])
    m = LandscapeResult.load(out["results"][0]).meta
    assert m["normalisation"] == "layer" and m["bias_bn"] == "filter"
    assert m["labels"] == {"alpha": "α (layer-normalised direction)"}
    out = main(["--ckpt_path", last, "--mode", "plane", "--directions", layer_file, *common])
    m = LandscapeResult.load(out["results"][0]).meta
    assert m["labels"] == {"alpha": "α (layer-normalised direction 1)", "beta": "β (layer-normalised direction 2)"}

    bare = dict(saved)  # a direction file that does not say how it was normalised
    del bare["normalisation"]
    bare["meta"] = {"seed": 0}
    bare_file = str(tmp_path / "bare.pt")
    torch.save(bare, bare_file)
    n = sum(t.numel() for t in saved["vectors"][0])
    eig_file = str(tmp_path / "eigenvectors_step7.pt")  # the HessianEigenvalues callback's format
    vectors = torch.randn(2, n, generator=torch.Generator().manual_seed(0))
    torch.save(vectors / vectors.norm(dim=1, keepdim=True), eig_file)
    for source in (bare_file, eig_file):
        out = main(["--ckpt_path", last, "--mode", "line", "--directions", source, *common])
        m = LandscapeResult.load(out["results"][0]).meta
        assert m["normalisation"] == "unknown/as saved", source
        assert "filter" not in m["labels"]["alpha"] and "unknown/as saved" in m["labels"]["alpha"], source


def test_eigen_mode_writes_a_line_per_eigenvector(run_ckpts):
    last, _ = run_ckpts
    out = main(["--ckpt_path", last, "--mode", "eigen", "--top_k", "2", "--alphas", "-0.2:0.2:3", *SAMPLE])
    assert len(out["results"]) == 2 and len(out["figures"]) == 3
    e1, e2 = (LandscapeResult.load(p) for p in out["results"])
    lams = e1.meta["eigenvalues"]
    assert len(lams) == 2 and lams[0] >= lams[1] and e1.meta["eigen_index"] == 1 and e2.meta["eigen_index"] == 2
    assert e1.meta["direction_kind"] == "eigen" and e1.complete and e2.complete


@pytest.fixture(scope="module")
def bad_files(run_ckpts, tmp_path_factory):
    last, _ = run_ckpts
    tmp = tmp_path_factory.mktemp("bad")
    other = str(tmp / "other_dirs.pt")
    save_directions(random_directions(nn.Sequential(nn.Flatten(), nn.Linear(784, 10))), other)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    key = next(k for k, v in ckpt["state_dict"].items() if v.dim() == 2)
    ckpt["state_dict"][key] = torch.zeros(3, 3)
    wider = str(tmp / "wider.ckpt")
    torch.save(ckpt, wider)
    return {"other_dirs": other, "wider": wider, "key": key}


BAD = [
    (["--mode", "interpolate"], "--ckpt_path: --mode interpolate needs two checkpoints"),
    (["--mode", "line", "--resolution", "1"], "--resolution: must be >= 2, got 1."),
    (["--mode", "line", "--alphas", "0.5:0.5:11"], "--alphas: empty range '0.5:0.5:11'"),
    (["--mode", "line", "--alphas", "-1:1:1"], "--alphas: empty range '-1:1:1': the number of points n must be >= 2"),
    (["--mode", "line", "--alphas", "-0.3:0.02:0.31"], "--alphas: expected a:b:n"),
    (["--mode", "plane", "--betas", "0:0:3"], "--betas: empty range"),
    (["--mode", "line", "--bn", "interpolate"], "--bn: 'interpolate' applies to --mode interpolate only"),
    (
        ["--mode", "line", "--directions", "{other_dirs}"],
        "--directions: direction file '{other_dirs}' was made for another model",
    ),
    (["--mode", "interpolate", "--ckpt_path", "{wider}"], "--ckpt_path: '{wider}' does not fit the model of"),
    (["--mode", "line", "--num_samples", "100000"], "--num_samples: asked for 100000"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_one_line_naming_the_argument(run_ckpts, bad_files, capsys, args, message):
    last, _ = run_ckpts
    args = [a.format(**bad_files) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt_path", last, *SAMPLE, *args, "--no_plot"])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert line.startswith("flatlit: error: " + message.format(**bad_files)), line
    if "wider" in args[-1]:
        assert repr(bad_files["key"]) in line  # names the first mismatching entry


def test_other_arguments_for_an_existing_file(run_ckpts, tmp_path, capsys):
    last, _ = run_ckpts
    out = str(tmp_path / "mine.npz")
    main(["--ckpt_path", last, "--resolution", "2", "--output", out, "--no_plot", *SAMPLE])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--ckpt_path", last, "--resolution", "2", "--output", out, "--seed", "1", "--no_plot", *SAMPLE])
    line = error_line(capsys)
    assert line.startswith(f"flatlit: error: --output: {out!r} holds a landscape computed with other arguments (")
    assert "--recompute" in line
    fresh = main(
        ["--ckpt_path", last, "--resolution", "2", "--output", out, "--seed", "1", "--recompute", "--no_plot", *SAMPLE]
    )
    assert LandscapeResult.load(fresh["results"][0]).meta["sample_seed"] == 1
    assert glob.glob(str(tmp_path / "mine.directions.pt"))
