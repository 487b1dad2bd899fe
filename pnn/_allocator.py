"""Keep glibc from handing large freed blocks back to the kernel between training steps.

A training step allocates and frees temporaries the size of a weight matrix (gradients,
optimizer steps, applied changes). With glibc's defaults, a freed block of a few megabytes is
returned to the kernel (by trimming the heap or unmapping it), and the next step's block of the
same size page-faults its memory back in and has it zeroed. On a 784-256-256-10 network at
batch size 1 that doubled the time of a step (docs/benchmarks.md, "Training speed").
:func:`keep_freed_memory` raises glibc's trim and mmap thresholds once per process, so freed
blocks stay in the heap for reuse. The process keeps its peak heap size until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TRIM_BYTES = 1 << 30
_MMAP_BYTES = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit systems

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds once; return True if they were set.

    Does nothing on other C libraries and platforms, when the user set either threshold through
    glibc's own environment variables (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``), or
    when ``PNN_DEFAULT_MALLOC=1`` is set.
    """
    global _done
    if _done:
        return False
    _done = True
    if not sys.platform.startswith("linux") or os.environ.get("PNN_DEFAULT_MALLOC") == "1":
        return False
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES))
    log.debug("glibc malloc thresholds raised (trim %d bytes, mmap %d bytes): %s", _TRIM_BYTES, _MMAP_BYTES, ok)
    return ok
