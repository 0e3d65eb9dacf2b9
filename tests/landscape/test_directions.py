"""Directions: filter normalisation (Li et al. 2018) against per-filter norms, the other norms, saved sets, the
eigenvector files of the HessianEigenvalues callback, and the two-checkpoint line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flatlit.landscape import (
    interpolation_direction,
    load_directions,
    load_eigenvectors,
    normalize_direction,
    random_directions,
    save_directions,
)
from flatlit.utils.errors import ConfigError
from tests.landscape.common import small_net


def per_row_norms(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t[i].norm() for i in range(t.shape[0])])


def test_filter_normalised_direction_has_the_weights_filter_norms():
    net = small_net()
    ds = random_directions(net, num=2, seed=3)
    params = dict(net.named_parameters())
    assert ds.names == list(params) and len(ds) == 2
    for vec in ds.vectors:
        for name, d in zip(ds.names, vec):
            w = params[name].detach()
            if w.dim() > 1:  # every conv filter / linear row has the norm of the weights' one
                torch.testing.assert_close(per_row_norms(d), per_row_norms(w), rtol=1e-9, atol=0)
                assert not torch.allclose(
                    d / per_row_norms(d).view(-1, *[1] * (d.dim() - 1)),
                    w / per_row_norms(w).view(-1, *[1] * (w.dim() - 1)),
                )
            else:  # biases and BN γ/β do not move (Li et al.'s "biasbn")
                assert torch.equal(d, torch.zeros_like(w))
    # seeded: the same seed draws the same set, another seed another one
    again = random_directions(net, num=2, seed=3)
    assert all(torch.equal(a, b) for va, vb in zip(ds.vectors, again.vectors) for a, b in zip(va, vb))
    other = random_directions(net, num=1, seed=4)
    assert not torch.equal(other.vectors[0][0], ds.vectors[0][0])
    assert ds.digest() == again.digest() != other.digest()


def test_bias_bn_filter_layer_model_and_raw_normalisations():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(4, 3, 2, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    d = [torch.randn(4, 3, 2, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    f = normalize_direction(d, w, "filter", "filter")
    torch.testing.assert_close(f[1], torch.sign(d[1]) * w[1].abs())  # 1-D: per element, sign(d)|w|
    lay = normalize_direction(d, w, "layer", "filter")
    for a, b in zip(lay, w):
        assert float(a.norm()) == pytest.approx(float(b.norm()), rel=1e-9)
    mod = normalize_direction(d, w, "model", "filter")
    total = lambda ts: float(torch.cat([t.reshape(-1) for t in ts]).norm())  # noqa: E731
    assert total(mod) == pytest.approx(total(w), rel=1e-9)
    assert float(mod[0].norm() / mod[1].norm()) == pytest.approx(float(d[0].norm() / d[1].norm()), rel=1e-12)
    raw = normalize_direction(d, w, None, "filter")
    assert all(torch.equal(a, b) for a, b in zip(raw, d))
    assert torch.equal(normalize_direction(d, w, "layer", "ignore")[1], torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="norm must be"):
        normalize_direction(d, w, "weird")


def test_raw_draw_is_the_seeded_gaussian():
    net = nn.Linear(3, 2)
    ds = random_directions(net, 1, seed=7, norm=None, bias_bn="filter")
    g = torch.Generator().manual_seed(7)
    ref = [torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)]
    assert all(torch.equal(a, b.float()) for a, b in zip(ds.vectors[0], ref))


def test_saved_set_round_trips_and_refuses_another_model(tmp_path):
    net = small_net()
    ds = random_directions(net, 2, seed=1)
    path = str(tmp_path / "dirs.pt")
    save_directions(ds, path)
    back = load_directions(path, net)
    assert back.names == ds.names and back.meta == ds.meta and back.digest() == ds.digest()
    wider = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(64, 4)
    ).double()
    with pytest.raises(ConfigError) as err:
        load_directions(path, wider)
    assert path in str(err.value) and "'0.weight'" in str(err.value) and "(3, 1, 3, 3)" in str(err.value)
    with pytest.raises(ConfigError, match="not a flatlit direction file"):
        torch.save(torch.zeros(3), str(tmp_path / "x.pt"))
        load_directions(str(tmp_path / "x.pt"), net)


def test_eigenvector_file_of_the_callback(tmp_path):
    net = small_net()
    n = sum(p.numel() for p in net.parameters())
    vecs = torch.randn(3, n, dtype=torch.float64)
    vecs = vecs / vecs.norm(dim=1, keepdim=True)
    path = tmp_path / "eigenvectors_step40.pt"
    torch.save(vecs, path)
    np.savez(tmp_path / "eigenvalues.npz", step=[20, 40], epoch=[0, 1], eigenvalues=[[5, 4, 3], [9, 8, 7]])
    ds = load_eigenvectors(str(path), net, k=2)
    assert ds.kind == "eigen" and len(ds) == 2 and ds.meta["eigenvalues"] == [9.0, 8.0]
    flat = torch.cat([t.reshape(-1) for t in ds.vectors[1]])
    assert torch.equal(flat, vecs[1])
    # without BN parameters (exclude_bn=True in the callback): the subset is found from the length
    n_nobn = n - 6
    torch.save(torch.randn(1, n_nobn, dtype=torch.float64), tmp_path / "eigenvectors_step1.pt")
    sub = load_eigenvectors(str(tmp_path / "eigenvectors_step1.pt"), net)
    assert "1.weight" not in sub.names and "0.weight" in sub.names
    torch.save(torch.randn(1, n + 1), tmp_path / "eigenvectors_step2.pt")
    with pytest.raises(ConfigError, match=r"eigenvectors_step2\.pt.*another model"):
        load_eigenvectors(str(tmp_path / "eigenvectors_step2.pt"), net)


def test_interpolation_covers_the_whole_state_dict_and_refuses_other_shapes():
    a, b = small_net(0), small_net(1)
    ds = interpolation_direction(a, b.state_dict())
    assert ds.names == list(a.state_dict())
    assert "1.running_mean" in ds.names and "1.num_batches_tracked" in ds.names
    bad = {**b.state_dict(), "5.weight": torch.zeros(4, 47, dtype=torch.float64)}
    with pytest.raises(ConfigError, match=r"'5.weight' has shape \(4, 47\)"):
        interpolation_direction(a, bad)
    missing = {k: v for k, v in b.state_dict().items() if k != "1.running_var"}
    with pytest.raises(ConfigError, match=r"no entry .1\.running_var."):
        interpolation_direction(a, missing)
