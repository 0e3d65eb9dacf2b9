import copy

import torch
import torch.nn.functional as F

from flatlit.callbacks import HessianEigenvalues
from flatlit.data import MNISTDataModule
from flatlit.methods import NSGD, SGDFamily
from tests.helpers import quiet_trainer


def trainer(**kw):
    return quiet_trainer(**{"limit_val_batches": 0, **kw})


def setup(mnist_dir, **kw):
    torch.manual_seed(0)
    module = NSGD(
        arch="mlp",
        arch_kwargs={"width": 8},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        num_samples=64,
        batch_size=32,
        **kw,
    )
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=48, download=False)
    dm.setup("fit")
    return module, dm, next(iter(dm.train_dataloader()))


def flat_grad(model, x, y):
    m = copy.deepcopy(model)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))])


def test_step_is_nudged_along_the_directions(mnist_dir):
    for mode in ("correct_v", "correct_g"):
        module, dm, (x, y) = setup(mnist_dir, overshoot=0.1, KK=3, mode=mode, random_subspace=True)
        w0 = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        g = flat_grad(module.model, x, y)
        trainer(max_steps=1).fit(module, datamodule=dm)
        V = module.directions.double()
        assert torch.allclose(V @ V.T, torch.eye(3, dtype=torch.float64), atol=1e-5)
        step = -0.1 * g.double()
        expected = w0.double() + step + (0.1 - 1) * V.T @ (V @ step)  # momentum 0: both modes coincide
        got = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_overshoot_one_and_burnin_are_plain_sgd(mnist_dir):
    module, dm, _ = setup(mnist_dir, overshoot=0.01, burnin=5)
    ref = SGDFamily(arch="mlp", arch_kwargs={"width": 8}, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    ref.load_state_dict(module.state_dict())
    trainer(max_epochs=1).fit(module, datamodule=dm)
    trainer(max_epochs=1).fit(ref, datamodule=dm)
    for a, b in zip(module.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert module.directions is None


def test_directions_are_top_eigenvectors_and_shared_with_the_callback(mnist_dir):
    module, dm, _ = setup(mnist_dir, overshoot=0.5, KK=2, include_l2=False, tol=1e-6, max_iter=200)
    trainer(max_steps=1).fit(module, datamodule=dm)
    assert module.eigen_source == "own"
    own = module.directions.clone()
    module, dm, _ = setup(mnist_dir, overshoot=0.5, KK=2, include_l2=False)
    cb = HessianEigenvalues(top_k=3, num_samples=64, batch_size=32, tol=1e-6, max_iter=200)
    trainer(max_steps=1, callbacks=[cb]).fit(module, datamodule=dm)
    assert module.eigen_source == "callback" and cb.history["step"][0] == 0  # the callback's pairs, reused
    overlap = (own.double() @ module.directions.double().T).abs()
    torch.testing.assert_close(overlap.diagonal(), torch.ones(2, dtype=torch.float64), rtol=1e-3, atol=1e-3)
