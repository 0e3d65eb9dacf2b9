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


def run_torchrun(
    script: str, args: list[str], port: int, nproc: int = 2, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` (CPU, gloo), one thread per process."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(port), script, *args],
        check=True,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


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
