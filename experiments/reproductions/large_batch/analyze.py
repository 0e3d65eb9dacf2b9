"""Large- vs small-batch training (Keskar et al. 2017): sharpness and generalization per batch size, verdict.json.

    python experiments/reproductions/large_batch/analyze.py [--sweep runs/reproductions/large_batch/sweep] \\
        [--output runs/reproductions/large_batch]

Claim (Keskar, Mudigere, Nocedal, Smelyanskiy, Tang, "On large-batch training for deep learning: generalization gap
and sharp minima", ICLR 2017, arXiv 1609.04836, Table 2 and Fig. 3-4): with the same number of epochs, large-batch
training reaches sharper minima (higher ε-sharpness; the paper's Table 2: 5-10× higher) and generalizes worse
(lower test accuracy, a larger gap) than small-batch training.

Keskar et al. compare networks that both fit the training set (their SB and LB training accuracies are within a
point); a large batch that has not fitted it yet generalizes "worse" only because it is less trained, so the test
accuracy counts only when the mean training accuracies are within 1 point. Verdict: *reproduced* when the large
batch's 95 % intervals over the seeds lie above the small batch's for ε-sharpness and λ₁ and below for test accuracy
at comparable training accuracy; *partly* when some of these hold; else *not reproduced*.
"""

from __future__ import annotations

import os

from flatlit.analysis.verdict import above, group_intervals, report_verdict, reproduction_parser, sweep_results
from flatlit.figures.reproductions import groups_figure
from flatlit.figures.style import save

CLAIM = "Same epochs: large-batch training ends sharper (ε-sharpness, λ₁) and generalizes worse than small-batch"
PAPER = "Keskar et al. 2017, arXiv 1609.04836, Table 2, Fig. 3-4"
BATCH = "data.init_args.batch_size"
COLUMNS = {
    "final/train_acc": "training accuracy",
    "final/test_acc": "test accuracy",
    "final/gen_gap_acc": "generalization gap (train − test acc.)",
    "measure/keskar_sharpness": "ε-sharpness (Keskar, %)",
    "measure/hessian_top_eigenvalue": "λ₁ of the training-loss Hessian",
}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = reproduction_parser("large_batch", __doc__)
    args = p.parse_args(argv)
    frame = sweep_results(args.sweep, "large_batch")
    rows = frame.to_dict("records")
    intervals = group_intervals(rows, BATCH, list(COLUMNS))
    small, large = (str(b) for b in sorted(frame[BATCH].unique()))
    checks = {
        "sharper_keskar": above(
            intervals[large]["measure/keskar_sharpness"], intervals[small]["measure/keskar_sharpness"]
        ),
        "sharper_lambda_1": above(
            intervals[large]["measure/hessian_top_eigenvalue"], intervals[small]["measure/hessian_top_eigenvalue"]
        ),
        "worse_test_acc": above(intervals[small]["final/test_acc"], intervals[large]["final/test_acc"]),
        "comparable_train_acc": abs(
            intervals[small]["final/train_acc"]["mean"] - intervals[large]["final/train_acc"]["mean"]
        )
        <= 0.01,
    }
    sharper = checks["sharper_keskar"] or checks["sharper_lambda_1"]
    verdict = (
        "reproduced" if all(checks.values()) else "partly" if sharper or checks["worse_test_acc"] else "not reproduced"
    )
    points = {
        f"batch {g}": {c: frame.loc[frame[BATCH].astype(str) == g, c].astype(float).tolist() for c in COLUMNS}
        for g in (small, large)
    }
    named = {f"batch {g}": intervals[g] for g in (small, large)}
    panels = [
        (c, COLUMNS[c])
        for c in ("final/train_acc", "final/test_acc", "measure/keskar_sharpness", "measure/hessian_top_eigenvalue")
    ]
    fig = groups_figure(points, named, panels, "batch size", "Small vs large batch, same epochs (Fashion-MNIST, LeNet)")
    figure = save(fig, os.path.join(args.output, "large_batch.png"))
    numbers = {"small_batch": int(small), "large_batch": int(large), "intervals": named, "checks": checks}
    return report_verdict(args.output, CLAIM, PAPER, verdict, numbers, [figure])


if __name__ == "__main__":
    main()
