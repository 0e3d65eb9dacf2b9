"""Cost of a loss-landscape grid point against one forward pass, on flatlit's lenet and 1,000 real Fashion-MNIST
examples (Debian's copy in /usr/share/datasets/fashion-mnist).

A 21×21 filter-normalised plane (Li et al. 2018) is computed with :func:`flatlit.landscape.compute_surface` exactly
as ``flatlit landscape --mode plane`` does (points written in place, results file rewritten every 10 points, BN
policy ``eval``). Each point is timed from one ``progress`` call to the next (writing the point into the weights,
its loss and accuracy, and every 10 points the file). The unit is one forward pass over the same sample as the
points see it: :func:`flatlit.sharpness.base.mean_loss` (the same 250-example batches, no grad, eval mode, on the
weights of the point just done), timed on its own after every ``--forward-every`` points, outside the points' time,
so points and forward passes alternate through the whole grid and a busy machine slows both alike. One untimed
forward pass and an untimed 3×3 grid warm both sides up first.

- ``median_point_over_forward``: median point time (``median_seconds_per_point``) / median forward time
  (``forward_seconds``): the ratio of medians; near 1 means a point costs what its forward pass costs.
- ``point_over_forward``: mean point time (``seconds_per_point``, the file rewrites amortised) / mean forward time
  (``forward_mean_seconds``): the amortised cost, bursts of a shared machine included on both sides.
- ``spread``: interquartile range / median of the point times and of the forward times.

``--quick``: an 11×11 plane with a forward pass after every point. Prints one JSON line with ``--json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, quickstart_data, spread, timed

from flatlit.data.mnist import DEBIAN_FASHION_MNIST
from flatlit.landscape import compute_surface, random_directions
from flatlit.methods import SGDFamily
from flatlit.sharpness.base import mean_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--resolution", type=int, default=None, help="grid points per axis (default 21; quick: 11)")
    parser.add_argument(
        "--forward-every", type=int, default=None, help="points between two timed forward passes (default 3; quick: 1)"
    )
    parser.add_argument("--quick", action="store_true", help="an 11x11 plane, a forward pass after every point")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    resolution = args.resolution or (11 if args.quick else 21)
    every = args.forward_every or (1 if args.quick else 3)
    dm = quickstart_data(args.data_dir)
    module = SGDFamily(arch="lenet").eval()
    batches = dm.curvature_batches(args.num_samples, args.batch_size, seed=0)
    directions = random_directions(module, 2, seed=0)

    def forward() -> None:
        mean_loss(module, batches, module.loss_fn)

    intervals: list[float] = []
    forwards: list[float] = []
    state = {"last": 0, "t": 0.0, "timing": False}

    def progress(done: int, total: int) -> None:
        if done <= state["last"]:  # the end-of-chunk call repeats the count
            return
        state["last"] = done
        if state["timing"]:
            intervals.append(time.perf_counter() - state["t"])
            if done % every == 0:  # a forward pass on this point's weights, outside the points' time
                forwards.append(timed(forward))
        state["t"] = time.perf_counter()

    def surface(path: str, grid: np.ndarray) -> None:
        state["last"] = 0
        state["t"] = time.perf_counter()
        compute_surface(
            module,
            batches,
            directions,
            grid,
            grid,
            loss_fn=module.loss_fn,
            path=path,
            meta={"mode": "plane"},
            progress=progress,
        )

    with tempfile.TemporaryDirectory() as tmp:
        forward()  # warm-up of both sides, untimed
        surface(os.path.join(tmp, "warm.npz"), np.linspace(-1.0, 1.0, 3))
        state["timing"] = True
        start = time.perf_counter()
        surface(os.path.join(tmp, "plane.npz"), np.linspace(-1.0, 1.0, resolution))
        wall = time.perf_counter() - start
    unit = statistics.median(forwards)
    point = statistics.median(intervals)
    emit(
        {
            "seconds_per_point": statistics.fmean(intervals),
            "median_seconds_per_point": point,
            "point_over_forward": statistics.fmean(intervals) / statistics.fmean(forwards),
            "median_point_over_forward": point / unit,
            "forward_seconds": unit,
            "forward_mean_seconds": statistics.fmean(forwards),
            "grid_seconds": wall - sum(forwards),
            "points": len(intervals),
            "forwards": len(forwards),
            "spread": {"point": round(spread(intervals), 4), "forward": round(spread(forwards), 4)},
        },
        args.json,
    )


if __name__ == "__main__":
    main()
