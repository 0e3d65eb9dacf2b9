"""The sweep driver: plans a sweep's trials, hands them to an executor and keeps the books (``flatlit sweep``).

Every trial is ``python -m flatlit.cli fit --config BASE --KEY=VALUE ...`` with its own run directory
``<output>/trials/trial-NNNN`` (config.yaml, history.csv, TensorBoard events, checkpoints/, trial.log,
final_metrics.json), then ``flatlit measure`` on its final checkpoint when the sweep file lists measures. The sweep
adds a GeneralizationTargets callback (final train/test metrics over the full splits in eval mode; optional stopping
rule) and, when the base config has none, a ModelCheckpoint with ``save_last``. Rerunning the same command skips
finished trials, continues interrupted ones from their checkpoint and retries failed ones (up to ``--retries`` times
per run). Attempts are recorded in an Optuna study (``study.log``); finished trials are rows of ``results.csv`` and
sessions of TensorBoard's HParams tab (:mod:`flatlit.sweeps.hparams`). Bad input is refused before any trial
starts: one :class:`~flatlit.utils.errors.ConfigError` naming the key. docs/sweeps.md has the file format and the
results' columns.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flatlit.sweeps.spec import SweepSpec, Trial, check_measures, cli_value, expand, load_spec, trial_args
from flatlit.sweeps.trial import TrialPlan
from flatlit.utils.errors import ConfigError


@dataclass
class SweepOptions:
    """How to run a sweep: the flags of ``flatlit sweep`` (:mod:`flatlit.cli.sweep` documents each)."""

    config: str
    workers: int = 1
    executor: str = "local"
    retries: int = 2
    output: str | None = None
    dry_run: bool = False


def _short(key: str, keys: list[str]) -> str:
    """The last part of a dotted key when no other swept key ends the same way."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Sweep:
    """The driver: plans the trials, hands them to an executor and keeps the books (an executor's ``Driver``).

    ``opts``: a :class:`SweepOptions` (or any object with its ``workers`` and ``retries``).
    """

    def __init__(self, spec: SweepSpec, opts: SweepOptions) -> None:
        self.spec, self.opts = spec, opts
        self.trials = expand(spec)
        self.by_id: dict[str, Trial] = {}
        self.plans: dict[str, TrialPlan] = {}
        self.additions_for: Any = None
        self.book: Any = None
        self.storage_ids: dict[str, int] = {}
        self.attempt_no: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.status: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.durations: list[float] = []
        self.start_time = time.time()
        self.workers = opts.workers
        self._rows: dict[str, Any] = {}  # results.csv rows already read
        self._written = 0.0
        self.write_every_s = 0.0 if len(self.trials) <= 100 else 10.0
        self.bar: Any = None  # a tqdm bar over the trials on a terminal (start_bar)

    # ---- planning -------------------------------------------------------------------------------------------------
    def additions(self, trial_id: str, has_save_last: bool, has_generalization: bool) -> list[str]:
        """What the sweep adds to every trial's command line."""
        run_dir = os.path.join(self.spec.output, "trials", trial_id)
        logger = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            # no hp_metric = -1 placeholder: the trial's hparams and results are written once it finished
            "init_args": {
                "save_dir": self.spec.output,
                "name": "trials",
                "version": trial_id,
                "default_hp_metric": False,
            },
        }
        args = [
            f"--trainer.logger={cli_value(logger)}",
            f"--trainer.default_root_dir={cli_value(run_dir)}",
            "--trainer.enable_checkpointing=true",
        ]
        if not has_save_last:
            ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
            args.append(f"--trainer.callbacks+={cli_value(ckpt)}")
        if not has_generalization:
            init = dict(self.spec.generalization)
            if self.spec.has_measures:
                init["save_final"] = True
            if self.spec.preset:  # the run records the preset reads (Jiang's step counts)
                from flatlit.sharpness.presets import get_preset

                records = [float(v) for v in get_preset(self.spec.preset).records]
                if records:
                    init["loss_milestones"] = sorted({*records, *init.get("loss_milestones", [])}, reverse=True)
            gen = {"class_path": "flatlit.callbacks.GeneralizationTargets", "init_args": init}
            args.append(f"--trainer.callbacks+={cli_value(gen)}")
        return args

    def plan(self, trial: Trial, trial_id: str, additions: list[str]) -> TrialPlan:
        """The trial's commands: ``flatlit fit`` with the hyperparameters and ``additions``, then the measures."""
        configs = [a for c in self.spec.configs for a in ("--config", c)]
        measure_args = None
        if self.spec.has_measures:
            measure_args = ["measure", "--num_samples", str(self.spec.num_samples)]
            measure_args += ["--preset", self.spec.preset] if self.spec.preset else []
            measure_args += ["--measures", *self.spec.measures] if self.spec.measures else []
            settings = {k: v for k, v in self.spec.measures.items() if v}
            if settings:
                measure_args += ["--settings", json.dumps(settings)]
        return TrialPlan(
            trial_id=trial_id,
            params=trial.params,
            run_dir=os.path.join(self.spec.output, "trials", trial_id),
            fit_args=["fit", *configs, *trial_args(trial.params), *additions],
            measure_args=measure_args,
            final_checkpoint=any("save_final: true" in a for a in additions),
        )

    def validate(self) -> tuple[bool, bool]:
        """Everything that can be checked before a trial starts; returns (has_save_last, has_generalization)."""
        from flatlit.callbacks.generalization import GeneralizationTargets
        from flatlit.sweeps.validate import ConfigChecker

        check_measures(self.spec.measures, self.spec.preset)
        try:
            GeneralizationTargets(**self.spec.generalization)
        except TypeError as err:
            raise ConfigError(f"generalization: {err}") from None
        except ConfigError as err:
            raise ConfigError(f"generalization: {err}") from None
        checker = ConfigChecker(self.spec.configs)
        info = checker.base_info()
        if info.has_generalization and self.spec.generalization:
            raise ConfigError(
                "generalization: the base config already has a GeneralizationTargets callback; set its arguments "
                "there, or remove it from the base config."
            )
        flags = (info.has_save_last, info.has_generalization)
        checker.check_trials(self.spec, self.trials, self.additions("trial-0000", *flags))
        return flags

    # ---- the Driver protocol of the executors ---------------------------------------------------------------------
    def start_bar(self, done: int) -> None:
        """On a terminal, a tqdm bar over the trials (ETA from the trials finished in this run) below the event
        lines, in place of the progress line after each trial; elsewhere (a log file) that line stays."""
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=len(self.trials), initial=done, desc=f"sweep {self.spec.name}", unit="trial", file=sys.stderr
            )

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def say(self, line: str) -> None:
        text = f"[{_clock(time.time() - self.start_time)}] {line}"
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
            return
        sys.stdout.write(f"{text}\n")
        sys.stdout.flush()

    def describe(self, params: dict[str, Any]) -> str:
        keys = list(params)
        return " ".join(f"{_short(k, keys)}={cli_value(v)}" for k, v in params.items())

    def begin(self, plan: TrialPlan, resumed: str | None, **attrs: Any) -> None:
        tid = plan.trial_id
        self.attempt_no[tid] = attempt = self.attempt_no.get(tid, 0) + 1
        extra = {"resumed_from": resumed or "", "started": time.time(), "command": plan.fit_args, **attrs}
        self.storage_ids[tid] = self.book.start(self.by_id[tid], tid, plan.run_dir, attempt, **extra)
        self.status[tid] = "running"
        how = ""
        if attrs.get("adopted"):
            how = f", job {attrs.get('job_id')} of an earlier run"
        elif plan.fit_done():
            how = ", training finished"
        elif resumed:
            how = f", from {os.path.relpath(resumed, plan.run_dir)}"
        self.say(f"{tid} started (attempt {attempt}{how}): {self.describe(plan.params)}")

    def note(self, plan: TrialPlan, **attrs: Any) -> None:
        self.book.set(self.storage_ids[plan.trial_id], **attrs)

    def end(self, plan: TrialPlan, result: dict[str, Any]) -> bool:
        tid = plan.trial_id
        sid = self.storage_ids.pop(tid)
        seconds = float(result.get("seconds") or 0.0)
        if result.get("ok"):
            final = plan.read_final()
            self.book.finish(sid, True, status="done", final=final, seconds=seconds, failure="")
            self.status[tid] = "done"
            self.durations.append(seconds)
            shown = ", ".join(
                f"{k.removeprefix('final/')} {final[k]:.4g}"
                for k in ("final/train_acc", "final/test_acc", "final/gen_gap_acc")
                if isinstance(final.get(k), (int, float))
            )
            conv = f", converged at epoch {final['converged_epoch']}" if final.get("converged") else ""
            self.say(f"{tid} done in {seconds:.1f} s: {shown}{conv}")
            self.write_results(force=False)
            retry = False
        else:
            reason = str(result.get("reason") or "unknown failure")
            self.failures[tid] = self.failures.get(tid, 0) + 1
            retry = self.failures[tid] <= self.opts.retries
            self.book.finish(sid, False, status="failed", failure=reason, seconds=seconds)
            self.status[tid] = "pending" if retry else "failed"
            self.reasons[tid] = reason
            then = "; retrying" if retry else f"; giving up after {self.failures[tid]} attempt(s) in this run"
            log = os.path.relpath(plan.log_path, self.spec.output)
            self.say(f"{tid} failed (attempt {self.attempt_no[tid]}): {reason} [{log}]{then}")
        self.progress()
        return retry

    def interrupted(self, plan: TrialPlan) -> None:
        sid = self.storage_ids.pop(plan.trial_id, None)
        if sid is not None:
            self.book.finish(sid, False, status="interrupted", failure="the sweep stopped while it ran")
        self.status[plan.trial_id] = "pending"

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "running": 0, "failed": 0, "pending": 0}
        for state in self.status.values():
            out[state] += 1
        return out

    def progress(self) -> None:
        c = self.counts()
        if self.bar is not None:
            self.bar.update(c["done"] + c["failed"] - self.bar.n)
            self.bar.set_postfix_str(f"{c['running']} running, {c['failed']} failed", refresh=True)
            return
        elapsed = time.time() - self.start_time
        left = c["pending"] + c["running"]
        eta = "?"
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            eta = _clock(mean * left / max(1, min(self.workers, left))) if left else _clock(0)
        self.say(
            f"{c['done']}/{len(self.status)} done, {c['running']} running, {c['failed']} failed, {c['pending']} "
            f"pending; elapsed {_clock(elapsed)}, ETA {eta}"
        )

    def write_results(self, force: bool = True) -> tuple[str, int] | None:
        """Rewrite ``results.csv``; during the sweep at most every few seconds (a long sweep has many rows)."""
        from flatlit.sweeps.study import write_results

        if not force and time.time() - self._written < self.write_every_s:
            return None
        ids = {t.index: tid for tid, t in self.by_id.items()}
        out = write_results(self.spec, self.trials, ids, self.book.latest(), self._rows)
        self._written = time.time()
        return out


@contextlib.contextmanager
def _exclusive(folder: str) -> Iterator[None]:
    """One driver per sweep directory (released by the kernel when the process dies, even by SIGKILL)."""
    path = os.path.join(folder, ".sweep.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(
                f"output: another `flatlit sweep` (pid {other}) is running on {folder}; wait for it or stop it."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def run_sweep(opts: SweepOptions) -> dict[str, Any] | None:
    """Check the sweep, then run (or with ``dry_run`` list) its trials; returns the summary."""
    if opts.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {opts.workers}.")
    if opts.retries < 0:
        raise ConfigError(f"--retries: must be >= 0, got {opts.retries}.")
    spec = load_spec(opts.config, opts.output)
    sweep = Sweep(spec, opts)
    flags = sweep.validate()
    if opts.dry_run:
        return _dry_run(sweep, flags)
    executor: Any = None
    if opts.executor == "slurm":
        from flatlit.sweeps.slurm import SubmititExecutor

        folder = os.path.join(spec.output, "submitit")
        executor = SubmititExecutor(spec.slurm, opts.workers, folder, len(sweep.trials))
    from flatlit.sweeps.local import LocalExecutor
    from flatlit.sweeps.study import Book

    executor = executor or LocalExecutor(opts.workers)
    os.makedirs(os.path.join(spec.output, "trials"), exist_ok=True)
    with _exclusive(spec.output), _sigterm_as_interrupt():
        shutil.copyfile(spec.path, os.path.join(spec.output, "sweep.yaml"))
        sweep.book = book = Book(spec)
        digest = _digest(spec.configs)
        previous = book.study.user_attrs.get("base_sha256")
        if previous and previous != digest:
            sys.stdout.write(
                "warning: the base config changed since this sweep started; finished trials keep their results, "
                "and an interrupted trial resumes only if its model/data/optimizer settings did not change\n"
            )
        book.study.set_user_attr("base_sha256", digest)
        book.study.set_user_attr("sweep_file", spec.path)
        ids = book.assign_ids(sweep.trials)
        latest = book.latest()
        todo: list[TrialPlan] = []
        adopt: dict[str, str] = {}
        retried = 0
        for trial in sweep.trials:
            tid = ids[trial.index]
            sweep.by_id[tid] = trial
            plan = sweep.plans[tid] = sweep.plan(trial, tid, sweep.additions(tid, *flags))
            last = latest.get(tid)
            sweep.attempt_no[tid] = int(last.user_attrs.get("attempt", 0)) if last is not None else 0
            state = last.state.name if last is not None else None
            if state == "COMPLETE" and plan.fit_done():
                sweep.status[tid] = "done"
                continue
            if state == "RUNNING":  # its driver was killed: the attempt ended with it (or runs on as a Slurm job)
                if last.user_attrs.get("job_id"):
                    adopt[tid] = str(last.user_attrs["job_id"])
                why = "the sweep stopped while it ran"
                book.finish(book.storage_id(last), False, status="interrupted", failure=why)
            retried += state == "FAIL" and last.user_attrs.get("status") == "failed"
            sweep.status[tid] = "pending"
            todo.append(plan)
        c = sweep.counts()
        again = f", {retried} failed before" if retried else ""
        sys.stdout.write(
            f"sweep {spec.name}: {len(sweep.trials)} trials, {c['done']} done, {len(todo)} to run{again}; "
            f"{executor.describe()}; output {spec.output}\n"
        )
        sys.stdout.flush()
        interrupted = False
        try:
            if todo:
                sweep.start_bar(c["done"])
                executor.run(todo, sweep, **({"adopt": adopt} if opts.executor == "slurm" else {}))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sweep.close_bar()
        path, rows = sweep.write_results() or ("", 0)
    c = sweep.counts()
    summary = {
        "name": spec.name,
        "output": spec.output,
        "results": path,
        "trials": len(sweep.trials),
        **c,
        "failures": {t: why for t, why in sweep.reasons.items() if sweep.status.get(t) == "failed"},
        "seconds": time.time() - sweep.start_time,
    }
    state = "interrupted (rerun the same command to continue)" if interrupted else "finished"
    sys.stdout.write(
        f"sweep {spec.name} {state}: {c['done']}/{len(sweep.trials)} done, {c['failed']} failed, "
        f"{c['pending'] + c['running']} not run, in {_clock(summary['seconds'])}; results ({rows} rows): {path}\n"
    )
    for tid, why in summary["failures"].items():
        sys.stdout.write(f"  {tid} failed: {why}\n")
    sys.stdout.flush()
    if interrupted:
        raise SystemExit(130)
    return summary


def _dry_run(sweep: Sweep, flags: tuple[bool, bool]) -> dict[str, Any]:
    spec = sweep.spec
    ids = {t.index: f"trial-{t.index:04d}" for t in sweep.trials}
    states: dict[str, str] = {}
    if os.path.isfile(os.path.join(spec.output, "study.log")):
        from flatlit.sweeps.study import Book

        book = Book(spec, writer=False)
        ids = book.assign_ids(sweep.trials)
        states = {tid: t.user_attrs.get("status", t.state.name.lower()) for tid, t in book.latest().items()}
    out = [f"sweep {spec.name}: {len(sweep.trials)} trials; output {spec.output}"]
    for trial in sweep.trials:
        tid = ids[trial.index]
        out.append(f"  {tid}  {states.get(tid, 'new'):11s} {sweep.describe(trial.params)}")
    first = sweep.plan(sweep.trials[0], ids[0], sweep.additions(ids[0], *flags))
    out.append(f"command of {first.trial_id}: {shlex.join(first.fit_command()[0])}")
    if first.measure_args:
        out.append(f"then: {shlex.join(first.measure_command() or [])}")
    sys.stdout.write("\n".join(out) + "\n")
    return {"name": spec.name, "output": spec.output, "trials": len(sweep.trials), "ids": ids, "dry_run": True}
