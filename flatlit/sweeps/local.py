"""``--executor local``: up to ``--workers`` trial processes at a time on this machine.

Each worker slot gets one GPU (``CUDA_VISIBLE_DEVICES``, round-robin over the visible GPUs) when there are GPUs, and
``cores // workers`` CPU threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, which torch reads at start-up). Processes
are started and polled from the driver's main thread only, so ``PR_SET_PDEATHSIG`` ties every trial to the driver: a
killed driver takes its trials with it, and the next run continues them from their checkpoints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from flatlit.sweeps.trial import TrialPlan, failure_reason, outcome, reaped, start, stop_process


class Driver(Protocol):
    """What an executor reports to the sweep."""

    def begin(self, plan: TrialPlan, resumed: str | None, **attrs: Any) -> None: ...

    def end(self, plan: TrialPlan, result: dict[str, Any]) -> bool:
        """Record an attempt's outcome; True when the trial should be tried again."""
        ...

    def interrupted(self, plan: TrialPlan) -> None: ...

    def note(self, plan: TrialPlan, **attrs: Any) -> None: ...


def visible_gpus() -> list[str]:
    """The GPUs trials may use: ``CUDA_VISIBLE_DEVICES`` when set, else ``0..device_count-1``."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in env.split(",") if g.strip()] if env else [str(i) for i in range(count)]
    return ids[:count]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class _Running:
    plan: TrialPlan
    slot: int
    started: float
    steps: list[str] = field(default_factory=lambda: ["fit", "measure"])
    step: str = ""
    proc: subprocess.Popen | None = None
    offset: int = 0
    resumed: str | None = None


class LocalExecutor:
    """Run trials as child processes, ``workers`` at a time."""

    def __init__(self, workers: int, poll_s: float = 0.05) -> None:
        self.workers = workers
        self.poll_s = poll_s
        self.gpus = visible_gpus()
        self.threads = max(1, cpu_count() // workers)

    def describe(self) -> str:
        gpus = f", GPUs {','.join(self.gpus)}" if self.gpus else ""
        return f"{self.workers} local worker(s), {self.threads} CPU thread(s) each{gpus}"

    def env(self, slot: int) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        return env

    def _next(self, r: _Running) -> bool:
        """Start the attempt's next step (training unless finished, then measures); False when none is left."""
        while r.steps:
            step = r.steps.pop(0)
            if step == "fit":
                if r.plan.fit_done():
                    continue
                cmd, r.resumed = r.plan.fit_command()
            else:
                measure = r.plan.measure_command()
                if measure is None:
                    continue
                cmd = measure
            r.step = step
            r.proc, r.offset = start(cmd, r.plan, self.env(r.slot))
            return True
        return False

    def run(self, plans: list[TrialPlan], driver: Driver) -> None:
        queue = deque(plans)
        running: dict[int, _Running] = {}

        def finish(r: _Running, result: dict[str, Any]) -> None:
            del running[r.slot]
            if driver.end(r.plan, result):
                queue.append(r.plan)

        try:
            while queue or running:
                for slot in range(self.workers):
                    if slot in running or not queue:
                        continue
                    plan = queue.popleft()
                    r = running[slot] = _Running(plan, slot, time.time())
                    driver.begin(plan, None if plan.fit_done() else plan.resume_checkpoint(), slot=slot)
                    if not self._next(r):
                        finish(r, outcome(True, None, None, r.started))
                for r in list(running.values()):
                    if r.proc is not None and not reaped(r.proc):
                        continue
                    code = r.proc.returncode if r.proc is not None else 0
                    if code != 0 or (r.step == "fit" and not r.plan.fit_done()):
                        reason = failure_reason(r.plan, r.offset, code, r.step)
                        finish(r, outcome(False, reason, r.resumed, r.started))
                    elif not self._next(r):
                        finish(r, outcome(True, None, r.resumed, r.started))
                time.sleep(self.poll_s)
        except BaseException:
            for r in running.values():
                stop_process(r.proc, signal.SIGTERM, grace=10.0)
                driver.interrupted(r.plan)
            raise
