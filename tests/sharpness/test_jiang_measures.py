"""Jiang et al. 2019 (arXiv 1912.02178, appendix C) measures and conventions against hand computations in numpy:
the new sums/ratios of squared layer norms, ``margin_rank``, ``weights_only`` / ``squared``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlit.sharpness import MeasureInputs, compute_measure, get_measure
from tests.sharpness.test_norms import bn_cnn

EPS = 1e-5  # BatchNorm's default eps
NEW = ["sum_of_spectral", "sum_of_frobenius", "frobenius_over_spectral", "spec_init", "spec_orig", "dist_spec_init"]


# ---- tiny models, their "initial" weights and data -------------------------------------------------------------------
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()


def cnn() -> nn.Module:
    """conv(pad 1) → BN → ReLU → conv(stride 2) → BN → ReLU → flatten → linear, with non-trivial BN statistics
    (test_norms' network)."""
    return bn_cnn()


SHAPES = {"mlp": (4,), "cnn": (2, 6, 6)}
# (weight key, BN prefix or None, conv (stride, padding, input shape) or None), in forward order
LAYERS = {
    "mlp": [("0", None, None), ("2", None, None)],
    "cnn": [("0", "1", (1, 1, (2, 6, 6))), ("3", "4", (2, 0, (3, 6, 6))), ("7", None, None)],
}


def make(arch: str, labels: str = "own", n: int = 50):
    """The network, an "initial" state_dict (every entry moved; BN variances scaled) and 50 examples in 3 batches,
    labelled by the network itself (every margin positive) or at random."""
    net = mlp() if arch == "mlp" else cnn()
    g = torch.Generator().manual_seed(7)
    init = {}
    for k, v in net.state_dict().items():
        if not v.is_floating_point():
            init[k] = v.clone()
        elif k.endswith("running_var"):
            init[k] = v * (0.8 + 0.4 * torch.rand(v.shape, generator=g, dtype=v.dtype))
        else:
            init[k] = v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
    x = torch.randn(n, *SHAPES[arch], generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1) if labels == "own" else torch.randint(0, 3, (n,), generator=g)
    batches = [(x[a:b], y[a:b]) for a, b in ((0, 20), (20, 40), (40, n))]
    return net, init, batches


def inputs(net, init, batches, with_init=True) -> MeasureInputs:
    return MeasureInputs(net, batches, init_state=init if with_init else None)


def hand_weights(arch: str, state: dict) -> list[tuple[np.ndarray, tuple | None]]:
    """The layers' weights after folding BN by hand (W·γ/√(σ² + ε) per output channel), with their conv geometry."""
    out = []
    for key, bn, conv in LAYERS[arch]:
        w = state[f"{key}.weight"].double().numpy()
        if bn is not None:
            s = state[f"{bn}.weight"].double().numpy() / np.sqrt(state[f"{bn}.running_var"].double().numpy() + EPS)
            w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
        out.append((w, conv))
    return out


def reshaped(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1)


def dense_conv(w: np.ndarray, conv: tuple) -> np.ndarray:
    """The matrix of x ↦ conv2d(x, w) on inputs of the layer's size (columns: the images of the basis vectors)."""
    stride, padding, in_shape = conv
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    return F.conv2d(basis, torch.from_numpy(w), None, stride, padding).reshape(n, -1).T.numpy()


def spec(w: np.ndarray, conv: tuple | None, as_matrix: bool) -> float:
    """σ_max: of the (out, -1) reshaped weight (``as_matrix``, or a linear layer), else of the convolution."""
    m = reshaped(w) if as_matrix or conv is None else dense_conv(w, conv)
    return float(np.linalg.svd(m, compute_uv=False)[0])


def fro(w: np.ndarray) -> float:
    return float(np.sqrt((w**2).sum()))


def hand_margins(net, batches) -> np.ndarray:
    out = []
    with torch.no_grad():
        for x, y in batches:
            for f, t in zip(net(x).numpy(), y.numpy()):
                out.append(f[t] - max(f[j] for j in range(len(f)) if j != t))
    return np.array(out)


def gamma_of(net, batches, percentile=5.0, margin_rank=None) -> float:
    m = np.sort(hand_margins(net, batches))
    if margin_rank is None:
        return float(np.percentile(m, percentile))
    return float(m[max(1, int(margin_rank * len(m) + 1e-9)) - 1])


SPECTRAL_CASES = [("mlp", False), ("cnn", True), ("cnn", False)]
EXACT = dict(tol=1e-13, power_iters=3000)  # Lanczos to rounding, for comparisons at rel 1e-8


# ---- the new measures ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, as_matrix", SPECTRAL_CASES)
@pytest.mark.parametrize("over_margin, margin_rank", [(False, None), (True, None), (True, 0.1)])
def test_sum_of_spectral_and_frobenius_equal_jiang_eqs_34_35_38_39(arch, as_matrix, over_margin, margin_rank):
    """log d + (1/d)(Σ log‖W‖² − 2 log γ) over the hand-folded weights, spectral (eqs. 35/34) and Frobenius
    (39/38); log=False gives its exp."""
    net, init, batches = make(arch)
    ws = hand_weights(arch, net.state_dict())
    d = len(ws)
    gamma = gamma_of(net, batches, margin_rank=margin_rank)
    assert gamma > 0
    shift = -2 * math.log(gamma) if over_margin else 0.0
    settings = dict(over_margin=over_margin, margin_rank=margin_rank)
    inp = inputs(net, init, batches)
    sigmas = [spec(w, c, as_matrix) for w, c in ws]
    expected = math.log(d) + (sum(2 * math.log(s) for s in sigmas) + shift) / d
    res = compute_measure("sum_of_spectral", inp, reshaped=as_matrix, **EXACT, **settings)
    assert res.value == pytest.approx(expected, rel=1e-8)
    assert res.extra["depth"] == d and res.cost.forwards == int(over_margin)
    assert [res.extra[k] for k, _, _ in LAYERS[arch]] == pytest.approx(sigmas, rel=1e-8)
    plain = compute_measure("sum_of_spectral", inp, reshaped=as_matrix, log=False, **EXACT, **settings).value
    assert plain == pytest.approx(math.exp(expected), rel=1e-8)
    if over_margin:
        assert res.extra["margin"] == pytest.approx(gamma, rel=1e-12)
    if as_matrix:
        return
    expected = math.log(d) + (sum(2 * math.log(fro(w)) for w, _ in ws) + shift) / d
    assert compute_measure("sum_of_frobenius", inp, **settings).value == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("arch, as_matrix", SPECTRAL_CASES)
def test_frobenius_over_spectral_equals_jiang_eq_33(arch, as_matrix):
    net, init, batches = make(arch)
    ws = hand_weights(arch, net.state_dict())
    expected = sum(fro(w) ** 2 / spec(w, c, as_matrix) ** 2 for w, c in ws)
    res = compute_measure("frobenius_over_spectral", inputs(net, init, batches), reshaped=as_matrix, **EXACT)
    assert res.value == pytest.approx(expected, rel=1e-8)
    assert res.cost.forwards == 0 and res.extra["unconverged"] == 0


@pytest.mark.parametrize("arch, as_matrix", SPECTRAL_CASES)
@pytest.mark.parametrize("margin_rank", [None, 0.1])
def test_spec_init_and_spec_orig_equal_jiang_eqs_29_30(arch, as_matrix, margin_rank):
    """log(Π‖W‖₂²/γ² · Σ ‖W − R‖_F²/‖W‖₂²), R the hand-folded initial weights (spec_init) or 0 (spec_orig)."""
    net, init, batches = make(arch)
    ws = hand_weights(arch, net.state_dict())
    w0s = hand_weights(arch, init)  # the initial weights folded with the initial BN statistics
    gamma = gamma_of(net, batches, margin_rank=margin_rank)
    sigmas = [spec(w, c, as_matrix) for w, c in ws]
    log_prod = sum(2 * math.log(s) for s in sigmas) - 2 * math.log(gamma)
    from_init = sum(fro(w - w0) ** 2 / s**2 for (w, _), (w0, _), s in zip(ws, w0s, sigmas))
    from_zero = sum(fro(w) ** 2 / s**2 for (w, _), s in zip(ws, sigmas))
    inp = inputs(net, init, batches)
    settings = dict(reshaped=as_matrix, margin_rank=margin_rank, **EXACT)
    res = compute_measure("spec_init", inp, **settings)
    assert res.value == pytest.approx(log_prod + math.log(from_init), rel=1e-8)
    assert res.cost.forwards == 1 and res.extra["margin"] == pytest.approx(gamma, rel=1e-12)
    orig = compute_measure("spec_orig", inp, **settings)
    assert orig.value == pytest.approx(log_prod + math.log(from_zero), rel=1e-8)
    assert compute_measure("spec_orig", inp, log=False, **settings).value == pytest.approx(
        math.exp(log_prod) * from_zero, rel=1e-8
    )


@pytest.mark.parametrize("arch, as_matrix", SPECTRAL_CASES)
def test_dist_spec_init_equals_jiang_eq_41(arch, as_matrix):
    """Σ ‖W − W⁰‖₂²: for a convolution with reshaped=False, the operator norm of the convolution by W − W⁰."""
    net, init, batches = make(arch)
    ws, w0s = hand_weights(arch, net.state_dict()), hand_weights(arch, init)
    expected = sum(spec(w - w0, c, as_matrix) ** 2 for (w, c), (w0, _) in zip(ws, w0s))
    res = compute_measure("dist_spec_init", inputs(net, init, batches), reshaped=as_matrix, **EXACT)
    assert res.value == pytest.approx(expected, rel=1e-8)
    assert res.cost.forwards == 0 and res.extra["depth"] == len(ws)
    if arch == "cnn" and not as_matrix:  # the reshaped kernel's σ_max is a different number
        other = sum(spec(w - w0, c, True) ** 2 for (w, c), (w0, _) in zip(ws, w0s))
        assert abs(other - expected) > 1e-3 * expected


def test_spec_orig_is_the_spectral_sum_times_the_stable_ranks():
    """spec_orig = d·(sum_of_spectral_over_margin − log d) + log(frobenius_over_spectral) (eqs. 30, 34, 33)."""
    net, init, batches = make("cnn")
    inp = inputs(net, init, batches)
    s = dict(reshaped=True, margin_rank=0.1)
    total = compute_measure("sum_of_spectral", inp, over_margin=True, **s).value
    ratio = compute_measure("frobenius_over_spectral", inp, reshaped=True).value
    assert compute_measure("spec_orig", inp, **s).value == pytest.approx(3 * (total - math.log(3)) + math.log(ratio))


# ---- margin variants, margin_rank ------------------------------------------------------------------------------------
@pytest.mark.parametrize("margin_rank", [None, 0.1])
def test_margin_variants_are_the_plain_ones_over_the_margin(margin_rank):
    """Products: − 2 log γ (squared, log); sums: − 2 log γ / d; path norm (squared, not log): ÷ γ²."""
    net, init, batches = make("cnn")
    inp = inputs(net, init, batches)
    gamma = gamma_of(net, batches, margin_rank=margin_rank)
    over = dict(over_margin=True, margin_rank=margin_rank)
    for name, extra in (("frobenius_norm_product", {}), ("spectral_norm_product", dict(reshaped=True))):
        plain = compute_measure(name, inp, squared=True, **extra).value
        assert compute_measure(name, inp, squared=True, **over, **extra).value == pytest.approx(
            plain - 2 * math.log(gamma), rel=1e-10
        )
    for name, extra in (("sum_of_frobenius", {}), ("sum_of_spectral", dict(reshaped=True))):
        plain = compute_measure(name, inp, **extra).value
        assert compute_measure(name, inp, **over, **extra).value == pytest.approx(
            plain - 2 * math.log(gamma) / 3, rel=1e-10
        )
    plain = compute_measure("path_norm_2", inp, squared=True).value
    assert compute_measure("path_norm_2", inp, squared=True, **over).value == pytest.approx(plain / gamma**2, rel=1e-10)


def test_margin_rank_is_the_kth_smallest_margin():
    net, init, batches = make("mlp", labels="random")
    m = np.sort(hand_margins(net, batches))
    assert len(m) == 50
    inp = inputs(net, init, batches)
    res = compute_measure("margin", inp, margin_rank=0.1)  # Jiang's kthvalue(m // 10): the 5th smallest of 50
    assert res.value == pytest.approx(m[4], rel=1e-12) and res.extra["rank"] == 5
    pct = compute_measure("margin", inp, percentile=10).value  # numpy interpolates between the 5th and 6th
    assert pct == pytest.approx(0.1 * m[4] + 0.9 * m[5], rel=1e-12) and abs(pct - m[4]) > 1e-6
    for q, k in ((0.29, 14), (1, 50), (0.001, 1), (0.5, 25)):
        assert compute_measure("margin", inp, margin_rank=q).value == pytest.approx(m[k - 1], rel=1e-12), q
    assert compute_measure("margin", inp, margin_rank=None, percentile=10).value == pct
    over = dict(over_margin=True, margin_rank=0.1)
    for name in ("frobenius_norm_product", "path_norm_1", "sum_of_frobenius"):
        assert compute_measure(name, inp, **over).extra["margin"] == pytest.approx(m[4], rel=1e-12), name


def test_a_nonpositive_margin_makes_margin_normalised_values_infinite():
    net, init, batches = make("mlp", labels="random")
    inp = inputs(net, init, batches)
    assert gamma_of(net, batches, margin_rank=0.1) < 0  # Jiang's code would take |γ|; flatlit does not
    for name in ("spec_init", "spec_orig"):
        assert compute_measure(name, inp, margin_rank=0.1).value == math.inf, name
    for name in ("sum_of_spectral", "sum_of_frobenius", "frobenius_norm_product"):
        assert compute_measure(name, inp, over_margin=True, margin_rank=0.1).value == math.inf, name
        assert math.isfinite(compute_measure(name, inp, margin_rank=0.1).value), name


# ---- weights_only, squared -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn", ["eval", "fold"])
def test_weights_only_drops_exactly_the_bias_and_batchnorm_terms(bn):
    net, init, batches = make("cnn")
    state = net.state_dict()
    if bn == "fold":  # folded by hand: W' = s·W, b' = s·(b − μ) + β with s = γ/√(σ² + ε)
        now, then = {}, {}
        for out, st in ((now, state), (then, init)):
            for (key, bnk, _), (w, _) in zip(LAYERS["cnn"], hand_weights("cnn", st)):
                b = st[f"{key}.bias"].numpy()
                if bnk is not None:
                    s = st[f"{bnk}.weight"].numpy() / np.sqrt(st[f"{bnk}.running_var"].numpy() + EPS)
                    b = s * (b - st[f"{bnk}.running_mean"].numpy()) + st[f"{bnk}.bias"].numpy()
                out[f"{key}.weight"], out[f"{key}.bias"] = w, b
    else:
        now = {n: p.detach().numpy() for n, p in net.named_parameters()}
        then = {n: init[n].numpy() for n in now}
    weights = [k for k in now if k in ("0.weight", "3.weight", "7.weight")]
    others = [k for k in now if k not in weights]
    assert len(others) == (3 if bn == "fold" else 7)  # biases (and BN γ, β without folding)
    sq_w = sum(float(((now[k] - then[k]) ** 2).sum()) for k in weights)
    sq_rest = sum(float(((now[k] - then[k]) ** 2).sum()) for k in others)
    inp = inputs(net, init, batches)
    all_ = compute_measure("distance_from_init", inp, bn=bn)
    only = compute_measure("distance_from_init", inp, bn=bn, weights_only=True)
    assert all_.value == pytest.approx(math.sqrt(sq_w + sq_rest), rel=1e-12)
    assert only.value == pytest.approx(math.sqrt(sq_w), rel=1e-12)
    squared = compute_measure("distance_from_init", inp, bn=bn, weights_only=True, squared=True)
    assert squared.value == pytest.approx(sq_w, rel=1e-12)  # Jiang's eq. 40 fro_dist with bn="fold"
    assert squared.extra["3"] == pytest.approx(float(((now["3.weight"] - then["3.weight"]) ** 2).sum()), rel=1e-12)
    n_w = sum(float((now[k] ** 2).sum()) for k in weights)
    n_rest = sum(float((now[k] ** 2).sum()) for k in others)
    assert compute_measure("param_norm", inp, bn=bn).value == pytest.approx(math.sqrt(n_w + n_rest), rel=1e-12)
    assert compute_measure("param_norm", inp, bn=bn, weights_only=True, squared=True).value == pytest.approx(
        n_w, rel=1e-12
    )
    assert compute_measure("param_norm", inp, bn=bn, squared=True).value == pytest.approx(n_w + n_rest, rel=1e-12)


# ---- settings, requirements, documentation ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 1.5, "a", -0.1, True, float("nan")])
def test_bad_margin_rank_is_a_one_line_value_error(bad):
    net, init, batches = make("mlp")
    inp = inputs(net, init, batches)
    for name, extra in (
        ("margin", {}),
        ("frobenius_norm_product", dict(over_margin=True)),
        ("path_norm_2", dict(over_margin=True)),
        ("sum_of_spectral", {}),
        ("sum_of_frobenius", dict(over_margin=True)),
        ("spec_init", {}),
        ("spec_orig", {}),
    ):
        with pytest.raises(ValueError, match=r"^margin_rank must be None or a number in \(0, 1\], got") as err:
            compute_measure(name, inp, margin_rank=bad, **extra)
        assert "\n" not in str(err.value), name


def test_bad_settings_and_missing_init_state_are_one_line_value_errors():
    net, init, batches = make("mlp")
    inp = inputs(net, init, batches)
    for name, setting in (
        ("distance_from_init", "weights_only"),
        ("param_norm", "squared"),
        ("sum_of_spectral", "over_margin"),
        ("spec_init", "log"),
        ("dist_spec_init", "reshaped"),
    ):
        with pytest.raises(ValueError, match=f"^{setting} must be True or False") as err:
            compute_measure(name, inp, **{setting: "yes"})
        assert "\n" not in str(err.value)
    for name in ("spec_init", "dist_spec_init", "distance_from_init"):
        with pytest.raises(ValueError, match="init_state") as err:
            compute_measure(name, inputs(net, init, batches, with_init=False))
        assert "\n" not in str(err.value)
    for name in ("spec_orig", "sum_of_spectral", "frobenius_over_spectral"):  # no initial weights needed
        assert math.isfinite(compute_measure(name, inputs(net, init, batches, with_init=False)).value)


def test_requirements_and_defaults_of_the_new_measures():
    for name in NEW:
        spec_ = get_measure(name)
        assert spec_.kind == "complexity" and spec_.defaults["bn"] == "fold", name
        assert "1912.02178" in spec_.doc and "eq" in spec_.doc and "Cost" in spec_.doc, name
        assert spec_.requirements({})[1] == (False if name == "sum_of_frobenius" else "conv"), name
        if "reshaped" in spec_.defaults:
            assert spec_.defaults["reshaped"] is False and spec_.requirements({"reshaped": True})[1] is False
    assert get_measure("spec_init").requirements({})[0] is True
    assert get_measure("spec_orig").requirements({})[0] is True
    assert get_measure("sum_of_spectral").requirements({})[0] is False
    assert get_measure("sum_of_spectral").requirements({"over_margin": True})[0] is True
    assert get_measure("dist_spec_init").requirements({})[0] is False
    for name in ("sum_of_spectral", "sum_of_frobenius", "spec_init", "spec_orig"):
        assert get_measure(name).defaults["log"] is True and get_measure(name).defaults["margin_rank"] is None
    for name in ("margin", "frobenius_norm_product", "spectral_norm_product", "path_norm_2"):
        assert get_measure(name).defaults["margin_rank"] is None, name
    for name in ("distance_from_init", "param_norm"):
        assert get_measure(name).defaults["weights_only"] is False and get_measure(name).defaults["squared"] is False
