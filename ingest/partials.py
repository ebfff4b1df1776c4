"""Rollup partials an ingester holds in memory across flushes, and the journal rows that make
them crash-safe (schema/011). No I/O here: `ingest.db.rollups` writes and recovers them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.db.binary_copy import PG_EPOCH_US, copy_data
from ingest.db.sink import Appended
from ingest.jit import kernel
from ingest.kernels import HOUR_US, MINUTE_US, Rollup, merge_partials

__all__ = [
    "PARTIAL_COLUMNS",
    "Held",
    "PartialsJournal",
    "compile_kernels",
    "journal_row",
    "partials_copy",
]

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TRAILER = b"\xff\xff"
_INT4_OID, _INT8_OID = 23, 20
JOURNAL_COLUMNS = ("epoch", "flush", "sensors", "times")
PARTIAL_COLUMNS = (
    "bucket",
    "sensor_id",
    "min",
    "max",
    "sum",
    "count",
    "first",
    "first_time",
    "last",
    "last_time",
)
"""The columns of telemetry.rollup_pending, which `partials_copy` fills."""
_PARTIAL_WIRE = (">i8", ">i4", ">f8", ">f8", ">f8", ">i8", ">f8", ">i8", ">f8", ">i8")


def partials_copy(partials: Rollup) -> memoryview:
    """Binary COPY data of rollup partials, in PARTIAL_COLUMNS (rollup_pending's)."""
    columns: list[npt.NDArray[Any]] = [
        partials.bucket - PG_EPOCH_US,
        partials.sensor,
        partials.min,
        partials.max,
        partials.sum,
        partials.count,
        partials.first,
        partials.first_time - PG_EPOCH_US,
        partials.last,
        partials.last_time - PG_EPOCH_US,
    ]
    return copy_data(list(zip(_PARTIAL_WIRE, columns, strict=True)))


def _array(values: npt.NDArray[np.int32] | npt.NDArray[np.int64], oid: int) -> bytes:
    """A one-dimensional array without NULLs in PostgreSQL's binary format, with its length."""
    width = values.dtype.itemsize
    elements = np.empty(len(values), dtype=[("len", ">i4"), ("val", f">i{width}")])
    elements["len"] = width
    elements["val"] = values
    head = np.array([1, 0, oid, len(values), 1], dtype=">i4").tobytes()
    body = head + elements.tobytes()
    return len(body).to_bytes(4, "big") + body


def journal_row(
    epoch: int, flush: int, sensor: npt.NDArray[np.int32], time: npt.NDArray[np.int64]
) -> memoryview:
    """Binary COPY data of one telemetry.rollup_journal row."""
    fields = [
        (4).to_bytes(2, "big"),
        (8).to_bytes(4, "big") + epoch.to_bytes(8, "big", signed=True),
        (8).to_bytes(4, "big") + flush.to_bytes(8, "big", signed=True),
        _array(sensor, _INT4_OID),
        _array(time, _INT8_OID),
    ]
    return memoryview(b"".join([_HEADER, *fields, _TRAILER]))


@dataclass(slots=True)
class Held:
    """What a merge takes out of the journal: the flush parts whose partials it holds, and
    those partials merged per (sensor, minute) and per (sensor, hour)."""

    epoch: int
    flushes: list[int]
    minute: Rollup
    hour: Rollup
    _parts: list[Rollup] = field(default_factory=list)


@kernel
def _hold(
    slot: tuple[npt.NDArray[Any], ...],
    part: tuple[npt.NDArray[Any], ...],
    out: tuple[npt.NDArray[Any], ...],
) -> int:
    """Merge the partials `part` (columns as in Rollup) into the per-sensor slots `slot`
    (indexed by sensor id; a count of 0 is an empty slot), each slot holding its sensor's
    latest bucket. A slot's older bucket and partials older than the slot's bucket go to
    `out` (as long as `part`); returns how many did."""
    s_bucket, s_min, s_max, s_sum, s_count, s_first, s_ft, s_last, s_lt = slot
    p_sensor, p_bucket, p_min, p_max, p_sum, p_count, p_first, p_ft, p_last, p_lt = part
    o_sensor, o_bucket, o_min, o_max, o_sum, o_count, o_first, o_ft, o_last, o_lt = out
    k = 0
    for i in range(p_sensor.shape[0]):
        s = p_sensor[i]
        b = p_bucket[i]
        if s_count[s] > 0 and b == s_bucket[s]:
            if p_min[i] < s_min[s]:
                s_min[s] = p_min[i]
            if p_max[i] > s_max[s]:
                s_max[s] = p_max[i]
            s_sum[s] += p_sum[i]
            s_count[s] += p_count[i]
            if p_ft[i] < s_ft[s]:
                s_first[s] = p_first[i]
                s_ft[s] = p_ft[i]
            if p_lt[i] > s_lt[s]:
                s_last[s] = p_last[i]
                s_lt[s] = p_lt[i]
            continue
        if s_count[s] > 0 and b < s_bucket[s]:  # older than the slot's bucket: out as it is
            o_sensor[k], o_bucket[k], o_min[k], o_max[k] = s, b, p_min[i], p_max[i]
            o_sum[k], o_count[k], o_first[k], o_ft[k] = p_sum[i], p_count[i], p_first[i], p_ft[i]
            o_last[k], o_lt[k] = p_last[i], p_lt[i]
            k += 1
            continue
        if s_count[s] > 0:  # a later bucket: the slot's goes out
            o_sensor[k], o_bucket[k], o_min[k], o_max[k] = s, s_bucket[s], s_min[s], s_max[s]
            o_sum[k], o_count[k], o_first[k], o_ft[k] = s_sum[s], s_count[s], s_first[s], s_ft[s]
            o_last[k], o_lt[k] = s_last[s], s_lt[s]
            k += 1
        s_bucket[s], s_min[s], s_max[s], s_sum[s] = b, p_min[i], p_max[i], p_sum[i]
        s_count[s], s_first[s], s_ft[s] = p_count[i], p_first[i], p_ft[i]
        s_last[s], s_lt[s] = p_last[i], p_lt[i]
    return k


def _columns(n: int) -> Rollup:
    return Rollup(
        sensor=np.empty(n, np.int32),
        bucket=np.empty(n, np.int64),
        min=np.empty(n, np.float64),
        max=np.empty(n, np.float64),
        sum=np.empty(n, np.float64),
        count=np.zeros(n, np.int64),
        first=np.empty(n, np.float64),
        first_time=np.empty(n, np.int64),
        last=np.empty(n, np.float64),
        last_time=np.empty(n, np.int64),
    )


def _fields(r: Rollup, start: int = 0) -> tuple[npt.NDArray[Any], ...]:
    return tuple(getattr(r, f) for f in _FIELDS[start:])


def _select(r: Rollup, rows: npt.NDArray[np.intp] | slice) -> Rollup:
    return Rollup(*(getattr(r, f)[rows] for f in _FIELDS))


_FIELDS = (
    "sensor",
    "bucket",
    "min",
    "max",
    "sum",
    "count",
    "first",
    "first_time",
    "last",
    "last_time",
)


class PartialsJournal:
    """The 1-minute rollup partials of this ingester's committed flushes, not merged yet:
    one slot per sensor for its latest minute (merged as flushes commit, no sorting), and
    the partials of the minutes before, to be merged with them.

    `entry` numbers a flush part and builds its journal row; it may run in worker threads.
    `add`, `take` and `put_back` are called from the event loop's thread only. The epoch is
    set once, from telemetry.rollup_epochs, before the first flush.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self._numbers = itertools.count(1)
        self._flushes: list[int] = []
        self._slots = _columns(0)  # by sensor id
        self._older: list[Rollup] = []

    def __len__(self) -> int:
        """Flush parts held."""
        return len(self._flushes)

    def entry(
        self, sensor: npt.NDArray[np.int32], time: npt.NDArray[np.int64]
    ) -> tuple[int, Appended]:
        """A new flush part's number and journal row naming the readings it rolls up."""
        if self.epoch is None:
            raise RuntimeError("the rollup journal has no epoch yet")
        flush = next(self._numbers)  # atomic under the GIL
        row = journal_row(self.epoch, flush, sensor, time)
        return flush, Appended(table="rollup_journal", columns=JOURNAL_COLUMNS, data=row, rows=1)

    def add(self, flush: int, partials: Rollup) -> None:
        """The 1-minute partials of flush part `flush`, whose journal row committed."""
        self._flushes.append(flush)
        self._hold(partials)

    def _hold(self, partials: Rollup) -> None:
        if not len(partials):
            return
        top = int(partials.sensor.max())
        if top >= len(self._slots.count):
            grown = _columns(max(top + 1, 2 * len(self._slots.count), 1024))
            n = len(self._slots.count)
            for f in _FIELDS:
                getattr(grown, f)[:n] = getattr(self._slots, f)
            self._slots = grown
        out = _columns(len(partials))
        k = _hold(_fields(self._slots, 1), _fields(partials), _fields(out))
        if k:
            self._older.append(_select(out, slice(0, k)))

    def take(self) -> Held | None:
        """Everything held, for a merge (None when nothing is); `put_back` if it fails."""
        if not self._flushes or self.epoch is None:
            return None
        used = np.flatnonzero(self._slots.count)
        held = _select(self._slots, used)
        held.sensor[:] = used
        minute = merge_partials([held, *self._older], bucket_us=MINUTE_US)
        hour = merge_partials([minute], bucket_us=HOUR_US)
        flushes = self._flushes
        self._slots.count[used] = 0
        self._flushes, self._older = [], []
        return Held(self.epoch, flushes, minute, hour, [minute])

    def put_back(self, held: Held) -> None:
        """A merge of `held` did not commit: hold its partials again."""
        self._flushes[:0] = held.flushes
        for part in held._parts:
            self._hold(part)


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, this module's kernel (see `ingest.warmup`)."""
    journal = PartialsJournal()
    journal.add(1, _select(_columns(2), slice(0, 0)))
    part = _columns(1)
    part.sensor[0], part.bucket[0], part.count[0] = 0, 0, 1
    part.first_time[0] = part.last_time[0] = 0
    journal.add(2, part)
