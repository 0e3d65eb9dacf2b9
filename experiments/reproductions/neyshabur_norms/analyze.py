"""Neyshabur et al. 2017: which norms track the generalization gap, true vs random labels, growing training sets.

    python experiments/reproductions/neyshabur_norms/analyze.py \\
        [--sweep runs/reproductions/neyshabur_norms/sweep] [--output runs/reproductions/neyshabur_norms]

Claim (Neyshabur, Bhojanapalli, McAllester, Srebro, "Exploring generalization in deep learning", NeurIPS 2017, arXiv
1706.08947, Fig. 1): networks fitted to random labels (which cannot generalize) have much larger margin-normalised
norms than networks fitted to true labels, and the gap grows with the training-set size: the l2 norm and the
l1/l2 path norms over the margin track the generalization gap, while the plain parameter count does not. The
spectral norm over the margin alone separates them less clearly (their Fig. 1, right).

Per training-set size, each measure for true and random labels (one seed per point, as the paper's figure). A
measure *tracks* the gap when it is larger for random labels at every size, and the random/true ratio grows with
the size (monotonically, over the sizes). Verdict: *reproduced* when the l2 norm and both path norms track it;
*partly* when they are larger for random labels at every size without that monotone growth, or when some track it;
else *not reproduced*.
"""

from __future__ import annotations

import os

import numpy as np

from flatlit.analysis.verdict import report_verdict, reproduction_parser, sweep_results
from flatlit.figures.reproductions import series_figure
from flatlit.figures.style import save

CLAIM = (
    "Margin-normalised l2 and path norms are much larger for random labels than for true labels and the difference "
    "grows with the training-set size: they track the generalization gap"
)
PAPER = "Neyshabur et al. 2017, arXiv 1706.08947, Fig. 1"
SIZE, RANDOM = "data.init_args.train_subset", "data.init_args.random_labels"
MEASURES = {
    "measure/frobenius_norm_product": "log l2: Π‖W‖²_F / γ²",
    "measure/spectral_norm_product": "log spectral: Π‖W‖²₂ / γ²",
    "measure/path_norm_1": "l1-path / γ",
    "measure/path_norm_2": "l2-path² / γ²",
    "measure/expected_sharpness": "expected sharpness",
    "final/gen_gap_acc": "gap (train − test acc.)",
}
NEEDED = ("measure/frobenius_norm_product", "measure/path_norm_1", "measure/path_norm_2")
LOG = ("measure/frobenius_norm_product", "measure/spectral_norm_product")  # reported as logs by the measures


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = reproduction_parser("neyshabur_norms", __doc__)
    args = p.parse_args(argv)
    frame = sweep_results(args.sweep, "neyshabur_norms").sort_values(SIZE)
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    numbers: dict[str, object] = {"converged": {}, "measures": {}}
    sizes = sorted(frame[SIZE].astype(int).unique())
    for col in MEASURES:
        series[col] = {}
        for random in (False, True):
            part = frame[frame[RANDOM].astype(str).str.lower() == str(random).lower()]
            series[col]["random labels" if random else "true labels"] = (
                part[SIZE].astype(int).tolist(),
                part[col].astype(float).tolist(),
            )
    for random in (False, True):
        part = frame[frame[RANDOM].astype(str).str.lower() == str(random).lower()]
        numbers["converged"]["random" if random else "true"] = part["converged"].astype(str).tolist()
    tracks = {}
    for col in MEASURES:
        xs_t, true = series[col]["true labels"]
        xs_r, rand = series[col]["random labels"]
        if xs_t != xs_r or not true:
            continue
        t, r = np.asarray(true), np.asarray(rand)
        diff = r - t if col in LOG else np.log(np.maximum(r, 1e-300)) - np.log(np.maximum(t, 1e-300))
        larger = bool(np.all(r > t))
        growing = bool(np.all(np.diff(diff) > 0)) if len(diff) > 1 else False
        tracks[col] = {"larger_for_random": larger, "log_ratio_grows": growing, "tracks": larger and growing}
        numbers["measures"][col] = {"sizes": xs_t, "true": true, "random": rand, "log_ratio": diff.tolist()}
    ok = [tracks.get(c, {}).get("tracks", False) for c in NEEDED]
    larger = [tracks.get(c, {}).get("larger_for_random", False) for c in NEEDED]
    verdict = "reproduced" if all(ok) else "partly" if any(ok) or all(larger) else "not reproduced"
    numbers["tracks"] = tracks
    fig = series_figure(
        series, MEASURES, "training-set size", "Norms over the margin: true vs random labels (Fashion-MNIST, MLP)"
    )
    figure = save(fig, os.path.join(args.output, "neyshabur_norms.png"))
    numbers["sizes"] = [int(s) for s in sizes]
    return report_verdict(args.output, CLAIM, PAPER, verdict, numbers, [figure], tracks)


if __name__ == "__main__":
    main()
