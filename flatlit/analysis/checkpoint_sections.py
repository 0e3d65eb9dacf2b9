"""The report's sections on a checkpoint: its measures side by side, its robustness to weight noise and attacks,
and its loss landscapes (one figure per file, the runs' matching lines overlaid)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from flatlit import figures
from flatlit.analysis.render import Page, fmt, fmt_rel, pct, relative_difference
from flatlit.analysis.run_files import Run
from flatlit.analysis.stability import short_number


def _measure_rows(run: Run) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for key, r in sorted((run.measures or {}).get("results", {}).items()):
        if not isinstance(r, dict):
            continue
        name = r.get("name") or key
        ident = json.dumps({"settings": r.get("settings"), "sample": r.get("sample")}, sort_keys=True, default=str)
        out[(name, ident)] = r
    return out


def measures_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side measures table: one value column per run and, for each further run,
    its relative difference to the first run, (v − v₁)/|v₁|."""
    per_run = [_measure_rows(r) for r in runs]
    keys = sorted({k for m in per_run for k in m})
    names = [k[0] for k in keys]
    header = ["measure", *(r.label for r in runs)]
    header += [f"Δ {r.label} vs {runs[0].label}" for r in runs[1:]]
    rows = []
    for key in keys:
        name = key[0]
        if names.count(name) > 1:
            settings = json.loads(key[1]).get("settings") or {}
            name += (
                " (" + ", ".join(f"{k}={short_number(v)}" for k, v in sorted(settings.items()) if v is not None) + ")"
            )
        vals = [m.get(key) for m in per_run]
        row = [name] + [fmt(v.get("value"), v.get("std_error")) if v else "—" for v in vals]
        ref = vals[0].get("value") if vals[0] else None
        row += [fmt_rel(relative_difference(ref, v.get("value") if v else None)) for v in vals[1:]]
        rows.append(row)
    return header, rows


def section_measures(page: Page, runs: list[Run]) -> None:
    page.h2("Sharpness and complexity measures")
    have = [r for r in runs if r.measures and r.measures.get("results")]
    missing = [r.label for r in runs if r not in have]
    if missing:
        page.note(
            f"No checkpoints/measures.json for: {', '.join(missing)} (skipped; run `flatlit measure --ckpt_path "
            "RUN/checkpoints/last.ckpt`)."
        )
    if not have:
        return
    header, rows = measures_table(have)
    ckpts = "; ".join(
        f"{r.label}: {os.path.basename(str((r.measures.get('checkpoint') or {}).get('path', '?')))}" for r in have
    )
    cap = f"Measures of the checkpoints ({ckpts}), value ± standard error where the measure estimates one."
    if len(have) > 1:
        cap += f" Δ: relative difference to {have[0].label}, (v − v₁)/|v₁|."
    page.table(header, rows, cap)


def _floats(entries: list[dict[str, Any]], key: str) -> np.ndarray:
    """``entries[i][key]`` as floats, NaN where missing."""
    return np.array([float(e[key]) if isinstance(e.get(key), (int, float)) else np.nan for e in entries])


def section_robustness(page: Page, runs: list[Run]) -> None:
    page.h2("Robustness")
    have = [(i, r) for i, r in enumerate(runs) if r.robustness]
    missing = [r.label for r in runs if not r.robustness]
    if missing:
        page.note(
            f"No checkpoints/robustness.json for: {', '.join(missing)} (skipped; run `flatlit robustness "
            "--ckpt_path RUN/checkpoints/last.ckpt`)."
        )
    if not have:
        return
    labels = [r.label for _, r in have]
    clean = [(r.robustness.get("clean") or {}) for _, r in have]
    page.table(
        ["", *labels],
        [
            ["clean accuracy", *(pct(c.get("acc")) for c in clean)],
            ["clean loss", *(fmt(c.get("loss")) for c in clean)],
            ["samples", *(str(c.get("num_samples", "—")) for c in clean)],
        ],
        "Clean accuracy and loss of each checkpoint on the robustness sample.",
    )
    # weight noise
    curves: list[figures.NoiseCurve] = []
    wn_rows: dict[tuple[str, float], list[str]] = {}
    for j, (i, r) in enumerate(have):
        by_kind: dict[str, list[dict]] = {}
        for e in r.robustness.get("weight_noise") or []:
            by_kind.setdefault(str(e.get("kind", "noise")), []).append(e)
        for kind, es in sorted(by_kind.items()):
            es = sorted(es, key=lambda e: float(e.get("scale", 0)))
            scale, mean, std = (_floats(es, k) for k in ("scale", "acc_mean", "acc_std"))
            curves.append(figures.NoiseCurve(r.label, kind, scale, mean, np.nan_to_num(std), clean[j].get("acc"), i))
            for e in es:
                row = wn_rows.setdefault((kind, float(e["scale"])), ["—"] * len(have))
                row[j] = f"{100 * float(e['acc_mean']):.2f} ± {100 * float(e.get('acc_std') or 0):.2f} %"
    if curves:
        page.table(
            ["noise", "scale", *labels],
            [[k, f"{s:g}", *v] for (k, s), v in sorted(wn_rows.items())],
            "Accuracy under random weight noise, mean ± std over the draws.",
        )
        page.figure(
            figures.weight_noise_figure(curves),
            "robustness_weight_noise.png",
            "Accuracy when random noise of the given scale is added to the weights (mean ± std over draws, "
            "SmoothOut's evaluation); dotted: the clean accuracy. A flatter minimum typically loses less.",
        )
    # adversarial
    attacks: list[figures.Attack] = []
    adv_rows: dict[tuple[str, float, Any], list[str]] = {}
    for j, (i, r) in enumerate(have):
        by_attack: dict[str, list[dict]] = {}
        for e in r.robustness.get("adversarial") or []:
            by_attack.setdefault(str(e.get("attack", "attack")), []).append(e)
        for name, es in sorted(by_attack.items()):
            es = sorted(es, key=lambda e: float(e.get("eps", 0)))
            eps, acc = _floats(es, "eps"), _floats(es, "robust_acc")
            attacks.append(figures.Attack(r.label, name, eps, acc, i, clean[j].get("acc")))
            for e in es:
                row = adv_rows.setdefault((name, float(e["eps"]), e.get("steps")), ["—"] * len(have))
                row[j] = pct(e.get("robust_acc"))
    if attacks:
        page.table(
            ["attack", "ε", "steps", *labels],
            [
                [a, f"{e:.4g}", "—" if s is None else str(s), *v]
                for (a, e, s), v in sorted(adv_rows.items(), key=lambda kv: str(kv[0]))
            ],
            "Robust accuracy under adversarial input perturbations of radius ε.",
        )
        page.figure(
            figures.adversarial_figure(attacks),
            "robustness_adversarial.png",
            "Accuracy on adversarially perturbed inputs (ε in pixel units of [0, 1] images).",
        )
    if not curves and not attacks:
        page.note("robustness.json holds no weight-noise or adversarial results.")


def _meta(path: str) -> dict[str, Any]:
    """A landscape file's meta (plus ``_1d`` and ``_alphas``); empty when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"])) if "meta" in d else {}
            meta["_1d"] = "betas" not in d or np.asarray(d["betas"]).size == 0
            meta["_alphas"] = np.asarray(d["alphas"], dtype=float).round(12).tolist() if "alphas" in d else []
        return meta
    except Exception:
        return {}


#: meta entries that tell two runs' 1-D landscapes are the same measurement (everything but the checkpoints)
OVERLAY_KEYS = ("mode", "normalisation", "bias_bn", "bn", "num_samples", "sample_seed", "eigen_index", "_alphas")


def _landscape_caption(meta: dict[str, Any], stem: str, runs: list[Run], owner: Run) -> str:
    mode = meta.get("mode", "?")
    names = {os.path.abspath(os.path.join(r.path, "checkpoints")): r.label for r in runs}

    def who(ckpt: str) -> str:
        label = names.get(os.path.dirname(os.path.abspath(ckpt)))
        return f"{label} [{os.path.basename(ckpt)}]" if label else ckpt

    ckpts = meta.get("checkpoints") or []
    n = meta.get("num_samples")
    sample = f" on {n} training examples" if n else ""
    if mode == "interpolate" and len(ckpts) == 2:
        return (
            f"Training loss and accuracy{sample} along the straight line θ(α) = (1 − α)θ_A + αθ_B from A = "
            f"{who(ckpts[0])} at α = 0 to B = {who(ckpts[1])} at α = 1 ({stem}.npz)."
        )
    if mode == "eigen":
        where = f"along Hessian eigenvector e{meta.get('eigen_index', '?')}"
    elif mode == "plane":
        where = "on a plane of two random filter-normalised directions"
    else:
        where = "along a random filter-normalised direction"
    return f"{owner.label}: training loss and accuracy{sample} {where} ({stem}.npz)."


def section_landscapes(page: Page, runs: list[Run]) -> None:
    page.h2("Loss landscapes")
    have = [(i, r) for i, r in enumerate(runs) if r.landscapes]
    missing = [r.label for r in runs if not r.landscapes]
    if missing:
        page.note(
            f"No landscapes/*.npz for: {', '.join(missing)} (skipped; run `flatlit landscape --ckpt_path "
            "RUN/checkpoints/last.ckpt`)."
        )
    if not have:
        return
    try:
        from flatlit.figures import landscape as lplots
    except Exception as err:
        page.note(f"Landscapes found but flatlit.figures.landscape is unavailable ({type(err).__name__}: {err}).")
        return
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, r in have:
        for path in r.landscapes:
            stem = os.path.splitext(os.path.basename(path))[0]
            meta = _meta(path)
            out = f"landscape_run{i + 1}_{_slug(stem)}.png"
            try:
                written = lplots.plot_landscape_file(path, os.path.join(page.outdir, out))
            except Exception as err:
                page.note(f"{r.label}: landscapes/{stem}.npz could not be drawn ({type(err).__name__}: {err}).")
                continue
            caption = _landscape_caption(meta, stem, runs, r)
            for w in written or []:
                page.add_file(os.path.basename(w), caption)
            if meta.get("_1d") and meta.get("mode") != "interpolate":
                key = json.dumps({k: meta.get(k) for k in OVERLAY_KEYS}, sort_keys=True, default=str)
                groups.setdefault(key, []).append((i, path))
    # the runs' 1-D landscapes measured the same way, overlaid
    for n, (key, items) in enumerate(sorted(groups.items())):
        if len({i for i, _ in items}) < 2:
            continue
        mode = json.loads(key).get("mode", "line")
        out = f"landscape_overlay_{n + 1}_{_slug(str(mode))}.png"
        try:
            lplots.plot_lines([p for _, p in items], [runs[i].label for i, _ in items], os.path.join(page.outdir, out))
        except Exception as err:
            page.note(f"The {mode} landscapes could not be overlaid ({type(err).__name__}: {err}).")
            continue
        page.add_file(
            out,
            f"The runs' {mode} landscapes overlaid (same grid, sample and seeded direction, normalised to each run's "
            "weights).",
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"
