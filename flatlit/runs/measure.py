"""Sharpness and complexity measures of a checkpoint, cached in ``measures.json`` (what ``flatlit measure`` runs).

The model and data are rebuilt from the run's saved ``config.yaml`` (``config`` to pass another), the checkpoint's
weights are loaded, and each measure runs on a fixed seeded sample of the training split (``num_samples``,
``seed``; the evaluation transform). Results go to ``measures.json`` beside the checkpoint after every measure, keyed
by (checkpoint content, measure, settings, sample): a second call computes only what is missing, and a call killed
half-way keeps what it finished. Progress goes to stderr (a bar on a terminal, a line per measure in a log file).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from flatlit.runs.load import (
    CheckpointOptions,
    load_init_state,
    load_run,
    read_results,
    sha256,
    to_device,
    write_json,
)
from flatlit.utils.batching import batch_size as batch_len
from flatlit.utils.errors import ConfigError

CACHE_VERSION = 2  # 2: spectral norms by verified Lanczos, folded θ₀ under bn="fold"


@dataclass
class MeasureOptions(CheckpointOptions):
    """What to compute: the flags of ``flatlit measure`` (:mod:`flatlit.cli.measure` documents each).

    ``measures`` None or empty: every registered measure (those that do not apply are skipped); ``settings``: the
    YAML/JSON text of a mapping measure -> {setting: value}.
    """

    measures: list[str] | None = None
    settings: str | None = None


def parse_settings(text: str | None) -> dict[str, dict[str, Any]]:
    """The ``--settings`` text (YAML or JSON): a mapping measure -> {setting: value}."""
    if not text:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--settings: not YAML/JSON ({str(err).splitlines()[0]}).") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(
            "--settings: expected a mapping measure -> {setting: value}, e.g. '{worst_case_l2: {rho: 0.05}}'."
        )
    return value


def _resolve_measures(names: list[str] | None, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from flatlit.sharpness import get_measure, list_measures

    names = list_measures() if not names else names
    for name in [*names, *settings]:
        try:
            spec = get_measure(name)
        except ValueError as err:
            raise ConfigError(f"--measures: {err}") from None
        unknown = sorted(set(settings.get(name, {})) - set(spec.defaults))
        if unknown:
            raise ConfigError(
                f"--settings.{name}: unknown setting(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(spec.defaults))}."
            )
    return {name: {**get_measure(name).defaults, **settings.get(name, {})} for name in names}


def measure_checkpoint(opts: MeasureOptions) -> tuple[dict[str, Any], dict[str, str], str]:
    """Compute (or read from the cache) the measures ``opts`` asks for.

    Returns:
        (results by measure name, reason by skipped measure name, the results file).

    Raises:
        ConfigError: a bad argument, checkpoint or config, or a measure that was asked for and does not apply.
    """
    for key in ("num_samples", "batch_size"):
        if getattr(opts, key) < 1:
            raise ConfigError(f"--{key}: must be >= 1, got {getattr(opts, key)}.")
    from flatlit.objective import resolve_objective
    from flatlit.sharpness import MeasureInputs, compute_measure
    from flatlit.sharpness.base import inapplicable_reason, observed, set_bn_policy

    measures = _resolve_measures(opts.measures, parse_settings(opts.settings))
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module, dm, run_dir, _ = load_run(opts.ckpt_path, opts.config, device, trust=opts.trust_code)
    dm.setup("fit")
    try:
        train = dm.curvature_batches(opts.num_samples, opts.batch_size, opts.seed)
    except ConfigError as err:
        raise ConfigError(f"--{err}") from None
    batches = [to_device(b, device) for b in train]
    test_batches = None
    if any(s.get("split") == "test" for s in measures.values()):
        dm.setup("test")
        test_batches, n = [], 0
        for batch in dm.test_dataloader():
            test_batches.append(to_device(batch, device))
            n += batch_len(batch)
            if n >= opts.num_samples:
                break
    init_path = os.path.join(run_dir, "model_init.ckpt")
    init_state = load_init_state(run_dir, device, trust=opts.trust_code)
    num_train = len(dm.train_indices) if getattr(dm, "train_indices", None) is not None else None
    # the module's own loss and logits (a flatlit family: its training_loss and accuracy_inputs; curvature_loss and
    # outputs_and_targets where defined), so batches of any structure work
    objective = resolve_objective(module, "flatlit measure")
    with observed(module):  # the loss must apply to the batches (one line otherwise); the module is left as it was
        set_bn_policy(module, "eval")
        objective.check(batches[0])
    inputs = MeasureInputs(
        module,
        batches,
        init_state=init_state,
        test_batches=test_batches,
        num_train=num_train,
        batch_loss=objective.loss_of,
        logits_fn=objective.logits_of,
    )
    skipped: dict[str, str] = {}
    for name, settings in measures.items():
        reason = inapplicable_reason(name, inputs, **settings)
        if reason is not None and opts.measures:
            raise ConfigError(f"--measures: {reason}")
        if reason is not None:
            skipped[name] = reason.replace(f"measure {name!r} ", "", 1)
    measures = {name: settings for name, settings in measures.items() if name not in skipped}

    output = opts.output or os.path.join(os.path.dirname(os.path.abspath(opts.ckpt_path)), "measures.json")
    digest = sha256(opts.ckpt_path)
    cache = None if opts.recompute else read_results(output, CACHE_VERSION, digest)
    cache = cache or {"version": CACHE_VERSION, "results": {}}
    cache["checkpoint"] = {"path": os.path.abspath(opts.ckpt_path), "sha256": digest}
    sample = {"num_samples": opts.num_samples, "batch_size": opts.batch_size, "seed": opts.seed}
    done: dict[str, Any] = {}
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # a bar on a terminal, a line per measure in a log file
    bar = tqdm(measures.items(), desc="measures", unit="measure", file=sys.stderr, disable=not tty)
    for i, (name, settings) in enumerate(bar):
        key = json.dumps({"measure": name, "settings": settings, "sample": sample}, sort_keys=True, default=str)
        if key in cache["results"]:
            done[name] = cache["results"][key]
            continue
        bar.set_description(f"measures ({name})")
        start = time.perf_counter()
        try:
            result = compute_measure(name, inputs, **settings)
        except ValueError as err:
            if "init_state" in str(err) and init_state is None:
                skipped[name] = f"no initial weights ({init_path} is missing)"
                continue
            raise ConfigError(f"--settings.{name}: {err}") from None
        entry = {**result.as_dict(), "seconds": time.perf_counter() - start, "sample": sample}
        if not tty:
            sys.stderr.write(
                f"measure {i + 1}/{len(measures)}: {name} = {result.value:.5g} ({entry['seconds']:.1f} s)\n"
            )
        cache["results"][key] = done[name] = entry
        write_json(output, cache)
    bar.close()
    write_json(output, cache)
    return done, skipped, output
