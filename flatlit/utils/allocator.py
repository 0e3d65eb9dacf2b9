"""Keep freed CPU memory in the process: glibc ``mallopt`` settings for PyTorch's large, short-lived CPU tensors.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` when freed, so a loop that allocates the same large temporaries again and again (per-example gradients,
Hessian-vector products, Monte-Carlo perturbations of a whole model) pays a page fault for every 4 KiB page on every
pass. On a 2-core machine this made a per-example-gradient pass of lenet over 1,000 examples spend 2.2 of its 2.5 s
in the kernel (1.2 million minor faults); with the settings below it takes 0.85 s and faults almost never
(``benchmarks/measures.py``). The settings are those of glibc's documented tunables (``mallopt(3)``):
``M_MMAP_MAX = 0`` (serve large blocks from the heap), ``M_TRIM_THRESHOLD`` maximal (never give the heap's top back
to the kernel) and ``M_TOP_PAD`` = 64 MiB (grow it in large steps). The cost is that the process keeps its peak heap
until it exits, which is what a training or measuring process does anyway. PyTorch's CPU performance guide suggests
jemalloc or tcmalloc for the same reason; this needs no preloaded library.

``flatlit``'s command line and benchmarks call :func:`tune_allocator` once at start-up; set ``FLATLIT_MALLOC=default``
to keep glibc's defaults. It does nothing on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
_TOP_PAD = 64 << 20
_done: bool | None = None


def tune_allocator() -> bool:
    """Apply the settings above once per process; returns whether glibc accepted them."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("FLATLIT_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_TOP_PAD, _TOP_PAD)]
    _done = all(r == 1 for r in ok)
    return _done
