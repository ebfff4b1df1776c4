"""Sparkplug metric values, times and qualities as float64 / int64 / uint8 columns."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.kernels import kernel
from ingest.sparkplug.wire import (
    C_FIELD,
    C_FLAGS,
    C_QUALITY,
    C_RAW,
    C_TIMESTAMP,
    F_NULL,
    F_TIMESTAMP,
)

__all__ = [
    "BAD",
    "GOOD",
    "NONNUMERIC",
    "NOVALUE",
    "NULL",
    "OK",
    "STALE",
    "UNCERTAIN",
    "metric_qualities",
    "metric_times",
    "metric_values",
]

# Status of each metric's value.
OK: Final = 0
NULL: Final = 1  # is_null: not stored, counted
NONNUMERIC: Final = 2  # strings, bytes, datasets, files, arrays, templates, ...: counted
NOVALUE: Final = 3  # no value field and not is_null: counted

# Our quality codes for Sparkplug's Quality property (192 good, 0 bad, 500 stale).
GOOD: Final = 0
BAD: Final = 1
STALE: Final = 2
UNCERTAIN: Final = 3  # any other Quality value


@kernel
def _values(
    field: npt.NDArray[np.int64],
    raw: npt.NDArray[np.int64],
    f32: npt.NDArray[np.float32],
    f64: npt.NDArray[np.float64],
    flags: npt.NDArray[np.int64],
    datatype: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    n = len(field)
    value = np.zeros(n, np.float64)
    status = np.zeros(n, np.uint8)
    for i in range(n):
        f = field[i]
        dt = datatype[i]
        if flags[i] & F_NULL:
            status[i] = NULL
            continue
        if f == 0:
            status[i] = NOVALUE
            continue
        if f >= 15:
            status[i] = NONNUMERIC
            continue
        if dt == 0:  # no datatype anywhere: the value field says what it is
            dt = 7 if f == 10 else (8 if f == 11 else (9 if f == 12 else (10 if f == 13 else 11)))
        if f == 12 or f == 13:  # float or double bits
            x = np.float64(f32[i]) if f == 12 else f64[i]
            if 1 <= dt <= 10:
                value[i] = x
            elif dt == 11:
                value[i] = 1.0 if x != 0.0 else 0.0
            else:
                status[i] = NONNUMERIC
            continue
        r = raw[i]
        if dt == 1 or dt == 5:
            v = r & 0xFF
            value[i] = v - 256 if dt == 1 and v >= 128 else v
        elif dt == 2 or dt == 6:
            v = r & 0xFFFF
            value[i] = v - 65536 if dt == 2 and v >= 32768 else v
        elif dt == 3 or dt == 7:
            v = r & 0xFFFFFFFF
            value[i] = v - 4294967296 if dt == 3 and v >= 2147483648 else v
        elif dt == 4:
            value[i] = r
        elif dt == 8 or dt == 9 or dt == 10:
            value[i] = np.float64(np.uint64(r))
        elif dt == 11:
            value[i] = 1.0 if r != 0 else 0.0
        else:
            status[i] = NONNUMERIC
    return value, status


def metric_values(
    rows: npt.NDArray[np.int64], datatype: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """(value, status) of every metric row, reading each value as `datatype` says (from the
    metric itself or from its birth). Int8/16/32 (and UInt8/16/32) are masked to their width,
    the signed ones read as two's complement; Int64 and UInt64 are taken as they are; Boolean is
    0/1. Status OK, NULL, NONNUMERIC or NOVALUE; the value is 0 unless OK."""
    raw = np.ascontiguousarray(rows[:, C_RAW])
    f32 = raw.astype(np.uint32).view(np.float32)
    return _values(
        np.ascontiguousarray(rows[:, C_FIELD]),
        raw,
        f32,
        raw.view(np.float64),
        np.ascontiguousarray(rows[:, C_FLAGS]),
        np.ascontiguousarray(datatype, dtype=np.int64),
    )


def metric_times(
    rows: npt.NDArray[np.int64], *, payload_ms: int | None, received_us: int
) -> npt.NDArray[np.int64]:
    """Microseconds of every metric: its own timestamp, else the payload's, else the receive
    time. A timestamp of 2^63 ms or more reads as negative and fails the caller's window."""
    fallback = received_us if payload_ms is None else payload_ms * 1000
    if not -(2**63) <= fallback < 2**63:
        fallback = -1
    own = (rows[:, C_FLAGS] & F_TIMESTAMP) != 0
    ms = rows[:, C_TIMESTAMP]
    out = np.where(own, ms * 1000, fallback).astype(np.int64)
    too_big = own & ((ms > (2**63 - 1) // 1000) | (ms < 0))
    out[too_big] = -1
    return out


def metric_qualities(rows: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Our quality code of every metric from its Quality property (absent: good)."""
    q = rows[:, C_QUALITY]
    out = np.full(len(q), UNCERTAIN, np.uint8)
    out[(q == 192) | (q < 0)] = GOOD
    out[q == 0] = BAD
    out[q == 500] = STALE
    return out
