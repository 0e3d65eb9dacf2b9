"""The ``loss`` choice of ClassificationModule (cross-entropy or Cohen et al.'s square loss) and its reach: training,
evaluation and the curvature callbacks."""

import csv

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.func import functional_call, hessian

from flatlit.callbacks import HessianEigenvalues
from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily
from flatlit.methods.base import mse_loss
from flatlit.utils.errors import ConfigError
from tests.helpers import quiet_trainer


def test_mse_is_half_the_mean_over_examples_of_the_summed_squared_error():
    logits, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    expected = 0.5 * sum(((logits[i] - F.one_hot(y[i], 3)) ** 2).sum() for i in range(5)) / 5
    torch.testing.assert_close(mse_loss(logits, y), expected)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 4}, loss="mse")
    torch.testing.assert_close(module.loss_fn(logits, y), expected)
    ce = SGDFamily(arch="mlp", arch_kwargs={"width": 4}, label_smoothing=0.1)
    torch.testing.assert_close(ce.loss_fn(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))


def test_bad_loss_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"model.init_args.loss: one of cross_entropy, mse, got 'hinge'"):
        SGDFamily(arch="mlp", loss="hinge")
    with pytest.raises(ConfigError, match=r"model.init_args.label_smoothing: applies to the cross-entropy loss only"):
        SGDFamily(arch="mlp", loss="mse", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"model.init_args.arch_kwargs: num_classes come from model.init_args"):
        SGDFamily(arch="mlp", arch_kwargs={"num_classes": 3})


def test_validation_loss_is_the_training_loss(mnist_dir):
    torch.manual_seed(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 8}, label_smoothing=0.2)
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=300, val_size=40, download=False)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=0)
    trainer.validate(module, datamodule=dm)
    x, y = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        expected = F.cross_entropy(module.eval()(x), y, label_smoothing=0.2)
    torch.testing.assert_close(trainer.callback_metrics["val/loss"], expected)


def test_full_batch_gd_mse_eigenvalues_match_exact_hessian(mnist_dir, tmp_path):
    """Cohen et al.'s setting in miniature: full-batch GD, square loss, tanh MLP; the callback's λ1, λ2 (measured
    with the module's loss) equal the top eigenvalues of the exact Hessian of the square loss at the final weights."""
    n = 40
    torch.manual_seed(0)
    module = SGDFamily(
        arch="mlp",
        arch_kwargs={"width": 3, "activation": "tanh"},
        loss="mse",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=n, train_subset=n, download=False)
    cb = HessianEigenvalues(top_k=2, num_samples=n, every_n_epochs=1, max_iter=300, tol=1e-10)
    t = quiet_trainer(
        max_epochs=3, limit_val_batches=0, callbacks=[cb], logger=CSVLogger(str(tmp_path)), precision="64-true"
    )
    t.fit(module, datamodule=dm)
    assert t.global_step == 3  # one step per epoch: full batch
    assert sum(len(y) for _, y in cb._batches) == n  # the sample is the whole training set

    module.double().eval()
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    flat = torch.cat([v.reshape(-1) for v in params.values()])

    def sample_loss(loss_fn):
        def f(theta):
            ps, i = {}, 0
            for k, v in params.items():
                ps[k], i = theta[i : i + v.numel()].view_as(v), i + v.numel()
            return sum(len(y) * loss_fn(functional_call(module, ps, (x.double(),)), y) for x, y in cb._batches) / n

        return f

    expected = torch.linalg.eigvalsh(hessian(sample_loss(mse_loss))(flat)).flip(0)[:2]
    with open(f"{t.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("hessian/lambda_1")]
    # at start, then after each of the 3 epochs at the step of the epoch's other metrics (Lightning: last step − 1)
    assert len(rows) == 4 and int(rows[-1]["step"]) == 2 and rows[-1]["epoch"] == "2"
    logged = torch.tensor([float(rows[-1][f"hessian/lambda_{i}"]) for i in (1, 2)], dtype=torch.float64)
    torch.testing.assert_close(logged, expected, rtol=1e-6, atol=0)
    ce_top = torch.linalg.eigvalsh(hessian(sample_loss(F.cross_entropy))(flat))[-1]
    assert abs(ce_top - logged[0]) > 1e-2 * logged[0]  # the callback did not fall back to cross-entropy
