"""``--executor slurm``: one submitit job per trial attempt, submitted as a Slurm job array.

The ``slurm:`` section of the sweep file sets the jobs: ``timeout_min``, ``partition``, ``gpus_per_node``,
``cpus_per_task``, ``mem_gb``, ``array_parallelism`` (default ``--workers``), ``constraint``, ``account``, ``qos``,
``signal_delay_s``, ``additional`` (extra ``#SBATCH`` options) and ``setup`` (shell lines run before the job); any
other submitit parameter by its name. ``cluster: local`` or ``debug`` runs the same jobs with submitit's
LocalExecutor (processes on this machine, honouring ``--workers``) or DebugExecutor (in this process), for tests.

Requeue on preemption and timeout: submitit sends its job SIGUSR2 before the time limit (``signal_delay_s``) or on
preemption, and requeues the job with the callable's ``checkpoint()``, :class:`TrialJob`'s. On Slurm the trial
process runs Lightning's ``SLURMEnvironment(auto_requeue=True)`` (Lightning's default there): ``checkpoint()``
forwards it SIGUSR1, its requeue signal, so Lightning saves ``hpc_ckpt_N.ckpt`` in the run directory (the trial's
``default_root_dir``) and asks Slurm to requeue; submitit requeues the job as well, whichever comes first. The
requeued job continues the trial from the newest of that file and ``last.ckpt``. Elsewhere the trial is stopped with
SIGTERM and continues from ``last.ckpt``.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time
from collections import deque
from typing import Any

from flatlit.sweeps.local import cpu_count
from flatlit.sweeps.trial import TrialPlan, last_error_line, outcome, run_attempt, stop_process
from flatlit.utils.errors import ConfigError

ALIASES = {  # short names of the sweep file -> submitit's AutoExecutor parameters
    "partition": "slurm_partition",
    "array_parallelism": "slurm_array_parallelism",
    "constraint": "slurm_constraint",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "signal_delay_s": "slurm_signal_delay_s",
    "additional": "slurm_additional_parameters",
    "setup": "slurm_setup",
    "exclude": "slurm_exclude",
    "comment": "slurm_comment",
}


class TrialJob:
    """A submitit job running one attempt of a trial; checkpointable, so submitit requeues it on timeout or
    preemption and the requeued job continues the trial from its checkpoint."""

    def __init__(self, plan: TrialPlan, env: dict[str, str] | None = None) -> None:
        self.plan = plan
        self.env = env or {}
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> dict[str, Any]:
        return run_attempt(self.plan, env=self.env, on_process=self._running)

    def _running(self, proc: subprocess.Popen | None) -> None:
        self._proc = proc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on SIGUSR2: stop the trial process with its state saved, and requeue this job."""
        import submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            if os.environ.get("SLURM_JOB_ID"):
                self._save_hpc_checkpoint(proc)
            stop_process(proc, signal.SIGTERM, grace=30.0)
        return submitit.helpers.DelayedSubmission(TrialJob(self.plan, self.env))

    def _save_hpc_checkpoint(self, proc: subprocess.Popen, timeout: float = 120.0) -> None:
        """SIGUSR1 to Lightning's SLURMEnvironment(auto_requeue=True): it saves ``hpc_ckpt_N.ckpt`` in the run
        directory; wait until the file is complete (its size stops changing) or the process ends."""

        def newest() -> tuple[float, int]:
            files = glob.glob(os.path.join(self.plan.run_dir, "hpc_ckpt_*.ckpt"))
            path = max(files, key=os.path.getmtime) if files else None
            return (os.path.getmtime(path), os.path.getsize(path)) if path else (0.0, -1)

        before = newest()
        proc.send_signal(signal.SIGUSR1)
        deadline, last = time.time() + timeout, before
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1.0)
            now = newest()
            if now != before and now == last:
                return
            last = now

    def __getstate__(self) -> dict[str, Any]:
        return {"plan": self.plan, "env": self.env, "_proc": None}


class SubmititExecutor:
    """Submit trial attempts with submitit's AutoExecutor and poll them."""

    def __init__(self, settings: dict[str, Any], workers: int, folder: str, num_trials: int) -> None:
        import submitit

        cfg = dict(settings)
        cluster = cfg.pop("cluster", None)
        if cluster not in (None, "slurm", "local", "debug"):
            raise ConfigError(f"slurm.cluster: 'slurm', 'local' or 'debug', got {cluster!r}.")
        params: dict[str, Any] = {"name": cfg.pop("name", "flatlit-sweep"), "stderr_to_stdout": True}
        for key, value in cfg.items():
            params[ALIASES.get(key, key)] = value
        params.setdefault("timeout_min", 60)
        self.folder = folder
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        self.cluster = self.executor.cluster
        if self.cluster == "slurm":
            params.setdefault("slurm_array_parallelism", workers)
        try:
            self.executor.update_parameters(**params)
        except (NameError, ValueError, TypeError) as err:
            key = next((k for k in settings if str(ALIASES.get(k, k)) in str(err)), "slurm")
            key = key if key == "slurm" else f"slurm.{key}"
            raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
        # a Slurm array runs array_parallelism jobs at once; local/debug jobs are started `workers` at a time
        self.limit = num_trials if self.cluster == "slurm" else workers
        self.poll_s = 15.0 if self.cluster == "slurm" else 0.2
        self.workers = workers
        # trials on this machine share its cores; Slurm jobs get their own (cpus_per_task)
        self.env = {} if self.cluster == "slurm" else {"OMP_NUM_THREADS": str(max(1, cpu_count() // workers))}

    def describe(self) -> str:
        return f"submitit {self.cluster} executor ({self.workers} at a time)"

    def run(self, plans: list[TrialPlan], driver: Any, adopt: dict[str, str] | None = None) -> None:
        queue = deque(plans)
        jobs: dict[str, tuple[Any, TrialPlan]] = {}
        for plan in list(queue):  # jobs of an earlier driver still queued or running on the cluster
            job_id = (adopt or {}).get(plan.trial_id)
            job = self._alive(job_id) if job_id else None
            if job is not None:
                queue.remove(plan)
                driver.begin(plan, None, job_id=job.job_id, adopted=True)
                jobs[job.job_id] = (job, plan)
        try:
            while queue or jobs:
                batch = [queue.popleft() for _ in range(min(len(queue), self.limit - len(jobs)))]
                if batch:
                    for plan in batch:
                        driver.begin(plan, None if plan.fit_done() else plan.resume_checkpoint())
                    try:
                        with self.executor.batch():  # one job array on Slurm
                            submitted = [self.executor.submit(TrialJob(plan, self.env)) for plan in batch]
                    except Exception as err:  # sbatch refused the jobs: partition, account, limits...
                        why = (str(err).strip().splitlines() or [repr(err)])[0]
                        for plan in batch:
                            driver.interrupted(plan)
                        raise ConfigError(f"slurm: the jobs were not submitted ({why}).") from None
                    for job, plan in zip(submitted, batch):
                        jobs[job.job_id] = (job, plan)
                        driver.note(plan, job_id=job.job_id)
                for job_id, (job, plan) in list(jobs.items()):
                    if not job.done():
                        continue
                    del jobs[job_id]
                    if driver.end(plan, self._result(job, plan)):
                        queue.append(plan)
                if jobs:
                    time.sleep(self.poll_s)
        except BaseException:
            for job, plan in jobs.values():
                if self.cluster != "slurm":  # cluster jobs keep running; the next run of the sweep adopts them
                    job.cancel(check=False)
                driver.interrupted(plan)
            raise

    def _alive(self, job_id: str) -> Any:
        if self.cluster != "slurm":
            return None  # local jobs die with their driver's session; debug jobs run in it
        import submitit

        job = submitit.SlurmJob(folder=self.folder, job_id=job_id)
        return job if job.state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING") else None

    @staticmethod
    def _result(job: Any, plan: TrialPlan) -> dict[str, Any]:
        started = time.time()
        try:
            result = job.result()
        except Exception as err:  # the job itself failed: killed, timed out too often, or its Python crashed
            why = last_error_line(str(err)) or type(err).__name__
            return outcome(False, f"submitit job {job.job_id}: {why}", None, started)
        if not isinstance(result, dict):
            return outcome(False, f"submitit job {job.job_id} returned {result!r}", None, started)
        return result
