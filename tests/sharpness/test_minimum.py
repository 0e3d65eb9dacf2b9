import math

import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from flatlit.sharpness import MeasureInputs, compute_measure, get_measure
from flatlit.sharpness.minimum import gauss_newton_diagonal, minimize_rescaled_trace


def relu_mlp(bias, sizes=(4, 6, 5, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def small_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
    ).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2)
        net.train()(torch.randn(16, 1, 5, 5, dtype=torch.float64))
    return net.eval()


def data(shape, n=(7, 6), classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(k, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (k,), generator=g))
        for k in n
    ]


def explicit_gn_diagonal(net, batches, names):
    """mean_i diag(J_iᵀ (diag p_i − p_i p_iᵀ) J_i), J_i from torch.autograd.functional.jacobian of the logits."""
    params = dict(net.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def logits_of(flat, x):
        chunks = torch.split(flat, sizes)
        th = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.func.functional_call(net, th, (x.unsqueeze(0),)).squeeze(0)

    total, count = torch.zeros_like(flat0), 0
    for x, _ in batches:
        for xi in x:
            J = torch.autograd.functional.jacobian(lambda f, xi=xi: logits_of(f, xi), flat0)  # K × P
            with torch.no_grad():
                p = torch.softmax(logits_of(flat0, xi), 0)
            M = torch.diag(p) - torch.outer(p, p)
            total += torch.diagonal(J.T @ M @ J)
            count += 1
    return dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(total / count, sizes), shapes))))


@pytest.mark.parametrize("make, shape", [(lambda: relu_mlp(True), (4,)), (small_cnn, (1, 5, 5))])
def test_gauss_newton_diagonal_equals_explicit_jacobian_formula(make, shape):
    net = make()
    batches = data(shape)
    names = [n for n, _ in net.named_parameters() if not n.startswith("1.")]  # skip the CNN's BN parameters
    got, n = gauss_newton_diagonal(net, batches, names, chunk_size=4)
    want = explicit_gn_diagonal(net, batches, names)
    assert n == 13
    for name in names:
        assert torch.allclose(got[name], want[name], rtol=1e-10, atol=1e-13), name


def rescaled(net, alphas):
    """W_l → α_l W_l (l < L−1), W_{L−1} → W_{L−1} / Π α: the same function for a bias-free ReLU MLP."""
    out = relu_mlp(False)
    out.load_state_dict(net.state_dict())
    linears = [m for m in out if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m, a in zip(linears[:-1], alphas):
            m.weight.mul_(a)
        linears[-1].weight.div_(math.prod(alphas))
    return out


def test_minimum_sharpness_is_invariant_to_function_preserving_rescaling():
    net = relu_mlp(False)
    batches = data((4,))
    other = rescaled(net, [3.0, 0.25])
    x = batches[0][0]
    assert torch.allclose(net(x), other(x), atol=1e-12)
    a = compute_measure("minimum_sharpness", MeasureInputs(net, batches))
    b = compute_measure("minimum_sharpness", MeasureInputs(other, batches))
    assert a.value == pytest.approx(b.value, rel=1e-6)
    assert a.extra["converged"] == 1.0 and b.extra["converged"] == 1.0
    assert abs(a.extra["trace"] - b.extra["trace"]) > 0.1 * a.extra["trace"]  # the plain trace is not invariant
    assert a.value < a.extra["trace"] and a.value > 0
    assert a.cost.per_example == 3 and a.cost.gradients == a.cost.hvps == 0
    assert a.settings == {
        "chunk_size": 16,
        "max_steps": 100,
        "tol": 1e-12,
        "bn": "eval",
        "reparametrize": None,
        "scale": "none",
    }


def test_minimum_sharpness_with_biases_is_invariant_too():
    net = relu_mlp(True)
    batches = data((4,))
    other = relu_mlp(True)
    other.load_state_dict(net.state_dict())
    lin = [m for m in other if isinstance(m, nn.Linear)]
    with torch.no_grad():
        lin[0].weight.mul_(2.0), lin[0].bias.mul_(2.0)
        lin[1].weight.mul_(0.5), lin[1].bias.mul_(1.0)
        lin[2].weight.mul_(1.0)
    x = batches[0][0]
    assert torch.allclose(net(x), other(x), atol=1e-12)
    a = compute_measure("minimum_sharpness", MeasureInputs(net, batches)).value
    b = compute_measure("minimum_sharpness", MeasureInputs(other, batches)).value
    assert a == pytest.approx(b, rel=1e-6)


def test_rescaled_trace_minimum_matches_closed_form_and_scipy():
    # L = 2: min_a (w0 + b0)/a² + w1 a² + b1 = 2 √((w0 + b0) w1) + b1
    value, e, _, ok = minimize_rescaled_trace([3.0, 5.0], [2.0, 0.7])
    assert ok and value == pytest.approx(2 * math.sqrt(5.0 * 5.0) + 0.7, rel=1e-10)
    assert math.exp(e[0]) == pytest.approx((5.0 / 5.0) ** 0.25, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(5, generator=g, dtype=torch.float64) * 10).tolist()
    b = (torch.rand(5, generator=g, dtype=torch.float64)).tolist()

    def objective(e):
        total, cum = 0.0, 0.0
        for l in range(4):
            cum += e[l]
            total += w[l] * math.exp(-2 * e[l]) + b[l] * math.exp(-2 * cum)
        return total + w[4] * math.exp(2 * cum) + b[4]

    ref = minimize(objective, [0.0] * 4, method="Nelder-Mead", options=dict(xatol=1e-10, fatol=1e-14, maxiter=20000))
    value, e, steps, ok = minimize_rescaled_trace(w, b)
    assert ok and steps < 100
    assert value == pytest.approx(ref.fun, rel=1e-7)
    assert objective(e) == pytest.approx(value, rel=1e-12)
    assert minimize_rescaled_trace([2.0], [1.0])[0] == 3.0  # one layer: nothing to rescale


def test_minimum_sharpness_settings_bn_and_docs():
    net = small_cnn()
    batches = data((1, 5, 5))
    inputs = MeasureInputs(net, batches)
    res = compute_measure("minimum_sharpness", inputs)
    folded = compute_measure("minimum_sharpness", inputs, bn="fold")
    assert res.value > 0 and folded.value > 0 and set(res.extra) >= {"w/0", "b/0", "w/4", "b/4", "alpha/0"}
    with pytest.raises(ValueError, match="bn"):
        compute_measure("minimum_sharpness", inputs, bn="train")
    with pytest.raises(ValueError, match="chunk_size"):
        compute_measure("minimum_sharpness", inputs, chunk_size=0)
    spec = get_measure("minimum_sharpness")
    assert spec.kind == "sharpness" and "2106.12612" in spec.doc and "Cost" in spec.doc
