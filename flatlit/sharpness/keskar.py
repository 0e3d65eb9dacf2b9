"""Keskar et al.'s ε-sharpness: the largest loss within a box around the weights, found by L-BFGS-B (SPEC 1.6, F27)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.optimize
import torch
from scipy.optimize import _lbfgsb

from flatlit.sharpness.base import (
    Batch,
    Cost,
    MeasureInputs,
    MeasureResult,
    generator,
    register_measure,
)
from flatlit.sharpness.worst_case import check_bool, check_choice, check_int, check_positive, check_seed

SPLITS = ("train", "test")


def _flat(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]).numpy()


def _load(params: Sequence[torch.Tensor], x: np.ndarray) -> None:
    """Copy the flat float64 vector ``x`` into ``params`` (cast to their dtype and device)."""
    i = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(torch.from_numpy(x[i : i + n]).view_as(p))
            i += n


def lbfgsb(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    maxiter: int,
) -> float:
    """Minimise ``fun`` (returning value and gradient) over the box [lower, upper] from ``x0`` by scipy's L-BFGS-B
    (Byrd, Lu, Nocedal & Zhu 1995) with ``scipy.optimize.minimize``'s defaults (10 corrections, ftol 2.2e-9, gtol
    1e-5, 20 line-search steps), stopping after ``maxiter`` iterations; returns the final value.

    ``minimize`` converts array bounds to a list of n tuples and back and sets the bound types in a Python loop
    (≈ 5 s for the 1.2 M weights of lenet, half the cost of 10 iterations), so for the scipy ≥ 1.15 interface this
    drives scipy's ``setulb`` reverse-communication routine directly, as ``minimize`` does after its conversions; it
    falls back to ``minimize`` where that routine's signature differs. Both follow the same iterates.
    """
    n = len(x0)
    m, factr, pgtol, maxls = 10, 2.2204460492503131e-09 / np.finfo(float).eps, 1e-5, 20
    x = np.clip(np.array(x0, dtype=np.float64), lower, upper)
    lo, up = np.ascontiguousarray(lower, np.float64), np.ascontiguousarray(upper, np.float64)
    f, g = np.array(0.0, dtype=np.float64), np.zeros(n, np.float64)  # setulb asks for f, g at x first
    nbd = np.full(n, 2, np.int32)  # both bounds finite
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, np.float64)
    iwa = np.zeros(3 * n, np.int32)
    task, ln_task = np.zeros(2, np.int32), np.zeros(2, np.int32)
    lsave, isave, dsave = np.zeros(4, np.int32), np.zeros(44, np.int32), np.zeros(29, np.float64)
    first, iterations = True, 0
    while True:
        try:
            _lbfgsb.setulb(m, x, lo, up, nbd, f, g, factr, pgtol, wa, iwa, task, lsave, isave, dsave, maxls, ln_task)
        except (TypeError, ValueError):
            if not first:
                raise
            bounds = scipy.optimize.Bounds(lower, upper)
            res = scipy.optimize.minimize(
                fun, x, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": maxiter}
            )
            return float(res.fun)
        first = False
        if task[0] == 3:  # wants f and g at x
            value, grad = fun(x)
            f, g = np.array(value, dtype=np.float64), np.asarray(grad, dtype=np.float64)
        elif task[0] == 1:  # a new iterate
            iterations += 1
            if iterations >= maxiter:
                break
        else:  # converged, or abnormal termination of the line search
            break
    return float(f)


def subspace_matrix(n: int, m: int, gen: torch.Generator) -> np.ndarray:
    """A⁺ ∈ R^{m×n}: entries U(−1, 1) (``2·torch.rand(m, n, generator=gen, dtype=float64) − 1``), each row scaled to
    unit L2 norm, as in SmoothOut's ``measure_sharpness.py``."""
    a = 2 * torch.rand(m, n, generator=gen, dtype=torch.float64) - 1
    return (a / a.norm(dim=1, keepdim=True)).numpy()


@register_measure(
    "keskar_sharpness",
    eps=5e-4,
    maxiter=10,
    subspace_dim=None,
    repeats=1,
    seed=0,
    split="train",
    legacy_sign_bug=False,
)
def keskar_sharpness(
    inputs: MeasureInputs,
    eps: float = 5e-4,
    maxiter: int = 10,
    subspace_dim: int | None = None,
    repeats: int = 1,
    seed: int = 0,
    split: str = "train",
    legacy_sign_bug: bool = False,
) -> MeasureResult:
    """ε-sharpness of Keskar et al., "On large-batch training for deep learning" (ICLR 2017, arXiv 1609.04836), as
    computed by SmoothOut's ``measure_sharpness.py`` (SPEC 1.6, F27):

        φ = 100 · (max_{x ∈ C} L(x) − L(x₀)) / (1 + L(x₀)),

    x₀ the trainable parameters (BN buffers excluded, BN γ/β included). Full space (``subspace_dim`` None):
    C = {x : |x_i − x₀_i| ≤ ε(|x₀_i| + 1)}. Random subspace of dimension m: A⁺ ∈ R^{m×n} with U(−1, 1) entries and
    unit rows (:func:`subspace_matrix`), A = pinv(A⁺), x = x₀ + A·y with |y_j| ≤ ε(|(A⁺x₀)_j| + 1), gradient
    ∇_y = Aᵀ∇_x L, start y = 0. The maximum is sought by scipy's L-BFGS-B (:func:`lbfgsb`, with ``minimize``'s
    defaults) on −L with gradient −∇L (in float64), starting at x₀; every objective evaluation is L and ∇L over the
    whole sample (:func:`loss_and_grad`, all-reduced over ranks, so all ranks follow the same path). max L is the
    largest value seen at any evaluated point (all lie in C), and never below L(x₀).

    Settings: ``eps`` (5e-4, the original's default ε); ``maxiter`` (10, L-BFGS-B iterations, the original's);
    ``subspace_dim`` (None = full space; an integer m uses a random m-dimensional subspace; the matrix costs
    2·m·n float64 numbers); ``repeats`` (1; the original's batch script uses 5) independent runs, each with a new
    subspace (the full-space optimisation is deterministic, so repeats only matter with a subspace); ``seed`` (0)
    of the CPU generator drawing A⁺ (repeat t uses the t-th draw of ``generator(seed)``); ``split`` ("train" =
    ``inputs.batches``; "test" = ``inputs.test_batches``, which the original used — it measured on the validation
    loader); ``legacy_sign_bug`` (False; True hands L-BFGS-B +∇L with −L as the original did, which makes its line
    search fail — for reproducing the original's numbers only, its f_max then being L-BFGS-B's final value).

    Value: the mean φ over repeats; std_error = s/√T with s = std·√(T/(T−1)), the sample standard deviation the
    original reports, None for T = 1. extra: ``clean_loss`` L(x₀), ``max_loss`` (mean over repeats), ``std`` (s),
    ``evaluations`` (objective calls in all).

    Cost: 1 forward pass for L(x₀) + one gradient pass per objective evaluation (about maxiter + a few per repeat;
    L-BFGS-B's line search may add more), counted as they happen.
    """
    eps = check_positive("eps", eps)
    maxiter = check_int("maxiter", maxiter, 1)
    repeats = check_int("repeats", repeats, 1)
    seed = check_seed("seed", seed)
    split = check_choice("split", split, SPLITS)
    legacy_sign_bug = check_bool("legacy_sign_bug", legacy_sign_bug)
    if subspace_dim is not None:
        subspace_dim = check_int("subspace_dim", subspace_dim, 1)
    batches: Sequence[Batch] | None = inputs.batches if split == "train" else inputs.test_batches
    if split == "test" and not batches:
        raise ValueError('split="test" needs inputs.test_batches; pass a test sample or use split="train"')
    params = inputs.params
    x0 = _flat(params)
    f0 = inputs.sample_loss(batches)
    sign = 1.0 if legacy_sign_bug else -1.0
    evaluations = 0
    gen = generator(seed)
    saved = [p.detach().clone() for p in params]
    best = [f0]  # the largest loss seen in the current repeat

    def loss_grad_at(x: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evaluations
        _load(params, x)
        f, g = inputs.sample_loss_and_grad(batches)
        evaluations += 1
        best[0] = max(best[0], f)
        return f, _flat(g)

    def full_space(x: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = loss_grad_at(x)
        return -f, sign * g

    def in_subspace(y: np.ndarray, a: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = loss_grad_at(x0 + a @ y)
        return -f, sign * (a.T @ g)

    maxima: list[float] = []
    try:
        for _ in range(repeats):
            best[0] = f0
            if subspace_dim is None:
                radius = eps * (np.abs(x0) + 1)
                final = lbfgsb(full_space, x0, x0 - radius, x0 + radius, maxiter)
            else:
                a_plus = subspace_matrix(len(x0), subspace_dim, gen)
                a = np.linalg.pinv(a_plus)
                radius = eps * (np.abs(a_plus @ x0) + 1)
                final = lbfgsb(lambda y, a=a: in_subspace(y, a), np.zeros(subspace_dim), -radius, radius, maxiter)
            maxima.append(-final if legacy_sign_bug else best[0])
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    values = np.array([100.0 * (f - f0) / (1.0 + f0) for f in maxima])
    std = float(values.std(ddof=1)) if repeats > 1 else 0.0
    settings = {
        "eps": eps,
        "maxiter": maxiter,
        "subspace_dim": subspace_dim,
        "repeats": repeats,
        "seed": seed,
        "split": split,
        "legacy_sign_bug": legacy_sign_bug,
    }
    return MeasureResult(
        "keskar_sharpness",
        float(values.mean()),
        std / math.sqrt(repeats) if repeats > 1 else None,
        Cost(forwards=1, gradients=evaluations),
        settings,
        {"clean_loss": f0, "max_loss": float(np.mean(maxima)), "std": std, "evaluations": float(evaluations)},
    )
