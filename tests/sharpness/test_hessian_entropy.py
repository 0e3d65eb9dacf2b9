"""Hessian, Fisher-Rao, ε-flatness and entropy measures against independent references (tiny float64 models)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from flatlit.curvature.trace import rademacher
from flatlit.sharpness import MeasureInputs, compute_measure, get_measure

MEASURES = [
    "hessian_trace",
    "hessian_frobenius",
    "theta_h_theta",
    "fisher_rao_norm",
    "epsilon_flatness",
    "local_entropy",
    "prediction_entropy",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids contention with other test processes on the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).double()


def sample(n=(7, 4), dim=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, dim, generator=g, dtype=torch.float64), torch.randint(0, 3, (k,), generator=g)) for k in n]


def exact_hessian(model, batches):
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}
    total = sum(len(y) for _, y in batches)

    def loss(flat):
        ps, i = {}, 0
        for n in names:
            ps[n] = flat[i : i + base[n].numel()].view_as(base[n])
            i += base[n].numel()
        return sum(len(y) * F.cross_entropy(functional_call(model, ps, (x,)), y) for x, y in batches) / total

    flat = torch.cat([base[n].reshape(-1) for n in names])
    return hessian(loss)(flat), flat


# ---- Hessian measures -----------------------------------------------------------------------------------------------
def test_hessian_measures_match_exact_hessian():
    model, batches = mlp(), sample()
    H, theta = exact_hessian(model.eval(), batches)
    inputs = MeasureInputs(model, batches)

    m = 60
    tr = compute_measure("hessian_trace", inputs, probes=m, seed=3)
    exact_tr = float(torch.trace(H))
    assert abs(tr.value - exact_tr) < 4 * tr.std_error
    # the same Rademacher probes applied to the exact Hessian give the same estimate
    g = torch.Generator().manual_seed(3)
    zs = [rademacher(H.shape[0], g, torch.float64, "cpu") for _ in range(m)]
    assert tr.value == pytest.approx(float(sum(z @ H @ z for z in zs)) / m, abs=1e-9)
    assert tr.cost.hvps == m and tr.settings["probes"] == m

    fro = compute_measure("hessian_frobenius", inputs, probes=m, seed=4)
    exact_sq = float((H**2).sum())
    se_sq = fro.extra["frobenius_sq_std_error"]
    assert se_sq < 0.25 * exact_sq
    assert abs(fro.value**2 - exact_sq) < 4 * se_sq
    g = torch.Generator().manual_seed(4)
    vs = [torch.randn(H.shape[0], generator=g, dtype=torch.float64) for _ in range(m)]
    assert fro.value**2 == pytest.approx(float(sum((H @ v).pow(2).sum() for v in vs)) / m, rel=1e-10)
    assert fro.extra["frobenius_sq"] == pytest.approx(fro.value**2, rel=1e-12)
    assert fro.std_error == pytest.approx(se_sq / (2 * fro.value), rel=1e-12)

    tht = compute_measure("theta_h_theta", inputs)
    exact_tht = float(theta @ H @ theta)
    assert tht.value == pytest.approx(exact_tht, abs=1e-8, rel=0)
    assert tht.extra["normalised"] == pytest.approx(exact_tht / float(theta @ theta), abs=1e-8, rel=0)
    assert tht.std_error is None and tht.cost.hvps == 1


def test_probe_settings_are_seeded_and_validated():
    inputs = MeasureInputs(mlp(), sample())
    a = compute_measure("hessian_frobenius", inputs, seed=5)
    b = compute_measure("hessian_frobenius", inputs, seed=5)
    c = compute_measure("hessian_frobenius", inputs, seed=6)
    assert a.value == b.value != c.value
    with pytest.raises(ValueError, match="probes"):
        compute_measure("hessian_trace", inputs, probes=1)
    with pytest.raises(ValueError, match="epsilon"):
        compute_measure("epsilon_flatness", inputs, epsilon=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        compute_measure("local_entropy", inputs, gamma=0.0)


# ---- Fisher-Rao norm ------------------------------------------------------------------------------------------------
def per_example_inner(model, batches):
    params = list(model.parameters())
    out = []
    for x, y in batches:
        for i in range(len(y)):
            g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            out.append(sum(float((gi * p.detach()).sum()) for gi, p in zip(g, params)))
    return torch.tensor(out, dtype=torch.float64)


def test_fisher_rao_norm_matches_per_example_loop():
    model, batches = mlp(), sample()
    ref = float(per_example_inner(model.eval(), batches).pow(2).mean())
    res = compute_measure("fisher_rao_norm", MeasureInputs(model, batches))
    assert res.value == pytest.approx(ref, abs=1e-8, rel=1e-10)
    assert res.extra["norm"] == pytest.approx(math.sqrt(ref))


def test_fisher_rao_norm_with_batch_statistics():
    """bn="train": ℓ_i depends on θ through the batch statistics too; reference by autograd on the batch forward."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    batches = sample()
    ref_model = copy.deepcopy(model).train()
    params = list(ref_model.parameters())
    inner = []
    for x, y in batches:
        out = ref_model(x)
        for i in range(len(y)):
            g = torch.autograd.grad(F.cross_entropy(out[i : i + 1], y[i : i + 1]), params, retain_graph=True)
            inner.append(sum(float((gi * p.detach()).sum()) for gi, p in zip(g, params)))
    ref = float(torch.tensor(inner, dtype=torch.float64).pow(2).mean())
    res = compute_measure("fisher_rao_norm", MeasureInputs(model, batches), bn="train")
    assert res.value == pytest.approx(ref, abs=1e-8, rel=1e-10)
    assert compute_measure("fisher_rao_norm", MeasureInputs(model, batches)).value != pytest.approx(ref, rel=1e-6)


def test_fisher_rao_norm_bias_free_relu_identity():
    torch.manual_seed(2)
    depth = 3  # L + 1 weight layers
    model = nn.Sequential(
        nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)
    ).double()
    batches = sample(n=(6, 5))
    with torch.no_grad():
        terms = []
        for x, y in batches:
            f = model(x)
            dl_df = F.softmax(f, 1) - F.one_hot(y, 3).double()
            terms.append((dl_df * f).sum(1))
    identity = depth**2 * float(torch.cat(terms).pow(2).mean())
    res = compute_measure("fisher_rao_norm", MeasureInputs(model, batches))
    assert res.value == pytest.approx(identity, rel=1e-10)


# ---- quadratic loss: ε-flatness and local entropy ------------------------------------------------------------------
class Point(nn.Module):
    """A model whose output is its parameter vector w; with ``quadratic_loss`` the sample loss is ½a‖w − w*‖²."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1)


def quadratic(a: float, d: int = 6):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    batches = [(torch.zeros(k, 1, dtype=torch.float64), w_star.expand(k, -1)) for k in (3, 5)]

    def loss_fn(out, y):
        return 0.5 * a * ((out - y) ** 2).sum(1).mean()

    return MeasureInputs(Point(w), batches, loss_fn=loss_fn), float((w - w_star).norm())


@pytest.mark.parametrize("a", [0.5, 40.0])
def test_epsilon_flatness_closed_form(a):
    eps = 0.1
    inputs, c = quadratic(a)
    # L(w + ηg) − L(w) = ½a c²((1 + ηa)² − 1) with g = a(w − w*)
    eta = (math.sqrt(1 + 2 * eps / (a * c**2)) - 1) / a
    res = compute_measure("epsilon_flatness", inputs, epsilon=eps, tol=1e-9)
    assert res.extra["bracketed"] == 1.0
    assert abs(res.extra["loss_increase"] - eps) <= 1e-9
    assert res.extra["eta"] == pytest.approx(eta, rel=1e-7)
    assert res.extra["grad_norm"] == pytest.approx(a * c, rel=1e-12)
    assert res.value == pytest.approx(1 / (eta * a * c), rel=1e-7)
    assert res.cost.gradients == 1 and res.cost.forwards == res.extra["evaluations"] > 1


def test_local_entropy_closed_form():
    a, gamma, draws = 2.0, 5.0, 1000
    inputs, c = quadratic(a)
    s2, d = (1 / gamma) ** 2, 6
    # E_{δ~N(0, s²I)} exp(−½a‖c + δ‖²) = (1 + a s²)^(−d/2) exp(−½ a ‖c‖² / (1 + a s²))
    exact = d / 2 * math.log(1 + a * s2) + 0.5 * a * c**2 / (1 + a * s2)
    res = compute_measure("local_entropy", inputs, gamma=gamma, draws=draws, seed=1)
    assert res.std_error < 0.02 * exact
    assert abs(res.value - exact) < 4 * res.std_error
    assert abs(res.extra["mean_loss"] - exact) > 4 * res.std_error  # the log-mean-exp, not the mean loss
    assert res.extra["sigma"] == 1 / gamma and res.cost.forwards == draws
    # the legacy LPF-SGD number from the same draws: −(LSE(+L) − log K + d/2 log 2π − ½ log γ)
    leg = compute_measure("local_entropy", inputs, gamma=gamma, draws=draws, seed=1, legacy=True)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(draws):
        w = inputs.model.w.detach() + torch.randn(d, generator=g, dtype=torch.float64) * (1 / gamma)
        losses.append(float(inputs.loss_fn(w.expand(1, -1), inputs.batches[0][1][:1])))
    ls = torch.tensor(losses, dtype=torch.float64)
    ref_leg = -(float(torch.logsumexp(ls, 0)) - math.log(draws) + d / 2 * math.log(2 * math.pi) - 0.5 * math.log(gamma))
    assert leg.value == pytest.approx(ref_leg, rel=1e-10)
    ref = -(float(torch.logsumexp(-ls, 0)) - math.log(draws))
    assert res.value == pytest.approx(ref, rel=1e-10)


# ---- prediction entropy ---------------------------------------------------------------------------------------------
def test_prediction_entropy_direct():
    model, batches = mlp(), sample()
    with torch.no_grad():
        p = torch.cat([F.softmax(model.eval()(x), 1) for x, _ in batches])
    ref = float(-(p * p.log()).sum(1).mean())
    res = compute_measure("prediction_entropy", MeasureInputs(model, batches))
    assert res.value == pytest.approx(ref, rel=1e-12)
    assert res.extra["normalised"] == pytest.approx(ref / math.log(3), rel=1e-12)
    assert res.cost.forwards == 1


# ---- every measure observes without perturbing -----------------------------------------------------------------------
CHEAP = {"probes": 3, "draws": 3, "max_iter": 20}


@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("name", MEASURES)
def test_measure_leaves_model_rng_and_grads_untouched(name, bn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    model.train()(torch.randn(16, 4, dtype=torch.float64))  # non-trivial running statistics
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    np.random.seed(4)
    rng, np_rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    settings = {k: v for k, v in CHEAP.items() if k in get_measure(name).defaults}
    res = compute_measure(name, MeasureInputs(model, sample()), bn=bn, **settings)
    assert math.isfinite(res.value) and res.name == name and res.settings["bn"] == bn
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is g and torch.equal(g, v) for p, (g, v) in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng) and np.array_equal(np.random.get_state()[1], np_rng)
    assert model.training and all(m.training for m in model.modules())


def test_bn_train_mode_reaches_hessian_operator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.train()(torch.randn(16, 4, dtype=torch.float64) * 3 + 1)  # running stats far from the batch statistics
    inputs = MeasureInputs(model, sample())
    ev = compute_measure("theta_h_theta", inputs, bn="eval").value
    tr = compute_measure("theta_h_theta", inputs, bn="train").value
    assert ev != pytest.approx(tr, rel=1e-6)
