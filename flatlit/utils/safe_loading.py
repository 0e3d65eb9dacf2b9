"""Reading files from others without running their code.

Checkpoints are unpickled by PyTorch's weights-only unpickler (tensors, plain containers and the few types registered
here), which refuses any other Python object instead of constructing it: a ``__reduce__`` that would call
``os.system`` is an error, not a command. A run's config is instantiated by ``class_path``, so the classes it names are
checked against the packages flatlit trusts (:data:`TRUSTED_PACKAGES`, extended by ``FLATLIT_TRUSTED_PACKAGES`` or
:func:`trust_packages`) before anything is imported. ``--trust_code`` on every command that reads a checkpoint or a run
lifts both checks, for files whose author you trust.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable
from typing import Any

import torch

from flatlit.utils.errors import ConfigError

#: The command-line flag that lifts both checks (named in every refusal).
TRUST_FLAG = "--trust_code"
#: Top-level packages whose classes a run's config may name without ``--trust_code``.
TRUSTED_PACKAGES = ("flatlit", "torch", "torchvision", "timm", "pytorch_optimizer", "lightning", "torchmetrics")
#: Comma-separated extra top-level packages (e.g. ``FLATLIT_TRUSTED_PACKAGES=mylab,mymodels``).
ENV_VAR = "FLATLIT_TRUSTED_PACKAGES"
_EXTRA: list[str] = []


class UntrustedFileError(ConfigError):
    """A checkpoint or run config would need code execution to load; the message names the file and the flag."""


def trust_packages(*names: str) -> None:
    """Let run configs name classes of these top-level packages (your own project's models, say)."""
    _EXTRA.extend(n.strip() for n in names if n.strip())


def trusted_packages() -> tuple[str, ...]:
    """:data:`TRUSTED_PACKAGES`, then those of ``FLATLIT_TRUSTED_PACKAGES`` and :func:`trust_packages`."""
    env = [n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()]
    return (*TRUSTED_PACKAGES, *env, *_EXTRA)


def is_trusted_class_path(path: str) -> bool:
    """Whether ``path`` names a class of a trusted package. A name without a dot is jsonargparse's short form,
    resolved among the already imported subclasses of the expected type, so it imports nothing new."""
    if "." not in path:
        return True
    return path.split(".", 1)[0] in trusted_packages()


def class_paths(node: Any) -> Iterable[str]:
    """Every ``class_path`` (and LightningCLI's saved ``_class_path``) string in a nested config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("class_path", "_class_path") and isinstance(value, str):
                yield value
            else:
                yield from class_paths(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from class_paths(value)


def check_config_classes(config: Any, source: str, trust: bool = False) -> None:
    """Refuse a config (from ``source``, a file name or argument) naming classes outside the trusted packages."""
    if trust:
        return
    bad = sorted({p for p in class_paths(config) if not is_trusted_class_path(p)})
    if bad:
        raise UntrustedFileError(
            f"{source}: names {', '.join(bad)}, outside the packages flatlit instantiates from a run's config "
            f"({', '.join(trusted_packages())}); building it would run that code. If you trust this run, pass "
            f"{TRUST_FLAG} (or add the package to {ENV_VAR})."
        )


def load_checkpoint(path: str, arg: str = "ckpt_path", trust: bool = False) -> Any:
    """``torch.load(path)`` on the CPU with the weights-only unpickler; ``trust=True`` allows any pickle.

    Raises :class:`UntrustedFileError` naming ``arg``, the file, the first refused global and :data:`TRUST_FLAG`
    when the file holds more than tensors and plain containers. Other errors (missing, truncated) propagate.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)  # full unpickle only when trusted
    except pickle.UnpicklingError as err:
        if trust or "Weights only load failed" not in str(err):
            raise  # a damaged file, not a refused object
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it holds {found.group(1)}" if found else "it holds Python objects beyond tensors"
        raise UntrustedFileError(
            f"{arg}: {path!r} cannot be read without running code from it ({what}, which only a full unpickle "
            f"constructs). If you trust its author, pass {TRUST_FLAG}."
        ) from None


def add_trust_argument(parser: Any) -> None:
    """Add :data:`TRUST_FLAG` to an ``argparse`` parser of a command that reads checkpoints and run configs."""
    parser.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="load the checkpoint with a full unpickle and instantiate any class its config names; both may run "
        "code from the files, so use it only for runs whose author you trust",
    )
