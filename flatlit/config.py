"""FlatlitCLI: the LightningCLI of ``flatlit fit|validate|test``, and the checks on the checkpoint it resumes.

Model and data are chosen in subclass mode (``class_path``/``init_args``); the base optimizer and LR scheduler are
injected callables, so the YAML can name any ``torch.optim``, timm or pytorch-optimizer class. The DataModule's
``num_classes``, ``in_channels`` and ``image_size`` are linked into the model. The resolved config is saved next to
the logs (``config.yaml``) and every run writes ``history.csv``.

``--ckpt_path``: a missing or unreadable file is one clear error (:func:`read_checkpoint`). ``fit`` resumes only when
the checkpoint was trained with the same model, optimizer, scheduler and data settings as the config (keys in
:data:`RESUME_SAFE_KEYS`, the ``trainer`` section and ``seed_everything`` may change), and continues the checkpoint's
own run directory (``<save_dir>/<name>/version_N``) unless the logger's ``version`` is set.

A library module: the command (:mod:`flatlit.cli.fit`) and the code that rebuilds a trained run (:mod:`flatlit.runs`)
both import it.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import os
import re
import sys
import types
import warnings
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from flatlit.callbacks.history import HistoryCSV
from flatlit.callbacks.measures import InitialWeights
from flatlit.data.base import FlatlitDataModule
from flatlit.methods.base import ClassificationModule
from flatlit.utils.errors import ConfigError
from flatlit.utils.safe_loading import (
    TRUST_FLAG,
    UntrustedFileError,
    check_config_classes,
    is_trusted_class_path,
    load_checkpoint,
)

#: Config keys that may differ between a checkpoint and the run resuming it (besides ``trainer.*``,
#: ``seed_everything`` and ``history.*``): where the data lives and how it is loaded, nothing that changes the
#: trajectory. Optimizer and scheduler settings (``lr`` included) are not among them: Lightning restores their state
#: from the checkpoint, so a new value would be silently ignored.
RESUME_SAFE_KEYS = (
    "data.init_args.data_dir",
    "data.init_args.download",
    "data.init_args.num_workers",
    "data.init_args.eval_batch_size",
    "model.init_args.stop_on_nonfinite",  # continuing past a divergence stop is the documented way out
)
_LINKED = tuple(f"model.init_args.{k}" for k in ("num_classes", "in_channels", "image_size"))  # follow the data
_CKPT_ALIASES = ("last", "best", "hpc", "registry")  # ckpt_path values that Lightning resolves itself
_CONFIG_KEY = "flatlit_config"  # the run's model and data config (YAML text) in every checkpoint of `flatlit fit`


class FlatlitCLI(LightningCLI):
    """LightningCLI subclass: subclass mode for model and data, injected optimizers, data→model links.

    Every TensorBoardLogger of the Trainer (a config's, or Lightning's default one) runs with
    ``default_hp_metric=False``, whatever the config says: flatlit logs real metrics, never Lightning's
    ``hp_metric = -1`` placeholder (a sweep attaches each trial's hyperparameters to its final metrics and measures
    once the trial has finished, :mod:`flatlit.sweeps.hparams`).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(
            ClassificationModule,
            FlatlitDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            **kwargs,
        )

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.error = types.MethodType(_short_error, parser)
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(HistoryCSV, "history")
        parser.add_argument(
            TRUST_FLAG,
            action="store_true",
            help="read --ckpt_path with a full unpickle (may run code from the file): only for checkpoints you trust",
        )

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's own read of ``--ckpt_path`` uses the weights-only unpickler unless ``--trust_code``."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") is not None and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = not self._trust()
        return kwargs

    def _trust(self) -> bool:
        sub = self.config.get("subcommand")
        return bool(sub and self.config[sub].get(TRUST_FLAG.lstrip("-")))

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning reads it.

        Lightning would merge the checkpoint's hyperparameters into the config, so a resumed ``fit`` silently trained
        the checkpoint's model whatever the command line said; ``fit`` now refuses a checkpoint whose settings differ
        from the config instead (``validate``/``test`` keep Lightning's behaviour).
        """
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        self._resume_path: str | None = None
        if not isinstance(path, str) or path in _CKPT_ALIASES or path.startswith("registry:") or "://" in path:
            super()._parse_ckpt_path()
            return
        ckpt = read_checkpoint(path, trust=self._trust())
        if sub != "fit":  # Lightning builds the model from the checkpoint's saved class
            check_config_classes(ckpt.get("hyper_parameters"), f"ckpt_path: {path!r}", self._trust())
            super()._parse_ckpt_path()
            return
        diffs = resume_differences(ckpt, self._run_config())
        if diffs:
            shown = "; ".join(f"{k}: {_short(a)} (checkpoint: {_short(b)})" for k, a, b in diffs)
            raise ConfigError(
                f"ckpt_path: {path!r} was trained with other settings than this config: {shown}. A resumed run may "
                f"only change the trainer settings, seed_everything and {', '.join(RESUME_SAFE_KEYS)} (optimizer "
                "and scheduler state, lr included, come from the checkpoint): pass the run's own config.yaml, or "
                "leave out --ckpt_path to start a new run."
            )
        self._resume_path = path

    def _run_config(self) -> dict[str, Any]:
        """This run's ``model`` and ``data`` config as plain YAML data (what checkpoints store)."""
        sub = self.config["subcommand"]
        dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))[sub]
        return {k: dump.get(k) for k in ("model", "data")}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer; Lightning's errors about its arguments become one ConfigError naming the ``trainer.`` key.
        Its TensorBoard loggers get ``default_hp_metric=False`` (see the class docstring)."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:
            msg = str(err)
            names = [n for n in re.findall(r"`(\w+)`", msg) if n in inspect.signature(Trainer.__init__).parameters]
            key = f"trainer.{names[0]}" if names else "trainer"
            raise ConfigError(f"{key}: {msg.replace(f'`{names[0]}` ', '') if names else msg}") from None
        for logger in trainer.loggers:  # no hp_metric = -1 placeholder (no public setter; read at fit start)
            if isinstance(logger, TensorBoardLogger) and logger._default_hp_metric:
                logger._default_hp_metric = False
        return trainer

    def before_fit(self) -> None:
        """Record the run's config in its checkpoints; a resumed run continues the checkpoint's run directory."""
        self.trainer.callbacks.append(_StoreRunConfig(yaml.safe_dump(self._run_config(), sort_keys=True)))
        self.trainer.callbacks.append(InitialWeights())  # model_init.ckpt: distance from init, PAC-Bayes
        if getattr(self, "_resume_path", None) is not None:
            continue_run_directory(self.trainer.loggers, self._resume_path)
            # the run's own checkpoint folder is expected to hold checkpoints when it resumes
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


class _StoreRunConfig(Callback):
    """Writes the run's model and data config into every checkpoint, for the resume check."""

    def __init__(self, text: str) -> None:
        self.text = text

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CONFIG_KEY] = self.text


def read_checkpoint(path: str, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint on the CPU with the weights-only unpickler (``trust``: any pickle, see
    :mod:`flatlit.utils.safe_loading`), or raise ConfigError saying why it cannot be used."""
    if not os.path.isfile(path):
        where = os.path.dirname(os.path.abspath(path))
        hint = f" ({where} holds: {', '.join(_checkpoints_in(where))})" if _checkpoints_in(where) else ""
        raise ConfigError(f"ckpt_path: no checkpoint file at {path!r}{hint}; pass the path of an existing .ckpt file.")
    try:
        ckpt = load_checkpoint(path, trust=trust)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError("no state_dict in it")
    except UntrustedFileError:
        raise
    except Exception as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else "empty file"
        others = [f for f in _checkpoints_in(os.path.dirname(os.path.abspath(path))) if f != os.path.basename(path)]
        hint = f", e.g. {', '.join(others)} in the same folder" if others else ""
        raise ConfigError(
            f"ckpt_path: {path!r} is not a readable checkpoint ({type(err).__name__}: {why}); it may have been cut "
            f"short by an interrupted save. Pass another checkpoint{hint}."
        ) from None
    return ckpt


def _checkpoints_in(folder: str, limit: int = 3) -> list[str]:
    """The newest ``.ckpt`` files of ``folder`` (names only)."""
    try:
        names = [f for f in os.listdir(folder) if f.endswith(".ckpt")]
    except OSError:
        return []
    return sorted(names, key=lambda f: os.path.getmtime(os.path.join(folder, f)), reverse=True)[:limit]


class _ClassPath(str):
    """A class path in a flattened config (shown as ``<key>.class_path``)."""


def _flatten(value: Any, key: str, out: dict[str, Any]) -> dict[str, Any]:
    """``{class_path, init_args}`` blocks become ``key -> class path`` plus ``key.init_args.<arg>`` leaves."""
    if isinstance(value, dict) and "class_path" in value:
        out[key] = _ClassPath(value["class_path"])
        for k, v in (value.get("init_args") or {}).items():
            _flatten(v, f"{key}.init_args.{k}", out)
    else:
        out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, _ClassPath) and isinstance(b, _ClassPath) and a != b:
        if not (is_trusted_class_path(a) and is_trusted_class_path(b)):
            return False  # a checkpoint's class path is only imported when it is a trusted package's
        try:
            return _import(a) is _import(b)  # flatlit.methods.SGDFamily is flatlit.methods.sgd.SGDFamily
        except (ImportError, AttributeError, ValueError):
            return False
    return _plain(a) == _plain(b)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (YAML has only lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(str(value) if isinstance(value, _ClassPath) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resume_differences(ckpt: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, run value, checkpoint value)`` for every setting that may not change on resume.

    The checkpoint side is its saved hyperparameters (with LightningCLI's ``_class_path``) and, for checkpoints of
    ``flatlit fit``, the stored model/data config; keys present on one side only (a newer or older flatlit) are not
    compared. Without a stored config the optimizer is checked through the state it left in the checkpoint.
    """
    saved: dict[str, Any] = {}
    text = ckpt.get(_CONFIG_KEY)
    stored = yaml.safe_load(text) if isinstance(text, str) else None
    if isinstance(stored, dict):
        for k in ("model", "data"):
            _flatten(stored.get(k), k, saved)
    hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k != "_instantiator"}
    if "_class_path" in hparams:
        _flatten({"class_path": hparams.pop("_class_path"), "init_args": hparams}, "model", saved)
    elif hparams and isinstance(run.get("model"), dict):
        _flatten({"class_path": run["model"]["class_path"], "init_args": hparams}, "model", saved)
    current: dict[str, Any] = {}
    for k in ("model", "data"):
        _flatten(run.get(k), k, current)
    skip = set(RESUME_SAFE_KEYS) | set(_LINKED)
    diffs = [
        (
            f"{k}.class_path" if isinstance(current[k], _ClassPath) or isinstance(saved[k], _ClassPath) else k,
            v,
            saved[k],
        )
        for k, v in current.items()
        if k in saved and k not in skip and not _same(v, saved[k])
    ]
    if stored is None:
        diffs += _optimizer_state_differences(ckpt, run)
    return diffs


def _optimizer_state_differences(ckpt: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The configured optimizer against the param-group keys the checkpoint's optimizer state holds."""
    states = ckpt.get("optimizer_states") or []
    groups = states[0].get("param_groups") if states and isinstance(states[0], dict) else None
    opt = ((run.get("model") or {}).get("init_args") or {}).get("optimizer")
    if not groups or not isinstance(opt, dict) or "class_path" not in opt:
        return []
    try:
        fresh = _import(opt["class_path"])([torch.zeros(1, requires_grad=True)], **(opt.get("init_args") or {}))
    except Exception:
        return []
    unknown = sorted(set(groups[0]) - set(fresh.param_groups[0]) - {"params"})
    if not unknown:
        return []
    return [("model.init_args.optimizer.class_path", opt["class_path"], f"an optimizer with {', '.join(unknown)}")]


def continue_run_directory(loggers: list[Logger], ckpt_path: str) -> None:
    """Point TensorBoard/CSV loggers without an explicit ``version`` at the run directory holding ``ckpt_path``.

    Applies when the checkpoint lies in ``<save_dir>/<name>/<version>/checkpoints/`` (ModelCheckpoint's layout) and
    the logger's ``<save_dir>/<name>`` is that folder. A CSVLogger's ``metrics.csv`` keeps the first part's rows.
    """
    ckpt_dir = os.path.dirname(os.path.abspath(ckpt_path))
    if os.path.basename(ckpt_dir) != "checkpoints":
        return
    run_dir = os.path.dirname(ckpt_dir)
    name = os.path.basename(run_dir)
    match = re.fullmatch(r"version_(\d+)", name)
    version: int | str = int(match.group(1)) if match else name
    for logger in loggers:
        if not isinstance(logger, (TensorBoardLogger, CSVLogger)) or logger._version is not None:
            continue
        if os.path.realpath(logger.root_dir) != os.path.realpath(os.path.dirname(run_dir)):
            continue
        logger._version = version  # no public setter; read lazily, nothing has read it before fit
        if isinstance(logger, CSVLogger):
            _keep_csv_metrics(logger)


@rank_zero_only
def _keep_csv_metrics(logger: CSVLogger) -> None:
    """Create the CSVLogger's writer (which deletes an existing ``metrics.csv``) and put the old rows back."""
    path = os.path.join(logger.log_dir, "metrics.csv")
    old = open(path).read() if os.path.isfile(path) else None
    writer = logger.experiment
    if old:
        with open(path, "w") as f:
            f.write(old)
        writer.metrics_keys = next(csv.reader([old.splitlines()[0]]))


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


def _short_error(parser, message: str, ex: Exception | None = None) -> None:
    """Replace jsonargparse's usage dump with the lines of its message that say what is wrong."""
    lines = [ln.strip().lstrip("- ").strip() for ln in str(message).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(_NOISE)]
    sys.stderr.write(f"flatlit: error: {' '.join(kept)}\n(see `flatlit fit --help` for the accepted keys)\n")
    raise SystemExit(2)
