"""Flat-minima optimizers vs SGD at equal epochs: accuracy, λ₁, trace, sharpness, a landscape overlay, verdict.json.

    python experiments/reproductions/flat_optimizers/analyze.py \\
        [--sweep runs/reproductions/flat_optimizers/sweep] [--output runs/reproductions/flat_optimizers]

Claim (Foret et al. 2021, arXiv 2010.01412; Bisla et al. 2022, arXiv 2201.08025, Tables 3-5; Wen et al. 2018,
arXiv 1805.07898; Chaudhari et al. 2017, arXiv 1611.01838): SAM, LPF-SGD, SmoothOut/ASO and Entropy-SGD find flatter
minima than SGD (lower top eigenvalue and trace of the Hessian) and generalize at least as well (LPF-SGD's Table 3:
each beats SGD on every dataset; its flatness figures: lower λ₁ and trace).

Per method, over 3 seeds (means with 95 % t-intervals): test accuracy, λ₁, the Hutchinson trace, SAM's one-step
sharpness, the LPF measure. A method *holds* the claim when its λ₁ interval lies below SGD's and its mean test
accuracy is not below SGD's interval. Verdict: *reproduced* when all four hold, *partly* when some do.
"""

from __future__ import annotations

import glob
import json
import os

from flatlit.analysis.verdict import above, group_intervals, report_verdict, reproduction_parser, sweep_results
from flatlit.figures.landscape import lines_figure
from flatlit.figures.reproductions import groups_figure
from flatlit.figures.style import save

CLAIM = (
    "SAM, LPF-SGD, SmoothOut/ASO and Entropy-SGD reach flatter minima (lower λ₁, trace) than SGD at equal epochs "
    "and generalize at least as well"
)
PAPER = "Foret et al. 2021; Bisla et al. 2022 (LPF-SGD, Tables 3-5); Wen et al. 2018; Chaudhari et al. 2017"
NAMES = {"SGDFamily": "SGD", "SAM": "SAM", "LPFSGD": "LPF-SGD", "SmoothOut": "ASO", "EntropySGD": "Entropy-SGD"}
COLUMNS = {
    "final/test_acc": "test accuracy",
    "final/gen_gap_acc": "gap (train − test acc.)",
    "measure/hessian_top_eigenvalue": "λ₁",
    "measure/hessian_trace": "tr H (Hutchinson)",
    "measure/sam_sharpness": "SAM sharpness (ρ 0.05)",
    "measure/lpf_sharpness": "LPF measure (σ 0.01)",
}


def method_of(cell: object) -> str:
    """The method's short name from the trial's ``model`` cell (JSON text of the class path and arguments)."""
    value = json.loads(cell) if isinstance(cell, str) else cell
    return NAMES.get(value["class_path"].rsplit(".", 1)[-1], value["class_path"])


def landscapes(frame, sweep: str, output: str) -> str:
    """A 1-D random-direction loss curve of each method's seed-0 network, overlaid (flatlit landscape, cached)."""
    from flatlit.cli import main as flatlit

    paths, labels = [], []
    for method, row in frame[frame["seed_everything"] == 0].groupby("method"):
        ckpt = os.path.join(sweep, row.iloc[0]["run_dir"], "checkpoints", "final.ckpt")
        with open(os.path.join(os.path.dirname(ckpt), "measures.json")) as f:  # the measures' sample, the same here
            n = next(iter(json.load(f)["results"].values()))["sample"]["num_samples"]
        args = ["landscape", "--mode", "line", "--ckpt_path", ckpt, "--alphas", "-1:1:21"]
        flatlit([*args, "--num_samples", str(n), "--batch_size", "500", "--no_plot"])
        run_dir = os.path.dirname(os.path.dirname(ckpt))
        paths.append(max(glob.glob(os.path.join(run_dir, "landscapes", "line_final_*.npz")), key=os.path.getmtime))
        labels.append(method)
    return save(lines_figure(paths, labels), os.path.join(output, "landscapes.png"))


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = reproduction_parser("flat_optimizers", __doc__)
    args = p.parse_args(argv)
    frame = sweep_results(args.sweep, "flat_optimizers")
    frame["method"] = [method_of(c) for c in frame["model"]]
    intervals = group_intervals(frame.to_dict("records"), "method", list(COLUMNS))
    order = [m for m in NAMES.values() if m in intervals]
    sgd = intervals["SGD"]
    holds = {}
    for m in order[1:]:
        flatter = above(sgd["measure/hessian_top_eigenvalue"], intervals[m]["measure/hessian_top_eigenvalue"])
        not_worse = intervals[m]["final/test_acc"]["mean"] >= sgd["final/test_acc"]["low"]
        holds[m] = {"flatter_lambda_1": flatter, "test_acc_not_worse": not_worse, "holds": flatter and not_worse}
    ok = [h["holds"] for h in holds.values()]
    verdict = "reproduced" if ok and all(ok) else "partly" if any(ok) else "not reproduced"
    points = {m: {c: frame.loc[frame["method"] == m, c].astype(float).tolist() for c in COLUMNS} for m in order}
    named = {m: intervals[m] for m in order}
    panels = [(c, COLUMNS[c]) for c in ("final/test_acc", "measure/hessian_top_eigenvalue", "measure/hessian_trace")]
    fig = groups_figure(points, named, panels, "", "Flat-minima optimizers vs SGD, 10 epochs (Fashion-MNIST, LeNet)")
    figures = [save(fig, os.path.join(args.output, "flat_optimizers.png")), landscapes(frame, args.sweep, args.output)]
    numbers = {"intervals": named, "claim_per_method": holds}
    return report_verdict(args.output, CLAIM, PAPER, verdict, numbers, figures)


if __name__ == "__main__":
    main()
