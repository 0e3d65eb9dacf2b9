"""The measures under the loss contract (``flatlit.objective``): every loss evaluation goes through the batch loss
(dict batches with a label-smoothed ``curvature_loss``, an autoencoder), class logits from ``logits_fn`` (a one-logit
binary head), an explicit parameter selection, and one-line refusals of what cannot apply. References are computed
here from the very loss, on the flattened parameters (``torch.func``)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatlit.curvature.trace import rademacher
from flatlit.objective import resolve_objective
from flatlit.sharpness import MeasureInputs, compute_measure, list_measures
from flatlit.sharpness.base import (
    MeasureNotApplicable,
    generator,
    inapplicable_reason,
    mean_loss,
    measure_applies,
    randn_like,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smoothed(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The module's loss: cross-entropy with label smoothing 0.2 (not the plain cross-entropy a default would use)."""
    return F.cross_entropy(out, y, label_smoothing=0.2)


class DictClassifier(nn.Module):
    """Batches are dicts {"image", "label"}; the loss is a label-smoothed curvature_loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def curvature_loss(self, batch: dict) -> torch.Tensor:
        return smoothed(self(batch["image"]), batch["label"])


def dict_batches(sizes=(7, 5), seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(n, 4, generator=g, dtype=torch.float64), "label": torch.randint(0, 3, (n,), generator=g)}
        for n in sizes
    ]


def objective_inputs(model: nn.Module, batches: list, params=None, **kw) -> MeasureInputs:
    obj = resolve_objective(model, "test", **kw)
    return MeasureInputs(model, batches, batch_loss=obj.loss_of, logits_fn=obj.logits_of, params=params)


def flat_loss(model: nn.Module, names: list[str], per_batch) -> callable:
    """θ_S (flattened, the parameters ``names``) ↦ the size-weighted sample loss, other parameters held fixed."""
    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [base[n].shape for n in names]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, i = dict(base), 0
        for n, shape in zip(names, shapes):
            k = math.prod(shape)
            params[n] = theta[i : i + k].view(shape)
            i += k
        return per_batch(lambda *args: functional_call(model, params, args))

    return loss


def weighted(batches, loss_of_batch):
    total = sum(loss_of_batch(b) * n for b, n in batches)
    return total / sum(n for _, n in batches)


def theta_of(model: nn.Module, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def dict_sample_loss(model: nn.Module, batches: list[dict], names: list[str]):
    def per_batch(f):
        return weighted([(b, len(b["label"])) for b in batches], lambda b: smoothed(f(b["image"]), b["label"]))

    return flat_loss(model, names, per_batch)


# ---- (a) dict batches, a label-smoothed curvature_loss ---------------------------------------------------------------
def test_hessian_measures_use_the_modules_curvature_loss_on_dict_batches():
    model, batches = DictClassifier().eval(), dict_batches()
    names = [n for n, _ in model.named_parameters()]
    loss = dict_sample_loss(model, batches, names)
    theta = theta_of(model, names)
    hess = torch.func.hessian(loss)(theta)
    inputs = objective_inputs(model, batches)

    res = compute_measure("theta_h_theta", inputs)
    assert res.value == pytest.approx(float(theta @ hess @ theta), rel=1e-10)
    plain = MeasureInputs(model, [(b["image"], b["label"]) for b in batches])  # plain cross-entropy: another value
    assert abs(compute_measure("theta_h_theta", plain).value - res.value) > 1e-3

    trace = compute_measure("hessian_trace", inputs, probes=6, seed=3)
    gen = torch.Generator().manual_seed(3)
    probes = [rademacher(theta.numel(), gen, torch.float64, "cpu") for _ in range(6)]
    assert trace.value == pytest.approx(float(np.mean([float(z @ hess @ z) for z in probes])), rel=1e-10)


def test_sharpness_measures_use_the_modules_curvature_loss_on_dict_batches():
    model, batches = DictClassifier().eval(), dict_batches()
    names = [n for n, _ in model.named_parameters()]
    loss = dict_sample_loss(model, batches, names)
    theta = theta_of(model, names)
    clean = float(loss(theta))
    inputs = objective_inputs(model, batches)

    avg = compute_measure("average_sharpness", inputs, sigma=0.05, draws=5, seed=2)
    gen = generator(2)
    draws = [
        torch.cat([randn_like(p, gen).reshape(-1) * 0.05 for p in model.parameters()]) for _ in range(5)
    ]  # the measure's draws: per draw, per parameter in order
    ref = np.mean([float(loss(theta + d)) for d in draws]) - clean
    assert avg.value == pytest.approx(ref, rel=1e-10)
    assert avg.extra["clean_loss"] == pytest.approx(clean, rel=1e-12)

    g = torch.func.grad(loss)(theta)
    step = 0.1 * g / g.norm()
    gain = float(loss(theta + step)) - clean
    sam = compute_measure("sam_sharpness", inputs, rho=0.1)
    assert sam.value == pytest.approx(gain, rel=1e-9)
    # one APGD step from δ = 0 goes to ρ g/‖g‖: the worst case is max(0, that gain)
    worst = compute_measure("worst_case_l2", inputs, rho=0.1, steps=1)
    assert worst.value == pytest.approx(max(gain, 0.0), rel=1e-9)


def test_fisher_rao_norm_of_a_batch_loss_takes_one_example_at_a_time():
    model, batches = DictClassifier().eval(), dict_batches()
    names = [n for n, _ in model.named_parameters()]
    theta = theta_of(model, names)
    inner = []
    for b in batches:
        for i in range(len(b["label"])):
            one = [{"image": b["image"][i : i + 1], "label": b["label"][i : i + 1]}]
            inner.append(float(torch.func.grad(dict_sample_loss(model, one, names))(theta) @ theta))
    ref = float(np.mean(np.square(inner)))
    res = compute_measure("fisher_rao_norm", objective_inputs(model, batches))
    assert res.value == pytest.approx(ref, rel=1e-10)
    pairs = MeasureInputs(model, [(b["image"], b["label"]) for b in batches], smoothed)  # the (x, y) path agrees
    assert compute_measure("fisher_rao_norm", pairs).value == pytest.approx(ref, rel=1e-10)


# ---- (b) an autoencoder: batches are the inputs, the loss is MSE reconstruction --------------------------------------
class AutoEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def curvature_loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(x), x)


def ae_batches(sizes=(8, 6)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in sizes]


def ae_loss(model: nn.Module, batches: list[torch.Tensor], names: list[str]):
    def per_batch(f):
        return weighted([(x, len(x)) for x in batches], lambda x: F.mse_loss(f(x), x))

    return flat_loss(model, names, per_batch)


def test_autoencoder_sharpness_equals_references_and_margins_are_refused():
    model, batches = AutoEncoder().eval(), ae_batches()
    names = [n for n, _ in model.named_parameters()]
    loss = ae_loss(model, batches, names)
    theta = theta_of(model, names)
    inputs = objective_inputs(model, batches)
    assert inputs.input_shape == (6,)
    hess = torch.func.hessian(loss)(theta)
    assert compute_measure("theta_h_theta", inputs).value == pytest.approx(float(theta @ hess @ theta), rel=1e-10)
    g = torch.func.grad(loss)(theta)
    gain = float(loss(theta + 0.05 * g / g.norm()) - loss(theta))
    assert compute_measure("sam_sharpness", inputs).value == pytest.approx(gain, rel=1e-9)
    assert mean_loss(model, batches, batch_loss=inputs.batch_loss) == pytest.approx(float(loss(theta)), rel=1e-12)

    needs_logits = {
        "margin",
        "prediction_entropy",
        "minimum_sharpness",
        "bound_bartlett_mendelson",
        "bound_neyshabur2015",
        "bound_bartlett2017",
        "bound_neyshabur2018",
        "spec_init",  # Jiang et al.'s eqs. 29/30 always divide by the margin
        "spec_orig",
    }
    for name in list_measures():
        reason = inapplicable_reason(name, inputs)
        assert (reason is not None) == (name in needs_logits), (name, reason)
        if reason is not None:
            assert f"measure {name!r} needs class logits and labels" in reason and "\n" not in reason
            assert "outputs_and_targets(self, batch)" in reason
    assert not measure_applies("frobenius_norm_product", inputs, over_margin=True)
    assert measure_applies("frobenius_norm_product", inputs)
    with pytest.raises(MeasureNotApplicable, match=r"measure 'margin' needs class logits and labels") as err:
        compute_measure("margin", inputs)
    assert "\n" not in str(err.value)


def test_every_applicable_measure_is_finite_on_the_autoencoder():
    model, batches = AutoEncoder().eval(), ae_batches()
    init = {k: v.clone() + 0.01 for k, v in model.state_dict().items()}
    obj = resolve_objective(model, "test")
    inputs = MeasureInputs(model, batches, init_state=init, batch_loss=obj.loss_of, logits_fn=obj.logits_of)
    from tests.sharpness.common import cheap

    for name in list_measures():
        if measure_applies(name, inputs):
            value = compute_measure(name, inputs, **cheap(name)).value
            assert math.isfinite(value), name


# ---- (c) a one-logit binary head with BCE-with-logits ----------------------------------------------------------------
def binary_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1)).double().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(30, generator=g, dtype=torch.float64) > 0).double()
    return model, [(x[:16], y[:16]), (x[16:], y[16:])]


def bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.squeeze(1), y)


def test_margin_of_a_one_logit_head_is_the_two_class_margin():
    model, batches = binary_problem()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        z = model(x).squeeze(1)
    margins = torch.where(y == 1, z, -z).numpy()  # logits (0, z): f_y − f_other
    for inputs in (objective_inputs(model, batches, loss_fn=bce), MeasureInputs(model, batches, bce)):
        res = compute_measure("margin", inputs, percentile=10.0)
        assert res.value == pytest.approx(float(np.percentile(margins, 10.0)), rel=1e-12)
        assert res.extra["fraction_nonpositive"] == pytest.approx(float((margins <= 0).mean()))
        p = torch.sigmoid(z)
        entropy = float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())
        assert compute_measure("prediction_entropy", inputs).value == pytest.approx(entropy, rel=1e-10)
        # one layer: minimum sharpness is the GN trace, p(1 − p)(‖x‖² + 1) averaged (the (0, z) logits' GN)
        gn = float((p * (1 - p) * (x.pow(2).sum(1) + 1)).mean())
        assert compute_measure("minimum_sharpness", inputs).value == pytest.approx(gn, rel=1e-9)


# ---- (d) params: a sub-network --------------------------------------------------------------------------------------
def test_params_selects_what_the_measures_perturb():
    model, batches = DictClassifier().eval(), dict_batches()
    head = [model.head.weight, model.head.bias]
    inputs = objective_inputs(model, batches, params=head)
    assert inputs.params == head and [n for n, _ in inputs.named_params] == ["head.weight", "head.bias"]
    frozen = copy.deepcopy(model)  # the reference: the same model with everything but the head frozen
    frozen.body.requires_grad_(False)
    for name, settings in (("worst_case_l2", {"rho": 0.5, "steps": 5}), ("average_sharpness", {"draws": 4})):
        got = compute_measure(name, inputs, **settings).value
        ref = compute_measure(name, objective_inputs(frozen, batches), **settings).value
        assert got == ref, name
        assert got != compute_measure(name, objective_inputs(model, batches), **settings).value
    names = ["head.weight", "head.bias"]
    theta = theta_of(model, names)
    hess = torch.func.hessian(dict_sample_loss(model, batches, names))(theta)
    assert compute_measure("theta_h_theta", inputs).value == pytest.approx(float(theta @ hess @ theta), rel=1e-10)
    assert compute_measure("param_norm", inputs).value == pytest.approx(float(theta.norm()), rel=1e-12)


def test_params_are_mapped_onto_the_folded_copy_by_name():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    net.train()(torch.randn(8, 3, dtype=torch.float64))
    net.eval()
    inputs = MeasureInputs(net, [], params=[net[0].weight])
    bn = net[1]
    folded = net[0].weight.detach() * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[:, None]
    res = compute_measure("param_norm", inputs, bn="fold")
    assert res.value == pytest.approx(float(folded.norm()), rel=1e-12)
    with pytest.raises(ValueError, match="params selects only parameters that bn='fold' folds away"):
        compute_measure("param_norm", MeasureInputs(net, [], params=[net[1].weight]), bn="fold")


# ---- (e) one line for a bad loss or selection ------------------------------------------------------------------------
def test_non_scalar_batch_loss_and_empty_selection_are_one_line():
    model, batches = AutoEncoder().eval(), ae_batches()
    inputs = MeasureInputs(model, batches, batch_loss=lambda m, x: (m(x) - x).pow(2))
    with pytest.raises(ValueError, match=r"^batch_loss must return the batch-mean loss as a scalar tensor") as err:
        compute_measure("sam_sharpness", inputs)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"MeasureInputs\(params\): selects no parameter"):
        MeasureInputs(model, batches, params=[])
    with pytest.raises(ValueError, match=r"MeasureInputs\(params\): holds a tensor that is not a parameter"):
        MeasureInputs(model, batches, params=[nn.Parameter(torch.zeros(2))])


# ---- a language-model-like module: dict batches, token logits from a flatlit family ----------------------------------
def test_seq2seq_module_measures_what_applies():
    from flatlit.data.text import SyntheticTranslationDataModule
    from flatlit.tasks import Seq2SeqAdam

    dm = SyntheticTranslationDataModule(num_train=64, num_val=8, num_test=8, max_length=6, batch_size=8)
    dm.setup("fit")
    torch.manual_seed(0)
    module = Seq2SeqAdam(
        arch="seq2seq_transformer",
        arch_kwargs=dict(
            d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0
        ),
        num_classes=dm.num_classes,
        image_size=dm.max_len,
    ).eval()
    batches = dm.curvature_batches(8, 4, 0)
    obj = resolve_objective(module, "flatlit measure")
    assert obj.source == "Seq2SeqAdam.curvature_loss"
    inputs = MeasureInputs(module, batches, batch_loss=obj.loss_of, logits_fn=obj.logits_of)
    assert inputs.input_shape is None
    for name in ("path_norm_2", "bound_neyshabur2015", "minimum_sharpness"):
        assert inapplicable_reason(name, inputs) is not None, name
    for name in ("theta_h_theta", "margin", "sam_sharpness", "fisher_rao_norm", "frobenius_norm_product"):
        assert math.isfinite(compute_measure(name, inputs).value), name
    clean = compute_measure("sam_sharpness", inputs).extra["clean_loss"]
    with torch.no_grad():
        ref = sum(obj.loss(b) * len(b["src"]) for b in batches) / sum(len(b["src"]) for b in batches)
    assert clean == pytest.approx(float(ref), rel=1e-6)
