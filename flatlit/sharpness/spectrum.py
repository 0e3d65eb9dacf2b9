"""Measures of the Hessian's Lanczos spectrum as LPF-SGD computes them: ``eig_trace`` and the effective dimension.

LPF-SGD (Bisla, Wang, Choromanska, "Low-pass filtering SGD for recovering flat optima in the deep learning
optimization landscape", AISTATS 2022, arXiv 2201.08025; SPEC §5.6) runs Lanczos with full reorthogonalisation for
a fixed number of iterations k on the Hessian of the training loss, from a few random start vectors ("draws"),
sorts each draw's k Ritz values, averages them position by position over the draws, and reports

    eig_trace = Σ_i λ̄_i,    λ_max = max_i λ̄_i,    d_eff = Σ_i λ̄_i / (λ̄_i + 1)

over the averaged Ritz values λ̄ (d_eff: the effective dimensionality of MacKay 1992 with prior precision 1, as in
Maddox, Benton & Wilson 2020, arXiv 2003.02139).

**Σ of k Ritz values is not the trace unless k is the dimension.** For k < d it is the trace of the Hessian
projected on the Krylov space, which the extreme eigenvalues dominate; it is LPF-SGD's convention, kept under
their name. :func:`~flatlit.sharpness.hessian.hessian_trace` is the unbiased (Hutchinson) estimate of tr H. With
k = d (and no breakdown) the Ritz values are all the eigenvalues and both values are exact.

The Lanczos run is :func:`flatlit.curvature.lanczos` (full reorthogonalisation, twice, tridiagonal in float64,
without its verification restarts) on :func:`~flatlit.sharpness.hessian.hessian_operator` (HVPs of the sample loss
on ``inputs.params``, all-reduced under ``torch.distributed``).
"""

from __future__ import annotations

import torch

from flatlit.curvature import lanczos
from flatlit.objective import twice_differentiable
from flatlit.sharpness.base import Cost, MeasureInputs, MeasureResult, mc_stats, register_measure
from flatlit.sharpness.hessian import _check_int, hessian_operator

_SPECTRUM_DOC = """

    Lanczos with full reorthogonalisation (:func:`flatlit.curvature.lanczos`, verification off) for ``iterations``
    steps on the Hessian of the sample loss, from ``draws`` seeded Gaussian unit start vectors (draw i: seed
    ``seed + i``; LPF draws U(−1, 1) vectors from the global RNG); each draw's Ritz values (eigenvalues of its
    tridiagonal matrix) are sorted and averaged over the draws position by position, as in LPF-SGD's ``eig_trace``
    (SPEC §5.6). ``iterations`` is capped at the parameter count d. A draw whose Krylov space becomes invariant
    before (a breakdown: its Ritz values are then exact eigenvalues, each distinct one once) has fewer Ritz values;
    they are padded with zeros to the longest draw's count before averaging (LPF raises instead), and
    ``extra["iterations"]`` is the smallest Krylov dimension reached.

    Σ of k Ritz values is NOT the trace of H unless k = d (LPF's convention; :func:`hessian_trace` is the
    Hutchinson estimate of tr H); with k = d both values below are exact.

    Settings: ``iterations`` (100) Lanczos steps k (capped at d); ``draws`` (2) start vectors; ``seed`` (0).

    std_error: the standard error over the draws of the per-draw value (Σ of that draw's Ritz values, or its
    Σ λ/(λ + 1)); it reflects the start vectors only, not the gap between k Ritz values and the spectrum
    (NaN for one draw).

    Extra: ``lambda_max`` (the largest averaged Ritz value), ``trace`` (Σ λ̄), ``d_eff`` (Σ λ̄/(λ̄ + 1)),
    ``iterations``, ``num_params`` (d).

    Cost: ``draws`` × min(``iterations``, d) HVPs; memory: a Krylov basis of min(``iterations``, d) + 1 vectors
    of d parameters."""


def _ritz_spectrum(name: str, inputs: MeasureInputs, iterations: int, draws: int, seed: int):
    """(averaged sorted Ritz values, per-draw Ritz values, HVPs, d, smallest Krylov dimension)."""
    _check_int(name, "iterations", iterations, 1)
    _check_int(name, "draws", draws, 1)
    _check_int(name, "seed", seed, 0)
    op = hessian_operator(inputs)
    k = min(iterations, op.numel)
    runs, hvps = [], 0
    with twice_differentiable(name):
        for d in range(draws):
            res = lanczos(
                op.matvec,
                op.numel,
                k=k,
                max_iter=k,
                tol=0.0,
                seed=seed + d,
                which="LA",
                dtype=op.dtype,
                device=op.device,
                return_eigenvectors=False,
                verify=False,
            )
            hvps += res.num_matvecs
            runs.append(torch.sort(res.eigenvalues.double().cpu()).values)
    length = max(len(r) for r in runs)
    padded = [torch.sort(torch.cat([r, r.new_zeros(length - len(r))])).values for r in runs]
    mean = torch.stack(padded).mean(0)
    return mean, runs, hvps, op.numel, min(len(r) for r in runs)


def _result(name: str, inputs: MeasureInputs, iterations: int, draws: int, seed: int) -> MeasureResult:
    mean, runs, hvps, dim, reached = _ritz_spectrum(name, inputs, iterations, draws, seed)
    trace = float(mean.sum())
    d_eff = float((mean / (mean + 1)).sum())
    if name == "lanczos_trace":
        value, per_draw = trace, [float(r.sum()) for r in runs]
    else:
        value, per_draw = d_eff, [float((r / (r + 1)).sum()) for r in runs]
    se = mc_stats(per_draw)[1]
    extra = {
        "lambda_max": float(mean.max()),
        "trace": trace,
        "d_eff": d_eff,
        "iterations": float(reached),
        "num_params": float(dim),
    }
    settings = {"iterations": iterations, "draws": draws, "seed": seed}
    return MeasureResult(name, value, se, Cost(hvps=hvps), settings, extra)


def lanczos_trace(inputs: MeasureInputs, iterations: int = 100, draws: int = 2, seed: int = 0) -> MeasureResult:
    return _result("lanczos_trace", inputs, iterations, draws, seed)


def effective_dimension(inputs: MeasureInputs, iterations: int = 100, draws: int = 2, seed: int = 0) -> MeasureResult:
    return _result("effective_dimension", inputs, iterations, draws, seed)


lanczos_trace.__doc__ = (
    """Σ of the averaged Lanczos Ritz values of the Hessian: LPF-SGD's ``eig_trace`` (Bisla et al. 2022,
    arXiv 2201.08025; SPEC §5.6). Not the trace unless ``iterations`` ≥ the parameter count."""
    + _SPECTRUM_DOC
)
effective_dimension.__doc__ = (
    """Effective dimension d_eff = Σ_i λ̄_i / (λ̄_i + 1) of the averaged Lanczos Ritz values λ̄ of the Hessian
    (LPF-SGD's ``d_eff``, Bisla et al. 2022, arXiv 2201.08025, SPEC §5.6; MacKay 1992, Maddox et al. 2020,
    arXiv 2003.02139, with z = 1). Negative Ritz values enter as they are (λ̄ = −1 gives ±inf)."""
    + _SPECTRUM_DOC
)
# registered after their docstrings are complete (the registry keeps the docstring it is given)
register_measure("lanczos_trace", iterations=100, draws=2, seed=0)(lanczos_trace)
register_measure("effective_dimension", iterations=100, draws=2, seed=0)(effective_dimension)


@register_measure("hessian_top_eigenvalue", k=1, tol=1e-4, max_iter=100, seed=0)
def hessian_top_eigenvalue(
    inputs: MeasureInputs, k: int = 1, tol: float = 1e-4, max_iter: int = 100, seed: int = 0
) -> MeasureResult:
    """λ₁, the largest eigenvalue of the Hessian of the sample loss (Keskar et al. 2017, arXiv 1609.04836, and
    Jastrzębski et al. 2019, arXiv 1807.05031, use it as "sharpness"; Cohen et al. 2021, arXiv 2103.00065, compare
    it with 2/η), by verified Lanczos (:func:`flatlit.curvature.lanczos`: the top ``k`` Ritz pairs to a relative
    residual ``tol``, then a deflated restart that certifies nothing lies above them), the same solver as the
    :class:`~flatlit.callbacks.HessianEigenvalues` callback.

    Settings: ``k`` (1) eigenpairs solved for (λ₁ is the value; λ_2..λ_k in ``extra``); ``tol`` (1e-4);
    ``max_iter`` (100) Krylov dimension of the first run; ``seed`` (0) of the start vector.
    Extra: ``lambda_<i>`` for i ≤ k, ``converged`` (1/0), ``max_residual``. Cost: the HVPs Lanczos used."""
    _check_int("hessian_top_eigenvalue", "k", k, 1)
    _check_int("hessian_top_eigenvalue", "max_iter", max_iter, 1)
    _check_int("hessian_top_eigenvalue", "seed", seed, 0)
    if not float(tol) > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    op = hessian_operator(inputs)
    with twice_differentiable("hessian_top_eigenvalue"):
        res = lanczos(
            op.matvec,
            op.numel,
            k=min(k, op.numel),
            max_iter=min(max_iter, op.numel),
            tol=float(tol),
            seed=seed,
            which="LA",
            dtype=op.dtype,
            device=op.device,
            return_eigenvectors=False,
        )
    eigs = torch.sort(res.eigenvalues.double().cpu(), descending=True).values
    extra = {f"lambda_{i + 1}": float(v) for i, v in enumerate(eigs)}
    extra["converged"] = float(bool(res.converged))
    extra["max_residual"] = float(res.residuals.max()) if res.residuals.numel() else 0.0
    settings = {"k": k, "tol": tol, "max_iter": max_iter, "seed": seed}
    return MeasureResult("hessian_top_eigenvalue", float(eigs[0]), None, Cost(hvps=res.num_matvecs), settings, extra)


__all__ = ["effective_dimension", "hessian_top_eigenvalue", "lanczos_trace"]
