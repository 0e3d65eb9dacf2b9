"""Every registered measure: finite, observes without perturbing (weights, BN buffers, train flags, .grad, RNG bit
for bit), deterministic for a seed, and the same on 2 gloo processes as on one."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from flatlit.sharpness import compute_measure, get_measure, list_measures
from tests.helpers import run_torchrun
from tests.sharpness.common import cheap, inputs_for, problem


@pytest.mark.parametrize("name", list_measures())
def test_measure_observes_and_never_perturbs(name):
    model, batches, init = problem()
    model.train()
    model[4].eval()  # a submodule deliberately in eval mode keeps its flag
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    torch.manual_seed(123)
    np.random.seed(5)
    rng, np_rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    result = compute_measure(name, inputs_for(model, batches, init), **cheap(name))
    assert math.isfinite(result.value), result
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is g and torch.all(g == 0.5) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng) and (np.random.get_state()[1] == np_rng).all()
    again = compute_measure(name, inputs_for(model, batches, init), **cheap(name))
    assert again.value == result.value  # seeded: the same value twice
    assert result.settings["bn"] == get_measure(name).defaults["bn"]
    assert set(cheap(name).items()) <= set(result.settings.items())


def test_unknown_measure_and_setting():
    model, batches, init = problem()
    with pytest.raises(ValueError, match=r"unknown measure 'worst_case_l3'\. Did you mean"):
        compute_measure("worst_case_l3", inputs_for(model, batches, init))
    with pytest.raises(ValueError, match="unknown setting"):
        compute_measure(list_measures()[0], inputs_for(model, batches, init), no_such_setting=1)


@pytest.mark.distributed
def test_every_measure_same_on_two_processes(tmp_path):
    out = str(tmp_path / "measures")
    run_torchrun(os.path.join(os.path.dirname(__file__), "ddp_measures_worker.py"), [out], port=29561)
    res = [torch.load(f"{out}.{r}") for r in range(2)]
    model, batches, init = problem()
    for name in list_measures():
        single = compute_measure(name, inputs_for(model, batches, init), **cheap(name)).value
        for r in range(2):
            assert res[r][name] == pytest.approx(single, rel=1e-6, abs=1e-9), (name, r)
