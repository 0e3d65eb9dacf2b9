"""``flatlit measure`` on a checkpoint of ``flatlit fit``: measures.json with every measure finite, the cache, a
killed call keeping its finished measures, and one-line errors."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import yaml

import flatlit.sharpness
from flatlit.cli import main, run
from flatlit.cli.measure import main as measure_main
from flatlit.sharpness import list_measures
from tests.sharpness.common import cheap
from tests.test_cli import write_config


@pytest.fixture
def trained(tmp_path, mnist_dir):
    cfg = write_config(
        tmp_path,
        mnist_dir,
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
    last = glob.glob(os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt"))[0]
    assert os.path.isfile(os.path.join(cli.trainer.log_dir, "model_init.ckpt"))
    return last


def measure(last, *extra, names=None):
    names = names or list_measures()
    settings = {n: cheap(n) for n in names if cheap(n)}
    args = ["measure", "--ckpt_path", last, "--num_samples", "40", "--batch_size", "20", "--measures", *names]
    return main([*args, "--settings", json.dumps(settings), *extra])


def test_measure_writes_finite_results_and_caches(trained, monkeypatch, capsys):
    measure(trained)
    out = os.path.join(os.path.dirname(trained), "measures.json")
    data = json.load(open(out))
    values = {r["name"]: r["value"] for r in data["results"].values()}
    assert set(values) == set(list_measures())
    # a bound says nothing (+inf) while the margin is not positive: this model trained for 3 steps only
    margin_divided = {n for n in values if n.startswith(("bound_", "spec_"))}  # spec_init/orig: Jiang eqs. 29/30
    unbounded = margin_divided if values["margin"] <= 0 else set()
    assert all(math.isfinite(v) for n, v in values.items() if n not in unbounded), values
    assert all(values[n] == math.inf for n in unbounded)
    table = capsys.readouterr().out
    assert "written:" in table and all(name in table for name in values)
    assert (f"inf: {', '.join(sorted(unbounded))} divide by the 5th-percentile margin" in table) == bool(unbounded)

    def fail(*a, **k):
        raise AssertionError("recomputed a cached measure")

    monkeypatch.setattr(flatlit.sharpness, "compute_measure", fail)
    measure(trained)  # everything from the cache
    assert json.load(open(out))["results"] == data["results"]


def test_a_killed_call_keeps_its_finished_measures(trained, monkeypatch):
    names = list_measures()[:3]
    real = flatlit.sharpness.compute_measure
    calls = []

    def dies_on_third(name, inputs, **settings):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(name, inputs, **settings)

    monkeypatch.setattr(flatlit.sharpness, "compute_measure", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        measure(trained, names=names)
    data = json.load(open(os.path.join(os.path.dirname(trained), "measures.json")))
    assert sorted(r["name"] for r in data["results"].values()) == sorted(names[:2])
    monkeypatch.setattr(flatlit.sharpness, "compute_measure", real)
    calls.clear()
    measure(trained, names=names)
    data = json.load(open(os.path.join(os.path.dirname(trained), "measures.json")))
    assert sorted(r["name"] for r in data["results"].values()) == sorted(names)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("flatlit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line(trained, tmp_path, capsys):
    cases = [
        (["--measures", "worst_case_l3"], "--measures: unknown measure 'worst_case_l3'"),
        (["--num_samples", "100000"], "--num_samples: asked for 100000"),
        (["--settings", "{no_such: {x: 1}}"], "--settings: unknown measure 'no_such'"),
    ]
    if "worst_case_l2" in list_measures():
        rho = ["--measures", "worst_case_l2", "--settings", "{worst_case_l2: {rho: -1}}", "--num_samples", "40"]
        cases.append((rho, "--settings.worst_case_l2: rho"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["measure", "--ckpt_path", trained, *extra])
        assert exc.value.code == 2
        assert message in error_line(capsys)
    other = tmp_path / "other.yaml"
    cfg = yaml.safe_load(open(os.path.join(os.path.dirname(os.path.dirname(trained)), "config.yaml")))
    cfg["model"]["init_args"]["arch_kwargs"] = {"width": 12}
    other.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["measure", "--ckpt_path", trained, "--config", str(other), "--measures", "param_norm"])
    assert "does not match the model" in error_line(capsys)


def test_preset_runs_the_papers_names_and_records_the_preset(trained, capsys):
    """``--preset``: the paper's labels, its settings, the preset recorded per entry and in the file; Jiang's step
    counts read from the run's final_metrics.json; bad input one line each."""
    run_dir = os.path.dirname(os.path.dirname(trained))
    labels = ["params", "log_prod_of_fro", "fro_dist", "step_to_0.1", "step_0.1_to_0.01"]
    args = ["measure", "--ckpt_path", trained, "--num_samples", "40", "--batch_size", "20", "--preset", "jiang2019"]
    with pytest.raises(SystemExit):  # this run has no record of its steps to loss 0.1 / 0.01
        main([*args, "--measures", *labels])
    assert "--preset jiang2019: step_to_0.1 needs the training run's record" in error_line(capsys)
    records = {"loss_milestones": {"0.1": {"epoch": 0, "step": 2}, "0.01": None}}
    with open(os.path.join(run_dir, "final_metrics.json"), "w") as f:
        json.dump(records, f)
    done = measure_main([*args[1:], "--measures", *labels])
    assert list(done) == labels
    assert done["step_to_0.1"]["value"] == 2.0 and done["step_0.1_to_0.01"]["value"] == math.inf
    assert all(math.isfinite(done[k]["value"]) for k in labels[:3])
    assert done["fro_dist"]["settings"]["weights_only"] is True and done["fro_dist"]["name"] == "distance_from_init"
    data = json.load(open(os.path.join(os.path.dirname(trained), "measures.json")))
    assert "jiang2019" in data["presets"]
    assert {e["label"] for e in data["results"].values() if e.get("preset") == "jiang2019"} == set(labels)
    # Jiang's scaling: √(v/m) of the plain squared weight distance, m = the training-set size
    plain = measure_main(
        [
            "--ckpt_path",
            trained,
            "--num_samples",
            "40",
            "--batch_size",
            "20",
            "--measures",
            "distance_from_init",
            "--settings",
            "{distance_from_init: {squared: true, weights_only: true, bn: fold}}",
        ]
    )
    m = done["fro_dist"]["extra"]["m"]
    assert done["fro_dist"]["value"] == pytest.approx(math.sqrt(plain["distance_from_init"]["value"] / m), rel=1e-12)
    cases = [
        (["--preset", "jiang2020"], "unknown preset 'jiang2020'"),
        (
            ["--preset", "jiang2019", "--settings", "{fro_dist: {weights_only: false}}"],
            "conflicts with preset jiang2019",
        ),
        (["--preset", "lpf2022", "--measures", "sharpness"], "no measure 'sharpness' in this preset"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["measure", "--ckpt_path", trained, *extra])
        assert exc.value.code == 2
        assert message in error_line(capsys)
