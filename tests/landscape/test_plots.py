"""Figures: the right kind for each file, labelled axes, log loss axis, colour bar, origin marker, overlays."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flatlit.figures.landscape import (
    contour_figure,
    line_figure,
    lines_figure,
    plot_landscape_file,
    plot_lines,
)
from flatlit.landscape import LandscapeResult

PNG = b"\x89PNG\r\n\x1a\n"


def line(tmp_path, name, mode="line", kind="random", scale=1.0, extra=None):
    a = np.linspace(-1, 1, 5)
    loss = scale * (0.2 + a**2)
    meta = {"mode": mode, "bn": "eval", "num_samples": 10, "direction_kind": kind, "direction_meta": {"norm": "filter"}}
    r = LandscapeResult(a, np.zeros(0), loss, 1 - loss / 3, np.ones(5, bool), {**meta, **(extra or {})})
    path = str(tmp_path / f"{name}.npz")
    r.save(path)
    return path


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_line_file_gives_one_labelled_figure(tmp_path):
    path = line(tmp_path, "l")
    out = plot_landscape_file(path, str(tmp_path / "l.png"))
    assert out == [str(tmp_path / "l.png")] and is_png(out[0])
    fig = line_figure(path)
    ax, twin = fig.axes
    assert ax.get_xlabel() == "α (filter-normalised direction)" and ax.get_yscale() == "log"
    assert twin.get_ylabel() == "training accuracy"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training loss", "training accuracy"]
    interp = line(tmp_path, "i", mode="interpolate", kind="interpolate")
    assert line_figure(interp).axes[0].get_xlabel() == "interpolation α (0 = A, 1 = B)"
    eig = line(tmp_path, "e", kind="eigen", extra={"direction_meta": {"eigenvalues": [3.0], "selected": [0]}})
    assert "½λα²" in " ".join(t.get_text() for t in line_figure(eig).axes[0].get_legend().get_texts())


def test_plane_file_gives_contour_and_surface(tmp_path):
    a, b = np.linspace(-1, 1, 5), np.linspace(-1, 1, 4)
    loss = 0.1 + a[:, None] ** 2 + 2 * b[None, :] ** 2
    loss[4, 3] = np.nan  # a point not yet evaluated
    done = np.isfinite(loss)
    r = LandscapeResult(
        a, b, loss, np.full_like(loss, 0.5), done, {"mode": "plane", "direction_meta": {"norm": "filter"}}
    )
    path = str(tmp_path / "p.npz")
    r.save(path)
    out = plot_landscape_file(path, str(tmp_path / "p.png"))
    assert out == [str(tmp_path / "p.png"), str(tmp_path / "p_3d.png")] and all(map(is_png, out))
    fig = contour_figure(path)
    ax, cbar = fig.axes
    assert cbar.get_ylabel() == "training loss"
    assert ax.get_xlabel().startswith("α") and ax.get_ylabel().startswith("β")
    (origin,) = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert list(origin.get_xdata()) == [0.0] and list(origin.get_ydata()) == [0.0]
    assert "19/20 points" in ax.get_title()


def test_plot_lines_overlays_results(tmp_path):
    sgd, sam = line(tmp_path, "sgd", scale=2.0), line(tmp_path, "sam", scale=0.5)
    out = plot_lines([sgd, sam], ["SGD", "SAM"], str(tmp_path / "cmp.png"))
    assert os.path.isfile(out) and is_png(out)
    fig = lines_figure([sgd, sam], ["SGD", "SAM"])
    legend = fig.axes[-1].get_legend()  # under the accuracy curves when there are accuracies, else on the loss panel
    assert [t.get_text() for t in legend.get_texts()] == ["SGD", "SAM"]
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), 2.0 * (0.2 + np.linspace(-1, 1, 5) ** 2))
    with pytest.raises(ValueError, match="2 results but 1 labels"):
        plot_lines([sgd, sam], ["x"], str(tmp_path / "bad.png"))
