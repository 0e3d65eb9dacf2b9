"""Curvature engine: HVP operators (single and batched), Lanczos, block LOBPCG, power iteration, trace and spectral
density (no Lightning here)."""

from flatlit.curvature.density import SpectralDensity, slq_density
from flatlit.curvature.hvp import HessianOperator, NonDeterministicOperatorError, evaluation_mode, select_params
from flatlit.curvature.lanczos import EigenResult, lanczos, power_iteration, start_vector
from flatlit.curvature.lobpcg import lobpcg
from flatlit.curvature.trace import TraceResult, hutchinson, hutchpp

__all__ = [
    "EigenResult",
    "HessianOperator",
    "NonDeterministicOperatorError",
    "SpectralDensity",
    "TraceResult",
    "evaluation_mode",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lobpcg",
    "power_iteration",
    "select_params",
    "slq_density",
    "start_vector",
]
