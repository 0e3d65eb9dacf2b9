"""Worker of tests/sharpness/test_all_measures.py: every measure on half of the sample per rank (2 gloo processes)."""

import sys

import torch
import torch.distributed as dist

from flatlit.sharpness import compute_measure, list_measures
from tests.helpers import end_worker
from tests.sharpness.common import cheap, inputs_for, problem


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, batches, init = problem()
    mine = batches[rank::2]
    results = {
        name: compute_measure(name, inputs_for(model, mine, init), **cheap(name)).value for name in list_measures()
    }
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    end_worker()
