"""Kept for old imports (``flatlit.safe_loading.trust_packages``): the code is :mod:`flatlit.utils.safe_loading`."""

from flatlit.utils.safe_loading import (
    ENV_VAR,
    TRUST_FLAG,
    TRUSTED_PACKAGES,
    UntrustedFileError,
    add_trust_argument,
    check_config_classes,
    class_paths,
    is_trusted_class_path,
    load_checkpoint,
    trust_packages,
    trusted_packages,
)

__all__ = [
    "ENV_VAR",
    "TRUSTED_PACKAGES",
    "TRUST_FLAG",
    "UntrustedFileError",
    "add_trust_argument",
    "check_config_classes",
    "class_paths",
    "is_trusted_class_path",
    "load_checkpoint",
    "trust_packages",
    "trusted_packages",
]
