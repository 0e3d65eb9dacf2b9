"""``flatlit fit|validate|test --config exp.yaml``: LightningCLI with flatlit's modules and DataModules.

Model and data are chosen in subclass mode (``class_path``/``init_args``); the base optimizer and LR scheduler are
injected callables, so the YAML can name any ``torch.optim``, timm or pytorch-optimizer class. The DataModule's
``num_classes``, ``in_channels`` and ``image_size`` are linked into the model. The resolved config is saved next to
the logs (``config.yaml``) and every run writes ``history.csv``.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI, LRSchedulerCallable, OptimizerCallable  # noqa: F401

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

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(HistoryCSV, "history")


def run(args: list[str] | None = None) -> FlatlitCLI:
    """Build and run the CLI; returns it (tests read ``cli.trainer`` and ``cli.model``)."""
    try:
        return FlatlitCLI(args=args)
    except FlatlitError as err:
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None


def main(args: list[str] | None = None) -> None:
    """Console entry point: ``flatlit fit --config exp.yaml``; ``args`` lets tests call ``main([...])``."""
    run(args)


if __name__ == "__main__":
    main()
