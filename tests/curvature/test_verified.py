"""Issue 22: a reported top-k is a verified top-k (repeated and clustered eigenvalues), each against eigvalsh."""

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, TensorDataset

from flatlit.callbacks import HessianEigenvalues
from flatlit.curvature import lanczos, lobpcg
from tests.helpers import quiet_trainer


def random_symmetric(n, eigs, seed=0):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(eigs) @ q.T


def repeated_top(multiplicity, n=120, seed=0):
    """λ = 3 (``multiplicity`` times), 2.5, 2.2, then [-1, 2]: the exact top-3 hold two or three copies of 3."""
    top = torch.tensor([3.0] * multiplicity + [2.5, 2.2], dtype=torch.float64)
    eigs = torch.cat([top, torch.linspace(-1, 2, n - len(top), dtype=torch.float64)])
    return random_symmetric(n, eigs, seed)


def top(A, k, which="LA"):
    e = torch.linalg.eigvalsh(A)
    return e.flip(0)[:k] if which == "LA" else e[:k]


def assert_true_pairs(A, res, rtol=1e-6):
    """Unit, orthogonal eigenvectors whose residuals are what the result states."""
    V = res.eigenvectors
    torch.testing.assert_close(V @ V.T, torch.eye(len(V), dtype=V.dtype), rtol=0, atol=1e-8)
    for lam, v, r in zip(res.eigenvalues, V, res.residuals):
        assert (A @ v - lam * v).norm() / abs(lam) <= r * (1 + rtol) + 1e-12


@pytest.mark.parametrize("multiplicity", [2, 3])
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_lanczos_finds_every_copy_of_a_repeated_extreme_eigenvalue(multiplicity, which):
    A = repeated_top(multiplicity)
    if which == "SA":
        A = -A
    res = lanczos(lambda v: A @ v, 120, k=3, max_iter=120, tol=1e-6, which=which, dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, top(A, 3, which), rtol=1e-6, atol=0)
    assert res.converged
    assert_true_pairs(A, res)


@pytest.mark.parametrize("multiplicity", [2, 3])
def test_the_old_single_run_misses_the_copy_and_claims_convergence(multiplicity):
    """verify=False is the behaviour of issue 22: λ_1, λ_3, λ_4 reported as converged (so the tests above can fail)."""
    A = repeated_top(multiplicity)
    old = lanczos(lambda v: A @ v, 120, k=3, max_iter=120, tol=1e-6, dtype=torch.float64, verify=False)
    assert old.converged
    assert old.eigenvalues[1] < 2.6  # the second copy of 3 is missing
    assert not torch.allclose(old.eigenvalues, top(A, 3), rtol=1e-6, atol=0)
    new = lanczos(lambda v: A @ v, 120, k=3, max_iter=120, tol=1e-6, dtype=torch.float64)
    assert new.converged and new.num_matvecs > old.num_matvecs  # the verification's products are counted
    torch.testing.assert_close(new.eigenvalues, top(A, 3), rtol=1e-6, atol=0)


def test_a_tight_cluster_is_resolved_in_order():
    cluster = torch.tensor([1.0, 0.9999, 0.9998, 0.9997, 0.9996, 0.9995], dtype=torch.float64)
    A = random_symmetric(150, torch.cat([cluster, torch.linspace(-0.5, 0.9, 144, dtype=torch.float64)]), seed=1)
    for k in (3, 4):
        res = lanczos(lambda v: A @ v, 150, k=k, max_iter=300, tol=1e-10, dtype=torch.float64)
        torch.testing.assert_close(res.eigenvalues, top(A, k), rtol=1e-6, atol=0)
        assert res.converged
        assert_true_pairs(A, res)


def test_a_well_separated_spectrum_costs_a_few_products_to_verify():
    eigs = torch.cat([torch.tensor([50.0, 20.0, 10.0, 5.0, 3.0]), torch.linspace(-1, 1, 195)]).double()
    A = random_symmetric(200, eigs)
    old = lanczos(lambda v: A @ v, 200, k=5, max_iter=120, tol=1e-4, dtype=torch.float64, verify=False)
    new = lanczos(lambda v: A @ v, 200, k=5, max_iter=120, tol=1e-4, dtype=torch.float64)
    assert old.converged and new.converged
    torch.testing.assert_close(new.eigenvalues, old.eigenvalues, rtol=0, atol=0)  # nothing was missing
    assert new.num_matvecs - old.num_matvecs <= 10  # certified by the Lanczos polynomials, not by converging λ_6


def test_few_distinct_eigenvalues_are_filled_up_and_a_short_budget_is_not_converged():
    A = 2 * torch.eye(10, dtype=torch.float64)  # the Krylov space breaks down after one vector
    res = lanczos(lambda v: A @ v, 10, k=3, tol=1e-10, dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, torch.full((3,), 2.0, dtype=torch.float64))
    assert res.converged
    assert_true_pairs(A, res)
    B = repeated_top(2)
    short = lanczos(lambda v: B @ v, 120, k=3, max_iter=20, tol=1e-10, dtype=torch.float64)
    assert not short.converged


@pytest.mark.parametrize("multiplicity", [2, 3])
def test_lobpcg_cold_holds_every_copy_without_verification(multiplicity):
    """b ≥ k random columns hold min(b, d) directions of a d-fold eigenspace: no copy of the top k is missed."""
    A = repeated_top(multiplicity)
    cold = lobpcg(lambda V: A @ V, 120, k=3, max_iter=500, tol=1e-8, dtype=torch.float64)
    torch.testing.assert_close(cold.eigenvalues, top(A, 3), rtol=1e-6, atol=0)
    assert cold.converged


def test_lobpcg_verifies_a_stale_warm_start():
    # an eigenvalue crossing: the previous top-3 eigenvectors are still eigenvectors, a new one rose above them
    eigs = torch.cat([torch.tensor([9.0, 7.0, 5.0]), torch.linspace(-1, 1, 97)]).double()
    A = random_symmetric(100, eigs)
    vecs = torch.linalg.eigh(A).eigenvectors
    z = vecs[:, 50]
    B = A + 11 * torch.outer(z, z)  # z's eigenvalue 11 + (≈0) is now the largest
    res = lobpcg(lambda V: B @ V, 100, k=3, X0=vecs[:, -3:].T, tol=1e-8, dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, top(B, 3), rtol=1e-6, atol=0)
    assert res.converged
    assert_true_pairs(B, res)
    stale = lobpcg(lambda V: B @ V, 100, k=3, X0=vecs[:, -3:].T, tol=1e-8, dtype=torch.float64, verify=False)
    assert stale.converged and float(stale.eigenvalues[0]) == pytest.approx(9.0)  # one Rayleigh-Ritz: fooled


# ---- the callback on a module whose exact Hessian has a double top eigenvalue ------------------------------------
class TwinNets(pl.LightningModule):
    """Two identical, independent sub-networks trained on the sum of their losses: the Hessian is block diagonal
    with two equal blocks, so every eigenvalue is (at least) double, at every step of training."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        self.b = copy.deepcopy(self.a)

    def curvature_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.a(x), y) + F.cross_entropy(self.b(x), y)

    def training_step(self, batch, batch_idx):
        return self.curvature_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def twin_fit(monkeypatch=None):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (64,), generator=g))
    module = TwinNets()
    cb = HessianEigenvalues(top_k=3, num_samples=48, batch_size=16, tol=1e-8, progress_every=None)
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(module, DataLoader(data, batch_size=16))
    return module, cb


def exact_top3(module, batches):
    """The top-3 of the exact Hessian (torch.func.hessian) of the size-weighted mean loss on ``batches``."""
    names = [n for n, _ in module.named_parameters()]
    base = {n: p.detach() for n, p in module.named_parameters()}
    total = sum(len(y) for _, y in batches)

    def loss(flat):
        ps, i = {}, 0
        for n in names:
            ps[n] = flat[i : i + base[n].numel()].view_as(base[n])
            i += base[n].numel()
        out = 0.0
        for name in ("a", "b"):  # the two sub-networks' losses, each with its own block of the flat vector
            sub = {n[2:]: p for n, p in ps.items() if n.startswith(f"{name}.")}
            out = out + sum(
                len(y) * F.cross_entropy(functional_call(getattr(module, name), sub, (x,)), y) for x, y in batches
            )
        return out / total

    H = hessian(loss)(torch.cat([base[n].reshape(-1) for n in names]))
    return torch.linalg.eigvalsh(H).flip(0)[:3]


def test_the_callback_logs_the_exact_top3_of_a_double_top_eigenvalue():
    module, cb = twin_fit()
    expected = exact_top3(module, cb._batches)
    assert expected[0] == pytest.approx(float(expected[1]), rel=1e-9)  # the Hessian's top eigenvalue is double
    logged = torch.tensor([cb.last_metrics[f"hessian/lambda_{i}"] for i in (1, 2, 3)], dtype=torch.float64)
    assert cb.last_metrics["hessian/converged"] == 1.0
    torch.testing.assert_close(logged, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(cb.history["eigenvalues"][-1], dtype=torch.float64), expected)


def test_the_callback_with_the_old_solver_would_log_a_wrong_converged_top3(monkeypatch):
    import flatlit.callbacks.curvature as mod

    monkeypatch.setattr(mod, "lanczos", functools.partial(lanczos, verify=False))
    module, cb = twin_fit()
    expected = exact_top3(module, cb._batches)
    logged = torch.tensor([cb.last_metrics[f"hessian/lambda_{i}"] for i in (1, 2, 3)], dtype=torch.float64)
    assert cb.last_metrics["hessian/converged"] == 1.0
    assert not torch.allclose(logged, expected, rtol=1e-6, atol=0)
