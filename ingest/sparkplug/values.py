"""Sparkplug metric values, times and qualities as float64 / int64 / uint8 columns."""

from __future__ import annotations

import sys
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from numba import njit

from ingest.jit import kernel
from ingest.sparkplug.aliases import ALIAS, DATATYPE, SENSOR, AliasTable
from ingest.sparkplug.kernel import (
    C_ALIAS,
    C_DATATYPE,
    C_FIELD,
    C_FLAGS,
    C_NAME_START,
    C_QUALITY,
    C_RAW,
    C_TIMESTAMP,
    COLUMNS,
    F_ALIAS,
    F_NULL,
    F_TIMESTAMP,
    F_TRANSIENT,
    decode,
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


@njit(inline="always")
def _quality_code(q: Any) -> Any:
    """Our quality code for a Quality property (-1: none)."""
    return GOOD if q < 0 or q == 192 else (BAD if q == 0 else (STALE if q == 500 else UNCERTAIN))


@njit(inline="always")
def _value(flags: Any, f: Any, raw: Any, x: Any, dt: Any) -> Any:
    """(status, value) of a metric read as datatype `dt` (0: as its value field says), from
    its flags, its value field `f`, the value's bits `raw` and those bits as a float `x`
    (a float's or a double's, as `f` says). Inlined, and given no array: an array argument
    costs a reference count at every call."""
    if flags & F_NULL:
        return NULL, 0.0
    if f == 0:
        return NOVALUE, 0.0
    if f >= 15:
        return NONNUMERIC, 0.0
    if dt == 0:  # no datatype anywhere: the value field says what it is
        dt = 7 if f == 10 else (8 if f == 11 else (9 if f == 12 else (10 if f == 13 else 11)))
    if f == 12 or f == 13:  # float or double bits
        if 1 <= dt <= 10:
            return OK, x
        if dt == 11:
            return OK, 1.0 if x != 0.0 else 0.0
        return NONNUMERIC, 0.0
    if dt == 1 or dt == 5:
        u = raw & 0xFF
        return OK, float(u - 256 if dt == 1 and u >= 128 else u)
    if dt == 2 or dt == 6:
        u = raw & 0xFFFF
        return OK, float(u - 65536 if dt == 2 and u >= 32768 else u)
    if dt == 3 or dt == 7:
        u = raw & 0xFFFFFFFF
        return OK, float(u - 4294967296 if dt == 3 and u >= 2147483648 else u)
    if dt == 4:
        return OK, float(raw)
    if dt == 8 or dt == 9 or dt == 10:
        return OK, np.float64(np.uint64(raw))
    if dt == 11:
        return OK, 1.0 if raw != 0 else 0.0
    return NONNUMERIC, 0.0


@kernel
def _find(aliases: npt.NDArray[np.int64], alias: Any) -> Any:
    """The place of `alias` in the sorted `aliases`, or -1."""
    lo, hi = 0, len(aliases)
    while lo < hi:
        mid = (lo + hi) >> 1
        if aliases[mid] < alias:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < len(aliases) and aliases[lo] == alias else -1


@kernel
def _columns(
    rows: npt.NDArray[np.int64],
    f32: npt.NDArray[np.float32],
    f64: npt.NDArray[np.float64],
    datatype: npt.NDArray[np.int64],
    table: npt.NDArray[np.int64],
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.uint8],
    npt.NDArray[np.int32],
    npt.NDArray[np.bool_],
    npt.NDArray[np.uint8],
]:
    """(value, status, sensor, known, quality) of every metric; see metric_columns."""
    n = rows.shape[0]
    value = np.zeros(n, np.float64)
    status = np.zeros(n, np.uint8)
    sensor = np.full(n, -1, np.int32)
    known = np.zeros(n, np.bool_)
    quality = np.empty(n, np.uint8)
    aliases = table[ALIAS]
    for i in range(n):
        quality[i] = _quality_code(rows[i, C_QUALITY])
        dt = datatype[i] if len(datatype) else rows[i, C_DATATYPE]
        flags, f = rows[i, C_FLAGS], rows[i, C_FIELD]
        if flags & F_ALIAS:
            j = _find(aliases, rows[i, C_ALIAS])
            if j >= 0:
                known[i] = True
                sensor[i] = table[SENSOR, j]
                if dt == 0:
                    dt = table[DATATYPE, j]
        # a float's bits are the low half of the little-endian int64
        x = np.float64(f32[i, 2 * C_RAW]) if f == 12 else f64[i, C_RAW]
        status[i], value[i] = _value(flags, f, rows[i, C_RAW], x, dt)
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
        table.columns,
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


# Slots of the `info` array `data_columns` fills.
I_TIMESTAMP: Final = 0  # the payload's timestamp (ms bits) and whether it has one
I_HAS_TIMESTAMP: Final = 1
I_SEQ: Final = 2  # the payload's seq and whether it has one
I_HAS_SEQ: Final = 3
I_ROWS: Final = 4  # metric rows decoded
I_READINGS: Final = 5  # readings returned
I_SLOW: Final = 6  # 1: the caller must take the general path (see data_columns)
I_UNKNOWN: Final = 7  # row of the first aliased metric the table does not know, -1 if none
I_NULL: Final = 8  # skip counts, by why
I_NONNUMERIC: Final = 9
I_NOVALUE: Final = 10
I_TRANSIENT: Final = 11
INFO: Final = 12

# Columns of the readings that data_columns writes beside the metric rows.
R_TIME: Final = COLUMNS
R_SENSOR: Final = COLUMNS + 1
R_VALUE: Final = COLUMNS + 2  # the float64's bits
R_QUALITY: Final = COLUMNS + 3
DATA_COLUMNS: Final = COLUMNS + 4


@kernel
def data_columns(
    buf: bytes,
    max_rows: int,
    max_depth: int,
    rows: npt.NDArray[np.int64],
    info: npt.NDArray[np.int64],
    table: npt.NDArray[np.int64],
    received_us: int,
    lo: int,
    hi: int,
    store_transient: bool,
) -> int:
    """A DATA payload decoded and turned into its readings in one call: `rows` (DATA_COLUMNS
    wide) gets the metric rows in its first COLUMNS columns and the readings kept in the
    first rows of the R_* columns (time, sensor, the value's bits, quality), `info` (INFO
    long) the payload's timestamp and seq and the counts of the I_* slots; returns the number
    of readings. `table` is an AliasTable's columns. Arrays come from the caller and nothing
    is returned but an int: boxing an array the kernel made costs more than decoding 20
    metrics, and every array argument costs its share of the call.

    Metrics are read as metric_columns, timed as metric_times and filtered as the stage filters
    DATA (status OK, a known sensor, transient ones unless `store_transient`), with the skip
    counts in `info`; an aliased metric the table does not know is no reading and no count.

    info[I_SLOW] is 1, and nothing else is meant to be used, for whatever the general path
    must handle with its precise reasons or by name: a malformed payload or full `rows` (the
    decoder's error), a time outside [lo, hi], or a metric with a name."""
    info[:] = 0
    info[I_UNKNOWN] = -1
    n, head = decode(buf, max_rows, max_depth, rows, np.empty((16, 4), np.int64))
    info[I_ROWS] = n
    if head[4] != 0:
        info[I_SLOW] = 1
        return 0
    info[I_TIMESTAMP], info[I_HAS_TIMESTAMP] = head[0], head[1]
    info[I_SEQ], info[I_HAS_SEQ] = head[2], head[3]
    fallback = received_us
    if head[1]:
        ms = head[0]
        if not 0 <= ms <= 9_223_372_036_854_775:
            info[I_SLOW] = 1  # outside any window: the general path names it
            return 0
        fallback = ms * 1000
        if fallback < lo or fallback > hi:
            info[I_SLOW] = 1
            return 0
    f32 = rows.view(np.float32)
    f64 = rows.view(np.float64)
    aliases = table[ALIAS]
    k = 0
    for i in range(n):
        flags = rows[i, C_FLAGS]
        if rows[i, C_NAME_START] >= 0:
            info[I_SLOW] = 1
            return 0
        if flags & F_TIMESTAMP:
            ms = rows[i, C_TIMESTAMP]
            t = ms * 1000 if 0 <= ms <= 9_223_372_036_854_775 else -1
        else:
            t = fallback
        if t < lo or t > hi:
            info[I_SLOW] = 1
            return 0
        dt = rows[i, C_DATATYPE]
        s = -1
        if flags & F_ALIAS:
            j = _find(aliases, rows[i, C_ALIAS])
            if j < 0:
                if info[I_UNKNOWN] < 0:
                    info[I_UNKNOWN] = i
                continue
            s = table[SENSOR, j]
            if dt == 0:
                dt = table[DATATYPE, j]
        f = rows[i, C_FIELD]
        x = np.float64(f32[i, 2 * C_RAW]) if f == 12 else f64[i, C_RAW]
        status, v = _value(flags, f, rows[i, C_RAW], x, dt)
        if status != OK:
            info[I_NULL + status - NULL] += 1  # the I_* slots are in the status codes' order
            continue
        if s < 0:
            continue
        if flags & F_TRANSIENT and not store_transient:
            info[I_TRANSIENT] += 1
            continue
        # k <= i: row k's metric columns, read already, are not the ones written here
        rows[k, R_TIME] = t
        rows[k, R_SENSOR] = s
        f64[k, R_VALUE] = v
        rows[k, R_QUALITY] = _quality_code(rows[i, C_QUALITY])
        k += 1
    info[I_READINGS] = k
    return k
