"""Cost of the curvature engine, measured in one run on real Fashion-MNIST.

Every comparison of two timings warms both sides up first (one untimed call of each) and interleaves them over
``--repeats`` rounds (the order alternating, ``_common.interleave``); the ratios are ratios of medians, and
``spread`` gives each side's interquartile range / median (the noise of the machine during the run).

- ``hvp_over_grad``: median time of one Hessian-vector product / one gradient, same model, same batch (eval mode).
- ``cached_hvp_over_grad``: the same for a product on the operator's cached gradient graph (one second backward;
  the forward and first backward are paid once per measurement), the way the solvers use the operator.
- ``lanczos_hvps_top5`` / ``power_hvps_top5``: HVPs needed for the top-5 eigenpairs to relative residual 1e-4 by
  Lanczos (full reorthogonalisation) and by deflated power iteration, on the same operator.
- ``callback_over_hvp_time``: wall time of a HessianEigenvalues measurement inside ``Trainer.fit`` / the time of its
  products run as it runs them: on the callback's own operator (same sample, loss, parameters and graph caching), a
  fresh operator's first product (which builds the cached graph) + (HVP count − 1) × a product on the cached graph;
  per HVP, ratio of medians over ``--repeats`` measurements, the unit timed right before or right after each one
  in turn. Above 1 by the callback's own overhead (sampling, setup, Lanczos bookkeeping).
  ``callback_over_uncached_hvp_time``: the same against HVP count × one whole, uncached product (below 1 when the
  cached graphs make the callback's products cheaper than whole HVPs).
- ``matmat_per_vector_over_grad``: median time of ``HessianOperator.matmat`` on 5 vectors / 5 / one gradient (lenet,
  one batch of 250, the operator's automatically chosen mode).
- ``tracking_*`` (skipped with ``--tracking-epochs 0``): ``flatlit fit`` of the Hessian quickstart
  (experiments/quickstart/fashion_mnist_hessian.yaml: lenet, top-5 on 1,000 examples at the start and after every
  epoch, tol 1e-3; by default 2 epochs instead of its 4, the cosine schedule shortened to match, so that two rounds
  take the time one round of the full quickstart took) three ways as subprocesses: without the callback, with
  ``solver=auto`` (block LOBPCG warm-started from the previous eigenvectors after the first measurement) and with
  ``solver=lanczos`` (cold Lanczos, the default). After one untimed short fit of each (two training batches), the
  three are interleaved over ``--tracking-repeats`` rounds and compared by their median wall times. The callback
  never changes the trajectory, so the two tracked runs measure the same networks. ``tracking_hvps_per_measurement``:
  mean operator applications per measurement after the first, {"cold": Lanczos, "warm": auto} (last round);
  ``tracking_overhead``: (time with the callback as shipped, Lanczos) / (time without) − 1
  (``tracking_overhead_warm_block``: the same with ``solver=auto``, warm-started LOBPCG);
  ``tracking_max_rel_diff``: the largest relative difference between the two solvers' eigenvalues over all
  measurements (both converge to relative residual 1e-3).

``--quick``: 3 rounds, tracking runs of 1 epoch. Prints one JSON line with ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile

import lightning.pytorch as pl
import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from _common import ROOT, bench_trainer, emit, interleave, medians, spread, spreads, timed, timed_fit, wall

from flatlit.callbacks import HessianEigenvalues
from flatlit.curvature import HessianOperator, lanczos, power_iteration
from flatlit.curvature.hvp import gradient_time_reference
from flatlit.data import FashionMNISTDataModule
from flatlit.data.mnist import DEBIAN_FASHION_MNIST
from flatlit.methods import SGDFamily


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--power-model", default="mlp", help="model of the Lanczos-vs-power comparison")
    parser.add_argument("--backend", default="double", choices=["double", "func"])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds / measurements (default 5; quick: 3)")
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST)
    parser.add_argument(
        "--tracking-epochs", type=int, default=None, help="epochs of the tracking runs (default 2; quick: 1; 0: skip)"
    )
    parser.add_argument("--tracking-repeats", type=int, default=2, help="timed rounds of the three tracking runs")
    parser.add_argument("--quick", action="store_true", help="3 rounds, tracking runs of 1 epoch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.tracking_epochs is None:
        args.tracking_epochs = 1 if args.quick else 2
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=128, download=False)
    dm.setup("fit")
    batches = dm.curvature_batches(args.num_samples, args.batch_size, seed=0)

    torch.manual_seed(0)
    module = SGDFamily(arch=args.model, num_classes=10, in_channels=1, image_size=28)
    x, y = batches[0]

    one = HessianOperator(module, [(x, y)], backend=args.backend, cache_graph=False)
    cached = HessianOperator(module, [(x, y)], backend=args.backend, cache_graph=True)  # its warm-up builds the graph
    v = torch.randn(one.numel)
    V = torch.randn(one.numel, 5)
    units = interleave(
        {
            "grad": wall(lambda: gradient_time_reference(module, [(x, y)])),
            "hvp": wall(lambda: one.matvec(v)),
            "cached_hvp": wall(lambda: cached.matvec(v)),
            "matmat": wall(lambda: one.matmat(V)),  # its warm-up also picks the automatic mode
        },
        args.repeats,
    )
    cached.release()
    t = medians(units)
    t_grad, t_hvp, t_cached, t_matmat = t["grad"], t["hvp"], t["cached_hvp"], t["matmat"]
    mode = one.matmat_mode if one.matmat_mode != "auto" else _chosen_mode()

    # Lanczos vs deflated power iteration on one operator
    torch.manual_seed(0)
    small = SGDFamily(arch=args.power_model, num_classes=10, in_channels=1, image_size=28)
    trainer = bench_trainer(max_epochs=1, limit_train_batches=100)
    trainer.fit(small, datamodule=dm)  # a trained point: an informative spectrum
    op = HessianOperator(small, batches, backend=args.backend)
    lz = lanczos(op.matvec, op.numel, k=5, max_iter=300, tol=1e-4, seed=0)
    pw = power_iteration(op.matvec, op.numel, k=5, max_iter=2000, tol=1e-4, seed=0)

    callback = callback_runs(args, dm)
    tracking = tracking_runs(args.data_dir, args.tracking_epochs, args.tracking_repeats) if args.tracking_epochs else {}
    emit(
        {
            "hvp_over_grad": t_hvp / t_grad,
            "cached_hvp_over_grad": t_cached / t_grad,
            "matmat_per_vector_over_grad": t_matmat / 5 / t_grad,
            "matmat_mode": mode,
            **tracking,
            "lanczos_hvps_top5": lz.num_matvecs,
            "power_hvps_top5": pw.num_matvecs,
            **callback,
            "lanczos_converged": lz.converged,
            "power_converged": pw.converged,
            "lanczos_top5": [round(float(e), 5) for e in lz.eigenvalues],
            "power_top5": [round(float(e), 5) for e in pw.eigenvalues],
            "grad_ms": 1000 * t_grad,
            "hvp_ms": 1000 * t_hvp,
            "cached_hvp_ms": 1000 * t_cached,
            "spread": spreads(units),
            "repeats": args.repeats,
            "model": args.model,
            "power_model": args.power_model,
            "backend": args.backend,
            "num_samples": args.num_samples,
            "batch_size": args.batch_size,
        },
        args.json,
    )


class ProductTimer(pl.Callback):
    """Times, at a training step, the products of a :class:`HessianEigenvalues` measurement as the callback runs
    them, on the callback's own operator (same sample, loss, parameters and automatic graph caching): a fresh
    operator's first product (it builds the cached graph), then a product on that graph, then a whole product with
    the cache off. Two instances share ``units``: one placed before the callback (it times on odd steps), one after
    it (even steps; it also records each measurement's seconds and HVP count in ``measurements``), so unit and
    measurement alternate in both orders."""

    def __init__(self, cb: HessianEigenvalues, before: bool, units: dict, measurements: dict) -> None:
        self.cb, self.before, self.units, self.measurements = cb, before, units, measurements

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.before and self.cb.last_metrics is not None:
            m = self.cb.last_metrics
            self.measurements[step] = (m["hessian/seconds"], m["hessian/hvps"])
        if (step % 2 == 1) != self.before:
            return
        op = self.cb.operator(trainer, pl_module)
        v = torch.randn(op.numel, generator=torch.Generator().manual_seed(step))
        first = timed(lambda: op.matvec(v))
        cached = timed(lambda: op.matvec(v))
        graph = op.graph_bytes > 0
        op.release()
        op.cache_graph = False
        whole = timed(lambda: op.matvec(v))
        self.units[step] = (first, cached, whole, graph)


def callback_runs(args: argparse.Namespace, dm: FashionMNISTDataModule) -> dict:
    """A HessianEigenvalues measurement at every training step, each against its products timed as it runs them.
    The first step (its measurement also runs the 2-HVP determinism probe) is the untimed warm-up of both sides."""
    torch.manual_seed(0)
    module2 = SGDFamily(arch=args.model, num_classes=10, in_channels=1, image_size=28)
    cb = HessianEigenvalues(
        top_k=5,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        every_n_steps=1,
        every_n_epochs=None,
        tol=1e-4,
        max_iter=300,
        backend=args.backend,
    )
    units: dict[int, tuple] = {}
    measurements: dict[int, tuple[float, float]] = {}
    timers = [ProductTimer(cb, True, units, measurements), cb, ProductTimer(cb, False, units, measurements)]
    bench_trainer(max_steps=args.repeats + 1, callbacks=timers).fit(module2, datamodule=dm)
    steps = [s for s in sorted(measurements) if s > 1 and s in units]
    per_hvp = [measurements[s][0] / measurements[s][1] for s in steps]  # the callback's time per HVP
    hvps = [measurements[s][1] for s in steps]
    # its products as it runs them: the first (building the graph) + (hvps - 1) on the cached graph, per HVP
    as_run = [(units[s][0] + (h - 1) * units[s][1]) / h for s, h in zip(steps, hvps)]
    whole = [units[s][2] for s in steps]
    return {
        "callback_over_hvp_time": statistics.median(per_hvp) / statistics.median(as_run),
        "callback_over_uncached_hvp_time": statistics.median(per_hvp) / statistics.median(whole),
        "callback_hvps": hvps,
        "callback_graph_cached": all(units[s][3] for s in steps),
        "callback_spread": {
            "callback_per_hvp": round(spread(per_hvp), 4),
            "products_as_run_per_hvp": round(spread(as_run), 4),
            "uncached_hvp": round(spread(whole), 4),
        },
    }


def _chosen_mode() -> str:
    from flatlit.curvature.hvp import _MODE_CACHE

    return ",".join(sorted(set(_MODE_CACHE.values()))) or "?"


def tracking_runs(data_dir: str, epochs: int, repeats: int) -> dict:
    with open(os.path.join(ROOT, "experiments", "quickstart", "fashion_mnist_hessian.yaml")) as f:
        base = yaml.safe_load(f)
    base["trainer"]["max_epochs"] = epochs
    base["model"]["init_args"]["lr_scheduler"]["init_args"]["T_max"] = epochs
    base["data"]["init_args"]["data_dir"] = data_dir
    plain = copy.deepcopy(base)
    callbacks = base["trainer"]["callbacks"]
    plain["trainer"]["callbacks"] = [c for c in callbacks if "HessianEigenvalues" not in c["class_path"]]
    lanczos_cfg = copy.deepcopy(base)
    for cfg, solver in ((base, "auto"), (lanczos_cfg, "lanczos")):
        for c in cfg["trainer"]["callbacks"]:
            if "HessianEigenvalues" in c["class_path"]:
                c["init_args"]["solver"] = solver
    configs = {"plain": plain, "auto": base, "lanczos": lanczos_cfg}
    folder = tempfile.mkdtemp(prefix="flatlit-tracking-")
    for name, cfg in configs.items():  # warm-up, untimed: a short fit of each (2 batches, a 250-example sample)
        short = copy.deepcopy(cfg)
        short["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=2)
        for c in short["trainer"]["callbacks"]:
            if "HessianEigenvalues" in c["class_path"]:
                c["init_args"]["num_samples"] = 250
        timed_fit(short, folder, f"warm-up-{name}")
    count = {name: 0 for name in configs}

    def side(name: str):
        def run() -> tuple[float, str]:
            count[name] += 1
            return timed_fit(configs[name], folder, f"{name}-{count[name]}")

        return run

    runs = interleave({name: side(name) for name in configs}, repeats, warm_up=False)
    seconds = medians({name: [t for t, _ in r] for name, r in runs.items()})
    t_plain, t_warm, t_cold = seconds["plain"], seconds["auto"], seconds["lanczos"]
    warm_dir, cold_dir = runs["auto"][-1][1], runs["lanczos"][-1][1]
    warm, cold = np.load(os.path.join(warm_dir, "eigenvalues.npz")), np.load(os.path.join(cold_dir, "eigenvalues.npz"))
    ew, ec = np.asarray(warm["eigenvalues"]), np.asarray(cold["eigenvalues"])
    return {
        "tracking_hvps_per_measurement": {
            "cold": float(np.mean(cold["hvps"][1:])),
            "warm": float(np.mean(warm["hvps"][1:])),
            "warm_over_cold": float(np.mean(warm["hvps"][1:]) / np.mean(cold["hvps"][1:])),
        },
        "tracking_overhead": t_cold / t_plain - 1,  # the callback as shipped: solver="lanczos"
        "tracking_overhead_warm_block": t_warm / t_plain - 1,
        "tracking_seconds": {"plain": t_plain, "auto": t_warm, "lanczos": t_cold},
        "tracking_hvps": {"auto": warm["hvps"].tolist(), "lanczos": cold["hvps"].tolist()},
        "tracking_eigenvalues": {"auto": ew.round(5).tolist(), "lanczos": ec.round(5).tolist()},
        "tracking_max_rel_diff": float(np.max(np.abs(ew - ec) / np.abs(ec))),
        "tracking_epochs": epochs,
        "tracking_repeats": repeats,
        "tracking_spread": spreads({name: [t for t, _ in r] for name, r in runs.items()}),
    }


if __name__ == "__main__":
    main()
