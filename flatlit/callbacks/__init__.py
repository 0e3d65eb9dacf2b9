"""Lightning callbacks usable in any project."""

from flatlit.callbacks.history import HistoryCSV

__all__ = ["HistoryCSV"]
