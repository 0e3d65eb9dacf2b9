import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.func import functional_call, hessian

from flatlit.callbacks import HessianEigenvalues, HessianSpectrum, HessianTrace, HistoryCSV
from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily
from flatlit.utils.errors import ConfigError
from tests.helpers import quiet_trainer


class PlainModule(pl.LightningModule):
    """A LightningModule written here, not a flatlit one: the callbacks only need forward + a DataModule."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 10)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def trainer(**kw):
    return quiet_trainer(**{"limit_val_batches": 0, "deterministic": True, **kw})


def all_callbacks():
    return [
        HessianEigenvalues(top_k=3, num_samples=64, batch_size=32, every_n_steps=3),
        HessianTrace(num_probes=4, num_samples=64, batch_size=32),
        HessianSpectrum(num_runs=2, num_steps=6, num_samples=64, batch_size=32, augment=True),
    ]


def test_callbacks_observe_and_never_perturb(mnist_dir):
    def run(callbacks):
        pl.seed_everything(0)
        module = PlainModule()
        dm = MNISTDataModule(data_dir=mnist_dir, batch_size=32, augment="cutout", download=False)
        t = trainer(max_epochs=2, callbacks=callbacks)
        t.fit(module, datamodule=dm)
        return module, t

    plain, t0 = run([])
    observed, t1 = run(all_callbacks())
    for (n, a), b in zip(plain.state_dict().items(), observed.state_dict().values()):
        assert torch.equal(a, b), n  # weights and BN buffers
    s0, s1 = t0.optimizers[0].state_dict()["state"], t1.optimizers[0].state_dict()["state"]
    assert all(torch.equal(s0[k]["momentum_buffer"], s1[k]["momentum_buffer"]) for k in s0)
    assert t1.callbacks[0].num_measurements >= 3


def test_eigenvalues_match_exact_hessian_of_the_sample(mnist_dir, tmp_path):
    torch.manual_seed(0)
    module = SGDFamily(
        arch="mlp",
        arch_kwargs={"width": 6, "batch_norm": True},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-2),
    )
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=40, download=False)
    cb = HessianEigenvalues(
        top_k=4,
        num_samples=50,
        batch_size=20,
        every_n_epochs=None,
        at_train_start=True,
        include_l2=True,
        max_iter=300,
        tol=1e-9,
    )
    t = trainer(max_steps=1, callbacks=[cb, HistoryCSV()], logger=CSVLogger(str(tmp_path)), precision="64-true")
    # measure at start: compare with the exact Hessian of the same sample at the initial weights
    w0 = {k: v.detach().clone().double() for k, v in module.named_parameters()}
    buffers0 = {k: v.detach().clone() for k, v in module.named_buffers()}
    t.fit(module, datamodule=dm)
    batches = [(x.double(), y) for x, y in cb._batches]
    module.double().eval()
    names = list(w0)
    total = sum(len(y) for _, y in batches)

    def loss(flat):
        ps, i = {k: v.double() if v.is_floating_point() else v for k, v in buffers0.items()}, 0
        for n in names:
            ps[n] = flat[i : i + w0[n].numel()].view_as(w0[n])
            i += w0[n].numel()
        data = sum(len(y) * F.cross_entropy(functional_call(module, ps, (x,)), y) for x, y in batches) / total
        return data + 0.5 * 1e-2 * (flat**2).sum()

    H = hessian(loss)(torch.cat([w0[n].reshape(-1) for n in names]))
    expected = torch.linalg.eigvalsh(H).flip(0)[:4]
    got = torch.tensor(cb.history["eigenvalues"][0], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    saved = np.load(f"{t.log_dir}/eigenvalues.npz")
    assert saved["eigenvalues"].shape == (1, 4) and saved["step"].tolist() == [0]


def test_bad_input_is_caught_at_setup(mnist_dir):
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=32, download=False)
    tiny = SGDFamily(arch="mlp", arch_kwargs={"width": 1, "depth": 0})  # 7850 parameters
    with pytest.raises(ConfigError, match=r"top_k.* exceeds the 7850 parameters"):
        trainer(max_steps=1, callbacks=[HessianEigenvalues(top_k=8000, max_iter=8000, num_samples=10)]).fit(
            tiny, datamodule=dm
        )
    with pytest.raises(ConfigError, match="num_samples: asked for 5000 curvature samples but the training split"):
        trainer(max_steps=1, callbacks=[HessianTrace(num_samples=5000)]).fit(PlainModule(), datamodule=dm)

    def bad_loss(out, y):
        return F.mse_loss(out, y)  # shapes (n, 10) vs (n,): not applicable

    with pytest.raises(ConfigError, match=r"HessianEigenvalues\(loss_fn\): cannot be applied"):
        trainer(max_steps=1, callbacks=[HessianEigenvalues(num_samples=32, loss_fn=bad_loss)]).fit(
            PlainModule(), datamodule=dm
        )
    with pytest.raises(ConfigError, match="top_k"):
        HessianEigenvalues(top_k=0)


def test_resumed_run_continues_the_series(mnist_dir, tmp_path):
    def run(max_epochs, ckpt=None, folder="full"):
        pl.seed_everything(0)
        cb = HessianEigenvalues(top_k=2, num_samples=64, batch_size=32, at_train_start=False, solver="auto")
        t = trainer(
            max_epochs=max_epochs,
            enable_checkpointing=True,
            callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)],
        )
        t.fit(
            PlainModule(), datamodule=MNISTDataModule(data_dir=mnist_dir, batch_size=32, download=False), ckpt_path=ckpt
        )
        return cb

    full = run(3)
    part = run(1, folder="part")  # its own folder: resuming must start from epoch 1, not from the full run's last.ckpt
    ckpt = torch.load(tmp_path / "part" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0
    resumed = run(3, ckpt=str(tmp_path / "part" / "last.ckpt"), folder="part")
    assert resumed.history["step"] == full.history["step"] == [8, 16, 24]
    assert resumed.history["eigenvalues"][0] == full.history["eigenvalues"][0]  # restored from the checkpoint
    # solver="auto" warm-starts LOBPCG from the previous eigenvectors; the checkpoint keeps them, so the
    # resumed run's next measurement is warm-started from exactly the vectors the interrupted run ended with
    state = ckpt["callbacks"][part.state_key]
    assert torch.equal(state["warm_vectors"], part.warm_vectors)
    assert resumed.history["warm_start"] == full.history["warm_start"] == [0, 1, 1]
    # (later eigenvalues are not compared: after a resume this plain-Lightning harness reshuffles its DataLoader from
    # the global RNG, which Lightning does not checkpoint, so the weights differ; `flatlit fit` resumes bit for bit,
    # tests/test_resume_kill.py)
