"""``flatlit analyze``: which measure ranks the generalization gap of a sweep's trials best.

    flatlit analyze runs/sweeps/fashion_mnist_small
    flatlit analyze SWEEP_DIR --target gen_gap_acc test_acc --bootstrap 1000 --seed 0 --output SWEEP_DIR/analysis
    flatlit analyze SWEEP_DIR --average seed_everything --color_by lr     # LPF-SGD: average the seeds first

Reads every finished trial of a sweep (:func:`load_sweep`: the sweep's ``trials.jsonl`` or ``results.csv``, or else
a tree of run directories), and writes to ``--output`` (default ``SWEEP_DIR/analysis``):

- ``trials.csv`` / ``trials.md``: one row per trial: hyperparameters (dotted config keys), run directory, final
  metrics (``final/...``) and measures (``measure/<name>``);
- ``correlations.csv`` / ``correlations.md``: per measure and target, Kendall's τ-b, Jiang et al.'s granulated τ
  (ψ per hyperparameter and their mean Ψ; arXiv 1912.02178 §4) and Spearman's ρ, each with a seeded percentile
  bootstrap 95 % interval, sorted by |τ|, naming the measure that ranks the target best;
- ``scatter_<target>.png`` (measure vs target, one panel per measure, coloured by a hyperparameter),
  ``tau_<target>.png`` (τ and Ψ with their intervals) and ``psi_<target>.png`` (ψ per hyperparameter);
- ``summary.json`` (what was read and the best measure per target).

Missing or non-finite values (a measure not computed for a trial, an infinite bound) are left out pairwise and
counted. Bad input is one ``flatlit: error: ...`` line (exit code 2).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from flatlit import plots
from flatlit.errors import ConfigError, FlatlitError
from flatlit.stats import Correlation, codes, correlate

VERSION = 1
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "gen_gap_acc", "gen_gap_loss")
FINISHED = ("completed", "complete", "finished", "done", "ok", "success", "succeeded")
#: config keys that differ between the runs of a sweep without being hyperparameters (where the run is written)
IGNORED_PREFIXES = ("trainer.logger", "trainer.callbacks", "trainer.default_root_dir", "ckpt_path", "history.")
IGNORED_SUFFIXES = ("data_dir", "save_dir", "dirpath", "num_workers", "download", "eval_batch_size")
META = ("trial", "trial_id", "id", "run_dir", "status", "log_dir", "seconds", "error", "attempts", "global_step")
#: run facts kept in the trials table next to the metrics (GeneralizationTargets' final_metrics.json, results.csv)
INFO = ("epochs", "converged", "converged_epoch")
IGNORED_FINAL = ("global_step", "converged_step", "num_train", "num_test", "stop_loss", "stop_error")
NOT_PARAMS = (*META, *INFO, *IGNORED_FINAL)


# ---- reading a sweep ---------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """The finished trials of a sweep as one table: ``rows`` (one dict per trial, keyed by column), the columns that
    are hyperparameters, final metrics (``final/...``) and measures (``measure/<name>``), and notes on what was
    skipped or derived."""

    path: str
    source: str
    rows: list[dict[str, Any]]
    hparams: list[str]
    metrics: list[str]
    measures: list[str]
    notes: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)

    def column(self, key: str) -> np.ndarray:
        """A numeric column (NaN where missing or not a finite number)."""
        return np.array([_num(r.get(key)) for r in self.rows], dtype=float)


def _num(v: Any) -> float:
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _scalar(v: Any) -> Any:
    """A value as it goes into a table cell: numbers and strings stay, bools stay, containers become JSON."""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def _parse_cell(text: str) -> Any:
    """A CSV cell back to a number, bool, None or string."""
    t = text.strip()
    if t == "" or t.lower() in ("nan", "none", "null"):
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def flatten_config(node: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """A nested config as LightningCLI dotted keys (``model.init_args.optimizer.init_args.lr``); lists stay leaves."""
    out = {} if out is None else out
    if isinstance(node, dict) and node:
        for k, v in node.items():
            flatten_config(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = _scalar(node)
    return out


def read_measures(path: str) -> list[dict[str, Any]]:
    """The entries of a ``measures.json`` written by ``flatlit measure`` or the measure callbacks."""
    with open(path) as f:
        data = json.load(f)
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: no 'results' mapping")
    return [e for e in results.values() if isinstance(e, dict) and "name" in e]


def read_final_metrics(run_dir: str) -> tuple[dict[str, Any], str | None]:
    """``final/<metric>`` of a run (and ``epochs``, ``converged``, ``converged_epoch`` when known) from
    ``final_metrics.json`` (written by the GeneralizationTargets callback at the end of ``fit``), else from the last
    rows of ``history.csv`` (the ``test/*`` columns, else ``val/*``); the second item names the source."""
    path = os.path.join(run_dir, "final_metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        data = data.get("metrics", data) if isinstance(data, dict) else {}
        metrics, info = split_final(data)
        return {**metrics, **info}, "final_metrics.json"
    path = os.path.join(run_dir, "history.csv")
    if not os.path.isfile(path):
        return {}, None
    from flatlit.report import read_history

    h = read_history(path)

    def last(key: str) -> float:
        col = h.get(key)
        if col is None:
            return math.nan
        ok = np.isfinite(col)
        return float(col[ok][-1]) if ok.any() else math.nan

    split = "test" if math.isfinite(last("test/acc")) else "val"
    out = {
        "final/train_loss": last("train/loss"),
        "final/train_acc": last("train/acc"),
        "final/test_loss": last(f"{split}/loss"),
        "final/test_acc": last(f"{split}/acc"),
    }
    return out, f"history.csv (train/*, {split}/*)"


def split_final(record: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """A trial's final record as (``final/<metric>`` numbers, run facts ``epochs``/``converged``/
    ``converged_epoch``), accepting the keys with or without the ``final/`` prefix; other keys are dropped."""
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {}
    for key, value in record.items():
        name = key.removeprefix("final/")
        if name in INFO:
            info[name] = value
        elif name in METRICS or (key.startswith("final/") and name not in IGNORED_FINAL):
            metrics[f"final/{name}"] = _num(value)
    return metrics, info


def _add_gaps(row: dict[str, Any]) -> None:
    """gen_gap_acc = train_acc − test_acc and gen_gap_loss = test_loss − train_loss, where not given."""
    if not math.isfinite(_num(row.get("final/gen_gap_acc"))):
        row["final/gen_gap_acc"] = _num(row.get("final/train_acc")) - _num(row.get("final/test_acc"))
    if not math.isfinite(_num(row.get("final/gen_gap_loss"))):
        row["final/gen_gap_loss"] = _num(row.get("final/test_loss")) - _num(row.get("final/train_loss"))


def load_sweep(path: str) -> Sweep:
    """Every finished trial of the sweep at ``path``, from the first of:

    1. ``trials.jsonl``: one JSON object per trial, with ``trial`` (or ``id``), ``status`` (rows whose status is not
       finished are skipped), the hyperparameters under ``params`` / ``hparams`` / ``overrides`` (dotted keys),
       ``run_dir`` (relative to the sweep), final metrics under ``metrics`` or as ``final/...`` keys, and measures
       under ``measures`` (name → value or ``measures.json`` entry) or as ``measure/<name>`` keys;
    2. ``results.csv``: one row per trial; ``final/*`` columns are metrics, ``measure/*`` (or ``measures/*``)
       columns measures, ``trial``/``run_dir``/``status`` meta data and every other column a hyperparameter;
    3. a directory tree of run directories (each with ``config.yaml``): the hyperparameters are the config keys whose
       values differ between the runs (where a run writes its logs excepted). One run's own directory, or a folder
       holding a single run (and no ``sweep.yaml``/``study.log`` of ``flatlit sweep``), is not a sweep: ConfigError.

    Metrics or measures missing from the sweep's file are read from the run directory: ``final_metrics.json`` (or
    ``history.csv``) and ``checkpoints/measures.json``. A measure computed with several settings across the sweep
    gets one column per setting (``measure/worst_case_l2[rho=0.05]``). Raises :class:`ConfigError` when there is
    no finished trial.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"SWEEP_DIR {path!r}: not a directory; pass the output folder of `flatlit sweep`.")
    notes: list[str] = []
    raw: list[dict[str, Any]] = []  # {"trial", "run_dir", "params", "metrics", "measures"(entries or values)}
    skipped = 0
    jsonl, results_csv = os.path.join(path, "trials.jsonl"), os.path.join(path, "results.csv")
    if os.path.isfile(jsonl):
        source = "trials.jsonl"
        with open(jsonl) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    notes.append(f"trials.jsonl line {i + 1}: not JSON (a trial being written?), skipped.")
                    continue
                status = str(rec.get("status", "completed")).lower()
                if status not in FINISHED:
                    skipped += 1
                    continue
                params = rec.get("params") or rec.get("hparams") or rec.get("overrides") or rec.get("hyperparameters")
                flat = {k: v for k, v in rec.items() if "." in k and not k.startswith(("final/", "measure"))}
                if "seed_everything" in rec:
                    flat["seed_everything"] = rec["seed_everything"]
                metrics = dict(rec.get("metrics") or rec.get("final") or {})
                metrics.update({k: v for k, v in rec.items() if k.startswith("final/") or k in INFO})  # flat keys
                measures = rec.get("measures") or {
                    k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith(("measure/", "measures/"))
                }
                raw.append(
                    {
                        "trial": rec.get("trial", rec.get("trial_id", rec.get("id", i))),
                        "run_dir": rec.get("run_dir") or rec.get("log_dir"),
                        "params": {k: _scalar(v) for k, v in (params or flat).items()},
                        "metrics": metrics,
                        "measures": measures,
                    }
                )
    elif os.path.isfile(results_csv):
        source = "results.csv"
        with open(results_csv, newline="") as f:
            for i, rec in enumerate(csv.DictReader(f)):
                rec = {k: _parse_cell(v or "") for k, v in rec.items() if k}
                status = str(rec.get("status") or "completed").lower()
                if status not in FINISHED:
                    skipped += 1
                    continue
                raw.append(
                    {
                        "trial": rec.get("trial", rec.get("trial_id", rec.get("id", i))),
                        "run_dir": rec.get("run_dir"),
                        "params": {
                            k: v
                            for k, v in rec.items()
                            if k not in NOT_PARAMS and not k.startswith(("final/", "measure"))
                        },
                        "metrics": {k: v for k, v in rec.items() if k.startswith("final/") or k in INFO},
                        "measures": {
                            k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith(("measure/", "measures/"))
                        },
                    }
                )
    else:
        source = "run directories"
        found = sorted(
            os.path.abspath(os.path.dirname(p))
            for p in glob.glob(os.path.join(path, "**", "config.yaml"), recursive=True)
            if os.sep + "analysis" + os.sep not in p
        )
        sweep_marker = any(os.path.isfile(os.path.join(path, f)) for f in ("sweep.yaml", "study.log"))
        if os.path.isfile(os.path.join(path, "config.yaml")) or (len(found) == 1 and not sweep_marker):
            what = (
                "it is one run's directory (it holds config.yaml)"
                if os.path.isfile(os.path.join(path, "config.yaml"))
                else f"it holds a single run, {os.path.relpath(found[0], path)}"
            )
            raise ConfigError(
                f"SWEEP_DIR {path!r}: not a sweep folder: {what}. A sweep folder holds trials.jsonl or results.csv "
                "(the output folder of `flatlit sweep`), or two or more run directories below it (each with "
                "config.yaml and final_metrics.json or history.csv)."
            )
        for run_dir in found:
            try:
                with open(os.path.join(run_dir, "config.yaml")) as f:
                    cfg = yaml.safe_load(f) or {}
            except (OSError, yaml.YAMLError) as err:
                notes.append(f"{os.path.relpath(run_dir, path)}/config.yaml: unreadable ({type(err).__name__}).")
                continue
            rel = os.path.relpath(run_dir, path)
            if not any(os.path.isfile(os.path.join(run_dir, f)) for f in ("final_metrics.json", "history.csv")):
                skipped += 1  # a run that has not logged anything yet
                continue
            raw.append({"trial": rel, "run_dir": run_dir, "params": flatten_config(cfg), "metrics": {}, "measures": {}})
    if skipped:
        notes.append(f"{skipped} trial(s) not finished (status, or no final_metrics.json/history.csv), skipped.")
    if not raw:
        raise ConfigError(
            f"SWEEP_DIR {path!r}: no finished trials (no trials.jsonl or results.csv rows, no run directories with a "
            "config.yaml below it); pass the output folder of `flatlit sweep`."
        )

    # metrics and measures from the run directories where the sweep file lacks them
    entries: list[list[tuple[str, str, float]]] = []  # per trial: (name, settings key, value)
    metric_sources: set[str] = set()
    for t in raw:
        run_dir = t["run_dir"]
        if run_dir and not os.path.isabs(str(run_dir)):  # relative to the sweep, else to the working directory
            inside = os.path.join(path, str(run_dir))
            run_dir = os.path.abspath(inside if os.path.exists(inside) or not os.path.exists(run_dir) else run_dir)
        t["run_dir"] = run_dir
        has_final = any(math.isfinite(_num(t["metrics"].get(f"final/{m}", t["metrics"].get(m)))) for m in METRICS)
        if not has_final and run_dir and os.path.isdir(run_dir):
            got, where = read_final_metrics(run_dir)
            t["metrics"] = got
            if where:
                metric_sources.add(where)
        mine: list[tuple[str, str, float]] = []
        if t["measures"]:
            for name, v in t["measures"].items():
                if isinstance(v, dict):
                    key = json.dumps({"settings": v.get("settings"), "sample": v.get("sample")}, sort_keys=True)
                    mine.append((v.get("name", name), key, _num(v.get("value"))))
                else:
                    mine.append((name, "", _num(v)))
        elif run_dir and os.path.isfile(os.path.join(run_dir, "checkpoints", "measures.json")):
            try:
                for e in read_measures(os.path.join(run_dir, "checkpoints", "measures.json")):
                    key = json.dumps({"settings": e.get("settings"), "sample": e.get("sample")}, sort_keys=True)
                    mine.append((e["name"], key, _num(e.get("value"))))
            except (OSError, ValueError) as err:
                notes.append(f"trial {t['trial']}: checkpoints/measures.json unreadable ({err}).")
        entries.append(mine)
    if any(s.startswith("history.csv") for s in metric_sources):
        notes.append(
            "Final metrics of some trials come from history.csv (no final_metrics.json): the last logged epoch, "
            "train/* as averaged during the epoch and val/* standing in for test/* where no test/* was logged."
        )

    # one column per measure, or per (measure, settings) where a measure was computed with several settings
    variants: dict[str, list[str]] = {}
    for mine in entries:
        for name, key, _ in mine:
            variants.setdefault(name, [])
            if key not in variants[name]:
                variants[name].append(key)
    column: dict[tuple[str, str], str] = {}
    for name, keys in variants.items():
        if len(keys) == 1:
            column[(name, keys[0])] = f"measure/{name}"
            continue
        parsed = [json.loads(k) if k else {} for k in keys]
        flat = [flatten_config(p) for p in parsed]
        differ = sorted({k for f in flat for k in f if len({json.dumps(g.get(k), default=str) for g in flat}) > 1})
        for k, f in zip(keys, flat):
            label = ",".join(f"{d.split('.')[-1]}={f.get(d)}" for d in differ)
            column[(name, k)] = f"measure/{name}[{label}]"

    rows: list[dict[str, Any]] = []
    for t, mine in zip(raw, entries):
        row: dict[str, Any] = {"trial": t["trial"], "run_dir": t["run_dir"]}
        row.update(t["params"])
        metrics, info = split_final(t["metrics"])
        row.update(metrics)
        row.update(info)
        _add_gaps(row)
        for name, key, value in mine:
            row[column[(name, key)]] = value
        rows.append(row)

    # hyperparameters: the parameter keys whose values differ between trials; columns that always change together
    # (max_epochs and a scheduler's T_max) are one hyperparameter, named by the first
    keys: list[str] = []
    for t in raw:
        keys += [k for k in t["params"] if k not in keys]
    if source == "run directories":
        keys = [k for k in keys if not k.startswith(IGNORED_PREFIXES) and not k.endswith(IGNORED_SUFFIXES)]
    varying = [k for k in keys if len(set(codes([r.get(k) for r in rows]))) > 1]
    hparams: list[str] = []
    twins: dict[str, list[str]] = {}
    for k in varying:
        ck = codes([r.get(k) for r in rows])
        twin = next((h for h in hparams if _same_partition(ck, codes([r.get(h) for r in rows]))), None)
        if twin is None:
            hparams.append(k)
        else:
            twins.setdefault(twin, []).append(k)
    for k, others in twins.items():
        notes.append(f"{', '.join(others)} change(s) together with {k}: one hyperparameter, named {k}.")
    constant = [k for k in keys if k not in varying]
    for r in rows:  # constant parameters are settings of the whole sweep, not columns
        for k in constant:
            r.pop(k, None)
        for k in varying:
            if k not in hparams:
                r.pop(k, None)
    metrics = [f"final/{m}" for m in METRICS]
    metrics += sorted({k for r in rows for k in r if k.startswith("final/") and k not in metrics})
    measures = sorted(set(column.values()))
    info = [k for k in INFO if any(r.get(k) not in (None, "") for r in rows)]
    return Sweep(path, source, rows, hparams, metrics, measures, notes, info)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = len(set(zip(a.tolist(), b.tolist())))
    return pairs == len(set(a.tolist())) == len(set(b.tolist()))


# ---- names and values for people ---------------------------------------------------------------------------------
def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Readable unique names of dotted keys: ``model.init_args.optimizer.init_args.lr`` → ``lr``,
    ``model.class_path`` → ``model``, with parent components added where two would collide."""

    def parts(k: str) -> list[str]:
        p = [x for x in k.split(".") if x not in ("init_args", "class_path")]
        return p or [k]

    out: dict[str, str] = {}
    depth = {k: 1 for k in keys}
    while True:
        out = {k: ".".join(parts(k)[-depth[k] :]) for k in keys}
        clash = [k for k in keys if list(out.values()).count(out[k]) > 1 and depth[k] < len(parts(k))]
        if not clash:
            break
        for k in clash:
            depth[k] += 1
    return {k: (v if list(out.values()).count(v) == 1 else k) for k, v in out.items()}


def fmt_value(v: Any) -> str:
    """A cell: 4 significant digits for floats, class paths by their class name, blanks for missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and v.startswith("{") and '"class_path"' in v:  # a whole optimizer/scheduler block
        try:
            node = json.loads(v)
            args = ", ".join(f"{k}={fmt_value(a)}" for k, a in (node.get("init_args") or {}).items())
            return f"{fmt_value(node['class_path'])}({args})"
        except (ValueError, KeyError, AttributeError):
            return v
    if isinstance(v, str) and "." in v and " " not in v and v.split(".")[-1][:1].isupper():
        return v.split(".")[-1]  # torch.optim.SGD -> SGD
    return str(v)


def value_labels(values: Sequence[Any]) -> dict[str, str]:
    """Legend labels of a hyperparameter's values (keyed by ``repr``): :func:`fmt_value`, except that whole
    ``class_path`` blocks show their class name plus only the arguments that tell two blocks of the same class apart
    (``SGD(lr=0.1)``, ``SGD(lr=0.01, momentum=0.8)``, ``Adam``)."""
    nodes: dict[str, dict] = {}
    for v in values:
        if isinstance(v, str) and v.startswith("{") and '"class_path"' in v:
            try:
                nodes[repr(v)] = json.loads(v)
            except ValueError:
                pass
    out = {repr(v): fmt_value(v) for v in values}
    by_class: dict[str, list[str]] = {}
    for key, node in nodes.items():
        by_class.setdefault(str(node.get("class_path")), []).append(key)
    for cls, keys in by_class.items():
        args = [nodes[k].get("init_args") or {} for k in keys]
        differ = sorted({a for d in args for a in d if len({json.dumps(x.get(a)) for x in args}) > 1})
        for k, a in zip(keys, args):
            shown = ", ".join(f"{d}={fmt_value(a[d])}" for d in differ if d in a)
            out[k] = fmt_value(cls) + (f"({shown})" if shown else "")
    return out


def _ci(v: float, ci: tuple[float, float]) -> str:
    if not math.isfinite(v):
        return "—"
    if not all(math.isfinite(c) for c in ci):
        return f"{v:+.3f}"
    return f"{v:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines) + "\n"


#: short axis labels of the targets (the figure titles give the long form)
SHORT_LABELS = {
    "gen_gap_acc": "train − test acc. (%)",
    "gen_gap_loss": "test − train loss",
    "test_acc": "test accuracy (%)",
    "train_acc": "train accuracy (%)",
    "test_loss": "test loss",
    "train_loss": "train loss",
}
TARGET_LABELS = {
    "gen_gap_acc": "generalization gap: train − test accuracy (%)",
    "gen_gap_loss": "generalization gap: test − train loss",
    "test_acc": "test accuracy (%)",
    "train_acc": "train accuracy (%)",
    "test_loss": "test loss",
    "train_loss": "train loss",
}


def _percent(target: str, y: np.ndarray) -> bool:
    fin = y[np.isfinite(y)]
    return "acc" in target and fin.size > 0 and float(np.abs(fin).max()) <= 1.0


# ---- the analysis ------------------------------------------------------------------------------------------------
@dataclass
class TargetResult:
    """Correlations of every measure with one target (sorted by |τ|, undefined last)."""

    target: str
    points: int
    hparams: list[str]
    results: list[tuple[str, Correlation, int]]  # (measure column, correlation, missing count)

    @property
    def best(self) -> tuple[str, Correlation] | None:
        ok = [(m, c) for m, c, _ in self.results if math.isfinite(c.tau)]
        return ok[0] if ok else None


def average_over(sweep: Sweep, keys: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows averaged (NaN-aware mean of metrics and measures) over the hyperparameters ``keys``, and the remaining
    hyperparameters (LPF-SGD averages its grid over seeds before correlating)."""
    rest = [h for h in sweep.hparams if h not in keys]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in sweep.rows:
        groups.setdefault(tuple(repr(r.get(h)) for h in rest), []).append(r)
    out = []
    for members in groups.values():
        row = {h: members[0].get(h) for h in rest}
        for col in [*sweep.metrics, *sweep.measures]:
            vals = np.array([_num(m.get(col)) for m in members])
            row[col] = float(vals[np.isfinite(vals)].mean()) if np.isfinite(vals).any() else math.nan
        row["trials"] = len(members)
        out.append(row)
    return out, rest


def nuisance_keys(hparams: Sequence[str]) -> list[str]:
    """The hyperparameters that are random seeds (``seed`` in the key): they fix the groups of the granulated τ
    like any other key and get their own ψ, but Ψ leaves them out — they are repetitions, not design choices."""
    return [h for h in hparams if "seed" in h.rsplit(".", 1)[-1].lower()]


def _nuisance_note(hps: Sequence[str], names: dict[str, str]) -> str:
    keys = nuisance_keys(hps)
    if not keys:
        return ""
    shown = ", ".join(f"`{names[h]}`" for h in keys)
    return f" ({shown} fix the groups and get a ψ column but are left out of Ψ: repetitions, not hyperparameters)"


def analyze_target(
    rows: list[dict[str, Any]], hparams: list[str], measures: list[str], target: str, bootstrap: int, seed: int
) -> TargetResult:
    y = np.array([_num(r.get(target)) for r in rows])
    hp = {h: [r.get(h) for r in rows] for h in hparams}
    nuisance = nuisance_keys(hparams)
    results = []
    for m in measures:
        x = np.array([_num(r.get(m)) for r in rows])
        c = correlate(x, y, hp, bootstrap=bootstrap, seed=seed, nuisance=nuisance)
        results.append((m, c, int((~np.isfinite(x)).sum())))
    results.sort(key=lambda t: (not math.isfinite(t[1].tau), -abs(t[1].tau) if math.isfinite(t[1].tau) else 0))
    return TargetResult(target, len(rows), hparams, results)


def correlation_rows(res: TargetResult, names: dict[str, str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``correlations.csv`` for one target."""
    header = ["target", "measure", "n", "missing", "tau", "tau_lo", "tau_hi", "tau_p"]
    header += ["spearman", "spearman_lo", "spearman_hi", "Psi", "Psi_lo", "Psi_hi"]
    for h in res.hparams:
        s = names[h]
        header += [f"psi/{s}", f"psi/{s}_lo", f"psi/{s}_hi", f"groups/{s}"]
    rows = []
    for m, c, missing in res.results:
        g = c.granulated
        row: list[Any] = [res.target.removeprefix("final/"), m.removeprefix("measure/"), c.n, missing]
        row += [c.tau, *c.tau_ci, c.tau_p, c.rho, *c.rho_ci, g.Psi, *c.Psi_ci]
        for h in res.hparams:
            row += [g.psi.get(h, math.nan), *c.psi_ci.get(h, (math.nan, math.nan)), g.groups.get(h, 0)]
        rows.append(row)
    return header, rows


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(
            ["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v) for v in r]
        )
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def trials_table(sweep: Sweep) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``trials.csv``: trial, hyperparameters, run_dir, final metrics, run facts (epochs,
    converged) where known, measures."""
    header = ["trial", *sweep.hparams, "run_dir", *sweep.metrics, *sweep.info, *sweep.measures]
    rows = []
    for r in sweep.rows:
        run_dir = r.get("run_dir")
        rel = os.path.relpath(run_dir, sweep.path) if run_dir and os.path.isabs(str(run_dir)) else run_dir
        rest = header[2 + len(sweep.hparams) :]
        rows.append([r.get("trial"), *(r.get(h) for h in sweep.hparams), rel, *(r.get(k) for k in rest)])
    return header, rows


def _write_parquet(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    cols = {
        h: [r[i] if not isinstance(r[i], (dict, list)) else json.dumps(r[i]) for r in rows]
        for i, h in enumerate(header)
    }
    cols = {
        h: (v if len({type(x) for x in v if x is not None}) <= 1 else [None if x is None else str(x) for x in v])
        for h, v in cols.items()
    }
    pq.write_table(pa.table(cols), path)
    return True


# ---- figures -----------------------------------------------------------------------------------------------------
def _color_key(sweep_rows: list[dict[str, Any]], hparams: list[str], target: str) -> str | None:
    """The hyperparameter to colour scatter points by: among those with 2–10 values, the one whose values are most
    associated with the target (largest |Spearman ρ| of its value codes, or of its values when numeric)."""
    from flatlit.stats import spearman_rho

    y = np.array([_num(r.get(target)) for r in sweep_rows])
    best, score = None, -1.0
    for h in hparams:
        vals = [r.get(h) for r in sweep_rows]
        k = len(set(codes(vals)))
        if not 2 <= k <= 10:
            continue
        num = np.array([_num(v) for v in vals])
        x = num if np.isfinite(num).all() else codes(vals).astype(float)
        rho = spearman_rho(x, y)
        s = abs(rho) if math.isfinite(rho) else 0.0
        if s > score:
            best, score = h, s
    return best or (hparams[0] if hparams else None)


def _signed(v: float, digits: int = 2) -> str:
    """``+0.75`` / ``−0.52`` (a typographic minus, as on the axes)."""
    return f"{v:+.{digits}f}".replace("-", "−")


def _hue(values: list[Any]) -> tuple[list[Any], dict[Any, str]] | None:
    """Sorted distinct values and one colour each (numbers by value, others by name); None when > 10 values."""
    distinct = sorted(
        {repr(v): v for v in values}.values(), key=lambda v: (_num(v) if math.isfinite(_num(v)) else math.inf, str(v))
    )
    if len(distinct) > 10:
        return None
    return distinct, {repr(v): plots.color(i) for i, v in enumerate(distinct)}


def scatter_figure(rows: list[dict[str, Any]], res: TargetResult, color_by: str | None, names: dict[str, str]):
    """Measure (x) vs target (y), one panel per measure in the order of ``res`` (at most 4 per row), points
    coloured by ``color_by``; log x where a measure spans more than 1.5 decades; τ, its interval and Ψ in each
    panel's title."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator

    target = res.target.removeprefix("final/")
    y = np.array([_num(r.get(res.target)) for r in rows])
    pct = _percent(target, y)
    y = y * 100 if pct else y
    n = len(res.results)
    ncols = min(4, n)
    nrows = (n + ncols - 1) // ncols
    hue_vals = [r.get(color_by) for r in rows] if color_by else None
    hue = _hue(hue_vals) if hue_vals is not None else None
    with matplotlib.rc_context(plots.STYLE):
        fig = Figure(figsize=(3.3 * ncols + 0.6, 2.9 * nrows + 1.0), dpi=plots.DPI, layout="constrained")
        FigureCanvasAgg(fig)
        cmap, norm = None, None
        if hue_vals is not None and hue is None:  # many values: a colour map with a colour bar
            num = np.array([_num(v) for v in hue_vals])
            cmap = matplotlib.colormaps["viridis"]
            fin = num[np.isfinite(num)]
            norm = LogNorm(fin.min(), fin.max()) if plots.spans_decades(fin, 10.0) else Normalize(fin.min(), fin.max())
        last = None
        for k, (m, c, missing) in enumerate(res.results):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            x = np.array([_num(r.get(m)) for r in rows])
            ok = np.isfinite(x) & np.isfinite(y)
            if hue is not None:
                distinct, colours = hue
                cols = [colours[repr(v)] for v in np.array(hue_vals, dtype=object)[ok]]
                ax.scatter(x[ok], y[ok], c=cols, s=22, alpha=0.85, edgecolors="white", linewidths=0.4)
            elif cmap is not None:
                last = ax.scatter(x[ok], y[ok], c=np.array([_num(v) for v in hue_vals])[ok], cmap=cmap, norm=norm, s=22)
            else:
                ax.scatter(x[ok], y[ok], color=plots.color(0), s=22, alpha=0.85)
            ax.locator_params(axis="x", nbins=4)  # five-digit values must not run into each other in a 3-inch panel
            if plots.spans_decades(x[ok], 30.0):
                plots.log_axis(ax, "x")
                if plots.spans_decades(x[ok], 300.0):  # 1, 2, 5 × 10ⁿ would crowd a small panel
                    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,), numticks=6))
            tau = "τ undefined" if not math.isfinite(c.tau) else f"τ = {_signed(c.tau)}"
            if math.isfinite(c.tau) and all(math.isfinite(v) for v in c.tau_ci):
                tau += f" [{_signed(c.tau_ci[0])}, {_signed(c.tau_ci[1])}]"
            psi = f", Ψ = {_signed(c.granulated.Psi)}" if math.isfinite(c.granulated.Psi) else ""
            label = m.removeprefix("measure/")
            ax.set_title(f"{label}\n{tau}{psi}", fontsize=10)
            ax.set_xlabel(label + (f" ({missing} missing)" if missing else ""), fontsize=9)
            if k % ncols == 0:
                ax.set_ylabel(SHORT_LABELS.get(target, target), fontsize=9)
            ax.tick_params(labelsize=9)
        title = f"Measures vs {TARGET_LABELS.get(target, target)}: {res.points} points"
        if hue is not None and color_by:
            distinct, colours = hue
            labels = value_labels(distinct)
            handles = [
                Line2D([], [], ls="", marker="o", ms=6, color=colours[repr(v)], label=labels[repr(v)]) for v in distinct
            ]
            widest = max(len(h.get_label()) for h in handles)
            fig.legend(
                handles=handles,
                title=f"colour: {names.get(color_by, color_by)}",
                loc="outside lower center",
                ncols=max(1, min(len(handles), int(14 * (3.3 * ncols + 0.6)) // (widest + 6))),
                fontsize=9,
                title_fontsize=9,
            )
        elif last is not None and color_by:
            cb = fig.colorbar(last, ax=fig.axes, location="bottom", shrink=0.5, aspect=40)
            cb.set_label(f"colour: {names.get(color_by, color_by)}", fontsize=9)
            cb.ax.tick_params(labelsize=9)
        fig.suptitle(title, fontsize=12)
    return fig


def tau_figure(res: TargetResult):
    """Horizontal bars per measure (best |τ| at the top): overall τ-b and granulated Ψ with 95 % bootstrap
    intervals; the vertical line is τ = 0."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = res.target.removeprefix("final/")
    items = res.results
    n = len(items)
    with matplotlib.rc_context(plots.STYLE):
        fig = Figure(figsize=(8.0, 1.4 + 0.42 * n), dpi=plots.DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        pos = np.arange(n)[::-1].astype(float)
        h = 0.38
        for j, (label, get, ci) in enumerate(
            (
                ("overall Kendall τ-b", lambda c: c.tau, lambda c: c.tau_ci),
                ("granulated Ψ (mean of ψ per hyperparameter)", lambda c: c.granulated.Psi, lambda c: c.Psi_ci),
            )
        ):
            vals = np.array([get(c) for _, c, _ in items], float)
            lo = np.array([ci(c)[0] for _, c, _ in items], float)
            hi = np.array([ci(c)[1] for _, c, _ in items], float)
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
            err = np.where(np.isfinite(err), err, 0.0)
            yy = pos + (h / 2 if j == 0 else -h / 2)
            ax.barh(yy, np.nan_to_num(vals), height=h, color=plots.color(j), label=label, alpha=0.9)
            has_ci = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(vals)
            if has_ci.any():
                ax.errorbar(vals[has_ci], yy[has_ci], xerr=err[:, has_ci], fmt="none", ecolor="0.15", capsize=2.5, lw=1)
            for yv, v in zip(yy, vals):
                if not math.isfinite(v):
                    ax.text(0.02, yv, "undefined", va="center", ha="left", fontsize=9, color="0.35")
        ax.axvline(0, color="0.3", lw=0.9)
        ax.set_yticks(pos, [m.removeprefix("measure/") for m, _, _ in items])
        ax.set_xlim(-1.05, 1.05)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(f"Kendall rank correlation with {target} ({TARGET_LABELS.get(target, target).split(' (')[0]})")
        ax.set_title(f"Kendall τ of each measure with {target} (95 % bootstrap intervals; {res.points} points)")
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    return fig


def psi_figure(res: TargetResult, names: dict[str, str]):
    """Heat map of ψ_i (rows: measures in the order of ``res``; columns: hyperparameters, then Ψ and τ), each cell
    annotated with its value and, under it, the number of groups ψ_i averages over."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = res.target.removeprefix("final/")
    most = {h: max(c.granulated.groups.get(h, 0) for _, c, _ in res.results) for h in res.hparams}
    cols = [f"{names[h]}\n({most[h]} groups)" for h in res.hparams] + [
        "Ψ\n(mean ψ" + (", seeds out)" if nuisance_keys(res.hparams) else ")"),
        "τ\n(all points)",
    ]
    mat = np.array(
        [
            [c.granulated.psi.get(h, math.nan) for h in res.hparams] + [c.granulated.Psi, c.tau]
            for _, c, _ in res.results
        ],
        float,
    )
    n, k = mat.shape
    with matplotlib.rc_context(plots.STYLE):
        width = max(1.1, 0.075 * max(len(names[h]) for h in res.hparams) if res.hparams else 1.1)
        fig = Figure(figsize=(2.8 + width * k + 1.0, 1.8 + 0.42 * n), dpi=plots.DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(np.ma.masked_invalid(mat), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(np.arange(k), cols)
        ax.set_yticks(np.arange(n), [m.removeprefix("measure/") for m, _, _ in res.results])
        ax.grid(False)
        ax.axvline(len(res.hparams) - 0.5, color="0.2", lw=1.2)
        for i in range(n):
            for j in range(k):
                v = mat[i, j]
                text = "—" if not math.isfinite(v) else _signed(v)
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if abs(v) > 0.6 else "0.1")
        cb = fig.colorbar(im, ax=ax, shrink=0.8)
        cb.set_label("Kendall τ")
        ax.set_title(
            f"Granulated τ with {target}: ψ = mean τ over the groups of points\nwhere only that hyperparameter changes"
        )
        ax.set_xlabel("hyperparameter varied (most groups any measure averages over)")
    return fig


# ---- the command -------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every flatlit error
        sys.stderr.write(f"flatlit: error: {message} (see `flatlit analyze --help`)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flatlit analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep's output folder (or a tree of run directories)")
    p.add_argument(
        "--target",
        nargs="+",
        default=["gen_gap_acc"],
        help=f"final metric(s) to rank: {', '.join(METRICS)} or another final/* column (default gen_gap_acc)",
    )
    p.add_argument("--output", default=None, help="output folder (default SWEEP_DIR/analysis)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--measures", nargs="+", default=None, help="measure columns to analyse (default: all)")
    p.add_argument("--color_by", default=None, help="hyperparameter colouring the scatter plots (key or short name)")
    p.add_argument(
        "--converged_only",
        action="store_true",
        help="leave out trials that did not meet the sweep's stopping rule (converged false in final_metrics.json)",
    )
    p.add_argument(
        "--average",
        nargs="+",
        default=None,
        metavar="HPARAM",
        help="average trials over these hyperparameters first (e.g. the seed, as LPF-SGD does)",
    )
    return p


def _resolve_hparam(arg: str, value: str, hparams: list[str], names: dict[str, str]) -> str:
    for h in hparams:
        if value in (h, names[h]):
            return h
    shown = ", ".join(names[h] for h in hparams) or "(none: no configuration value differs between the trials)"
    raise ConfigError(f"{arg}: {value!r} is not a hyperparameter of this sweep; choose from {shown}.")


def analyze(
    sweep_dir: str,
    targets: Sequence[str] = ("gen_gap_acc",),
    output: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    measures: Sequence[str] | None = None,
    color_by: str | None = None,
    average: Sequence[str] | None = None,
    converged_only: bool = False,
) -> dict[str, Any]:
    """Run the analysis and write its files; returns the summary (also written as ``summary.json``)."""
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap: must be >= 0 (0 skips the intervals), got {bootstrap}.")
    sweep = load_sweep(sweep_dir)
    if converged_only:
        if "converged" not in sweep.info:
            raise ConfigError(
                "--converged_only: these trials have no convergence record (final_metrics.json of the "
                "GeneralizationTargets callback, which `flatlit sweep` adds); leave the flag out."
            )
        kept = [r for r in sweep.rows if r.get("converged") in (True, "True", "true", 1)]
        if not kept:
            raise ConfigError("--converged_only: no trial met its stopping rule; leave the flag out to see them all.")
        if len(kept) < len(sweep.rows):
            sweep.notes.append(
                f"--converged_only: {len(sweep.rows) - len(kept)} trial(s) that never converged left out."
            )
        sweep.rows = kept
    names = short_names(sweep.hparams)
    cols = []
    for t in targets:
        col = t if t.startswith("final/") else f"final/{t}"
        if col not in sweep.metrics or not np.isfinite(sweep.column(col)).any():
            have = [m.removeprefix("final/") for m in sweep.metrics if np.isfinite(sweep.column(m)).any()]
            raise ConfigError(
                f"--target: {t!r} is not a final metric of these trials; choose from {', '.join(have) or '(none)'}."
            )
        cols.append(col)
    chosen = sweep.measures
    if measures:
        chosen = []
        for m in measures:
            col = m if m.startswith("measure/") else f"measure/{m}"
            hits = [c for c in sweep.measures if c == col or c.startswith(col + "[")]
            if not hits:
                have = ", ".join(c.removeprefix("measure/") for c in sweep.measures) or "(none)"
                raise ConfigError(f"--measures: {m!r} was not measured in these trials; choose from {have}.")
            chosen += [c for c in hits if c not in chosen]
    avg = [_resolve_hparam("--average", a, sweep.hparams, names) for a in (average or [])]
    color = _resolve_hparam("--color_by", color_by, sweep.hparams, names) if color_by else None
    if color in avg:
        raise ConfigError(f"--color_by: {color_by!r} is averaged over (--average); colour by another hyperparameter.")

    outdir = output or os.path.join(sweep_dir, "analysis")
    os.makedirs(outdir, exist_ok=True)
    written: list[str] = []
    header, rows = trials_table(sweep)
    _write_csv(os.path.join(outdir, "trials.csv"), header, rows)
    md_header = [names.get(h, h) if h in names else h.removeprefix("measure/") for h in header]
    md = [
        f"# Trials of {os.path.abspath(sweep_dir)}",
        "",
        f"{len(sweep.rows)} finished trials read from {sweep.source}. Hyperparameters: "
        + (", ".join(f"`{names[h]}` = `{h}`" for h in sweep.hparams) or "none (no configuration value differs)")
        + ". Accuracies are fractions; gen_gap_acc = train_acc − test_acc, gen_gap_loss = test_loss − train_loss.",
        "",
        markdown_table(md_header, [[fmt_value(v) for v in r] for r in rows]),
    ]
    md += [f"- {n}" for n in sweep.notes]
    _write_text(os.path.join(outdir, "trials.md"), "\n".join(md) + "\n")
    written += ["trials.csv", "trials.md"]
    if _write_parquet(os.path.join(outdir, "trials.parquet"), header, rows):
        written.append("trials.parquet")

    data_rows, hps = average_over(sweep, avg) if avg else (sweep.rows, sweep.hparams)
    summary: dict[str, Any] = {
        "version": VERSION,
        "sweep": os.path.abspath(sweep_dir),
        "source": sweep.source,
        "trials": len(sweep.rows),
        "points": len(data_rows),
        "averaged_over": avg,
        "hyperparameters": {names[h]: h for h in sweep.hparams},
        "measures": [m.removeprefix("measure/") for m in chosen],
        "bootstrap": {"resamples": bootstrap, "seed": seed, "level": 0.95},
        "notes": list(sweep.notes),
        "targets": {},
    }
    if not chosen:
        summary["notes"].append("No measures in these trials: correlations skipped (run `flatlit measure`).")
    csv_header: list[str] | None = None
    csv_rows: list[list[Any]] = []
    md = [f"# Which measure ranks the generalization gap? ({os.path.basename(os.path.normpath(sweep_dir))})", ""]
    counts = [f"`{names[h]}` ({len(set(codes([r.get(h) for r in data_rows])))} values)" for h in hps]
    md.append(
        f"{len(sweep.rows)} trials ({sweep.source})"
        + (f", averaged over {', '.join(names[a] for a in avg)} into {len(data_rows)} points" if avg else "")
        + f"; hyperparameters: {', '.join(counts) or 'none'}."
        f" τ: Kendall's τ-b over all points; Ψ: Jiang et al. 2019's granulated τ (arXiv 1912.02178 §4), the mean over"
        " hyperparameters i of ψ_i, itself the mean τ over the groups of points where only hyperparameter i changes"
        + _nuisance_note(hps, names)
        + f"; ρ: Spearman. Intervals: 95 % percentile bootstrap, {bootstrap} resamples of the points, seed {seed}."
    )
    md.append("")
    for col in cols if chosen else []:
        res = analyze_target(data_rows, hps, chosen, col, bootstrap, seed)
        h, r = correlation_rows(res, names)
        csv_header = csv_header or h
        csv_rows += r
        target = col.removeprefix("final/")
        best = res.best
        md += [f"## {target}", ""]
        if best:
            m, c = best
            sign = "larger values go with a larger" if c.tau > 0 else "larger values go with a smaller"
            md.append(
                f"**{m.removeprefix('measure/')} ranks {target} best**: τ = {c.tau:+.3f} "
                f"(95 % CI {c.tau_ci[0]:+.2f} to {c.tau_ci[1]:+.2f}, p = {c.tau_p:.2g}, n = {c.n}); {sign} {target}."
            )
        else:
            md.append(f"No measure has a defined τ with {target} (fewer than 2 points or constant values).")
        md.append("")
        table = [["measure", "n", "τ [95 % CI]", "ρ [95 % CI]", "Ψ [95 % CI]", *(f"ψ {names[h]}" for h in hps)]]
        for m, c, missing in res.results:
            g = c.granulated
            table.append(
                [
                    m.removeprefix("measure/"),
                    f"{c.n}" + (f" ({missing} missing)" if missing else ""),
                    _ci(c.tau, c.tau_ci),
                    _ci(c.rho, c.rho_ci),
                    _ci(g.Psi, c.Psi_ci),
                    *(("—" if not math.isfinite(g.psi[h]) else f"{g.psi[h]:+.2f} ({g.groups[h]})") for h in hps),
                ]
            )
        md.append(markdown_table(table[0], table[1:]))
        md.append("ψ columns: value (number of groups averaged). — : undefined (no group of comparable points).")
        if res.points < 10:
            md.append(f"Only {res.points} points: τ takes few values and its intervals are wide; read it as a hint.")
        md.append("")
        color_key = color or _color_key(data_rows, hps, col)
        figs = {
            f"tau_{target}.png": tau_figure(res),
            f"scatter_{target}.png": scatter_figure(data_rows, res, color_key, names),
        }
        if hps:
            figs[f"psi_{target}.png"] = psi_figure(res, names)
        for fname, fig in figs.items():
            plots.save(fig, os.path.join(outdir, fname))
            written.append(fname)
            md += [f"![{fname}]({fname})", ""]
        summary["targets"][target] = {
            "best": best[0].removeprefix("measure/") if best else None,
            "tau": best[1].tau if best else None,
            "tau_ci": list(best[1].tau_ci) if best else None,
            "Psi": best[1].granulated.Psi if best else None,
            "color_by": names.get(color_key, color_key) if color_key else None,
            "ranking": [
                {
                    "measure": m.removeprefix("measure/"),
                    "n": c.n,
                    "tau": c.tau,
                    "tau_lo": c.tau_ci[0],
                    "tau_hi": c.tau_ci[1],
                    "Psi": c.granulated.Psi,
                }
                for m, c, _ in res.results
            ],
        }
    if csv_header:
        _write_csv(os.path.join(outdir, "correlations.csv"), csv_header, csv_rows)
        md += [f"- {n}" for n in summary["notes"]]
        _write_text(os.path.join(outdir, "correlations.md"), "\n".join(md) + "\n")
        written += ["correlations.csv", "correlations.md"]
    summary["files"] = sorted(written)
    summary["output"] = os.path.abspath(outdir)
    _write_text(os.path.join(outdir, "summary.json"), json.dumps(summary, indent=1, sort_keys=True, default=float))
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"{summary['trials']} trials ({summary['source']}), {len(summary['measures'])} measures")
    for target, info in summary["targets"].items():
        print(f"\n{target}:")
        print(f"  {'measure':30s} {'n':>4s} {'τ':>7s} {'95 % CI':>17s} {'Ψ':>7s}")
        for r in info["ranking"][:10]:
            ci = f"[{r['tau_lo']:+.2f}, {r['tau_hi']:+.2f}]" if math.isfinite(r["tau_lo"]) else ""
            print(f"  {r['measure'][:30]:30s} {r['n']:4d} {r['tau']:+7.3f} {ci:>17s} {r['Psi']:+7.3f}")
        if len(info["ranking"]) > 10:
            print(f"  ... ({len(info['ranking']) - 10} more in correlations.md)")
        if info["best"]:
            print(f"  best: {info['best']} (τ = {info['tau']:+.3f})")
    for n in summary["notes"]:
        print(f"note: {n}")
    print(f"written: {summary['output']}")


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``flatlit analyze``; returns the summary (tests call it directly)."""
    opts = build_parser().parse_args(args)
    try:
        summary = analyze(
            opts.sweep_dir,
            opts.target,
            opts.output,
            opts.bootstrap,
            opts.seed,
            opts.measures,
            opts.color_by,
            opts.average,
            opts.converged_only,
        )
    except FlatlitError as err:
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None
    _print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
