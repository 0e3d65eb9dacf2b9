"""``flatlit analyze`` and :mod:`flatlit.analysis.stats` on synthetic sweeps written in the real file formats."""

from __future__ import annotations

import csv
import itertools
import json
import os
import struct

import numpy as np
import pytest
import yaml
from matplotlib.text import Text
from scipy.stats import kendalltau, spearmanr

from flatlit import figures as plots
from flatlit.analysis import stats
from flatlit.analysis.correlation import analyze_target
from flatlit.analysis.sweep_report import analyze
from flatlit.analysis.sweep_table import load_sweep
from flatlit.cli.analyze import main
from flatlit.figures.correlation import psi_figure, scatter_figure, tau_figure

MEASURES = ("lpf_sharpness", "hessian_trace", "param_norm", "margin", "sam_sharpness")
LR, BS, WIDTH, SEEDS = (0.1, 0.03, 0.01), (32, 128, 512), (16, 64), (0, 1)
KEYS = {
    "lr": "model.init_args.optimizer.init_args.lr",
    "batch_size": "data.init_args.batch_size",
    "width": "model.init_args.arch_kwargs.width",
    "seed_everything": "seed_everything",
}


def measures_json(values: dict[str, float], settings: dict | None = None) -> dict:
    """A ``measures.json`` as ``flatlit measure`` writes it."""
    results = {}
    sample = {"batch_size": 250, "num_samples": 1000, "seed": 0}
    for name, value in values.items():
        s = settings or {"bn": "eval"}
        key = json.dumps({"measure": name, "sample": sample, "settings": s}, sort_keys=True)
        entry = dict(name=name, value=value, std_error=None, cost={}, settings=s, extra={}, seconds=1.0)
        results[key] = {**entry, "sample": sample}
    return {"version": 1, "checkpoint": {"path": "/x/checkpoints/last.ckpt", "sha256": "0"}, "results": results}


def config(lr: float, bs: int, width: int, seed: int, name: str) -> dict:
    """A run's ``config.yaml`` (the parts that matter; the logger name differs per run and is no hyperparameter)."""
    opt = {"class_path": "torch.optim.SGD", "init_args": {"lr": lr, "momentum": 0.9}}
    return {
        "seed_everything": seed,
        "trainer": {"max_epochs": 3, "logger": {"class_path": "x", "init_args": {"save_dir": "runs", "name": name}}},
        "model": {
            "class_path": "flatlit.methods.SGDFamily",
            "init_args": {"arch": "mlp", "arch_kwargs": {"width": width}, "optimizer": opt},
        },
        "data": {"class_path": "flatlit.data.FashionMNISTDataModule", "init_args": {"batch_size": bs}},
    }


def synthetic_trials(seed: int = 0) -> list[dict]:
    """36 trials of a 3 × 3 × 2 × 2 grid: the gap grows with batch size and falls with lr; lpf_sharpness and
    hessian_trace (spanning decades) follow it, margin falls with it, param_norm follows the width only, and
    sam_sharpness is noise, missing for 5 trials."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (lr, bs, width, s) in enumerate(itertools.product(LR, BS, WIDTH, SEEDS)):
        gap = 0.02 + 0.05 * np.log10(bs / 32) - 0.03 * np.log10(lr / 0.01) + 0.01 * rng.normal()
        train_acc = 0.99 + 0.005 * rng.random()
        values = {
            "lpf_sharpness": 0.01 + 0.2 * gap + 0.003 * rng.normal(),
            "hessian_trace": 10 ** (1 + 20 * gap + 0.4 * rng.normal()),
            "param_norm": 10 + width * 0.3 + rng.normal(),
            "margin": 5 - 30 * gap + rng.normal(),
            "sam_sharpness": 0.001 + 0.01 * rng.random(),
        }
        if i % 7 == 3:
            del values["sam_sharpness"]
        metrics = {
            "final/train_loss": 0.05,
            "final/train_acc": train_acc,
            "final/test_loss": 0.05 + 3 * gap,
            "final/test_acc": train_acc - gap,
        }
        out.append(dict(i=i, lr=lr, bs=bs, width=width, seed=s, metrics=metrics, measures=values))
    return out


def write_run_dirs(root: str, trials: list[dict]) -> str:
    """The fallback layout: one run directory per trial with config.yaml, final_metrics.json, measures.json."""
    for t in trials:
        d = os.path.join(root, f"trial_{t['i']:03d}", "version_0")
        os.makedirs(os.path.join(d, "checkpoints"))
        with open(os.path.join(d, "config.yaml"), "w") as f:
            yaml.safe_dump(config(t["lr"], t["bs"], t["width"], t["seed"], f"t{t['i']}"), f)
        with open(os.path.join(d, "final_metrics.json"), "w") as f:
            json.dump(t["metrics"], f)
        with open(os.path.join(d, "checkpoints", "measures.json"), "w") as f:
            json.dump(measures_json(t["measures"]), f)
    return root


@pytest.fixture
def sweep_dir(tmp_path) -> str:
    return write_run_dirs(str(tmp_path / "sweep"), synthetic_trials())


# ---- statistics -----------------------------------------------------------------------------------------------
def test_kendall_and_spearman_match_scipy_with_ties_and_nan():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, 40).astype(float)  # many ties
    y = x + rng.integers(-3, 4, 40)
    x[[2, 11]] = np.nan
    y[5] = np.inf  # non-finite values are left out pairwise
    ok = np.isfinite(x) & np.isfinite(y)
    ref = kendalltau(x[ok], y[ok])
    assert stats.kendall_tau(x, y) == pytest.approx(ref.statistic, abs=1e-12)
    assert stats.kendall_p(x, y) == pytest.approx(ref.pvalue, rel=1e-9)
    assert stats.spearman_rho(x, y) == pytest.approx(spearmanr(x[ok], y[ok]).statistic, abs=1e-12)
    # the weighted pair sums behind the bootstrap are τ-b of the resampled multiset, ties and duplicates included
    w = stats.resample_weights(40, 6, seed=1)
    boot = stats.weighted_group_tau(x, y, stats.all_pairs(40), w)[:, 0]
    for r in range(6):
        idx = np.repeat(np.arange(40), w[r].astype(int))
        idx = idx[ok[idx]]
        assert boot[r] == pytest.approx(kendalltau(x[idx], y[idx]).statistic, abs=1e-12)
    assert np.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3]))  # constant: undefined, not 0


def test_granulated_tau_hand_computed_grid():
    """A 3 (lr) × 2 (bs) grid by hand.

    lr varies within bs=A: x 1,2,3 vs y 1,2,3 -> τ = 1; within bs=B: x 4,5,6 vs y 0,6,5 -> (2 − 1)/3 = 1/3;
    ψ_lr = 2/3. bs varies within lr=1: (1,1) vs (4,0) -> −1; lr=2: (2,2) vs (5,6) -> +1; lr=3: (3,3) vs (6,5) -> +1;
    ψ_bs = 1/3. Ψ = 1/2. Overall: y = 1,2,3,0,6,5 has 4 inversions among 15 pairs -> τ = (11 − 4)/15 = 7/15.
    """
    hp = {"lr": [1, 2, 3, 1, 2, 3], "bs": ["A", "A", "A", "B", "B", "B"]}
    x = [1.0, 2, 3, 4, 5, 6]
    y = [1.0, 2, 3, 0, 6, 5]
    g = stats.granulated_tau(x, y, hp)
    assert g.psi == pytest.approx({"lr": 2 / 3, "bs": 1 / 3})
    assert g.groups == {"lr": 2, "bs": 3}
    assert g.Psi == pytest.approx(0.5)
    assert stats.kendall_tau(x, y) == pytest.approx(7 / 15)
    assert kendalltau(x, y).statistic == pytest.approx(7 / 15)
    # a missing measure (trial 6) leaves out its pairs: lr within B -> (4,0),(5,6): +1, so ψ_lr = 1;
    # bs at lr=3 has one trial left, so ψ_bs averages 2 groups: (−1 + 1)/2 = 0
    g = stats.granulated_tau([1.0, 2, 3, 4, 5, np.nan], y, hp)
    assert g.psi == pytest.approx({"lr": 1.0, "bs": 0.0})
    assert g.groups == {"lr": 2, "bs": 2}
    c = stats.correlate([1.0, 2, 3, 4, 5, np.nan], y, hp, bootstrap=0)
    assert c.n == 5 and c.granulated.Psi == pytest.approx(0.5)
    # a nuisance key (the seed) keeps its ψ but Ψ averages the other keys only
    g = stats.granulated_tau(x, y, hp, nuisance=["bs"])
    assert g.psi == pytest.approx({"lr": 2 / 3, "bs": 1 / 3}) and g.Psi == pytest.approx(2 / 3)
    c = stats.correlate(x, y, hp, bootstrap=200, seed=0, nuisance=["bs"])
    assert c.granulated.Psi == pytest.approx(2 / 3) and c.Psi_ci[0] <= 2 / 3 <= c.Psi_ci[1]


def test_seeds_are_nuisance_keys():
    from flatlit.analysis.correlation import nuisance_keys

    keys = ["seed_everything", "data.init_args.subset_seed", "model.init_args.optimizer.init_args.lr"]
    assert nuisance_keys(keys) == keys[:2]


def test_granulated_tau_matches_scipy_group_loop():
    rng = np.random.default_rng(7)
    rows = list(itertools.product([0.1, 0.01, 0.001], [32, 128, 512], [True, False], [0, 1]))
    hp = {k: [r[i] for r in rows] for i, k in enumerate(("lr", "bs", "skip", "seed"))}
    x = rng.normal(size=len(rows))
    y = x + rng.normal(size=len(rows))
    x[4] = np.nan
    g = stats.granulated_tau(x, y, hp)
    for name in hp:
        others = [k for k in hp if k != name]
        groups: dict[tuple, list[int]] = {}
        for i in range(len(rows)):
            groups.setdefault(tuple(hp[k][i] for k in others), []).append(i)
        taus = []
        for members in groups.values():
            m = [i for i in members if np.isfinite(x[i])]
            if len(m) >= 2:
                taus.append(kendalltau(x[m], y[m]).statistic)
        assert g.psi[name] == pytest.approx(np.mean(taus), abs=1e-12)
        assert g.groups[name] == len(taus)
    assert g.Psi == pytest.approx(np.mean(list(g.psi.values())))


def test_bootstrap_interval_contains_estimate_and_is_seeded(monkeypatch):
    rng = np.random.default_rng(0)
    rows = list(itertools.product(range(4), range(3), range(3)))
    hp = {k: [r[i] for r in rows] for i, k in enumerate(("a", "b", "c"))}
    x = rng.normal(size=len(rows))
    y = 0.7 * x + rng.normal(size=len(rows))
    c = stats.correlate(x, y, hp, bootstrap=500, seed=3)
    for est, (lo, hi) in ((c.tau, c.tau_ci), (c.rho, c.rho_ci), (c.granulated.Psi, c.Psi_ci)):
        assert lo <= est <= hi and lo < hi
    for k in hp:
        lo, hi = c.psi_ci[k]
        assert lo <= c.granulated.psi[k] <= hi
    again = stats.correlate(x, y, hp, bootstrap=500, seed=3)
    assert (again.tau_ci, again.rho_ci, again.Psi_ci, again.psi_ci) == (c.tau_ci, c.rho_ci, c.Psi_ci, c.psi_ci)
    other = stats.correlate(x, y, hp, bootstrap=500, seed=4)
    assert other.tau_ci != c.tau_ci
    # the large-n path (scipy per resample) gives the same intervals as the vectorised pair sums
    monkeypatch.setattr(stats, "_MAX_PAIRS", 0)
    assert stats.correlate(x, y, hp, bootstrap=500, seed=3).tau_ci == pytest.approx(c.tau_ci, abs=1e-12)


# ---- reading sweeps and writing the tables --------------------------------------------------------------------
def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_trials_table_one_row_per_trial_with_columns(sweep_dir, tmp_path):
    out = str(tmp_path / "out")
    summary = analyze(sweep_dir, ["gen_gap_acc", "test_acc"], out, bootstrap=200, seed=0)
    rows = _read_csv(os.path.join(out, "trials.csv"))
    assert len(rows) == 36
    header = list(rows[0])
    metrics = [
        f"final/{m}" for m in ("train_loss", "train_acc", "test_loss", "test_acc", "gen_gap_acc", "gen_gap_loss")
    ]
    assert header[0] == "trial" and header.index("run_dir") == 5
    assert sorted(header[1:5]) == sorted(KEYS.values())  # the logger name differs per run but is no hyperparameter
    assert header[6:12] == metrics
    assert header[12:] == sorted(f"measure/{m}" for m in MEASURES)
    trials = synthetic_trials()
    by_trial = {r["trial"]: r for r in rows}
    for t in trials:
        r = by_trial[f"trial_{t['i']:03d}/version_0"]
        assert float(r[KEYS["lr"]]) == t["lr"] and int(r[KEYS["batch_size"]]) == t["bs"]
        gap = t["metrics"]["final/train_acc"] - t["metrics"]["final/test_acc"]
        assert float(r["final/gen_gap_acc"]) == pytest.approx(gap, rel=1e-5)
        assert (r["measure/sam_sharpness"] == "") == ("sam_sharpness" not in t["measures"])
    md = open(os.path.join(out, "trials.md")).read()
    assert md.count("\n| trial_") == 36
    corr = _read_csv(os.path.join(out, "correlations.csv"))
    assert len(corr) == 2 * len(MEASURES)
    first = [r for r in corr if r["target"] == "gen_gap_acc"]
    assert [abs(float(r["tau"])) for r in first] == sorted((abs(float(r["tau"])) for r in first), reverse=True)
    sam = next(r for r in first if r["measure"] == "sam_sharpness")
    assert (sam["n"], sam["missing"]) == ("31", "5")
    assert {"psi/lr", "groups/lr", "Psi_lo", "spearman_hi", "tau_p"} <= set(sam)
    assert summary["targets"]["gen_gap_acc"]["best"] == first[0]["measure"] == "lpf_sharpness"
    text = open(os.path.join(out, "correlations.md")).read()
    assert "**lpf_sharpness ranks gen_gap_acc best**" in text and "31 (5 missing)" in text
    # the table's τ is the one scipy computes on the trials' values
    x = np.array([float(r["measure/hessian_trace"]) for r in rows])
    y = np.array([float(r["final/gen_gap_acc"]) for r in rows])
    hess = next(r for r in first if r["measure"] == "hessian_trace")
    assert float(hess["tau"]) == pytest.approx(kendalltau(x, y).statistic, abs=1e-5)
    assert json.load(open(os.path.join(out, "summary.json")))["trials"] == 36


def test_sweep_files_jsonl_and_csv(tmp_path):
    trials = synthetic_trials()
    runs = write_run_dirs(str(tmp_path / "jsonl" / "runs"), trials)
    root = os.path.dirname(runs)
    with open(os.path.join(root, "trials.jsonl"), "w") as f:
        for t in trials:
            rec = {
                "trial": t["i"],
                "status": "completed",
                "params": {KEYS["lr"]: t["lr"], KEYS["batch_size"]: t["bs"], "seed_everything": t["seed"]},
                "run_dir": f"runs/trial_{t['i']:03d}/version_0",  # metrics and measures read from here
            }
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"trial": 99, "status": "running", "params": {KEYS["lr"]: 1.0}}) + "\n")
    sweep = load_sweep(root)
    assert sweep.source == "trials.jsonl" and len(sweep.frame) == 36  # the running trial is skipped
    assert set(sweep.hparams) == {KEYS["lr"], KEYS["batch_size"], "seed_everything"}
    assert np.isfinite(sweep.column("measure/lpf_sharpness")).all()
    assert any("not finished" in n for n in sweep.notes)

    root = str(tmp_path / "csv")
    os.makedirs(root)
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:  # a hand-written table with a status column
        w = csv.writer(f)
        w.writerow(["trial", "status", KEYS["lr"], "data.init_args.augment", "final/train_acc", "final/test_acc"])
        w.writerows([[0, "completed", 0.1, "none", 0.99, 0.9], [1, "completed", 0.01, "none", 0.98, 0.95]])
        w.writerow([2, "failed", 0.001, "none", "", ""])
    sweep = load_sweep(root)
    assert sweep.frame["trial"].tolist() == [0, 1]
    assert sweep.hparams == [KEYS["lr"]]  # augment never changes: a setting of the sweep, not a hyperparameter
    assert sweep.column("final/gen_gap_acc") == pytest.approx([0.09, 0.03])


def test_results_csv_of_flatlit_sweep(tmp_path):
    """The table `flatlit sweep` writes (its own writer), with GeneralizationTargets' final_metrics.json."""
    pytest.importorskip("optuna")
    from optuna.trial import TrialState, create_trial

    from flatlit.sweeps.spec import expand, load_spec
    from flatlit.sweeps.study import write_results

    base = tmp_path / "base.yaml"
    base.write_text("seed_everything: 0\n")
    grid = {KEYS["lr"]: list(LR), KEYS["batch_size"]: list(BS), KEYS["width"]: list(WIDTH), "seed_everything": [0, 1]}
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"config": "base.yaml", "grid": grid, "measures": list(MEASURES)}, sort_keys=False)
    )
    spec = load_spec(str(sweep_file), output=str(tmp_path / "out"))
    trials, data = expand(spec), synthetic_trials()
    ids, latest = {}, {}
    for t, d in zip(trials, data):
        assert (t.params[KEYS["lr"]], t.params["seed_everything"]) == (d["lr"], d["seed"])  # same order
        tid = ids[t.index] = f"trial-{t.index:04d}"
        run_dir = os.path.join(spec.output, "trials", tid)
        os.makedirs(os.path.join(run_dir, "checkpoints"))
        final = {**d["metrics"], "epochs": 7, "global_step": 70, "converged": d["i"] != 5, "converged_epoch": 6}
        with open(os.path.join(run_dir, "final_metrics.json"), "w") as f:
            json.dump(final, f)
        with open(os.path.join(run_dir, "checkpoints", "measures.json"), "w") as f:
            json.dump(measures_json(d["measures"]), f)
        latest[tid] = create_trial(state=TrialState.COMPLETE, value=0.9, user_attrs={"seconds": 1.0})
    del latest["trial-0007"]  # still running: no row
    write_results(spec, trials, ids, latest)
    sweep = load_sweep(spec.output)
    assert sweep.source == "results.csv" and len(sweep.frame) == 35
    assert sweep.hparams == list(grid)
    assert sweep.measures == sorted(f"measure/{m}" for m in MEASURES)
    assert sweep.info == ["epochs", "converged", "converged_epoch"]
    assert all(m.startswith("final/") and "step" not in m for m in sweep.metrics)
    assert sweep.frame["run_dir"][0] == os.path.join("trials", "trial-0000")  # relative to the sweep, as in trials.csv
    assert np.isnan(sweep.column("measure/sam_sharpness")).sum() == 5
    s = analyze(spec.output, ["gen_gap_acc"], str(tmp_path / "a"), bootstrap=20, converged_only=True)
    assert s["trials"] == 34 and any("never converged" in n for n in s["notes"])


def test_measure_with_several_settings_gets_one_column_each(tmp_path):
    root = str(tmp_path / "s")
    for i, rho in enumerate((0.05, 0.05, 0.1, 0.1)):
        d = os.path.join(root, f"r{i}")
        os.makedirs(os.path.join(d, "checkpoints"))
        with open(os.path.join(d, "config.yaml"), "w") as f:
            yaml.safe_dump(config(0.1 * (i + 1), 32, 16, 0, f"r{i}"), f)
        with open(os.path.join(d, "final_metrics.json"), "w") as f:
            json.dump({"train_acc": 1.0, "test_acc": 0.9 - 0.01 * i}, f)
        with open(os.path.join(d, "checkpoints", "measures.json"), "w") as f:
            json.dump(measures_json({"worst_case_l2": 0.1 * i}, {"bn": "eval", "rho": rho}), f)
    sweep = load_sweep(root)
    assert sweep.measures == ["measure/worst_case_l2[rho=0.05]", "measure/worst_case_l2[rho=0.1]"]
    assert np.isfinite(sweep.column("measure/worst_case_l2[rho=0.1]")).sum() == 2


def test_average_over_seeds(sweep_dir, tmp_path):
    s = analyze(sweep_dir, ["gen_gap_acc"], str(tmp_path / "o"), bootstrap=50, average=["seed_everything"])
    assert s["points"] == 18 and s["trials"] == 36
    corr = _read_csv(str(tmp_path / "o" / "correlations.csv"))
    assert "psi/seed_everything" not in corr[0] and corr[0]["groups/lr"] == "6"


# ---- figures --------------------------------------------------------------------------------------------------
def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_figures_exist_are_readable_and_labelled(sweep_dir, tmp_path):
    out = str(tmp_path / "figs")
    analyze(sweep_dir, ["gen_gap_acc"], out, bootstrap=100)
    for name in ("scatter_gen_gap_acc.png", "tau_gen_gap_acc.png", "psi_gen_gap_acc.png"):
        w, h = _png_size(os.path.join(out, name))
        assert w >= 600 and h >= 300
    sweep = load_sweep(sweep_dir)
    res = analyze_target(sweep.frame, sweep.hparams, sweep.measures, "final/gen_gap_acc", 50, 0)
    names = {h: h.split(".")[-1] for h in sweep.hparams}
    lr = KEYS["lr"]
    figs = [scatter_figure(sweep.frame, res, lr, names), tau_figure(res), psi_figure(res, names)]
    cont = sweep.frame.assign(cont=[t["i"] * 1.0 + 1 for t in synthetic_trials()])  # > 10 colour values: a colour bar
    figs.append(scatter_figure(cont, res, "cont", {**names, "cont": "cont"}))
    for fig in figs:
        fig.canvas.draw()
        sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text()]
        assert sizes and min(sizes) >= plots.MIN_FONT_PT
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_xlabel() and ax.get_title()
    assert figs[0].legends and "colour: lr" in figs[0].legends[0].get_title().get_text()
    assert not figs[-1].legends  # the continuous hue has a colour bar
    tau_ax = figs[1].axes[0]
    assert tau_ax.get_yticklabels()[0].get_text() == "lpf_sharpness"  # best at the top
    assert any(ax.get_xscale() == "log" for ax in figs[0].axes)  # hessian_trace spans decades


def test_sweep_files_are_valid():
    """experiments/sweeps/*.yaml: their base configs exist, their measures and settings are registered, and the
    LPF-SGD grid has the paper's 2,916 runs."""
    from flatlit.sharpness import get_measure

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "sweeps")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".yaml"))
    assert len(files) >= 10
    sizes = {}
    for name in files:
        with open(os.path.join(folder, name)) as f:
            sweep = yaml.safe_load(f)
        assert os.path.isfile(os.path.join(folder, sweep["config"])), name
        assert str(sweep["output"]).startswith("../../runs/sweeps/"), name
        for measure, settings in sweep["measures"].items():
            assert set(settings) <= set(get_measure(measure).defaults), (name, measure)
        sizes[name] = int(np.prod([len(v) for v in sweep["grid"].values()]))
    assert sizes["lpf_sgd_grid.yaml"] == 2916 and sizes["fashion_mnist_small.yaml"] == 24
    assert sizes["cs439_fmnist.yaml"] == sizes["cs439_cifar10.yaml"] == 36


# ---- errors and the CLI ---------------------------------------------------------------------------------------
def _one_line_error(capsys, args: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flatlit: error: "), err
    for n in needles:
        assert n in err
    return err


def test_bad_input_is_one_line(tmp_path, sweep_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, [str(empty)], "SWEEP_DIR", "no finished trials")
    _one_line_error(capsys, [str(tmp_path / "nope")], "SWEEP_DIR", "not a directory")
    _one_line_error(capsys, [sweep_dir, "--target", "gap"], "--target", "gen_gap_acc")
    _one_line_error(capsys, [sweep_dir, "--color_by", "momentum"], "--color_by", "lr")
    _one_line_error(capsys, [sweep_dir, "--measures", "nope"], "--measures", "lpf_sharpness")
    _one_line_error(capsys, [sweep_dir, "--bootstrap", "-1"], "--bootstrap")
    _one_line_error(capsys, [sweep_dir, "--bootstrap", "many"], "--bootstrap")


def test_cli_subcommand(sweep_dir, tmp_path, capsys):
    from flatlit.cli import main as cli_main

    out = str(tmp_path / "cli")
    cli_main(["analyze", sweep_dir, "--output", out, "--bootstrap", "20", "--measures", "lpf_sharpness", "margin"])
    text = capsys.readouterr().out
    assert "best: lpf_sharpness" in text and f"written: {os.path.abspath(out)}" in text
    assert len(_read_csv(os.path.join(out, "correlations.csv"))) == 2


def test_a_folder_that_is_not_a_sweep_is_one_line_and_nothing_written(tmp_path, capsys):
    """`flatlit analyze DIR` on one run's directory (or a folder holding a single run) is not a sweep: exit code 2,
    one line naming the folder and what a sweep folder holds, and no analysis written."""
    from flatlit.cli import main as cli_main

    root = write_run_dirs(str(tmp_path / "runs"), synthetic_trials()[:1])
    run_dir = os.path.join(root, "trial_000", "version_0")
    for folder in (run_dir, os.path.join(root, "trial_000")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["analyze", folder, "--bootstrap", "0"])
        assert exc.value.code != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"flatlit: error: SWEEP_DIR {folder!r}: not a sweep"), err
        assert "trials.jsonl" in err and "results.csv" in err and "run directories" in err
        assert not os.path.exists(os.path.join(folder, "analysis"))
