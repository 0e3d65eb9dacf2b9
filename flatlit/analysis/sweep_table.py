"""A sweep's finished trials read into one table: hyperparameters, final metrics and measures per trial.

:func:`load_sweep` reads the sweep's ``trials.jsonl`` or ``results.csv`` (or else a tree of run directories), fills in
what the sweep file lacks from each run directory (``final_metrics.json`` or ``history.csv``,
``checkpoints/measures.json``), keeps as hyperparameters the config keys whose values differ between trials, and
gives one column per measure (per setting where a measure was computed with several). The table is a pandas
DataFrame, :attr:`Sweep.frame` (what ``flatlit analyze`` writes as ``trials.csv``); :func:`sweep_frame` returns it
directly. Missing or non-finite values are NaN.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import yaml

from flatlit.analysis.run_files import read_history
from flatlit.analysis.stats import codes
from flatlit.utils.errors import ConfigError

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
_VALUES = ("final/", "measure/")  # prefixes of the value columns of a trials table


# ---- reading a sweep ---------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """The finished trials of a sweep as one table, ``frame`` (a pandas DataFrame, one row per trial, the columns of
    ``trials.csv``: ``trial``, the hyperparameters, ``run_dir`` relative to the sweep, the final metrics
    ``final/...``, the run facts ``epochs``/``converged``/``converged_epoch`` where known, the measures
    ``measure/<name>``; NaN where missing), the names of those column groups, and notes on what was skipped or
    derived."""

    path: str
    source: str
    frame: pd.DataFrame
    hparams: list[str]
    metrics: list[str]
    measures: list[str]
    notes: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)

    def column(self, key: str) -> np.ndarray:
        """A numeric column (NaN where missing or not a finite number)."""
        return numeric(self.frame, key)


def numeric(frame: pd.DataFrame, key: str) -> np.ndarray:
    """Column ``key`` of ``frame`` as floats: NaN where missing, not a finite number, or the column is absent."""
    if key not in frame:
        return np.full(len(frame), math.nan)
    return np.array([finite_or_nan(v) for v in frame[key].tolist()], dtype=float)


def column_roles(frame: pd.DataFrame) -> dict[str, list[str]]:
    """The columns of a trials table by role, from their names (the layout of :attr:`Sweep.frame` and
    ``trials.csv``): ``metrics`` (``final/*``), ``measures`` (``measure/*``), ``info`` (run facts) and ``hparams``
    (every other column but ``trial``, ``trials`` and ``run_dir``). A column added to the frame by hand counts as a
    hyperparameter: pass the hyperparameters explicitly where it should not."""
    cols = [str(c) for c in frame.columns]
    return {
        "hparams": [c for c in cols if c not in ("trial", "trials", "run_dir", *INFO) and not c.startswith(_VALUES)],
        "metrics": [c for c in cols if c.startswith("final/")],
        "info": [c for c in cols if c in INFO],
        "measures": [c for c in cols if c.startswith("measure/")],
    }


def finite_or_nan(v: Any) -> float:
    """``float(v)`` when it is a finite number (bools and None excluded), else NaN."""
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
            metrics[f"final/{name}"] = finite_or_nan(value)
    return metrics, info


def _add_gaps(row: dict[str, Any]) -> None:
    """gen_gap_acc = train_acc − test_acc and gen_gap_loss = test_loss − train_loss, where not given."""
    if not math.isfinite(finite_or_nan(row.get("final/gen_gap_acc"))):
        row["final/gen_gap_acc"] = finite_or_nan(row.get("final/train_acc")) - finite_or_nan(row.get("final/test_acc"))
    if not math.isfinite(finite_or_nan(row.get("final/gen_gap_loss"))):
        row["final/gen_gap_loss"] = finite_or_nan(row.get("final/test_loss")) - finite_or_nan(
            row.get("final/train_loss")
        )


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
    gets one column per setting (``measure/worst_case_l2[rho=0.05]``). The table is :attr:`Sweep.frame`. Raises
    :class:`ConfigError` when there is no finished trial.
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
        has_final = any(
            math.isfinite(finite_or_nan(t["metrics"].get(f"final/{m}", t["metrics"].get(m)))) for m in METRICS
        )
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
                    mine.append((v.get("name", name), key, finite_or_nan(v.get("value"))))
                else:
                    mine.append((name, "", finite_or_nan(v)))
        elif run_dir and os.path.isfile(os.path.join(run_dir, "checkpoints", "measures.json")):
            try:
                for e in read_measures(os.path.join(run_dir, "checkpoints", "measures.json")):
                    key = json.dumps({"settings": e.get("settings"), "sample": e.get("sample")}, sort_keys=True)
                    mine.append((e["name"], key, finite_or_nan(e.get("value"))))
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
    for r in rows:  # run directories relative to the sweep, as trials.csv has them
        run_dir = r.get("run_dir")
        r["run_dir"] = os.path.relpath(run_dir, path) if run_dir and os.path.isabs(str(run_dir)) else run_dir
    frame = pd.DataFrame.from_records(rows, columns=["trial", *hparams, "run_dir", *metrics, *info, *measures])
    for c in [c for c in frame.columns if pd.api.types.is_object_dtype(frame[c])]:  # NaN where missing, as in CSV
        frame[c] = frame[c].where(frame[c].notna(), math.nan)
    return Sweep(path, source, frame, hparams, metrics, measures, notes, info)


def sweep_frame(path: str) -> pd.DataFrame:
    """The trials of the sweep at ``path`` as a DataFrame (:func:`load_sweep`'s :attr:`Sweep.frame`): one row per
    finished trial with ``trial``, the hyperparameters (dotted config keys), ``run_dir``, ``final/*`` metrics, run
    facts and ``measure/*`` columns, equal to the ``trials.csv`` that ``flatlit analyze`` writes."""
    return load_sweep(path).frame


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = len(set(zip(a.tolist(), b.tolist())))
    return pairs == len(set(a.tolist())) == len(set(b.tolist()))
