"""Rollup partials an ingester holds in memory across flushes, and the journal rows that make
them crash-safe (schema/011). No I/O here: `ingest.db.rollups` writes and recovers them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.db.sink import PG_EPOCH_US, Appended, copy_data
from ingest.kernels import HOUR_US, MINUTE_US, Rollup, merge_partials, rollup

__all__ = ["PARTIAL_COLUMNS", "Held", "PartialsJournal", "journal_row", "partials_copy"]

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TRAILER = b"\xff\xff"
_INT4_OID, _INT8_OID = 23, 20
# Merge what accumulated once it holds this many partials, and at least as many as the merged
# ones: each partial takes part in a few merges at most, and memory stays near one row per
# (sensor, minute) held.
_COMPACT_MIN = 200_000
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


class PartialsJournal:
    """The 1-minute rollup partials of this ingester's committed flushes, not merged yet.

    `entry` numbers a flush part and builds its journal row; it may run in worker threads.
    `add`, `take` and `put_back` are called from the event loop's thread only. The epoch is
    set once, from telemetry.rollup_epochs, before the first flush.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self._numbers = itertools.count(1)
        self._flushes: list[int] = []
        self._parts: list[Rollup] = []
        self._rows = 0
        self._merged = 0  # rows of the last merge of self._parts

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
        """The partials of flush part `flush`, whose journal row committed."""
        self._flushes.append(flush)
        if not len(partials):
            return
        self._parts.append(partials)
        self._rows += len(partials)
        if len(self._parts) > 1 and self._rows >= max(_COMPACT_MIN, 2 * self._merged):
            merged = merge_partials(self._parts, bucket_us=MINUTE_US)
            self._parts, self._rows, self._merged = [merged], len(merged), len(merged)

    def take(self) -> Held | None:
        """Everything held, for a merge (None when nothing is); `put_back` if it fails."""
        if not self._flushes or self.epoch is None:
            return None
        parts, flushes = self._parts, self._flushes
        self._parts, self._flushes, self._rows, self._merged = [], [], 0, 0
        empty = rollup(
            sensor=np.empty(0, np.int32),
            time=np.empty(0, np.int64),
            value=np.empty(0, np.float64),
            bucket_us=MINUTE_US,
        )
        minute = merge_partials(parts, bucket_us=MINUTE_US) if parts else empty
        hour = merge_partials([minute], bucket_us=HOUR_US) if parts else empty
        return Held(self.epoch, flushes, minute, hour, [minute])

    def put_back(self, held: Held) -> None:
        """A merge of `held` did not commit: hold its partials again."""
        self._flushes[:0] = held.flushes
        self._parts[:0] = held._parts
        self._rows += sum(len(p) for p in held._parts)
