"""The ``flatlit`` console script: one subcommand per module of :mod:`flatlit.cli`.

``fit``, ``validate`` and ``test`` are LightningCLI's (:mod:`flatlit.cli.fit`); every other subcommand is the
``main`` of the module with its name.
"""

from __future__ import annotations

import importlib
import sys

from flatlit.cli.fit import run
from flatlit.utils.allocator import tune_allocator

SUBCOMMANDS = {  # beyond LightningCLI's fit/validate/test: one module each
    "measure": "flatlit.cli.measure",
    "landscape": "flatlit.cli.landscape",
    "robustness": "flatlit.cli.robustness",
    "report": "flatlit.cli.report",
    "analyze": "flatlit.cli.analyze",
    "sweep": "flatlit.cli.sweep",
}


def main(args: list[str] | None = None) -> None:
    """Console entry point: ``flatlit fit --config exp.yaml``, ``flatlit measure --ckpt_path ...``; ``args`` lets
    tests call ``main([...])``."""
    argv = sys.argv[1:] if args is None else list(args)
    tune_allocator()  # keep freed CPU memory in the process (flatlit/utils/allocator.py)
    if argv and argv[0] in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return
    run(args)
