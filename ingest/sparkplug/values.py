"""Sparkplug metric values, times and qualities as float64 / int64 / uint8 columns."""

from __future__ import annotations

import sys
from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.kernels import kernel
from ingest.sparkplug.aliases import AliasTable
from ingest.sparkplug.kernel import (
    C_ALIAS,
    C_DATATYPE,
    C_FIELD,
    C_FLAGS,
    C_QUALITY,
    C_RAW,
    C_TIMESTAMP,
    F_ALIAS,
    F_NULL,
    F_TIMESTAMP,
)

_EMPTY: Final = AliasTable.empty()
_NONE: Final = np.empty(0, np.int64)
_LITTLE_ENDIAN: Final = sys.byteorder == "little"

__all__ = [
    "BAD",
    "GOOD",
    "NONNUMERIC",
    "NOVALUE",
    "NULL",
    "OK",
    "STALE",
    "UNCERTAIN",
    "metric_columns",
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
def _columns(
    rows: npt.NDArray[np.int64],
    f32: npt.NDArray[np.float32],
    f64: npt.NDArray[np.float64],
    datatype: npt.NDArray[np.int64],
    t_alias: npt.NDArray[np.int64],
    t_sensor: npt.NDArray[np.int32],
    t_datatype: npt.NDArray[np.int64],
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.uint8],
    npt.NDArray[np.int32],
    npt.NDArray[np.bool_],
    npt.NDArray[np.uint8],
]:
    """(value, status, sensor, known, quality) of every metric; see metric_columns."""
    n = rows.shape[0]
    quality = np.empty(n, np.uint8)
    for i in range(n):
        q = rows[i, C_QUALITY]
        quality[i] = (
            GOOD if q < 0 or q == 192 else (BAD if q == 0 else (STALE if q == 500 else UNCERTAIN))
        )
    value = np.zeros(n, np.float64)
    status = np.zeros(n, np.uint8)
    sensor = np.full(n, -1, np.int32)
    known = np.zeros(n, np.bool_)
    m = len(t_alias)
    for i in range(n):
        dt = datatype[i] if len(datatype) else rows[i, C_DATATYPE]
        flags = rows[i, C_FLAGS]
        if flags & F_ALIAS and m:
            lo, hi = 0, m  # binary search of the sorted alias column
            a = rows[i, C_ALIAS]
            while lo < hi:
                mid = (lo + hi) >> 1
                if t_alias[mid] < a:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < m and t_alias[lo] == a:
                known[i] = True
                sensor[i] = t_sensor[lo]
                if dt == 0:
                    dt = t_datatype[lo]
        f = rows[i, C_FIELD]
        if flags & F_NULL:
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
            # the float's bits are the low half of the little-endian int64
            x = np.float64(f32[i, 2 * C_RAW]) if f == 12 else f64[i, C_RAW]
            if 1 <= dt <= 10:
                value[i] = x
            elif dt == 11:
                value[i] = 1.0 if x != 0.0 else 0.0
            else:
                status[i] = NONNUMERIC
            continue
        r = rows[i, C_RAW]
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
    return value, status, sensor, known, quality


def metric_columns(
    rows: npt.NDArray[np.int64],
    datatype: npt.NDArray[np.int64] | None = None,
    table: AliasTable | None = None,
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.uint8],
    npt.NDArray[np.int32],
    npt.NDArray[np.bool_],
    npt.NDArray[np.uint8],
]:
    """(value, status, sensor, known, quality) of every metric row, in one pass: an aliased
    metric's sensor (and, where its datatype is 0, its datatype) from `table`, `known` where
    found. The datatype is `datatype`'s, else (None) the metric's own.

    Each value is read as its datatype says: Int8/16/32 (and UInt8/16/32) masked to their
    width, the signed ones read as two's complement; Int64 and UInt64 as they are; Boolean 0/1.
    Status OK, NULL, NONNUMERIC or NOVALUE; the value is 0 unless OK. Quality: our code for
    the Quality property (192 or none good, 0 bad, 500 stale, others uncertain)."""
    table = table if table is not None else _EMPTY
    rows = np.ascontiguousarray(rows)
    if not _LITTLE_ENDIAN:  # pragma: no cover - the float bits are read from the low half
        raise RuntimeError("Sparkplug value columns need a little-endian machine")
    return _columns(
        rows,
        rows.view(np.float32),
        rows.view(np.float64),
        _NONE if datatype is None else np.ascontiguousarray(datatype, dtype=np.int64),
        table.aliases,
        table.sensors,
        table.datatypes,
    )


def metric_values(
    rows: npt.NDArray[np.int64], datatype: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """(value, status) of every metric row read as `datatype` (see metric_columns)."""
    value, status, _, _, _ = metric_columns(rows, datatype)
    return value, status


def metric_times(
    rows: npt.NDArray[np.int64], *, payload_ms: int | None, received_us: int
) -> npt.NDArray[np.int64]:
    """Microseconds of every metric: its own timestamp, else the payload's, else the receive
    time. A timestamp of 2^63 ms or more reads as negative and fails the caller's window."""
    fallback = received_us if payload_ms is None else payload_ms * 1000
    if not -(2**63) <= fallback < 2**63:
        fallback = -1
    return _times(rows, fallback)


@kernel
def _times(rows: npt.NDArray[np.int64], fallback: int) -> npt.NDArray[np.int64]:
    n = rows.shape[0]
    out = np.empty(n, np.int64)
    for i in range(n):
        if rows[i, C_FLAGS] & F_TIMESTAMP:
            ms = rows[i, C_TIMESTAMP]
            out[i] = ms * 1000 if 0 <= ms <= 9_223_372_036_854_775 else -1
        else:
            out[i] = fallback
    return out
