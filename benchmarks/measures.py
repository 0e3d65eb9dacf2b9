"""Cost of every sharpness/complexity measure on flatlit's lenet and 1,000 real Fashion-MNIST examples, in one run.

For each registered measure: its wall time, and its overhead = wall time / the time of its counted passes over the
sample, each pass timed on the same model and sample the way the measures run it:

- ``forward``: a no-grad forward (:func:`flatlit.sharpness.base.mean_loss`, as the measures call it);
- ``gradient``: forward + backward (:func:`flatlit.sharpness.base.loss_and_grad`, as the measures call it);
- ``per_example``: a per-example gradient pass (``torch.func.vmap`` of ``grad`` over the examples, 16 at a time as
  minimum sharpness does);
- ``hvp``: the Hessian measures build a fresh operator (:func:`flatlit.sharpness.hessian.hessian_operator`, which
  caches the gradient graph of the sample when it fits in memory) and apply it n times: the first product builds
  the graph (forward + first backward) and every later one is a second backward on it. The unit is timed the same
  way, on a fresh operator from the same function: its first product (``unit_seconds["hvp_first"]``) and the mean
  of its next two (``unit_seconds["hvp"]``), and n HVPs cost hvp_first + (n − 1) × hvp. Whether the graphs fit is
  decided by the free memory of the moment, for the measure and the unit alike; ``hvp_graph_cached`` is the fraction
  of timed HVP units whose operator cached them. ``unit_seconds["hvp_uncached"]``: one whole product with the cache
  off, for reference.

Each measure and the units of the passes it counts (learnt from an untimed warm-up call of the measure, which also
warms it up) are timed interleaved: one untimed call of each unit, then rounds calling the measure and each unit
once, in an order that alternates from round to round (``_common.interleave``): 5 rounds for a measure under 2 s,
3 under 10 s, else 2 (``--quick``: 3, 2 and 1). The overhead is a ratio of medians. A ratio near 1 means the measure
costs what its passes cost; measures that never touch the data (norms) have no ratio. ``unit_seconds``: the units
timed on their own at the start, interleaved over ``--repeats`` rounds. ``spread``: interquartile range / median of
each measure's timed calls (``unit_spread``: of the units), the noise of the machine during the run. Prints
``{"overhead": {name: ratio}, "max_overhead": r, "seconds": {name: s}, "unit_seconds": {...}, ...}`` with ``--json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, interleave, medians, quickstart_data, spread, spreads, timed, wall

from flatlit.curvature import HessianOperator
from flatlit.data.mnist import DEBIAN_FASHION_MNIST
from flatlit.methods import SGDFamily
from flatlit.objective import twice_differentiable
from flatlit.sharpness import MeasureInputs, compute_measure, list_measures
from flatlit.sharpness.base import loss_and_grad, mean_loss
from flatlit.sharpness.hessian import hessian_operator


def rounds_for(seconds: float, quick: bool) -> int:
    """Timed rounds of a measure whose warm-up call took ``seconds``."""
    rounds = 5 if seconds < 2.0 else 3 if seconds < 10.0 else 2
    return max(1, rounds - 2) if quick else rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the units timed on their own")
    parser.add_argument("--measures", nargs="*", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds per measure (3 / 2 / 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dm = quickstart_data(args.data_dir)
    module = SGDFamily(arch="lenet").eval()
    batches = dm.curvature_batches(args.num_samples, args.batch_size, seed=0)
    init = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():  # a point away from the initialisation
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs = MeasureInputs(module, batches, module.loss_fn, init_state=init, num_train=len(dm.train_indices))
    params = inputs.params
    v = torch.randn(sum(p.numel() for p in params))
    uncached = HessianOperator(module, batches, module.loss_fn, params, cache_graph=False)
    theta = {n: p.detach() for n, p in module.named_parameters()}

    def example_loss(th, x, y):
        return module.loss_fn(functional_call(module, th, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_example_grad = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def per_example_pass():
        for x, y in batches:
            for xc, yc in zip(x.split(16), y.split(16)):
                per_example_grad(theta, xc, yc)

    def hvp_products() -> tuple[float, float, bool]:
        """A Hessian measure's first products, on a fresh operator built as the measures build it: the first one's
        time, the mean time of the next two, and whether the operator cached its graphs (auto mode decides by the
        free memory at the time, for the measures and for this unit alike)."""
        op = hessian_operator(inputs)
        with twice_differentiable("benchmarks/measures.py"):  # as the Hessian measures apply it
            first = timed(lambda: op.matvec(v))
            later = (timed(lambda: op.matvec(v)) + timed(lambda: op.matvec(v))) / 2
        return first, later, op.graph_bytes > 0

    sides = {  # each returns its wall time(s)
        "per_example": wall(per_example_pass),
        "forward": wall(lambda: mean_loss(module, batches, module.loss_fn)),
        "gradient": wall(lambda: loss_and_grad(module, params, batches, module.loss_fn)),
        "hvp": hvp_products,
    }
    cached: list[bool] = []  # whether each timed HVP unit's operator cached its graphs

    def split(results: dict[str, list]) -> dict[str, list[float]]:
        """The sides' times, the HVP side split into ``hvp_first`` and ``hvp`` (a later product)."""
        out = {k: r for k, r in results.items() if k != "hvp"}
        if "hvp" in results:
            out["hvp_first"] = [first for first, _, _ in results["hvp"]]
            out["hvp"] = [later for _, later, _ in results["hvp"]]
            cached.extend(c for _, _, c in results["hvp"])
        return out

    unit_times = split(interleave({**sides, "hvp_uncached": wall(lambda: uncached.matvec(v))}, args.repeats))
    unit = medians(unit_times)
    seconds, overhead, measure_spread = {}, {}, {}
    for name in args.measures or list_measures():
        # an untimed warm-up call tells which passes the measure counts; then the measure and those units are timed
        # interleaved (one untimed call of each unit first), so they see the same machine load
        t = time.perf_counter()
        result = compute_measure(name, inputs)
        warm = time.perf_counter() - t
        counts = {
            "forward": result.cost.forwards,
            "gradient": result.cost.gradients,
            "hvp": result.cost.hvps,
            "per_example": result.cost.per_example,
        }
        counts = {k: n for k, n in counts.items() if n}
        for k in counts:  # warm-up of the units (the measure's own warm-up was the call above)
            sides[k]()
        timed_sides = {name: wall(lambda name=name: compute_measure(name, inputs)), **{k: sides[k] for k in counts}}
        runs = split(interleave(timed_sides, rounds_for(warm, args.quick), warm_up=False))
        now = medians(runs)
        seconds[name] = now.pop(name)
        measure_spread[name] = round(spread(runs[name]), 4)
        if not counts:
            overhead[name] = None
            continue
        passes = sum(n * now[k] for k, n in counts.items() if k != "hvp")
        if "hvp" in counts:  # the first product builds the graph, the others run on it
            passes += now["hvp_first"] + (counts["hvp"] - 1) * now["hvp"]
        overhead[name] = seconds[name] / passes
    ratios = [r for r in overhead.values() if r is not None]
    result = {"overhead": overhead, "max_overhead": max(ratios) if ratios else None, "seconds": seconds}
    emit(
        {
            **result,
            "unit_seconds": unit,
            "spread": measure_spread,
            "unit_spread": spreads(unit_times),
            "min_overhead": min(ratios) if ratios else None,
            "hvp_graph_cached": sum(cached) / len(cached) if cached else None,  # the fraction of HVP units
        },
        args.json,
    )


if __name__ == "__main__":
    main()
