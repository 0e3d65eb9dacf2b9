"""A plane split over 2 gloo processes equals the single-process plane, on every rank and in rank 0's file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from flatlit.landscape import LandscapeResult, compute_surface, random_directions
from tests.helpers import run_torchrun
from tests.landscape.common import small_batches, small_net


@pytest.mark.distributed
def test_ddp_split_grid_equals_single_process(tmp_path):
    out = str(tmp_path / "plane")
    run_torchrun(os.path.join(os.path.dirname(__file__), "ddp_surface_worker.py"), [out], port=29577)
    net, batches = small_net(), small_batches()
    single = compute_surface(
        net, batches, random_directions(net, 2, seed=4), np.linspace(-1, 1, 5), np.linspace(-1, 1, 3), bn="update"
    )
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for r in ranks:
        assert np.array_equal(r["loss"], single.loss) and np.array_equal(r["acc"], single.acc)
    assert sorted(r["points"] for r in ranks) == [7, 8]  # 15 points: each rank evaluated its own share
    on_disk = LandscapeResult.load(f"{out}.npz")
    assert on_disk.complete and np.array_equal(on_disk.loss, single.loss)
