"""Lightning callbacks usable in any project."""

from flatlit.callbacks.curvature import CurvatureCallback, HessianEigenvalues, HessianSpectrum, HessianTrace
from flatlit.callbacks.history import HistoryCSV

__all__ = ["CurvatureCallback", "HessianEigenvalues", "HessianSpectrum", "HessianTrace", "HistoryCSV"]
