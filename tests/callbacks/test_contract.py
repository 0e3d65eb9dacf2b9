"""Every callback on every kind of module (issue 22): five projects that are not ``(x, y)`` classifiers × the seven
callbacks. Each run ends (or stops at setup with one line), trains bit-identically to a run without the callback, and
reports the value of an independent reference computed here from the module's own loss written out by hand: the
exact Hessian (``torch.func.hessian``) for eigenvalues, trace, spectrum and θᵀHθ, a hand evaluation for the
landscape's origin and the final train loss, and the accuracy of a one-logit head."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from flatlit.callbacks import (
    ComplexityMeasures,
    GeneralizationTargets,
    HessianEigenvalues,
    HessianSpectrum,
    HessianTrace,
    LossLandscape,
    SharpnessMeasures,
)
from flatlit.curvature import hutchinson, slq_density
from flatlit.utils.errors import ConfigError
from tests.callbacks.zoo import ZOO, ZooDM
from tests.helpers import quiet_trainer

SAMPLE = {"num_samples": 24, "batch_size": 8, "progress_every": None}
#: what each project measures: the GAN its discriminator only (the generator is out of the loss' reach)
PARAMS = {"gan": "discriminator.*"}
CALLBACKS = ("eigenvalues", "trace", "spectrum", "sharpness", "complexity", "landscape", "generalization")


def make(callback: str, kind: str):
    params = PARAMS.get(kind)
    if callback == "eigenvalues":
        return HessianEigenvalues(top_k=3, tol=1e-10, max_iter=200, params=params, **SAMPLE)
    if callback == "trace":
        return HessianTrace(num_probes=5, params=params, **SAMPLE)
    if callback == "spectrum":
        return HessianSpectrum(num_runs=2, num_steps=8, params=params, **SAMPLE)
    if callback == "sharpness":
        return SharpnessMeasures(measures=["theta_h_theta"], params=params, **SAMPLE)
    if callback == "complexity":
        return ComplexityMeasures(measures=["param_norm"], params=params, **SAMPLE)
    if callback == "landscape":
        return LossLandscape(num_samples=24, batch_size=8, resolution=3, params=params)
    return GeneralizationTargets(batch_size=8)


def fit(kind: str, callbacks=()):
    pl.seed_everything(0)
    module = ZOO[kind]()
    dm = ZooDM(kind)
    trainer = quiet_trainer(max_epochs=2, callbacks=list(callbacks), deterministic=True)
    trainer.fit(module, datamodule=dm)
    return module, trainer, torch.get_rng_state(), dm.gen.get_state()


_PLAIN: dict[str, tuple] = {}


def plain(kind: str):
    if kind not in _PLAIN:
        _PLAIN[kind] = fit(kind)
    return _PLAIN[kind]


def assert_identical(a, b) -> None:
    (ma, ta, rng_a, gen_a), (mb, tb, rng_b, gen_b) = a, b
    for (name, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), name  # weights and BatchNorm buffers
    for oa, ob in zip(ta.optimizers, tb.optimizers):
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert all(torch.equal(sa[k][s], sb[k][s]) for s in sa[k] if isinstance(sa[k][s], torch.Tensor))
    assert [m.training for m in ma.modules()] == [m.training for m in mb.modules()]
    assert torch.equal(rng_a, rng_b) and torch.equal(gen_a, gen_b)


class _Loss(nn.Module):
    """Holds the module so that ``functional_call`` swaps its parameters around the hand-written loss."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, batch):
        return type(self.inner).reference_loss(self.inner, batch)


def selected(module: nn.Module, kind: str) -> list[str]:
    prefix = PARAMS.get(kind, "").rstrip("*")
    return [n for n, p in module.named_parameters() if p.requires_grad and n.startswith(prefix)]


def exact_hessian(module: nn.Module, kind: str, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, θ): the exact Hessian of the size-weighted mean reference loss over ``batches`` (eval mode) in the
    selected parameters, and those parameters flattened."""
    from flatlit.utils.batching import batch_size

    names = selected(module, kind)
    wrapper = _Loss(module)
    params = dict(module.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    total = sum(batch_size(b) for b in batches)

    def f(flat):
        ps, i = {}, 0
        for n in names:
            ps[f"inner.{n}"] = flat[i : i + params[n].numel()].view_as(params[n])
            i += params[n].numel()
        return sum(batch_size(b) * functional_call(wrapper, ps, (b,), strict=False) for b in batches) / total

    with eval_mode(module):
        return hessian(f)(theta), theta


class eval_mode:
    def __init__(self, module: nn.Module) -> None:
        self.module, self.flags = module, [m.training for m in module.modules()]

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        for m, t in zip(self.module.modules(), self.flags):
            m.training = t


def mean_reference_loss(module: nn.Module, batches) -> float:
    from flatlit.utils.batching import batch_size

    with eval_mode(module), torch.no_grad():
        total = sum(batch_size(b) for b in batches)
        return float(sum(batch_size(b) * type(module).reference_loss(module, b) for b in batches) / total)


@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize("kind", sorted(ZOO))
def test_every_callback_on_every_kind_of_module(kind, callback):
    cb = make(callback, kind)
    observed = fit(kind, [cb])
    assert_identical(plain(kind), observed)
    module, trainer = observed[0], observed[1]
    if callback in ("eigenvalues", "trace", "spectrum", "sharpness"):
        H, theta = exact_hessian(module, kind, cb._batches)
        if callback == "eigenvalues":
            expected = torch.linalg.eigvalsh(H).flip(0)[:3]
            torch.testing.assert_close(cb.last_result.eigenvalues, expected, rtol=1e-6, atol=1e-9)
            assert cb.last_metrics["hessian/converged"] == 1.0
        elif callback == "trace":  # the same Rademacher probes on the exact Hessian
            ref = hutchinson(lambda v: H @ v, H.shape[0], 5, cb.seed + cb.num_measurements - 1, H.dtype, "cpu")
            assert cb.last_metrics["hessian/trace"] == pytest.approx(float(ref.estimate), rel=1e-7, abs=1e-10)
        elif callback == "spectrum":  # the same SLQ start vectors on the exact Hessian
            ref = slq_density(lambda v: H @ v, H.shape[0], 2, 8, cb.num_points, seed=cb.seed, dtype=H.dtype)
            assert cb.last_metrics["hessian/spectrum_max"] == pytest.approx(float(ref.nodes.max()), rel=1e-7)
            assert cb.last_metrics["hessian/spectrum_min"] == pytest.approx(float(ref.nodes.min()), rel=1e-6, abs=1e-9)
        else:
            assert cb.last_metrics["sharpness/theta_h_theta"] == pytest.approx(float(theta @ H @ theta), rel=1e-7)
    elif callback == "complexity":
        params = dict(module.named_parameters())
        norm = torch.cat([params[n].detach().reshape(-1) for n in selected(module, kind)]).norm()
        assert cb.last_metrics["complexity/param_norm"] == pytest.approx(float(norm), rel=1e-12)
    elif callback == "landscape":
        i0 = int(abs(cb.last_result.alphas).argmin())
        assert float(cb.last_result.loss[i0]) == pytest.approx(mean_reference_loss(module, cb._batches), rel=1e-9)
    else:
        dm = trainer.datamodule
        train = [dm.train[i] for i in range(len(dm.train))]
        batches = [torch.utils.data.default_collate(train[i : i + 8]) for i in range(0, len(train), 8)]
        final = cb.final_metrics
        assert final["final/train_loss"] == pytest.approx(mean_reference_loss(module, batches), rel=1e-9)
        if kind == "binary":  # a one-logit head: correct when sigmoid(z) > 1/2 matches the label
            with eval_mode(module):
                expected = type(module).reference_accuracy(module, batches)
            assert final["final/train_acc"] == pytest.approx(expected)
        if kind in ("binary", "dict_step"):
            assert {"final/train_acc", "final/test_acc", "final/gen_gap_acc"} <= set(final)
        else:
            assert not any("acc" in k for k in final)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("callback", CALLBACKS[:-1])
def test_unreached_parameters_are_named_at_setup(callback):
    """The GAN's discriminator loss does not reach the generator: measuring every parameter is refused."""
    cb = make(callback, "autoencoder")  # the same callback without params
    with pytest.raises(ConfigError) as err:
        fit("gan", [cb])
    line = one_line(err)
    assert "(params)" in line and "generator.weight" in line and "generator.bias" in line


@pytest.mark.parametrize("callback", CALLBACKS)
def test_a_non_scalar_batch_loss_is_one_line(callback):
    def per_example(module, batch):
        return ((module(batch) - batch) ** 2).mean(1)

    cb = make(callback, "autoencoder")
    cb.batch_loss = per_example
    with pytest.raises(ConfigError) as err:
        fit("autoencoder", [cb])
    assert "(batch_loss): must return the batch-mean loss as a scalar" in one_line(err)


@pytest.mark.parametrize("callback", ["eigenvalues", "sharpness", "landscape"])
def test_params_that_select_nothing_is_one_line(callback):
    cb = make(callback, "gan")
    cb.param_spec = "critic.*"
    with pytest.raises(ConfigError) as err:
        fit("gan", [cb])
    assert "(params): selects no parameter of GAN" in one_line(err)


@pytest.mark.parametrize("kind", ["autoencoder", "language_model", "gan"])
def test_a_measure_that_needs_labels_is_refused_at_setup(kind):
    cb = ComplexityMeasures(measures=["margin"], params=PARAMS.get(kind), **SAMPLE)
    with pytest.raises(ConfigError) as err:
        fit(kind, [cb])
    line = one_line(err)
    assert "margin" in line and "outputs_and_targets" in line


def test_stop_error_without_logits_is_refused_at_setup():
    with pytest.raises(ConfigError) as err:
        fit("autoencoder", [GeneralizationTargets(stop_error=0.01)])
    assert "stop_error" in one_line(err)
