"""What a flush writes besides its readings: rollups, anomaly events, sensors' last-seen times."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest import metrics
from ingest.anomaly import AnomalyDetector, Event, Pending, StateNeed
from ingest.kernels import HOUR_US, MINUTE_US, Rollup, rollup, warm_up
from ingest.registry import Registry
from ingest.rules import AnomalyRule, rule_for
from ingest.sink import Readings, StagedUpsert, Upsert, copy_data

# Microseconds since the Unix epoch to timestamptz, exactly, inside the database.
_TS = "(timestamptz 'epoch' + {} * interval '1 microsecond')"


ROLLUP_TABLES = (("1m", MINUTE_US), ("1h", HOUR_US))
"""(width, bucket in µs): telemetry.rollup_<width>, each written by ROLLUP_SQL."""

# A flush's rollup partials of every width go through one session temporary table.
ROLLUP_STAGE = "rollup_stage"
_ROLLUP_STAGE_DDL = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {ROLLUP_STAGE}
       (bucket_us int8, sensor_id int4, bucket int8, min float8, max float8, sum float8,
        count int8, first float8, first_time int8, last float8, last_time int8)
       ON COMMIT DELETE ROWS
"""
_ROLLUP_WIRE = (">i8", ">i4", ">i8", ">f8", ">f8", ">f8", ">i8", ">f8", ">i8", ">f8", ">i8")


def _rollup_insert(table: str, bucket_us: int) -> str:
    return f"""
INSERT INTO telemetry.{table} AS r
       (bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time)
SELECT {_TS.format("u.bucket")}, u.sensor_id, u.min, u.max, u.sum, u.count,
       u.first, {_TS.format("u.first_time")}, u.last, {_TS.format("u.last_time")}
  FROM {ROLLUP_STAGE} u WHERE u.bucket_us = {bucket_us}
ON CONFLICT (sensor_id, bucket) DO UPDATE SET
    min = least(r.min, EXCLUDED.min),
    max = greatest(r.max, EXCLUDED.max),
    sum = r.sum + EXCLUDED.sum,
    count = r.count + EXCLUDED.count,
    first = CASE WHEN EXCLUDED.first_time < r.first_time THEN EXCLUDED.first ELSE r.first END,
    first_time = least(r.first_time, EXCLUDED.first_time),
    last = CASE WHEN EXCLUDED.last_time > r.last_time THEN EXCLUDED.last ELSE r.last END,
    last_time = greatest(r.last_time, EXCLUDED.last_time)"""


# Both widths in one statement, the first as a data-modifying CTE.
ROLLUP_SQL = (
    f"WITH minute AS ({_rollup_insert('rollup_1m', MINUTE_US)}\n)\n"
    f"{_rollup_insert('rollup_1h', HOUR_US)}"
)

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


def _rollup_upsert(partials: Sequence[tuple[int, Rollup]]) -> StagedUpsert:
    """One staged upsert of the rollup partials (bucket in µs, rows) of every width."""
    columns = [
        np.concatenate([np.full(len(r.sensor), us, np.int64) for us, r in partials]),
        *(
            np.concatenate([getattr(r, name) for _, r in partials])
            for name in (
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
        ),
    ]
    return StagedUpsert(
        stage=ROLLUP_STAGE,
        stage_ddl=_ROLLUP_STAGE_DDL,
        data=copy_data(list(zip(_ROLLUP_WIRE, columns, strict=True))),
        rows=len(columns[0]),
        sql=ROLLUP_SQL,
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

    upserts: list[Upsert | StagedUpsert]
    rollup_rows: tuple[tuple[str, int], ...] = ()
    """Rollup partials per width, for the metrics."""
    pending: Pending | None = None
    last_seen: tuple[int, ...] = ()
    at: float = 0.0


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

    @staticmethod
    def warm_up() -> None:
        """Compile (or load from the on-disk cache) every kernel before the first message."""
        warm_up()

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
        out: list[Upsert | StagedUpsert] = []
        if not len(new):
            return Derived(out)
        rollup_rows: tuple[tuple[str, int], ...] = ()
        if self._rollups:
            partials = [
                (width, us, rollup(sensor=new.sensor, time=new.time, value=new.value, bucket_us=us))
                for width, us in ROLLUP_TABLES
            ]
            out.append(_rollup_upsert([(us, r) for _, us, r in partials]))
            rollup_rows = tuple((width, len(r.sensor)) for width, _, r in partials)
        pending = None
        if self._rules:
            pending = self.detector.process(sensor=new.sensor, time=new.time, value=new.value)
            if pending.events:
                out.append(_anomaly_upsert(pending.events))
        now = time.monotonic()
        ends = segment_ends(new.sensor)  # each sensor's latest new reading
        due = self._registry.last_seen_due(new.sensor[ends].tolist(), now=now)
        if due:
            pick = ends[np.isin(new.sensor[ends], due)]
            out.append(Upsert(LAST_SEEN_SQL, (due, new.time[pick].tolist())))
        return Derived(out, rollup_rows, pending, tuple(due), now)

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
        if derived.last_seen:
            self._registry.last_seen_written(derived.last_seen, now=derived.at)
        for width, rows in derived.rollup_rows:
            metrics.ROLLUP_ROWS.labels(width).inc(rows)
