"""Worst-case sharpness with Andriushchenko et al.'s conventions (ICML 2023, arXiv 2302.07011): their iteration
(``iteration="andriushchenko"``) against a plain hand-run of their update rules, their logit normalisation
(``normalize_logits``) against its formula, and the settings' checks (float64 throughout)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

from flatlit.sharpness import MeasureInputs, compute_measure
from flatlit.sharpness.apgd import andriushchenko_ascent, andriushchenko_checkpoints, project_ellipsoid
from flatlit.sharpness.base import MeasureNotApplicable, inapplicable_reason

WORST = {  # name: (norm, adaptive)
    "worst_case_l2": ("l2", False),
    "worst_case_linf": ("linf", False),
    "adaptive_worst_case_l2": ("l2", True),
    "adaptive_worst_case_linf": ("linf", True),
}


def tiny_mlp(seed: int = 0, n: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Linear(3, 4) → tanh → Linear(4, 3) in float64 and n labelled examples (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def normalized_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (z − mean z)/‖z − mean z‖₂ per example, written out."""
    z = logits - logits.mean(1, keepdim=True)
    z = z / torch.sqrt((z**2).sum(1, keepdim=True))
    return (torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]).mean()


# ---- their update rules, by hand -------------------------------------------------------------------------------------
def hand_run(model, x, y, rho, norm, adaptive, steps, loss=F.cross_entropy):
    """Andriushchenko et al.'s loop as their code runs it, on the model itself: the perturbation δ and the one before
    kept aside, the weights set to w + δ after each step, the best weights copied and reloaded when the step size
    halves. Returns (gain, halvings, ellipsoid projections, best δ); leaves the model's weights as they were."""
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    s = [w.abs() if adaptive else torch.ones_like(w) for w in w0]

    def set_weights(values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)

    def current_loss():
        with torch.no_grad():
            return loss(model(x), y).item()

    def weighted_norm(d):
        return math.sqrt(sum(((di / si) ** 2).sum().item() for di, si in zip(d, s)))

    # the step-size checkpoints of their code: ceil(p_j · steps), tested after the loop index equals one of them
    p, cps = [0.0, 0.22], [0, math.ceil(steps * 0.22)]
    while cps[-1] < steps and cps[-1] != cps[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        cps.append(math.ceil(p[-1] * steps))
    cps = cps[1:]

    clean = current_loss()
    delta = [torch.zeros_like(w) for w in w0]
    before = [d.clone() for d in delta]
    best, best_weights, best_delta = clean, [w.clone() for w in w0], [d.clone() for d in delta]
    step, step_at_cp, best_at_cp, last_cp, new_bests = 2 * rho, 2 * rho, clean, 0, 0
    halvings = projections = 0
    for i in range(steps):
        kept = [d.clone() for d in delta]
        for q in params:
            q.grad = None
        loss(model(x), y).backward()  # at the weights the model holds: w + δ, or the reloaded best weights
        g = [q.grad.detach().clone() for q in params]
        if norm == "l2":
            gnorm = math.sqrt(sum((gi**2).sum().item() for gi in g))
            delta = [d + step / (gnorm + 1e-12) * gi * si for d, gi, si in zip(delta, g, s)]
            if not adaptive:
                n = weighted_norm(delta)
                if n > rho:
                    delta = [d * (rho / n) for d in delta]
            elif weighted_norm(delta) > rho:  # bisection on λ in δ / (1 + 2λ/w²)
                projections += 1
                lam, lo, hi, limit = 0.1, 0.0, 10.0, 10.0
                cand, n = delta, weighted_norm(delta)
                while abs(n - rho) > 1e-5:
                    cand = [d / (1 + 2 * lam / si**2) for d, si in zip(delta, s)]
                    n = weighted_norm(cand)
                    if n > rho:
                        lam, lo = (lam + hi) / 2, lam
                    else:
                        lam, hi = (lo + lam) / 2, lam
                    if limit - hi < 0.01:
                        limit, hi = 2 * limit, 2 * hi
                delta = cand
        else:
            delta = [d + step * gi.sign() * si for d, gi, si in zip(delta, g, s)]
            delta = [torch.max(torch.min(d, rho * si), -rho * si) for d, si in zip(delta, s)]
        delta = [0.75 * d + 0.25 * b for d, b in zip(delta, before)]
        set_weights([w + d for w, d in zip(w0, delta)])
        before = kept
        now = current_loss()
        if now > best:
            best, best_weights, best_delta = now, [q.detach().clone() for q in params], [d.clone() for d in delta]
            new_bests += 1
        if i in cps:
            few = new_bests < 0.75 * (i - last_cp)
            stuck = step_at_cp == step and best_at_cp == best
            step_at_cp, best_at_cp, last_cp, new_bests = step, best, i, 0
            if few or stuck:
                step *= 0.5
                set_weights(best_weights)
                halvings += 1
    for q in params:
        q.grad = None
    set_weights(w0)
    return best - clean, halvings, projections, best_delta


RHO = {"worst_case_l2": 3.0, "worst_case_linf": 0.8, "adaptive_worst_case_l2": 0.8, "adaptive_worst_case_linf": 0.8}


@pytest.mark.parametrize("name", list(WORST))
def test_iteration_matches_a_hand_run_of_their_rules(name):
    norm, adaptive = WORST[name]
    model, x, y = tiny_mlp()
    rho, steps = RHO[name], 8
    gain, halvings, projections, best_delta = hand_run(model, x, y, rho, norm, adaptive, steps)
    assert halvings >= 1 and gain > 1e-3
    if name == "adaptive_worst_case_l2":
        assert projections >= 3
    inputs = MeasureInputs(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    r = compute_measure(name, inputs, rho=rho, steps=steps, iteration="andriushchenko")
    assert r.value == pytest.approx(gain, abs=1e-10)
    assert r.settings["iteration"] == "andriushchenko" and r.cost.gradients == steps + 1
    # the iteration itself returns the same best perturbation
    params = list(model.parameters())
    scale = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]

    def loss_grad(d):
        with torch.no_grad():
            for p, di in zip(params, d):
                p.add_(di)
        out = F.cross_entropy(model(x), y)
        g = torch.autograd.grad(out, params)
        with torch.no_grad():
            for p, di in zip(params, d):
                p.sub_(di)
        return out.item(), list(g)

    f0, f_best, d_best = andriushchenko_ascent(loss_grad, scale, rho, norm, adaptive, steps)
    assert f_best - f0 == pytest.approx(gain, abs=1e-10)
    for a, b in zip(d_best, best_delta):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_m_sharpness_with_their_iteration_averages_hand_runs_per_chunk():
    model, x, y = tiny_mlp(seed=1, n=7)
    rho, steps, m = 0.9, 6, 3
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]  # chunks of 3 straddle the batches: 0-2, 3-5, 6
    r = compute_measure("adaptive_worst_case_l2", MeasureInputs(model, batches), rho=rho, steps=steps, m=m,
                        iteration="andriushchenko")  # fmt: skip
    gains = [hand_run(model, x[a:b], y[a:b], rho, "l2", True, steps)[0] for a, b in [(0, 3), (3, 6), (6, 7)]]
    assert r.value == pytest.approx((3 * gains[0] + 3 * gains[1] + gains[2]) / 7, abs=1e-10)


def test_linf_momentum_closed_form_on_a_linear_loss():
    """On L(w) = mean x·w = g·w every step saturates the clamp (z = ρ·sign g whatever η), so their momentum gives
    δ_k = ρ·sign(g)·(1 − ¼^⌈k/2⌉) (δ_{k+1} = ¾z + ¼δ_{k−1}): a gain ρ‖g‖₁(1 − ¼^⌈steps/2⌉), where APGD reaches
    ρ‖g‖₁."""
    rng = np.random.default_rng(6)
    g, w = rng.normal(size=12), rng.normal(size=12)
    X = rng.normal(size=(12, 12))
    X += g - X.mean(0)
    model = nn.Linear(12, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w)[None])
    Xt = torch.tensor(X)
    inputs = MeasureInputs(model, [(Xt[:5], Xt[:5, 0]), (Xt[5:], Xt[5:, 0])], loss_fn=lambda out, t: out[:, 0].mean())
    rho = 0.01
    for steps in (1, 4, 5):
        r = compute_measure("worst_case_linf", inputs, rho=rho, steps=steps, iteration="andriushchenko")
        assert r.value == pytest.approx(rho * np.abs(g).sum() * (1 - 0.25 ** math.ceil(steps / 2)), rel=1e-12)
        r = compute_measure("adaptive_worst_case_linf", inputs, rho=rho, steps=steps, iteration="andriushchenko")
        expected = rho * (np.abs(w) * np.abs(g)).sum() * (1 - 0.25 ** math.ceil(steps / 2))
        assert r.value == pytest.approx(expected, rel=1e-12)
    assert compute_measure("worst_case_linf", inputs, rho=rho, steps=5).value == pytest.approx(rho * np.abs(g).sum())


def test_checkpoints_of_their_loop():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, ... → ⌈p·N⌉ in floating point (0.70·20 = 14.000000000000002 → 15), stopping
    # at ≥ N or a repeat; each is a loop index, tested after index + 1 steps
    assert andriushchenko_checkpoints(20) == [5, 9, 12, 15, 16, 18, 19, 20]
    assert andriushchenko_checkpoints(8) == [2, 4, 5, 6, 7]
    assert andriushchenko_checkpoints(100) == [22, 41, 58, 70, 80, 87, 93, 99, 105]
    assert andriushchenko_checkpoints(1) == [1]  # never reached: the loop's indices are 0..steps−1


def test_ellipsoid_projection_is_the_euclidean_projection_to_their_tolerance():
    rng = np.random.default_rng(3)
    s = np.abs(rng.normal(size=10)) + 0.1
    s[3] = 0.0  # a zero weight: never perturbed, out of the norm
    d = 3 * rng.normal(size=10) * s
    rho = 0.7
    scale = [torch.tensor(s[:4]), torch.tensor(s[4:])]
    out = project_ellipsoid([torch.tensor(d[:4]), torch.tensor(d[4:])], scale, rho)
    got = torch.cat(out).numpy()
    keep = s > 0
    assert got[3] == 0.0 and abs(np.linalg.norm(got[keep] / s[keep]) - rho) <= 1e-5
    # the exact projection argmin ‖u − d‖ s.t. ‖u/s‖ ≤ ρ: u = d / (1 + μ/s²), μ > 0 solving the norm equation
    mu = scipy.optimize.brentq(lambda m: np.linalg.norm(d[keep] / s[keep] / (1 + m / s[keep] ** 2)) - rho, 0, 1e6)
    exact = d[keep] / (1 + mu / s[keep] ** 2)
    np.testing.assert_allclose(got[keep], exact, atol=1e-4)
    inside = [t * 0.01 for t in out]
    assert all(torch.equal(a, b) for a, b in zip(project_ellipsoid(inside, scale, rho), inside))


def test_their_adaptive_l2_is_not_rescaling_invariant_but_their_adaptive_linf_is():
    """Their adaptive L2 step |w| ⊙ g/‖g‖₂ is normalised by the plain gradient norm, which a layer rescaling
    (layer 1 ×α, layer 2 ×1/α) changes; sign(g) ⊙ |w| and the clamp are invariant."""
    from tests.sharpness.test_worst_case import relu_net

    def value(name, rho, alpha):
        return compute_measure(name, relu_net(alpha), rho=rho, iteration="andriushchenko").value

    base = value("adaptive_worst_case_linf", 0.05, 1.0)
    assert base > 1e-3 and all(value("adaptive_worst_case_linf", 0.05, a) == pytest.approx(base) for a in (0.2, 7.0))
    base = value("adaptive_worst_case_l2", 0.5, 1.0)
    assert abs(value("adaptive_worst_case_l2", 0.5, 7.0) - base) > 0.05 * base


# ---- normalize_logits ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iteration", ["apgd", "andriushchenko"])
def test_normalize_logits_is_the_cross_entropy_of_normalised_logits(iteration):
    model, x, y = tiny_mlp(seed=2)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    settings = {"rho": 0.5, "steps": 6, "iteration": iteration}
    r = compute_measure("adaptive_worst_case_l2", MeasureInputs(model, batches), normalize_logits=True, **settings)
    with torch.no_grad():
        z = model(x).numpy()
    z = z - z.mean(1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    clean = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y.numpy()])
    assert r.extra["clean_loss"] == pytest.approx(clean, rel=1e-12)
    # the same as running on a model whose own loss is that cross-entropy
    own = MeasureInputs(model, batches, loss_fn=normalized_ce)
    assert r.value == pytest.approx(compute_measure("adaptive_worst_case_l2", own, **settings).value, abs=1e-12)
    if iteration == "andriushchenko":
        assert r.value == pytest.approx(hand_run(model, x, y, 0.5, "l2", True, 6, loss=normalized_ce)[0], abs=1e-10)
    plain = compute_measure("adaptive_worst_case_l2", MeasureInputs(model, batches), **settings)
    assert abs(plain.extra["clean_loss"] - r.extra["clean_loss"]) > 0.1  # it does change the loss
    assert r.settings["normalize_logits"] is True and plain.settings["normalize_logits"] is False


def test_a_model_without_class_logits_is_refused_only_with_normalize_logits():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 1).double()
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = torch.randn(8, 1, generator=g, dtype=torch.float64)  # regression targets: no class logits
    inputs = MeasureInputs(model, [(x, t)], loss_fn=F.mse_loss)
    for name in WORST:
        for iteration in ("apgd", "andriushchenko"):
            assert compute_measure(name, inputs, steps=3, iteration=iteration).value >= 0
        assert inapplicable_reason(name, inputs) is None
        with pytest.raises(MeasureNotApplicable, match=f"measure '{name}' needs class logits") as err:
            compute_measure(name, inputs, steps=3, normalize_logits=True)
        assert "\n" not in str(err.value)


# ---- settings ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad,match",
    [
        ({"iteration": "croce"}, "iteration must be one of 'apgd', 'andriushchenko', got 'croce'"),
        ({"normalize_logits": 1}, "normalize_logits must be True or False, got 1"),
        ({"iteration": "andriushchenko", "seed": 3}, r"seed must be None with iteration='andriushchenko'"),
    ],
)
@pytest.mark.parametrize("name", list(WORST))
def test_bad_settings(name, bad, match):
    model, x, y = tiny_mlp()
    with pytest.raises(ValueError, match=match) as err:
        compute_measure(name, MeasureInputs(model, [(x, y)]), **bad)
    assert "\n" not in str(err.value)


def test_defaults_are_apgd_without_normalisation():
    model, x, y = tiny_mlp()
    inputs = MeasureInputs(model, [(x, y)])
    for name in WORST:
        default = compute_measure(name, inputs, steps=5)
        explicit = compute_measure(name, inputs, steps=5, iteration="apgd", normalize_logits=False)
        assert default.value == explicit.value
        assert (default.settings["iteration"], default.settings["normalize_logits"]) == ("apgd", False)
