"""Worst-case (APGD) sharpness, m-sharpness and one-step SAM sharpness against closed forms (float64)."""

from __future__ import annotations

import itertools
import math
import types

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

from flatlit.sharpness import MeasureInputs, compute_measure, get_measure
from flatlit.sharpness.base import UNIVERSAL_SETTINGS, generator
from flatlit.sharpness.keskar import subspace_matrix
from flatlit.sharpness.worst_case import apgd_ascent, apgd_checkpoints, chunks_of
from tests.sharpness.common import bn_mlp_model

WORST = ["worst_case_l2", "worst_case_linf", "adaptive_worst_case_l2", "adaptive_worst_case_linf"]


# ---- problems with an exact loss landscape --------------------------------------------------------------------------
def quadratic(A: np.ndarray, b: np.ndarray, w: np.ndarray, sizes=(3, 5, 4)) -> MeasureInputs:
    """nn.Linear(d, 1) with weight w and a loss whose sample mean is exactly L(w) = ½ wᵀAw + bᵀw.

    Rows X with XᵀX/n = A (X = √n·Rᵀ, A = RRᵀ) and targets y with Xᵀy/n = −b; the per-example loss is
    ½(x·w)² − y(x·w). The n = d rows are split into batches of the given sizes."""
    d = len(w)
    X = math.sqrt(d) * np.linalg.cholesky(A).T
    y = np.linalg.solve(X.T, -d * b)
    return _linear_inputs(X, y, w, lambda out, t: (0.5 * out[:, 0] ** 2 - t * out[:, 0]).mean(), sizes)


def linear(g: np.ndarray, w: np.ndarray, sizes=(3, 5, 4)) -> tuple[MeasureInputs, np.ndarray]:
    """L(w) = mean_i x_i·w: a linear loss; returns the inputs and the rows X (so chunk gradients can be formed)."""
    rng = np.random.default_rng(1)
    n = sum(sizes)
    X = rng.normal(size=(n, len(w)))
    X += g - X.mean(0)  # the mean row is g, so ∇L = g
    return _linear_inputs(X, np.zeros(n), w, lambda out, t: out[:, 0].mean(), sizes), X


def _linear_inputs(X, y, w, loss_fn, sizes) -> MeasureInputs:
    assert sum(sizes) == len(X)
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w)[None])
    Xt, yt = torch.tensor(X), torch.tensor(y)
    cuts = np.cumsum((0, *sizes))
    batches = [(Xt[a:b], yt[a:b]) for a, b in itertools.pairwise(cuts)]
    return MeasureInputs(model, batches, loss_fn=loss_fn)


def bn_mlp(seed: int = 0, n: int = 48, batch: int = 12) -> tuple[nn.Module, list, dict]:
    """An MLP with BatchNorm and dropout (float64, train mode, perturbed BN statistics), 48 examples in 4 batches,
    and its initial weights (a state_dict)."""
    g = torch.Generator().manual_seed(seed)
    model = bn_mlp_model(seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        model[2].running_mean.add_(0.1)
        model[2].running_var.mul_(1.5)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)], init


def trust_region_max(A: np.ndarray, g: np.ndarray, rho: float) -> float:
    """max_{‖δ‖ ≤ ρ} gᵀδ + ½δᵀAδ for A ⪰ 0 (boundary solution δ = (λI − A)⁻¹g, λ > λ_max, ‖δ‖ = ρ)."""
    lam, V = np.linalg.eigh(A)
    gt = V.T @ g
    lo = lam.max() + 1e-12
    mu = scipy.optimize.brentq(lambda m: np.linalg.norm(gt / (m - lam)) - rho, lo, lo + np.linalg.norm(g) / rho + 1)
    delta = V @ (gt / (mu - lam))
    return float(g @ delta + 0.5 * delta @ A @ delta)


def random_spd(d: int, lo: float, hi: float, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q @ np.diag(np.linspace(lo, hi, d)) @ q.T


# ---- L2 --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.3, 1.0])
def test_l2_equals_trust_region_maximum_of_a_quadratic(rho):
    d = 12
    rng = np.random.default_rng(0)
    A, b, w = random_spd(d, 0.2, 3.0, seed=2), rng.normal(size=d), 0.5 * rng.normal(size=d)
    r = compute_measure("worst_case_l2", quadratic(A, b, w, sizes=(5, 7)), rho=rho)
    exact = trust_region_max(A, A @ w + b, rho)
    assert r.value == pytest.approx(exact, rel=1e-5)
    clean = 0.5 * w @ A @ w + b @ w
    assert r.extra["clean_loss"] == pytest.approx(clean, rel=1e-12)
    assert r.extra["perturbed_loss"] == pytest.approx(clean + exact, rel=1e-5)
    assert r.cost.gradients == 21 and r.cost.forwards == 0 and r.std_error is None


def test_l2_isotropic_closed_form():
    d, c, rho = 7, 2.5, 0.2
    rng = np.random.default_rng(3)
    b, w = rng.normal(size=d), rng.normal(size=d)
    A = c * np.eye(d)
    r = compute_measure("worst_case_l2", quadratic(A, b, w, sizes=(3, 4)), rho=rho, steps=5)
    assert r.value == pytest.approx(rho * np.linalg.norm(A @ w + b) + 0.5 * c * rho**2, rel=1e-10)


def test_l2_random_start_reaches_the_maximum():
    d, rho = 12, 0.5
    rng = np.random.default_rng(4)
    A, b, w = random_spd(d, 0.5, 2.0, seed=5), rng.normal(size=d), rng.normal(size=d)
    r = compute_measure("worst_case_l2", quadratic(A, b, w, sizes=(6, 6)), rho=rho, seed=3)
    assert r.value == pytest.approx(trust_region_max(A, A @ w + b, rho), rel=1e-5)
    assert r.cost.forwards == 1 and r.settings["seed"] == 3


# ---- L∞ and m-sharpness ----------------------------------------------------------------------------------------------
def test_linf_of_a_linear_loss_is_rho_times_l1_norm():
    rng = np.random.default_rng(6)
    g, w = rng.normal(size=12), rng.normal(size=12)
    inputs, _ = linear(g, w)
    rho = 0.01
    assert compute_measure("worst_case_linf", inputs, rho=rho).value == pytest.approx(rho * np.abs(g).sum(), rel=1e-12)
    adaptive = compute_measure("adaptive_worst_case_linf", inputs, rho=rho).value
    assert adaptive == pytest.approx(rho * (np.abs(w) * np.abs(g)).sum(), rel=1e-12)
    l2 = compute_measure("worst_case_l2", inputs, rho=rho).value
    assert l2 == pytest.approx(rho * np.linalg.norm(g), rel=1e-12)
    al2 = compute_measure("adaptive_worst_case_l2", inputs, rho=rho).value
    assert al2 == pytest.approx(rho * np.linalg.norm(np.abs(w) * g), rel=1e-12)


def test_m_sharpness_averages_per_chunk_maxima():
    rng = np.random.default_rng(7)
    g, w = rng.normal(size=12), rng.normal(size=12)
    inputs, X = linear(g, w, sizes=(3, 5, 4))
    rho, m = 0.02, 5
    # chunks of 5 consecutive examples straddle the batches: rows 0-4, 5-9, 10-11
    chunks = [X[0:5], X[5:10], X[10:12]]
    expected = sum(len(c) * rho * np.abs(c.mean(0)).sum() for c in chunks) / 12
    r = compute_measure("worst_case_linf", inputs, rho=rho, m=m)
    assert r.value == pytest.approx(expected, rel=1e-12)
    assert r.value > compute_measure("worst_case_linf", inputs, rho=rho).value  # ‖mean g‖₁ ≤ mean ‖g_c‖₁, strict here
    assert r.cost.gradients == 21 and r.settings["m"] == m
    # m at least the sample size: one chunk, the plain worst case
    assert compute_measure("worst_case_linf", inputs, rho=rho, m=100).value == pytest.approx(rho * np.abs(g).sum())


def test_chunks_of_cuts_across_batches():
    batches = [(torch.arange(3), torch.arange(3)), (torch.arange(3, 8), torch.arange(3, 8))]
    chunks = chunks_of(batches, 3)
    assert [torch.cat([x for x, _ in c]).tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_apgd_checkpoints_follow_croce_hein():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99, 1.05 → ⌈p·N⌉
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99, 100]
    assert apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19, 20]


def trace_apgd(c: float, rho: float, steps: int) -> tuple[list[float], float]:
    """Points APGD evaluates on the 1-D concave φ(δ) = −(δ − c)² over |δ| ≤ ρ (L2 = L∞ in 1-D), and its best φ."""
    seen: list[float] = []

    def loss_grad(d):
        x = float(d[0])
        seen.append(x)
        return -((x - c) ** 2), [torch.tensor([-2 * (x - c)], dtype=torch.float64)]

    _, best, _ = apgd_ascent(loss_grad, [torch.zeros(1, dtype=torch.float64)], rho, "l2", steps)
    return seen, best


def test_apgd_momentum_follows_croce_hein():
    # η = 2ρ = 8, no checkpoint before iteration 5: z = P(x + η·sign g), x⁺ = P(x + ¾(z − x) + ¼(x − x⁻))
    seen, _ = trace_apgd(c=0.1, rho=4.0, steps=20)
    assert seen[:4] == pytest.approx(
        [0.0, 4.0, 4 + 0.75 * (-4 - 4) + 0.25 * (4 - 0), -1 + 0.75 * (4 + 1) + 0.25 * (-1 - 4)]
    )


def test_apgd_halves_the_step_and_reloads_the_best_point_when_stalled():
    # steps 4: checkpoints after iterations 1, 2, 3, 4. Each of the first three fails to rise (condition 1), so
    # η = 2 → 1 → 0.5 → 0.25 and every step restarts from the best point δ = 0 with fresh momentum: x = ¾·η.
    seen, best = trace_apgd(c=0.1, rho=1.0, steps=4)
    assert seen == pytest.approx([0.0, 1.0, 0.75, 0.375, 0.1875])
    assert best == pytest.approx(-((0.1875 - 0.1) ** 2))


# ---- SAM -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_sharpness_by_hand(adaptive):
    d, rho = 9, 0.3
    rng = np.random.default_rng(8)
    A, b, w = random_spd(d, 0.1, 4.0, seed=9), rng.normal(size=d), rng.normal(size=d)
    r = compute_measure("sam_sharpness", quadratic(A, b, w, sizes=(4, 5)), rho=rho, adaptive=adaptive)
    g = A @ w + b
    t = np.abs(w) if adaptive else np.ones(d)
    eps = rho * t**2 * g / np.linalg.norm(t * g)

    def loss(v):
        return 0.5 * v @ A @ v + b @ v

    assert r.value == pytest.approx(loss(w + eps) - loss(w), rel=1e-12)
    assert r.extra["grad_norm"] == pytest.approx(np.linalg.norm(t * g), rel=1e-12)
    assert (r.cost.forwards, r.cost.gradients) == (1, 1)
    # never above the worst case over the same set
    if not adaptive:
        assert r.value <= trust_region_max(A, g, rho) + 1e-12


# ---- scale invariance of the adaptive measures --------------------------------------------------------------------
def relu_net(alpha: float) -> MeasureInputs:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        net[0].weight.mul_(alpha)
        net[2].weight.div_(alpha)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return MeasureInputs(net, [(x[:12], y[:12]), (x[12:], y[12:])], loss_fn=F.cross_entropy)


@pytest.mark.parametrize(
    "name,settings",
    [
        ("adaptive_worst_case_l2", {"rho": 0.5}),
        ("adaptive_worst_case_linf", {"rho": 0.05}),
        ("adaptive_worst_case_l2", {"rho": 0.5, "m": 8}),
        ("sam_sharpness", {"rho": 0.5, "adaptive": True}),
    ],
)
def test_adaptive_measures_are_rescaling_invariant(name, settings):
    base = compute_measure(name, relu_net(1.0), **settings).value
    assert base > 1e-3
    for alpha in (0.2, 7.0):
        assert compute_measure(name, relu_net(alpha), **settings).value == pytest.approx(base, rel=1e-6)


def test_plain_worst_case_is_not_rescaling_invariant():
    a = compute_measure("worst_case_l2", relu_net(1.0), rho=0.5).value
    b = compute_measure("worst_case_l2", relu_net(7.0), rho=0.5).value
    assert abs(a - b) > 0.01 * a


# ---- Keskar ε-sharpness ---------------------------------------------------------------------------------------------
def test_keskar_reaches_the_box_maximum_of_a_linear_loss_and_the_legacy_sign_does_not():
    rng = np.random.default_rng(10)
    g, w = rng.normal(size=12), 0.1 * rng.normal(size=12)
    inputs, _ = linear(g, w)
    eps, f0 = 1e-3, g @ w
    box_max = (eps * (np.abs(w) + 1) * np.abs(g)).sum()
    r = compute_measure("keskar_sharpness", inputs, eps=eps)
    assert r.value == pytest.approx(100 * box_max / (1 + f0), rel=1e-8)
    assert r.extra["clean_loss"] == pytest.approx(f0, rel=1e-12)
    assert r.extra["max_loss"] == pytest.approx(f0 + box_max, rel=1e-10)
    assert r.std_error is None and r.cost.forwards == 1 and r.cost.gradients == r.extra["evaluations"] >= 2
    legacy = compute_measure("keskar_sharpness", inputs, eps=eps, legacy_sign_bug=True)
    assert legacy.value < 0.5 * r.value


def test_keskar_on_a_separable_quadratic_is_positive_and_at_most_the_box_maximum():
    d, eps = 10, 0.01
    rng = np.random.default_rng(11)
    a = rng.uniform(0.5, 3.0, size=d)
    b, w = rng.normal(size=d), rng.normal(size=d)
    r = compute_measure("keskar_sharpness", quadratic(np.diag(a), b, w, sizes=(4, 6)), eps=eps)
    radius = eps * (np.abs(w) + 1)
    g, f0 = a * w + b, 0.5 * (a * w * w).sum() + b @ w
    box_max = (radius * np.abs(g) + 0.5 * a * radius**2).sum()  # each coordinate at the bound matching sign(g_i)
    assert 0 < r.value <= 100 * box_max / (1 + f0) * (1 + 1e-12)
    assert r.value == pytest.approx(100 * box_max / (1 + f0), rel=1e-6)


def test_keskar_random_subspace_matches_the_closed_form_per_draw():
    rng = np.random.default_rng(12)
    g, w = rng.normal(size=12), 0.1 * rng.normal(size=12)
    inputs, _ = linear(g, w)
    eps, m, seed, f0 = 1e-2, 3, 5, g @ w
    r = compute_measure("keskar_sharpness", inputs, eps=eps, subspace_dim=m, repeats=3, seed=seed)
    gen, values = generator(seed), []
    for _ in range(3):  # documented draws: the t-th A⁺ from generator(seed)
        a_plus = subspace_matrix(12, m, gen)
        a = np.linalg.pinv(a_plus)
        radius = eps * (np.abs(a_plus @ w) + 1)
        values.append(100 * (radius * np.abs(a.T @ g)).sum() / (1 + f0))  # max of (Aᵀg)·y over the y box
    assert r.value == pytest.approx(np.mean(values), rel=1e-8)
    assert r.std_error == pytest.approx(np.std(values, ddof=1) / math.sqrt(3), rel=1e-6)
    assert r.extra["std"] == pytest.approx(np.std(values) * math.sqrt(3 / 2), rel=1e-6)


def test_keskar_split_test_uses_the_test_sample():
    rng = np.random.default_rng(13)
    g, g_test, w = rng.normal(size=12), rng.normal(size=12), 0.1 * rng.normal(size=12)
    inputs, _ = linear(g, w)
    test_inputs, _ = linear(g_test, w)
    inputs.test_batches = test_inputs.batches
    eps = 1e-3
    r = compute_measure("keskar_sharpness", inputs, eps=eps, split="test")
    expected = 100 * (eps * (np.abs(w) + 1) * np.abs(g_test)).sum() / (1 + g_test @ w)
    assert r.value == pytest.approx(expected, rel=1e-8)
    inputs.test_batches = None
    with pytest.raises(ValueError, match="test_batches"):
        compute_measure("keskar_sharpness", inputs, split="test")


# ---- settings, restoration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("worst_case_l2", {"rho": -1}, "rho must be > 0, got -1"),
        ("worst_case_linf", {"steps": 0}, "steps must be an integer >= 1"),
        ("adaptive_worst_case_l2", {"m": 0}, "m must be an integer >= 1"),
        ("adaptive_worst_case_linf", {"seed": 1.5}, "seed must be an integer or None"),
        ("sam_sharpness", {"adaptive": "yes"}, "adaptive must be True or False"),
        ("keskar_sharpness", {"eps": 0}, "eps must be > 0, got 0"),
        ("keskar_sharpness", {"subspace_dim": 0}, "subspace_dim must be an integer >= 1"),
        ("keskar_sharpness", {"split": "val"}, "split must be one of 'train', 'test'"),
    ],
)
def test_bad_settings(name, bad, match):
    model, batches, _ = bn_mlp()
    with pytest.raises(ValueError, match=match):
        compute_measure(name, MeasureInputs(model, batches), **bad)


@pytest.mark.parametrize("name", [*WORST, "sam_sharpness", "keskar_sharpness"])
def test_measure_function_restores_weights_and_grads_itself(name):
    """The bare function (outside compute_measure's observed()) leaves weights, buffers, .grad and RNG as they were."""
    model, batches, init = bn_mlp()
    model.eval()
    for p in list(model.parameters())[:2]:
        p.grad = torch.full_like(p, 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    spec = get_measure(name)
    settings = {k: v for k, v in spec.defaults.items() if k not in UNIVERSAL_SETTINGS}
    if "steps" in settings:
        settings.update(steps=4, m=20, seed=1)
    if name == "keskar_sharpness":
        settings.update(subspace_dim=3, repeats=2, eps=0.05)
    result = spec.fn(MeasureInputs(model, batches), **settings)
    assert math.isfinite(result.value) and result.value >= 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.grad for p in model.parameters()] == grads
    assert all(g is None or torch.all(g == 0.25) for g in grads)
    assert torch.equal(torch.get_rng_state(), rng)
    # through compute_measure from train mode, BatchNorm on batch statistics (buffers move, then are restored)
    model.train()
    compute_measure(name, MeasureInputs(model, batches, init_state=init), bn="train", **settings)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.grad for p in model.parameters()] == grads and all(g is None or torch.all(g == 0.25) for g in grads)
    assert all(m.training for m in model.modules()) and torch.equal(torch.get_rng_state(), rng)


def _box_problem(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((n, n))
    a, b = r @ r.T / n + 0.1 * np.eye(n), rng.standard_normal(n)
    calls = []

    def fun(x):
        calls.append(x.copy())
        return 0.5 * x @ a @ x + b @ x, a @ x + b

    return fun, calls, np.zeros(n), -0.3 * np.ones(n), 0.2 * np.ones(n)


@pytest.mark.parametrize("maxiter", [1, 3, 50])
def test_lbfgsb_driver_follows_scipy_minimize(maxiter, monkeypatch):
    """flatlit's direct setulb driver visits the same points as scipy.optimize.minimize(L-BFGS-B), and falls back
    to minimize when the private routine's signature differs."""
    from flatlit.sharpness import keskar

    fun, calls, x0, lo, up = _box_problem()
    final = keskar.lbfgsb(fun, x0, lo, up, maxiter)
    ours = list(calls)
    calls.clear()
    res = scipy.optimize.minimize(
        fun, x0, jac=True, method="L-BFGS-B", bounds=scipy.optimize.Bounds(lo, up), options={"maxiter": maxiter}
    )
    assert len(ours) == len(calls) == res.nfev
    np.testing.assert_array_equal(np.array(ours), np.array(calls))
    assert final == res.fun
    calls.clear()

    def old_signature(*args):
        raise TypeError("setulb() takes 18 positional arguments")

    monkeypatch.setattr(keskar, "_lbfgsb", types.SimpleNamespace(setulb=old_signature))
    assert keskar.lbfgsb(fun, x0, lo, up, maxiter) == res.fun
