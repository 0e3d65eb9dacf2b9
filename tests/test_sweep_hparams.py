"""A sweep in TensorBoard's HParams dashboard: every finished trial's run directory holds its swept hyperparameters,
the final metrics and measures as scalars of the experiment's metric tags, once; no ``hp_metric = -1`` placeholder in
any run; the progress bar of ``flatlit sweep`` on a terminal.

Trials are real ``flatlit fit`` + ``flatlit measure`` processes on the fake MNIST (width-8 MLPs, 1 epoch of 2 batches).
"""

from __future__ import annotations

import csv
import glob
import json
import os

import pytest
import yaml
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups, metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from flatlit.cli import run
from flatlit.cli.sweep import main
from flatlit.sweeps.driver import Sweep, SweepOptions
from flatlit.sweeps.hparams import SUFFIX
from flatlit.sweeps.spec import expand, load_spec
from flatlit.sweeps.study import read_measures
from tests.test_sweep import base_config, sweep_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL = (
    "final/train_loss",
    "final/train_acc",
    "final/test_loss",
    "final/test_acc",
    "final/gen_gap_acc",
    "final/gen_gap_loss",
)
TAGS = [*FINAL, "measures/param_norm"]
KEYS = ["seed_everything", "model.init_args.arch_kwargs", "model.init_args.optimizer.init_args.lr"]
EVERYTHING = {"scalars": 0, "tensors": 0, "histograms": 0, "images": 0, "audio": 0, "compressedHistograms": 0}


@pytest.fixture(autouse=True)
def _from_the_repository(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT)
    monkeypatch.chdir(ROOT)


def accumulator(run_dir: str) -> EventAccumulator:
    acc = EventAccumulator(run_dir, size_guidance=EVERYTHING)
    acc.Reload()
    return acc


def plugin_data(acc: EventAccumulator) -> dict[str, HParamsPluginData]:
    return {tag: HParamsPluginData.FromString(c) for tag, c in acc.PluginTagToContent("hparams").items()}


def all_tags(acc: EventAccumulator) -> list[str]:
    return [t for tags in acc.Tags().values() if isinstance(tags, list) for t in tags]


def hparam(value) -> object:
    return getattr(value, value.WhichOneof("kind"))


def results(output: str) -> dict[str, dict[str, str]]:
    with open(os.path.join(output, "results.csv")) as f:
        return {r["trial"]: r for r in csv.DictReader(f)}


def hparams_files(run_dir: str) -> list[str]:
    return glob.glob(os.path.join(run_dir, f"*tfevents*{SUFFIX}"))


def the_sweep(tmp_path, mnist_dir) -> str:
    """2 trials (seeds 0, 1; one random lr; a dict-valued key) with the param_norm measure."""
    base = base_config(tmp_path, mnist_dir)
    space = {"model.init_args.optimizer.init_args.lr": {"low": 0.01, "high": 0.1}}
    return sweep_file(
        tmp_path,
        base,
        grid={"seed_everything": [0, 1], "model.init_args.arch_kwargs": [{"width": 8}]},
        random={"num_trials": 1, "seed": 0, "space": space},
        measures=["param_norm"],
        num_samples=64,
    )


def dashboard(logdir: str) -> tuple[api_pb2.Experiment, dict[str, tuple[dict, dict]]]:
    """What the HParams tab of ``tensorboard --logdir LOGDIR`` shows, from TensorBoard's own backend: the experiment
    and, per session group (run), its hyperparameters and metric values."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, logdir)
    ctx = backend_context.Context(base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=provider))
    request_context = context.RequestContext()
    content = ctx.hparams_metadata(request_context, "")
    listed = ctx.hparams_from_data_provider(request_context, "", 0)
    experiment = ctx.experiment_from_metadata(request_context, "", True, content, listed)
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=100,
        col_params=[api_pb2.ColParams(hparam=h.name) for h in experiment.hparam_infos]
        + [api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos],
        allowed_statuses=[api_pb2.STATUS_SUCCESS],
        aggregation_type=api_pb2.AGGREGATION_AVG,
    )
    groups = list_session_groups.Handler(request_context, ctx, "", request).run().session_groups
    return experiment, {
        g.name: ({k: hparam(v) for k, v in g.hparams.items()}, {m.name.tag: m.value for m in g.metric_values})
        for g in groups
    }


def check_trial(run_dir: str, params: dict, row: dict[str, str], num_samples: int = 64) -> dict[str, float]:
    """The trial's hparams plugin data and metric scalars against its files; returns the scalars."""
    acc = accumulator(run_dir)
    data = plugin_data(acc)
    assert set(data) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
    experiment = data[metadata.EXPERIMENT_TAG].experiment
    assert [m.name.tag for m in experiment.metric_infos] == TAGS
    assert [h.name for h in experiment.hparam_infos] == KEYS
    session = {k: hparam(v) for k, v in data[metadata.SESSION_START_INFO_TAG].session_start_info.hparams.items()}
    # the swept values, named and shown as in results.csv (what `flatlit analyze` reads)
    assert session == {
        "seed_everything": params["seed_everything"],
        "model.init_args.arch_kwargs": json.dumps(params["model.init_args.arch_kwargs"]),
        "model.init_args.optimizer.init_args.lr": params["model.init_args.optimizer.init_args.lr"],
    }
    assert session["model.init_args.arch_kwargs"] == row["model.init_args.arch_kwargs"] == '{"width": 8}'
    assert float(session["model.init_args.optimizer.init_args.lr"]) == float(row[KEYS[2]])
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        expected = {k: v for k, v in json.load(f).items() if k in FINAL}
    # the measures under the tags `flatlit measure` logs (measures/<label>), read from measures.json
    expected.update(
        {
            k.replace("measure/", "measures/", 1): v
            for k, v in read_measures(run_dir, ["param_norm"], num_samples).items()
        }
    )
    assert sorted(expected) == sorted(TAGS)
    assert not [t for t in all_tags(acc) if "hp_metric" in t]
    values = {}
    for tag in TAGS:
        events = acc.Scalars(tag)
        assert len(events) == 1, (tag, events)  # one value per tag in the run
        assert events[0].value == pytest.approx(expected[tag], rel=1e-6, abs=1e-7), tag
        values[tag] = events[0].value
    assert len(hparams_files(run_dir)) == 1
    return values


def test_every_trial_shows_its_hyperparameters_metrics_and_measures_once(tmp_path, mnist_dir):
    path = the_sweep(tmp_path, mnist_dir)
    summary = main(["--config", path])
    assert summary["done"] == 2 and summary["failed"] == 0
    output = summary["output"]
    rows = results(output)
    trials = {f"trial-{t.index:04d}": t.params for t in expand(load_spec(path))}
    assert list(rows) == list(trials) == ["trial-0000", "trial-0001"]
    first = {}
    for tid, params in trials.items():
        run_dir = os.path.join(output, "trials", tid)
        first[tid] = (check_trial(run_dir, params, rows[tid]), hparams_files(run_dir))

    # the HParams tab of `tensorboard --logdir OUTPUT`: every trial (run) with its values and all metrics
    experiment, groups = dashboard(output)
    assert sorted(h.name for h in experiment.hparam_infos) == sorted(KEYS)
    assert [m.name.tag for m in experiment.metric_infos] == TAGS
    assert sorted(groups) == ["trials/trial-0000", "trials/trial-0001"]
    for tid, (hparams, metrics) in groups.items():
        assert hparams["seed_everything"] == trials[tid.split("/")[1]]["seed_everything"]
        assert metrics == pytest.approx(first[tid.split("/")[1]][0])

    # the same sweep again: nothing to run, every file as it was
    again = main(["--config", path])
    assert again["done"] == 2
    for tid, params in trials.items():
        run_dir = os.path.join(output, "trials", tid)
        assert check_trial(run_dir, params, rows[tid]) == first[tid][0]
        assert hparams_files(run_dir) == first[tid][1]

    # trial-0000 measured again (another value): the next run of the sweep replaces its file
    run_dir = os.path.join(output, "trials", "trial-0000")
    measures = os.path.join(run_dir, "checkpoints", "measures.json")
    with open(measures) as f:
        doc = json.load(f)
    for entry in doc["results"].values():
        entry["value"] = 12.5
    with open(measures, "w") as f:
        json.dump(doc, f)
    for name in os.listdir(run_dir):  # the new value is in measures.json only (no `flatlit measure` event file)
        if name.endswith(".flatlit-measure"):
            os.remove(os.path.join(run_dir, name))
    main(["--config", path])
    values = check_trial(run_dir, trials["trial-0000"], results(output)["trial-0000"])
    assert values["measures/param_norm"] == 12.5 and hparams_files(run_dir) != first["trial-0000"][1]
    other = os.path.join(output, "trials", "trial-0001")
    assert hparams_files(other) == first["trial-0001"][1]


def test_a_trial_without_a_measure_value_still_lists_every_metric_tag(tmp_path, mnist_dir):
    # no measures run: the experiment lists the final/* tags, every trial's scalars are Lightning's own
    base = base_config(tmp_path, mnist_dir)
    summary = main(["--config", sweep_file(tmp_path, base, grid={"seed_everything": [3]})])
    run_dir = os.path.join(summary["output"], "trials", "trial-0000")
    with open(os.path.join(run_dir, "trial.log")) as f:
        assert "default_hp_metric: false" in f.read()  # the sweep's logger asks for no placeholder itself
    acc = accumulator(run_dir)
    experiment = plugin_data(acc)[metadata.EXPERIMENT_TAG].experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(FINAL)
    hparams = plugin_data(acc)[metadata.SESSION_START_INFO_TAG].session_start_info.hparams
    assert {k: hparam(v) for k, v in hparams.items()} == {"seed_everything": 3}
    assert all(len(acc.Scalars(tag)) == 1 for tag in FINAL)
    assert not [t for t in all_tags(acc) if "hp_metric" in t]


@pytest.mark.parametrize("logger", ["explicit", "default"])
def test_flatlit_fit_logs_no_hp_metric_placeholder(tmp_path, mnist_dir, logger):
    cfg = yaml.safe_load(open(base_config(tmp_path, mnist_dir)))
    if logger == "explicit":  # an experiment YAML's logger, without default_hp_metric
        tb = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}}
        cfg["trainer"]["logger"] = tb
    else:  # Lightning's default TensorBoardLogger
        cfg["trainer"]["default_root_dir"] = str(tmp_path / "default")
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = run(["fit", "--config", str(path)])
    tb = cli.trainer.logger
    assert type(tb).__name__ == "TensorBoardLogger" and tb._default_hp_metric is False
    files = glob.glob(os.path.join(cli.trainer.log_dir, "events.out.tfevents.*"))
    assert files
    acc = accumulator(cli.trainer.log_dir)
    assert acc.Tags()["scalars"]  # the run logged its real metrics
    assert not [t for t in all_tags(acc) if "hp_metric" in t]
    assert not [t for t in all_tags(acc) if t.startswith("_hparams_/")]  # no hparams session with a placeholder


def test_progress_bar_on_a_terminal_lines_elsewhere(tmp_path, mnist_dir, monkeypatch, capsys):
    path = sweep_file(tmp_path, base_config(tmp_path, mnist_dir), grid={"seed_everything": [0, 1, 2]})
    sweep = Sweep(load_spec(path), SweepOptions(config=path))
    sweep.status = {"trial-0000": "done", "trial-0001": "running", "trial-0002": "pending"}
    sweep.durations = [1.0]
    sweep.progress()  # not a terminal: the progress line
    assert "1/3 done, 1 running, 0 failed, 1 pending" in capsys.readouterr().out
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    sweep.start_bar(1)
    assert sweep.bar is not None and sweep.bar.n == 1 and sweep.bar.total == 3
    sweep.status["trial-0001"] = "done"
    sweep.say("trial-0001 done in 1.0 s")
    sweep.progress()
    assert sweep.bar.n == 2
    sweep.close_bar()
    out, err = capsys.readouterr()
    assert "trial-0001 done in 1.0 s" in out and "done," not in out  # the bar replaces the progress line
    assert "sweep sweep" in err and "2/3" in err
