"""Checks of a sweep against ``flatlit fit``'s LightningCLI parser before any trial starts.

One parser is built and reused: the base config alone, then with the sweep's additions (its logger, checkpoint and
GeneralizationTargets callback), then the first trial with each value of each swept key in turn. Values of
``model.*``/``data.*`` keys are also instantiated (the model and DataModule constructors check ranges and names),
without a Trainer, so a GPU config can be checked on a login node. Errors are one ConfigError naming the key.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import yaml

from flatlit.sweeps.spec import SweepSpec, Trial, params_key, trial_args
from flatlit.utils.errors import ConfigError, find_user_error


class _Parsed(Exception):
    """Carries the parser out of LightningCLI's constructor before it parses anything."""


def _parser() -> Any:
    from flatlit.config import FlatlitCLI

    class _ParserOnly(FlatlitCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _Parsed(parser)

    try:
        _ParserOnly(args=[])
    except _Parsed as found:
        return found.args[0]
    raise RuntimeError("LightningCLI did not reach parse_arguments")  # pragma: no cover


@dataclass
class BaseInfo:
    """What the sweep needs to know about the resolved base config."""

    has_save_last: bool
    has_generalization: bool


class ConfigChecker:
    """Parses ``flatlit fit`` command lines with one reused LightningCLI parser."""

    def __init__(self, configs: list[str]) -> None:
        self.configs = configs
        self.parser = _parser()

    def parse(self, extra: list[str]) -> Any:
        """The parsed config of ``fit --config BASE ... extra``; ConfigError with the parser's message."""
        err = io.StringIO()
        args = ["fit", *(a for c in self.configs for a in ("--config", c)), *extra]
        try:
            with contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self.parser.parse_args(args)
        except SystemExit:
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith("(see `flatlit")]
            msg = " ".join(lines).removeprefix("flatlit: error: ").strip() or "refused by the LightningCLI parser"
            raise ConfigError(msg) from None

    def instantiate(self, cfg: Any) -> None:
        """Build the model and DataModule of a parsed config (no Trainer): their constructors' checks."""
        from flatlit.runs.load import instantiate_model_and_data

        dump = yaml.safe_load(self.parser.dump(cfg, skip_link_targets=False))["fit"]
        try:
            instantiate_model_and_data(dump["model"], dump["data"], dump.get("seed_everything", 0), silent=True)
        except SystemExit:
            raise ConfigError("refused by the LightningCLI parser") from None
        except Exception as exc:
            err = find_user_error(exc)
            if err is not None:
                raise ConfigError(str(err)) from None
            first = str(exc).strip().splitlines()
            raise ConfigError(f"{type(exc).__name__}: {first[0] if first else ''}") from None

    def base_info(self) -> BaseInfo:
        """Parse the base config alone (errors name ``config``) and read its callbacks."""
        try:
            cfg = self.parse([])
        except ConfigError as err:
            raise ConfigError(f"config: {', '.join(self.configs)} does not parse: {err}") from None
        callbacks = cfg.fit.trainer.get("callbacks") or []
        if not isinstance(callbacks, list):
            callbacks = [callbacks]
        has_last = has_gen = False
        for cb in callbacks:
            path = str(getattr(cb, "class_path", "") or "")
            init = getattr(cb, "init_args", None)
            get = (lambda k, init=init: getattr(init, k, None)) if init is not None else (lambda k: None)
            if path.endswith("ModelCheckpoint"):
                if get("dirpath") is not None:
                    raise ConfigError(
                        f"config: trainer.callbacks: ModelCheckpoint writes to dirpath {get('dirpath')!r}, a folder "
                        "all trials would share; remove dirpath (checkpoints then go to each trial's run directory)."
                    )
                has_last = has_last or bool(get("save_last"))
            has_gen = has_gen or path.endswith("GeneralizationTargets")
        return BaseInfo(has_save_last=has_last, has_generalization=has_gen)

    def check_trials(self, spec: SweepSpec, trials: list[Trial], additions: list[str]) -> None:
        """The sweep's additions, then every value of every swept key within the first trial."""
        try:
            self.parse(additions)
        except ConfigError as err:
            raise ConfigError(f"generalization: {err}") from None
        first = trials[0].params
        values: list[tuple[str, str, Any]] = []
        for key, vals in spec.grid.items():
            values += [("grid", key, v) for v in vals]
        for key, dist in spec.random_space.items():
            vals = dist["choices"] if "choices" in dist else [dist["low"], dist["high"]]
            values += [("random.space", key, v) for v in vals]
        done: set[str] = set()  # instantiated: the first trial, then each model./data. value within it
        for where, key, value in values:
            params = {**first, key: value}
            try:
                cfg = self.parse(trial_args(params) + additions)
            except ConfigError as err:
                raise ConfigError(f"{where}.{key}: value {value!r} is refused: {err}") from None
            text = params_key(params)
            if text in done or (done and not key.startswith(("model.", "data."))):
                continue
            first_time = not done
            done.add(text)
            try:
                self.instantiate(cfg)
            except ConfigError as err:
                named = str(err).split(":", 1)[0]
                if first_time and named not in spec.keys and named != key:  # a setting of the base config
                    raise ConfigError(f"config: {', '.join(self.configs)}: {err}") from None
                raise ConfigError(f"{where}.{key}: value {value!r} is refused: {err}") from None
