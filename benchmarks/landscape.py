"""Cost of a loss-landscape grid point against one forward pass, on flatlit's lenet and 1,000 real Fashion-MNIST
examples (Debian's copy in /usr/share/datasets/fashion-mnist).

A 21×21 filter-normalised plane (Li et al. 2018) is computed with :func:`flatlit.landscape.compute_surface` exactly
as ``flatlit landscape --mode plane`` does (points written in place, results file rewritten every 10 points, BN
policy ``eval``). Its wall time per point is compared with one no-grad forward pass over the same sample (the loss
of every example; the median of passes timed before, during (after every row, outside the points' time) and after
the grid, so a busy machine slows both alike). ``point_over_forward`` near 1 means a
point costs what its forward pass costs. Prints ``{"seconds_per_point": s, "point_over_forward": r, ...}`` with
``--json``.
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
from _common import emit, median_time, quickstart_data, timed

from flatlit.data.mnist import DEBIAN_FASHION_MNIST
from flatlit.landscape import compute_surface, random_directions
from flatlit.methods import SGDFamily
from flatlit.sharpness.base import mean_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--resolution", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dm = quickstart_data(args.data_dir)
    module = SGDFamily(arch="lenet").eval()
    batches = dm.curvature_batches(args.num_samples, args.batch_size, seed=0)
    directions = random_directions(module, 2, seed=0)

    def forward() -> None:
        mean_loss(module, batches, module.loss_fn)

    before = median_time(forward, args.repeats)
    grid = np.linspace(-1.0, 1.0, args.resolution)
    intervals: list[float] = []
    forwards: list[float] = []
    state = {"last": 0, "t": 0.0}

    def progress(done: int, total: int) -> None:
        if done <= state["last"]:  # the end-of-chunk call repeats the count
            return
        state["last"] = done
        intervals.append(time.perf_counter() - state["t"])
        if done % args.resolution == 0:  # a forward pass timed under the same machine load, outside the points
            forwards.append(timed(forward))
        state["t"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        state["t"] = start = time.perf_counter()
        compute_surface(
            module,
            batches,
            directions,
            grid,
            grid,
            loss_fn=module.loss_fn,
            path=os.path.join(tmp, "plane.npz"),
            meta={"mode": "plane"},
            progress=progress,
        )
        wall = time.perf_counter() - start
    after = median_time(forward, args.repeats)
    unit = statistics.median([before, after, *forwards])
    per_point = sum(intervals) / len(intervals)
    emit(
        {
            "seconds_per_point": per_point,
            "point_over_forward": per_point / unit,
            "median_point_over_forward": statistics.median(intervals) / unit,
            "forward_seconds": unit,
            "grid_seconds": wall - sum(forwards),
            "points": len(intervals),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
