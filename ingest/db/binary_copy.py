"""PostgreSQL binary COPY data built from numpy columns, and handed to asyncpg in slices."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.kernels import copy_rows

__all__ = ["HEADER", "PG_EPOCH_US", "TRAILER", "Slices", "copy_data", "readings_copy"]

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
"""What binary COPY data starts with: the signature, no flags, no header extension."""
TRAILER = (-1).to_bytes(2, "big", signed=True)
"""What it ends with: a field count of -1."""
_LITTLE_ENDIAN = sys.byteorder == "little"


def copy_data(columns: Sequence[tuple[str, npt.NDArray[Any]]]) -> memoryview:
    """Binary COPY data for equal-length columns, each with its big-endian wire type (">i2",
    ">i4", ">i8", ">f8"), built without a row loop."""
    n = len(columns[0][1]) if columns else 0
    fields: list[tuple[str, str]] = [("nfields", ">i2")]
    for i, (wire, _) in enumerate(columns):
        fields += [(f"len{i}", ">i4"), (f"val{i}", wire)]
    dtype = np.dtype(fields)
    buf = np.empty(len(HEADER) + n * dtype.itemsize + len(TRAILER), dtype=np.uint8)
    buf[: len(HEADER)] = np.frombuffer(HEADER, dtype=np.uint8)
    buf[len(buf) - len(TRAILER) :] = np.frombuffer(TRAILER, dtype=np.uint8)
    rows = buf[len(HEADER) : len(buf) - len(TRAILER)].view(dtype)
    rows["nfields"] = len(columns)
    for i, (_, values) in enumerate(columns):
        rows[f"len{i}"] = dtype[f"val{i}"].itemsize
        rows[f"val{i}"] = values
    return buf.data


def readings_copy(
    time: npt.NDArray[np.int64],
    sensor: npt.NDArray[np.int32],
    value: npt.NDArray[np.float64],
    quality: npt.NDArray[np.uint8],
) -> memoryview:
    """Binary COPY data of readings (time, sensor_id, value, quality), `time` in Unix µs.

    The same bytes as `copy_data` gives, written in one pass by a kernel: 0.13 ms for 100,000
    readings against 2-5 ms for a field at a time (on little-endian machines; others take
    `copy_data`)."""
    if not _LITTLE_ENDIAN:
        columns: list[tuple[str, npt.NDArray[Any]]] = [
            (">i8", time - PG_EPOCH_US),
            (">i4", sensor),
            (">f8", value),
            (">i2", quality),
        ]
        return copy_data(columns)
    head, size = len(HEADER), len(HEADER) + 40 * len(time) + len(TRAILER)
    raw = np.empty(size + 8, dtype=np.uint8)
    start = -(raw.ctypes.data + head) % 8  # the rows start on a 64-bit boundary
    buf = raw[start : start + size]
    buf[:head] = np.frombuffer(HEADER, dtype=np.uint8)
    buf[size - len(TRAILER) :] = np.frombuffer(TRAILER, dtype=np.uint8)
    rows = buf[head : size - len(TRAILER)].view(np.uint64)
    copy_rows(rows, time, sensor, value.view(np.uint64), quality, PG_EPOCH_US)
    return buf.data


class Slices:
    """COPY data as an asyncpg source, in slices of 256 KiB. asyncpg copies what it is given
    into a message buffer of that size: one of a whole flush's size (megabytes) is fresh memory
    to fault in at every flush, one of a slice's size is reused. On a 100,000-reading flush:
    4.0 ms of client CPU for the COPY given as one buffer, 1.9 ms in slices."""

    _SIZE = 256 * 1024

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._at = 0

    def __aiter__(self) -> Slices:
        return self

    async def __anext__(self) -> memoryview:
        at = self._at
        if at >= len(self._data):
            raise StopAsyncIteration
        self._at = at + self._SIZE
        return self._data[at : at + self._SIZE]
