"""Kept for old imports (``from flatlit.sweep import Sweep``): the driver is :mod:`flatlit.sweeps.driver`, the command
:mod:`flatlit.cli.sweep`."""

from flatlit.sweeps.driver import Sweep, SweepOptions, run_sweep

__all__ = ["Sweep", "SweepOptions", "run_sweep"]
