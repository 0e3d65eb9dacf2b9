"""``flatlit fit|validate|test --config exp.yaml``: LightningCLI with flatlit's modules and DataModules.

Model and data are chosen in subclass mode (``class_path``/``init_args``); the base optimizer and LR scheduler are
injected callables, so the YAML can name any ``torch.optim``, timm or pytorch-optimizer class. The DataModule's
``num_classes``, ``in_channels`` and ``image_size`` are linked into the model. The resolved config is saved next to
the logs (``config.yaml``) and every run writes ``history.csv``.
"""

from __future__ import annotations

import sys
import types

from lightning.pytorch.cli import LightningCLI

from flatlit.callbacks.history import HistoryCSV
from flatlit.data.base import FlatlitDataModule
from flatlit.errors import FlatlitError
from flatlit.methods.base import ClassificationModule


class FlatlitCLI(LightningCLI):
    """LightningCLI subclass: subclass mode for model and data, injected optimizers, data→model links."""

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


def _user_error(exc: BaseException) -> FlatlitError | None:
    """The FlatlitError behind ``exc`` (jsonargparse wraps errors raised while instantiating classes)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FlatlitError):
            return e
        stack += [e.__cause__, e.__context__]
    return None


def run(args: list[str] | None = None) -> FlatlitCLI:
    """Build and run the CLI; returns it (tests read ``cli.trainer`` and ``cli.model``).

    Bad configuration and missing data end the program with one ``flatlit: error: ...`` line and exit code 2.
    """
    try:
        return FlatlitCLI(args=args)
    except Exception as exc:
        err = _user_error(exc)
        if err is None:
            raise
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None


def main(args: list[str] | None = None) -> None:
    """Console entry point: ``flatlit fit --config exp.yaml``; ``args`` lets tests call ``main([...])``."""
    run(args)


if __name__ == "__main__":
    main()
