"""Kept for old imports (``flatlit.landscape.plots.plot_line``, ...): the figures are
:mod:`flatlit.figures.landscape`."""

from flatlit.figures.landscape import (
    contour_figure,
    line_figure,
    lines_figure,
    plot_contour,
    plot_landscape_file,
    plot_line,
    plot_lines,
    plot_surface3d,
    surface_figure,
)

__all__ = [
    "contour_figure",
    "line_figure",
    "lines_figure",
    "plot_contour",
    "plot_landscape_file",
    "plot_line",
    "plot_lines",
    "plot_surface3d",
    "surface_figure",
]
