"""``flatlit fit|validate|test --config exp.yaml``: the LightningCLI subcommands (:class:`flatlit.config.FlatlitCLI`).

flatlit fit --config experiments/quickstart/fashion_mnist_sgd.yaml
flatlit fit --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt     # resume
"""

from __future__ import annotations

import sys

from flatlit.config import FlatlitCLI
from flatlit.utils.errors import find_user_error


def run(args: list[str] | None = None) -> FlatlitCLI:
    """Build and run the CLI; returns it (tests read ``cli.trainer`` and ``cli.model``).

    Bad configuration and missing data end the program with one ``flatlit: error: ...`` line and exit code 2.
    """
    try:
        return FlatlitCLI(args=args)
    except Exception as exc:
        err = find_user_error(exc)
        if err is None:
            raise
        sys.stderr.write(f"flatlit: error: {err}\n")
        raise SystemExit(2) from None
