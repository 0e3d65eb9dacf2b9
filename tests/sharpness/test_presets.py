"""Paper presets: every entry resolves against the registry, pinned settings cannot be overridden, the run records
(Jiang's step counts) are read exactly, and gradient noise equals a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatlit.sharpness import compute_measure, get_measure
from flatlit.sharpness.presets import describe_presets, get_preset, list_presets, measure_table, preset_measures
from flatlit.sharpness.records import read_record
from flatlit.utils.errors import ConfigError
from tests.sharpness.common import inputs_for, problem


def test_the_three_papers_are_registered_and_every_entry_resolves():
    assert {"jiang2019", "andriushchenko2023", "lpf2022"} <= set(list_presets())
    for name in list_presets():
        preset = get_preset(name)
        entries = preset_measures(name)
        assert [e.label for e in entries] == [e.label for e in preset.entries]
        for entry, row in zip(entries, preset.entries):
            assert entry.measure == row.measure
            for key, value in row.settings.items():  # the paper's settings, on top of the measure's defaults
                assert entry.settings[key] == value
            if not entry.is_record:
                assert set(entry.settings) == set(get_measure(entry.measure).defaults)
    text = describe_presets()
    for name in list_presets():
        assert f"### `{name}`" in text
        assert all(f"`{e.label}`" in text for e in get_preset(name).entries)


def test_presets_pin_their_conventions():
    jiang = {e.label: e for e in preset_measures("jiang2019")}
    assert jiang["log_prod_of_spec"].settings["scale"] == "half_log_m"
    assert jiang["fro_dist"].settings["weights_only"] is True
    assert jiang["pacbayes_init"].settings["target_metric"] == "accuracy"
    assert all(e.settings["bn"] == "fold" for e in jiang.values() if not e.is_record and e.label != "grad_noise_final")
    lpf = preset_measures("lpf2022")
    assert all(e.settings["reparametrize"] == "lpf_norm" and e.settings["bn"] == "eval" for e in lpf)
    andr = preset_measures("andriushchenko2023", ["adaptive_l2"])
    assert andr[0].settings["iteration"] == "andriushchenko" and andr[0].settings["m"] == 128


def test_bad_preset_input_is_one_line():
    with pytest.raises(ConfigError, match="unknown preset 'jiang2020'; known presets: andriushchenko2023"):
        preset_measures("jiang2020")
    with pytest.raises(ConfigError, match=r"no measure 'log_prod_spec' in this preset\. Did you mean log_prod_of_spec"):
        preset_measures("jiang2019", ["log_prod_spec"])
    with pytest.raises(ConfigError, match=r"--settings.fro_dist.weights_only: False conflicts with preset jiang2019"):
        preset_measures("jiang2019", None, {"fro_dist": {"weights_only": False}})
    with pytest.raises(ConfigError, match="measures log_prod_of_spec as spectral_norm_product"):
        preset_measures("jiang2019", None, {"log_prod_of_spec": {"measure": "param_norm"}})
    # a setting the preset leaves free may change, and a pinned one may be repeated with its own value
    free = preset_measures("jiang2019", ["log_prod_of_spec"], {"log_prod_of_spec": {"power_iters": 7, "squared": True}})
    assert free[0].settings["power_iters"] == 7
    for line in (str(e) for e in _errors()):
        assert "\n" not in line


def _errors():
    out = []
    for call in (
        lambda: preset_measures("nope"),
        lambda: preset_measures("lpf2022", None, {"low_pass": {"sigma": 0.02}}),
        lambda: measure_table({"x": {"measure": "no_such"}}, "measures"),
    ):
        with pytest.raises(ConfigError) as err:
            call()
        out.append(err.value)
    return out


def test_a_measure_table_may_run_one_measure_under_several_labels():
    table = measure_table({"sam_a": {"measure": "sam_sharpness", "rho": 0.01}, "margin": {}}, "measures")
    assert [(e.label, e.measure, e.settings.get("rho")) for e in table] == [
        ("sam_a", "sam_sharpness", 0.01),
        ("margin", "margin", None),
    ]
    with pytest.raises(ConfigError, match=r"measures.sam_a: unknown setting\(s\) r of measure 'sam_sharpness'"):
        measure_table({"sam_a": {"measure": "sam_sharpness", "r": 0.01}}, "measures")


def test_records_read_the_first_crossings():
    final = {"loss_milestones": {"0.1": {"epoch": 3, "step": 120}, "0.01": {"epoch": 9, "step": 400}}}
    assert read_record("record:steps_to_loss", {"loss": 0.1}, final) == (120.0, {})
    value, extra = read_record("record:steps_between_losses", {"start": 0.1, "end": 0.01}, final)
    assert value == 280.0 and extra == {"start_step": 120.0, "end_step": 400.0}
    never = {"loss_milestones": {"0.1": {"epoch": 3, "step": 120}, "0.01": None}}  # recorded, never reached
    assert read_record("record:steps_between_losses", {"start": 0.1, "end": 0.01}, never)[0] == math.inf
    with pytest.raises(ValueError, match=r"needs the training run's record of the steps to training loss 0\.01"):
        read_record("record:steps_to_loss", {"loss": 0.01}, {"loss_milestones": {"0.1": None}})
    with pytest.raises(ValueError, match=r"GeneralizationTargets\(loss_milestones=\[0\.1, 0\.01\]\)"):
        read_record("record:steps_to_loss", {"loss": 0.1}, {})


def _per_example_grads(model: nn.Module, batches) -> torch.Tensor:
    """Independent reference: torch.func per-example gradients of the cross-entropy, flattened (n, P)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    rows = []
    for x, y in batches:
        g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
        rows.append(torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1))
    return torch.cat(rows)


def test_gradient_noise_equals_the_trace_of_the_per_example_gradient_covariance():
    model, batches, init = problem()
    inputs = inputs_for(model, batches, init)
    got = compute_measure("gradient_noise", inputs)
    g = _per_example_grads(model, batches)  # eval mode: BN running statistics, dropout off (the measure's mode)
    expected = float(((g - g.mean(0)) ** 2).sum(1).mean())
    assert got.value == pytest.approx(expected, rel=1e-10)
    assert got.extra["mean_grad_norm_sq"] == pytest.approx(float(g.mean(0).pow(2).sum()), rel=1e-10)
    # chunks of 3 consecutive examples: the spread of the chunk-mean gradients
    chunks = torch.stack([g[i : i + 3].mean(0) for i in range(0, len(g), 3)])
    got3 = compute_measure("gradient_noise", inputs, chunk=3)
    assert got3.value == pytest.approx(float(((chunks - chunks.mean(0)) ** 2).sum(1).mean()), rel=1e-10)
    with pytest.raises(ValueError, match="bn='eval' or bn='fold'"):
        compute_measure("gradient_noise", inputs, bn="train")
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        compute_measure("gradient_noise", inputs, chunk=0)


def test_inverse_margin_is_one_over_the_squared_margin():
    model, batches, init = problem()
    inputs = inputs_for(model, batches, init)
    plain = compute_measure("margin", inputs, margin_rank=0.1)
    inverse = compute_measure("margin", inputs, margin_rank=0.1, inverse_squared=True)
    assert plain.value > 0 and inverse.value == pytest.approx(1 / plain.value**2, rel=1e-14)
    assert inverse.extra["margin"] == plain.value
    with pytest.raises(ValueError, match="inverse_squared must be True or False"):
        compute_measure("margin", inputs, inverse_squared="yes")
