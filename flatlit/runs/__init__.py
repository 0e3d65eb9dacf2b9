"""A trained run read back and evaluated: its model rebuilt from ``config.yaml`` with the checkpoint's weights
(:mod:`~flatlit.runs.load`), and its checkpoint measured (:mod:`~flatlit.runs.measure`), mapped
(:mod:`~flatlit.runs.landscape`) and attacked (:mod:`~flatlit.runs.robustness`), each with a resumable cache."""

from flatlit.runs.load import (
    build_from_config,
    instantiate_model_and_data,
    load_init_state,
    load_run,
    run_dir,
    sha256,
    to_device,
    write_json,
)

__all__ = [
    "build_from_config",
    "instantiate_model_and_data",
    "load_init_state",
    "load_run",
    "run_dir",
    "sha256",
    "to_device",
    "write_json",
]
