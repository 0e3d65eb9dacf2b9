"""How an SGD step splits over the sharpest directions (SPEC F45) and how minibatch gradients align (SPEC F46).

Both follow Jastrzębski, Kenton, Ballas, Fischer, Bengio & Storkey, "On the Relation Between the Sharpest
Directions of DNN Loss and the SGD Step Length", ICLR 2019, arXiv 1807.05031 (their ``DecomposeStepAnalysis`` and
``FullBatchGradientAnalysis``; SPEC §3.4). They run on this process's data only (no collectives), with every module
in eval mode (BatchNorm running statistics, dropout off), and restore the model bit for bit (weights, buffers, train
flags, ``.grad`` and the global RNG). Gradients come from ``torch.autograd.grad``.

The loss of a batch is ``loss_fn(model(x), y)`` on ``(x, y)`` batches (default cross-entropy), or
``batch_loss(model, batch)`` on batches of any structure (e.g. the ``loss_of`` of
:func:`flatlit.objective.resolve_objective`), weighted by :func:`flatlit.utils.batching.batch_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flatlit.landscape.directions import DirectionSet
from flatlit.landscape.surface import evaluate
from flatlit.sharpness.base import observed
from flatlit.utils.batching import batch_size

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLossFn = Callable[[nn.Module, Any], torch.Tensor]
Batch = Any  # an (x, y) pair, or any structure a ``batch_loss`` understands
GAMMAS = (0.25, 0.33, 0.5, 1.0, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class StepDecomposition:
    """ΔL[d, g] = mean over minibatch gradients of L(θ − lr·γ_g·s_d) − L(θ) on the sample, for each direction d.

    ``labels`` are ``e1 … ek`` (steps along the eigenvectors), ``random`` (along a random unit vector) and
    ``full`` (the whole SGD step); ``delta_loss_std`` is the standard deviation (ddof 0) over the minibatches.
    """

    gammas: tuple[float, ...]
    labels: tuple[str, ...]
    delta_loss: np.ndarray
    delta_loss_std: np.ndarray
    loss: float
    lr: float

    def as_dict(self) -> dict[str, float]:
        """``decompose/{label}_gamma{γ}`` → mean ΔL (flat, for loggers and JSON)."""
        return {
            f"decompose/{lab}_gamma{g:g}": float(self.delta_loss[i, j])
            for i, lab in enumerate(self.labels)
            for j, g in enumerate(self.gammas)
        }


@dataclass(frozen=True)
class GradientAlignment:
    """Cosines between minibatch gradients g_m, the full-sample gradient G and the eigenvectors v_k.

    ``stats`` holds ``minibatch_full/{mean,abs_mean,std}`` (cos(g_m, G) over m), ``minibatch_e{k}/{mean,abs_mean,
    std}`` (cos(g_m, v_k) over m) and ``full_e{k}`` (cos(G, v_k)); std with ddof 0.
    """

    stats: dict[str, float] = field(default_factory=dict)
    cos_minibatch_full: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cos_minibatch_eigen: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    cos_full_eigen: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _params(model: nn.Module, directions: DirectionSet | None) -> tuple[list[str], list[nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if directions is not None:
        lookup = dict(named)
        missing = [n for n in directions.names if n not in lookup]
        if missing:
            raise ValueError(f"the directions move {missing[0]!r}, which is not a trainable parameter of the model")
        named = [(n, lookup[n]) for n in directions.names]
    return [n for n, _ in named], [p for _, p in named]


def _local_grad(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[Batch],
    loss_fn: LossFn,
    batch_loss: BatchLossFn | None,
) -> tuple[float, list[torch.Tensor]]:
    """Size-weighted mean loss and its gradient over this process's ``batches`` (``torch.autograd.grad``; ``.grad``
    untouched; parameters the loss does not reach get zeros)."""
    grads = [torch.zeros_like(p) for p in params]
    total_loss, total = 0.0, 0
    for batch in batches:
        n = batch_size(batch)
        with torch.enable_grad():
            if batch_loss is not None:
                loss = batch_loss(model, batch)
            else:
                x, y = batch
                loss = loss_fn(model(x), y)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                what = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"batch_loss must return the batch-mean loss as a scalar tensor, got {what}")
            g = torch.autograd.grad(loss.reshape(()), list(params), allow_unused=True)
        for buf, gi in zip(grads, g):
            if gi is not None:
                buf.add_(gi, alpha=n)
        total_loss += float(loss.detach()) * n
        total += n
    return total_loss / total, [g / total for g in grads]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(torch.dot(a, b)) / den if den > 0 else float("nan")


def step_decomposition(
    model: nn.Module,
    batches: Sequence[Batch],
    minibatches: Sequence[Batch],
    eigenvectors: DirectionSet,
    lr: float,
    gammas: Sequence[float] = GAMMAS,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    *,
    batch_loss: BatchLossFn | None = None,
) -> StepDecomposition:
    """Loss change of an SGD step restricted to each top eigenvector, to a random direction, and in full (F45).

    For each minibatch gradient g_m (one per batch of ``minibatches``), each γ and each unit direction v
    (the eigenvectors, then a seeded random unit vector u): θ' = θ − lr·γ·(g_m·v)·v; and the full step
    θ' = θ − lr·γ·g_m. ΔL = L(θ') − L(θ) is the mean loss on ``batches``, averaged over m.

    Args:
        model: the network at θ (unwrapped).
        batches: the evaluation sample (x, y).
        minibatches: the batches whose gradients are the steps (Jastrzębski et al.: M = 10 of the training size).
        eigenvectors: a direction set of kind ``eigen`` (unit vectors over its parameters; only those move).
        lr: the learning rate; the steps are lr·γ.
        gammas: the multipliers γ (default 0.25, 0.33, 0.5, 1, 2, 3, 4).
        loss_fn: the batch-mean loss (default cross-entropy).
        seed: of the random unit vector (a CPU generator; the global RNG is untouched).
        batch_loss: ``batch_loss(model, batch)``, the batch-mean loss of batches of any structure (replaces
            ``loss_fn``).
    """
    loss_fn = loss_fn or F.cross_entropy
    _, params = _params(model, eigenvectors)
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=torch.float64)
    units = [_flat(v) for v in eigenvectors.vectors] + [rand / rand.norm()]
    labels = (*[f"e{i + 1}" for i in range(len(eigenvectors))], "random", "full")
    deltas = np.zeros((len(labels), len(gammas), len(minibatches)))
    with observed(model):
        model.eval()
        origin = [p.detach().clone() for p in params]
        loss0, _ = evaluate(model, batches, loss_fn, batch_loss=batch_loss)
        for m, mb in enumerate(minibatches):
            with torch.no_grad():  # every gradient at θ itself
                for p, o in zip(params, origin):
                    p.copy_(o)
            _, g = _local_grad(model, params, [mb], loss_fn, batch_loss)
            gflat = _flat(g)
            steps = [torch.dot(gflat, u) * u for u in units] + [gflat]
            for i, s in enumerate(steps):
                for j, gamma in enumerate(gammas):
                    with torch.no_grad():
                        offset = 0
                        for p, o in zip(params, origin):
                            n = p.numel()
                            p.copy_(o - (lr * gamma) * s[offset : offset + n].view_as(p).to(p.dtype))
                            offset += n
                    deltas[i, j, m] = evaluate(model, batches, loss_fn, batch_loss=batch_loss)[0] - loss0
        with torch.no_grad():
            for p, o in zip(params, origin):
                p.copy_(o)
    return StepDecomposition(tuple(float(g) for g in gammas), labels, deltas.mean(-1), deltas.std(-1), loss0, float(lr))


def gradient_alignment(
    model: nn.Module,
    batches: Sequence[Batch],
    minibatches: Sequence[Batch],
    eigenvectors: DirectionSet | None = None,
    loss_fn: LossFn | None = None,
    *,
    batch_loss: BatchLossFn | None = None,
) -> GradientAlignment:
    """Cosines between minibatch gradients, the full-sample gradient and the top eigenvectors (F46).

    G = ∇L over ``batches`` (size-weighted mean), g_m = ∇L_m over each batch of ``minibatches``; over the
    eigenvectors' parameters (all trainable parameters without ``eigenvectors``). The loss is ``loss_fn`` on
    ``(x, y)`` batches, or ``batch_loss(model, batch)`` on batches of any structure.
    """
    loss_fn = loss_fn or F.cross_entropy
    _, params = _params(model, eigenvectors)
    units = [_flat(v) for v in eigenvectors.vectors] if eigenvectors is not None else []
    with observed(model):
        model.eval()
        _, full = _local_grad(model, params, batches, loss_fn, batch_loss)
        G = _flat(full)
        mini = [_flat(_local_grad(model, params, [mb], loss_fn, batch_loss)[1]) for mb in minibatches]
    c_mf = np.array([_cos(g, G) for g in mini])
    c_me = np.array([[_cos(g, u) for g in mini] for u in units]).reshape(len(units), len(mini))
    c_fe = np.array([_cos(G, u) for u in units])

    def summary(x: np.ndarray) -> tuple[float, float, float]:
        if x.size == 0:
            return math.nan, math.nan, math.nan
        return float(x.mean()), float(np.abs(x).mean()), float(x.std())

    stats: dict[str, float] = {}
    for key, x in [("minibatch_full", c_mf)] + [(f"minibatch_e{k + 1}", c_me[k]) for k in range(len(units))]:
        stats[f"{key}/mean"], stats[f"{key}/abs_mean"], stats[f"{key}/std"] = summary(x)
    stats.update({f"full_e{k + 1}": float(c) for k, c in enumerate(c_fe)})
    return GradientAlignment(stats, c_mf, c_me, c_fe)
