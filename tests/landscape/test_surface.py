"""Lines and planes: closed forms on a quadratic, exact checkpoint ends with BatchNorm buffers, BatchNorm policies,
resuming a killed grid, and observe-never-perturb."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flatlit.landscape import (
    DirectionSet,
    LandscapeResult,
    PointWriter,
    compute_surface,
    eigen_directions,
    gradient_alignment,
    interpolation_direction,
    random_directions,
    step_decomposition,
)
from flatlit.utils.errors import ConfigError
from tests.landscape.common import (
    Quadratic,
    assert_unchanged,
    quadratic_batches,
    quadratic_loss,
    small_batches,
    small_net,
    snapshot,
    spd,
)


def reference_loss_acc(model, batches):
    """Mean cross-entropy and accuracy written out by hand over the whole sample (eval mode)."""
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        out = model(x)
        logp = out - out.logsumexp(1, keepdim=True)
        return float(-logp[torch.arange(len(y)), y].mean()), float((out.argmax(1) == y).double().mean())


def test_quadratic_plane_matches_its_closed_form():
    dim = 5
    A = spd(dim)
    theta0 = torch.linspace(-1, 1, dim, dtype=torch.float64)
    model = Quadratic(theta0)
    batches = quadratic_batches(30, dim, 7)
    ds = random_directions(model, 2, seed=0, norm=None, bias_bn="filter")
    alphas, betas = np.linspace(-1, 2, 4), np.linspace(-0.5, 0.5, 3)
    r = compute_surface(model, batches, ds, alphas, betas, loss_fn=quadratic_loss(A))
    assert r.loss.shape == (4, 3) and r.complete and np.isnan(r.acc).all()  # not a classifier
    Y = torch.cat([b[1] for b in batches]).numpy()
    An, d1, d2 = A.numpy(), ds.vectors[0][0].numpy(), ds.vectors[1][0].numpy()
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            R = theta0.numpy() + a * d1 + b * d2 - Y
            assert r.loss[i, j] == pytest.approx(0.5 * np.einsum("ni,ij,nj->n", R, An, R).mean(), rel=1e-12)


def test_eigenvector_cross_section_of_a_quadratic_is_half_lambda_alpha_squared():
    dim = 6
    A = spd(dim, seed=3)
    center = torch.arange(dim, dtype=torch.float64) / 3
    batches = quadratic_batches(24, dim, 8, center=center)  # mean target = center: the minimum
    model = Quadratic(center)
    ds = eigen_directions(model, batches, quadratic_loss(A), k=2, max_iter=dim, tol=1e-10)
    lam = np.linalg.eigvalsh(A.numpy())[::-1]
    assert ds.meta["eigenvalues"] == pytest.approx(lam[:2], rel=1e-10)
    alphas = np.linspace(-1.5, 1.5, 7)
    for k in range(2):
        r = compute_surface(model, batches, ds.select(k), alphas, loss_fn=quadratic_loss(A))
        l0 = r.loss[3]
        np.testing.assert_allclose(r.loss - l0, 0.5 * lam[k] * alphas**2, rtol=1e-10, atol=1e-12)


def trained_pair():
    """Two BN nets with different weights *and* running statistics (checkpoints A and B)."""
    a, b = small_net(0), small_net(5)
    assert not torch.equal(a[1].running_mean, b[1].running_mean)
    return a, b


def test_interpolation_reproduces_both_checkpoints_exactly_with_bn_buffers():
    a, b = trained_pair()
    batches = small_batches()
    ref_a, ref_b = reference_loss_acc(copy.deepcopy(a), batches), reference_loss_acc(copy.deepcopy(b), batches)
    ds = interpolation_direction(a, b.state_dict())
    r = compute_surface(a, batches, ds, [0.0, 0.3, 1.0], bn="interpolate")
    assert (r.loss[0], r.acc[0]) == pytest.approx(ref_a, rel=1e-13)
    assert (r.loss[2], r.acc[2]) == pytest.approx(ref_b, rel=1e-13)
    # exactly B: the same value as evaluating a copy loaded with B's state_dict the same way
    same = compute_surface(copy.deepcopy(b), batches, random_directions(b, 1), [0.0])
    assert r.loss[2] == same.loss[0]
    # at 0.3 the weights and the buffers are both interpolated
    mid = copy.deepcopy(a)
    mid.load_state_dict(
        {k: torch.lerp(v, b.state_dict()[k], 0.3) if v.is_floating_point() else v for k, v in a.state_dict().items()}
    )
    assert r.loss[1] == pytest.approx(reference_loss_acc(mid, batches)[0], rel=1e-12)
    # bn="eval" keeps A's running statistics: at α = 1 it is not checkpoint B
    r_eval = compute_surface(a, batches, ds, [1.0], bn="eval")
    assert r_eval.loss[0] != pytest.approx(ref_b[0], rel=1e-6)


def test_bn_update_reestimates_statistics_at_every_point():
    net, batches = small_net(), small_batches()
    ds = random_directions(net, 1, seed=2)
    alphas = [-0.5, 0.0, 0.7]
    r = compute_surface(net, batches, ds, alphas, bn="update", seed=11)
    for i, a in enumerate(alphas):
        ref = copy.deepcopy(net)
        with torch.no_grad():
            for p, d in zip(ref.parameters(), ds.vectors[0]):
                p.add_(d, alpha=a)
        torch.manual_seed(11 + i)  # the same seeded dropout masks during the BN pass
        torch.optim.swa_utils.update_bn(batches, ref)
        assert r.loss[i] == pytest.approx(reference_loss_acc(ref, batches)[0], rel=1e-12)
    r_eval = compute_surface(net, batches, ds, alphas, bn="eval")
    assert not np.allclose(r.loss, r_eval.loss)


class Killed(Exception):
    pass


def test_a_killed_grid_resumes_to_the_uninterrupted_one(tmp_path):
    net, batches = small_net(), small_batches()
    ds = random_directions(net, 2, seed=1)
    grid = dict(alphas=np.linspace(-1, 1, 4), betas=np.linspace(-1, 1, 3), loss_fn=F.cross_entropy)
    full = compute_surface(net, batches, ds, **grid)
    path = str(tmp_path / "plane.npz")
    meta = {"mode": "plane", "note": "test"}
    calls = []

    def dies_at_point_8(out, y):  # 3 batches per point: points 1-7 finish, the 8th raises
        calls.append(1)
        if len(calls) > 7 * 3:
            raise Killed
        return F.cross_entropy(out, y)

    with pytest.raises(Killed):
        compute_surface(net, batches, ds, **{**grid, "loss_fn": dies_at_point_8}, path=path, meta=meta, save_every=3)
    part = LandscapeResult.load(path)  # written after points 3 and 6; point 7 was lost with the process
    assert int(part.done.sum()) == 6 and np.isnan(part.loss[~part.done]).all()
    assert np.array_equal(part.loss[part.done], full.loss[part.done])

    calls.clear()
    counting = {**grid, "loss_fn": lambda out, y: calls.append(1) or F.cross_entropy(out, y)}
    resumed = compute_surface(net, batches, ds, **counting, path=path, meta=meta, save_every=3)
    assert np.array_equal(resumed.loss, full.loss) and np.array_equal(resumed.acc, full.acc)
    assert len(calls) == (12 - 6) * 3  # only the missing points were evaluated
    on_disk = LandscapeResult.load(path)
    assert on_disk.complete and np.array_equal(on_disk.loss, full.loss)

    # other arguments: a clear error naming the first difference, or a fresh file with overwrite=True
    with pytest.raises(ConfigError, match=r"plane\.npz.*other arguments.*bn = 'eval' in the file, 'update' now"):
        compute_surface(net, batches, ds, **grid, path=path, meta=meta, bn="update")
    with pytest.raises(ConfigError, match="α grid differs"):
        compute_surface(net, batches, ds, np.linspace(-2, 2, 4), grid["betas"], path=path, meta=meta)
    other = random_directions(net, 2, seed=2)
    with pytest.raises(ConfigError, match="direction_digest"):
        compute_surface(net, batches, other, **grid, path=path, meta=meta)
    fresh = compute_surface(net, batches, other, **grid, path=path, meta=meta, overwrite=True)
    assert fresh.complete and not np.array_equal(fresh.loss, full.loss)


def test_every_analysis_observes_and_never_perturbs():
    net, batches = small_net(), small_batches()
    net.train()
    net[3].eval()  # mixed flags must come back as they were
    net[0].weight.grad = torch.full_like(net[0].weight, 0.5)
    torch.manual_seed(123)
    np.random.seed(5)
    a, b = small_net(0), small_net(7)
    a.train()
    analyses = {
        "line eval": lambda m: compute_surface(m, batches, random_directions(m, 1), [-1.0, 0.5]),
        "plane update": lambda m: compute_surface(m, batches, random_directions(m, 2), [-1.0, 1.0], [0.5], bn="update"),
        "eigen": lambda m: eigen_directions(m, batches, k=1, max_iter=8),
        "steps": lambda m: step_decomposition(
            m, batches, batches[:2], eigen_directions(m, batches, k=1, max_iter=5), 0.1
        ),
        "alignment": lambda m: gradient_alignment(m, batches, batches[:2], None),
    }
    for name, fn in analyses.items():
        before = snapshot(net)
        fn(net)
        try:
            assert_unchanged(net, before)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None
    before = snapshot(a)
    compute_surface(a, batches, interpolation_direction(a, b.state_dict()), [0.5, 1.0], bn="interpolate")
    assert_unchanged(a, before)


def test_bad_arguments():
    net, batches = small_net(), small_batches()
    one = random_directions(net, 1)
    with pytest.raises(ValueError, match="plane needs 2"):
        compute_surface(net, batches, one, [0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="two checkpoints only"):
        compute_surface(net, batches, one, [0.0, 1.0], bn="interpolate")
    with pytest.raises(ValueError, match="must not be empty"):
        compute_surface(net, batches, one, [])
    assert isinstance(one, DirectionSet)


def test_point_writer_ends_are_the_checkpoints_bit_for_bit():
    a, b = small_net(0), small_net(5)
    with torch.no_grad():  # mixed magnitudes: A + 1·(B − A) rounds away from B for most entries
        for p in a.parameters():
            p.mul_(1e-7)
    end = {k: v.clone() for k, v in b.state_dict().items()}
    naive = [x + (end[k] - x) for k, x in a.state_dict().items() if x.is_floating_point()]
    assert not all(
        torch.equal(n, end[k]) for n, k in zip(naive, [k for k, x in a.state_dict().items() if x.is_floating_point()])
    )
    start = {k: v.clone() for k, v in a.state_dict().items()}
    writer = PointWriter(a, interpolation_direction(a, end))
    writer.write(1.0)
    assert all(torch.equal(v, end[k]) for k, v in a.state_dict().items())
    writer.write(0.0)
    assert all(torch.equal(v, start[k]) for k, v in a.state_dict().items())
    ds = random_directions(a, 2, seed=1)
    plane = PointWriter(a, ds)
    plane.write(0.7, -0.3)
    plane.write(0.0, 0.0)
    assert all(torch.equal(v, start[k]) for k, v in a.state_dict().items())
