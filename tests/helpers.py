"""Helpers shared by the tests."""

from __future__ import annotations

import os
import shutil
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


def run_torchrun(script: str, args: list[str], port: int, nproc: int = 2, timeout: int = 300) -> None:
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` (CPU, gloo), one thread per process."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    subprocess.run(
        [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(port), script, *args],
        check=True,
        env=env,
        timeout=timeout,
        capture_output=True,
    )
