"""The sharpest directions (Jastrzębski et al. 2019): λ₁ along training per learning rate and NSGD's γ, verdict.json.

    python experiments/reproductions/sharpest_directions/analyze.py \\
        [--sweep runs/reproductions/sharpest_directions/sweep] [--output runs/reproductions/sharpest_directions]

Claims (Jastrzębski, Kenton, Ballas, Fischer, Bengio, Storkey, "On the relation between the sharpest directions of
DNN loss and the SGD step length", ICLR 2019, arXiv 1807.05031, Fig. 1-2 and 5; SPEC §3.6): (a) λ₁ grows early in
training, reaches a peak and then falls or levels off; (b) a larger learning rate keeps λ₁ lower (the peak and the
rest of training); (c) NSGD with γ < 1 (shorter steps along the top eigendirections) steers to sharper regions
(higher λ₁) than plain SGD (γ = 1), with a worse test accuracy.

Numbers per run: λ₁ at the first measurement, its peak and the epoch of the peak, λ₁ at the end, test accuracy.
Verdict: *reproduced* when (a), (b) and (c) hold (a: the peak comes before the last epoch for plain SGD at both
learning rates; b: the peak at lr 0.05 is below the peak at lr 0.01, for γ = 1; c: the final λ₁ of γ = 0.1 is above
that of γ = 1 at both learning rates, and its test accuracy below), *partly* when some hold. One seed per run, as the
paper's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from flatlit.analysis.run_files import load_run
from flatlit.analysis.sweep_table import sweep_frame
from flatlit.analysis.verdict import write_verdict
from flatlit.figures.reproductions import series_figure
from flatlit.figures.style import save

CLAIM = (
    "λ₁ grows early then peaks; a larger learning rate keeps λ₁ lower; NSGD with γ < 1 reaches sharper regions "
    "than SGD (γ = 1)"
)
PAPER = "Jastrzębski et al. 2019, arXiv 1807.05031, Fig. 1-2, 5"
LR, GAMMA = "model.init_args.optimizer.init_args.lr", "model.init_args.overshoot"


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", default="runs/reproductions/sharpest_directions/sweep", help="the sweep's output")
    p.add_argument("--output", default="runs/reproductions/sharpest_directions", help="verdict.json and figures")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.sweep, "results.csv")):
        raise SystemExit(f"no results in {args.sweep}: run the sweep first (make reproduce-sharpest_directions)")
    frame = sweep_frame(args.sweep)
    runs: dict[tuple[float, float], dict[str, object]] = {}
    series = {"λ₁": {}, "λ₅": {}}
    for _, row in frame.iterrows():
        run = load_run(os.path.join(args.sweep, row["run_dir"]))
        steps, eigs = run.eigen
        epochs = np.arange(len(steps)) - 1.0  # the first measurement is before training (epoch −1 → 0 steps)
        lr, gamma = float(row[LR]), float(row[GAMMA])
        lam = np.asarray(eigs, float)
        name = f"lr {lr:g}, γ {gamma:g}"
        series["λ₁"][name] = (steps.tolist(), lam[:, 0].tolist())
        series["λ₅"][name] = (steps.tolist(), lam[:, -1].tolist())
        peak = int(np.argmax(lam[:, 0]))
        runs[(lr, gamma)] = {
            "lambda_1_first": float(lam[0, 0]),
            "lambda_1_peak": float(lam[peak, 0]),
            "peak_epoch": float(epochs[peak]),
            "lambda_1_final": float(lam[-1, 0]),
            "epochs": float(epochs[-1]),
            "test_acc": float(row["final/test_acc"]),
        }
    lrs = sorted({k[0] for k in runs})
    small, large = lrs[0], lrs[-1]
    checks = {
        "a_peak_before_end": all(runs[(lr, 1.0)]["peak_epoch"] < runs[(lr, 1.0)]["epochs"] for lr in lrs),
        "b_larger_lr_lower_peak": runs[(large, 1.0)]["lambda_1_peak"] < runs[(small, 1.0)]["lambda_1_peak"],
        "c_nsgd_sharper": all(runs[(lr, 0.1)]["lambda_1_final"] > runs[(lr, 1.0)]["lambda_1_final"] for lr in lrs),
        "c_nsgd_worse_test_acc": all(runs[(lr, 0.1)]["test_acc"] < runs[(lr, 1.0)]["test_acc"] for lr in lrs),
    }
    verdict = "reproduced" if all(checks.values()) else "partly" if any(checks.values()) else "not reproduced"
    labels = {"λ₁": "λ₁ (top Hessian eigenvalue)", "λ₅": "λ₅"}
    title = "Sharpest directions along training (Fashion-MNIST, SimpleCNN)"
    fig = series_figure(series, labels, "SGD step", title, ncols=2, xlog=False)
    figure = save(fig, os.path.join(args.output, "sharpest_directions.png"))
    numbers = {"runs": {f"lr_{k[0]:g}_gamma_{k[1]:g}": v for k, v in runs.items()}, "checks": checks}
    written = write_verdict(args.output, CLAIM, PAPER, verdict, numbers, [figure])
    json.dump(numbers, sys.stdout, indent=1)
    print(f"\nverdict: {verdict} ({written})")
    return {"verdict": verdict, "numbers": numbers}


if __name__ == "__main__":
    main()
