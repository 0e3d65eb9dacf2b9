"""Run a reproduction's real pipeline (its sweep.yaml and base config, then its analyze.py) at a tiny scale: the same
files, with the data swapped for the synthetic MNIST files of the tests and the sizes shrunk."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from typing import Any

import yaml

from flatlit.analysis.verdict import check_verdict
from flatlit.cli.sweep import main as sweep_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reproduction(name: str) -> str:
    return os.path.join(ROOT, "experiments", "reproductions", name)


def analyzer(name: str):
    """The reproduction's analyze.py as a module."""
    path = os.path.join(reproduction(name), "analyze.py")
    spec = importlib.util.spec_from_file_location(f"reproduce_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_data(mnist_dir: str, n: int, batch_size: int, **extra: Any) -> dict[str, Any]:
    args = {"data_dir": mnist_dir, "download": False, "train_subset": n, "batch_size": batch_size}
    return {"class_path": "flatlit.data.MNISTDataModule", "init_args": {**args, **extra}}


def run_tiny(
    tmp_path, name: str, shrink: Callable[[dict[str, Any]], None], sweep_edit: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Shrink each base config of the reproduction's sweep with ``shrink(cfg)`` (in place), run the sweep into
    ``tmp_path/sweep`` and the analysis into ``tmp_path/out``; return the checked verdict.json."""
    here = reproduction(name)
    with open(os.path.join(here, "sweep.yaml")) as f:
        sweep = yaml.safe_load(f)
    configs = sweep["config"] if isinstance(sweep["config"], list) else [sweep["config"]]
    local = []
    for c in configs:
        with open(os.path.join(here, c)) as f:
            cfg = yaml.safe_load(f)
        shrink(cfg)
        out = tmp_path / os.path.basename(c)
        out.write_text(yaml.safe_dump(cfg))
        local.append(out.name)
    sweep["config"] = local
    sweep["output"] = "sweep"
    if sweep_edit is not None:
        sweep_edit(sweep)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    sweep_main(["--config", str(path), "--workers", "1"])
    analyzer(name).main(["--sweep", str(tmp_path / "sweep"), "--output", str(tmp_path / "out")])
    with open(tmp_path / "out" / "verdict.json") as f:
        verdict = json.load(f)
    check_verdict(verdict)
    for fig in verdict["figures"]:
        assert os.path.getsize(tmp_path / "out" / fig) > 10_000, fig
    return verdict
