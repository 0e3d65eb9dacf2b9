"""Worker of tests/methods/test_ddp.py: run under ``torchrun --nproc_per_node 2`` (CPU, gloo)."""

import sys

import torch

from flatlit.data import MNISTDataModule
from flatlit.methods import LPFSGD, SAM
from tests.helpers import end_worker, quiet_trainer


def main(data_dir: str, out: str) -> None:
    results = {}
    for sync in (False, True):
        torch.manual_seed(0)
        module = SAM(
            arch="mlp",
            arch_kwargs={"width": 16, "batch_norm": True},
            rho=0.05,
            sync_perturbation=sync,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        )
        w0 = [p.detach().clone() for p in module.model.parameters()]
        dm = MNISTDataModule(data_dir=data_dir, batch_size=60, download=False)
        trainer = quiet_trainer(devices=2, strategy="ddp", max_steps=1, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        results[sync] = {
            "w0": w0,
            "w1": [p.detach().clone() for p in module.model.parameters()],
            "step": trainer.global_step,
        }
    # schedule length: 240 examples over 2 ranks in batches of 20 = 6 batches per rank and epoch, an update every 2
    lpf = LPFSGD(arch="mlp", arch_kwargs={"width": 8}, inc=15, gamma=0.01, accumulate_grad_batches=2)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_epochs=2, limit_val_batches=0)
    trainer.fit(lpf, datamodule=MNISTDataModule(data_dir=data_dir, batch_size=20, download=False))
    results["lpf"] = {"total": lpf.total_updates(), "step": trainer.global_step, "gamma": lpf.current_gamma()}
    for schedule in ("looksam", "ae_sam", "rst", "interval"):  # replicas must stay in lockstep
        torch.manual_seed(0)
        module = SAM(
            arch="mlp",
            arch_kwargs={"width": 8},
            schedule=schedule,
            interval=2,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        )
        trainer = quiet_trainer(devices=2, strategy="ddp", max_steps=6, limit_val_batches=0)
        trainer.fit(module, datamodule=MNISTDataModule(data_dir=data_dir, batch_size=20, download=False))
        results[schedule] = [p.detach().clone() for p in module.model.parameters()]
    rank = torch.distributed.get_rank()
    torch.save(results, f"{out}.{rank}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    end_worker()
