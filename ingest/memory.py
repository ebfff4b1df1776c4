"""Memory settings of the service process: the C allocator's (glibc only) and Python's
garbage collector.

A flush allocates columns of hundreds of kilobytes to megabytes and frees them a moment later.
By default glibc serves such blocks with mmap, or gives the top of its heap back to the system
once more than about as much is free, so the next flush faults the same pages in again: on a
virtual machine that zeroing and faulting costs more than the work done on the arrays. Keeping
up to `TRIM_BYTES` freed at the top of the heap, and serving blocks below `MMAP_BYTES` from
the heap, lets the memory be reused. The resident size then stays near its peak, which the
in-flight caps (`flush.max_inflight_*`) already bound.

Python's cyclic garbage collector runs a young collection every few hundred container objects
and, every hundred of those, a full one over every object in the process: numba, numpy and
their modules hold hundreds of thousands, none of which will ever be garbage. `freeze_startup`
moves everything that exists once the kernels are compiled out of the collector's sight, and
lets young collections run less often.

`InflightBudget` bounds what the pipeline holds: received and not yet acknowledged.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from typing import Final

from ingest import metrics

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MMAP_BYTES: Final = 32 * 1024 * 1024  # glibc's largest allowed mmap threshold on 64-bit
TRIM_BYTES: Final = 64 * 1024 * 1024
YOUNG_THRESHOLD: Final = 20_000  # container allocations between young collections (700)


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


def freeze_startup() -> None:
    """Collect once, then keep every object alive now out of later collections."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


class InflightBudget:
    """Caps what is received and not yet acknowledged, in bytes and readings.

    The in-flight gauges read it when scraped, so taking a message costs no metric update.
    """

    def __init__(self, *, max_bytes: int, max_readings: int) -> None:
        self.max_bytes, self.max_readings = max_bytes, max_readings
        self.bytes = self.readings = self.messages = 0
        self._changed = asyncio.Condition()
        metrics.INFLIGHT_BYTES.set_function(lambda: self.bytes)
        metrics.INFLIGHT_READINGS.set_function(lambda: self.readings)
        metrics.INFLIGHT_MESSAGES.set_function(lambda: self.messages)

    def has_room(self) -> bool:
        return self.bytes < self.max_bytes and self.readings < self.max_readings

    async def wait_for_room(self) -> None:
        if self.has_room():
            return
        async with self._changed:
            await self._changed.wait_for(self.has_room)

    def take(self, *, nbytes: int, readings: int) -> None:
        self.bytes += nbytes
        self.readings += readings
        self.messages += 1

    async def release(self, *, nbytes: int, readings: int, messages: int) -> None:
        async with self._changed:
            self.bytes -= nbytes
            self.readings -= readings
            self.messages -= messages
            self._changed.notify_all()
