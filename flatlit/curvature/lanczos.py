"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalisation, and deflated power iteration.

Lanczos (Lanczos 1950; Golub & Van Loan §10.1): Krylov basis V, tridiagonal T (kept in float64); each new vector
is reorthogonalised twice against the whole basis (Parlett's "twice is enough"), so Ritz pairs stay accurate.
The residual of a Ritz pair (θ_i, V s_i) is ‖A V s_i − θ_i V s_i‖ = β_m |s_{m,i}| (Paige); iteration stops when the
wanted k pairs have relative residual ≤ ``tol``. As used for DNN Hessians by Ghorbani et al. 2019 and Jastrzębski
et al. 2019 (SPEC §3.2, §5.6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EigenResult:
    """Eigenvalues (sorted by the requested end), eigenvectors (k × n, or None), relative residuals
    ‖Av − λv‖/|λ|, the number of operator applications and whether all k pairs met the tolerance."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool


def start_vector(n: int, seed: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A seeded unit start vector, drawn on the CPU in float64 so every rank and device gets the same one."""
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm()).to(device=device, dtype=dtype)


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    order = torch.argsort(theta, descending=(which == "LA"))
    return order[:k]


def lanczos(
    matvec: MatVec,
    n: int,
    k: int = 5,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    which: str = "LA",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    return_eigenvectors: bool = True,
    check_every: int = 1,
    on_check: Callable[[int, float], None] | None = None,
) -> EigenResult:
    """The k largest (``which="LA"``) or smallest (``"SA"``) eigenpairs of a symmetric operator.

    Args:
        matvec: v ↦ Av for vectors of length ``n``.
        n: dimension.
        k: number of eigenpairs.
        max_iter: maximum Krylov dimension (operator applications).
        tol: relative Ritz residual at which a pair counts as converged.
        seed: seed of the start vector (identical on every rank).
        which: ``LA`` (largest algebraic) or ``SA`` (smallest algebraic).
        dtype, device: of the Krylov basis (the tridiagonal matrix is always float64).
        return_eigenvectors: also return the Ritz vectors.
        check_every: test convergence every this many iterations (once the basis holds k vectors).
        on_check: called with (iterations, largest wanted relative residual) at every convergence test (progress).
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA', got {which!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    max_iter = min(max_iter, n)
    # the Krylov basis grows by doubling as it fills (a ResNet-18 at max_iter 100 would otherwise reserve 4.4 GB
    # up front for a basis that usually stops at a few dozen vectors)
    V = torch.zeros(min(max_iter + 1, max(2 * k + 2, 16)), n, dtype=dtype, device=device)
    alpha = torch.zeros(max_iter, dtype=torch.float64)
    beta = torch.zeros(max_iter, dtype=torch.float64)
    V[0] = start_vector(n, seed, dtype, device)
    m = 0
    theta = S = None
    for j in range(max_iter):
        w = matvec(V[j])
        alpha[j] = torch.dot(w.double(), V[j].double())
        w = w - alpha[j].to(dtype) * V[j]
        if j > 0:
            w = w - beta[j - 1].to(dtype) * V[j - 1]
        for _ in range(2):  # full reorthogonalisation, twice
            w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        beta[j] = w.double().norm()
        m = j + 1
        if not (torch.isfinite(alpha[j]) and torch.isfinite(beta[j])):  # a non-finite operator: NaN, not a crash
            nan = torch.full((k,), float("nan"), dtype=torch.float64)
            vecs = torch.full((k, n), float("nan"), dtype=dtype, device=device) if return_eigenvectors else None
            return EigenResult(nan, vecs, nan.clone(), m, False)
        breakdown = beta[j] <= 1e-12 * max(1.0, float(alpha[: j + 1].abs().max()))
        if m >= k and (m % check_every == 0 or breakdown or m == max_iter):
            T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
            theta, S = torch.linalg.eigh(T)
            idx = _select(theta, k, which)
            res = (beta[j] * S[m - 1, idx].abs()) / theta[idx].abs().clamp_min(1e-30)
            if on_check is not None:
                on_check(m, float(res.max()))
            if bool((res <= tol).all()) or breakdown:
                break
        if breakdown:
            break
        if j + 1 >= V.shape[0]:
            grown = torch.zeros(min(max_iter + 1, 2 * V.shape[0]), n, dtype=dtype, device=device)
            grown[: V.shape[0]] = V
            V = grown
        V[j + 1] = w / beta[j].to(dtype)
    if theta is None:  # fewer iterations than k (tiny n)
        T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
        theta, S = torch.linalg.eigh(T)
    idx = _select(theta, min(k, m), which)
    residuals = (beta[m - 1] * S[m - 1, idx].abs()) / theta[idx].abs().clamp_min(1e-30)
    vectors = None
    if return_eigenvectors:
        vectors = (S[:, idx].T.to(dtype) @ V[:m]).contiguous()
    return EigenResult(theta[idx].clone(), vectors, residuals, m, bool((residuals <= tol).all()) and len(idx) == k)


def power_iteration(
    matvec: MatVec,
    n: int,
    k: int = 5,
    max_iter: int = 1000,
    tol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> EigenResult:
    """Top-k eigenpairs (largest magnitude) by power iteration with deflation (the PyHessian baseline).

    Pair i iterates v ← (A − Σ_{j<i} λ_j u_j u_jᵀ) v / ‖·‖ until ‖A v − λ v‖ ≤ tol·|λ| (the same relative residual
    as :func:`lanczos`), with at most ``max_iter`` applications per pair.
    """
    vals, vecs, resids, count, ok = [], [], [], 0, True

    def deflated(v: torch.Tensor) -> torch.Tensor:
        out = matvec(v)
        for lam, u in zip(vals, vecs):
            out = out - lam * torch.dot(u, v) * u
        return out

    for i in range(k):
        v = start_vector(n, seed + i, dtype, device)
        w = deflated(v)
        count += 1
        lam, res = 0.0, float("inf")
        for _ in range(max_iter):
            lam = float(torch.dot(v.double(), w.double()))
            res = float((w - lam * v).double().norm()) / max(abs(lam), 1e-30)
            if res <= tol:
                break
            v = w / w.norm()
            w = deflated(v)
            count += 1
        ok &= res <= tol
        vals.append(lam)
        vecs.append(v)
        resids.append(res)
    return EigenResult(
        torch.tensor(vals, dtype=torch.float64), torch.stack(vecs), torch.tensor(resids, dtype=torch.float64), count, ok
    )
