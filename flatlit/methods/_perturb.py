"""Pure perturbation maths shared by the perturbation families (no Lightning here).

Every function works on lists of tensors (parameters and their gradients) and draws randomness only from the
generator it is given, so the modules can checkpoint the generator for exact resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SAM_ADAPTIVE = ("none", "elementwise", "asam")
SMOOTHOUT_ADAPT = ("none", "weight", "filter", "tensor")
SMOOTHOUT_SCHEDULES = ("constant", "anneal", "tanh")


def global_grad_norm(
    grads: Sequence[torch.Tensor], scales: Sequence[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """‖T ⊙ g‖₂ over all tensors (T = 1 when ``scales`` is None or an entry is None)."""
    if scales is None or all(s is None for s in scales):
        norms = torch._foreach_norm(list(grads))
    else:
        norms = [(g if s is None else s * g).norm() for g, s in zip(grads, scales)]
    return torch.linalg.vector_norm(torch.stack(norms))


def sam_scales(
    params: Sequence[torch.Tensor], names: Sequence[str], adaptive: str, eta: float
) -> list[torch.Tensor | None]:
    """The ASAM operator T_w per tensor (None means identity).

    - ``none``: plain SAM (Foret et al. 2021, arXiv 2010.01412).
    - ``elementwise``: T = |w| for every tensor (davda54/sam ``adaptive=True``, PEERS §1.1).
    - ``asam``: T = |w| + η for tensors whose name contains ``weight``, identity for the others (official ASAM,
      Kwon et al. 2021, arXiv 2102.11600; PEERS §1.3).
    """
    if adaptive == "none":
        return [None] * len(params)
    if adaptive == "elementwise":
        return [p.detach().abs() for p in params]
    if adaptive == "asam":
        return [p.detach().abs() + eta if "weight" in n else None for p, n in zip(params, names)]
    raise ValueError(f"adaptive must be one of {SAM_ADAPTIVE}, got {adaptive!r}")


def sam_epsilon(
    grads: Sequence[torch.Tensor], rho: float, scales: Sequence[torch.Tensor | None], inplace: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SAM ascent step ε = ρ T² g / (‖T g‖ + 1e-12); returns (ε per tensor, ‖T g‖).

    ``inplace`` writes ε into the ``grads`` tensors themselves (no allocation in a training step).
    """
    norm = global_grad_norm(grads, scales)
    eps = list(grads) if inplace else [g.clone() for g in grads]
    for e, s in zip(eps, scales):
        if s is not None:
            e.mul_(s).mul_(s)
    torch._foreach_mul_(eps, rho / (norm + 1e-12))
    return eps, norm


def filter_sigma(p: torch.Tensor, gamma: float) -> torch.Tensor:
    """LPF-SGD's per-filter std (SPEC §5.2): γ‖p_j‖ per output filter j for ndim > 1 (broadcastable to p),
    γ(‖p‖ + 1e-16) for 1-D tensors (one scalar)."""
    if p.ndim > 1:
        return gamma * torch.linalg.vector_norm(p.detach().flatten(1), dim=1).view(-1, *([1] * (p.ndim - 1)))
    return gamma * (torch.linalg.vector_norm(p.detach()) + 1e-16)


def lpf_noise(
    params: Sequence[torch.Tensor], gamma: float, gen: torch.Generator, out: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Gaussian noise ε ~ N(0, diag σ²) with LPF-SGD's filter-wise σ (Bisla et al. 2022, arXiv 2201.08025).

    ``out``: optional buffers (one per parameter) filled in place, so a training loop allocates nothing per step.
    """
    bufs = [torch.empty_like(p) for p in params] if out is None else list(out)
    for p, n in zip(params, bufs):
        n.normal_(generator=gen).mul_(filter_sigma(p, gamma))
    return bufs


def cosine_inc(step: int, total_steps: int, gamma0: float, inc: float) -> float:
    """LPF-SGD's CosineInc radius schedule (SPEC §5.2): γ(t) = γ₀((inc−1)(1 − cos(πt/T))/2 + 1).

    γ rises along a half cosine from γ₀ at t=0 to inc·γ₀ at t=T (inc = 1 keeps γ fixed); T counts optimizer
    updates. ``inc`` is the original's command-line ``--inc`` (the README's α): its ``CosineInc`` receives
    ``args.inc - 1`` and computes γ₀(sf·(args.inc − 1) + 1) with sf = (1 − cos(πt/T))/2, so ``--inc 15`` ends at
    15·γ₀, and ``inc: 15`` here gives the same schedule.
    """
    if total_steps <= 0 or inc == 1:
        return gamma0
    t = min(step, total_steps)
    return gamma0 * ((inc - 1) * (1 - math.cos(math.pi * t / total_steps)) / 2 + 1)


def smoothout_scale(schedule: str, t: int, total: int, anneal_index: float = 0.55, tanh_scale: float = 10.0) -> float:
    """SmoothOut's noise multiplier c(t) (SPEC §1.2): constant 1; anneal (1/(1+t)^ai)^½; tanh ramp 0→1."""
    if schedule == "constant":
        return 1.0
    if schedule == "anneal":
        return (1.0 / (1.0 + t) ** anneal_index) ** 0.5
    if schedule == "tanh":
        return (math.tanh(tanh_scale * (t / max(total, 1) - 0.5)) + 1) / 2
    raise ValueError(f"schedule must be one of {SMOOTHOUT_SCHEDULES}, got {schedule!r}")


def smoothout_noise(
    params: Sequence[torch.Tensor],
    a: float,
    c: float,
    adapt: str,
    noise_type: str,
    gen: torch.Generator,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """SmoothOut / AdaSmoothOut noise (Wen et al. 2018, arXiv 1805.07898; SPEC §1.2, §5.5).

    r ~ U(−1, 1) (or N(0, 1)); ``none``: n = a·c·r; ``weight``: n = a·c·|p|·r; ``filter``: per output slice j,
    n_j = r_j/(‖r_j‖+1e-6)·‖p_j‖·a·c (1-D tensors per element: sign(r)|p|ac); ``tensor`` (ASO, as LPF-SGD
    intended): n = a·c·‖p‖·r. ``out``: optional buffers filled in place.
    """
    bufs = [torch.empty_like(p) for p in params] if out is None else list(out)
    result = []
    for p, r in zip(params, bufs):
        if noise_type == "uniform":
            r.uniform_(-1.0, 1.0, generator=gen)
        else:
            r.normal_(generator=gen)
        if adapt == "none":
            n = r.mul_(a * c)
        elif adapt == "weight":
            n = r.mul_(p.detach().abs()).mul_(a * c)
        elif adapt == "tensor":
            n = r.mul_(torch.linalg.vector_norm(p.detach()) * a * c)
        elif adapt == "filter":
            if p.ndim > 1:
                rn = torch.linalg.vector_norm(r.flatten(1), dim=1).view(-1, *([1] * (p.ndim - 1)))
                pn = torch.linalg.vector_norm(p.detach().flatten(1), dim=1).view_as(rn)
                n = r.div_(rn + 1e-6).mul_(pn).mul_(a * c)
            else:
                n = r.div_(r.abs() + 1e-6).mul_(p.detach().abs()).mul_(a * c)
        else:
            raise ValueError(f"adapt must be one of {SMOOTHOUT_ADAPT}, got {adapt!r}")
        result.append(n)
    return result
