"""Worker of tests/landscape/test_ddp.py: a plane split over 2 gloo processes (point i on rank i mod 2)."""

import sys

import numpy as np
import torch
import torch.distributed as dist

from flatlit.landscape import compute_surface, random_directions
from tests.helpers import end_worker
from tests.landscape.common import small_batches, small_net


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net, batches = small_net(), small_batches()  # the whole sample on every rank
    ds = random_directions(net, 2, seed=4)
    seen = []

    def loss_fn(o, y):
        seen.append(1)
        return torch.nn.functional.cross_entropy(o, y)

    r = compute_surface(
        net,
        batches,
        ds,
        np.linspace(-1, 1, 5),
        np.linspace(-1, 1, 3),
        loss_fn=loss_fn,
        bn="update",
        path=f"{out}.npz",
        meta={"mode": "plane"},
        save_every=4,
    )
    torch.save({"loss": r.loss, "acc": r.acc, "points": len(seen) // len(batches)}, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    end_worker()
