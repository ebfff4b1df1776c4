"""The anomaly state's rows in the database (`telemetry.anomaly_state`, schema/006) and the bounded
reads a restore or a replay makes: every read of readings or events names a time range, with
its outer bounds as plain parameters, so that TimescaleDB plans only the chunks in range.

Times travel as int64 microseconds since the Unix epoch. None of these functions opens a
transaction: `lock` belongs in the flush's, and the reads after it see what committed before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest.anomaly.layout import KINDS, NO_TIME

__all__ = [
    "DELETE_SPAN_SQL",
    "UNKNOWN",
    "UPDATE_SQL",
    "Candidate",
    "Rows",
    "ensure_rows",
    "event_candidates",
    "history",
    "lock",
    "next_readings",
    "open_events",
    "stored",
    "to_datetime",
]

_TS = "(timestamptz 'epoch' + {} * interval '1 microsecond')"
_US = "(extract(epoch FROM {}) * 1000000)::int8"
UNKNOWN = NO_TIME + 1
"""A time the row does not know ('-infinity'), as `lock` reads it."""
# NULL stays NULL, '-infinity' becomes UNKNOWN.
_UNKNOWN = f"'{UNKNOWN}'::int8"
_US_OR_UNKNOWN = f"CASE WHEN {{0}} = '-infinity' THEN {_UNKNOWN} ELSE " + _US.format("{0}") + " END"
_FINITE = "value NOT IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8)"

_MISSING = """
SELECT s.id, {since} AS since FROM telemetry.sensors s
 WHERE s.id = ANY($1::int[])
   AND NOT EXISTS (SELECT 1 FROM telemetry.anomaly_state a WHERE a.sensor_id = s.id)
""".format(since=_US.format("s.last_seen - interval '1 hour'"))
# A new row takes the sensor's newest stored reading (for a sensor with history from before the
# table existed): it lies after the sensor's last_seen less a minute (`Registry.last_seen_due`);
# a sensor without last_seen has no reading. What the row cannot know is marked '-infinity'.
_INSERT = f"""
INSERT INTO telemetry.anomaly_state (sensor_id, last_time, first_time, events_from)
SELECT k.id, l.latest,
       CASE WHEN l.latest IS NOT NULL THEN timestamptz '-infinity' END,
       CASE WHEN l.latest IS NOT NULL THEN timestamptz '-infinity' END
  FROM unnest($1::int[], $2::int8[]) AS k(id, since)
 CROSS JOIN LATERAL (
       SELECT max(r.time) AS latest FROM telemetry.readings r
        WHERE r.sensor_id = k.id AND r.time >= {_TS.format("k.since")} AND r.time >= $3
          AND r.{_FINITE}
 ) AS l
 ORDER BY k.id
ON CONFLICT (sensor_id) DO NOTHING
"""
# Locks in sensor id order (the lock is taken on the sorted rows), so that flushes of several
# ingesters over the same sensors never deadlock.
_LOCK = """
SELECT sensor_id, version, rebased, {last} AS last, {first} AS first,
       {history} AS history, {events} AS events
  FROM telemetry.anomaly_state WHERE sensor_id = ANY($1::int[])
 ORDER BY sensor_id FOR UPDATE
""".format(
    last=_US.format("last_time"),
    first=_US_OR_UNKNOWN.format("first_time"),
    history=_US.format("history_from"),
    events=_US_OR_UNKNOWN.format("events_from"),
)
# Per sensor: its newest `n` finite readings in [lo, hi) (all of them where n is NULL), as
# arrays (decoded by asyncpg in C, not as a record per reading).
_HISTORY = f"""
SELECT k.sensor_id, array_agg({_US.format("h.time")} ORDER BY h.time) AS t,
       array_agg(h.value ORDER BY h.time) AS v
  FROM unnest($1::int[], $2::int8[], $3::int8[], $4::int[]) AS k(sensor_id, lo, hi, n)
 CROSS JOIN LATERAL (
       SELECT r.time, r.value FROM telemetry.readings r
        WHERE r.sensor_id = k.sensor_id
          AND r.time >= {_TS.format("k.lo")} AND r.time < {_TS.format("k.hi")}
          AND r.time >= $5 AND r.time < $6 AND r.{_FINITE}
        ORDER BY r.time DESC LIMIT k.n
 ) AS h
 GROUP BY k.sensor_id
"""
# Per sensor: its finite readings in (after, upto].
_STORED = f"""
SELECT k.sensor_id, array_agg({_US.format("r.time")} ORDER BY r.time) AS t,
       array_agg(r.value ORDER BY r.time) AS v
  FROM unnest($1::int[], $2::int8[], $3::int8[]) AS k(sensor_id, after, upto)
  JOIN telemetry.readings r
    ON r.sensor_id = k.sensor_id
   AND r.time > {_TS.format("k.after")} AND r.time <= {_TS.format("k.upto")}
   AND r.time > $4 AND r.time <= $5 AND r.{_FINITE}
 GROUP BY k.sensor_id
"""
_OPEN_EVENTS = f"""
SELECT a.sensor_id, a.kind, {_US.format("a.start_time")} AS start, a.value, a.score, a.detail
  FROM unnest($1::int[], $2::int8[]) AS k(sensor_id, since)
  JOIN telemetry.anomalies a
    ON a.sensor_id = k.sensor_id AND a.end_time IS NULL
   AND a.start_time >= {_TS.format("k.since")} AND a.start_time >= $3
"""
# The events that may be open somewhere in [w, p): those starting there, and of each kind the
# last one starting before w (a kind's events follow one another; found through the unique
# index on (sensor_id, kind, start_time), newest chunk first).
_CANDIDATES = f"""
SELECT k.sensor_id, e.kind, {_US.format("e.start_time")} AS start, {_US.format("e.end_time")} AS end
  FROM unnest($1::int[], $2::int8[], $3::int8[]) AS k(sensor_id, w, p)
  JOIN telemetry.anomalies e
    ON e.sensor_id = k.sensor_id
   AND e.start_time >= {_TS.format("k.w")} AND e.start_time < {_TS.format("k.p")}
   AND e.start_time >= $4 AND e.start_time < $5
UNION ALL
SELECT k.sensor_id, e.kind, {_US.format("e.start_time")}, {_US.format("e.end_time")}
  FROM unnest($1::int[], $2::int8[]) AS k(sensor_id, w)
 CROSS JOIN unnest($6::text[]) AS x(kind)
 CROSS JOIN LATERAL (
       SELECT a.kind, a.start_time, a.end_time FROM telemetry.anomalies a
        WHERE a.sensor_id = k.sensor_id AND a.kind = x.kind
          AND a.start_time < {_TS.format("k.w")} AND a.start_time < $5
        ORDER BY a.start_time DESC LIMIT 1
 ) AS e
"""
# Per (sensor, after, before, nth): its nth finite reading in (after, before), if any.
_NEXT = f"""
SELECT k.i, (SELECT {_US.format("r.time")} FROM telemetry.readings r
              WHERE r.sensor_id = k.sensor_id
                AND r.time > {_TS.format("k.after")} AND r.time < {_TS.format("k.before")}
                AND r.time > $5 AND r.time < $6 AND r.{_FINITE}
              ORDER BY r.time OFFSET k.nth - 1 LIMIT 1) AS next
  FROM unnest($1::int[], $2::int[], $3::int8[], $4::int8[], $7::int[])
       AS k(i, sensor_id, after, before, nth)
"""

DELETE_SPAN_SQL = f"""
DELETE FROM telemetry.anomalies a
 USING unnest($1::int[], $2::int8[], $3::int8[]) AS d(sensor_id, lo, after)
 WHERE a.sensor_id = d.sensor_id AND a.start_time >= {_TS.format("d.lo")}
   AND (a.end_time IS NULL OR a.end_time > {_TS.format("d.after")})
   AND a.start_time >= $4
"""
"""Deletes the events of a span a flush runs again: per (sensor, lo, after), those starting at
lo or later that end after `after` (the newest reading before the span) or go on."""

UPDATE_SQL = f"""
UPDATE telemetry.anomaly_state a
   SET version = a.version + 1,
       last_time = coalesce({_TS.format("u.last")}, a.last_time),
       first_time = least(a.first_time, {_TS.format("u.first")}),
       history_from = coalesce({_TS.format("u.history")}, a.history_from),
       events_from = {_TS.format("u.events")},
       rebased = CASE WHEN u.rebased THEN a.version + 1 ELSE a.rebased END
  FROM unnest($1::int[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::bool[])
       AS u(sensor_id, last, first, history, events, rebased)
 WHERE a.sensor_id = u.sensor_id
"""
"""A flush's new versions, under the lock `lock` took: per sensor the newest reading taken in,
the oldest stored, where its history begins, the earliest start of its open events (NULL:
none) and whether the flush stored readings older than the newest before it."""


def to_datetime(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def _column(rows: Sequence[asyncpg.Record], name: str) -> npt.NDArray[np.int64]:
    """An int64 column; NULL becomes NO_TIME."""
    return np.array([NO_TIME if r[name] is None else r[name] for r in rows], np.int64)


@dataclass(frozen=True, slots=True)
class Rows:
    """The locked rows, one per sensor (ids ascending); times are NO_TIME where NULL, and
    UNKNOWN where not known ('-infinity', in `first` and `events`)."""

    sensor: npt.NDArray[np.int32]
    version: npt.NDArray[np.int64]
    rebased: npt.NDArray[np.int64]
    last: npt.NDArray[np.int64]
    first: npt.NDArray[np.int64]
    history: npt.NDArray[np.int64]
    events: npt.NDArray[np.int64]


async def ensure_rows(
    conn: asyncpg.Connection, sensor_ids: npt.NDArray[np.int32], *, floor_us: int
) -> None:
    """Give these sensors a row if they have none (outside any flush: it commits at once)."""
    missing = await conn.fetch(_MISSING, sensor_ids.tolist())
    if not missing:
        return
    since = [None if r["since"] is None else max(floor_us, r["since"]) for r in missing]
    known = [t for t in since if t is not None]
    bound = to_datetime(min(known)) if known else datetime(9999, 1, 1, tzinfo=UTC)
    await conn.execute(_INSERT, [r["id"] for r in missing], since, bound)


async def lock(conn: asyncpg.Connection, sensor_ids: npt.NDArray[np.int32]) -> Rows:
    """Lock the rows of these sensors (ascending ids) for the transaction, and read them."""
    rows = await conn.fetch(_LOCK, sensor_ids.tolist())
    return Rows(
        sensor=np.array([r["sensor_id"] for r in rows], np.int32),
        version=np.array([r["version"] for r in rows], np.int64),
        rebased=np.array([r["rebased"] for r in rows], np.int64),
        last=_column(rows, "last"),
        first=_column(rows, "first"),
        history=_column(rows, "history"),
        events=_column(rows, "events"),
    )


Series = dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]
"""Readings per sensor: times and values, oldest first."""


def _series(rows: Sequence[asyncpg.Record], ids: Sequence[int]) -> Series:
    empty = (np.empty(0, np.int64), np.empty(0, np.float64))
    out: Series = dict.fromkeys(ids, empty)
    for r in rows:
        out[r["sensor_id"]] = (np.array(r["t"], np.int64), np.array(r["v"], np.float64))
    return out


async def history(
    conn: asyncpg.Connection,
    *,
    sensor_ids: Sequence[int],
    lo: Sequence[int],
    hi: Sequence[int],
    n: Sequence[int | None],
) -> Series:
    """Per sensor, its newest `n` finite readings in [lo, hi) (every one there if n is None)."""
    if not sensor_ids:
        return {}
    rows = await conn.fetch(
        _HISTORY,
        list(sensor_ids),
        list(lo),
        list(hi),
        list(n),
        to_datetime(min(lo)),
        to_datetime(max(hi)),
    )
    return _series(rows, sensor_ids)


async def stored(
    conn: asyncpg.Connection,
    *,
    sensor_ids: Sequence[int],
    after: Sequence[int],
    upto: Sequence[int],
) -> Series:
    """Per sensor, its finite readings in (after, upto]."""
    if not sensor_ids:
        return {}
    rows = await conn.fetch(
        _STORED,
        list(sensor_ids),
        list(after),
        list(upto),
        to_datetime(min(after)),
        to_datetime(max(upto)),
    )
    return _series(rows, sensor_ids)


async def open_events(
    conn: asyncpg.Connection, *, sensor_ids: Sequence[int], since: Sequence[int]
) -> list[asyncpg.Record]:
    """The open events of these sensors that started at `since` or later."""
    if not sensor_ids:
        return []
    return list(
        await conn.fetch(_OPEN_EVENTS, list(sensor_ids), list(since), to_datetime(min(since)))
    )


@dataclass(frozen=True, slots=True)
class Candidate:
    """An event that may be open somewhere in the span a late flush falls into."""

    sensor: int
    kind: str
    start: int
    end: int | None


async def event_candidates(
    conn: asyncpg.Connection, *, sensor_ids: Sequence[int], w: Sequence[int], p: Sequence[int]
) -> list[Candidate]:
    """Per sensor, the events starting in [w, p), and of each kind the last one before w."""
    if not sensor_ids:
        return []
    rows = await conn.fetch(
        _CANDIDATES,
        list(sensor_ids),
        list(w),
        list(p),
        to_datetime(min(w)),
        to_datetime(max(p)),
        list(KINDS),
    )
    return [Candidate(r["sensor_id"], r["kind"], r["start"], r["end"]) for r in rows]


async def next_readings(
    conn: asyncpg.Connection,
    *,
    sensor_ids: Sequence[int],
    after: Sequence[int],
    before: Sequence[int],
    nth: Sequence[int],
) -> list[int | None]:
    """For each (sensor, after, before, nth): the time of its nth finite reading strictly
    between the two (from 1), None if there are fewer."""
    if not sensor_ids:
        return []
    rows = await conn.fetch(
        _NEXT,
        list(range(len(sensor_ids))),
        list(sensor_ids),
        list(after),
        list(before),
        to_datetime(min(after)),
        to_datetime(max(before)),
        list(nth),
    )
    out: list[int | None] = [None] * len(sensor_ids)
    for r in rows:
        out[r["i"]] = r["next"]
    return out
