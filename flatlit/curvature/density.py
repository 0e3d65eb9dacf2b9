"""Spectral density by stochastic Lanczos quadrature (Golub & Meurant; Ghorbani et al. 2019, arXiv 1901.10159;
Lin et al. 2016). For each of ``num_runs`` random unit vectors, m Lanczos steps give nodes θ_i (Ritz values)
and weights τ_i = s_{1,i}² (squared first components of the Ritz vectors); the density is
ρ(t) ≈ (1/R) Σ_r Σ_i τ_i N(t; θ_i, σ²)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flatlit.curvature.lanczos import MatVec


@dataclass(frozen=True)
class SpectralDensity:
    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor  # (runs, m)
    weights: torch.Tensor  # (runs, m), each row sums to 1
    num_matvecs: int


def _tridiagonal(matvec: MatVec, v0: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = v0.numel()
    m = min(m, n)
    V = torch.zeros(m, n, dtype=v0.dtype, device=v0.device)
    V[0] = v0 / v0.norm()
    a = torch.zeros(m, dtype=torch.float64)
    b = torch.zeros(max(m - 1, 0), dtype=torch.float64)
    for j in range(m):
        w = matvec(V[j])
        a[j] = torch.dot(w.double(), V[j].double())
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        if j + 1 < m:
            b[j] = w.double().norm()
            if b[j] < 1e-12:
                a, b, m = a[: j + 1], b[:j], j + 1
                break
            V[j + 1] = w / b[j].to(w.dtype)
    return a[:m], b[: m - 1]


def slq_density(
    matvec: MatVec,
    n: int,
    num_runs: int = 4,
    num_steps: int = 40,
    num_points: int = 512,
    sigma: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SpectralDensity:
    """Gaussian-smoothed spectral density on a grid spanning the Ritz values (σ = 1 % of the range by default)."""
    g = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(num_runs):
        v0 = torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        a, b = _tridiagonal(matvec, v0, num_steps)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # a non-finite operator: NaN, not a crash
            nan = torch.full((num_runs, num_steps), float("nan"), dtype=torch.float64)
            grid = torch.full((num_points,), float("nan"), dtype=torch.float64)
            return SpectralDensity(grid, grid.clone(), nan, nan.clone(), num_runs * num_steps)
        T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        theta, S = torch.linalg.eigh(T)
        pad = num_steps - len(theta)
        nodes.append(torch.nn.functional.pad(theta, (0, pad), value=float(theta[-1])))
        weights.append(torch.nn.functional.pad(S[0] ** 2, (0, pad)))
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    span = max(hi - lo, 1e-12)
    s = sigma if sigma is not None else 0.01 * span
    grid = torch.linspace(lo - 0.05 * span, hi + 0.05 * span, num_points, dtype=torch.float64)
    kern = torch.exp(-((grid[None, None, :] - nodes_t[..., None]) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi))
    density = (weights_t[..., None] * kern).sum(dim=1).mean(dim=0)
    return SpectralDensity(grid, density, nodes_t, weights_t, num_runs * num_steps)
