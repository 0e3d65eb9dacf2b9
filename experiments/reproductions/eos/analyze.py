"""Edge of stability (Cohen et al. 2021): read the sweep's runs, draw Fig. 1, write verdict.json.

    python experiments/reproductions/eos/analyze.py [--sweep runs/reproductions/eos/sweep] \\
        [--output runs/reproductions/eos]

Claim (Cohen, Kaur, Li, Kolter, Talwalkar, "Gradient descent on neural networks typically occurs at the edge of
stability", ICLR 2021, arXiv 2103.00065, Fig. 1): under full-batch gradient descent with step size η the top
Hessian eigenvalue λ₁ rises during training (progressive sharpening) until it reaches 2/η, then hovers just above
it while the loss keeps falling, non-monotonically.

Per step size: λ₁ at initialisation, the first step where λ₁ ≥ 0.95·2/η, and the ratio λ₁/(2/η) after that step
(median and 10–90 % range over the measurements). Verdict: *reproduced* when for every η λ₁ starts below 2/η, reaches
it with at least a quarter of the run left to watch, and the median ratio afterwards lies in [0.9, 1.2]; *partly*
when that holds for some η; else *not reproduced*.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np

from flatlit.analysis.run_files import load_run
from flatlit.analysis.verdict import report_verdict, reproduction_parser
from flatlit.figures.reproductions import eos_figure
from flatlit.figures.style import save

CLAIM = (
    "Full-batch GD: λ₁ of the training loss rises (progressive sharpening) to 2/η and then hovers at 2/η "
    "(the edge of stability) while the loss keeps decreasing"
)
PAPER = "Cohen et al. 2021, arXiv 2103.00065, Fig. 1"
REACHED = 0.95  # λ₁ ≥ REACHED · 2/η counts as at the threshold
BAND = (0.9, 1.2)  # the median ratio after reaching it, for "hovers at 2/η"


def read_trial(run_dir: str) -> dict[str, object]:
    """η, the loss curve and the λ₁ series of one trial (one GD run)."""
    run = load_run(run_dir)
    lr = float(run.config["model"]["init_args"]["optimizer"]["init_args"]["lr"])
    if run.eigen is None:
        raise SystemExit(f"{run_dir}: no λ₁ series (eigenvalues.npz / hessian/lambda_1 in history.csv)")
    eig_steps, eigs = run.eigen
    loss = run.col("train/loss")
    steps = run.col("step")
    keep = np.isfinite(loss) if loss is not None else np.zeros(0, bool)
    return {
        "lr": lr,
        "loss_steps": steps[keep],
        "loss": loss[keep],
        "eig_steps": np.asarray(eig_steps, float),
        "lambda_1": np.asarray(eigs, float)[:, 0],
    }


def summarise(s: dict[str, object]) -> dict[str, float]:
    """The numbers of one step size (see the module docstring)."""
    threshold = 2.0 / float(s["lr"])
    lam = np.asarray(s["lambda_1"])
    steps = np.asarray(s["eig_steps"])
    ratio = lam / threshold
    reached = np.flatnonzero(ratio >= REACHED)
    out = {
        "lr": float(s["lr"]),
        "threshold_2_over_lr": threshold,
        "lambda_1_init": float(lam[0]),
        "lambda_1_max": float(lam.max()),
        "steps": float(steps[-1]),
        "final_loss": float(np.asarray(s["loss"])[-1]) if len(s["loss"]) else math.nan,
    }
    if reached.size:
        after = ratio[reached[0] :]
        out.update(
            step_reached=float(steps[reached[0]]),
            ratio_median_after=float(np.median(after)),
            ratio_p10_after=float(np.percentile(after, 10)),
            ratio_p90_after=float(np.percentile(after, 90)),
        )
    return out


def holds(n: dict[str, float]) -> bool:
    """λ₁ started below 2/η, reached it, and hovered within BAND of it afterwards."""
    return (
        n["lambda_1_init"] < REACHED * n["threshold_2_over_lr"]
        and "ratio_median_after" in n
        and n["steps"] - n["step_reached"] >= 0.25 * n["steps"]
        and BAND[0] <= n["ratio_median_after"] <= BAND[1]
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = reproduction_parser("eos", __doc__)
    args = p.parse_args(argv)
    trials = sorted(glob.glob(os.path.join(args.sweep, "trials", "*")))
    if not trials:
        raise SystemExit(f"no trials in {args.sweep}/trials: run the sweep first (make reproduce-eos)")
    series = [read_trial(t) for t in trials]
    numbers = {f"lr_{s['lr']:.4g}": summarise(s) for s in series}
    ok = [holds(n) for n in numbers.values()]
    verdict = "reproduced" if all(ok) else "partly" if any(ok) else "not reproduced"
    figure = save(eos_figure(series), os.path.join(args.output, "eos.png"))
    return report_verdict(args.output, CLAIM, PAPER, verdict, numbers, [figure])


if __name__ == "__main__":
    main()
