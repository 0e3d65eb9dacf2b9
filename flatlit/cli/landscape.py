"""``flatlit landscape``: loss and accuracy along lines and planes around a checkpoint, or between two checkpoints.

    flatlit landscape --ckpt_path RUN/checkpoints/last.ckpt --mode line             # 1-D, filter-normalised
    flatlit landscape --ckpt_path RUN/checkpoints/last.ckpt --mode plane --resolution 21
    flatlit landscape --ckpt_path A.ckpt --ckpt_path B.ckpt --mode interpolate --alphas -0.5:1.5:41
    flatlit landscape --ckpt_path RUN/checkpoints/last.ckpt --mode eigen --top_k 3 --alphas -0.5:0.5:41

Modes: ``line``/``plane`` (seeded Gaussian filter-normalised directions, Li et al. 2018), ``interpolate`` (the
straight line between two checkpoints) and ``eigen`` (the top-k Hessian eigenvectors). The work is
:func:`flatlit.runs.landscape.compute_landscapes`, whose docstring tells the details: results go to
``RUN/landscapes/<mode>_<checkpoint>_<hash of the arguments>.npz`` (or ``--output``) with the directions and the
figures beside it, rewritten every ``--save_every`` points so that rerunning the same command after a kill continues
where it stopped; the curves and figures are also shown in the run's TensorBoard under ``landscape/`` (the layout:
:mod:`flatlit.runs.landscape`). ``--alphas a:b:n`` is ``n`` evenly spaced points from a to b (both included). Bad
input is one ``flatlit: error: ...`` line (exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from flatlit.runs.landscape import MODES, LandscapeOptions, compute_landscapes
from flatlit.utils.errors import FlatlitError
from flatlit.utils.safe_loading import add_trust_argument


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatlit landscape", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", action="append", default=[], help="the checkpoint (twice for --mode interpolate)")
    p.add_argument("--mode", choices=MODES, default="line", help="line, plane, interpolate or eigen (default line)")
    p.add_argument("--config", help="the run's config (default: config.yaml of the first checkpoint's run directory)")
    add_trust_argument(p)
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--resolution", type=int, help="points per axis over the default range (51 lines, 21 planes)")
    grid.add_argument("--alphas", help="a:b:n, n points from a to b (default -1:1, interpolate -0.5:1.5)")
    p.add_argument("--betas", help="a:b:n for the second axis of a plane (default: as alphas)")
    p.add_argument("--bn", choices=("eval", "interpolate", "update"), default=None, help="BatchNorm policy")
    p.add_argument("--norm", choices=("filter", "layer", "model", "none"), default="filter", help="direction norm")
    p.add_argument(
        "--bias_bn", choices=("ignore", "filter"), default="ignore", help="1-D parameters: zero or normalise"
    )
    p.add_argument("--num_samples", type=int, default=1000, help="training examples in the fixed sample")
    p.add_argument("--batch_size", type=int, default=250, help="batch size of the evaluation passes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, the directions and Lanczos")
    p.add_argument("--directions", help="a saved direction set (.pt) or an eigenvectors_step*.pt file")
    p.add_argument("--top_k", type=int, default=2, help="eigen mode: number of eigenvectors")
    p.add_argument("--output", help="results .npz (default RUN/landscapes/<mode>_<ckpt>_<hash>.npz)")
    p.add_argument("--save_every", type=int, default=10, help="write the results every this many points")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--recompute", action="store_true", help="overwrite a results file written with other arguments")
    p.add_argument("--no_plot", action="store_true", help="write the .npz only")
    return p


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``flatlit landscape``; returns ``{"results": [npz...], "figures": [png...]}`` (for tests)."""
    argv = list(sys.argv[1:] if args is None else args)
    for i in range(len(argv) - 1):  # "--alphas -1:1:51": argparse would read "-1:1:51" as an option
        if argv[i] in ("--alphas", "--betas") and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"{argv[i]}={argv[i + 1]}", ""]
    opts = build_parser().parse_args([a for a in argv if a != ""])
    try:
        out = compute_landscapes(LandscapeOptions(**vars(opts)))
    except FlatlitError as err:
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None
    for path, result in zip(out.results, out.surfaces):
        _summary(path, result)
    for f in out.figures:
        print(f"figure: {f}")
    return {"results": out.results, "figures": out.figures}


def _summary(path: str, result: Any) -> None:
    loss = result.loss[np.isfinite(result.loss)]
    if loss.size:
        print(
            f"written: {path} ({int(result.done.sum())}/{result.done.size} points, loss {loss.min():.4g} .. "
            f"{loss.max():.4g})"
        )
    else:
        print(f"written: {path}")
