"""Sparkplug metric values, times and qualities as float64 / int64 / uint8 columns."""

from __future__ import annotations

import sys
from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.jit import kernel
from ingest.sparkplug.aliases import AliasTable
from ingest.sparkplug.kernel import (
    C_ALIAS,
    C_DATATYPE,
    C_FIELD,
    C_FLAGS,
    C_NAME_START,
    C_QUALITY,
    C_RAW,
    C_TIMESTAMP,
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


# Slots of the `info` array `data_columns` fills.
I_ROWS: Final = 0  # metric rows decoded
I_READINGS: Final = 1  # readings returned
I_SLOW: Final = 2  # 1: the caller must take the general path (see data_columns)
I_UNKNOWN: Final = 3  # row of the first aliased metric the table does not know, -1 if none
I_NULL: Final = 4  # skip counts, by why
I_NONNUMERIC: Final = 5
I_NOVALUE: Final = 6
I_TRANSIENT: Final = 7
I_TIMESTAMP: Final = 8  # the payload's timestamp (ms bits) and whether it has one
I_HAS_TIMESTAMP: Final = 9
I_SEQ: Final = 10
I_HAS_SEQ: Final = 11
INFO: Final = 12


@kernel
def data_columns(
    buf: npt.NDArray[np.uint8],
    max_rows: int,
    max_depth: int,
    rows: npt.NDArray[np.int64],
    info: npt.NDArray[np.int64],
    time: npt.NDArray[np.int64],
    sensor: npt.NDArray[np.int32],
    value: npt.NDArray[np.float64],
    quality: npt.NDArray[np.uint8],
    t_alias: npt.NDArray[np.int64],
    t_sensor: npt.NDArray[np.int32],
    t_datatype: npt.NDArray[np.int64],
    received_us: int,
    lo: int,
    hi: int,
    store_transient: bool,
) -> int:
    """A DATA payload decoded and turned into its readings in one call: the readings kept go to
    the first places of `time`, `sensor`, `value` and `quality` (as long as `rows`), the metric
    rows to `rows`, counts and the payload's timestamp and seq to `info` (INFO long, the I_*
    slots); returns the number of readings. Arrays come from the caller and nothing is returned
    but an int: boxing an array the kernel made costs more than decoding 20 metrics.

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
    m = len(t_alias)
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
            found = False
            if m:
                a = rows[i, C_ALIAS]
                lo_, hi_ = 0, m  # binary search of the sorted alias column
                while lo_ < hi_:
                    mid = (lo_ + hi_) >> 1
                    if t_alias[mid] < a:
                        lo_ = mid + 1
                    else:
                        hi_ = mid
                if lo_ < m and t_alias[lo_] == a:
                    found = True
                    s = t_sensor[lo_]
                    if dt == 0:
                        dt = t_datatype[lo_]
            if not found:
                if info[I_UNKNOWN] < 0:
                    info[I_UNKNOWN] = i
                continue
        f = rows[i, C_FIELD]
        if flags & F_NULL:
            info[I_NULL] += 1
            continue
        if f == 0:
            info[I_NOVALUE] += 1
            continue
        if f >= 15:
            info[I_NONNUMERIC] += 1
            continue
        if dt == 0:  # no datatype anywhere: the value field says what it is
            dt = 7 if f == 10 else (8 if f == 11 else (9 if f == 12 else (10 if f == 13 else 11)))
        v = 0.0
        if f == 12 or f == 13:  # float or double bits
            # the float's bits are the low half of the little-endian int64
            x = np.float64(f32[i, 2 * C_RAW]) if f == 12 else f64[i, C_RAW]
            if 1 <= dt <= 10:
                v = x
            elif dt == 11:
                v = 1.0 if x != 0.0 else 0.0
            else:
                info[I_NONNUMERIC] += 1
                continue
        else:
            r = rows[i, C_RAW]
            if dt == 1 or dt == 5:
                u = r & 0xFF
                v = u - 256 if dt == 1 and u >= 128 else u
            elif dt == 2 or dt == 6:
                u = r & 0xFFFF
                v = u - 65536 if dt == 2 and u >= 32768 else u
            elif dt == 3 or dt == 7:
                u = r & 0xFFFFFFFF
                v = u - 4294967296 if dt == 3 and u >= 2147483648 else u
            elif dt == 4:
                v = r
            elif dt == 8 or dt == 9 or dt == 10:
                v = np.float64(np.uint64(r))
            elif dt == 11:
                v = 1.0 if r != 0 else 0.0
            else:
                info[I_NONNUMERIC] += 1
                continue
        if s < 0:
            continue
        if flags & F_TRANSIENT and not store_transient:
            info[I_TRANSIENT] += 1
            continue
        q = rows[i, C_QUALITY]
        time[k] = t
        sensor[k] = s
        value[k] = v
        quality[k] = (
            GOOD if q < 0 or q == 192 else (BAD if q == 0 else (STALE if q == 500 else UNCERTAIN))
        )
        k += 1
    info[I_READINGS] = k
    return k
