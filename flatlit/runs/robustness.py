"""Weight-noise and adversarial robustness of a checkpoint, cached in ``robustness.json`` (``flatlit robustness``).

The model and data are rebuilt from the run's saved ``config.yaml`` (``config`` to pass another) and the
checkpoint's weights are loaded. Everything is measured on one fixed seeded sample of the test split
(``num_samples``, ``seed``; the evaluation transform): the clean accuracy and loss; for each noise kind and scale,
the accuracy and loss of ``draws`` networks with noisy weights (mean ± std; SmoothOut's ``evaluate.py --ss``); for
each attack and ε, the robust accuracy (foolbox, in [0, 1] pixel space, ε in pixel units: ``--eps`` for the L∞
attacks fgsm and pgd_linf, ``--eps_l2`` for pgd_l2). See docs/robustness.md and :mod:`flatlit.landscape.robustness`.

The loss is the module's own, by flatlit's one resolution order (:func:`flatlit.objective.resolve_objective`:
``curvature_loss`` where the module defines it, else a flatlit family's ``training_loss``), on batches of any
structure, and the accuracy that of its class logits (a family's ``accuracy_inputs``: token accuracy for a sequence
model; ``NaN`` for a module without them). The attacks need image batches ``(x, y)`` whose outputs are the class
logits the accuracy counts: on other batches (e.g. a sequence-to-sequence task's dicts), asking for an attack is an
error (one line), and the default attacks are skipped with one line each.

Results go to ``robustness.json`` beside the checkpoint after every entry, cached by (checkpoint content, entry,
sample): a second call computes only what is missing, and a call killed half-way keeps what it finished. Progress
goes to stderr: a bar with an ETA on a terminal, else one line per computed entry with its time and the ETA. The
arguments are those of the command (:class:`RobustnessOptions`); bad ones raise one
:class:`~flatlit.utils.errors.ConfigError`.

The results of the call (cached and new) also go to the run's TensorBoard (:mod:`flatlit.runs.tensorboard`; one
stderr line instead when the run has none), every value at the checkpoint's global step, one tag per scale and ε (so
the checkpoints of a run make curves over training, and the scales need no step of their own):

- ``robustness/clean/acc``, ``robustness/clean/loss``: the clean sample;
- ``robustness/<kind>_noise/scale_<s>/acc``, ``.../acc_std``, ``.../loss``: weight noise of kind ``uniform`` or
  ``multiplicative`` at scale ``s`` (``%g``): the mean accuracy over the draws, its std, the mean loss;
- ``robustness/<attack>/eps_<ε>/acc``: the robust accuracy under ``fgsm``, ``pgd_linf`` or ``pgd_l2`` at ``ε``
  (``%g``, pixel units);
- images ``robustness/weight_noise`` and ``robustness/adversarial``: the report's two figures
  (:mod:`flatlit.figures.robustness`), where the call has entries of that part.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from flatlit.landscape.robustness import ATTACK_NORMS, ATTACKS, DEFAULT_STEPS, NOISE_KINDS
from flatlit.runs.load import CheckpointOptions, load_run, read_results, sha256, write_json
from flatlit.utils.errors import ConfigError

FORMAT_VERSION = 1
DEFAULT_SCALES = ("0.001", "0.003", "0.006", "0.01", "0.03", "0.1")


@dataclass
class RobustnessOptions(CheckpointOptions):
    """What to compute: the flags of ``flatlit robustness`` (:mod:`flatlit.cli.robustness` documents each).

    ``noise``/``attacks`` None: every kind/attack (the attacks skipped where they do not apply); empty: none.
    """

    noise: Sequence[str] | None = None
    scales: Sequence[str] = DEFAULT_SCALES
    draws: int = 5
    attacks: Sequence[str] | None = None
    eps: Sequence[str] = ("8/255",)
    eps_l2: Sequence[str] = ("0.5",)
    steps: int = DEFAULT_STEPS


# ---- arguments -------------------------------------------------------------------------------------------------------
def _numbers(name: str, values: Sequence[str]) -> list[float]:
    """Finite numbers >= 0 (fractions such as 8/255 allowed), deduplicated in order."""
    out: list[float] = []
    for text in values:
        try:
            value = float(Fraction(text.strip()))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--{name}: {text!r} is not a number (e.g. 0.5 or 8/255).") from None
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"--{name}: must be >= 0, got {text}.")
        if value not in out:
            out.append(value)
    return out


def _choices(name: str, what: str, values: Sequence[str], known: tuple[str, ...]) -> list[str]:
    for v in values:
        if v not in known:
            raise ConfigError(f"--{name}: unknown {what} {v!r}; choose from {', '.join(known)}.")
    return list(dict.fromkeys(values))


def _plan(opts: RobustnessOptions) -> list[dict[str, Any]]:
    """The entries to compute, in order: clean, weight noise per (kind, scale), adversarial per (attack, ε)."""
    if not opts.ckpt_path:
        raise ConfigError("--ckpt_path: required (the checkpoint to evaluate); see `flatlit robustness --help`.")
    kinds = _choices("noise", "noise kind", list(NOISE_KINDS) if opts.noise is None else opts.noise, NOISE_KINDS)
    attacks = _choices("attacks", "attack", list(ATTACKS) if opts.attacks is None else opts.attacks, ATTACKS)
    scales, eps, eps_l2 = _numbers("scales", opts.scales), _numbers("eps", opts.eps), _numbers("eps_l2", opts.eps_l2)
    for key in ("draws", "steps", "num_samples", "batch_size"):
        if getattr(opts, key) < 1:
            raise ConfigError(f"--{key}: must be >= 1, got {getattr(opts, key)}.")
    plan: list[dict[str, Any]] = [{"part": "clean"}]
    plan += [{"part": "weight_noise", "kind": k, "scale": s, "draws": opts.draws} for k in kinds for s in scales]
    for a in attacks:
        steps = None if a == "fgsm" else opts.steps
        radii = eps_l2 if ATTACK_NORMS[a] == "l2" else eps
        plan += [{"part": "adversarial", "attack": a, "eps": e, "steps": steps} for e in radii]
    return plan


# ---- data ------------------------------------------------------------------------------------------------------------
def sample_test_split(dm: Any, num_samples: int, batch_size: int, seed: int) -> list[Any]:
    """A fixed seeded sample of the test split (sorted positions of a seeded permutation) with the evaluation
    transform, as CPU batches: (x, y) for image data, else as the test loader's ``collate_fn`` makes them (e.g. dicts);
    only the sampled examples are read."""
    from torch.utils.data import DataLoader, Subset

    dm.setup("fit")  # the normalisation statistics of training ('center' computes them from the training split)
    dm.setup("test")
    loader = dm.test_dataloader()
    in_memory = not isinstance(loader, DataLoader)  # flatlit's InMemoryLoader: images, targets and its transform
    n = len(loader.targets) if in_memory else len(loader.dataset)
    if not 1 <= num_samples <= n:
        raise ConfigError(
            f"--num_samples: asked for {num_samples} test examples but the test split holds {n}; "
            f"choose a value in [1, {n}]."
        )
    pos = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_samples].sort().values
    if in_memory:
        images, targets = loader.images[pos.to(loader.images.device)], loader.targets[pos.to(loader.targets.device)]
        return [
            (loader.transform(images[i : i + batch_size]).cpu(), targets[i : i + batch_size].cpu())
            for i in range(0, num_samples, batch_size)
        ]
    sub = DataLoader(
        Subset(loader.dataset, pos.tolist()),
        batch_size=batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )
    return [tuple(b) if isinstance(b, list) and len(b) == 2 else b for b in sub]


# ---- cache -----------------------------------------------------------------------------------------------------------
def _describe(item: dict[str, Any]) -> str:
    if item["part"] == "clean":
        return "clean"
    if item["part"] == "weight_noise":
        return f"{item['kind']} noise s={item['scale']:g}"
    return f"{item['attack']} eps={item['eps']:.4g}"


def _load_inputs(opts: RobustnessOptions) -> dict[str, Any]:
    """The checkpoint's module, the fixed test sample on its device, the DataModule's normalisation, the module's
    loss and logits (checked on one batch) and why the attacks do not apply (None when they do)."""
    from lightning.fabric.utilities.apply_func import apply_to_collection

    from flatlit.landscape.evaluation import evaluation_functions
    from flatlit.landscape.robustness import attack_inapplicable_reason
    from flatlit.objective import resolve_objective
    from flatlit.sharpness.base import observed

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module, dm, _, _ = load_run(opts.ckpt_path, opts.config, device, trust=opts.trust_code)
    sample = sample_test_split(dm, opts.num_samples, opts.batch_size, opts.seed)
    batches = [apply_to_collection(b, torch.Tensor, lambda t: t.to(device)) for b in sample]
    objective = resolve_objective(module, "flatlit robustness")
    with observed(module):  # the loss must apply to the batches (one line otherwise); the module is left as it was
        module.eval()
        objective.check(batches[0])
    functions = evaluation_functions(objective, batches[0])
    if functions.no_accuracy is not None:
        sys.stderr.write(f"robustness: {functions.no_accuracy}; accuracies are NaN.\n")
    return {
        "module": module,
        "batches": batches,
        "normalization": getattr(dm, "normalization", None),
        "batch_loss": functions.batch_loss,
        "logits_fn": functions.logits_fn,
        "attack_reason": attack_inapplicable_reason(module, batches[0], functions.logits_fn),
    }


def _compute(item: dict[str, Any], inputs: dict[str, Any], opts: RobustnessOptions) -> dict[str, Any]:
    from flatlit.landscape import robustness as R

    module, batches = inputs["module"], inputs["batches"]
    fns = {"batch_loss": inputs["batch_loss"], "logits_fn": inputs["logits_fn"]}
    if item["part"] == "clean":
        return R.accuracy_and_loss(module, batches, **fns).as_dict()
    if item["part"] == "weight_noise":
        return R.weight_noise_robustness(
            module, batches, item["kind"], item["scale"], item["draws"], opts.seed, **fns
        ).as_dict()
    return R.adversarial_robustness(
        module, batches, item["attack"], item["eps"], inputs["normalization"], opts.steps, opts.seed
    ).as_dict()


def _without_attacks(
    plan: list[dict[str, Any]], keys: list[str], opts: RobustnessOptions, reason: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The plan without its adversarial entries, which cannot run (``reason``): asked for with ``--attacks``, one
    error line; part of the default list, one line per skipped attack."""
    attacks = list(dict.fromkeys(item["attack"] for item in plan if item["part"] == "adversarial"))
    if attacks and opts.attacks is not None:
        raise ConfigError(
            f"--attacks: {', '.join(attacks)}: {reason}; leave them out (--attacks with no value runs none)."
        )
    for attack in attacks:
        sys.stderr.write(f"robustness: skipped {attack}: {reason}.\n")
    kept = [(item, key) for item, key in zip(plan, keys) if item["part"] != "adversarial"]
    return [item for item, _ in kept], [key for _, key in kept]


def evaluate_robustness(opts: RobustnessOptions) -> tuple[dict[str, Any], str]:
    """Compute (or read from the cache) the entries ``opts`` asks for; returns the results and the file written."""
    plan = _plan(opts)
    output = opts.output or os.path.join(os.path.dirname(os.path.abspath(opts.ckpt_path)), "robustness.json")
    digest = sha256(opts.ckpt_path) if os.path.isfile(opts.ckpt_path) else None
    data = None if opts.recompute or digest is None else read_results(output, FORMAT_VERSION, digest)
    cache = dict(data["cache"]) if data and isinstance(data.get("cache"), dict) else {}
    sample = {"split": "test", "num_samples": opts.num_samples, "batch_size": opts.batch_size, "seed": opts.seed}
    keys = [json.dumps({**item, "sample": sample}, sort_keys=True) for item in plan]
    # the model and data are loaded only when something is missing (this also checks the checkpoint and
    # --num_samples before any work): a fully cached call reads the checkpoint's bytes and nothing else
    inputs = _load_inputs(opts) if any(k not in cache for k in keys) else None
    if inputs is not None and inputs["attack_reason"] is not None:
        plan, keys = _without_attacks(plan, keys, opts, inputs["attack_reason"])
    result: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "checkpoint": {"path": os.path.abspath(opts.ckpt_path), "sha256": digest},
        "clean": None,
        "weight_noise": [],
        "adversarial": [],
        "cache": cache,
    }
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # a bar on a terminal, a line per entry in a log file
    bar = tqdm(total=len(plan), desc="robustness", unit="entry", file=sys.stderr, disable=not tty)
    todo, done, spent = sum(k not in cache for k in keys), 0, 0.0  # the ETA counts the entries to compute only
    for i, (item, key) in enumerate(zip(plan, keys)):
        entry = cache.get(key)
        if entry is None:
            bar.set_description(f"robustness ({_describe(item)})")
            start = time.perf_counter()
            entry = cache[key] = _compute(item, inputs, opts)
            seconds = time.perf_counter() - start
            todo, done, spent = todo - 1, done + 1, spent + seconds
            if not tty:
                eta = spent / done * todo
                sys.stderr.write(
                    f"robustness {i + 1}/{len(plan)}: {_describe(item)} ({seconds:.1f} s, ETA {eta:.0f} s)\n"
                )
        if item["part"] == "clean":
            result["clean"] = entry
        else:
            result[item["part"]].append(entry)
        write_json(output, result)
        bar.update(1)
    bar.close()
    _to_tensorboard(opts, result, output)
    return result, output


def _to_tensorboard(opts: RobustnessOptions, result: dict[str, Any], output: str) -> None:
    """The call's results in the run's TensorBoard, in the layout of the module docstring."""
    import numpy as np

    from flatlit.figures.robustness import Attack, NoiseCurve, adversarial_figure, weight_noise_figure
    from flatlit.runs.tensorboard import PosthocBoard

    board = PosthocBoard("robustness", opts.ckpt_path, trust=opts.trust_code)
    if board.available:
        clean = result["clean"] or {}
        for key in ("acc", "loss"):
            if key in clean:
                board.scalar(f"robustness/clean/{key}", clean[key])
        for e in result["weight_noise"]:
            tag = f"robustness/{e['kind']}_noise/scale_{e['scale']:g}"
            for name, key in (("acc", "acc_mean"), ("acc_std", "acc_std"), ("loss", "loss_mean")):
                board.scalar(f"{tag}/{name}", e[key])
        for e in result["adversarial"]:
            board.scalar(f"robustness/{e['attack']}/eps_{e['eps']:g}/acc", e["robust_acc"])
        label = os.path.splitext(os.path.basename(opts.ckpt_path))[0]

        def column(entries: list[dict[str, Any]], key: str) -> np.ndarray:
            return np.array([float(e[key]) for e in entries], dtype=float)

        curves, attacks = [], []
        for kind in dict.fromkeys(e["kind"] for e in result["weight_noise"]):
            es = sorted((e for e in result["weight_noise"] if e["kind"] == kind), key=lambda e: e["scale"])
            std = np.nan_to_num(column(es, "acc_std"))
            curves.append(NoiseCurve(label, kind, column(es, "scale"), column(es, "acc_mean"), std, clean.get("acc")))
        for attack in dict.fromkeys(e["attack"] for e in result["adversarial"]):
            es = sorted((e for e in result["adversarial"] if e["attack"] == attack), key=lambda e: e["eps"])
            attacks.append(Attack(label, attack, column(es, "eps"), column(es, "robust_acc"), 0, clean.get("acc")))
        if curves:
            board.figure("robustness/weight_noise", weight_noise_figure(curves))
        if attacks:
            board.figure("robustness/adversarial", adversarial_figure(attacks))
    board.write(os.path.basename(output))
