"""``flatlit robustness``: weight-noise and adversarial robustness of a checkpoint, cached in ``robustness.json``.

    flatlit robustness --ckpt_path runs/quickstart/fashion_mnist_sgd/version_0/checkpoints/last.ckpt
    flatlit robustness --ckpt_path RUN/checkpoints/last.ckpt --noise uniform --scales 0.006 0.01 --draws 10 \\
        --attacks pgd_linf pgd_l2 --eps 2/255 8/255 --eps_l2 0.25 0.5 --steps 20

The work is :func:`flatlit.runs.robustness.evaluate_robustness` (its module tells what is measured and on which
batches): on one fixed seeded sample of the test split, the clean accuracy and loss, the accuracy under weight noise
of each kind and scale (``--draws`` networks each) and the robust accuracy under each attack and ε (``--eps`` for the
L∞ attacks fgsm and pgd_linf, ``--eps_l2`` for pgd_l2, in [0, 1] pixel units). See docs/robustness.md. Results are
cached in ``robustness.json`` beside the checkpoint (a second call computes only what is missing) and shown in the
run's TensorBoard under ``robustness/`` with both figures (the layout: :mod:`flatlit.runs.robustness`). Bad input is
one ``flatlit: error: ...`` line (exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from flatlit.landscape.robustness import ATTACKS, DEFAULT_STEPS, NOISE_KINDS
from flatlit.runs.robustness import DEFAULT_SCALES, RobustnessOptions, evaluate_robustness
from flatlit.utils.errors import FlatlitError
from flatlit.utils.safe_loading import add_trust_argument


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``flatlit: error: ...`` line, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"flatlit: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flatlit robustness", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", help="the checkpoint to evaluate")
    p.add_argument("--config", help="the run's config (default: config.yaml of the checkpoint's run directory)")
    add_trust_argument(p)
    p.add_argument(
        "--noise",
        nargs="*",
        default=list(NOISE_KINDS),
        help=f"weight-noise kinds ({', '.join(NOISE_KINDS)}; none: off)",
    )
    p.add_argument(
        "--scales", nargs="+", default=list(DEFAULT_SCALES), help="noise scales s: w + s·u or w·(1 + s·u), u ~ U(-1, 1)"
    )
    p.add_argument("--draws", type=int, default=5, help="seeded noise draws per (kind, scale)")
    p.add_argument(
        "--attacks",
        nargs="*",
        default=None,
        help=f"attacks ({', '.join(ATTACKS)}; default all, skipped where they do not apply; none: off)",
    )
    p.add_argument("--eps", nargs="+", default=["8/255"], help="L∞ radii of fgsm and pgd_linf, in pixels (8/255 ok)")
    p.add_argument("--eps_l2", nargs="+", default=["0.5"], help="L2 radii of pgd_l2, in pixel units")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="PGD steps (step size 2.5·ε/steps)")
    p.add_argument("--num_samples", type=int, default=1000, help="test examples in the fixed sample")
    p.add_argument("--batch_size", type=int, default=250, help="batch size of the evaluation passes and attacks")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, the weight noise and PGD's random start")
    p.add_argument("--output", default=None, help="results file (default: robustness.json beside the checkpoint)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--recompute", action="store_true", help="ignore cached results")
    return p


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``flatlit robustness``; returns the results written (tests call it directly)."""
    opts = build_parser().parse_args(args)
    try:
        result, output = evaluate_robustness(RobustnessOptions(**vars(opts)))
    except FlatlitError as err:
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None
    _print_table(result, output)
    return result


def _print_table(result: dict[str, Any], output: str) -> None:
    c = result["clean"]
    print(f"clean: acc {c['acc']:.4f}  loss {c['loss']:.4f}  ({c['num_samples']} test examples)")
    if result["weight_noise"]:
        print(f"{'weight noise':15s} {'scale':>8s}  {'acc (mean ± std)':>19s}  {'loss (mean ± std)':>21s}  draws")
        for r in result["weight_noise"]:
            print(
                f"{r['kind']:15s} {r['scale']:8.4g}  {r['acc_mean']:8.4f} ± {r['acc_std']:<8.4f}  "
                f"{r['loss_mean']:10.4g} ± {r['loss_std']:<8.3g}  {r['draws']}"
            )
    if result["adversarial"]:
        print(f"{'attack':15s} {'eps':>8s}  {'steps':>5s}  {'clean acc':>9s}  {'robust acc':>10s}")
        for r in result["adversarial"]:
            steps = "-" if r["steps"] is None else str(r["steps"])
            print(f"{r['attack']:15s} {r['eps']:8.4g}  {steps:>5s}  {r['clean_acc']:9.4f}  {r['robust_acc']:10.4f}")
    print(f"written: {output}")
