"""The sharpest directions (Jastrzębski et al. 2019): λ₁ along training per learning rate and NSGD's γ, verdict.json.

    python experiments/reproductions/sharpest_directions/analyze.py \\
        [--sweep runs/reproductions/sharpest_directions/sweep] [--output runs/reproductions/sharpest_directions]

Claims (Jastrzębski, Kenton, Ballas, Fischer, Bengio, Storkey, "On the relation between the sharpest directions of
DNN loss and the SGD step length", ICLR 2019, arXiv 1807.05031, Fig. 1-2 and 5; SPEC §3.6): (a) λ₁ grows early in
training, reaches a peak and then falls or levels off; (b) a larger learning rate keeps λ₁ lower (the peak and the
rest of training); (c) NSGD with γ < 1 (shorter steps along the top eigendirections) steers to sharper regions
(higher λ₁) than plain SGD (γ = 1), with a worse test accuracy.

Numbers per setting (mean with the 95 % t-interval over 3 seeds): λ₁ at the first measurement, its peak and the
epoch of the peak, λ₁ at the end, test accuracy. Verdict: *reproduced* when (a), (b) and (c) hold (a: the peak comes
before the last epoch in every plain-SGD run; b: the peak interval at lr 0.05 lies below the one at lr 0.01, γ = 1;
c: at both learning rates the final-λ₁ interval of γ = 0.1 lies above γ = 1's and its test-accuracy interval below),
*partly* when some hold.
"""

from __future__ import annotations

import os

import numpy as np

from flatlit.analysis.run_files import load_run
from flatlit.analysis.verdict import above, mean_interval, report_verdict, reproduction_parser, sweep_results
from flatlit.figures.reproductions import series_figure
from flatlit.figures.style import save

CLAIM = (
    "λ₁ grows early then peaks; a larger learning rate keeps λ₁ lower; NSGD with γ < 1 reaches sharper regions "
    "than SGD (γ = 1)"
)
PAPER = "Jastrzębski et al. 2019, arXiv 1807.05031, Fig. 1-2, 5"
LR, GAMMA = "model.init_args.optimizer.init_args.lr", "model.init_args.overshoot"


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = reproduction_parser("sharpest_directions", __doc__)
    args = p.parse_args(argv)
    frame = sweep_results(args.sweep, "sharpest_directions")
    per_run: dict[tuple[float, float], list[dict[str, float]]] = {}
    curves: dict[tuple[float, float], list[tuple[np.ndarray, np.ndarray]]] = {}
    for _, row in frame.iterrows():
        run = load_run(os.path.join(args.sweep, row["run_dir"]))
        steps, eigs = run.eigen
        epochs = np.arange(len(steps)) - 1.0  # the first measurement is before training (epoch −1 → 0 steps)
        key = (float(row[LR]), float(row[GAMMA]))
        lam = np.asarray(eigs, float)
        peak = int(np.argmax(lam[:, 0]))
        per_run.setdefault(key, []).append(
            {
                "lambda_1_first": float(lam[0, 0]),
                "lambda_1_peak": float(lam[peak, 0]),
                "peak_epoch": float(epochs[peak]),
                "lambda_1_final": float(lam[-1, 0]),
                "epochs": float(epochs[-1]),
                "test_acc": float(row["final/test_acc"]),
            }
        )
        curves.setdefault(key, []).append((np.asarray(steps, float), lam))
    runs = {key: {name: mean_interval([r[name] for r in rs]) for name in rs[0]} for key, rs in sorted(per_run.items())}
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {"λ₁": {}, "λ₅": {}}
    for key, cs in sorted(curves.items()):
        n = min(len(c[0]) for c in cs)
        name = f"lr {key[0]:g}, γ {key[1]:g}"
        series["λ₁"][name] = (cs[0][0][:n].tolist(), np.mean([c[1][:n, 0] for c in cs], axis=0).tolist())
        series["λ₅"][name] = (cs[0][0][:n].tolist(), np.mean([c[1][:n, -1] for c in cs], axis=0).tolist())
    lrs = sorted({k[0] for k in runs})
    small, large = lrs[0], lrs[-1]
    sgd = {lr: runs[(lr, 1.0)] for lr in lrs}
    nsgd = {lr: runs[(lr, 0.1)] for lr in lrs}
    checks = {
        "a_peak_before_end": all(r["peak_epoch"] < r["epochs"] for lr in lrs for r in per_run[(lr, 1.0)]),
        "b_larger_lr_lower_peak": above(sgd[small]["lambda_1_peak"], sgd[large]["lambda_1_peak"]),
        "c_nsgd_sharper": all(above(nsgd[lr]["lambda_1_final"], sgd[lr]["lambda_1_final"]) for lr in lrs),
        "c_nsgd_worse_test_acc": all(above(sgd[lr]["test_acc"], nsgd[lr]["test_acc"]) for lr in lrs),
    }
    verdict = "reproduced" if all(checks.values()) else "partly" if any(checks.values()) else "not reproduced"
    labels = {"λ₁": "λ₁ (top Hessian eigenvalue)", "λ₅": "λ₅"}
    title = "Sharpest directions along training (Fashion-MNIST, SimpleCNN; mean over seeds)"
    fig = series_figure(series, labels, "SGD step", title, ncols=2, xlog=False)
    figure = save(fig, os.path.join(args.output, "sharpest_directions.png"))
    numbers = {
        "runs": {f"lr_{k[0]:g}_gamma_{k[1]:g}": v for k, v in runs.items()},
        "seeds": int(max(len(v) for v in per_run.values())),
        "checks": checks,
    }
    return report_verdict(args.output, CLAIM, PAPER, verdict, numbers, [figure])


if __name__ == "__main__":
    main()
