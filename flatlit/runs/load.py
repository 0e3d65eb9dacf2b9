"""A trained run rebuilt: its model and DataModule from the saved ``config.yaml``, with the checkpoint's weights.

Find a checkpoint's run directory, rebuild its model and DataModule through :class:`flatlit.config.FlatlitCLI`, load
the weights with a clear error when they do not match, move batches to a device, and write result files atomically.
Used by the evaluations of a checkpoint (:mod:`flatlit.runs.measure`, ``landscape``, ``robustness``) and by the
sweep's config checks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from flatlit.utils.errors import ConfigError
from flatlit.utils.safe_loading import check_config_classes, load_checkpoint


@dataclass
class CheckpointOptions:
    """What every evaluation of a checkpoint is given (the flags that ``flatlit measure``, ``landscape`` and
    ``robustness`` share): the checkpoint, its run's config, whether to trust their code, the fixed seeded sample,
    the results file, the device and whether to ignore cached results."""

    ckpt_path: Any
    config: str | None = None
    trust_code: bool = False
    num_samples: int = 1000
    batch_size: int = 250
    seed: int = 0
    output: str | None = None
    device: str | None = None
    recompute: bool = False


def run_dir(ckpt_path: str) -> str:
    """The run directory of a checkpoint (``RUN/checkpoints/x.ckpt`` -> ``RUN``; else the checkpoint's folder)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def instantiate_model_and_data(model: Any, data: Any, seed_everything: Any = 0, silent: bool = False):
    """The ``FlatlitCLI`` of a config's model and data sections alone: their constructors run with LightningCLI's
    links and checks; the Trainer it builds (no logger, checkpoints or progress bar) is not used, so Lightning's
    start-up lines are silenced. ``silent`` also hides every warning and the parser's own stderr (for checking
    many configs, whose errors arrive as exceptions)."""
    from flatlit.config import FlatlitCLI

    args = {
        "model": model,
        "data": data,
        "seed_everything": seed_everything,
        "trainer": {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False},
    }
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        stderr = contextlib.redirect_stderr(io.StringIO()) if silent else contextlib.nullcontext()
        with warnings.catch_warnings(), stderr:
            if silent:
                warnings.simplefilter("ignore")
            else:
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            return FlatlitCLI(args=args, run=False)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def build_from_config(config_path: str, device: torch.device | str = "cpu", trust: bool = False):
    """Model and DataModule from a run's config (its trainer section, loggers and callbacks are not used); the
    classes it names must come from trusted packages unless ``trust`` (:mod:`flatlit.utils.safe_loading`)."""
    if not os.path.isfile(config_path):
        raise ConfigError(
            f"--config: {config_path!r} does not exist; pass the run's config.yaml (written next to its logs)."
        )
    with open(config_path) as f:
        cfg = yaml.safe_load(f) or {}
    if "model" not in cfg or "data" not in cfg:
        raise ConfigError(f"--config: {config_path!r} has no model/data sections; pass the run's config.yaml.")
    check_config_classes({"model": cfg["model"], "data": cfg["data"]}, f"--config: {config_path!r}", trust)
    cli = instantiate_model_and_data(cfg["model"], cfg["data"], cfg.get("seed_everything", 0))
    return cli.model.to(device), cli.datamodule


def load_run(
    ckpt_path: str,
    config: str | None = None,
    device: torch.device | str = "cpu",
    arg: str = "ckpt_path",
    trust: bool = False,
):
    """(module with the checkpoint's weights, DataModule, run directory, config path) of a checkpoint of
    ``flatlit fit``; ``arg`` names the command-line argument in errors. Neither the checkpoint nor the config may
    run code unless ``trust`` (``--trust_code``)."""
    from flatlit.config import read_checkpoint

    try:
        ckpt = read_checkpoint(ckpt_path, trust=trust)
    except ConfigError as err:
        raise ConfigError(str(err).replace("ckpt_path:", f"{arg}:", 1)) from None
    folder = run_dir(ckpt_path)
    config_path = config or os.path.join(folder, "config.yaml")
    module, dm = build_from_config(config_path, device, trust)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ConfigError(
            f"{arg}: {ckpt_path!r} does not match the model of {config_path!r} "
            f"({' '.join(first[1:3]).strip() or first[0]}); pass the run's own config with --config."
        ) from None
    return module, dm, folder, config_path


def load_init_state(
    folder: str, device: torch.device | str = "cpu", trust: bool = False
) -> dict[str, torch.Tensor] | None:
    """The run's initial weights (``model_init.ckpt``, written by the InitialWeights callback), or None."""
    path = os.path.join(folder, "model_init.ckpt")
    if not os.path.isfile(path):
        return None
    state = load_checkpoint(path, arg="model_init.ckpt", trust=trust)["state_dict"]
    return {k: v.to(device) for k, v in state.items()}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically: a killed process leaves the previous complete file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=float)
    os.replace(tmp, path)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, or tuples/lists/dicts of them) with every tensor on ``device``."""
    from lightning.fabric.utilities.apply_func import apply_to_collection

    return apply_to_collection(batch, torch.Tensor, lambda t: t.to(device))


def read_results(path: str, version: int, digest: str) -> dict[str, Any] | None:
    """The results file at ``path`` when it was written in format ``version`` for the checkpoint whose sha256 is
    ``digest``; None when it is absent, damaged (it is then recomputed) or written for another checkpoint."""
    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("version") == version and data.get("checkpoint", {}).get("sha256") == digest:
                return data
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    return None
