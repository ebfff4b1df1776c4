"""What a flush writes besides its readings: rollups, anomaly events, sensors' last-seen times."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest import metrics
from ingest.anomaly.detector import AnomalyDetector, Event, Pending, StateNeed
from ingest.anomaly.rules import AnomalyRule, rule_for
from ingest.db.registry import Registry
from ingest.db.sink import PG_EPOCH_US, Appended, Extra, Readings, Upsert, copy_data
from ingest.kernels import MINUTE_US, Rollup, rollup

# Microseconds since the Unix epoch to timestamptz, exactly, inside the database.
_TS = "(timestamptz 'epoch' + {} * interval '1 microsecond')"


# A flush appends the 1-minute partials of its new readings to telemetry.rollup_pending with
# one COPY; ingest.db.rollups moves them into both rollup tables in bulk (schema/003).
_PENDING_COLUMNS = (
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
_PENDING_WIRE = (">i8", ">i4", ">f8", ">f8", ">f8", ">i8", ">f8", ">i8", ">f8", ">i8")

ANOMALY_SQL = f"""
INSERT INTO telemetry.anomalies AS a (start_time, sensor_id, kind, end_time, value, score, detail)
SELECT {_TS.format("e.start_time")}, e.sensor_id, e.kind,
       CASE WHEN e.end_time IS NULL THEN NULL ELSE {_TS.format("e.end_time")} END,
       e.value, e.score, e.detail
  FROM unnest($1::int8[], $2::int[], $3::text[], $4::int8[], $5::float8[], $6::float8[],
              $7::text[]) AS e(start_time, sensor_id, kind, end_time, value, score, detail)
ON CONFLICT (sensor_id, kind, start_time) DO UPDATE SET
    end_time = EXCLUDED.end_time, value = EXCLUDED.value, score = EXCLUDED.score,
    detail = EXCLUDED.detail
"""

# A sensor's last-seen time moves forward only.
LAST_SEEN_SQL = f"""
UPDATE telemetry.sensors s SET last_seen = {_TS.format("v.t")}
  FROM unnest($1::int[], $2::int8[]) AS v(id, t)
 WHERE s.id = v.id AND (s.last_seen IS NULL OR s.last_seen < {_TS.format("v.t")})
"""

_US = "(extract(epoch FROM {}) * 1000000)::int8"
_FINITE = "value NOT IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8)"
# The history a sensor's anomaly state is rebuilt from: its last n committed finite readings,
# and every finite reading within span microseconds of its latest one. Readings of the coming
# flush that are older than those are late for the detector, as they would have been for an
# ingester that had run all along.
_HISTORY_SQL = f"""
SELECT k.sensor_id, {_US.format("h.time")} AS t, h.value
  FROM unnest($1::int[], $2::int[], $3::int8[]) AS k(sensor_id, n, span)
 CROSS JOIN LATERAL (
       SELECT time, value FROM telemetry.readings
        WHERE sensor_id = k.sensor_id AND {_FINITE}
        ORDER BY time DESC LIMIT k.n
 ) AS h
UNION
SELECT k.sensor_id, {_US.format("r.time")}, r.value
  FROM unnest($1::int[], $2::int[], $3::int8[]) AS k(sensor_id, n, span)
 CROSS JOIN LATERAL (
       SELECT max(time) AS latest FROM telemetry.readings
        WHERE sensor_id = k.sensor_id AND {_FINITE}
 ) AS l
  JOIN telemetry.readings r
    ON r.sensor_id = k.sensor_id AND k.span > 0
   AND r.time > l.latest - k.span * interval '1 microsecond' AND r.{_FINITE}
 ORDER BY 1, 2
"""
_OPEN_EVENTS_SQL = f"""
SELECT sensor_id, kind, {_US.format("start_time")} AS start, value, score, detail
  FROM telemetry.anomalies WHERE sensor_id = ANY($1::int[]) AND end_time IS NULL
"""


def segment_ends(sensor: npt.NDArray[np.int32]) -> npt.NDArray[np.intp]:
    """Index of the last row of each sensor's run in a slab sorted by sensor."""
    if not len(sensor):
        return np.empty(0, dtype=np.intp)
    return np.flatnonzero(np.append(sensor[1:] != sensor[:-1], True))


def _pending_append(partials: Rollup) -> Appended:
    """The 1-minute rollup partials of a flush's new rows, as one COPY into rollup_pending."""
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
    return Appended(
        table="rollup_pending",
        columns=_PENDING_COLUMNS,
        data=copy_data(list(zip(_PENDING_WIRE, columns, strict=True))),
        rows=len(partials.sensor),
    )


def _anomaly_upsert(events: Sequence[Event]) -> Upsert:
    return Upsert(
        ANOMALY_SQL,
        (
            [e.start for e in events],
            [e.sensor for e in events],
            [e.kind for e in events],
            [e.end for e in events],
            [e.value for e in events],
            [e.score for e in events],
            [e.detail for e in events],
        ),
    )


@dataclass(frozen=True, slots=True)
class Derived:
    """What `Deriver.derive` computed for some new rows: their extra writes, and what to apply
    to the deriver once those committed."""

    upserts: list[Extra]
    rollup_partials: int = 0
    """Rollup partials appended, for the metrics."""
    pending: Pending | None = None
    last_seen: tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]] | None = None
    """Sensors whose last-seen time this writes, and those times."""


class Deriver:
    """Computes a flush's extra writes. Called from the writer task only.

    `prepare` reads what it needs from the database before the flush's transactions. `derive`
    never awaits and changes nothing: it may run in worker threads, for disjoint sets of
    sensors at once, while the writer task awaits. `commit` applies a `Derived` once the
    transaction that wrote it has committed; a `Derived` whose transaction failed is dropped.
    """

    def __init__(self, *, rules: Sequence[AnomalyRule], rollups: bool, registry: Registry) -> None:
        self._rules = tuple(rules)
        self._rollups = rollups
        self._registry = registry
        self.detector = AnomalyDetector()
        self._assigned: set[int] = set()
        self._open: set[tuple[int, str, int]] = set()  # open events, to count new ones

    async def prepare(self, conn: asyncpg.Connection, *, readings: Readings) -> None:
        """Give new sensors their anomaly rule and rebuild the state of sensors seen first."""
        if not self._rules or not len(readings):
            return
        sensor_ids = readings.sensor[segment_ends(readings.sensor)]
        for sensor_id in sensor_ids.tolist():
            if sensor_id not in self._assigned:
                device, name = self._registry.name_of(sensor_id)
                rule = rule_for(rules=self._rules, path=f"{device}/{name}")
                self.detector.assign(sensor_id=sensor_id, rule=rule)
                self._assigned.add(sensor_id)
        needs = self.detector.state_needed(sensor_ids=sensor_ids)
        if needs:
            await self._restore(conn, needs)

    async def _restore(self, conn: asyncpg.Connection, needs: dict[int, StateNeed]) -> None:
        ids = list(needs)
        rows = await conn.fetch(
            _HISTORY_SQL, ids, [needs[i].readings for i in ids], [needs[i].span_us for i in ids]
        )
        events = await conn.fetch(_OPEN_EVENTS_SQL, ids)
        history: dict[int, tuple[list[int], list[float]]] = {i: ([], []) for i in ids}
        for row in rows:
            times, values = history[row["sensor_id"]]
            times.append(row["t"])
            values.append(row["value"])
        open_events: dict[int, list[Event]] = {i: [] for i in ids}
        for row in events:
            open_events[row["sensor_id"]].append(
                Event(
                    sensor=row["sensor_id"],
                    kind=row["kind"],
                    start=row["start"],
                    end=None,
                    value=row["value"],
                    score=row["score"],
                    detail=row["detail"],
                )
            )
            self._open.add((row["sensor_id"], row["kind"], row["start"]))
        for sensor_id in ids:
            times, values = history[sensor_id]
            self.detector.restore(
                sensor_id=sensor_id,
                time=np.asarray(times, np.int64),
                value=np.asarray(values, np.float64),
                open_events=open_events[sensor_id],
            )

    def derive(self, new: Readings) -> Derived:
        """The extra writes for rows of a flush that were new. Never awaits, changes nothing."""
        out: list[Extra] = []
        if not len(new):
            return Derived(out)
        partials = 0
        if self._rollups:
            minute = rollup(sensor=new.sensor, time=new.time, value=new.value, bucket_us=MINUTE_US)
            out.append(_pending_append(minute))
            partials = len(minute.sensor)
        pending = None
        if self._rules:
            pending = self.detector.process(sensor=new.sensor, time=new.time, value=new.value)
            if pending.events:
                out.append(_anomaly_upsert(pending.events))
        ends = segment_ends(new.sensor)  # each sensor's latest new reading
        latest_sensor, latest_time = new.sensor[ends], new.time[ends]
        due = self._registry.last_seen_due(latest_sensor, latest_time)
        last_seen = (latest_sensor[due], latest_time[due])
        if len(last_seen[0]):
            out.append(Upsert(LAST_SEEN_SQL, (last_seen[0].tolist(), last_seen[1].tolist())))
        return Derived(out, partials, pending, last_seen)

    def commit(self, derived: Derived) -> None:
        """`derived` committed: advance the anomaly state and count what was written."""
        pending = derived.pending
        if pending is not None:
            self.detector.commit(pending)
            metrics.LATE_READINGS.inc(pending.late)
            for event in pending.events:
                key = (event.sensor, event.kind, event.start)
                if key not in self._open:
                    metrics.ANOMALIES.labels(event.kind).inc()
                if event.end is None:
                    self._open.add(key)
                else:
                    self._open.discard(key)
        if derived.last_seen is not None and len(derived.last_seen[0]):
            self._registry.last_seen_written(*derived.last_seen)
        metrics.ROLLUP_PARTIALS.inc(derived.rollup_partials)
