"""``flatlit report`` on synthetic run directories written in the real file formats."""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
import yaml
from matplotlib.text import Text

from flatlit import figures as plots
from flatlit.analysis.checkpoint_sections import measures_table
from flatlit.analysis.render import relative_difference
from flatlit.analysis.report_sections import threshold_series
from flatlit.analysis.run_files import load_run
from flatlit.analysis.stability import stability
from flatlit.cli.report import main

STEPS_PER_EPOCH = 10


def sgd_config(lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False, scheduler: bool = False) -> dict:
    opt = {"class_path": "torch.optim.SGD", "init_args": {"lr": lr, "momentum": momentum, "nesterov": nesterov}}
    args = {"arch": "lenet", "optimizer": opt, "loss": "cross_entropy"}
    if scheduler:
        args["lr_scheduler"] = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}}
    return {"model": {"class_path": "flatlit.methods.SGDFamily", "init_args": args}, "data": {}}


def sam_config(rho: float = 0.05, lr: float = 0.1, momentum: float = 0.9) -> dict:
    cfg = sgd_config(lr, momentum)
    cfg["model"]["class_path"] = "flatlit.methods.SAM"
    cfg["model"]["init_args"]["rho"] = rho
    return cfg


def measures_json(values: dict[str, float]) -> dict:
    results = {}
    for name, value in values.items():
        sample = {"batch_size": 250, "num_samples": 1000, "seed": 0}
        key = json.dumps({"measure": name, "sample": sample, "settings": {"bn": "eval"}}, sort_keys=True)
        entry = dict(name=name, value=value, std_error=None, cost={}, settings={"bn": "eval"}, extra={}, seconds=1.0)
        results[key] = {**entry, "sample": sample}
    return {"version": 1, "checkpoint": {"path": "/x/checkpoints/last.ckpt", "sha256": "0"}, "results": results}


ROBUSTNESS = {
    "version": 1,
    "checkpoint": {"path": "last.ckpt"},
    "clean": {"acc": 0.9, "loss": 0.3, "num_samples": 1000},
    "weight_noise": [
        dict(kind="uniform", scale=s, draws=5, acc_mean=0.9 - 20 * s, acc_std=0.01, loss_mean=0.3, loss_std=0.01)
        for s in (0.001, 0.003, 0.01)
    ],
    "adversarial": [
        {"attack": "fgsm", "eps": 0.03, "steps": 1, "clean_acc": 0.9, "robust_acc": 0.4, "num_samples": 500},
        {"attack": "pgd_linf", "eps": 0.03, "steps": 10, "clean_acc": 0.9, "robust_acc": 0.2, "num_samples": 500},
    ],
}


def make_run(root, name: str, config: dict | None, lrs=(0.1, 0.1, 0.1, 0.1), scale: float = 1.0, full: bool = True):
    """A run directory like `flatlit fit` writes: history.csv (epoch −1 row + 4 epochs), eigenvalues.npz, a spectrum,
    config.yaml and, with ``full``, checkpoints/measures.json and checkpoints/robustness.json."""
    d = root / name / "version_0"
    (d / "checkpoints").mkdir(parents=True)
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    lines = ["epoch,step,train/loss,train/acc,val/loss,val/acc,lr,hessian/trace,hessian/trace_se,sharpness/sam"]
    lines.append("-1,0,,,,,,50.0,5.0,")
    for e, lr in enumerate(lrs):
        loss = 2.0 / (e + 1)
        lines.append(
            f"{e},{(e + 1) * STEPS_PER_EPOCH},{loss},{0.5 + 0.1 * e},{loss * 1.1},{0.45 + 0.1 * e},{lr},"
            f"{scale * (60 + 10 * e)},4.0,{0.1 * (e + 1)}"
        )
    (d / "history.csv").write_text("\n".join(lines) + "\n")
    steps = np.arange(0, 4 * STEPS_PER_EPOCH + 1, 5)
    eig = scale * np.stack([10 + steps, 8 + 0.5 * steps, 5 + 0.2 * steps], axis=1).astype(float)
    np.savez(d / "eigenvalues.npz", step=steps, epoch=steps // STEPS_PER_EPOCH, eigenvalues=eig, residuals=eig * 0)
    grid = np.linspace(-5, 60, 128)
    density = np.exp(-0.5 * grid**2) / 2.5 + 1e-3 * np.exp(-0.5 * (grid - 50) ** 2)
    np.savez(d / "spectrum_step40.npz", grid=grid, density=density, nodes=grid[:4], weights=np.ones(4) / 4)
    if full:
        values = {"sam_sharpness": 2.0 * scale, "hessian_trace": 0.0 if scale == 1 else 1.0, "margin": -1.0 * scale}
        (d / "checkpoints" / "measures.json").write_text(json.dumps(measures_json(values)))
        (d / "checkpoints" / "robustness.json").write_text(json.dumps(ROBUSTNESS))
    return d


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def referenced(page: str) -> set[str]:
    return set(re.findall(r'<img alt="([^"]+\.png)"', page)) | set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page))


def test_single_run_page_lists_every_figure_at_its_size(tmp_path):
    run = make_run(tmp_path, "sgd", sgd_config(lr=0.1, momentum=0.9))
    out = tmp_path / "out"
    page_path = main([str(run), "--output", str(out)])
    assert page_path == str(out / "report.html")
    page = open(page_path, encoding="utf-8").read()
    pngs = {f for f in os.listdir(out) if f.endswith(".png")}
    expected = "loss_accuracy eigenvalues hessian_trace spectrum measures_training robustness_weight_noise"
    assert pngs == {f"{name}.png" for name in (*expected.split(), "robustness_adversarial")}
    assert referenced(page) == pngs  # every figure is on the page, embedded as base64
    assert page.count("data:image/png;base64,") == len(pngs)
    sizes = {name: png_size(str(out / name)) for name in pngs}
    assert sizes["loss_accuracy.png"] == (round(plots.WIDE[0] * plots.DPI), round(plots.WIDE[1] * plots.DPI))
    eig = plots.LEGEND_RIGHT
    assert sizes["eigenvalues.png"] == (round(eig[0] * plots.DPI), round(eig[1] * plots.DPI))
    for name in ("hessian_trace.png", "spectrum.png", "robustness_weight_noise.png"):
        assert sizes[name] == (round(plots.SINGLE[0] * plots.DPI), round(plots.SINGLE[1] * plots.DPI)), name
    assert "(2+2β)/η = 38" in page  # 3.8 / 0.1
    assert "SGD lr=0.1" in page
    assert re.search(r'class="note">Note: No landscapes/\*\.npz for: SGD lr=0\.1', page)  # the missing piece


def test_threshold_from_config_plain_momentum_nesterov_adaptive():
    plain = stability(sgd_config(lr=0.1))
    assert plain.factor / plain.lr == pytest.approx(2 / 0.1)
    heavy = stability(sgd_config(lr=0.05, momentum=0.9))
    assert heavy.formula == "(2+2β)/η" and heavy.factor / heavy.lr == pytest.approx((2 + 2 * 0.9) / 0.05)
    nest = stability(sgd_config(lr=0.05, momentum=0.9, nesterov=True))
    assert nest.factor / nest.lr == pytest.approx((2 + 2 * 0.9) / (0.05 * (1 + 2 * 0.9)))
    sam = stability(sam_config(lr=0.1, momentum=0.5))
    assert sam.factor / sam.lr == pytest.approx(3.0 / 0.1) and "base optimizer" in sam.explanation
    adam = sgd_config()
    adam["model"]["init_args"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}
    st = stability(adam)
    assert st.factor is None and "adaptive" in st.explanation


def test_threshold_line_drawn_at_2_over_lr(tmp_path):
    run = load_run(str(make_run(tmp_path, "sgd", sgd_config(lr=0.1, momentum=0.9))))
    th, caption = threshold_series(run, stability(run.config))
    assert th.constant and float(th.values[0]) == pytest.approx(38.0) and "= 38" in caption
    fig = plots.eigen_figure([plots.Eigen(run.label, *run.eigen, th)])
    lines = [ln for ln in fig.axes[0].get_lines() if str(ln.get_label()).startswith("(2+2β)/η")]
    assert len(lines) == 1 and np.allclose(lines[0].get_ydata(), 38.0)


def test_scheduled_lr_gives_a_step_curve(tmp_path):
    lrs = (0.1, 0.05, 0.025, 0.0125)
    run = load_run(str(make_run(tmp_path, "sched", sgd_config(lr=0.1, scheduler=True), lrs=lrs)))
    th, caption = threshold_series(run, stability(run.config))
    assert not th.constant and "(t)" in caption
    assert np.allclose(th.values, [2 / lr for lr in lrs])
    assert np.allclose(th.steps, [0, 10, 20, 30])  # epoch e's lr applies from the end of epoch e−1


def test_two_runs_side_by_side_measures_and_relative_difference(tmp_path):
    a = make_run(tmp_path, "sgd", sgd_config(lr=0.1))
    b = make_run(tmp_path, "sam", sam_config(rho=0.05), scale=1.5)
    out = tmp_path / "cmp"
    page = open(main([str(a), str(b), "--output", str(out), "--format", "markdown"]), encoding="utf-8").read()
    header, rows = measures_table([load_run(str(a)), load_run(str(b))])
    assert header == ["measure", "SGD lr=0.1", "SAM ρ=0.05", "Δ SAM ρ=0.05 vs SGD lr=0.1"]
    table = {r[0]: r[1:] for r in rows}
    assert table["sam_sharpness"] == ["2", "3", "+50 %"]  # (3 − 2)/|2|
    assert table["margin"] == ["-1", "-1.5", "-50 %"]  # (−1.5 − (−1))/|−1|
    assert table["hessian_trace"][2] == "—"  # reference 0: no relative difference
    assert relative_difference(2.0, 3.0) == pytest.approx(0.5) and relative_difference(float("inf"), 1.0) is None
    assert "| sam_sharpness | 2 | 3 | +50 % |" in page
    assert referenced(page) == {f for f in os.listdir(out) if f.endswith(".png")}
    assert "SGD lr=0.1" in page and "SAM ρ=0.05" in page


def test_missing_pieces_are_skipped_with_a_note(tmp_path):
    d = tmp_path / "bare" / "version_0"
    d.mkdir(parents=True)
    (d / "history.csv").write_text("epoch,step,train/loss,train/acc,val/loss,val/acc\n0,10,1.0,0.5,1.1,0.45\n")
    out = tmp_path / "out"
    page = open(main([str(d), "--output", str(out), "--format", "markdown"]), encoding="utf-8").read()
    assert {f for f in os.listdir(out) if f.endswith(".png")} == {"loss_accuracy.png"}
    for what in ("Hessian eigenvalues", "hessian/trace", "spectrum_step", "measures.json", "robustness", "landscapes"):
        assert re.search(rf"Note:\*\* No [^\n]*{re.escape(what)}", page), what


def test_unreadable_file_is_a_note_not_a_crash(tmp_path):
    run = make_run(tmp_path, "sgd", sgd_config(), full=False)
    (run / "eigenvalues.npz").write_bytes(b"not a zip")
    (run / "checkpoints" / "measures.json").write_text("{broken")
    page = open(main([str(run), "--output", str(tmp_path / "o"), "--format", "markdown"]), encoding="utf-8").read()
    assert "eigenvalues.npz: unreadable" in page and "measures.json: unreadable" in page


@pytest.mark.parametrize("kind", ["missing", "not_a_run"])
def test_bad_run_dir_is_one_line_naming_it(tmp_path, capsys, kind):
    bad = tmp_path / "nowhere"
    if kind == "not_a_run":
        bad.mkdir()
    good = make_run(tmp_path, "sgd", sgd_config(), full=False)
    with pytest.raises(SystemExit) as exc:
        main([str(good), str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flatlit: error: ") and str(bad) in err


def test_labels_count_must_match(tmp_path, capsys):
    run = make_run(tmp_path, "sgd", sgd_config(), full=False)
    with pytest.raises(SystemExit):
        main([str(run), "--labels", "a", "b"])
    assert "--labels" in capsys.readouterr().err


def test_figures_are_deterministic_and_readable(tmp_path):
    run = make_run(tmp_path, "sgd", sgd_config(lr=0.1, momentum=0.9))
    first = main([str(run), "--output", str(tmp_path / "a")])
    second = main([str(run), "--output", str(tmp_path / "b")])
    assert open(first, "rb").read() == open(second, "rb").read()
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # every text of a figure is at least MIN_FONT_PT at the saved size, and every axes has labels and a title
    r = load_run(str(run))
    th, _ = threshold_series(r, stability(r.config))
    fig = plots.eigen_figure([plots.Eigen(r.label, *r.eigen, th), plots.Eigen("other", r.eigen[0], r.eigen[1] * 2)])
    fig.canvas.draw()
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text()]
    assert sizes and min(sizes) >= plots.MIN_FONT_PT
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() and ax.get_legend() is not None


def test_landscapes_drawn_and_overlaid(tmp_path):
    # flatlit's own modules: a broken import must fail here, not skip (the report would only leave a note)
    import flatlit.figures.landscape  # noqa: F401
    from flatlit.landscape import surface

    runs = [make_run(tmp_path, n, sgd_config(), full=False) for n in ("a", "b")]
    alphas = np.linspace(-1, 1, 5)
    for k, run in enumerate(runs):
        meta = {
            "mode": "line",
            "checkpoints": [str(run / "checkpoints" / "last.ckpt")],
            "num_samples": 100,
            "bn": "eval",
        }
        surface.LandscapeResult(
            alphas, np.zeros(0), 0.2 + (k + 1) * alphas**2, 0.9 - 0.1 * alphas**2, np.ones(5, bool), meta
        ).save(str(run / "landscapes" / f"line_last_{k}.npz"))
    out = tmp_path / "out"
    page = open(main([str(r) for r in runs] + ["--output", str(out)]), encoding="utf-8").read()
    pngs = {f for f in os.listdir(out) if f.startswith("landscape_")}
    assert pngs == {"landscape_run1_line_last_0.png", "landscape_run2_line_last_1.png", "landscape_overlay_1_line.png"}
    assert referenced(page) >= pngs
