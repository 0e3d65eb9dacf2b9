"""Stochastic trace estimation: Hutchinson (1989) with Rademacher probes and Hutch++ (Meyer et al. 2021,
arXiv 2010.09649). tr(A) ≈ (1/m) Σ zᵢᵀ A zᵢ; the standard error reported is the sample std / √m."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flatlit.curvature.lanczos import MatVec


@dataclass(frozen=True)
class TraceResult:
    estimate: float
    std_error: float
    num_matvecs: int


def rademacher(n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1).to(device=device, dtype=dtype)


def _probe_mean(
    matvec: MatVec,
    n: int,
    count: int,
    g: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
    basis: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Mean and standard error of zᵀAz over ``count`` Rademacher probes (projected off ``basis`` if given)."""
    samples = []
    for _ in range(count):
        z = rademacher(n, g, dtype, device)
        if basis is not None:
            z = z - basis @ (basis.T @ z)
        samples.append(float(torch.dot(z.double(), matvec(z).double())))
    t = torch.tensor(samples, dtype=torch.float64)
    se = float(t.std() / math.sqrt(count)) if count > 1 else float("inf")
    return float(t.mean()), se


def hutchinson(
    matvec: MatVec,
    n: int,
    num_probes: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TraceResult:
    """Hutchinson's estimator with Rademacher probes (seeded on the CPU: identical on every rank)."""
    mean, se = _probe_mean(matvec, n, num_probes, torch.Generator().manual_seed(seed), dtype, device)
    return TraceResult(mean, se, num_probes)


def hutchpp(
    matvec: MatVec,
    n: int,
    num_matvecs: int = 99,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TraceResult:
    """Hutch++: exact trace on a sketched top subspace plus Hutchinson on its complement (m/3 probes each)."""
    g = torch.Generator().manual_seed(seed)
    s = max(1, num_matvecs // 3)
    S = torch.stack([rademacher(n, g, dtype, device) for _ in range(s)], dim=1)
    Q, _ = torch.linalg.qr(torch.stack([matvec(S[:, i]) for i in range(s)], dim=1))
    AQ = torch.stack([matvec(Q[:, i]) for i in range(Q.shape[1])], dim=1)
    top = float(torch.trace(Q.T.double() @ AQ.double()))
    rest, se = _probe_mean(matvec, n, s, g, dtype, device, basis=Q)
    return TraceResult(top + rest, se, s + Q.shape[1] + s)
