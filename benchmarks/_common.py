"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import lightning.pytorch as pl
import torch
import yaml

from flatlit.allocator import tune_allocator
from flatlit.data import FashionMNISTDataModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

T = TypeVar("T")

tune_allocator()  # as `flatlit` does at start-up: keep freed CPU memory in the process (flatlit/allocator.py)


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (validation excluded when it is disabled)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._t)


class StepTimer(pl.Callback):
    """Wall time of each training batch (forward, backward(s), optimizer step, hooks)."""

    def __init__(self, skip: int = 3) -> None:
        self.skip = skip
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.skip:  # the first steps allocate buffers
            self.times.append(time.perf_counter() - self._t)


def bench_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer that trains only: no validation, logger, checkpoints, progress bar or summary."""
    defaults = dict(
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return pl.Trainer(**{**defaults, **kwargs})


def quickstart_data(data_dir: str) -> FashionMNISTDataModule:
    """The quickstart's Fashion-MNIST (50k/10k split, batch 128), set up for fitting, with Lightning's info lines
    silenced and torch seeded."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(data_dir=data_dir, batch_size=128, val_size=10000, download=False)
    dm.setup("fit")
    return dm


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def wall(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` as an :func:`interleave` side that returns its own wall time."""
    return lambda: timed(fn)


def interleave(sides: dict[str, Callable[[], T]], repeats: int, warm_up: bool = True) -> dict[str, list[T]]:
    """Call every side ``repeats`` times, interleaved, and return each side's results in call order.

    A side is a function returning its measurement (:func:`wall` turns any function into one that returns its wall
    time). First one untimed call of every side (``warm_up``): imports, the allocator's pools and caches are then
    warm for every side alike, so no side pays the others' cold start nor rides on their warm-up. Then ``repeats``
    rounds, each calling every side once, in an order that changes from round to round: rotated by one place per
    round, and for three sides or more reversed every other round (A B C, A C B, C A B, C B A, B C A, B A C: all
    orders in turn, and no side twice in a row across a round's boundary; two sides go A B, B A, A B, ...). A change
    of load on a shared machine reaches all sides alike, and no side always runs first, last or right after the same
    other side.
    """
    names = list(sides)
    if warm_up:
        for name in names:
            sides[name]()
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        order = names[k:] + names[:k]
        for name in reversed(order) if r % 2 and len(names) > 2 else order:
            results[name].append(sides[name]())
    return results


def spread(values: Sequence[float]) -> float:
    """Relative spread of repeated measurements: interquartile range / median (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def medians(results: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in results.items()}


def spreads(results: dict[str, list[float]]) -> dict[str, float]:
    """:func:`spread` of every side, rounded for printing."""
    return {name: round(spread(values), 4) for name, values in results.items()}


def median_time(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one untimed warm-up call (unless ``warm_up`` is
    False). To compare two functions, time them with :func:`interleave` instead."""
    return statistics.median(interleave({"fn": wall(fn)}, repeats, warm_up)["fn"])


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")


def timed_fit(config: dict, folder: str, name: str, config_dir: str | None = None) -> tuple[float, str]:
    """``flatlit fit`` of ``config`` in a subprocess, logging to ``folder/name/version_0`` without a progress bar;
    returns its wall time and run directory. ``config_dir``: where the config came from (a relative
    ``trainer.callbacks`` include is resolved against it)."""
    config = copy.deepcopy(config)
    config["trainer"]["logger"]["init_args"] = {"save_dir": folder, "name": name, "version": 0}
    config["trainer"]["enable_progress_bar"] = False
    callbacks = config["trainer"].get("callbacks")
    if isinstance(callbacks, str) and config_dir is not None and not os.path.isabs(callbacks):
        config["trainer"]["callbacks"] = os.path.join(config_dir, callbacks)
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flatlit.cli", "fit", "--config", path], check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t, os.path.join(folder, name, "version_0")
