"""Cost of exact resume on the Fashion-MNIST quickstart (LeNet, batch 128, SGD + momentum), measured in one run.

- ``save_over_step``: one step checkpoint (``trainer.save_checkpoint`` from ``on_train_batch_end``: weights,
  optimizer state, the gathered RNG/metric state, the loader position) relative to the median training step. Saves
  and steps alternate in one run (a save every ``--every`` steps); the first 3 steps and the first save are warm-up
  and not timed; the ratio is between the medians.
- ``resume_seconds`` / ``fresh_start_seconds``: wall time from ``Trainer.fit`` to the first training batch when
  resuming mid-epoch from that checkpoint, and for a fresh start of the same run (their ratio of medians is
  ``resume_over_fresh_start``); the data are read before both so only the restore is compared. After one untimed
  start of each, fresh starts and resumes are interleaved over ``--repeats`` rounds (order alternating).
- ``spread``: interquartile range / median of each side's repeats (the noise of the machine during the run).

Prints one JSON line with ``--json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import StepTimer, bench_trainer, emit, interleave, medians, quickstart_data, spread, spreads

from flatlit.data.mnist import DEBIAN_FASHION_MNIST
from flatlit.methods import SGDFamily


class SaveTimer(pl.Callback):
    """Saves a step checkpoint every ``every`` steps and times each save but the first (a warm-up)."""

    def __init__(self, path: str, every: int) -> None:
        self.path, self.every, self.times, self.saves = path, every, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            t = time.perf_counter()
            trainer.save_checkpoint(self.path)
            if self.saves:
                self.times.append(time.perf_counter() - t)
            self.saves += 1


class FirstBatch(pl.Callback):
    """Wall time of the first training batch's start."""

    t: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t is None:
            self.t = time.perf_counter()
            trainer.should_stop = True


def module() -> SGDFamily:
    return SGDFamily(arch="lenet", optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5, help="steps between two checkpoints")
    parser.add_argument("--repeats", type=int, default=7, help="timed fresh starts and resumes, each")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dm = quickstart_data(args.data_dir)
    ckpt = os.path.join(tempfile.mkdtemp(), "step.ckpt")

    steps, saver = StepTimer(), SaveTimer(ckpt, args.every)
    bench_trainer(max_steps=args.steps, callbacks=[steps, saver]).fit(module(), datamodule=dm)

    def start(ckpt_path: str | None) -> float:
        first = FirstBatch()
        trainer = bench_trainer(max_steps=args.steps + 10, callbacks=[first])
        t = time.perf_counter()
        trainer.fit(module(), datamodule=dm, ckpt_path=ckpt_path)
        return first.t - t

    starts = interleave({"fresh": lambda: start(None), "resume": lambda: start(ckpt)}, args.repeats)
    mid = medians(starts)
    fresh, resume = mid["fresh"], mid["resume"]
    step = statistics.median(steps.times)
    save = statistics.median(saver.times)
    emit(
        {
            "step_seconds": step,
            "save_seconds": save,
            "save_over_step": save / step,
            "checkpoint_mb": os.path.getsize(ckpt) / 2**20,
            "fresh_start_seconds": fresh,
            "resume_seconds": resume,
            "resume_over_fresh_start": resume / fresh,
            "spread": {"step": round(spread(steps.times), 4), "save": round(spread(saver.times), 4), **spreads(starts)},
            "saves_timed": len(saver.times),
            "repeats": args.repeats,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
