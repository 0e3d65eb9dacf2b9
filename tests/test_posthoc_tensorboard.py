"""``flatlit measure``, ``robustness`` and ``landscape`` write their results into the run's own TensorBoard: read back
with TensorBoard's EventAccumulator, every scalar equals the results file at the documented tag and step, the
figures are there as images, a rerun (cache hit) leaves one value per tag, and a run without TensorBoard gets its
JSON plus one stderr line."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import DEFAULT_SIZE_GUIDANCE, EventAccumulator

from flatlit.cli import main, run
from flatlit.landscape import LandscapeResult
from flatlit.runs.load import run_dir
from tests.fakedata import make_mnist
from tests.test_cli import write_config

SAMPLE = ["--num_samples", "40", "--batch_size", "20"]
ROBUSTNESS = [*SAMPLE, "--draws", "2", "--steps", "2", "--scales", "0", "0.05", "--eps", "0", "8/255"]
ROBUSTNESS += ["--eps_l2", "0.5"]
MEASURES = ["--measures", "param_norm", "average_sharpness", "margin"]
MEASURES += ["--settings", json.dumps({"average_sharpness": {"draws": 4}, "avg3": {"measure": "average_sharpness"}})]


def _fit(tmp, logger=None) -> str:
    make_mnist(str(tmp / "mnist"))
    trainer = {
        "max_epochs": 1,
        "limit_train_batches": 3,
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}],
    }
    if logger:
        trainer["logger"] = {"class_path": logger, "init_args": {"save_dir": str(tmp / "runs"), "name": "c"}}
    cfg = write_config(
        tmp, str(tmp / "mnist"), model={"arch_kwargs": {"width": 8, "batch_norm": True}}, trainer=trainer
    )
    cli = run(["fit", "--config", cfg])
    return os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``last.ckpt`` of a 3-step fit with a TensorBoardLogger (an MLP with BatchNorm on fake MNIST)."""
    return _fit(tmp_path_factory.mktemp("posthoc_tb"))


def board(ckpt: str) -> EventAccumulator:
    """Everything TensorBoard reads from the checkpoint's run directory (training and post-hoc files)."""
    acc = EventAccumulator(run_dir(ckpt), size_guidance=dict.fromkeys(DEFAULT_SIZE_GUIDANCE, 0))
    return acc.Reload()


def scalars(acc: EventAccumulator, prefix: str) -> dict[str, list[tuple[int, float]]]:
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith(prefix)}


def images(acc: EventAccumulator, prefix: str) -> dict[str, list]:
    return {t: acc.Images(t) for t in acc.Tags()["images"] if t.startswith(prefix)}


def posthoc_files(ckpt: str, command: str) -> list[str]:
    return glob.glob(os.path.join(run_dir(ckpt), f"events.out.tfevents.*.flatlit-{command}"))


def close(a: float, b: float) -> bool:
    """Equal up to float32 rounding (TensorBoard's scalars are float32); inf and nan equal themselves."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or a == pytest.approx(b, rel=1e-6)


def global_step(ckpt: str) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def test_measure_scalars_equal_measures_json_once_per_tag(trained):
    main(["measure", "--ckpt_path", trained, *SAMPLE, *MEASURES])
    step = global_step(trained)
    assert step == 3
    data = json.load(open(os.path.join(os.path.dirname(trained), "measures.json")))
    by_label = {r.get("label", r["name"]): r for r in data["results"].values()}
    assert set(by_label) == {"param_norm", "average_sharpness", "margin", "avg3"}
    expected = {f"measures/{k}": r["value"] for k, r in by_label.items()}
    expected.update({f"measures/{k}_se": r["std_error"] for k, r in by_label.items() if r["std_error"] is not None})
    assert {"measures/average_sharpness_se", "measures/avg3_se"} <= set(expected)
    assert "measures/param_norm_se" not in expected
    for _ in range(2):  # the second call reads every value from the cache: still one value per tag
        got = scalars(board(trained), "measures/")
        assert set(got) == set(expected)
        for tag, value in expected.items():
            assert len(got[tag]) == 1 and got[tag][0][0] == step and close(got[tag][0][1], value), (tag, got[tag])
        assert len(posthoc_files(trained, "measure")) == 1
        assert scalars(board(trained), "train/")  # the training's own scalars are still there
        main(["measure", "--ckpt_path", trained, *SAMPLE, *MEASURES])
    # a call with fewer labels keeps the others' values (still one each) and rewrites its own
    main(["measure", "--ckpt_path", trained, *SAMPLE, "--measures", "param_norm"])
    got = scalars(board(trained), "measures/")
    assert set(got) == set(expected) and all(len(v) == 1 for v in got.values())
    assert len(posthoc_files(trained, "measure")) == 1


def test_a_leftover_second_file_is_merged_without_duplicates(trained):
    """A call killed between writing its file and deleting the previous one leaves two; the next call merges."""
    main(["measure", "--ckpt_path", trained, *SAMPLE, "--measures", "param_norm", "margin"])
    (path,) = posthoc_files(trained, "measure")
    stem, _, suffix = path.rpartition(".flatlit-")
    shutil.copy(path, f"{stem}9.flatlit-{suffix}")
    main(["measure", "--ckpt_path", trained, *SAMPLE, "--measures", "param_norm"])
    got = scalars(board(trained), "measures/")
    assert {"measures/param_norm", "measures/margin"} <= set(got)
    assert all(len(v) == 1 for v in got.values()), got
    assert len(posthoc_files(trained, "measure")) == 1


def test_robustness_scalars_and_figures(trained, tmp_path):
    out = tmp_path / "robustness.json"
    args = ["robustness", "--ckpt_path", trained, "--output", str(out), *ROBUSTNESS]
    main(args)
    data = json.load(open(out))
    step = global_step(trained)
    expected = {"robustness/clean/acc": data["clean"]["acc"], "robustness/clean/loss": data["clean"]["loss"]}
    for e in data["weight_noise"]:
        tag = f"robustness/{e['kind']}_noise/scale_{e['scale']:g}"
        expected.update({f"{tag}/acc": e["acc_mean"], f"{tag}/acc_std": e["acc_std"], f"{tag}/loss": e["loss_mean"]})
    for e in data["adversarial"]:
        expected[f"robustness/{e['attack']}/eps_{e['eps']:g}/acc"] = e["robust_acc"]
    assert len(data["weight_noise"]) == 4 and len(data["adversarial"]) == 5  # 2 kinds × 2 scales; fgsm/pgd_linf × 2
    assert "robustness/uniform_noise/scale_0.05/acc" in expected and "robustness/pgd_l2/eps_0.5/acc" in expected
    for _ in range(2):  # the second call is a cache hit: one value per tag
        acc = board(trained)
        got = scalars(acc, "robustness/")
        assert set(got) == set(expected)
        for tag, value in expected.items():
            assert len(got[tag]) == 1 and got[tag][0][0] == step and close(got[tag][0][1], value), (tag, got[tag])
        figures = images(acc, "robustness/")
        assert set(figures) == {"robustness/weight_noise", "robustness/adversarial"}
        for events in figures.values():
            assert len(events) == 1 and events[0].step == step and events[0].width > 100 and events[0].height > 100
            assert events[0].encoded_image_string.startswith(b"\x89PNG")
        assert len(posthoc_files(trained, "robustness")) == 1
        main(args)


def test_landscape_curve_and_figures(trained):
    main(["landscape", "--ckpt_path", trained, "--mode", "line", "--resolution", "5", *SAMPLE])
    (npz,) = glob.glob(os.path.join(run_dir(trained), "landscapes", "line_last_*.npz"))
    r = LandscapeResult.load(npz)
    assert r.complete and np.isfinite(r.acc).all()
    step = global_step(trained)
    for _ in range(2):  # the second call finds the file complete: one value per tag and step
        acc = board(trained)
        got = scalars(acc, "landscape/")
        assert set(got) == {"landscape/line/loss", "landscape/line/alpha", "landscape/line/acc"}
        for name, values in (("loss", r.loss), ("alpha", r.alphas), ("acc", r.acc)):
            series = got[f"landscape/line/{name}"]
            assert [s for s, _ in series] == list(range(5))
            assert all(close(v, float(x)) for (_, v), x in zip(series, values)), (name, series, values)
        (line,) = images(acc, "landscape/").values()
        assert len(line) == 1 and line[0].step == step
        assert line[0].encoded_image_string == open(npz[:-4] + ".png", "rb").read()
        main(["landscape", "--ckpt_path", trained, "--mode", "line", "--resolution", "5", *SAMPLE])
    # another line (3 points) replaces the whole curve: no stale points 3 and 4; a plane adds its two figures
    main(["landscape", "--ckpt_path", trained, "--mode", "line", "--resolution", "3", *SAMPLE])
    main(["landscape", "--ckpt_path", trained, "--mode", "plane", "--resolution", "3", *SAMPLE])
    acc = board(trained)
    assert [s for s, _ in scalars(acc, "landscape/line/loss")["landscape/line/loss"]] == [0, 1, 2]
    assert "landscape/plane/loss" not in acc.Tags()["scalars"]  # a plane is no curve
    figures = images(acc, "landscape/")
    assert set(figures) == {"landscape/line", "landscape/plane", "landscape/plane_3d"}
    assert all(len(v) == 1 for v in figures.values())
    assert len(posthoc_files(trained, "landscape")) == 1


def test_a_run_without_tensorboard_gets_json_and_one_line(tmp_path, capsys):
    ckpt = _fit(tmp_path, logger="lightning.pytorch.loggers.CSVLogger")
    folder = run_dir(ckpt)
    assert os.path.isfile(os.path.join(folder, "metrics.csv"))
    capsys.readouterr()
    main(["measure", "--ckpt_path", ckpt, *SAMPLE, "--measures", "param_norm"])
    main(["robustness", "--ckpt_path", ckpt, *SAMPLE, "--noise", "--attacks"])
    main(["landscape", "--ckpt_path", ckpt, "--mode", "line", "--resolution", "3", "--no_plot", *SAMPLE])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "TensorBoard" in ln]
    (npz,) = glob.glob(os.path.join(folder, "landscapes", "*.npz"))
    assert lines == [
        f"flatlit {cmd}: no TensorBoard event files in {folder} (the run had no TensorBoardLogger); wrote {f} only."
        for cmd, f in (
            ("measure", "measures.json"),
            ("robustness", "robustness.json"),
            ("landscape", os.path.basename(npz)),
        )
    ]
    assert not glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)
    assert os.path.isfile(os.path.join(folder, "checkpoints", "measures.json"))
    assert os.path.isfile(os.path.join(folder, "checkpoints", "robustness.json"))
