"""Cost of ``flatlit sweep`` over running the same trials by hand, and its parallel efficiency, measured in one run.

Eight tiny trials (a width-8 MLP, one epoch of a few batches on a small synthetic MNIST-format dataset, seeds 0–7)
are run three ways, all as ``flatlit`` processes with the sweep's exact trial command lines:

- ``hand_seconds``: one after another by hand (``python -m flatlit.cli fit ...`` subprocesses), summed;
- ``sweep1_seconds``: ``flatlit sweep --workers 1`` end to end (driver start-up, checks, bookkeeping, results);
- ``sweep2_seconds``: ``flatlit sweep --workers 2``.

``overhead_per_trial_s`` = (sweep1 − hand) / 8: the driver's start-up (imports, LightningCLI checks of the sweep)
and bookkeeping, spread over the trials. ``parallel_efficiency`` = (sweep1 / sweep2) / min(2, cores) over the trial
phase of each sweep (first trial start to last trial end, from its Optuna study); ``parallel_efficiency_end_to_end``
includes the driver's start-up, which no number of workers shortens (with eight trials of a few seconds it caps the
end-to-end value near 0.9). The machine should be otherwise idle. Prints one JSON line with ``--json``.
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
from _common import emit

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


def write_sweep(folder: str, trials: int, batches: int) -> str:
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
    with open(os.path.join(folder, "sweep.yaml"), "w") as f:
        yaml.safe_dump({"config": "base.yaml", "grid": {"seed_everything": list(range(trials))}}, f)
    return os.path.join(folder, "sweep.yaml")


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
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="training batches per trial")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="flatlit-bench-sweep-")
    write_mnist(os.path.join(folder, "mnist"))
    path = write_sweep(folder, args.trials, args.batches)
    cores = cpu_count()
    hand = by_hand(path, os.path.join(folder, "hand"), threads=cores)  # a 1-worker sweep gives a trial every core
    sweep1, phase1 = run_sweep(path, os.path.join(folder, "sweep1"), 1)
    sweep2, phase2 = run_sweep(path, os.path.join(folder, "sweep2"), args.workers)
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
        },
        args.json,
    )


if __name__ == "__main__":
    main()
