"""Step decomposition (F45) and gradient alignment (F46) against hand computations on a quadratic.

L(θ) = mean_i ½(θ − y_i)ᵀA(θ − y_i): the gradient of a batch is A(θ − ȳ_b), and a step s changes the loss by
ΔL = −sᵀA(θ − ȳ) + ½ sᵀAs exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatlit.landscape import DirectionSet, gradient_alignment, step_decomposition
from tests.landscape.common import Quadratic, quadratic_batches, quadratic_loss, spd

DIM = 5


def problem():
    A = spd(DIM, seed=1)
    theta = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2], dtype=torch.float64)
    batches = quadratic_batches(30, DIM, 10, seed=4)
    model = Quadratic(theta)
    _, vecs = np.linalg.eigh(A.numpy())
    top = vecs[:, ::-1][:, :2].T  # e1, e2: the two largest eigenvalues
    ds = DirectionSet("eigen", ["theta"], [(DIM,)], [[torch.tensor(v)] for v in top], {}, [])
    return A.numpy(), theta.numpy(), batches, model, ds, top


def by_hand_delta(A, theta, ybar, s):
    return float(-s @ A @ (theta - ybar) + 0.5 * s @ A @ s)


def test_step_decomposition_matches_hand_computation():
    A, theta, batches, model, ds, top = problem()
    lr, gammas = 0.1, (0.25, 1.0, 4.0)
    minibatches = batches[:2]
    res = step_decomposition(model, batches, minibatches, ds, lr, gammas, quadratic_loss(torch.tensor(A)), seed=3)
    assert res.labels == ("e1", "e2", "random", "full")
    Y = torch.cat([b[1] for b in batches]).numpy()
    ybar = Y.mean(0)
    assert res.loss == pytest.approx(0.5 * np.einsum("ni,ij,nj->n", theta - Y, A, theta - Y).mean(), rel=1e-12)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(DIM, generator=g, dtype=torch.float64).numpy()
    units = [top[0], top[1], u / np.linalg.norm(u)]
    expected = np.zeros((4, len(gammas), len(minibatches)))
    for m, (_, y) in enumerate(minibatches):
        grad = A @ (theta - y.numpy().mean(0))
        steps = [(grad @ v) * v for v in units] + [grad]
        for i, s in enumerate(steps):
            for j, gamma in enumerate(gammas):
                expected[i, j, m] = by_hand_delta(A, theta, ybar, lr * gamma * s)
    np.testing.assert_allclose(res.delta_loss, expected.mean(-1), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(res.delta_loss_std, expected.std(-1), rtol=1e-7, atol=1e-12)
    assert res.as_dict()["decompose/e1_gamma4"] == pytest.approx(expected[0, 2].mean(), rel=1e-9)


def test_gradient_alignment_matches_hand_computation():
    A, theta, batches, model, ds, top = problem()
    minibatches = [batches[0], batches[2]]
    res = gradient_alignment(model, batches, minibatches, ds, quadratic_loss(torch.tensor(A)))
    Y = torch.cat([b[1] for b in batches]).numpy()
    G = A @ (theta - Y.mean(0))
    gs = [A @ (theta - y.numpy().mean(0)) for _, y in minibatches]

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    c_mf = np.array([cos(g, G) for g in gs])
    assert res.stats["minibatch_full/mean"] == pytest.approx(c_mf.mean(), rel=1e-10)
    assert res.stats["minibatch_full/std"] == pytest.approx(c_mf.std(), rel=1e-8)
    for k in range(2):
        c = np.array([cos(g, top[k]) for g in gs])
        assert res.stats[f"minibatch_e{k + 1}/mean"] == pytest.approx(c.mean(), rel=1e-10)
        assert res.stats[f"minibatch_e{k + 1}/abs_mean"] == pytest.approx(np.abs(c).mean(), rel=1e-10)
        assert res.stats[f"full_e{k + 1}"] == pytest.approx(cos(G, top[k]), rel=1e-10)
