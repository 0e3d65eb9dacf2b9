"""Sharpness and complexity measures as pure functions over (model, loss, batches); no Lightning here.

Importing the package registers every measure; ``list_measures()`` names them and ``compute_measure(name, inputs,
**settings)`` runs one. One file per family of measures; the registry is in ``base``, the evaluation helpers the
measures share in ``evaluation`` and the per-layer norms of the norm measures and bounds in ``operator_norms``.
"""

# importing the families registers their measures
from flatlit.sharpness import (  # noqa: F401
    average,
    bounds,
    entropy,
    gradient_noise,
    hessian,
    keskar,
    margins,
    minimum,
    norms,
    pac_bayes,
    spectral_sums,
    spectrum,
    worst_case,
)
from flatlit.sharpness.base import (
    Cost,
    MeasureInputs,
    MeasureResult,
    compute_measure,
    fold_batchnorm,
    get_measure,
    list_measures,
    observed,
    register_measure,
)

__all__ = [
    "Cost",
    "MeasureInputs",
    "MeasureResult",
    "compute_measure",
    "fold_batchnorm",
    "get_measure",
    "list_measures",
    "observed",
    "register_measure",
]
