"""Lightning callbacks usable in any project."""

from flatlit.callbacks.curvature import CurvatureCallback, HessianEigenvalues, HessianSpectrum, HessianTrace
from flatlit.callbacks.generalization import GeneralizationTargets
from flatlit.callbacks.history import HistoryCSV
from flatlit.callbacks.landscape import LossLandscape
from flatlit.callbacks.measures import ComplexityMeasures, InitialWeights, SharpnessMeasures

__all__ = [
    "ComplexityMeasures",
    "CurvatureCallback",
    "GeneralizationTargets",
    "HessianEigenvalues",
    "HessianSpectrum",
    "HessianTrace",
    "HistoryCSV",
    "InitialWeights",
    "LossLandscape",
    "SharpnessMeasures",
]
