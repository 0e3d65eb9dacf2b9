"""Errors that the CLI turns into one clear line instead of a traceback."""


class FlatlitError(Exception):
    """Base class for user-facing flatlit errors (bad config, missing data)."""


class ConfigError(FlatlitError, ValueError):
    """A configuration value is invalid; the message names the config key and what to do."""


class DataNotFoundError(FlatlitError, FileNotFoundError):
    """Dataset files are missing; the message says where flatlit looked and how to get them."""


class DivergenceError(FlatlitError, FloatingPointError):
    """Training produced a non-finite loss or gradient; the message names the step and the saved checkpoint."""
