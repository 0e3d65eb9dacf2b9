"""Worker of tests/callbacks/test_ddp_curvature.py: ``torchrun --nproc_per_node 2`` (CPU, gloo)."""

import sys

import torch

from flatlit.callbacks import HessianEigenvalues, HessianTrace
from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily
from tests.helpers import quiet_trainer


def main(data_dir: str, out: str) -> None:
    torch.manual_seed(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 6, "batch_norm": True})
    eig = HessianEigenvalues(top_k=3, num_samples=90, batch_size=20, every_n_epochs=None, max_iter=300, tol=1e-10)
    tr = HessianTrace(num_probes=5, num_samples=90, batch_size=20, every_n_epochs=None)
    dm = MNISTDataModule(data_dir=data_dir, batch_size=30, download=False)
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_steps=1, limit_val_batches=0, precision="64-true", callbacks=[eig, tr]
    )
    trainer.fit(module, datamodule=dm)
    shard = sum(len(y) for _, y in eig._batches)
    torch.save({"eigenvalues": eig.history["eigenvalues"][0], "shard": shard}, f"{out}.{trainer.global_rank}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
