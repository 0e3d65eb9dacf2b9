"""Paper presets: each paper's measure list, names, settings and conventions, as data over flatlit's measures.

A preset is a table ``label → (flatlit measure, settings)``: the label is the paper's name of the measure (its key
in the paper's code or table), the measure a registered flatlit measure (or a *record* of the training run, such as
the steps to reach a training loss), and the settings the paper's conventions (``weights_only``, ``margin_rank``,
``scale``, ``target_metric``, ``iteration``, ``reparametrize``, ...). Nothing here computes a value: the measures do.
``flatlit measure --preset NAME``, the callbacks' ``preset=`` and a sweep file's ``preset:`` all read
:func:`preset_measures`; ``docs/measures.md`` prints each table with what differs from the paper's code
(:func:`describe_presets`).

A measure table, with or without a preset, maps labels to settings; an entry may name its measure
(``{label: {measure: spectral_norm_product, squared: true}}``), else the label is the measure's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flatlit.utils.errors import ConfigError

RECORD_PREFIX = "record:"  # a measure name starting with it is read from the training run, not computed


@dataclass(frozen=True)
class PresetEntry:
    """One measure of a paper: its ``label`` (the paper's name), the flatlit ``measure`` with the paper's
    ``settings``, where the paper defines it (``source``) and what differs from the paper's code (``differs``)."""

    label: str
    measure: str
    settings: dict[str, Any]
    source: str
    differs: str = ""


@dataclass(frozen=True)
class Preset:
    """A paper's measure set: ``entries`` in the paper's order, the sample the paper measures on (``sample``:
    defaults of ``num_samples``/``batch_size`` where the paper fixes them) and notes for the docs."""

    name: str
    paper: str
    entries: tuple[PresetEntry, ...]
    sample: dict[str, int] = field(default_factory=dict)
    notes: str = ""
    records: tuple[str, ...] = ()  # training-run records it needs (GeneralizationTargets' loss_milestones, as text)

    def entry(self, label: str) -> PresetEntry:
        for e in self.entries:
            if e.label == label:
                return e
        raise KeyError(label)


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add ``preset`` to the registry (by name)."""
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    _PRESETS[preset.name] = preset
    return preset


def list_presets() -> list[str]:
    """Names of the registered presets."""
    _load()
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    """The preset ``name``; ConfigError naming the known ones otherwise."""
    _load()
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}.")
    return _PRESETS[name]


def _load() -> None:
    from flatlit.sharpness import preset_tables  # noqa: F401 (registers the papers' presets)


# ---- measure tables -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasureEntry:
    """A resolved row of a measure table: ``label`` → ``measure`` with its full ``settings`` (defaults merged)."""

    label: str
    measure: str
    settings: dict[str, Any]

    @property
    def is_record(self) -> bool:
        return self.measure.startswith(RECORD_PREFIX)


def _settings_of(owner: str, label: str, value: Any) -> tuple[str, dict[str, Any]]:
    if value is None:
        return label, {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{owner}.{label}: expected a mapping setting -> value, got {value!r}.")
    settings = dict(value)
    measure = settings.pop("measure", label)
    if not isinstance(measure, str):
        raise ConfigError(f"{owner}.{label}.measure: a measure name, got {measure!r}.")
    return measure, settings


def resolve_entry(owner: str, label: str, measure: str, settings: dict[str, Any]) -> MeasureEntry:
    """Check ``measure`` and its ``settings`` against the registry (records: against their parameters) and merge
    the defaults; one ConfigError line naming ``owner.label`` otherwise."""
    if measure.startswith(RECORD_PREFIX):
        from flatlit.sharpness.records import check_record

        try:
            return MeasureEntry(label, measure, check_record(measure, settings))
        except ValueError as err:
            raise ConfigError(f"{owner}.{label}: {err}") from None
    from flatlit.sharpness import get_measure

    try:
        spec = get_measure(measure)
    except ValueError as err:
        flag = owner.startswith("--") or owner.endswith(")")  # a flag or an argument; else a file's key
        where = owner if label == measure and flag else f"{owner}.{label}"
        raise ConfigError(f"{where}: {err}") from None
    unknown = sorted(set(settings) - set(spec.defaults))
    if unknown:
        raise ConfigError(
            f"{owner}.{label}: unknown setting(s) {', '.join(unknown)} of measure {measure!r}; accepted: "
            f"{', '.join(sorted(spec.defaults))}."
        )
    return MeasureEntry(label, measure, {**spec.defaults, **settings})


def preset_measures(
    preset: str,
    names: list[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    owner: str = "--preset",
    settings_owner: str = "--settings",
) -> list[MeasureEntry]:
    """The measure table of ``preset``: every entry, or the labels in ``names``, with ``overrides`` (label →
    settings) applied to settings the preset leaves free; overriding a setting the preset pins is a ConfigError
    (one line: the preset *is* those conventions; drop the preset to choose your own)."""
    p = get_preset(preset)
    labels = [e.label for e in p.entries]
    wanted = labels if not names else list(names)
    for label in [*wanted, *(overrides or {})]:
        if label not in labels:
            import difflib

            close = difflib.get_close_matches(label, labels, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{owner} {preset}: no measure {label!r} in this preset.{hint} Its measures: {', '.join(labels)}."
            )
    out = []
    for label in wanted:
        e = p.entry(label)
        extra = dict((overrides or {}).get(label) or {})
        if "measure" in extra and extra["measure"] != e.measure:
            raise ConfigError(
                f"{settings_owner}.{label}.measure: conflicts with preset {preset}, which measures {label} as "
                f"{e.measure}."
            )
        extra.pop("measure", None)
        for key, value in extra.items():
            if key in e.settings and e.settings[key] != value:
                raise ConfigError(
                    f"{settings_owner}.{label}.{key}: {value!r} conflicts with preset {preset}, which pins {key}="
                    f"{e.settings[key]!r} (the convention of {p.paper}); drop --preset to choose your own settings."
                )
        out.append(resolve_entry(owner, label, e.measure, {**e.settings, **extra}))
    return out


def measure_table(
    measures: list[str] | Mapping[str, Any] | None,
    owner: str,
    default: list[str] | None = None,
) -> list[MeasureEntry]:
    """A measure table without a preset: names (settings = defaults) or a mapping label → settings, where an entry
    may name its ``measure``; None: ``default`` (names)."""
    if measures is None:
        measures = list(default or [])
    if isinstance(measures, (list, tuple)):
        measures = {str(name): {} for name in measures}
    if not isinstance(measures, Mapping):
        raise ConfigError(f"{owner}: a list of measure names or a mapping label -> settings, got {measures!r}.")
    out = []
    for label, value in measures.items():
        measure, settings = _settings_of(owner, str(label), value)
        out.append(resolve_entry(owner, str(label), measure, settings))
    return out


# ---- documentation --------------------------------------------------------------------------------------------------
def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def describe_presets() -> str:
    """The presets as markdown tables (paper name and equation → flatlit measure and settings → what differs)."""
    out = [
        "## Paper presets",
        "",
        "`flatlit measure --preset NAME` (the callbacks' `preset=`, a sweep file's `preset:`) runs a paper's measure",
        "list under the paper's names, with its conventions as settings; `measures.json` records the preset. Settings",
        "a preset pins cannot be overridden (`--settings` on them is refused); the others can.",
        "",
    ]
    for name in list_presets():
        p = get_preset(name)
        out += [f"### `{name}`: {p.paper}", ""]
        if p.notes:
            out += [p.notes, ""]
        if p.sample:
            out += [f"Sample: {', '.join(f'`--{k} {v}`' for k, v in p.sample.items())} unless given.", ""]
        out += ["| paper's measure (where) | flatlit measure and settings | what differs |", "|---|---|---|"]
        for e in p.entries:
            out.append(
                f"| `{e.label}` ({e.source}) | `{e.measure}`: {_settings_text(e.settings)} | {e.differs or '—'} |"
            )
        out.append("")
    return "\n".join(out) + "\n"
