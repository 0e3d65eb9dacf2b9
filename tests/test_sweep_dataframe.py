"""The sweep as pandas DataFrames: :func:`flatlit.analysis.sweep_frame` equals the ``trials.csv`` that ``flatlit
analyze`` writes and the per-trial files it reads; :func:`flatlit.analysis.correlation_table` equals
``correlations.csv``, the console and an independent SciPy computation; progress of the bootstrap on stderr."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import kendalltau, spearmanr

from flatlit.analysis import correlation_table, load_sweep, sweep_frame
from flatlit.cli.analyze import main
from tests.test_analyze import KEYS, MEASURES, synthetic_trials, write_run_dirs

TARGETS = ("gen_gap_acc", "test_acc")


def read_csv(path: str) -> pd.DataFrame:
    """A CSV back as written: pandas < 3 parses floats to within an ulp unless asked for the round trip (pandas 3
    does it by default and deprecates the argument)."""
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    return pd.read_csv(path, **exact)


def final_record(trial: dict) -> dict:
    """``final_metrics.json`` as GeneralizationTargets writes it; every third trial never met its stopping rule."""
    m = trial["metrics"]
    converged = trial["i"] % 3 != 0
    return {
        **m,
        "final/gen_gap_loss": m["final/test_loss"] - m["final/train_loss"],
        "final/gen_gap_acc": m["final/train_acc"] - m["final/test_acc"],
        "epochs": 5 + trial["i"] % 4,
        "global_step": 500,
        "converged": converged,
        "converged_epoch": 3 if converged else None,
        "converged_step": 300 if converged else None,
        "num_train": 1000,
        "num_test": 200,
        "stop_loss": None,
        "stop_error": 0.01,
        "loss_milestones": {"0.1": 120, "0.01": None},
    }


@pytest.fixture
def sweep_dir(tmp_path) -> str:
    """36 run directories (config.yaml, final_metrics.json, checkpoints/measures.json) in the real formats."""
    trials = synthetic_trials()
    root = write_run_dirs(str(tmp_path / "sweep"), trials)
    for t in trials:
        with open(os.path.join(root, f"trial_{t['i']:03d}", "version_0", "final_metrics.json"), "w") as f:
            json.dump(final_record(t), f)
    return root


def test_frame_equals_the_trials_csv_written(sweep_dir, tmp_path):
    out = str(tmp_path / "out")
    main([sweep_dir, "--output", out, "--bootstrap", "0"])
    frame = sweep_frame(sweep_dir)
    path = os.path.join(out, "trials.csv")
    written = read_csv(path)
    assert list(written.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(written, frame, check_dtype=False, check_exact=True)  # full precision
    with open(path, newline="") as f:
        cells = list(csv.reader(f))[1:]
    empty = np.array([[c == "" for c in row] for row in cells])
    assert (empty == frame.isna().to_numpy()).all()  # NaN exactly where the file has an empty cell
    assert empty.any(axis=0).sum() == 2  # sam_sharpness (5 trials) and converged_epoch (12 trials)
    assert frame["measure/sam_sharpness"].isna().sum() == 5 and frame["converged_epoch"].isna().sum() == 12


def test_frame_rows_equal_the_per_trial_files(sweep_dir):
    sweep = load_sweep(sweep_dir)
    frame = sweep.frame
    assert len(frame) == 36 and frame["trial"].is_unique
    assert sweep.hparams == [c for c in frame.columns if c in KEYS.values()] and len(sweep.hparams) == 4
    metrics = ["train_loss", "train_acc", "test_loss", "test_acc", "gen_gap_acc", "gen_gap_loss"]
    for _, row in frame.iterrows():
        run = os.path.join(sweep_dir, row["run_dir"])
        assert row["trial"] == row["run_dir"] == os.path.relpath(run, sweep_dir)
        with open(os.path.join(run, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
        assert row[KEYS["lr"]] == model["optimizer"]["init_args"]["lr"]
        assert row[KEYS["width"]] == model["arch_kwargs"]["width"]
        assert row[KEYS["batch_size"]] == data["batch_size"]
        assert row["seed_everything"] == cfg["seed_everything"]
        with open(os.path.join(run, "final_metrics.json")) as f:
            final = json.load(f)
        assert [row[f"final/{m}"] for m in metrics] == [final[f"final/{m}"] for m in metrics]
        assert (row["epochs"], row["converged"]) == (final["epochs"], final["converged"])
        assert row["converged_epoch"] == final["converged_epoch"] or (
            final["converged_epoch"] is None and math.isnan(row["converged_epoch"])
        )
        with open(os.path.join(run, "checkpoints", "measures.json")) as f:
            values = {e["name"]: e["value"] for e in json.load(f)["results"].values()}
        for m in MEASURES:
            if m in values:
                assert row[f"measure/{m}"] == values[m]
            else:
                assert math.isnan(row[f"measure/{m}"])
    # what a notebook does with it
    by_width = frame.groupby(KEYS["width"])["measure/param_norm"].mean()
    assert by_width.index.tolist() == [16, 64] and by_width[64] > by_width[16]


def _granulated(frame: pd.DataFrame, measure: str, target: str, hparams: list[str]) -> tuple[dict, float]:
    """ψ per hyperparameter by the definition (mean scipy τ over the groups where only it changes) and Ψ (the mean
    over the hyperparameters that are not seeds)."""
    ok = frame[np.isfinite(frame[measure]) & np.isfinite(frame[target])]
    psi = {}
    for h in hparams:
        taus = []
        for _, g in ok.groupby([k for k in hparams if k != h]):
            if len(g) >= 2 and g[measure].nunique() > 1 and g[target].nunique() > 1:
                taus.append(kendalltau(g[measure], g[target]).statistic)
        psi[h] = float(np.mean(taus)) if taus else math.nan
    return psi, float(np.mean([v for h, v in psi.items() if "seed" not in h]))


def test_correlation_frames_equal_what_analyze_writes_and_prints_and_scipy(sweep_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    main([sweep_dir, "--output", out, "--bootstrap", "200", "--seed", "3", "--target", *TARGETS])
    printed = capsys.readouterr().out
    frame = sweep_frame(sweep_dir)
    table = correlation_table(frame, TARGETS, bootstrap=200, seed=3)
    written = read_csv(os.path.join(out, "correlations.csv"))
    pd.testing.assert_frame_equal(written, table, check_dtype=False, check_exact=True)
    assert len(table) == len(TARGETS) * len(MEASURES)
    # the console: `  <measure> <n> <τ> [<lo>, <hi>] <Ψ>` per measure, best first, per target
    summary = json.load(open(os.path.join(out, "summary.json")))
    line = re.compile(r"^  (\S+)\s+(\d+)\s+([+-]\d\.\d{3})\s+\[([+-]\d\.\d\d), ([+-]\d\.\d\d)\]\s+([+-]\d\.\d{3})$")
    shown = [m.groups() for m in map(line.match, printed.splitlines()) if m]
    expected = [
        (r.measure, str(r.n), f"{r.tau:+.3f}", f"{r.tau_lo:+.2f}", f"{r.tau_hi:+.2f}", f"{r.Psi:+.3f}")
        for r in table.itertuples()
    ]
    assert shown == expected
    for target in TARGETS:
        rows = table[table["target"] == target]
        ranking = summary["targets"][target]["ranking"]
        assert [r["measure"] for r in ranking] == rows["measure"].tolist()
        assert [r["tau"] for r in ranking] == rows["tau"].tolist()
        assert summary["targets"][target]["best"] == rows["measure"].iloc[0]
    # independently: scipy on the frame's columns, and the granulated τ by its definition
    hparams = list(KEYS.values())
    short = {KEYS[k]: k for k in KEYS}
    for r in table.itertuples():
        x, y = frame[f"measure/{r.measure}"], frame[f"final/{r.target}"]
        ok = np.isfinite(x) & np.isfinite(y)
        assert (r.n, r.missing) == (ok.sum(), (~ok).sum())
        ref = kendalltau(x[ok], y[ok])
        assert r.tau == pytest.approx(ref.statistic, abs=1e-12) and r.tau_p == pytest.approx(ref.pvalue, rel=1e-9)
        assert r.spearman == pytest.approx(spearmanr(x[ok], y[ok]).statistic, abs=1e-12)
        assert r.tau_lo <= r.tau <= r.tau_hi and r.Psi_lo <= r.Psi <= r.Psi_hi
        psi, Psi = _granulated(frame, f"measure/{r.measure}", f"final/{r.target}", hparams)
        assert r.Psi == pytest.approx(Psi, abs=1e-12)
        for h in hparams:
            assert table.loc[r.Index, f"psi/{short[h]}"] == pytest.approx(psi[h], abs=1e-12)


def test_correlation_table_from_a_notebook(sweep_dir):
    """Short names and subsets: the same numbers as the whole table, no bootstrap: no intervals."""
    frame = sweep_frame(sweep_dir)
    full = correlation_table(frame, "gen_gap_acc", bootstrap=0)
    assert full[["tau_lo", "tau_hi", "Psi_lo"]].isna().all().all()
    one = correlation_table(frame, "final/gen_gap_acc", measures=["margin"], bootstrap=0)
    pd.testing.assert_frame_equal(one, full[full["measure"] == "margin"].reset_index(drop=True))
    with pytest.raises(KeyError, match="measure/nope"):
        correlation_table(frame, "gen_gap_acc", measures=["nope"])


def test_parquet_only_with_an_engine(sweep_dir, tmp_path, monkeypatch):
    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'.")

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_parquet", no_engine)
        summary = main([sweep_dir, "--output", str(tmp_path / "a"), "--bootstrap", "0"])
    assert not any(f.endswith(".parquet") for f in os.listdir(tmp_path / "a") + summary["files"])
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pytest.skip("pyarrow is not installed (optional): the Parquet files themselves are not checked")
    summary = main([sweep_dir, "--output", str(tmp_path / "b"), "--bootstrap", "0"])
    assert {"trials.parquet", "correlations.parquet"} <= set(summary["files"])
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "b" / "trials.parquet"), sweep_frame(sweep_dir), check_dtype=False
    )


def test_bootstrap_progress_lines_in_a_log_and_a_bar_on_a_terminal(sweep_dir, tmp_path, capsys, monkeypatch):
    main([sweep_dir, "--output", str(tmp_path / "a"), "--bootstrap", "20", "--target", *TARGETS])
    err = capsys.readouterr().err.splitlines()
    steps = len(TARGETS) * len(MEASURES)
    assert len(err) == steps and err[0].startswith(f"analyze 1/{steps}: gen_gap_acc ~ ")
    assert all(re.search(r"\(20 resamples; [\d.]+ s, ETA \d+ s\)$", e) for e in err)
    main([sweep_dir, "--output", str(tmp_path / "b"), "--bootstrap", "0"])
    assert capsys.readouterr().err == ""  # nothing to wait for
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    main([sweep_dir, "--output", str(tmp_path / "c"), "--bootstrap", "20"])
    err = capsys.readouterr().err
    assert "bootstrap: 100%" in err and f"{len(MEASURES)}/{len(MEASURES)} [" in err and "analyze 1/" not in err
