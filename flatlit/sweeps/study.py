"""Bookkeeping of a sweep in an Optuna study stored in ``<sweep>/study.log`` (``JournalStorage`` over a file: no
database server), and the ``results.csv`` table.

Every attempt of a trial is one Optuna trial: created RUNNING with the trial's hyperparameters (grid values as
categorical distributions, random-search keys with their float/int/categorical distribution) and user attributes
``trial_id``, ``params_key``, ``params``, ``run_dir``, ``attempt``, ``status``; it ends COMPLETE (value:
``final/test_acc``) with ``final`` (the final metrics), or FAIL with ``status`` ``failed`` and ``failure`` (the
trial's last error line) or ``interrupted`` (the sweep stopped while it ran). The latest attempt of a trial says
where it stands. Only the sweep's driver writes the journal. Reading a finished trial's row also writes its
TensorBoard hparams file (:mod:`flatlit.sweeps.hparams`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState, create_trial

from flatlit.sweeps.spec import SweepSpec, Trial
from flatlit.sweeps.trial import FINAL_METRICS

OBJECTIVE = "final/test_acc"
FINAL_KEYS = (
    "final/train_loss",
    "final/train_acc",
    "final/test_loss",
    "final/test_acc",
    "final/gen_gap_acc",
    "final/gen_gap_loss",
)
RUN_KEYS = ("epochs", "global_step", "converged", "converged_epoch", "converged_step")  # as final/<key> columns


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _param(value: Any) -> Any:
    """A value as Optuna stores it (its categorical choices hold only primitives: others as JSON text)."""
    return value if _primitive(value) else json.dumps(value, sort_keys=True)


def distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    """Optuna distributions of the swept keys."""
    out: dict[str, BaseDistribution] = {}
    for key, values in spec.grid.items():
        out[key] = CategoricalDistribution([_param(v) for v in values])
    for key, dist in spec.random_space.items():
        if "choices" in dist:
            out[key] = CategoricalDistribution([_param(v) for v in dist["choices"]])
        elif dist["type"] == "int":
            out[key] = IntDistribution(dist["low"], dist["high"], log=dist["log"])
        else:
            out[key] = FloatDistribution(dist["low"], dist["high"], log=dist["log"])
    return out


class Book:
    """The sweep's Optuna study: attempts, their states and attributes."""

    def __init__(self, spec: SweepSpec, writer: bool = True) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        path = os.path.join(spec.output, "study.log")
        lock = f"{path}.lock"
        if writer and os.path.lexists(lock):  # left by a killed driver; the writer holds the sweep's own lock
            os.remove(lock)
        self.storage = JournalStorage(JournalFileBackend(path))
        self.study = optuna.create_study(
            storage=self.storage, study_name=spec.name, direction="maximize", load_if_exists=True
        )
        self.study_id = self.storage.get_study_id_from_name(spec.name)
        self.distributions = distributions(spec)

    def attempts(self) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False)

    def latest(self) -> dict[str, FrozenTrial]:
        """The latest attempt of every trial id."""
        out: dict[str, FrozenTrial] = {}
        for t in self.attempts():
            tid = t.user_attrs.get("trial_id")
            if tid is not None and (tid not in out or t.number > out[tid].number):
                out[tid] = t
        return out

    def assign_ids(self, trials: list[Trial]) -> dict[int, str]:
        """``trial-NNNN`` for every trial: the id it had in earlier runs of the sweep (same hyperparameters), else
        ``trial-<index>`` when free, else the next free number."""
        known: dict[str, str] = {}
        for t in self.attempts():
            if "params_key" in t.user_attrs:
                known[t.user_attrs["params_key"]] = t.user_attrs["trial_id"]
        used = set(known.values())
        numbers = [int(u.split("-")[1]) for u in used if u.split("-")[-1].isdigit()]
        nxt = max(numbers, default=-1) + 1
        ids: dict[int, str] = {}
        for trial in trials:
            tid = known.get(trial.key)
            if tid is None:
                tid = f"trial-{trial.index:04d}"
                if tid in used:
                    tid, nxt = f"trial-{nxt:04d}", nxt + 1
                used.add(tid)
            ids[trial.index] = tid
        return ids

    def start(self, trial: Trial, trial_id: str, run_dir: str, attempt: int, **attrs: Any) -> int:
        """Record a new RUNNING attempt; returns its storage id."""
        frozen = create_trial(
            state=TrialState.RUNNING,
            params={k: _param(v) for k, v in trial.params.items()},
            distributions={k: self.distributions[k] for k in trial.params if k in self.distributions},
            user_attrs={
                "trial_id": trial_id,
                "params_key": trial.key,
                "params": trial.params,
                "run_dir": run_dir,
                "attempt": attempt,
                "status": "running",
                **attrs,
            },
        )
        return self.storage.create_new_trial(self.study_id, template_trial=frozen)

    def storage_id(self, attempt: FrozenTrial) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, attempt.number)

    def set(self, storage_id: int, **attrs: Any) -> None:
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(storage_id, k, v)

    def finish(self, storage_id: int, ok: bool, **attrs: Any) -> None:
        """End an attempt: COMPLETE (value ``final/test_acc``) or FAIL, after setting ``attrs``."""
        self.set(storage_id, **attrs)
        if ok:
            value = (attrs.get("final") or {}).get(OBJECTIVE)
            value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")
            self.storage.set_trial_state_values(storage_id, TrialState.COMPLETE, [value])
        else:
            self.storage.set_trial_state_values(storage_id, TrialState.FAIL)


def read_measures(run_dir: str, names: list[str], num_samples: int) -> dict[str, float]:
    """``measure/<name>`` values from ``checkpoints/measures.json`` (the entries of the sweep's sample size)."""
    path = os.path.join(run_dir, "checkpoints", "measures.json")
    out: dict[str, float] = {}
    try:
        with open(path) as f:
            results = json.load(f).get("results", {})
    except (OSError, ValueError):
        return out
    for key, entry in results.items():
        try:
            info = json.loads(key)
        except ValueError:
            continue
        label = info.get("label", info.get("measure"))
        if label in names and info.get("sample", {}).get("num_samples") == num_samples:
            out[f"measure/{label}"] = entry.get("value")
    return out


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return value if _primitive(value) else json.dumps(value, sort_keys=True)


def result_row(spec: SweepSpec, trial: Trial, trial_id: str, attempt: FrozenTrial) -> dict[str, Any] | None:
    """The ``results.csv`` row of a finished trial (None when its ``final_metrics.json`` is missing)."""
    run_dir = os.path.join(spec.output, "trials", trial_id)
    try:
        with open(os.path.join(run_dir, FINAL_METRICS)) as f:
            final = json.load(f)
    except (OSError, ValueError):
        return None
    names = spec.measure_labels
    row: dict[str, Any] = {"trial": trial_id, "run_dir": os.path.relpath(run_dir, spec.output)}
    row.update({k: _cell(trial.params.get(k)) for k in spec.keys})
    row.update({k: _cell(final.get(k)) for k in FINAL_KEYS})
    row.update({f"final/{k}": _cell(final.get(k)) for k in RUN_KEYS})
    measures = read_measures(run_dir, names, spec.num_samples)
    row.update({f"measure/{n}": _cell(measures.get(f"measure/{n}")) for n in names})
    row["seconds"] = _cell(attempt.user_attrs.get("seconds"))
    return row


def write_hparams(spec: SweepSpec, trial: Trial, row: dict[str, Any], attempt: FrozenTrial) -> str | None:
    """The finished trial's hyperparameters and its row's metrics in its run directory, for TensorBoard's HParams
    dashboard (:mod:`flatlit.sweeps.hparams`); a file that cannot be written is a warning, not a failed sweep."""
    from flatlit.sweeps.hparams import write_trial_hparams

    # the measures under the tags `flatlit measure` logs them in the run (measures/<label>), so each has one series
    tags = [*FINAL_KEYS, *(f"measures/{n}" for n in spec.measure_labels)]
    metrics = {**row, **{f"measures/{n}": row.get(f"measure/{n}") for n in spec.measure_labels}}
    step = row.get("final/global_step")
    run_dir = os.path.join(spec.output, row["run_dir"])
    try:
        return write_trial_hparams(
            spec,
            trial.params,
            run_dir,
            tags,
            metrics,
            step if isinstance(step, int) and not isinstance(step, bool) else 0,
            attempt.user_attrs.get("started"),
            attempt.user_attrs.get("seconds"),
        )
    except OSError as err:
        sys.stderr.write(f"warning: {run_dir}: TensorBoard hparams not written ({err})\n")
        return None


def write_results(
    spec: SweepSpec,
    trials: list[Trial],
    ids: dict[int, str],
    latest: dict[str, FrozenTrial],
    cache: dict[str, tuple[int, dict[str, Any]]] | None = None,
) -> tuple[str, int]:
    """Rewrite ``results.csv`` (atomically): one row per finished trial of the sweep file, in trial order; a row
    read anew also (re)writes the trial's TensorBoard hparams file (:func:`write_hparams`).

    ``cache`` (trial id -> (attempt number, row)) keeps rows already read, so a long sweep reads each trial's files
    once. Returns the path and the number of rows.
    """
    cache = {} if cache is None else cache
    rows = []
    for trial in trials:
        tid = ids[trial.index]
        attempt = latest.get(tid)
        if attempt is None or attempt.state != TrialState.COMPLETE:
            continue
        if tid not in cache or cache[tid][0] != attempt.number:
            row = result_row(spec, trial, tid, attempt)
            if row is None:
                continue
            write_hparams(spec, trial, row, attempt)
            cache[tid] = (attempt.number, row)
        rows.append(cache[tid][1])
    columns = [
        "trial",
        "run_dir",
        *spec.keys,
        *FINAL_KEYS,
        *(f"final/{k}" for k in RUN_KEYS),
        *(f"measure/{n}" for n in spec.measure_labels),
        "seconds",
    ]
    path = os.path.join(spec.output, "results.csv")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path, len(rows)
