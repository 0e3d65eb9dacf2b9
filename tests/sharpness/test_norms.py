import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlit.sharpness import MeasureInputs, compute_measure, fold_batchnorm, get_measure
from flatlit.sharpness.norms import find_layers, lpf_normalize, sample_margins


def mlp(bias=False, sizes=(3, 4, 3, 2), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def data(shape, n=(9, 7), classes=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(k, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (k,), generator=g))
        for k in n
    ]


def self_labelled(net, batches):
    """The same inputs labelled by the network's own predictions (every margin positive)."""
    with torch.no_grad():
        return [(x, net(x).argmax(1)) for x, _ in batches]


def bn_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5))
    net = nn.Sequential(net, nn.ReLU(), nn.Linear(5, 3)).double()
    return _warm_bn(net, (4,))


def bn_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()
    return _warm_bn(net, (2, 6, 6))


def _warm_bn(net, shape):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
        net.train()(3 * torch.randn(32, *shape, dtype=torch.float64) + 1)
    return net.eval()


# ---- path norms -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 1.5, 2])
def test_path_norms_equal_brute_force_sum_over_paths(p):
    net = mlp(bias=False)
    ws = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    total = 0.0
    for i, j, k, l in itertools.product(range(3), range(4), range(3), range(2)):
        total += (abs(ws[0][j, i]) * abs(ws[1][k, j]) * abs(ws[2][l, k])).item() ** p
    expected = total ** (1 / p)
    res = compute_measure(f"path_norm_{p:g}", MeasureInputs(net, [], input_shape=(3,)))
    assert res.value == pytest.approx(expected, rel=1e-12)
    assert res.cost.forwards == res.cost.gradients == res.cost.hvps == 0
    sq = compute_measure(f"path_norm_{p:g}", MeasureInputs(net, [], input_shape=(3,)), squared=True, log=True)
    assert sq.value == pytest.approx(2 * math.log(expected), rel=1e-12)


def test_path_norm_biases_are_edges_from_constant_units():
    net = mlp(bias=True)
    ws = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    bs = [m.bias.detach() for m in net if isinstance(m, nn.Linear)]
    total = 0.0
    for i, j, k, l in itertools.product(range(3), range(4), range(3), range(2)):  # input paths
        total += (abs(ws[0][j, i]) * abs(ws[1][k, j]) * abs(ws[2][l, k])).item() ** 1.5
    for j, k, l in itertools.product(range(4), range(3), range(2)):  # from layer-0 bias units
        total += (abs(bs[0][j]) * abs(ws[1][k, j]) * abs(ws[2][l, k])).item() ** 1.5
    for k, l in itertools.product(range(3), range(2)):
        total += (abs(bs[1][k]) * abs(ws[2][l, k])).item() ** 1.5
    total += sum(abs(v.item()) ** 1.5 for v in bs[2])
    inputs = MeasureInputs(net, [], input_shape=(3,))
    assert compute_measure("path_norm_1.5", inputs).value == pytest.approx(total ** (1 / 1.5), rel=1e-12)
    no_bias = compute_measure("path_norm_1.5", inputs, bias=False).value
    assert no_bias < total ** (1 / 1.5) * (1 - 1e-3)


# ---- spectral norms -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "conv, in_shape",
    [
        (dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1), (2, 6, 6)),
        (dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="circular"), (2, 4, 5)),
        (dict(in_channels=4, out_channels=2, kernel_size=2, dilation=2, groups=2), (4, 5, 5)),
    ],
)
def test_conv_spectral_norm_is_the_operator_norm_on_the_input_size(conv, in_shape):
    torch.manual_seed(3)
    layer = nn.Conv2d(**conv).double()
    net = nn.Sequential(layer)
    x0 = torch.zeros(1, *in_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: layer._conv_forward(x, layer.weight.detach(), None), x0)
    n_in = math.prod(in_shape)
    sigma = torch.linalg.svdvals(jac.reshape(-1, n_in))[0].item()
    inputs = MeasureInputs(net, [], input_shape=in_shape)
    exact = compute_measure("spectral_norm_product", inputs, log=False, power_iters=2000, tol=1e-13)
    assert exact.value == pytest.approx(sigma, rel=1e-6)
    reshaped = compute_measure("spectral_norm_product", inputs, log=False, reshaped=True).value
    w = layer.weight.detach().reshape(layer.out_channels, -1)
    assert reshaped == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-12)
    assert abs(reshaped - sigma) > 1e-3 * sigma


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_spectral_norm_at_the_defaults_is_the_dense_operator_norm(seed):
    """A randomly initialised Conv2d(16, 32, 3) on 8×8 inputs: its top singular values are within 0.1 % of each
    other, where a power iteration stopped on a small relative change is off by ~5e-4; the default settings must
    give the dense operator's σ_max to 1e-5."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(16, 32, 3, padding=1).double()
    in_shape = (16, 8, 8)
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        dense = F.conv2d(basis, conv.weight, None, conv.stride, conv.padding).reshape(n, -1).T  # (out, in)
    sigma = torch.linalg.matrix_norm(dense, ord=2).item()
    inputs = MeasureInputs(nn.Sequential(conv), [], input_shape=in_shape)
    res = compute_measure("spectral_norm_product", inputs, log=False)
    assert res.value == pytest.approx(sigma, rel=1e-5)
    assert res.extra["unconverged"] == 0.0


def test_conv_spectral_norm_warns_and_reports_when_the_step_cap_is_hit():
    torch.manual_seed(0)
    inputs = MeasureInputs(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1).double()), [], input_shape=(16, 8, 8))
    with pytest.warns(RuntimeWarning, match=r"'0'.*did not converge.*power_iters"):
        res = compute_measure("spectral_norm_product", inputs, log=False, power_iters=3)
    assert res.extra["unconverged"] == 1.0


def test_spectral_norm_product_needs_input_shape_and_valid_settings():
    net = nn.Sequential(nn.Conv2d(1, 2, 3)).double()
    with pytest.raises(ValueError, match="input_shape"):
        compute_measure("spectral_norm_product", MeasureInputs(net, []))
    inputs = MeasureInputs(net, [], input_shape=(1, 5, 5))
    with pytest.raises(ValueError, match="power_iters"):
        compute_measure("spectral_norm_product", inputs, power_iters=0)
    with pytest.raises(ValueError, match="reshaped"):
        compute_measure("spectral_norm_product", inputs, reshaped="no")


def test_layer_norm_products_match_hand_computation():
    net = mlp(bias=True, sizes=(3, 5, 4, 2))
    batches = self_labelled(net, data((3,)))
    inputs = MeasureInputs(net, batches)
    ws = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    fro = sum(math.log(w.norm().item()) for w in ws)
    assert compute_measure("frobenius_norm_product", inputs).value == pytest.approx(fro, rel=1e-12)
    l1inf = sum(math.log(w.abs().sum(1).max().item()) for w in ws)
    assert compute_measure("l1inf_norm_product", inputs).value == pytest.approx(l1inf, rel=1e-12)
    l3 = sum(math.log((w.abs().pow(3).sum(1).pow(1 / 3)).pow(1.5).sum().pow(1 / 1.5).item()) for w in ws)
    assert compute_measure("l3_1.5_norm_product", inputs).value == pytest.approx(l3, rel=1e-12)
    tr = sum(math.log(torch.linalg.svdvals(w).sum().item()) for w in ws)
    assert compute_measure("trace_norm_product", inputs).value == pytest.approx(tr, rel=1e-12)
    gamma = float(np.percentile(brute_margins(net, batches), 5))
    res = compute_measure("frobenius_norm_product", inputs, over_margin=True, squared=True, log=False)
    assert res.value == pytest.approx(math.exp(fro) ** 2 / gamma**2, rel=1e-10)
    assert res.cost.forwards == 1 and res.extra["margin"] == pytest.approx(gamma)
    assert compute_measure("frobenius_norm_product", inputs).cost.forwards == 0


# ---- margin, distances ----------------------------------------------------------------------------------------------
def brute_margins(net, batches):
    out = []
    with torch.no_grad():
        for x, y in batches:
            f = net(x)
            for fi, yi in zip(f, y):
                others = [fi[j].item() for j in range(len(fi)) if j != yi]
                out.append(fi[yi].item() - max(others))
    return np.array(out)


@pytest.mark.parametrize("q", [5, 10, 50])
def test_margin_percentile_equals_numpy(q):
    net = mlp(bias=True, sizes=(3, 6, 4))
    batches = data((3,), classes=4)
    res = compute_measure("margin", MeasureInputs(net, batches), percentile=q)
    m = brute_margins(net, batches)
    assert res.value == pytest.approx(float(np.percentile(m, q)), rel=1e-12)
    assert np.allclose(np.sort(sample_margins(net, batches).numpy()), np.sort(m))
    assert res.cost.forwards == 1 and res.settings["percentile"] == q
    with pytest.raises(ValueError, match="percentile"):
        compute_measure("margin", MeasureInputs(net, batches), percentile=120)


def test_distance_from_init_and_param_norm():
    net = mlp(bias=True)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    theta0 = torch.cat([init[n].reshape(-1) for n, _ in net.named_parameters()])
    res = compute_measure("distance_from_init", MeasureInputs(net, [], init_state=init))
    assert res.value == pytest.approx((theta - theta0).norm().item(), rel=1e-12)
    assert res.extra["0"] == pytest.approx(
        torch.cat([(net[0].weight - init["0.weight"]).reshape(-1), net[0].bias - init["0.bias"]]).norm().item()
    )
    assert compute_measure("param_norm", MeasureInputs(net, [])).value == pytest.approx(theta.norm().item())
    assert compute_measure("param_count", MeasureInputs(net, [])).value == theta.numel()
    with pytest.raises(ValueError, match="init_state"):
        compute_measure("distance_from_init", MeasureInputs(net, []))


def test_distance_from_init_with_folded_batchnorm_folds_the_initial_weights_too():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    init_net = fold_batchnorm(net)
    trained = _warm_bn(net, (4,))
    with torch.no_grad():
        trained[0].weight.add_(0.1)
    folded = fold_batchnorm(trained)
    expected = torch.cat(
        [(a.detach() - b.detach()).reshape(-1) for a, b in zip(folded.parameters(), init_net.parameters())]
    ).norm()
    res = compute_measure("distance_from_init", MeasureInputs(trained, [], init_state=init), bn="fold")
    assert res.value == pytest.approx(expected.item(), rel=1e-12)


def _bn_net(dtype, eps):
    """conv (no bias) → BN → ReLU → flatten → linear → BN1d → linear, with non-default BN eps and BN statistics."""
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3, eps=eps),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
        nn.BatchNorm1d(4, eps=eps),
        nn.Linear(4, 3),
    ).to(dtype)
    with torch.no_grad():
        for m in (net[1], net[5]):
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
        net.train()(2 * torch.randn(16, 2, 4, 4, dtype=dtype) + 0.5)  # the initial model's own BN statistics
    return net.eval()


def _hand_folded(state, eps):
    """The folded network's parameters computed by hand from a state_dict: s = γ/√(σ² + ε), W' = s·W,
    b' = s·(b − μ) + β for (0, 1) and (4, 5); the last linear layer as it is (float64)."""
    out = {}
    for layer, bn in (("0", "1"), ("4", "5")):
        s = state[f"{bn}.weight"].double() / torch.sqrt(state[f"{bn}.running_var"].double() + eps)
        w = state[f"{layer}.weight"].double()
        b = state.get(f"{layer}.bias", torch.zeros_like(s)).double()
        out[f"{layer}.weight"] = w * s.view(-1, *([1] * (w.ndim - 1)))
        out[f"{layer}.bias"] = (b - state[f"{bn}.running_mean"].double()) * s + state[f"{bn}.bias"].double()
    out["6.weight"], out["6.bias"] = state["6.weight"].double(), state["6.bias"].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folded_initial_weights_are_folded_like_the_current_ones(dtype):
    """bn="fold": θ₀ is folded with the initial model's BN statistics and the BN's own eps, exactly as θ is, in
    distance_from_init and the PAC-Bayes measures: the distance is exactly 0 at θ = θ₀ and otherwise equals the
    hand-folded one."""
    eps = 1e-3
    net = _bn_net(dtype, eps)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [(torch.randn(6, 2, 4, 4, dtype=dtype), torch.randint(0, 3, (6,)))]
    inputs = MeasureInputs(net, batches, init_state=init)
    assert compute_measure("distance_from_init", inputs, bn="fold").value == 0.0
    quick = dict(bn="fold", reference="init", draws=2, bisection_steps=2)
    for name in ("pac_bayes_sharpness", "pac_bayes_magnitude"):
        assert compute_measure(name, inputs, **quick).extra["dist_sq"] == 0.0, name

    with torch.no_grad():  # "training": every parameter and the BN statistics move
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        net.train()(torch.randn(16, 2, 4, 4, dtype=dtype) - 0.3)
    net.eval()
    now, then = _hand_folded(net.state_dict(), eps), _hand_folded(init, eps)
    expected_sq = sum(float((now[k] - then[k]).pow(2).sum()) for k in now)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    res = compute_measure("distance_from_init", inputs, bn="fold")
    assert res.value == pytest.approx(math.sqrt(expected_sq), rel=rel)
    assert res.extra["0"] == pytest.approx(
        math.sqrt(sum(float((now[k] - then[k]).pow(2).sum()) for k in ("0.weight", "0.bias"))), rel=rel
    )
    for name in ("pac_bayes_sharpness", "pac_bayes_magnitude"):
        assert compute_measure(name, inputs, **quick).extra["dist_sq"] == pytest.approx(expected_sq, rel=rel), name
    # the same θ₀ when init_tensors is handed the raw initial state_dict and a folded copy directly
    from flatlit.sharpness.norms import init_tensors

    folded = fold_batchnorm(net)
    direct = init_tensors(folded, init, list(then))
    for k in then:
        assert torch.allclose(direct[k], then[k], rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0), k


@pytest.mark.parametrize("make, shape", [(bn_mlp, (4,)), (bn_cnn, (2, 6, 6))])
def test_fold_batchnorm_preserves_the_function(make, shape):
    net = make()
    x = torch.randn(11, *shape, dtype=torch.float64)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert torch.allclose(folded(x), net(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("make, shape", [(bn_mlp, (4,)), (bn_cnn, (2, 6, 6))])
def test_lpf_normalize_preserves_the_function_with_unit_filters(make, shape):
    net = make()
    x = torch.randn(11, *shape, dtype=torch.float64)
    normed = lpf_normalize(net)
    assert torch.allclose(normed(x), net(x), rtol=0, atol=1e-10)
    for layer in find_layers(normed):
        w = layer.module.weight.detach().reshape(layer.module.weight.shape[0], -1)
        p = w.norm(dim=1) + (0 if layer.module.bias is None else layer.module.bias.detach().abs())
        assert torch.allclose(p, torch.ones_like(p))
    assert len(list(normed.parameters())) == len(list(net.parameters()))


# ---- bounds ---------------------------------------------------------------------------------------------------------
BOUNDS = ["bound_bartlett_mendelson", "bound_neyshabur2015", "bound_bartlett2017", "bound_neyshabur2018"]


@pytest.fixture(scope="module")
def trained():
    return trained_pair()


def trained_pair():
    net = mlp(bias=True, sizes=(3, 8, 8, 2), seed=0)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    batches = data((3,), n=(20, 20))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(10):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return net, init, self_labelled(net, batches)


def test_bounds_are_finite_positive_and_match_the_formula(trained):
    net, init, batches = trained
    inputs = MeasureInputs(net, batches, init_state=init, num_train=1000)
    values = {}
    for name in BOUNDS:
        res = compute_measure(name, inputs)
        assert math.isfinite(res.value) and res.value > 0, name
        assert res.cost.forwards == 1 and res.settings["bn"] == "fold"
        values[name] = res.value
    assert compute_measure("bound_neyshabur2015", inputs, norm="l3_1.5").value > 0
    ws = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    w0 = [init[f"{i}.weight"] for i in (0, 2, 4)]
    gamma = float(np.percentile(brute_margins(net, batches), 5))
    assert gamma > 0
    m, d = 1000, 3
    spec = [torch.linalg.matrix_norm(w, ord=2).item() for w in ws]
    ratio = sum(w.shape[0] * (w - v).norm().item() ** 2 / s**2 for w, v, s in zip(ws, w0, spec))
    expected = d * math.prod(spec) / gamma * math.sqrt(ratio) / math.sqrt(m)
    assert values["bound_neyshabur2018"] == pytest.approx(expected, rel=1e-10)
    alpha = math.sqrt(d + math.log(3))
    expected_bm = alpha * math.prod(w.abs().sum(1).max().item() for w in ws) / gamma / math.sqrt(m)
    assert values["bound_bartlett_mendelson"] == pytest.approx(expected_bm, rel=1e-10)
    nparam = sum(p.numel() for p in net.parameters())
    r = sum(((w - v).norm(dim=1).sum().item() / s) ** (2 / 3) for w, v, s in zip(ws, w0, spec)) ** 1.5
    expected_b17 = math.log(m) * math.log(nparam) * math.prod(spec) / gamma * r / math.sqrt(m)
    assert values["bound_bartlett2017"] == pytest.approx(expected_b17, rel=1e-10)


def _hand_lpq(w: torch.Tensor, p: float, q: float) -> float:
    """‖W‖_{p,q} by hand: the p-norm of each output unit's incoming weights (a row of the (out, -1) matrix), then the
    q-norm of those."""
    rows = w.detach().double().reshape(w.shape[0], -1).tolist()
    return sum(sum(abs(v) ** p for v in row) ** (q / p) for row in rows) ** (1 / q)


def tiny_cnn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).double()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("norm, p, q, root", [("frobenius", 2, 2, 1 / 2), ("l3_1.5", 3, 1.5, 1 / 3)])
def test_bound_neyshabur2015_equals_a_hand_computation(trained, arch, norm, p, q, root):
    """α · Π_l ‖W_l‖_{p,q} / (γ m^root), α = √(d + log(input dimension)), γ the 5th percentile margin (docs)."""
    if arch == "mlp":
        net, _, batches = trained
        shape = (3,)
    else:
        net, shape = tiny_cnn(), (2, 4, 4)
        batches = self_labelled(net, data(shape, n=(12, 9), classes=3))
    m = 700
    res = compute_measure("bound_neyshabur2015", MeasureInputs(net, batches, num_train=m), norm=norm)
    weights = [mod.weight for mod in net.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    d, dim = len(weights), math.prod(shape)
    gamma = float(np.percentile(brute_margins(net, batches), 5))
    assert gamma > 0
    product = math.prod(_hand_lpq(w, p, q) for w in weights)
    expected = math.sqrt(d + math.log(dim)) * product / (gamma * m**root)
    assert res.value == pytest.approx(expected, rel=1e-10)
    assert res.extra["margin"] == pytest.approx(gamma, rel=1e-12) and res.extra["depth"] == d
    assert res.extra["log_bound"] == pytest.approx(math.log(expected), rel=1e-10)


def test_bounds_reject_missing_inputs_and_bad_settings(trained):
    net, init, batches = trained
    with pytest.raises(ValueError, match="init_state"):
        compute_measure("bound_neyshabur2018", MeasureInputs(net, batches))
    with pytest.raises(ValueError, match="norm"):
        compute_measure("bound_neyshabur2015", MeasureInputs(net, batches), norm="l2")
    with pytest.raises(ValueError, match="unknown setting"):
        compute_measure("bound_bartlett2017", MeasureInputs(net, batches, init_state=init), p=3)


def test_norm_measures_default_to_folded_batchnorm_and_document_it():
    for name in ["frobenius_norm_product", "spectral_norm_product", "path_norm_2", *BOUNDS]:
        spec = get_measure(name)
        assert spec.defaults["bn"] == "fold" and spec.kind == "complexity"
        assert "fold" in spec.doc and "Cost" in spec.doc and "arXiv" in spec.doc
    net = bn_cnn()
    inputs = MeasureInputs(net, data((2, 6, 6), classes=3))
    folded = fold_batchnorm(net)
    w = [m.weight.detach() for m in folded.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    expected = sum(math.log(v.norm().item()) for v in w)
    assert compute_measure("frobenius_norm_product", inputs).value == pytest.approx(expected, rel=1e-12)
    assert compute_measure("frobenius_norm_product", inputs, bn="eval").value != pytest.approx(expected, rel=1e-3)
