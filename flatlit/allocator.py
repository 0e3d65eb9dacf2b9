"""Kept for old imports (``flatlit.allocator.tune_allocator``): the code is :mod:`flatlit.utils.allocator`."""

from flatlit.utils.allocator import tune_allocator

__all__ = ["tune_allocator"]
