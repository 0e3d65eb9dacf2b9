"""LPF-SGD's conventions (Bisla et al. 2022, arXiv 2201.08025; SPEC §5.6) and Jiang et al.'s dataset-size scaling,
each against an independent computation written out here:

* ``reparametrize="lpf_norm"``: the measure sees the same function (losses and logits to 1e-12 in float64) with unit
  filters, and gives what the measure gives on ``lpf_normalize(model)`` (parameter norms by hand, an explicit
  ``params`` selection and ``init_state`` mapped, after ``bn="fold"`` too);
* ``scale``: √(v/m) and ½(v − log m) with m = ``num_train`` or the sample size, standard errors by the delta method;
* ``lanczos_trace`` / ``effective_dimension`` with as many iterations as parameters: the exact trace and
  Σ λ/(λ+1) of the Hessian from ``torch.func.hessian``;
* ``local_entropy_grad_norm``: a plain loop of the SGLD steps with the same seeded noise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from flatlit.sharpness import MeasureInputs, MeasureResult, compute_measure, get_measure
from flatlit.sharpness.base import Cost, _scaled, inapplicable_reason
from flatlit.sharpness.norms import lpf_normalize
from tests.sharpness.common import problem


# ---- a small CNN with BatchNorm and a bias-less layer ---------------------------------------------------------------
def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).double()
    bn = model[1]
    with torch.no_grad():  # BatchNorm statistics and affine parameters away from their defaults
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return model.eval()


def cnn_batches(n: int = 12, batch: int = 6) -> list:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def unit_terms(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output unit: ‖W_j/p_j‖² + (b_j/p_j)² with p_j = ‖W_j‖₂ + |b_j| (written out here), and p_j."""
    w = weight.detach().reshape(weight.shape[0], -1)
    b = torch.zeros(w.shape[0], dtype=w.dtype) if bias is None else bias.detach()
    p = w.norm(dim=1) + b.abs()
    return (w.pow(2).sum(1) + b.pow(2)) / p.pow(2), p


def bn_terms(bn: nn.BatchNorm2d) -> torch.Tensor:
    g, b = bn.weight.detach(), bn.bias.detach()
    return (g.pow(2) + b.pow(2)) / (g.abs() + b.abs()).pow(2)


def lpf_sq_norms(model: nn.Module) -> float:
    """‖θ‖² of the LPF-normalised CNN, by hand from the original weights."""
    total = unit_terms(model[0].weight, None)[0].sum() + bn_terms(model[1]).sum()
    total = (
        total
        + unit_terms(model[3].weight, model[3].bias)[0].sum()
        + unit_terms(model[6].weight, model[6].bias)[0].sum()
    )
    return float(total)


# ---- reparametrize="lpf_norm" ---------------------------------------------------------------------------------------
def test_lpf_norm_keeps_the_function_and_gives_unit_filters():
    model, batches = cnn(), cnn_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def batch_loss(m, batch):
        seen.append(m)
        return F.cross_entropy(m(batch[0]), batch[1])

    res = compute_measure(
        "theta_h_theta", MeasureInputs(model, batches, batch_loss=batch_loss), reparametrize="lpf_norm"
    )
    assert res.settings["reparametrize"] == "lpf_norm" and res.settings["scale"] == "none"
    normed = seen[0]
    assert normed is not model and all(m is normed for m in seen)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        for x, y in batches:
            assert (normed(x) - model(x)).abs().max() <= 1e-12
            assert abs(float(F.cross_entropy(normed(x), y) - F.cross_entropy(model(x), y))) <= 1e-12
    units = 0
    for mod in normed.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
            b = torch.zeros(w.shape[0], dtype=w.dtype) if mod.bias is None else mod.bias.detach()
            assert torch.allclose(w.norm(dim=1) + b.abs(), torch.ones_like(b), rtol=0, atol=1e-12)
            units += w.shape[0]
        elif isinstance(mod, nn.BatchNorm2d):
            s = mod.weight.detach().abs() + mod.bias.detach().abs()
            assert torch.allclose(s, torch.ones_like(s), rtol=0, atol=1e-12)
            units += s.numel()
    assert units == 3 + 3 + 4 + 3  # conv, BN, conv, linear: every unit normalised
    # the logits too: the prediction entropy is the same on the normalised copy
    plain = compute_measure("prediction_entropy", MeasureInputs(model, batches))
    normal = compute_measure("prediction_entropy", MeasureInputs(model, batches), reparametrize="lpf_norm")
    assert normal.value == pytest.approx(plain.value, rel=0, abs=1e-12)


def test_lpf_norm_measures_equal_the_measure_on_the_normalised_copy():
    model, batches = cnn(), cnn_batches()
    inputs = MeasureInputs(model, batches)
    # every parameter: ‖θ‖ of unit filters, by hand
    res = compute_measure("param_norm", inputs, reparametrize="lpf_norm")
    assert res.value == pytest.approx(math.sqrt(lpf_sq_norms(model)), rel=1e-12)
    # a Monte-Carlo measure: the same draws on lpf_normalize(model) by hand
    by_hand = compute_measure("lpf_sharpness", MeasureInputs(lpf_normalize(model), batches), draws=3)
    assert compute_measure("lpf_sharpness", inputs, draws=3, reparametrize="lpf_norm").value == by_hand.value
    # an explicit selection is mapped onto the copy: the bias-less conv has 3 unit filters, so ‖W‖ = √3
    only_conv = MeasureInputs(model, batches, params=[model[0].weight])
    assert compute_measure("param_norm", only_conv, reparametrize="lpf_norm").value == pytest.approx(math.sqrt(3))
    only_bn = MeasureInputs(model, batches, params=[model[1].weight, model[1].bias])
    expected = math.sqrt(float(bn_terms(model[1]).sum()))
    assert compute_measure("param_norm", only_bn, reparametrize="lpf_norm").value == pytest.approx(expected, rel=1e-12)


def test_lpf_norm_after_folding_and_of_the_initial_weights():
    model, batches = cnn(), cnn_batches()
    bn = model[1]
    # bn="fold" first: the conv takes the BN scale and a bias, then its units are normalised
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    w_fold = model[0].weight.detach() * scale.view(-1, 1, 1, 1)
    b_fold = bn.bias.detach() - bn.running_mean * scale
    sq, _ = unit_terms(w_fold, b_fold)
    w_only = (w_fold.reshape(3, -1).pow(2).sum(1) / (w_fold.reshape(3, -1).norm(dim=1) + b_fold.abs()).pow(2)).sum()
    only_conv = MeasureInputs(model, batches, params=[model[0].weight])
    res = compute_measure("param_norm", only_conv, bn="fold", reparametrize="lpf_norm")
    assert res.value == pytest.approx(math.sqrt(float(w_only)), rel=1e-12)
    everything = compute_measure("param_norm", MeasureInputs(model, batches), bn="fold", reparametrize="lpf_norm")
    rest = unit_terms(model[3].weight, model[3].bias)[0].sum() + unit_terms(model[6].weight, model[6].bias)[0].sum()
    assert everything.value == pytest.approx(math.sqrt(float(sq.sum() + rest)), rel=1e-12)
    # the initial weights are normalised with their own norms: θ₀ = θ is at distance 0, another θ₀ by hand
    same = MeasureInputs(model, batches, init_state=model.state_dict())
    assert compute_measure("distance_from_init", same, reparametrize="lpf_norm").value == 0.0
    init = cnn(seed=7)
    other = MeasureInputs(model, batches, init_state=init.state_dict())
    d2 = 0.0
    for i in (0, 3, 6):
        w, w0 = model[i].weight.detach(), init[i].weight.detach()
        b = None if model[i].bias is None else model[i].bias.detach()
        b0 = None if init[i].bias is None else init[i].bias.detach()
        p, p0 = unit_terms(w, b)[1], unit_terms(w0, b0)[1]
        shape = (-1,) + (1,) * (w.ndim - 1)
        d2 += float((w / p.view(shape) - w0 / p0.view(shape)).pow(2).sum())
        if b is not None:
            d2 += float((b / p - b0 / p0).pow(2).sum())
    g, be, g0, be0 = bn.weight.detach(), bn.bias.detach(), init[1].weight.detach(), init[1].bias.detach()
    p, p0 = g.abs() + be.abs(), g0.abs() + be0.abs()
    d2 += float((g / p - g0 / p0).pow(2).sum() + (be / p - be0 / p0).pow(2).sum())
    assert compute_measure("distance_from_init", other, reparametrize="lpf_norm").value == pytest.approx(
        math.sqrt(d2), rel=1e-12
    )


# ---- scale -----------------------------------------------------------------------------------------------------------
def test_scale_sqrt_m_and_half_log_m():
    model, batches, _ = problem()
    v = compute_measure("param_norm", MeasureInputs(model, batches)).value
    for num_train, m in ((1000, 1000), (None, 48)):  # num_train, else the sample size (48 examples)
        inputs = MeasureInputs(model, batches, num_train=num_train)
        root = compute_measure("param_norm", inputs, scale="sqrt_m")
        assert root.value == math.sqrt(v / m) and root.extra["unscaled"] == v and root.extra["m"] == m
        assert root.settings["scale"] == "sqrt_m" and root.settings["reparametrize"] is None
        half = compute_measure("param_norm", inputs, scale="half_log_m")
        assert half.value == 0.5 * (v - math.log(m)) and half.extra["m"] == m
    # the standard error by the delta method
    inputs = MeasureInputs(model, batches, num_train=500)
    plain = compute_measure("local_entropy", inputs, draws=4)
    root = compute_measure("local_entropy", inputs, draws=4, scale="sqrt_m")
    half = compute_measure("local_entropy", inputs, draws=4, scale="half_log_m")
    assert plain.value > 0 and plain.std_error > 0
    assert root.std_error == pytest.approx(plain.std_error / (2 * math.sqrt(plain.value * 500)), rel=1e-12)
    assert half.std_error == pytest.approx(plain.std_error / 2, rel=1e-12)
    assert compute_measure("param_norm", inputs, scale="none") == compute_measure("param_norm", inputs)
    # √ of a negative value: NaN with a one-line warning
    negative = MeasureResult("x", -2.0, 0.1, Cost(), {}, {})
    with pytest.warns(RuntimeWarning, match="negative value"):
        out = _scaled(negative, "sqrt_m", 10)
    assert math.isnan(out.value) and math.isnan(out.std_error) and out.extra["unscaled"] == -2.0


def test_defaults_keep_the_measure_function_value():
    model, batches, _ = problem()
    inputs = MeasureInputs(model, batches)
    spec = get_measure("theta_h_theta")
    assert {k: spec.defaults[k] for k in ("bn", "reparametrize", "scale")} == {
        "bn": "eval",
        "reparametrize": None,
        "scale": "none",
    }
    assert compute_measure("theta_h_theta", inputs).value == spec.fn(inputs).value


@pytest.mark.parametrize(("setting", "value"), [("reparametrize", "foo"), ("scale", "bar"), ("reparametrize", "none")])
def test_bad_universal_setting_is_one_line(setting, value):
    model, batches, _ = problem()
    inputs = MeasureInputs(model, batches)
    for call in (compute_measure, inapplicable_reason):
        with pytest.raises(ValueError) as err:
            call("param_norm", inputs, **{setting: value})
        msg = str(err.value)
        assert "\n" not in msg and f"setting {setting!r} must be one of" in msg and repr(value) in msg


# ---- lanczos_trace / effective_dimension ----------------------------------------------------------------------------
def exact_spectrum(model: nn.Module, batches: list, loss_fn) -> torch.Tensor:
    """Eigenvalues of the Hessian of the size-weighted mean loss, by torch.func.hessian on the flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i : i + s.numel()].view(s)
            i += s.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.linalg.eigvalsh(hessian(loss)(flat))


def tanh_regression():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    return model, [(x[:8], y[:8]), (x[8:], y[8:])]


@pytest.mark.parametrize("case", ["regression", "classifier"])
def test_lanczos_measures_with_full_iterations_are_exact(case):
    if case == "regression":
        model, batches = tanh_regression()
        loss_fn = F.mse_loss
    else:  # CE with BatchNorm (eval): a null space, so the Krylov space breaks down early
        model, batches, _ = problem()
        loss_fn = F.cross_entropy
    model.eval()
    lam = exact_spectrum(model, batches, loss_fn)
    d = lam.numel()
    inputs = MeasureInputs(model, batches, loss_fn=loss_fn)
    tr = compute_measure("lanczos_trace", inputs, iterations=1000, draws=2)  # capped at d
    de = compute_measure("effective_dimension", inputs, iterations=d, draws=2)
    assert tr.value == pytest.approx(float(lam.sum()), rel=0, abs=1e-8)
    assert de.value == pytest.approx(float((lam / (lam + 1)).sum()), rel=0, abs=1e-8)
    for res in (tr, de):
        assert res.extra["lambda_max"] == pytest.approx(float(lam.max()), rel=0, abs=1e-8)
        assert res.extra["trace"] == tr.value and res.extra["d_eff"] == de.value
        assert res.extra["num_params"] == d and res.cost.hvps <= 2 * d
    if case == "regression":
        assert tr.extra["iterations"] == d and tr.cost.hvps == 2 * d
    else:
        assert tr.extra["iterations"] < d
    # fewer iterations: Σ of k Ritz values is not the trace; Ritz values lie within the spectrum (Cauchy interlacing)
    few = compute_measure("lanczos_trace", inputs, iterations=6, draws=3, seed=5)
    assert few.cost.hvps == 18 and few.settings == {"iterations": 6, "draws": 3, "seed": 5, **_UNIVERSAL}
    assert abs(few.value - float(lam.sum())) > 1e-3
    assert float(lam.min()) - 1e-12 <= few.extra["lambda_max"] <= float(lam.max()) + 1e-12


_UNIVERSAL = {"bn": "eval", "reparametrize": None, "scale": "none"}


# ---- local_entropy_grad_norm ----------------------------------------------------------------------------------------
def sgld_by_hand(model, batch, steps, lr, eps, alpha, g0, seed) -> float:
    """‖θ − μ‖ after ``steps`` SGLD steps on one batch, written out on a dict of tensors."""
    x, y = batch
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = {n: t.clone() for n, t in theta.items()}
    mu = {n: t.clone() for n, t in theta.items()}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        leaves = {n: t.clone().requires_grad_(True) for n, t in w.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for (n, t), grad in zip(list(w.items()), grads):
            xi = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            w[n] = t - lr * (grad - g0 * (theta[n] - t) + eps / math.sqrt(0.5 * lr) * xi)
            mu[n] = alpha * mu[n] + (1 - alpha) * w[n]
    return math.sqrt(sum(float((theta[n] - mu[n]).pow(2).sum()) for n in theta))


@pytest.mark.parametrize("g0", [1e-4, 0.5])
def test_local_entropy_grad_norm_is_the_sgld_loop(g0):
    model, batches, _ = problem()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = {"steps": 3, "g0": g0, "seed": 2}
    one = compute_measure("local_entropy_grad_norm", MeasureInputs(model, batches[:1]), **settings)
    expected = sgld_by_hand(model, batches[0], 3, 0.1, 1e-4, 0.75, g0, 2)
    assert one.value == pytest.approx(expected, rel=0, abs=1e-10)
    assert one.cost.gradients == 3 and one.std_error is None
    # over several batches: the mean of each batch's value, every batch with the same seeded noise
    two = compute_measure("local_entropy_grad_norm", MeasureInputs(model, batches[:2]), **settings)
    per_batch = [sgld_by_hand(model, b, 3, 0.1, 1e-4, 0.75, g0, 2) for b in batches[:2]]
    assert two.value == pytest.approx(sum(per_batch) / 2, rel=0, abs=1e-10)
    assert two.extra["batches"] == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_local_entropy_grad_norm_bad_settings():
    model, batches, _ = problem()
    with pytest.raises(ValueError, match="'alpha' must lie in"):
        compute_measure("local_entropy_grad_norm", MeasureInputs(model, batches), alpha=1.0)
    with pytest.raises(ValueError, match="'steps' must be an integer"):
        compute_measure("local_entropy_grad_norm", MeasureInputs(model, batches), steps=0)


@pytest.mark.parametrize("case", ["regression", "classifier"])
def test_hessian_top_eigenvalue_equals_the_exact_spectrum(case):
    """λ₁ (and λ₂) by verified Lanczos against eigvalsh of torch.func.hessian."""
    if case == "regression":
        model, batches = tanh_regression()
        loss_fn = F.mse_loss
    else:
        model, batches, _ = problem()
        loss_fn = F.cross_entropy
    model.eval()
    lam = torch.sort(exact_spectrum(model, batches, loss_fn), descending=True).values
    inputs = MeasureInputs(model, batches, loss_fn=loss_fn)
    res = compute_measure("hessian_top_eigenvalue", inputs, k=2, tol=1e-10)
    assert res.value == pytest.approx(float(lam[0]), rel=1e-8)
    assert res.extra["lambda_2"] == pytest.approx(float(lam[1]), rel=1e-6)
    assert res.extra["converged"] == 1.0 and res.cost.hvps > 0
    with pytest.raises(ValueError, match="tol must be > 0"):
        compute_measure("hessian_top_eigenvalue", inputs, tol=0)
