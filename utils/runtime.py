"""Process-wide CPU runtime setting: glibc malloc thresholds, applied once when :mod:`utils` is imported.

With glibc's defaults, the backbone's activation buffers (hundreds of KB to tens of MB, freed
and re-allocated at every layer) are alternately mapped and returned to the kernel, and every
new page is faulted in and zeroed again: 1.9 million minor page faults for one pass of
efficientnet_lite0 over the 711 study images at 128 px. Keeping freed memory in the heap
(mmap threshold fixed at 32 MB, trim threshold 64 MB) took that to 0.18 million, the first
backbone pass from 5.1 s to 3.2 s and a fit from 6.6-6.8 s to 4.0-4.4 s, with peak RSS 0.92 ->
0.93 GB (2-core EPYC, 2 threads; docs in README "Performance"). Large buffers such as the
``(P, d, d)`` covariances (> 32 MB) are still mapped and returned on their own.

Set ``PADIM_MALLOC_TUNING=0`` to leave the allocator alone. Elsewhere than Linux with glibc
nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 64 * 2**20

#: Whether :func:`tune_allocator` changed the thresholds in this process.
ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring); True when applied."""
    global ALLOCATOR_TUNED
    if ALLOCATOR_TUNED:
        return True
    if os.environ.get("PADIM_MALLOC_TUNING", "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Setting either threshold also stops glibc's dynamic adjustment of both; mallopt returns 1 on success.
    ALLOCATOR_TUNED = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return ALLOCATOR_TUNED
