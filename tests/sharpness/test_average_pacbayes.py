"""Average-case sharpness (average, LPF, Neyshabur's expected) and the PAC-Bayes measures against closed forms and
independent re-evaluations (float64)."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

from flatlit.sharpness import MeasureInputs, compute_measure, get_measure
from flatlit.sharpness.base import UNIVERSAL_SETTINGS, generator
from tests.sharpness.test_worst_case import bn_mlp as problem
from tests.sharpness.test_worst_case import quadratic, random_spd, relu_net

AVERAGE = ["average_sharpness", "lpf_sharpness", "expected_sharpness"]
PAC = ["pac_bayes_sharpness", "pac_bayes_magnitude"]


def centred_quadratic(d: int = 10, seed: int = 0, at_minimum: bool = False):
    """L(v) = ½ vᵀAv + bᵀv at weights w (b = −Aw puts w at the minimum); returns inputs, A, b, w."""
    rng = np.random.default_rng(seed)
    A, w = random_spd(d, 0.5, 2.0, seed=seed + 1), rng.normal(size=d)
    b = -A @ w if at_minimum else rng.normal(size=d)
    return quadratic(A, b, w, sizes=(4, d - 4)), A, b, w


def within(result, expected: float, k: float = 3.0) -> bool:
    return abs(result.value - expected) <= k * result.std_error


# ---- average-case measures ------------------------------------------------------------------------------------------
def test_average_sharpness_isotropic_is_half_sigma_squared_trace():
    inputs, A, _, _ = centred_quadratic()
    sigma = 0.2
    r = compute_measure("average_sharpness", inputs, sigma=sigma, draws=400)
    expected = 0.5 * sigma**2 * np.trace(A)  # E[gᵀδ + ½δᵀAδ] = ½σ² tr A
    assert within(r, expected) and r.std_error < 0.2 * expected
    assert r.cost.forwards == 401 and r.value == pytest.approx(r.extra["difference"])


def test_average_sharpness_adaptive_uses_sigma_times_abs_w():
    inputs, A, _, w = centred_quadratic(seed=3)
    sigma = 0.3
    r = compute_measure("average_sharpness", inputs, sigma=sigma, adaptive=True, draws=400)
    expected = 0.5 * sigma**2 * (np.diag(A) * w**2).sum()
    assert within(r, expected)
    assert not within(r, 0.5 * sigma**2 * np.trace(A))  # the isotropic answer is far off


def test_expected_sharpness_uses_neyshabur_per_coordinate_std():
    d = 10
    w = np.linspace(-3.0, 3.0, d) ** 3 / 9  # magnitudes from 0.004 to 3: per-coordinate std matters
    A = np.diag(np.linspace(0.2, 3.0, d)[np.argsort(np.argsort(np.abs(w)))])  # curvature largest where |w| is
    alpha = 0.02
    r = compute_measure(
        "expected_sharpness", quadratic(A, -A @ w, w, sizes=(4, 6)), alpha=alpha, draws=400
    )  # at the min
    s = alpha * (10 * np.abs(w) + 1)
    assert within(r, 0.5 * (np.diag(A) * s**2).sum())
    s_mean = alpha * (10 * np.abs(w).mean() + 1)  # one std per tensor, as the broken original did
    assert not within(r, 0.5 * np.trace(A) * s_mean**2)


def test_lpf_sharpness_is_the_expected_loss():
    inputs, A, b, w = centred_quadratic(seed=5)
    sigma = 0.2
    r = compute_measure("lpf_sharpness", inputs, sigma=sigma, draws=400)
    clean = 0.5 * w @ A @ w + b @ w
    assert within(r, clean + 0.5 * sigma**2 * np.trace(A))
    assert r.extra["clean_loss"] == pytest.approx(clean, rel=1e-12)
    assert r.extra["difference"] == pytest.approx(r.value - clean, rel=1e-12)


def test_adaptive_average_sharpness_is_rescaling_invariant():
    base = compute_measure("average_sharpness", relu_net(1.0), sigma=0.1, adaptive=True, draws=20).value
    scaled = compute_measure("average_sharpness", relu_net(5.0), sigma=0.1, adaptive=True, draws=20).value
    assert scaled == pytest.approx(base, rel=1e-6)
    plain = compute_measure("average_sharpness", relu_net(5.0), sigma=0.1, draws=20).value
    assert abs(plain - base) > 0.01 * abs(base)


# ---- PAC-Bayes -------------------------------------------------------------------------------------------------------
def expected_gap(inputs: MeasureInputs, std, draws: int, seed: int) -> float:
    """Δ re-evaluated here: a copy of the model, the documented draws (per draw, per parameter, randn from
    generator(seed)), plain loops over the batches."""
    model = copy.deepcopy(inputs.model).eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(m) -> float:
        with torch.no_grad():
            total = sum(float(inputs.loss_fn(m(x), y)) * len(y) for x, y in inputs.batches)
        return total / sum(len(y) for _, y in inputs.batches)

    clean, gen, losses = loss(model), generator(seed), []
    for _ in range(draws):
        noisy = copy.deepcopy(model)
        with torch.no_grad():
            for p, q in zip([p for p in noisy.parameters() if p.requires_grad], params):
                p.add_(torch.randn(q.shape, generator=gen, dtype=q.dtype) * std(q))
        losses.append(loss(noisy))
    return float(np.mean(losses)) - clean


def test_pac_bayes_sigma_reaches_the_target_and_value_follows():
    inputs, A, _, w = centred_quadratic(d=12, seed=6, at_minimum=True)
    w0 = w + 0.5 * np.random.default_rng(7).normal(size=12)
    inputs.init_state = {"weight": torch.tensor(w0)[None]}
    inputs.num_train = 5000
    r = compute_measure("pac_bayes_sharpness", inputs)
    sigma, eps = r.extra["sigma"], 0.1
    assert r.extra["converged"] == 1.0
    gap = expected_gap(inputs, lambda q: sigma, draws=10, seed=0)
    assert abs(gap - eps) <= 0.05 * eps and gap == pytest.approx(r.extra["delta_loss"], rel=1e-9)
    # at the minimum Δ(σ) = ½σ²·mean_k z_kᵀAz_k: close to ½σ² tr A up to the Monte-Carlo error of 10 draws
    mc = math.sqrt(2 * np.trace(A @ A) / 10) / np.trace(A)
    assert abs(0.5 * sigma**2 * np.trace(A) - eps) <= (0.05 + 4 * mc) * eps
    dist_sq = ((w - w0) ** 2).sum()
    assert r.value == pytest.approx(dist_sq / (4 * sigma**2) + math.log(2 * 5000 / 1e-6), rel=1e-12)
    zero = compute_measure("pac_bayes_sharpness", inputs, reference="zero")
    assert zero.extra["sigma"] == sigma  # the same search
    assert zero.value == pytest.approx((w**2).sum() / (4 * sigma**2) + math.log(2 * 5000 / 1e-6), rel=1e-12)
    assert r.cost.forwards == 1 + 10 * r.extra["evaluations"]


def test_pac_bayes_on_a_network_reaches_the_target():
    model, batches, init = problem()
    inputs = MeasureInputs(model, batches, init_state=init)
    r = compute_measure("pac_bayes_sharpness", inputs, target=0.2, draws=6, seed=3)
    sigma = r.extra["sigma"]
    model.eval()
    gap = expected_gap(inputs, lambda q: sigma, draws=6, seed=3)
    assert abs(gap - 0.2) <= 0.05 * 0.2
    theta = dict(model.named_parameters())
    dist_sq = sum(float(((theta[k].detach() - init[k]) ** 2).sum()) for k in theta)
    assert r.value == pytest.approx(dist_sq / (4 * sigma**2) + math.log(2 * 48 / 1e-6), rel=1e-12)  # N = sample


def test_pac_bayes_magnitude_formula_and_target():
    model, batches, init = problem(seed=1)
    inputs = MeasureInputs(model, batches, init_state=init, num_train=1000)
    r = compute_measure("pac_bayes_magnitude", inputs, draws=6)
    s, e = r.extra["sigma"], 1e-3
    model.eval()
    gap = expected_gap(inputs, lambda q: torch.sqrt(s**2 * q.detach() ** 2 + e**2), draws=6, seed=0)
    assert r.extra["converged"] == 1.0 and abs(gap - 0.1) <= 0.05 * 0.1
    theta = dict(model.named_parameters())
    d = torch.cat([(theta[k] - init[k]).detach().reshape(-1) for k in theta]).numpy()
    omega = d.size
    numerator = e**2 + (s**2 + 1) * (d**2).sum() / omega
    expected = 0.25 * np.log(numerator / (e**2 + s**2 * d**2)).sum() + math.log(1000 / s) + 10
    assert r.value == pytest.approx(expected, rel=1e-12)


def test_pac_bayes_keeps_the_closest_sigma_when_out_of_steps():
    inputs, *_ = centred_quadratic(d=12, seed=6, at_minimum=True)
    r = compute_measure("pac_bayes_sharpness", inputs, reference="zero", bisection_steps=3)
    assert r.extra["converged"] == 0.0 and r.extra["evaluations"] == 3.0
    # σ = 1e-3, 2e-3, 4e-3: Δ grows with σ and stays far below ε, so the last is the closest
    assert r.extra["sigma"] == pytest.approx(4e-3) and r.extra["delta_loss"] < 0.01


def test_pac_bayes_needs_init_weights_for_reference_init():
    model, batches, _ = problem()
    for name in PAC:
        with pytest.raises(ValueError, match=re.escape('pass MeasureInputs(init_state=...) or use reference="zero"')):
            compute_measure(name, MeasureInputs(model, batches))
        assert math.isfinite(compute_measure(name, MeasureInputs(model, batches), reference="zero", draws=3).value)


# ---- settings, restoration -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("average_sharpness", {"sigma": -1}, "sigma must be > 0, got -1"),
        ("lpf_sharpness", {"draws": 0}, "draws must be an integer >= 1"),
        ("expected_sharpness", {"alpha": 0}, "alpha must be > 0, got 0"),
        ("pac_bayes_sharpness", {"target": -0.1}, "target must be > 0"),
        ("pac_bayes_sharpness", {"reference": "origin"}, "reference must be one of 'init', 'zero'"),
        ("pac_bayes_magnitude", {"mag_eps": 0}, "mag_eps must be > 0"),
        ("pac_bayes_magnitude", {"bisection_steps": 0}, "bisection_steps must be an integer >= 1"),
    ],
)
def test_bad_settings(name, bad, match):
    model, batches, init = problem()
    with pytest.raises(ValueError, match=match):
        compute_measure(name, MeasureInputs(model, batches, init_state=init), **bad)


@pytest.mark.parametrize("name", AVERAGE + PAC)
def test_measure_function_restores_weights_and_grads_itself(name):
    """The bare function (outside compute_measure's observed()) leaves weights, buffers, .grad and RNG as they were."""
    model, batches, init = problem()
    model.eval()
    for p in list(model.parameters())[1:3]:
        p.grad = torch.full_like(p, -1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    settings = {k: v for k, v in get_measure(name).defaults.items() if k not in UNIVERSAL_SETTINGS}
    settings["draws"] = 3
    result = get_measure(name).fn(MeasureInputs(model, batches, init_state=init), **settings)
    assert math.isfinite(result.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.grad for p in model.parameters()] == grads
    assert all(g is None or torch.all(g == -1.5) for g in grads)
    assert torch.equal(torch.get_rng_state(), rng)
    # through compute_measure from train mode, BatchNorm on batch statistics (buffers move, then are restored)
    model.train()
    compute_measure(name, MeasureInputs(model, batches, init_state=init), bn="train", **settings)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.grad for p in model.parameters()] == grads and all(g is None or torch.all(g == -1.5) for g in grads)
    assert all(m.training for m in model.modules()) and torch.equal(torch.get_rng_state(), rng)
