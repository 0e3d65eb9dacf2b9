"""Cost of ``flatlit sweep`` over running the same trials by hand, and its parallel efficiency, measured in one run.

Eight tiny trials (a width-8 MLP, one epoch of a few batches on a small synthetic MNIST-format dataset, seeds 0–7)
are run three ways, all as ``flatlit`` processes with the sweep's exact trial command lines:

- ``hand_seconds``: one after another by hand (``python -m flatlit.cli fit ...`` subprocesses), summed;
- ``sweep1_seconds``: ``flatlit sweep --workers 1`` end to end (driver start-up, checks, bookkeeping, results);
- ``sweep2_seconds``: ``flatlit sweep --workers 2``.

Each way is first run once untimed on a two-trial sweep (the operating system's caches then hold what every way
loads, so none pays the others' cold start), then the three are interleaved over ``--repeats`` rounds, the order
alternating (``_common.interleave``), each round in fresh output folders; the figures below are medians.

``overhead_per_trial_s`` = (sweep1 − hand) / 8: the driver's start-up (imports, LightningCLI checks of the sweep)
and bookkeeping, spread over the trials. ``parallel_efficiency`` = (sweep1 / sweep2) / min(2, cores) over the trial
phase of each sweep (first trial start to last trial end, from its Optuna study); ``parallel_efficiency_end_to_end``
includes the driver's start-up, which no number of workers shortens (with eight trials of a few seconds it caps the
end-to-end value near 0.9). ``spread``: interquartile range / median of each way's repeats. The machine should be
otherwise idle. ``--quick``: four trials, one round. Prints one JSON line with ``--json``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, interleave, medians, spreads

from flatlit.sweep import Sweep
from flatlit.sweeps.local import cpu_count
from flatlit.sweeps.spec import load_spec
from flatlit.sweeps.study import Book

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_mnist(root: str, n_train: int = 512, n_test: int = 128) -> None:
    """A small learnable dataset in MNIST's idx format (a bright bar whose position encodes the label)."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    labels = rng.integers(0, 10, n_train + n_test).astype(np.uint8)
    images = rng.integers(0, 64, (n_train + n_test, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label : 2 * label + 6, 4:24] = 255
    for name, array in (
        ("train-images-idx3-ubyte", images[:n_train]),
        ("train-labels-idx1-ubyte", labels[:n_train]),
        ("t10k-images-idx3-ubyte", images[n_train:]),
        ("t10k-labels-idx1-ubyte", labels[n_train:]),
    ):
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(os.path.join(root, name + ".gz"), "wb") as f:
            f.write(header + array.tobytes())


def write_sweep(folder: str, trials: int, batches: int, name: str = "sweep") -> str:
    base = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": batches,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "flatlit.methods.SGDFamily",
            "init_args": {
                "arch": "mlp",
                "arch_kwargs": {"width": 8},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
            },
        },
        "data": {
            "class_path": "flatlit.data.MNISTDataModule",
            "init_args": {"data_dir": os.path.join(folder, "mnist"), "batch_size": 32, "download": False},
        },
    }
    with open(os.path.join(folder, "base.yaml"), "w") as f:
        yaml.safe_dump(base, f)
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        yaml.safe_dump({"config": "base.yaml", "grid": {"seed_everything": list(range(trials))}}, f)
    return os.path.join(folder, f"{name}.yaml")


def by_hand(path: str, output: str, threads: int) -> float:
    """Run the sweep's trial commands one after another as plain subprocesses; the summed wall time."""
    spec = load_spec(path, output)
    opts = argparse.Namespace(workers=1, retries=0, executor="local", dry_run=False, output=output)
    sweep = Sweep(spec, opts)
    flags = sweep.validate()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    total = 0.0
    for trial in sweep.trials:
        tid = f"trial-{trial.index:04d}"
        cmd = sweep.plan(trial, tid, sweep.additions(tid, *flags)).fit_command()[0]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total += time.perf_counter() - t
    return total


def run_sweep(path: str, output: str, workers: int) -> tuple[float, float]:
    """Wall time of ``flatlit sweep`` end to end, and of its trial phase (first start to last end)."""
    cmd = [sys.executable, "-m", "flatlit.cli", "sweep", "--config", path, "--workers", str(workers)]
    t = time.perf_counter()
    subprocess.run([*cmd, "--output", output], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - t
    attempts = Book(load_spec(path, output), writer=False).attempts()
    start = min(a.datetime_start for a in attempts)
    end = max(a.datetime_complete for a in attempts)
    return total, (end - start).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=None, help="trials per sweep (default 8; quick: 4)")
    parser.add_argument("--batches", type=int, default=4, help="training batches per trial")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 2; quick: 1)")
    parser.add_argument("--quick", action="store_true", help="four trials, one timed round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.trials = args.trials or (4 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 2)
    folder = tempfile.mkdtemp(prefix="flatlit-bench-sweep-")
    write_mnist(os.path.join(folder, "mnist"))
    path = write_sweep(folder, args.trials, args.batches)
    warm_up = write_sweep(folder, 2, args.batches, name="warm-up")
    cores = cpu_count()
    runs = {"hand": 0, "sweep1": 0, "sweep2": 0}

    def way(name: str, spec: str):
        """One run of ``name`` on the sweep ``spec`` in a fresh output folder: (wall time, trial-phase time)."""

        def run() -> tuple[float, float]:
            runs[name] += 1
            output = os.path.join(folder, f"{name}-{runs[name]}")
            if name == "hand":
                t = by_hand(spec, output, threads=cores)  # a 1-worker sweep gives a trial every core
                return t, t
            return run_sweep(spec, output, 1 if name == "sweep1" else args.workers)

        return run

    for name in runs:  # warm-up, untimed
        way(name, warm_up)()
    times = interleave({name: way(name, path) for name in runs}, args.repeats, warm_up=False)
    total = medians({name: [t for t, _ in r] for name, r in times.items()})
    phase = medians({name: [p for _, p in r] for name, r in times.items()})
    hand, sweep1, sweep2 = total["hand"], total["sweep1"], total["sweep2"]
    phase1, phase2 = phase["sweep1"], phase["sweep2"]
    ideal = min(args.workers, cores)
    emit(
        {
            "overhead_per_trial_s": (sweep1 - hand) / args.trials,
            "parallel_efficiency": phase1 / phase2 / ideal,
            "parallel_efficiency_end_to_end": sweep1 / sweep2 / ideal,
            "hand_seconds": hand,
            "sweep1_seconds": sweep1,
            "sweep2_seconds": sweep2,
            "sweep1_trial_phase_seconds": phase1,
            "sweep2_trial_phase_seconds": phase2,
            "trials": args.trials,
            "workers": args.workers,
            "cores": cores,
            "repeats": args.repeats,
            "spread": spreads({name: [t for t, _ in r] for name, r in times.items()}),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
