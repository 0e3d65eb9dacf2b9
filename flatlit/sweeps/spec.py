"""The sweep file: parsing, checks that need no LightningCLI, and the expansion into trials.

Schema (docs/sweeps.md has the full manual)::

    name: width_lr                     # default: the file's stem
    config: ../quickstart/fashion_mnist_fit.yaml   # base experiment(s), relative to this file (a list composes)
    output: ../../runs/sweeps/width_lr # default: runs/sweeps/<name> next to this file
    grid:                              # dotted LightningCLI key -> non-empty list of values
      seed_everything: [0, 1]
      model.init_args.optimizer.init_args.lr: [0.01, 0.05]
    random:                            # seeded draws, shared by every grid point
      num_trials: 4
      seed: 0
      space:
        data.init_args.label_noise: {low: 0.0, high: 0.5}
        model.init_args.arch_kwargs.width: {low: 8, high: 512, log: true}   # ints when both bounds are ints
        model.init_args.arch: {choices: [mlp, lenet]}
    measures: {margin: {}, sam_sharpness: {rho: 0.05}}   # or a list of names; run by `flatlit measure`
    preset: jiang2019                  # a paper's measure set (`flatlit measure --preset`); measures: then selects
    num_samples: 1000                  # the measures' sample
    generalization: {stop_loss: 0.01}  # GeneralizationTargets arguments (the callback every trial gets)
    slurm: {partition: gpu, timeout_min: 240, gpus_per_node: 1, cpus_per_task: 8, array_parallelism: 16}

Trials are the grid points (``itertools.product`` in the file's key order, the last key varying fastest), times the
random draws when both are given (draw-major: trial ``d * G + g``). Draws use Python's ``random.Random(seed)``, whose
stream is fixed across Python versions, so a sweep file always expands to the same trials.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import yaml

from flatlit.utils.errors import ConfigError

TOP_KEYS = (
    "name",
    "config",
    "output",
    "grid",
    "random",
    "measures",
    "preset",
    "num_samples",
    "generalization",
    "slurm",
)
RANDOM_KEYS = ("num_trials", "seed", "space")
SPACE_KEYS = ("low", "high", "log", "type", "choices")


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: its position in the expansion and its hyperparameters (dotted key -> value)."""

    index: int
    params: dict[str, Any]

    @property
    def key(self) -> str:
        """Canonical text of the hyperparameters: a trial's identity across reruns of the sweep."""
        return params_key(self.params)


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


@dataclass
class SweepSpec:
    """A parsed sweep file; paths are absolute."""

    path: str
    name: str
    configs: list[str]
    output: str
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    random_trials: int = 0
    random_seed: int = 0
    measures: dict[str, dict[str, Any]] = field(default_factory=dict)
    preset: str | None = None
    num_samples: int = 1000
    generalization: dict[str, Any] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def measure_labels(self) -> list[str]:
        """The labels of the measures every trial gets (``measure/<label>`` columns): the preset's (those
        ``measures`` selects) or ``measures``'."""
        if self.preset:
            from flatlit.sharpness.presets import get_preset

            return list(self.measures) or [e.label for e in get_preset(self.preset).entries]
        return list(self.measures)

    @property
    def has_measures(self) -> bool:
        return bool(self.measures or self.preset)

    @property
    def keys(self) -> list[str]:
        """The swept keys, grid first."""
        return [*self.grid, *self.random_space]


def load_spec(path: str, output: str | None = None) -> SweepSpec:
    """Read and check a sweep file (everything that needs no LightningCLI); ConfigError names the key."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no sweep file at {path!r}.")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"--config: {path!r} is not YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path!r} must be a mapping with at least `config:` and `grid:` or `random:`.")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown sweep key; accepted: {', '.join(TOP_KEYS)}.")
    here = os.path.dirname(os.path.abspath(path))
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"name: {name!r} must be a plain folder name.")
    configs = raw.get("config")
    if isinstance(configs, str):
        configs = [configs]
    if not configs or not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise ConfigError(
            "config: required: the base experiment config (a path relative to the sweep file, or a list)."
        )
    configs = [os.path.normpath(os.path.join(here, c)) for c in configs]
    for c in configs:
        if not os.path.isfile(c):
            raise ConfigError(f"config: no file at {c!r}.")
    out = os.path.abspath(output) if output else os.path.join(here, raw.get("output") or f"runs/sweeps/{name}")
    spec = SweepSpec(path=os.path.abspath(path), name=name, configs=configs, output=os.path.normpath(out))
    spec.grid = _grid(raw.get("grid"))
    _random(raw.get("random"), spec)
    both = sorted(set(spec.grid) & set(spec.random_space))
    if both:
        raise ConfigError(f"random.space.{both[0]}: also in grid; sweep each key one way.")
    if not spec.grid and not spec.random_trials:
        raise ConfigError("grid: empty; the sweep has no trials (give grid values or a random search).")
    spec.measures = _measures(raw.get("measures"))
    preset = raw.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"preset: a preset name (e.g. jiang2019), got {preset!r}.")
    spec.preset = preset
    spec.num_samples = _int(raw.get("num_samples", 1000), "num_samples", 1)
    spec.generalization = _mapping(raw.get("generalization"), "generalization")
    spec.slurm = _mapping(raw.get("slurm"), "slurm")
    return spec


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}.")
    return dict(value)


def _int(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}: expected an integer >= {low}, got {value!r}.")
    return value


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key or key.startswith("-") or " " in key:
        raise ConfigError(f"{where}.{key}: a sweep key is a dotted LightningCLI key such as model.init_args.arch.")
    if key.split(".")[0] in ("ckpt_path", "config", "print_config"):
        raise ConfigError(f"{where}.{key}: not a hyperparameter; the sweep sets it for every trial.")
    if key.startswith(("trainer.logger", "trainer.callbacks", "trainer.default_root_dir")):
        raise ConfigError(f"{where}.{key}: set by the sweep for every trial (its run directory and callbacks).")
    return key


def _grid(value: Any) -> dict[str, list[Any]]:
    grid = _mapping(value, "grid")
    for key, values in grid.items():
        _check_key(key, "grid")
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key}: expected a list of values, got {values!r}.")
        if not values:
            raise ConfigError(f"grid.{key}: empty list; the grid would have no trials.")
        seen = [params_key({"v": v}) for v in values]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"grid.{key}: repeated value in {values!r}.")
    return grid


def _random(value: Any, spec: SweepSpec) -> None:
    cfg = _mapping(value, "random")
    if not cfg:
        return
    unknown = sorted(set(cfg) - set(RANDOM_KEYS))
    if unknown:
        raise ConfigError(f"random.{unknown[0]}: unknown key; accepted: {', '.join(RANDOM_KEYS)}.")
    spec.random_trials = _int(cfg.get("num_trials"), "random.num_trials", 1)
    spec.random_seed = _int(cfg.get("seed", 0), "random.seed", 0)
    space = _mapping(cfg.get("space"), "random.space")
    if not space:
        raise ConfigError("random.space: empty; give at least one key with {low, high} or {choices}.")
    for key, dist in space.items():
        where = f"random.space.{_check_key(key, 'random.space')}"
        if not isinstance(dist, dict):
            raise ConfigError(f"{where}: expected {{low, high[, log, type]}} or {{choices: [...]}}, got {dist!r}.")
        bad = sorted(set(dist) - set(SPACE_KEYS))
        if bad:
            raise ConfigError(f"{where}.{bad[0]}: unknown; accepted: {', '.join(SPACE_KEYS)}.")
        if "choices" in dist:
            if not isinstance(dist["choices"], list) or not dist["choices"] or len(dist) > 1:
                raise ConfigError(f"{where}.choices: a non-empty list, and no low/high/log/type next to it.")
        else:
            low, high = dist.get("low"), dist.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise ConfigError(f"{where}: low and high must be numbers, got {low!r} and {high!r}.")
            if not low < high:
                raise ConfigError(f"{where}: low ({low}) must be < high ({high}).")
            kind = dist.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
            if kind not in ("int", "float"):
                raise ConfigError(f"{where}.type: 'int' or 'float', got {kind!r}.")
            if dist.get("log") and low <= 0:
                raise ConfigError(f"{where}.log: needs low > 0, got {low}.")
            dist = {"low": low, "high": high, "log": bool(dist.get("log", False)), "type": kind}
        spec.random_space[key] = dist


def _measures(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"measures: a list of measure names or a mapping name -> settings, got {value!r}.")
        value = {v: {} for v in value}
    if not isinstance(value, dict):
        raise ConfigError(f"measures: a list of measure names or a mapping name -> settings, got {value!r}.")
    out: dict[str, dict[str, Any]] = {}
    for name, settings in value.items():
        out[str(name)] = _mapping(settings, f"measures.{name}")
    return out


def check_measures(measures: dict[str, dict[str, Any]], preset: str | None = None) -> None:
    """Unknown measure names or settings, an unknown preset or a setting conflicting with it are refused (the
    measure tables of ``flatlit measure``)."""
    from flatlit.sharpness.presets import measure_table, preset_measures

    if preset:
        preset_measures(preset, list(measures) or None, measures, owner="preset", settings_owner="measures")
    elif measures:
        measure_table(measures, "measures")


def draw(dist: dict[str, Any], rng: random.Random) -> Any:
    """One value of a random-search distribution, from ``rng.random()`` only (a stream fixed across versions)."""
    u = rng.random()
    if "choices" in dist:
        return dist["choices"][min(int(u * len(dist["choices"])), len(dist["choices"]) - 1)]
    low, high = dist["low"], dist["high"]
    if dist["type"] == "int":
        if dist["log"]:  # log-uniform over [low, high + 1), floored
            return int(min(math.floor(math.exp(math.log(low) + u * (math.log(high + 1) - math.log(low)))), high))
        return int(min(low + math.floor(u * (high - low + 1)), high))
    if dist["log"]:
        return float(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
    return float(low + u * (high - low))


def expand(spec: SweepSpec) -> list[Trial]:
    """All trials of the sweep, in a fixed order (grid points, times the shared random draws)."""
    points: list[dict[str, Any]] = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())]
    if spec.random_trials:
        rng = random.Random(spec.random_seed)
        draws = [{k: draw(d, rng) for k, d in spec.random_space.items()} for _ in range(spec.random_trials)]
        points = [{**p, **d} for d in draws for p in points]
    return [Trial(i, p) for i, p in enumerate(points)]


def cli_value(value: Any) -> str:
    """A value as LightningCLI reads it on the command line (YAML flow style, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def trial_args(params: dict[str, Any]) -> list[str]:
    return [f"--{k}={cli_value(v)}" for k, v in params.items()]
