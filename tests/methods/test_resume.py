"""A run stopped mid-way and resumed from its checkpoint ends bit-identical to an uninterrupted run (CPU)."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily


def make(tmp_path, mnist_dir, max_epochs, ckpt_dir):
    pl.seed_everything(0)
    module = SGDFamily(
        arch="lenet",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
    )
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=64, augment="cutout", label_noise=0.2, download=False)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        limit_val_batches=1,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )
    return module, dm, trainer


def test_resume_matches_uninterrupted(tmp_path, mnist_dir):
    full, dm, trainer = make(tmp_path, mnist_dir, 3, tmp_path / "a")
    trainer.fit(full, datamodule=dm)

    part, dm, trainer = make(tmp_path, mnist_dir, 1, tmp_path / "b")
    trainer.fit(part, datamodule=dm)
    resumed, dm, trainer = make(tmp_path, mnist_dir, 3, tmp_path / "b")
    torch.manual_seed(1234)  # the resumed process starts from another RNG state: the checkpoint must not care
    trainer.fit(resumed, datamodule=dm, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert trainer.global_step == 3 * 4
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
