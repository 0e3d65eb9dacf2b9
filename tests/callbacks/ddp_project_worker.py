"""Worker of tests/callbacks/test_ddp_curvature.py: a plain-Lightning project under ``torchrun --nproc_per_node 2``
(CPU, gloo), trained with and without the curvature callbacks."""

import sys

import lightning.pytorch as pl
import torch

from flatlit.callbacks import HessianEigenvalues, HessianTrace
from tests.callbacks.projects import Net, ShuffleGeneratorDM
from tests.helpers import end_worker, quiet_trainer


def fit(callbacks):
    pl.seed_everything(0)
    module = Net(frozen_bn=True)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=2, callbacks=callbacks)
    trainer.fit(module, datamodule=ShuffleGeneratorDM())
    opt = trainer.optimizers[0].state_dict()["state"]
    return trainer, {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "momentum": [opt[k]["momentum_buffer"].clone() for k in sorted(opt)],
        "flags": [m.training for m in module.modules()],
        "rng": torch.get_rng_state(),
    }


def main(out: str) -> None:
    _, plain = fit([])
    eig = HessianEigenvalues(top_k=3, num_samples=40, batch_size=16, max_iter=200, tol=1e-10)
    trainer, observed = fit([eig, HessianTrace(num_probes=3, num_samples=24, batch_size=8, every_n_steps=3)])
    result = {"plain": plain, "observed": observed, "eigenvalues": eig.last_result.eigenvalues, "batches": eig._batches}
    torch.save(result, f"{out}.{trainer.global_rank}")


if __name__ == "__main__":
    main(sys.argv[1])
    end_worker()
