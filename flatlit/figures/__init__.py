"""Every matplotlib figure of flatlit, under one style (:mod:`~flatlit.figures.style`).

- :mod:`~flatlit.figures.training`: a run's training curves, Hessian eigenvalues, trace, spectrum, measures;
- :mod:`~flatlit.figures.robustness`: accuracy under weight noise and adversarial attacks;
- :mod:`~flatlit.figures.landscape`: loss-landscape lines, contours, surfaces and overlays;
- :mod:`~flatlit.figures.correlation`: measures against a sweep's targets (scatter, τ, ψ).

The report's figures (the style's sizes, colours and ``save``; the training and robustness figures) are also
importable from here.
"""

from flatlit.figures.robustness import Attack, NoiseCurve, adversarial_figure, weight_noise_figure
from flatlit.figures.style import (
    COLORS,
    DPI,
    LEGEND_RIGHT,
    MIN_FONT_PT,
    SINGLE,
    STYLE,
    WIDE,
    color,
    new_figure,
    save,
)
from flatlit.figures.training import (
    Curves,
    Eigen,
    Metric,
    Spectrum,
    Threshold,
    Trace,
    curves_figure,
    eigen_figure,
    metrics_figure,
    spectrum_figure,
    trace_figure,
)

__all__ = [
    "COLORS",
    "DPI",
    "LEGEND_RIGHT",
    "MIN_FONT_PT",
    "SINGLE",
    "STYLE",
    "WIDE",
    "Attack",
    "Curves",
    "Eigen",
    "Metric",
    "NoiseCurve",
    "Spectrum",
    "Threshold",
    "Trace",
    "adversarial_figure",
    "color",
    "curves_figure",
    "eigen_figure",
    "metrics_figure",
    "new_figure",
    "save",
    "spectrum_figure",
    "trace_figure",
    "weight_noise_figure",
]
