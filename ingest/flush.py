"""A flush: the messages gathered for one database transaction, and their readings assembled
into columns sorted by (sensor, time). No I/O here."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np
import numpy.typing as npt

from ingest import metrics
from ingest.db.dead_letters import DeadLetter
from ingest.db.registry import SensorKey
from ingest.db.sink import Readings
from ingest.decode import Batch
from ingest.kernels import check_sorted, gather
from ingest.mqtt import Received
from ingest.shapes import Settled, Shaped
from ingest.sparkplug.stage import Columns, Item, Prepared

__all__ = [
    "Accepted",
    "Carried",
    "FlushJob",
    "build_readings",
    "carry_held",
    "channel_keys",
    "clean",
    "dead_letter",
    "merge_sparkplug",
    "sort_readings",
]


class Accepted(msgspec.Struct, gc=False):
    """A decoded message: its topic levels, its batch, and the message itself. A payload
    shaped like its topic's last one gets its batch when its flush is settled (`shaped`).

    A Struct outside the garbage collector: one is made per message, in a third of a
    dataclass's time, and triggers no collection (it is never part of a cycle)."""

    levels: tuple[str, ...]
    batch: Batch | None
    received: Received | None = None
    shaped: Shaped | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Its channels' sensor names."""
        return self.shaped.shape.names if self.batch is None and self.shaped else self.decoded.names

    @property
    def units(self) -> tuple[str | None, ...]:
        return self.shaped.shape.units if self.batch is None and self.shaped else self.decoded.units

    @property
    def decoded(self) -> Batch:
        """The batch (see `FlushJob.batch` for a shaped payload's)."""
        assert self.batch is not None, "a flush's shaped payloads are read before it is written"
        return self.batch


@dataclass(slots=True)
class FlushJob:
    """Messages gathered for one flush, in arrival order."""

    received: list[Received] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    readings: int = 0
    nbytes: int = 0
    sparkplug: list[Item] = field(default_factory=list)
    # Prepared again while no part of the flush has committed, else kept for its retries.
    sparkplug_prepared: Prepared | None = None
    carried: int = 0  # Sparkplug messages held back from an earlier flush
    # The readings of every accepted message in arrival order, when all were shaped payloads
    # read together: `build_readings` takes them as they are, and their messages get no batch
    # of their own unless asked for one (`batch`).
    columns: Settled | None = None

    def __bool__(self) -> bool:
        return bool(self.received)

    def has_news(self) -> bool:
        """Whether it holds more than messages carried from an earlier flush."""
        return len(self.received) > self.carried

    def batch(self, i: int) -> Batch:
        """The batch of accepted message i."""
        item = self.accepted[i]
        if item.batch is None and self.columns is not None:
            item.batch = self.columns.batch(i)
        return item.decoded

    def drop_columns(self) -> None:
        """Give every accepted message its batch; the messages may change after."""
        if self.columns is not None:
            for i in range(len(self.accepted)):
                self.batch(i)
            self.columns = None

    def reject(self, msg: Received, reason: str) -> None:
        """Store `msg` as a dead letter with `reason`, and count it."""
        self.dead_letters.append(dead_letter(msg, reason))
        metrics.DEAD_LETTERS.labels(metrics.reason_field(reason)).inc()


def dead_letter(msg: Received, reason: str) -> DeadLetter:
    """`msg` as the dead letter stored for `reason`."""
    return DeadLetter(
        received_us=msg.received_ns // 1000,
        topic=clean(msg.topic) or "",
        payload=msg.payload,
        reason=clean(reason) or reason,
        content_type=clean(msg.content_type),
    )


@dataclass(slots=True)
class Carried:
    """The messages of a flush carried into the next one, by index, and their size."""

    indices: set[int] = field(default_factory=set)
    nbytes: int = 0
    readings: int = 0


def carry_held(job: FlushJob, target: FlushJob) -> Carried:
    """Move the Sparkplug messages a committed `job` held back (DATA waiting for a birth) into
    `target`, the flush being gathered; what moved, to be left unacknowledged."""
    carried = Carried()
    if job.sparkplug_prepared is None or not job.sparkplug_prepared.held:
        return carried
    items = {item.index: item for item in job.sparkplug}
    for i in job.sparkplug_prepared.held:
        item, msg = items[i], job.received[i]
        target.sparkplug.append(dataclasses.replace(item, index=len(target.received)))
        target.received.append(msg)
        target.carried += 1
        target.nbytes += len(msg.payload)
        target.readings += len(item.decoded)
        carried.indices.add(i)
        carried.nbytes += len(msg.payload)
        carried.readings += len(item.decoded)
    return carried


def channel_keys(job: FlushJob) -> list[SensorKey]:
    """The sensor of every channel of the flush, in arrival order."""
    return [SensorKey(item.levels, name) for item in job.accepted for name in item.names]


def build_readings(
    job: FlushJob, sensor_ids: Sequence[int | None] | npt.NDArray[np.int32]
) -> tuple[Readings, int]:
    """The flush's readings as columns sorted by (sensor, time); for a repeated (sensor, time)
    the reading that arrived last wins. Returns the columns and how many were superseded.
    `sensor_ids` holds the id of every channel's sensor, in arrival order.

    Channels usually hold rising times, and a sensor's channels from later messages start
    after the earlier ones end: then gathering whole channels in (sensor, first time) order
    sorts the flush, which one linear check confirms. Anything else takes a stable sort of
    every reading.
    """
    if not len(sensor_ids):
        empty = Readings(
            np.empty(0, np.int64),
            np.empty(0, np.int32),
            np.empty(0, np.float64),
            np.empty(0, np.uint8),
        )
        return empty, 0
    if not isinstance(sensor_ids, np.ndarray):
        assert None not in sensor_ids, "resolve() registers every sensor of the flush first"
    sensor = np.asarray(sensor_ids, dtype=np.int32)  # per channel, in arrival order
    columns = job.columns
    if columns is not None:
        lengths, time, value = columns.lengths, columns.time, columns.value
        quality = np.zeros(len(time), np.uint8)
    else:
        batches = [item.decoded for item in job.accepted]
        lengths = np.array([n for b in batches for n in b.counts], dtype=np.int64)
        time = np.concatenate([b.time for b in batches])
        value = np.concatenate([b.value for b in batches])
        quality = np.concatenate([b.quality for b in batches])
    starts = np.cumsum(lengths) - lengths
    order = np.lexsort((time[starts], sensor))  # stable: ties keep arrival order
    slab = Readings(*gather(time, value, quality, starts[order], lengths[order], sensor[order]))
    if check_sorted(slab.sensor, slab.time) < 0:
        return slab, 0
    return sort_readings(Readings(time, np.repeat(sensor, lengths), value, quality))


def sort_readings(arrived: Readings) -> tuple[Readings, int]:
    """`arrived` (in arrival order) sorted by (sensor, time), keeping the last of equal keys."""
    order = np.lexsort((arrived.time, arrived.sensor))  # stable: equal keys keep arrival order
    time_col, sensor_col = arrived.time[order], arrived.sensor[order]
    value_col, quality_col = arrived.value[order], arrived.quality[order]
    repeated = (sensor_col[1:] == sensor_col[:-1]) & (time_col[1:] == time_col[:-1])
    if repeated.any():
        keep = np.ones(len(time_col), dtype=bool)
        keep[:-1] = ~repeated
        slab = Readings(time_col[keep], sensor_col[keep], value_col[keep], quality_col[keep])
        return slab, int(repeated.sum())
    return Readings(time_col, sensor_col, value_col, quality_col), 0


def merge_sparkplug(readings: Readings, columns: Columns) -> tuple[Readings, int]:
    """Sorted `readings` with a flush's Sparkplug readings (arrival order) added; a repeated
    (sensor, time) keeps the later one. Returns the readings and how many were superseded."""
    if not len(columns.time):
        return readings, 0
    return sort_readings(
        Readings(
            np.concatenate([readings.time, columns.time]),
            np.concatenate([readings.sensor, columns.sensor]),
            np.concatenate([readings.value, columns.value]),
            np.concatenate([readings.quality, columns.quality]),
        )
    )


def clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; keep everything else as received."""
    return None if text is None else text.replace("\x00", "\\x00")
