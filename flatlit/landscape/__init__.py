"""Loss landscapes: filter-normalised random directions, Hessian eigenvectors and the line between two checkpoints
(Li et al. 2018, arXiv 1712.09913); in-place, resumable, DDP-split evaluation of lines and planes; the step
decomposition and gradient alignment of Jastrzębski et al. 2019 (arXiv 1807.05031). Pure PyTorch, no Lightning
(``flatlit landscape`` and :class:`~flatlit.callbacks.LossLandscape` are the adapters; the figures are
:mod:`flatlit.figures.landscape`)."""

from flatlit.landscape.directions import (
    BIAS_BN,
    NORMS,
    UNKNOWN_NORMALISATION,
    DirectionSet,
    direction_normalisation,
    eigen_directions,
    interpolation_direction,
    is_direction_file,
    load_directions,
    load_eigenvectors,
    model_signature,
    normalize_direction,
    random_directions,
    save_directions,
)
from flatlit.landscape.evaluation import EvaluationFunctions, evaluation_functions
from flatlit.landscape.steps import GradientAlignment, StepDecomposition, gradient_alignment, step_decomposition
from flatlit.landscape.surface import (
    BN_POLICIES,
    LandscapeResult,
    PointWriter,
    as_result,
    compute_surface,
    evaluate,
    update_bn_statistics,
)

__all__ = [
    "BIAS_BN",
    "BN_POLICIES",
    "NORMS",
    "UNKNOWN_NORMALISATION",
    "DirectionSet",
    "EvaluationFunctions",
    "GradientAlignment",
    "LandscapeResult",
    "PointWriter",
    "StepDecomposition",
    "as_result",
    "compute_surface",
    "direction_normalisation",
    "eigen_directions",
    "evaluate",
    "evaluation_functions",
    "gradient_alignment",
    "interpolation_direction",
    "is_direction_file",
    "load_directions",
    "load_eigenvectors",
    "model_signature",
    "normalize_direction",
    "random_directions",
    "save_directions",
    "step_decomposition",
    "update_bn_statistics",
]
