"""The quickstart on the real Fashion-MNIST (slow: run with ``pytest -m slow``)."""

import csv
import os

import pytest

from flatlit.cli import run
from flatlit.data.mnist import DEBIAN_FASHION_MNIST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="needs Debian's dataset-fashion-mnist")
def test_quickstart_reaches_85_percent(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "experiments/quickstart/fashion_mnist_sgd.yaml"),
            "--data.init_args.data_dir",
            str(tmp_path / "data"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    with open(os.path.join(cli.trainer.log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["val/acc"]) >= 0.85
