"""Sharpness and complexity measures of a checkpoint, cached in ``measures.json`` (what ``flatlit measure`` runs).

The model and data are rebuilt from the run's saved ``config.yaml`` (``config`` to pass another), the checkpoint's
weights are loaded, and each measure runs on a fixed seeded sample of the training split (``num_samples``,
``seed``; the evaluation transform). Results go to ``measures.json`` beside the checkpoint after every measure, keyed
by (checkpoint content, measure, settings, sample): a second call computes only what is missing, and a call killed
half-way keeps what it finished. Progress goes to stderr (a bar on a terminal, a line per measure in a log file).

The results of the call (cached and new) also go to the run's TensorBoard (:mod:`flatlit.runs.tensorboard`; one
stderr line instead when the run has none), at the checkpoint's global step: ``measures/<label>`` (the value; ``inf``
and ``nan`` as they are) and ``measures/<label>_se`` (its standard error, where the measure gives one). The label is
the key of the results (a preset's name for a measure, or a ``--settings`` label), not necessarily the measure's name.
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
from flatlit.sharpness.presets import MeasureEntry, measure_table, preset_measures
from flatlit.utils.batching import batch_size as batch_len
from flatlit.utils.errors import ConfigError

CACHE_VERSION = 2  # 2: spectral norms by verified Lanczos, folded θ₀ under bn="fold"


@dataclass
class MeasureOptions(CheckpointOptions):
    """What to compute: the flags of ``flatlit measure`` (:mod:`flatlit.cli.measure` documents each).

    ``measures`` None or empty: every registered measure (those that do not apply are skipped); ``settings``: the
    YAML/JSON text of a mapping label -> {setting: value} (an entry may name its ``measure``, so one measure can
    run under several labels and settings); ``preset``: a paper's measure set (:mod:`flatlit.sharpness.presets`),
    whose labels ``measures`` may select and whose free settings ``settings`` may change.
    """

    num_samples: int | None = None  # None: the preset's sample, else 1000
    batch_size: int | None = None  # None: the preset's, else 250
    measures: list[str] | None = None
    settings: str | None = None
    preset: str | None = None


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


def resolve_table(opts: MeasureOptions) -> list[MeasureEntry]:
    """The measure table ``opts`` asks for: the preset's (``--preset``), else ``--measures`` (default: every
    registered measure) with ``--settings`` (labels it adds with a ``measure`` key are run too)."""
    from flatlit.sharpness import list_measures

    settings = parse_settings(opts.settings)
    if opts.preset:
        return preset_measures(opts.preset, opts.measures, settings)
    names = list(opts.measures) if opts.measures else list_measures()
    out = []
    for name in names:  # a name with --settings is checked as a setting, a bare one as a measure
        owner = "--settings" if settings.get(name) else "--measures"
        out += measure_table({name: settings.get(name, {})}, owner)
    for label, value in settings.items():  # validated; run when they add a label naming its measure
        if label not in names:
            entry = measure_table({label: value}, "--settings")
            out += entry if isinstance(value, dict) and "measure" in value else []
    return out


def measure_checkpoint(opts: MeasureOptions) -> tuple[dict[str, Any], dict[str, str], str]:
    """Compute (or read from the cache) the measures ``opts`` asks for.

    Returns:
        (results by measure name, reason by skipped measure name, the results file).

    Raises:
        ConfigError: a bad argument, checkpoint or config, or a measure that was asked for and does not apply.
    """
    from flatlit.sharpness.presets import get_preset

    preset = get_preset(opts.preset) if opts.preset else None
    defaults = {"num_samples": 1000, "batch_size": 250, **(preset.sample if preset else {})}
    for key in ("num_samples", "batch_size"):
        if getattr(opts, key) is None:
            setattr(opts, key, defaults[key])
        if getattr(opts, key) < 1:
            raise ConfigError(f"--{key}: must be >= 1, got {getattr(opts, key)}.")
    from flatlit.objective import resolve_objective
    from flatlit.sharpness import MeasureInputs, compute_measure
    from flatlit.sharpness.base import inapplicable_reason, observed, set_bn_policy
    from flatlit.sharpness.records import read_record

    table = resolve_table(opts)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module, dm, run_dir, _ = load_run(opts.ckpt_path, opts.config, device, trust=opts.trust_code)
    records = [e for e in table if e.is_record]
    final = _run_records(opts.ckpt_path) if records else {}
    for e in records:  # before any measure runs: the run must have recorded what the table reads
        try:
            read_record(e.measure, e.settings, final)
        except ValueError as err:
            where = f"--preset {opts.preset}: {e.label}" if opts.preset else f"--measures: {e.label}"
            raise ConfigError(f"{where} {err}.") from None
    dm.setup("fit")
    try:
        train = dm.curvature_batches(opts.num_samples, opts.batch_size, opts.seed)
    except ConfigError as err:
        raise ConfigError(f"--{err}") from None
    batches = [to_device(b, device) for b in train]
    test_batches = None
    if any(e.settings.get("split") == "test" for e in table):
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
    for e in table:
        reason = None if e.is_record else inapplicable_reason(e.measure, inputs, **e.settings)
        if reason is not None and opts.measures and not preset:
            raise ConfigError(f"--measures: {reason}")
        if reason is not None:
            skipped[e.label] = reason.replace(f"measure {e.measure!r} ", "", 1)
    table = [e for e in table if e.label not in skipped]

    output = opts.output or os.path.join(os.path.dirname(os.path.abspath(opts.ckpt_path)), "measures.json")
    digest = sha256(opts.ckpt_path)
    cache = None if opts.recompute else read_results(output, CACHE_VERSION, digest)
    cache = cache or {"version": CACHE_VERSION, "results": {}}
    cache["checkpoint"] = {"path": os.path.abspath(opts.ckpt_path), "sha256": digest}
    if preset:
        cache.setdefault("presets", {})[preset.name] = preset.paper
    sample = {"num_samples": opts.num_samples, "batch_size": opts.batch_size, "seed": opts.seed}
    done: dict[str, Any] = {}
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # a bar on a terminal, a line per measure in a log file
    bar = tqdm(table, desc="measures", unit="measure", file=sys.stderr, disable=not tty)
    for i, e in enumerate(bar):
        what = {"measure": e.measure, "settings": e.settings, "sample": sample}
        if e.label != e.measure:
            what["label"] = e.label
        if preset:
            what["preset"] = preset.name
        key = json.dumps(what, sort_keys=True, default=str)
        if key in cache["results"] and not e.is_record:
            done[e.label] = cache["results"][key]
            continue
        bar.set_description(f"measures ({e.label})")
        start = time.perf_counter()
        try:
            if e.is_record:
                value, extra = read_record(e.measure, e.settings, final)
                result = {"name": e.measure, "value": value, "std_error": None, "cost": {}, "settings": e.settings}
                result["extra"] = extra
            else:
                result = compute_measure(e.measure, inputs, **e.settings).as_dict()
        except ValueError as err:
            if "init_state" in str(err) and init_state is None:
                skipped[e.label] = f"no initial weights ({init_path} is missing)"
                continue
            raise ConfigError(f"--settings.{e.label}: {err}") from None
        entry = {**result, "seconds": time.perf_counter() - start, "sample": sample}
        entry.update({k: what[k] for k in ("label", "preset") if k in what})
        if not tty:
            sys.stderr.write(
                f"measure {i + 1}/{len(table)}: {e.label} = {entry['value']:.5g} ({entry['seconds']:.1f} s)\n"
            )
        cache["results"][key] = done[e.label] = entry
        write_json(output, cache)
    bar.close()
    write_json(output, cache)
    _to_tensorboard(opts, done, output)
    return done, skipped, output


def _to_tensorboard(opts: MeasureOptions, done: dict[str, Any], output: str) -> None:
    """``measures/<label>`` and ``measures/<label>_se`` at the checkpoint's global step, in the run's TensorBoard."""
    from flatlit.runs.tensorboard import PosthocBoard

    board = PosthocBoard("measure", opts.ckpt_path, trust=opts.trust_code)
    for label, entry in done.items():
        board.scalar(f"measures/{label}", entry["value"])
        if entry.get("std_error") is not None:
            board.scalar(f"measures/{label}_se", entry["std_error"])
    board.write(os.path.basename(output))


def _run_records(ckpt_path: str) -> dict[str, Any]:
    """The run's ``final_metrics.json`` (GeneralizationTargets' records), {} when it has none."""
    from flatlit.runs.load import run_dir as run_dir_of

    path = os.path.join(run_dir_of(ckpt_path), "final_metrics.json")
    try:
        with open(path) as f:
            value = json.load(f)  # data only: never executes code
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
