import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from flatlit.curvature import (
    HessianOperator,
    NonDeterministicOperatorError,
    hutchinson,
    hutchpp,
    lanczos,
    lobpcg,
    power_iteration,
    select_params,
    slq_density,
)


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    net = net.double()
    net.train()(torch.randn(16, 1, 6, 6, dtype=torch.float64))  # non-trivial running statistics
    return net


def batches_for(model, shape, n=(7, 5)):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(k, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (k,), generator=g)) for k in n
    ]


def exact_hessian(model, batches, params=None, weight_decay=0.0):
    """Hessian of the size-weighted mean loss by torch.func.hessian (eval mode)."""
    model.eval()
    names = [n for n, p in model.named_parameters() if params is None or any(p is q for q in params)]
    base = {n: p.detach() for n, p in model.named_parameters()}
    total = sum(len(y) for _, y in batches)

    def loss(flat):
        ps, i = dict(base), 0
        for n in names:
            ps[n] = flat[i : i + base[n].numel()].view_as(base[n])
            i += base[n].numel()
        out = sum(len(y) * F.cross_entropy(functional_call(model, ps, (x,)), y) for x, y in batches) / total
        return out + 0.5 * weight_decay * (flat**2).sum()

    flat = torch.cat([base[n].reshape(-1) for n in names])
    return hessian(loss)(flat)


@pytest.mark.parametrize("make, shape", [(tiny_mlp, (5,)), (tiny_cnn, (1, 6, 6))], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("backend, cache", [("double", False), ("double", True), ("func", None)])
def test_hvp_equals_exact_hessian_times_v(make, shape, backend, cache):
    model = make()
    model.train()
    batches = batches_for(model, shape)
    H = exact_hessian(model, batches, weight_decay=1e-3)
    model.train()  # the operator must switch to eval itself and restore the flag
    op = HessianOperator(model, batches, backend=backend, weight_decay=1e-3, cache_graph=cache)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):  # with the cache: the product that builds the graphs, then one on the cached graphs
        v = torch.randn(op.numel, dtype=torch.float64, generator=g)
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-9, atol=1e-11)
        assert model.training and all(m.training for m in model.modules())
    assert (op.graph_bytes > 0) == bool(cache)


def test_backends_agree_and_parameter_filter():
    model = tiny_cnn()
    batches = batches_for(model, (1, 6, 6))
    params = select_params(model, exclude_bn=True)
    assert len(params) == 4
    a = HessianOperator(model, batches, params=params, backend="double")
    b = HessianOperator(model, batches, params=params, backend="func")
    v = torch.randn(a.numel, dtype=torch.float64)
    torch.testing.assert_close(a.matvec(v), b.matvec(v), rtol=1e-10, atol=1e-12)
    H = exact_hessian(model, batches, params=params)
    torch.testing.assert_close(a.matvec(v), H @ v, rtol=1e-9, atol=1e-11)


def test_train_mode_bn_restores_buffers():
    model = tiny_cnn()
    before = [b.clone() for b in model.buffers()]
    op = HessianOperator(model, batches_for(model, (1, 6, 6)), bn_mode="train")
    op.matvec(torch.randn(op.numel, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_determinism_probe_names_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    batches = batches_for(model, (5,))
    HessianOperator(model, batches).check_determinism()  # eval mode: dropout off
    op = HessianOperator(model, batches)
    op.model.train()
    from flatlit.curvature import hvp as hvp_mod

    original = hvp_mod.evaluation_mode

    def keep_training(model, bn_mode="eval"):  # simulate a layer that stays random during the HVP
        from contextlib import nullcontext

        return nullcontext()

    hvp_mod.evaluation_mode = keep_training
    try:
        with pytest.raises(NonDeterministicOperatorError, match="dropout"):
            op.check_determinism()
    finally:
        hvp_mod.evaluation_mode = original


def random_symmetric(n, eigs, seed=0):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag(eigs) @ q.T


def test_lanczos_on_known_spectrum():
    eigs = torch.cat([torch.tensor([50.0, 20.0, 10.0, 5.0, 3.0]), torch.linspace(-1, 1, 195)]).double()
    A = random_symmetric(200, eigs)
    res = lanczos(lambda v: A @ v, 200, k=5, max_iter=120, tol=1e-8, dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([50.0, 20.0, 10.0, 5.0, 3.0], dtype=torch.float64))
    assert res.converged and res.num_matvecs < 120
    for lam, v, r in zip(res.eigenvalues, res.eigenvectors, res.residuals):
        assert (A @ v - lam * v).norm() / abs(lam) <= r * 1.01 + 1e-12
    low = lanczos(lambda v: A @ v, 200, k=2, max_iter=200, tol=1e-6, which="SA", dtype=torch.float64)
    torch.testing.assert_close(low.eigenvalues, eigs.sort().values[:2], rtol=1e-6, atol=1e-6)


def test_lanczos_top5_matches_eigvalsh_of_exact_hessian():
    model = tiny_cnn()
    batches = batches_for(model, (1, 6, 6))
    H = exact_hessian(model, batches)
    op = HessianOperator(model, batches)
    res = lanczos(op.matvec, op.numel, k=5, max_iter=op.numel, tol=1e-10, dtype=torch.float64)
    expected = torch.linalg.eigvalsh(H).flip(0)[:5]
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-6, atol=0)
    assert res.converged


def test_power_iteration_baseline_needs_more_matvecs():
    eigs = torch.cat([torch.tensor([10.0, 9.0, 8.5, 8.0, 7.8]), torch.rand(295, dtype=torch.float64) * 5])
    A = random_symmetric(300, eigs.double(), seed=3)
    lz = lanczos(lambda v: A @ v, 300, k=5, max_iter=300, tol=1e-4, dtype=torch.float64)
    pw = power_iteration(lambda v: A @ v, 300, k=5, max_iter=2000, tol=1e-4, dtype=torch.float64)
    torch.testing.assert_close(pw.eigenvalues, lz.eigenvalues, rtol=1e-3, atol=0)
    assert pw.num_matvecs > 3 * lz.num_matvecs


def test_trace_estimates_within_stated_error():
    eigs = torch.linspace(-2, 10, 300, dtype=torch.float64)
    A = random_symmetric(300, eigs, seed=4)
    true = float(eigs.sum())
    for seed in range(3):
        h = hutchinson(lambda v: A @ v, 300, num_probes=200, seed=seed, dtype=torch.float64)
        assert abs(h.estimate - true) <= 4 * h.std_error
    hp = hutchpp(lambda v: A @ v, 300, num_matvecs=150, seed=0, dtype=torch.float64)
    assert abs(hp.estimate - true) <= 4 * hp.std_error + 1e-9


def test_slq_density_is_a_density_with_the_right_support():
    eigs = torch.cat([torch.zeros(150), torch.full((50,), 4.0)]).double()
    A = random_symmetric(200, eigs, seed=5)
    d = slq_density(lambda v: A @ v, 200, num_runs=3, num_steps=20, dtype=torch.float64)
    mass = torch.trapezoid(d.density, d.grid)
    assert abs(float(mass) - 1) < 1e-3
    near4 = d.density[(d.grid - 4).abs() < 0.5]
    near0 = d.density[d.grid.abs() < 0.5]
    dx = float(d.grid[1] - d.grid[0])
    assert abs(float(near4.sum() * dx) - 0.25) < 0.1 and abs(float(near0.sum() * dx) - 0.75) < 0.1


# ---- batched HVPs and the block solver ------------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [(tiny_mlp, (5,)), (tiny_cnn, (1, 6, 6))], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("mode", ["vmap", "loop", "auto"])
def test_matmat_equals_column_by_column_matvec(make, shape, mode):
    model = make()
    batches = batches_for(model, shape)
    op = HessianOperator(model, batches, weight_decay=1e-3, matmat_mode=mode, cache_graph=False)
    V = torch.randn(op.numel, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    by_column = torch.stack([op.matvec(V[:, j]) for j in range(4)], dim=1)
    torch.testing.assert_close(op.matmat(V), by_column, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.matmat(V, chunk_size=3), by_column, rtol=1e-9, atol=1e-12)  # 3 + 1 columns
    H = exact_hessian(model, batches, weight_decay=1e-3)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-9, atol=1e-11)
    assert op.num_matvecs == 4 + 3 * 4


def test_matmat_respects_the_parameter_filter_and_refuses_bad_shapes():
    model = tiny_cnn()
    batches = batches_for(model, (1, 6, 6))
    params = select_params(model, exclude_bn=True)
    op = HessianOperator(model, batches, params=params)
    V = torch.randn(op.numel, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    H = exact_hessian(model, batches, params=params)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="matmat expects"):
        op.matmat(V.T)
    with pytest.raises(ValueError, match="matmat_mode"):
        HessianOperator(model, batches, matmat_mode="fast")


def test_lobpcg_top5_matches_eigvalsh_of_exact_hessian():
    model = tiny_cnn()
    batches = batches_for(model, (1, 6, 6))
    H = exact_hessian(model, batches)
    op = HessianOperator(model, batches)
    res = lobpcg(op.matmat, op.numel, k=5, max_iter=300, tol=1e-9, dtype=torch.float64)
    expected = torch.linalg.eigvalsh(H).flip(0)[:5]
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-6, atol=0)
    assert res.converged and res.num_matvecs == op.num_matvecs
    for lam, v in zip(res.eigenvalues, res.eigenvectors):  # unit Ritz vectors with the stated residual
        assert abs(v.norm() - 1) < 1e-9 and (H @ v - lam * v).norm() / abs(lam) <= 1e-9 * 1.01


def test_lobpcg_on_known_spectra_clustered_negative_and_smallest():
    top = torch.tensor([50.0, 20.0, 19.99, 19.98, -3.0]).double()  # a cluster of three and a negative one
    eigs = torch.cat([top[:4], torch.tensor([-30.0, -29.0]).double(), torch.linspace(-1, 1, 194).double()])
    A = random_symmetric(200, eigs)
    res = lobpcg(lambda V: A @ V, 200, k=4, max_iter=500, tol=1e-8, dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, eigs.sort(descending=True).values[:4], rtol=1e-8, atol=0)
    assert res.converged
    low = lobpcg(lambda V: A @ V, 200, k=2, max_iter=500, tol=1e-8, which="SA", dtype=torch.float64)
    torch.testing.assert_close(low.eigenvalues, torch.tensor([-30.0, -29.0]).double(), rtol=1e-8, atol=0)
    assert low.converged
    with pytest.raises(ValueError, match="which"):
        lobpcg(lambda V: A @ V, 200, k=2, which="LM")


def test_lobpcg_warm_started_from_the_exact_eigenvectors_converges_in_one_block_iteration():
    eigs = torch.cat([torch.tensor([9.0, 7.0, 5.0]), torch.linspace(-1, 1, 97)]).double()
    A = random_symmetric(100, eigs)
    vecs = torch.linalg.eigh(A).eigenvectors[:, -3:].flip(1)  # columns: the top-3 eigenvectors
    counted = []

    def matmat(V):
        counted.append(V.shape[1])
        return A @ V

    res = lobpcg(matmat, 100, k=3, X0=vecs.T, tol=1e-10, dtype=torch.float64, verify=False)
    assert res.converged and counted == [3] and res.num_matvecs == 3  # one Rayleigh-Ritz on X0, no new directions
    torch.testing.assert_close(res.eigenvalues, torch.tensor([9.0, 7.0, 5.0]).double(), rtol=1e-12, atol=0)
    # by default a warm start is verified (a stale one can span a no longer extreme invariant subspace): the same
    # block iteration, then single products of the verification restart, all counted
    counted.clear()
    res = lobpcg(matmat, 100, k=3, X0=vecs.T, tol=1e-10, dtype=torch.float64)
    assert res.converged and counted[0] == 3 and set(counted[1:]) == {1} and res.num_matvecs == sum(counted) <= 10
    torch.testing.assert_close(res.eigenvalues, torch.tensor([9.0, 7.0, 5.0]).double(), rtol=1e-12, atol=0)
    # a nearby start (a perturbed previous measurement) to the tracking tolerance: far fewer block products than cold
    noise = 1e-3 * torch.randn(3, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cold = lobpcg(lambda V: A @ V, 100, k=3, tol=1e-3, dtype=torch.float64)
    near = lobpcg(lambda V: A @ V, 100, k=3, X0=vecs.T + noise, tol=1e-3, dtype=torch.float64, verify=False)
    assert near.converged and cold.converged and near.num_matvecs <= cold.num_matvecs / 2


# ---- cached gradient graphs ------------------------------------------------------------------------------------------
class CountingForward(nn.Module):
    """Counts the forward passes of the wrapped network."""

    def __init__(self, net):
        super().__init__()
        self.net, self.forwards = net, 0

    def forward(self, x):
        self.forwards += 1
        return self.net(x)


def test_cached_graphs_pay_the_forward_once_and_agree_with_recomputation():
    model = CountingForward(tiny_cnn())
    batches = batches_for(model, (1, 6, 6))
    fresh = HessianOperator(model, batches, cache_graph=False)
    cached = HessianOperator(model, batches, cache_graph=True)
    V = torch.randn(fresh.numel, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    model.forwards = 0
    expected = torch.stack([fresh.matvec(V[:, j]) for j in range(3)], dim=1)
    assert model.forwards == 3 * len(batches)
    model.forwards = 0
    got = torch.stack([cached.matvec(V[:, j]) for j in range(3)], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cached.matmat(V), expected, rtol=1e-12, atol=1e-14)
    assert model.forwards == len(batches)  # one forward per batch for 6 products
    assert cached.num_matvecs == 6 and cached.graph_bytes > 0
    cached.release()
    assert cached.graph_bytes == 0
    cached.matvec(V[:, 0])
    assert model.forwards == 2 * len(batches)


def test_cached_graphs_are_rebuilt_when_the_weights_or_buffers_change():
    model = tiny_cnn()
    batches = batches_for(model, (1, 6, 6))
    op = HessianOperator(model, batches, cache_graph=True)
    v = torch.randn(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    op.matvec(v)
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # an optimizer step
    torch.testing.assert_close(op.matvec(v), exact_hessian(model, batches) @ v, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        model[1].running_var.mul_(2.0)  # BN statistics of a training step
    torch.testing.assert_close(op.matvec(v), exact_hessian(model, batches) @ v, rtol=1e-9, atol=1e-11)


def test_graphs_over_the_memory_budget_fall_back_to_recomputation():
    model = tiny_cnn()
    batches = batches_for(model, (1, 6, 6))
    op = HessianOperator(model, batches, graph_budget=1)  # auto: measure the saved tensors, give up
    v = torch.randn(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(op.matvec(v), exact_hessian(model, batches) @ v, rtol=1e-9, atol=1e-11)
    assert op.cache_graph is False and op.graph_bytes == 0
    roomy = HessianOperator(model, batches, graph_budget=1 << 30)
    roomy.matvec(v)
    assert 0 < roomy.graph_bytes < 1 << 20


def test_determinism_probe_still_sees_dropout_with_the_cache_on(monkeypatch):
    from contextlib import nullcontext

    from flatlit.curvature import hvp as hvp_mod

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    op = HessianOperator(model, batches_for(model, (5,)), cache_graph=True)
    monkeypatch.setattr(hvp_mod, "evaluation_mode", lambda model, bn_mode="eval": nullcontext())  # dropout stays on
    v = torch.randn(op.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(op.matvec(v), op.matvec(v), rtol=0, atol=0)  # one cached mask: blind to it
    with pytest.raises(NonDeterministicOperatorError, match="dropout"):
        op.check_determinism()  # the probe recomputes both products
