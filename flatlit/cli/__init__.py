"""The command line only: :func:`main` (the ``flatlit`` console script) and one module per subcommand (``fit``,
``measure``, ``landscape``, ``robustness``, ``sweep``, ``analyze``, ``report``), each parsing its arguments, calling
the library and printing."""

from flatlit.cli.fit import run
from flatlit.cli.main import main

__all__ = ["main", "run"]
