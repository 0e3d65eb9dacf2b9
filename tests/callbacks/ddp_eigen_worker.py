"""Worker of tests/callbacks/test_ddp_curvature.py: ``torchrun --nproc_per_node 2`` (CPU, gloo)."""

import sys

import torch
from lightning.pytorch import Callback

from flatlit.callbacks import HessianEigenvalues, HessianTrace
from flatlit.curvature import HessianOperator
from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily
from flatlit.utils.nn import rank0_buffers
from tests.helpers import end_worker, quiet_trainer


def main(data_dir: str, out: str) -> None:
    torch.manual_seed(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 6, "batch_norm": True})
    eig = HessianEigenvalues(top_k=3, num_samples=90, batch_size=20, every_n_epochs=None, max_iter=300, tol=1e-10)
    tr = HessianTrace(num_probes=5, num_samples=90, batch_size=20, every_n_epochs=None)
    dm = MNISTDataModule(data_dir=data_dir, batch_size=30, download=False)
    mm = BatchedHVP(eig)
    # measured after the first step, when the ranks' BatchNorm statistics already differ
    after = HessianEigenvalues(
        top_k=2,
        num_samples=90,
        batch_size=20,
        every_n_epochs=None,
        every_n_steps=1,
        at_train_start=False,
        max_iter=300,
        tol=1e-10,
        solver="block",
    )
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_steps=1, limit_val_batches=0, precision="64-true", callbacks=[eig, tr, mm, after]
    )
    trainer.fit(module, datamodule=dm)
    shard = sum(len(y) for _, y in eig._batches)
    result = {"eigenvalues": eig.history["eigenvalues"][0], "shard": shard, **mm.result}
    result["after_step"] = after.history["eigenvalues"][0]
    torch.save(result, f"{out}.{trainer.global_rank}")


class BatchedHVP(Callback):
    """At the end of training, while the process group is alive: H V from this rank's half of the sample,
    all-reduced (the operator's default under torch.distributed)."""

    def __init__(self, eig: HessianEigenvalues) -> None:
        self.eig, self.result = eig, {}

    def on_train_end(self, trainer, pl_module) -> None:
        assert torch.distributed.is_initialized()
        batches = [(x.double(), y) for x, y in self.eig._batches]
        op = HessianOperator(pl_module, batches)
        V = torch.randn(op.numel, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        with rank0_buffers(pl_module):  # BN statistics differ between ranks after a step
            out = op.matmat(V)
        self.result = {"matmat": out, "V": V, "state": state}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_worker()
