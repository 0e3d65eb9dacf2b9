"""Extreme eigenpairs of a symmetric operator by block LOBPCG, warm-startable from earlier eigenvectors.

Locally Optimal Block Preconditioned Conjugate Gradient (Knyazev 2001, SIAM J. Sci. Comput. 23(2)), without a
preconditioner, in the numerically stable form of Hetmaniuk & Lehoucq 2006 (J. Comput. Phys. 218): each iteration
does a Rayleigh-Ritz step on the orthonormal basis S = [X, W, P] (Ritz vectors X, residuals W = AX − XΘ of the
pairs not yet converged, the previous search directions P), applying the operator only to the new block W, once,
through ``matmat`` (so the operator can share one forward and first backward over the block: see
:meth:`flatlit.curvature.HessianOperator.matmat`). P is formed in the coefficient space, orthogonal to the new X, so
S stays orthonormal without applying the operator to it again. Converged pairs are soft-locked (their residuals
leave W), which saves operator applications. The convergence test is :func:`~flatlit.curvature.lanczos.lanczos`'s:
relative residual ‖Ax − θx‖/|θ| ≤ ``tol`` for each of the k wanted pairs; the result is the same
:class:`~flatlit.curvature.lanczos.EigenResult`.

Warm start (``X0``): consecutive Hessian measurements along a trajectory are close, so the previous measurement's
eigenvectors start the iteration near the answer; with the exact eigenvectors one Rayleigh-Ritz step already meets
the tolerance. Memory: 3·b columns of length n plus their images (b = the block size), never max_iter × n.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flatlit.curvature.lanczos import EigenResult, verify_extremes

MatMat = Callable[[torch.Tensor], torch.Tensor]


def _orthonormalize(W: torch.Tensor, against: list[torch.Tensor], drop: float = 1e-8) -> torch.Tensor:
    """Columns of ``W`` made orthogonal to the orthonormal blocks ``against`` (twice: "twice is enough") and to each
    other; columns whose remaining norm is below ``drop`` × their original norm (already in the span) are dropped."""
    norms = W.norm(dim=0).clamp_min(1e-30)
    for _ in range(2):
        for Q in against:
            if Q.shape[1]:
                W = W - Q @ (Q.T @ W)
    keep = W.norm(dim=0) > drop * norms
    W = W[:, keep]
    if W.shape[1] == 0:
        return W
    # Cholesky-free orthonormalisation of the (small) block; QR in float64 for stability
    Q, R = torch.linalg.qr(W.double())
    good = R.diagonal().abs() > drop * R.diagonal().abs().max().clamp_min(1e-30)
    return Q[:, good].to(W.dtype)


def _start_block(n: int, b: int, seed: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, b, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def lobpcg(
    matmat: MatMat,
    n: int,
    k: int = 5,
    X0: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    which: str = "LA",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    block_size: int | None = None,
    return_eigenvectors: bool = True,
    on_check: Callable[[int, float], None] | None = None,
    verify: bool | None = None,
) -> EigenResult:
    """The k largest (``which="LA"``) or smallest (``"SA"``) eigenpairs of a symmetric operator.

    Args:
        matmat: V ↦ AV for blocks V of shape (n, m).
        n: dimension.
        k: number of eigenpairs.
        X0: warm start, (n, j) or (j, n) (e.g. the ``eigenvectors`` of an earlier :class:`EigenResult`, k × n);
            missing columns up to the block size are filled with seeded random vectors.
        max_iter: maximum number of block iterations.
        tol: relative residual ‖Ax − θx‖/|θ| at which a pair counts as converged.
        seed: seed of the random start columns (identical on every rank).
        which: ``LA`` or ``SA``.
        dtype, device: of the blocks (the small Rayleigh-Ritz problems are solved in float64).
        block_size: columns iterated (default k; a few extra "guard" columns help when λ_k ≈ λ_{k+1}).
        return_eigenvectors: also return the Ritz vectors (k × n, as :func:`lanczos`).
        on_check: called with (operator applications so far, largest wanted relative residual) every iteration.
        verify: after convergence, check that the k pairs are the extreme ones with
            :func:`~flatlit.curvature.lanczos.verify_extremes` (Lanczos restarts on the operator deflated by them,
            at most ``max_iter`` × the block size products; ``converged`` is then True only if verified). Default
            (None): for a warm start only. A cold start cannot miss a repeated eigenvalue the way single-vector
            Lanczos does: b ≥ k random columns hold min(b, d) independent directions of every d-dimensional
            eigenspace and the iteration stays in their block Krylov space, which therefore holds every one of the
            at most k copies the top k can contain. A warm start can miss an eigenvalue: its columns may (nearly)
            span an invariant subspace that is no longer the extreme one (after an eigenvalue crossing, the previous
            top-k eigenvectors can keep residuals below ``tol`` while a new eigenvector orthogonal to them has a
            larger eigenvalue), and then the first Rayleigh-Ritz step meets the tolerance without seeing it.

    ``num_matvecs`` of the result counts operator applications (columns, and the verification's products),
    comparable with :func:`lanczos`'s.
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA', got {which!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    b = min(n, max(k, block_size or k))
    sign = 1.0 if which == "LA" else -1.0  # work on sign·A so the wanted pairs are always the largest

    def apply(V: torch.Tensor) -> torch.Tensor:
        return sign * matmat(V).to(dtype)

    X = torch.empty(n, 0, dtype=dtype, device=device)
    if X0 is not None:
        X0 = X0.to(device=device, dtype=dtype)
        if X0.shape[0] != n:
            X0 = X0.T
        X = X0[:, :b]
    if X.shape[1] < b:
        X = torch.cat([X, _start_block(n, b - X.shape[1], seed, dtype, device)], dim=1)
    X = _orthonormalize(X, [])
    if X.shape[1] < b:  # a degenerate warm start: top up with random columns
        X = torch.cat([X, _orthonormalize(_start_block(n, b, seed + 1, dtype, device), [X])[:, : b - X.shape[1]]], 1)
    AX = apply(X)
    count = X.shape[1]
    P = AP = None
    for it in range(max_iter + 1):  # at least once: theta and res are always set
        # Rayleigh-Ritz on S = [X, W, P] (after the first pass S = X only)
        if it == 0:
            S, AS = X, AX
        T = S.T.double() @ AS.double()
        T = (T + T.T) / 2
        evals, C = torch.linalg.eigh(T)
        order = torch.argsort(evals, descending=True)
        evals, C = evals[order], C[:, order]
        Cx = C[:, :b]
        X_new = S @ Cx.to(dtype)
        AX_new = AS @ Cx.to(dtype)
        if it > 0:
            # next search directions: the part of the new Ritz vectors outside the old X, orthonormal to Cx
            Z = Cx.clone()
            Z[: X.shape[1]] = 0
            Z = Z - Cx @ (Cx.T @ Z)
            Z = Z - Cx @ (Cx.T @ Z)
            q, r = torch.linalg.qr(Z)
            good = r.diagonal().abs() > 1e-10
            Cp = q[:, good]
            P, AP = (S @ Cp.to(dtype), AS @ Cp.to(dtype)) if Cp.shape[1] else (None, None)
        X, AX, theta = X_new, AX_new, evals[:b]
        R = AX - X * theta.to(dtype)
        res = R.double().norm(dim=0) / theta.abs().clamp_min(1e-30)
        if not torch.isfinite(theta).all():
            nan = torch.full((k,), float("nan"), dtype=torch.float64)
            vecs = torch.full((k, n), float("nan"), dtype=dtype, device=device) if return_eigenvectors else None
            return EigenResult(nan, vecs, nan.clone(), count, False)
        if on_check is not None:
            on_check(count, float(res[:k].max()))
        if bool((res[:k] <= tol).all()) or it == max_iter:
            break
        active = res > tol  # soft locking: converged pairs stay in X but leave the residual block
        blocks = [X] + ([P] if P is not None else [])
        W = _orthonormalize(R[:, active], blocks)
        if W.shape[1] == 0:
            break
        AW = apply(W)
        count += W.shape[1]
        S = torch.cat([X, W] + ([P] if P is not None else []), dim=1)
        AS = torch.cat([AX, AW] + ([AP] if AP is not None else []), dim=1)
    converged = bool((res[:k] <= tol).all())
    values, vectors, residuals = theta[:k].clone(), X[:, :k].T.contiguous(), res[:k].clone()
    if (X0 is not None if verify is None else verify) and converged:
        # on sign·A, so the wanted end is always the largest; R holds the exact residual vectors of X
        values, vectors, resvecs, extra, converged = verify_extremes(
            lambda v: apply(v[:, None])[:, 0],
            n,
            k,
            values,
            vectors,
            R[:, :k].T.contiguous(),
            max_iter * b,
            tol,
            seed,
            "LA",
            dtype,
            device,
            on_check=on_check,
            offset=count,
        )
        count += extra
        values = values.to(theta.device)
        residuals = resvecs.double().norm(dim=1) / values.abs().clamp_min(1e-30)
        converged = converged and bool((residuals <= tol).all())
    return EigenResult(sign * values, vectors if return_eigenvectors else None, residuals, count, converged)
