"""Minimum sharpness (the CS-439 seed): invariance under layer rescaling, and SGD vs SAM, verdict.json.

    python experiments/reproductions/minimum_sharpness/analyze.py \\
        [--sweep runs/reproductions/minimum_sharpness/sweep] [--output runs/reproductions/minimum_sharpness]

Claims (the CS-439 "Minimum Sharpness" project after Ibayashi, Hamaguchi, Imaizumi 2021, arXiv 2106.12612; SPEC §2):
(a) minimum sharpness is invariant under the rescalings a ReLU network admits (hidden layer ×α, next layer ×1/α:
the same function), while λ₁ and Keskar's ε-sharpness are not; (b) on Fashion-MNIST SAM ends with a lower minimum
sharpness than standard training (3-20× in the seed's results) and a higher validation accuracy.

(a) is checked on the first SGD network (seed 0): each measure at α ∈ {1/4, 1/2, 1, 2, 4} over its value at α = 1.
(b) compares SGD (ρ = 0) and SAM (ρ = 0.05) over 3 seeds (means with 95 % t-intervals), for every measure.
Verdict: *reproduced* when minimum sharpness stays within 1 % across α while λ₁ and ε-sharpness change by > 10 %,
and SAM's minimum-sharpness interval lies below SGD's; *partly* when one of the two holds; else *not reproduced*.
"""

from __future__ import annotations

import copy
import glob
import os

import torch

from flatlit.analysis.verdict import above, group_intervals, report_verdict, reproduction_parser, sweep_results
from flatlit.figures.reproductions import groups_figure, rescaling_figure
from flatlit.figures.style import save

CLAIM = (
    "Minimum sharpness is invariant under layer rescaling (λ₁ and ε-sharpness are not), and SAM ends with a lower "
    "minimum sharpness than SGD on Fashion-MNIST"
)
PAPER = "CS-439 Minimum Sharpness (Ibayashi et al. 2021, arXiv 2106.12612), SPEC §2.3-2.4"
RHO = "model.init_args.rho"
MEASURES = {
    "minimum_sharpness": "minimum sharpness",
    "hessian_top_eigenvalue": "λ₁",
    "keskar_sharpness": "ε-sharpness (Keskar, %)",
}
ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
SETTINGS = {"keskar_sharpness": {"eps": 5e-4, "maxiter": 10}}


def rescaled(module: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """A copy computing the same function: the first Linear layer (weight and bias) ×α, the next one's weight ×1/α
    (ReLU is positively homogeneous)."""
    out = copy.deepcopy(module)
    layers = [m for m in out.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        layers[0].weight.mul_(alpha)
        if layers[0].bias is not None:
            layers[0].bias.mul_(alpha)
        layers[1].weight.div_(alpha)
    return out


def rescaling(ckpt: str, num_samples: int) -> dict[str, dict[str, float]]:
    """Each measure at each α, on the checkpoint's network and a fixed training sample."""
    from flatlit.objective import resolve_objective
    from flatlit.runs.load import load_run
    from flatlit.sharpness import MeasureInputs, compute_measure

    module, dm, _, _ = load_run(ckpt)
    dm.setup("fit")
    batches = list(dm.curvature_batches(min(num_samples, len(dm.train_indices)), 250, 0))
    out: dict[str, dict[str, float]] = {name: {} for name in MEASURES}
    losses = {}
    for alpha in ALPHAS:
        net = rescaled(module, alpha)
        objective = resolve_objective(net, "minimum_sharpness reproduction")
        inputs = MeasureInputs(net, batches, batch_loss=objective.loss_of, logits_fn=objective.logits_of)
        losses[alpha] = inputs.sample_loss()
        for name in MEASURES:
            out[name][str(alpha)] = compute_measure(name, inputs, **SETTINGS.get(name, {})).value
    spread = max(losses.values()) - min(losses.values())
    assert spread < 1e-4 * max(1.0, abs(losses[1.0])), f"rescaling changed the loss by {spread}"
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = reproduction_parser("minimum_sharpness", __doc__)
    p.add_argument("--num_samples", type=int, default=1000, help="training sample of the rescaling check")
    args = p.parse_args(argv)
    frame = sweep_results(args.sweep, "minimum_sharpness")
    sgd = frame[frame[RHO] == 0.0].sort_values("seed_everything")
    ckpt = glob.glob(os.path.join(args.sweep, sgd.iloc[0]["run_dir"], "checkpoints", "final.ckpt"))[0]
    scaled = rescaling(ckpt, args.num_samples)
    ratios = {n: {a: v / scaled[n]["1.0"] for a, v in values.items()} for n, values in scaled.items()}
    change = {n: max(abs(r - 1.0) for r in rs.values()) for n, rs in ratios.items()}
    invariant = (
        change["minimum_sharpness"] < 0.01 and min(change["hessian_top_eigenvalue"], change["keskar_sharpness"]) > 0.1
    )

    columns = [f"measure/{n}" for n in MEASURES] + ["final/test_acc", "final/gen_gap_acc"]
    intervals = group_intervals(frame.to_dict("records"), RHO, columns)
    g_sgd, g_sam = (str(r) for r in sorted(frame[RHO].unique()))
    lower = {n: above(intervals[g_sgd][f"measure/{n}"], intervals[g_sam][f"measure/{n}"]) for n in MEASURES}
    sam_better_acc = above(intervals[g_sam]["final/test_acc"], intervals[g_sgd]["final/test_acc"])
    ok = [invariant, lower["minimum_sharpness"]]
    verdict = "reproduced" if all(ok) else "partly" if any(ok) else "not reproduced"

    fig_a = save(rescaling_figure(ratios, MEASURES), os.path.join(args.output, "rescaling.png"))
    names = {g_sgd: "SGD (ρ = 0)", g_sam: f"SAM (ρ = {g_sam})"}
    points = {
        names[g]: {c: frame.loc[frame[RHO].astype(str) == g, c].astype(float).tolist() for c in columns}
        for g in (g_sgd, g_sam)
    }
    named = {names[g]: intervals[g] for g in (g_sgd, g_sam)}
    panels = [(f"measure/{n}", label) for n, label in MEASURES.items()] + [("final/test_acc", "test accuracy")]
    fig_b = save(
        groups_figure(points, named, panels, "", "SGD vs SAM on Fashion-MNIST (MLP, 3 seeds)"),
        os.path.join(args.output, "sgd_vs_sam.png"),
    )
    numbers = {
        "rescaling_values": scaled,
        "rescaling_max_relative_change": change,
        "invariant": invariant,
        "intervals": named,
        "sam_lower": lower,
        "sam_higher_test_acc": sam_better_acc,
    }
    return report_verdict(args.output, CLAIM, PAPER, verdict, numbers, [fig_a, fig_b])


if __name__ == "__main__":
    main()
