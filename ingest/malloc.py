"""The C allocator's settings for the service process (glibc only).

A flush allocates columns of hundreds of kilobytes to megabytes and frees them a moment later.
By default glibc serves such blocks with mmap, or gives the top of its heap back to the system
once more than about as much is free, so the next flush faults the same pages in again: on a
virtual machine that zeroing and faulting costs more than the work done on the arrays. Keeping
up to `TRIM_BYTES` freed at the top of the heap, and serving blocks below `MMAP_BYTES` from
the heap, lets the memory be reused. The resident size then stays near its peak, which the
in-flight caps (`flush.max_inflight_*`) already bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MMAP_BYTES: Final = 32 * 1024 * 1024  # glibc's largest allowed mmap threshold on 64-bit
TRIM_BYTES: Final = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Apply the settings above; False (and nothing changed) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: allocator settings left as they are")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES)
    )
