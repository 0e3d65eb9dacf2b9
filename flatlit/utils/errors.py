"""Errors that the CLI turns into one clear line instead of a traceback."""

from __future__ import annotations


class FlatlitError(Exception):
    """Base class for user-facing flatlit errors (bad config, missing data)."""


class ConfigError(FlatlitError, ValueError):
    """A configuration value is invalid; the message names the config key and what to do."""


class DataNotFoundError(FlatlitError, FileNotFoundError):
    """Dataset files are missing; the message says where flatlit looked and how to get them."""


class DivergenceError(FlatlitError, FloatingPointError):
    """Training produced a non-finite loss or gradient; the message names the step and the saved checkpoint."""


def find_user_error(exc: BaseException) -> FlatlitError | None:
    """The FlatlitError behind ``exc``, following ``__cause__`` and ``__context__`` (jsonargparse wraps errors raised
    while instantiating classes); None when there is none."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FlatlitError):
            return e
        stack += [e.__cause__, e.__context__]
    return None
