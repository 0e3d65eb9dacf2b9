"""Cost of the curvature engine, measured in one run on real Fashion-MNIST.

- ``hvp_over_grad``: median time of one Hessian-vector product / one gradient, same model, same batch (eval mode).
- ``lanczos_hvps_top5`` / ``power_hvps_top5``: HVPs needed for the top-5 eigenpairs to relative residual 1e-4 by
  Lanczos (full reorthogonalisation) and by deflated power iteration, on the same operator.
- ``callback_over_hvp_time``: wall time of a HessianEigenvalues measurement inside ``Trainer.fit`` / (its HVP count ×
  the median HVP time of its operator): the callback's own overhead (sampling, setup, Lanczos bookkeeping).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import bench_trainer, emit, median_time

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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=128, download=False)
    dm.setup("fit")
    batches = dm.curvature_batches(args.num_samples, args.batch_size, seed=0)

    torch.manual_seed(0)
    module = SGDFamily(arch=args.model, num_classes=10, in_channels=1, image_size=28)
    x, y = batches[0]

    one = HessianOperator(module, [(x, y)], backend=args.backend)
    v = torch.randn(one.numel)
    t_grad = median_time(lambda: gradient_time_reference(module, [(x, y)]), args.repeats)
    t_hvp = median_time(lambda: one.matvec(v), args.repeats)

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
    op2 = HessianOperator(module2, batches, backend=args.backend)
    w = torch.randn(op2.numel)
    t_hvp_full = median_time(lambda: op2.matvec(w), args.repeats)
    emit(
        {
            "hvp_over_grad": t_hvp / t_grad,
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


if __name__ == "__main__":
    main()
