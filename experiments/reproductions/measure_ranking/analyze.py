"""Measure ranking: which measures rank the generalization gap of a varied sweep, by overall and granulated τ.

    python experiments/reproductions/measure_ranking/analyze.py \\
        [--sweep runs/reproductions/measure_ranking/sweep] [--output runs/reproductions/measure_ranking]

Claims: (1) LPF-SGD (Bisla et al. 2022, arXiv 2201.08025, §5, SPEC §5.7) orders its measures by overall Kendall τ
with the gap as low-pass 0.606 > Frobenius 0.481 > PAC-Bayes 0.466 > ε-sharpness 0.383 (CIFAR-10, 2,916 ResNets);
(2) Jiang et al. 2019 (arXiv 1912.02178, Table 1/5) find the PAC-Bayes flatness measures (σ-based, magnitude-aware
best) and the optimization-based step counts among the best predictors by granulated τ (Ψ), and the spectral-norm
products among the worst (negative).

The sweep's runs carry Jiang et al.'s preset (``--preset jiang2019``); LPF-SGD's four are added here with
``flatlit measure --preset lpf2022 --measures low_pass fro_norm pac_bayes eps_flat`` (cached in each run's
measures.json). τ and Ψ against ``gen_gap_acc`` with 95 % bootstrap intervals (``flatlit.analysis
.correlation_table``). Verdict: *reproduced* when LPF's four come out in its order and a PAC-Bayes flatness measure
or a step count is among the five best of Jiang's by Ψ; *partly* when one holds; else *not reproduced*.
"""

from __future__ import annotations

import json
import os

from flatlit.analysis.correlation import correlation_table
from flatlit.analysis.verdict import report_verdict, reproduction_parser, sweep_results
from flatlit.figures.reproductions import ranking_figure
from flatlit.figures.style import save

CLAIM = (
    "LPF-SGD's ordering of measures by τ with the gap (low-pass > Frobenius > PAC-Bayes > ε-sharpness), and Jiang et "
    "al.'s PAC-Bayes flatness / step-count measures among the best by granulated τ"
)
PAPER = "Bisla et al. 2022 (arXiv 2201.08025, §5); Jiang et al. 2019 (arXiv 1912.02178, Tables 1, 5)"
LPF = ("low_pass", "fro_norm", "pac_bayes", "eps_flat")  # LPF-SGD's order (τ 0.606, 0.481, 0.466, 0.383)
JIANG_GOOD = {"pacbayes_flatness", "pacbayes_mag_flatness", "step_to_0.1", "step_0.1_to_0.01"}


def lpf_measures(sweep: str, run_dirs: list[str]) -> dict[str, dict[str, float]]:
    """LPF-SGD's four measures of each run's final network (``flatlit measure``, cached in its measures.json)."""
    from flatlit.cli.measure import main as measure

    out = {}
    for run_dir in run_dirs:
        ckpt = os.path.join(sweep, run_dir, "checkpoints", "final.ckpt")
        with open(os.path.join(os.path.dirname(ckpt), "measures.json")) as f:  # the sweep's sample size
            n = next(iter(json.load(f)["results"].values()))["sample"]["num_samples"]
        done = measure(["--ckpt_path", ckpt, "--preset", "lpf2022", "--measures", *LPF, "--num_samples", str(n)])
        out[run_dir] = {label: r["value"] for label, r in done.items()}
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = reproduction_parser("measure_ranking", __doc__)
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples of the intervals")
    args = p.parse_args(argv)
    frame = sweep_results(args.sweep, "measure_ranking")
    jiang = [c for c in frame.columns if c.startswith("measure/")]
    extra = lpf_measures(args.sweep, frame["run_dir"].tolist())
    for label in LPF:
        frame[f"measure/lpf_{label}"] = [extra[r].get(label) for r in frame["run_dir"]]
    lpf_cols = [f"measure/lpf_{label}" for label in LPF]
    table = correlation_table(frame, "gen_gap_acc", [*jiang, *lpf_cols], bootstrap=args.bootstrap)
    os.makedirs(args.output, exist_ok=True)
    table.to_csv(os.path.join(args.output, "ranking.csv"), index=False)
    by = table.set_index("measure")
    lpf_tau = {label: float(by.loc[f"lpf_{label}", "tau"]) for label in LPF}
    lpf_order = sorted(LPF, key=lambda m: -lpf_tau[m])
    jiang_rows = table[~table["measure"].str.startswith("lpf_")].sort_values("Psi", ascending=False)
    top5 = jiang_rows["measure"].head(5).tolist()
    checks = {
        "lpf_order_reproduced": lpf_order == list(LPF),
        "jiang_flatness_or_steps_in_top5": bool(JIANG_GOOD & set(top5)),
    }
    verdict = "reproduced" if all(checks.values()) else "partly" if any(checks.values()) else "not reproduced"
    figure = save(ranking_figure(table), os.path.join(args.output, "ranking.png"))
    gaps = frame["final/gen_gap_acc"].astype(float)
    numbers = {
        "runs": len(frame),
        "gap_range": [float(gaps.min()), float(gaps.max())],
        "lpf_tau": lpf_tau,
        "lpf_order_found": lpf_order,
        "jiang_top5_by_Psi": top5,
        "tau": {m: float(t) for m, t in zip(table["measure"], table["tau"])},
        "Psi": {m: float(t) for m, t in zip(table["measure"], table["Psi"])},
        "checks": checks,
    }
    shown = {k: numbers[k] for k in ("gap_range", "lpf_tau", "jiang_top5_by_Psi", "checks")}
    return report_verdict(args.output, CLAIM, PAPER, verdict, numbers, [figure], shown)


if __name__ == "__main__":
    main()
