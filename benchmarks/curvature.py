"""Cost of the curvature engine, measured in one run on real Fashion-MNIST.

- ``hvp_over_grad``: median time of one Hessian-vector product / one gradient, same model, same batch (eval mode).
- ``cached_hvp_over_grad``: the same for a product on the operator's cached gradient graph (one second backward;
  the forward and first backward are paid once per measurement), the way the solvers use the operator.
- ``lanczos_hvps_top5`` / ``power_hvps_top5``: HVPs needed for the top-5 eigenpairs to relative residual 1e-4 by
  Lanczos (full reorthogonalisation) and by deflated power iteration, on the same operator.
- ``callback_over_hvp_time``: wall time of a HessianEigenvalues measurement inside ``Trainer.fit`` / (its HVP count ×
  the median time of a whole, uncached HVP): the callback's own overhead (sampling, setup, Lanczos bookkeeping);
  below 1 when the cached graphs make its products cheaper than whole HVPs.
- ``matmat_per_vector_over_grad``: median time of ``HessianOperator.matmat`` on 5 vectors / 5 / one gradient (lenet,
  one batch of 250, the operator's automatically chosen mode).
- ``tracking_*`` (skipped with ``--tracking-epochs 0``): ``flatlit fit`` of the Hessian quickstart
  (experiments/quickstart/fashion_mnist_hessian.yaml: lenet, top-5 on 1,000 examples every epoch, tol 1e-3) three
  times as subprocesses: without the callback, with ``solver=auto`` (block LOBPCG warm-started from the previous
  eigenvectors after the first measurement) and with ``solver=lanczos`` (cold Lanczos, the default). The callback
  never changes the trajectory, so the two tracked runs measure the same networks. ``tracking_hvps_per_measurement``:
  mean operator applications per measurement after the first, {"cold": Lanczos, "warm": auto};
  ``tracking_overhead``: (time with the callback as shipped, Lanczos) / (time without) − 1
  (``tracking_overhead_warm_block``: the same with ``solver=auto``, warm-started LOBPCG);
  ``tracking_max_rel_diff``: the largest relative difference between the two solvers' eigenvalues over all
  measurements (both converge to relative residual 1e-3).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from _common import ROOT, bench_trainer, emit, median_time, timed_fit

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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--tracking-epochs", type=int, default=4, help="epochs of the tracking runs (0: skip them)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=128, download=False)
    dm.setup("fit")
    batches = dm.curvature_batches(args.num_samples, args.batch_size, seed=0)

    torch.manual_seed(0)
    module = SGDFamily(arch=args.model, num_classes=10, in_channels=1, image_size=28)
    x, y = batches[0]

    one = HessianOperator(module, [(x, y)], backend=args.backend, cache_graph=False)
    v = torch.randn(one.numel)
    t_grad = median_time(lambda: gradient_time_reference(module, [(x, y)]), args.repeats)
    t_hvp = median_time(lambda: one.matvec(v), args.repeats)
    cached = HessianOperator(module, [(x, y)], backend=args.backend, cache_graph=True)
    cached.matvec(v)  # builds the graph
    t_cached = median_time(lambda: cached.matvec(v), args.repeats)
    cached.release()
    V = torch.randn(one.numel, 5)
    t_matmat = median_time(lambda: one.matmat(V), args.repeats)
    mode = one.matmat_mode if one.matmat_mode != "auto" else _chosen_mode()

    # Lanczos vs deflated power iteration on one operator
    torch.manual_seed(0)
    small = SGDFamily(arch=args.power_model, num_classes=10, in_channels=1, image_size=28)
    trainer = bench_trainer(max_epochs=1, limit_train_batches=100)
    trainer.fit(small, datamodule=dm)  # a trained point: an informative spectrum
    op = HessianOperator(small, batches, backend=args.backend)
    lz = lanczos(op.matvec, op.numel, k=5, max_iter=300, tol=1e-4, seed=0)
    pw = power_iteration(op.matvec, op.numel, k=5, max_iter=2000, tol=1e-4, seed=0)

    # the callback inside Trainer.fit: second measurement (the first also runs the 2-HVP determinism probe)
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
    bench_trainer(max_steps=2, callbacks=[cb]).fit(module2, datamodule=dm)
    seconds, hvps = cb.last_metrics["hessian/seconds"], cb.last_metrics["hessian/hvps"]
    op2 = HessianOperator(module2, batches, backend=args.backend, cache_graph=False)
    w = torch.randn(op2.numel)
    t_hvp_full = median_time(lambda: op2.matvec(w), args.repeats)
    tracking = tracking_runs(args.data_dir, args.tracking_epochs) if args.tracking_epochs > 0 else {}
    emit(
        {
            "hvp_over_grad": t_hvp / t_grad,
            "cached_hvp_over_grad": t_cached / t_grad,
            "matmat_per_vector_over_grad": t_matmat / 5 / t_grad,
            "matmat_mode": mode,
            **tracking,
            "lanczos_hvps_top5": lz.num_matvecs,
            "power_hvps_top5": pw.num_matvecs,
            "callback_over_hvp_time": seconds / (hvps * t_hvp_full),
            "lanczos_converged": lz.converged,
            "power_converged": pw.converged,
            "lanczos_top5": [round(float(e), 5) for e in lz.eigenvalues],
            "power_top5": [round(float(e), 5) for e in pw.eigenvalues],
            "grad_ms": 1000 * t_grad,
            "hvp_ms": 1000 * t_hvp,
            "model": args.model,
            "power_model": args.power_model,
            "backend": args.backend,
            "num_samples": args.num_samples,
            "batch_size": args.batch_size,
        },
        args.json,
    )


def _chosen_mode() -> str:
    from flatlit.curvature.hvp import _MODE_CACHE

    return ",".join(sorted(set(_MODE_CACHE.values()))) or "?"


def tracking_runs(data_dir: str, epochs: int) -> dict:
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
    folder = tempfile.mkdtemp(prefix="flatlit-tracking-")
    t_plain, _ = timed_fit(plain, folder, "plain")
    t_warm, warm_dir = timed_fit(base, folder, "auto")
    t_cold, cold_dir = timed_fit(lanczos_cfg, folder, "lanczos")
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
    }


if __name__ == "__main__":
    main()
