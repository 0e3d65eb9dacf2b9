"""One trial of a sweep: its commands, its run directory's files, and running one attempt.

A trial is a normal ``flatlit fit`` run in its own process (``python -m flatlit.cli fit --config BASE --KEY=VALUE
...``) writing to ``<sweep>/trials/<id>/`` (config.yaml, history.csv, TensorBoard events, checkpoints/), followed by
``flatlit measure`` on its final checkpoint when the sweep asks for measures. Both append their output to
``trial.log`` in the run directory. An attempt continues from the newest of ``checkpoints/last.ckpt`` and Lightning's
SLURM ``hpc_ckpt_*.ckpt``; a run whose ``final_metrics.json`` exists has finished training and is not run again.

No torch here: submitit jobs unpickle this module before they start the trial process.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FINAL_METRICS = "final_metrics.json"
LOG = "trial.log"
_PR_SET_PDEATHSIG = 1
try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the trials outlive a killed driver there
    _PRCTL = None


@dataclass
class TrialPlan:
    """Everything needed to run (or continue) one trial, as plain data (picklable for submitit).

    Args:
        trial_id: the run directory's name (``trial-0003``).
        params: the trial's hyperparameters (dotted key -> value).
        run_dir: the trial's run directory.
        fit_args: ``flatlit`` arguments of the training run (``fit --config ...``), without ``--ckpt_path``.
        measure_args: ``flatlit`` arguments of the measures (``measure --measures ...``) without ``--ckpt_path``,
            or None.
        cwd: working directory of the trial processes (relative paths in the base config are read from it).
        python: the Python interpreter.
        final_checkpoint: the training run saves ``checkpoints/final.ckpt`` (the measures' checkpoint).
    """

    trial_id: str
    params: dict[str, Any]
    run_dir: str
    fit_args: list[str]
    measure_args: list[str] | None = None
    cwd: str = field(default_factory=os.getcwd)
    python: str = sys.executable
    final_checkpoint: bool = False

    @property
    def log_path(self) -> str:
        return os.path.join(self.run_dir, LOG)

    @property
    def final_path(self) -> str:
        return os.path.join(self.run_dir, FINAL_METRICS)

    def fit_done(self) -> bool:
        """Training finished: ``final_metrics.json`` is written at the very end of ``fit``."""
        return os.path.isfile(self.final_path)

    def resume_checkpoint(self) -> str | None:
        """The newest checkpoint to continue from: ``checkpoints/last.ckpt`` or an ``hpc_ckpt_N.ckpt`` that
        Lightning's SLURMEnvironment wrote on a requeue signal (in ``default_root_dir``, the run directory)."""
        found = [p for p in (os.path.join(self.run_dir, "checkpoints", "last.ckpt"),) if os.path.isfile(p)]
        found += glob.glob(os.path.join(self.run_dir, "hpc_ckpt_*.ckpt"))
        return max(found, key=os.path.getmtime) if found else None

    def fit_command(self) -> tuple[list[str], str | None]:
        """The command of the training run and the checkpoint it continues from (None: from scratch)."""
        ckpt = self.resume_checkpoint()
        cmd = [self.python, "-m", "flatlit.cli", *self.fit_args]
        return ([*cmd, "--ckpt_path", ckpt] if ckpt else cmd), ckpt

    def measure_checkpoint(self) -> str:
        """The final state: ``final.ckpt`` (GeneralizationTargets(save_final=True)), else ``last.ckpt``."""
        final = os.path.join(self.run_dir, "checkpoints", "final.ckpt")
        if self.final_checkpoint or os.path.isfile(final):
            return final
        return os.path.join(self.run_dir, "checkpoints", "last.ckpt")

    def measure_command(self) -> list[str] | None:
        if not self.measure_args:
            return None
        return [self.python, "-m", "flatlit.cli", *self.measure_args, "--ckpt_path", self.measure_checkpoint()]

    def read_final(self) -> dict[str, Any]:
        with open(self.final_path) as f:
            return json.load(f)


def child_setup() -> None:
    """In a trial process (before exec): die with the process that started it (Linux ``PR_SET_PDEATHSIG``), and
    ignore SIGUSR2, submitit's timeout/preemption signal, which Slurm sends to every process of the job step: the
    submitit job handles it and signals the trial itself."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start(cmd: list[str], plan: TrialPlan, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """Start ``cmd`` with its output appended to ``trial.log``; returns the process and the log offset where this
    command's output begins."""
    os.makedirs(plan.run_dir, exist_ok=True)
    with open(plan.log_path, "ab") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} flatlit sweep: {shlex.join(cmd)}\n".encode())
        offset = log.tell()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=plan.cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=child_setup,
        )
    return proc, offset


def failure_reason(plan: TrialPlan, offset: int, returncode: int, step: str) -> str:
    """Why an attempt failed: the last error line of its output in ``trial.log``."""
    try:
        with open(plan.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    line = last_error_line(text)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        what = f"{step} killed by {name}"
        return f"{what}: {line}" if line else what
    if returncode == 0 and step == "fit":
        return f"fit ended without writing {FINAL_METRICS} (no GeneralizationTargets callback ran at the end)"
    return line or f"{step} exited with code {returncode} and no output"


_EXC = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure)|flatlit: error)\b.*")


def last_error_line(text: str, limit: int = 400) -> str:
    """The last ``flatlit: error: ...`` line, else the exception line closing the last traceback, else the last
    line that looks like an exception, else the last non-empty line."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    line = ""
    for ln in reversed(lines):
        if ln.startswith("flatlit: error:"):
            line = ln
            break
    if not line:
        tb = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")), default=-1)
        tail = lines[tb + 1 :] if tb >= 0 else lines
        candidates = [ln for ln in tail if not ln[:1].isspace() and _EXC.match(ln)]
        line = candidates[-1] if candidates else (lines[-1].strip() if lines else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_attempt(
    plan: TrialPlan,
    env: dict[str, str] | None = None,
    on_process: Callable[[subprocess.Popen | None], None] | None = None,
) -> dict[str, Any]:
    """Run one attempt of ``plan`` to its end (the blocking form, used inside submitit jobs): the training run
    unless it has finished, then the measures. ``on_process`` is told the running process (None after it ends).

    Returns the outcome: ``ok``, ``reason`` (why it failed), ``resumed_from`` and ``seconds``.
    """
    started = time.time()
    resumed = None

    def run(cmd: list[str]) -> tuple[int, int]:
        proc, offset = start(cmd, plan, env)
        if on_process is not None:
            on_process(proc)
        try:
            while not reaped(proc):  # polled: submitit's signal handler may stop the process meanwhile
                time.sleep(0.1)
            return proc.returncode, offset
        finally:
            if on_process is not None:
                on_process(None)

    if not plan.fit_done():
        cmd, resumed = plan.fit_command()
        code, offset = run(cmd)
        if code != 0 or not plan.fit_done():
            return outcome(False, failure_reason(plan, offset, code, "fit"), resumed, started)
    measure = plan.measure_command()
    if measure:
        code, offset = run(measure)
        if code != 0:
            return outcome(False, failure_reason(plan, offset, code, "measure"), resumed, started)
    return outcome(True, None, resumed, started)


def outcome(ok: bool, reason: str | None, resumed: str | None, started: float) -> dict[str, Any]:
    return {"ok": ok, "reason": reason, "resumed_from": resumed, "seconds": time.time() - started}


def reaped(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` has ended (reaping it). Uses ``os.waitpid`` rather than ``Popen.poll``/``wait``: safe in a
    signal handler that interrupted a ``Popen`` call holding its lock."""
    if proc.returncode is not None:
        return True
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere
        return True
    if pid == 0:
        return False
    proc.returncode = os.waitstatus_to_exitcode(status)
    return True


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """Send ``sig``, wait up to ``grace`` seconds for the process to end, then SIGKILL it."""
    if proc is None or reaped(proc):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    deadline = time.time() + grace
    while not reaped(proc):
        if time.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            deadline = math.inf
        time.sleep(0.05)
