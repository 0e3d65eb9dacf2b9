"""Helpers shared by the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import lightning.pytorch as pl


def quiet_trainer(**kw) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or sanity check (overridable)."""
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kw})


def end_worker() -> None:
    """End a torchrun test worker once its results are written: leave the process group and exit without the
    interpreter's teardown, where gloo's threads now and then abort the process ("terminate called without an
    active exception", exit -6) after all the work succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a torchrun rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(
    script: str, args: list[str], port: int | None = None, nproc: int = 2, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` (CPU, gloo), one thread per process, on a port the OS
    reports free (``port`` is accepted from older callers and not used: fixed ports collide between runs); a failure
    shows the workers' stderr."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), script, *args],
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {os.path.basename(script)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


class KillAtStep(pl.Callback):
    """Kill this process with SIGKILL (no cleanup, like a crash or an OOM kill) when training reaches ``step``.

    Fires at the start of the batch after ``step`` optimizer updates, so the last step-interval checkpoint is
    usually some steps behind: the resumed run must redo them exactly.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
