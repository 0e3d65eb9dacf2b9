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


def hutchinson(
    matvec: MatVec,
    n: int,
    num_probes: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TraceResult:
    """Hutchinson's estimator with Rademacher probes (seeded on the CPU: identical on every rank)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_probes):
        z = rademacher(n, g, dtype, device)
        samples.append(float(torch.dot(z.double(), matvec(z).double())))
    t = torch.tensor(samples, dtype=torch.float64)
    se = float(t.std() / math.sqrt(num_probes)) if num_probes > 1 else float("inf")
    return TraceResult(float(t.mean()), se, num_probes)


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
    samples = []
    for _ in range(s):
        z = rademacher(n, g, dtype, device)
        z = z - Q @ (Q.T @ z)
        samples.append(float(torch.dot(z.double(), matvec(z).double())))
    t = torch.tensor(samples, dtype=torch.float64)
    se = float(t.std() / math.sqrt(s)) if s > 1 else float("inf")
    return TraceResult(top + float(t.mean()), se, s + Q.shape[1] + s)
