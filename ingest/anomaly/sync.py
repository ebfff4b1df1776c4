"""An ingester's anomaly state kept in step with the database, so that any number of ingesters
judge each sensor's readings in time order, as one ingester does.

Each sensor with a rule has a row in `telemetry.anomaly_state` (`ingest.db.anomaly_state`)
with a version. A flush's transaction, once its readings are in, locks the rows of its sensors
and compares them with the versions its detector's cache is at. Where they differ, or where the
flush holds readings older than the newest committed ones, it brings the cache up to date
inside the transaction before the filters run:

- catch up: a cache a few versions behind, with nothing but newer readings committed since,
  runs the readings committed since (and the flush's) from where it is;
- restore: otherwise the state is rebuilt from the sensor's newest stored readings and its
  open events, as of the newest committed reading;
- replay: a flush older than what is committed is merged: the state is rebuilt as of a point
  before its first reading where no event was open, and the stored readings from there on are
  run again with the flush's; the events of that span are replaced.

A flush whose readings lie more than `replay_max_us` before the newest committed reading is
not merged: those readings are stored but the filters skip them, counted as late.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest.anomaly import layout
from ingest.anomaly.detector import AnomalyDetector, Event, Pending
from ingest.anomaly.history import Window, read_histories, replay_starts
from ingest.db import anomaly_state as rows_db
from ingest.db.anomaly_state import DELETE_SPAN_SQL, UPDATE_SQL
from ingest.db.sink import Readings, Upsert
from ingest.errors import TransientSinkError

__all__ = ["Settled", "StateSync"]

NO_TIME = layout.NO_TIME
UNKNOWN = rows_db.UNKNOWN
_HOUR_US = 3_600_000_000


@dataclass(slots=True)
class Settled:
    """A flush's anomaly outcome once settled under the lock: the processed pending, the writes
    that go with it (the replaced spans' deletes first, then the rows' new versions), and what
    the cache is at once it commits."""

    pending: Pending
    deletes: list[Upsert]
    update: Upsert
    sensors: npt.NDArray[np.int32]
    versions: npt.NDArray[np.int64]
    counts: dict[str, int] = field(default_factory=dict)
    """Sensor states restored, caught up and replayed, and stored readings run again."""


@dataclass(slots=True)
class _Plan:
    """What settling one flush does beyond running its readings."""

    restore: list[int] = field(default_factory=list)  # index into the locked ids
    catch_up: list[int] = field(default_factory=list)
    quiet: dict[int, int] = field(default_factory=dict)  # index -> where its replay starts
    search: list[int] = field(default_factory=list)


class StateSync:
    """The versions an ingester's anomaly cache is at, and settling flushes against them.

    Called from the writer task; `settle` calls for disjoint sets of sensors may interleave
    (the writer connections' parts of one flush).
    """

    def __init__(self, detector: AnomalyDetector, *, replay_max_us: int, floor_us: int) -> None:
        self.detector = detector
        self._max = replay_max_us
        self._floor = floor_us  # no reading is older (limits.min_time)
        self._synced = np.full(1024, -1, np.int64)  # by sensor id: the version cached, -1: none
        self._rowed = np.zeros(1024, np.bool_)  # by sensor id: its row is known to exist

    def _grow(self, max_id: int) -> None:
        if max_id >= self._synced.shape[0]:
            size = max(2 * self._synced.shape[0], max_id + 1)
            synced = np.full(size, -1, np.int64)
            synced[: self._synced.shape[0]] = self._synced
            rowed = np.zeros(size, np.bool_)
            rowed[: self._rowed.shape[0]] = self._rowed
            self._synced, self._rowed = synced, rowed

    async def ensure_rows(
        self, conn: asyncpg.Connection, sensor_ids: npt.NDArray[np.int32]
    ) -> None:
        """Give sensors with a rule their rows, before the flush that first names them."""
        ids = np.asarray(sensor_ids, np.int32)
        if not len(ids):
            return
        self._grow(int(ids.max()))
        ids = ids[~self._rowed[ids]]
        if len(ids):
            await rows_db.ensure_rows(conn, ids, floor_us=self._floor)
            self._rowed[ids] = True

    def cached(self, sensor: npt.NDArray[np.int32]) -> bool:
        """Whether every sensor with a rule among these has a cached state (else processing the
        flush before `settle` is wasted work)."""
        ids = sensor[self.detector.with_rule(sensor)]
        synced = self._synced  # never grown here: this may run in a worker thread
        if not len(ids):
            return True
        return bool(int(ids.max()) < len(synced) and (synced[ids] >= 0).all())

    def committed(self, settled: Settled) -> None:
        """`settled`'s transaction committed: the cache is at its versions."""
        self._synced[settled.sensors] = settled.versions

    async def settle(
        self, conn: asyncpg.Connection, new: Readings, pending: Pending | None
    ) -> Settled | None:
        """Lock the rows of the sensors with a rule and finite readings in `new` (the flush's
        new rows, already written in this transaction), bring their cached state up to date,
        and return the flush's anomaly outcome. `pending` is `new` processed before the lock
        (or None); it is kept when the cache turns out current. None: no such sensors."""
        keep = self.detector.with_rule(new.sensor) & np.isfinite(new.value)
        ids, first = np.unique(new.sensor[keep], return_index=True)
        if not len(ids):
            return None
        p = new.time[keep][first]  # each sensor's oldest finite new reading
        rows = await rows_db.lock(conn, ids)
        if not np.array_equal(rows.sensor, ids):
            self._rowed[ids] = False  # made again before the retry
            raise TransientSinkError("anomaly state: a sensor's row is missing")
        self._grow(int(ids.max()))
        last = rows.last
        late = (last != NO_TIME) & (p <= last)
        behind = late & (p < last - self._max)
        ok = (self._synced[ids] == rows.version) & (~late | behind)
        counts: dict[str, int] = defaultdict(int)
        columns = None
        if pending is None or not ok.all():
            plan = self._classify(ids, rows, p, late, behind, ok)
            if plan.search:
                await self._search(conn, ids, rows, p, plan)
            await self._rebuild(conn, ids, rows, new, plan, counts)
            extras, replay = await self._replay(conn, ids, rows, plan, counts)
            columns = self._columns(new, replay)
            pending = await asyncio.to_thread(self.detector.process, **columns)
        else:
            extras = []
        first_in = (
            _firsts(columns["sensor"], columns["time"], ids)
            if columns is not None
            else _firsts(new.sensor, new.time, ids)
        )
        update = self._update(pending, ids, rows, p, late, first_in)
        return Settled(pending, extras, update, ids, rows.version + 1, dict(counts))

    # ------------------------------------------------------------------ planning

    def _classify(
        self,
        ids: npt.NDArray[np.int32],
        rows: rows_db.Rows,
        p: npt.NDArray[np.int64],
        late: npt.NDArray[np.bool_],
        behind: npt.NDArray[np.bool_],
        ok: npt.NDArray[np.bool_],
    ) -> _Plan:
        plan = _Plan()
        base = self.detector.base(sensor_ids=ids)
        synced = self._synced[ids]
        for j in np.flatnonzero(~ok).tolist():
            v, cached, cached_last = rows.version[j], synced[j], base.last[j]
            # A cache some versions behind, with only newer readings committed since, catches
            # up by running those, unless a restore reads less.
            appended = 0 <= cached < v and cached >= rows.rebased[j]
            cheaper = rows.history[j] != NO_TIME and cached_last >= rows.history[j]
            can_catch_up = appended and cached_last != NO_TIME and cheaper
            if not late[j] or behind[j]:  # (late readings behind by more than the limit: skipped)
                if cached != v:
                    (plan.catch_up if can_catch_up and not behind[j] else plan.restore).append(j)
            elif can_catch_up and p[j] > cached_last:
                plan.catch_up.append(j)
            else:
                plan.search.append(j)
        return plan

    async def _search(
        self,
        conn: asyncpg.Connection,
        ids: npt.NDArray[np.int32],
        rows: rows_db.Rows,
        p: npt.NDArray[np.int64],
        plan: _Plan,
    ) -> None:
        """Where each late sensor's replay starts; one that would start too far back is not
        replayed, and its late readings are skipped."""
        todo, plan.search = plan.search, []
        base = self.detector.base(sensor_ids=ids)
        starts = await replay_starts(
            conn,
            sensor_ids=[int(ids[j]) for j in todo],
            earliest=[int(rows.last[j] - self._max) for j in todo],
            oldest=[int(p[j]) for j in todo],
            gaps=[int(base.gap[j]) for j in todo],
        )
        for j, start in zip(todo, starts, strict=True):
            if start is not None:
                plan.quiet[j] = start
            elif self._synced[ids[j]] != rows.version[j]:
                plan.restore.append(j)

    async def _rebuild(
        self,
        conn: asyncpg.Connection,
        ids: npt.NDArray[np.int32],
        rows: rows_db.Rows,
        new: Readings,
        plan: _Plan,
        counts: dict[str, int],
    ) -> None:
        """Restore the sensors of `plan.restore` as of their newest committed reading, and
        those of `plan.quiet` as of just before their replay starts."""
        base = self.detector.base(sensor_ids=ids)
        wanted: dict[int, Window] = {}
        for j in plan.restore + list(plan.quiet):
            if rows.last[j] == NO_TIME:
                continue  # nothing stored yet
            n, span = int(base.need_readings[j]), int(base.need_span_us[j])
            end = j not in plan.quiet
            hi = int(rows.last[j]) + 1 if end else plan.quiet[j]
            hint = int(rows.history[j])
            reach = _HOUR_US if hint == NO_TIME else max(1, int(rows.last[j]) - hint)
            lo = hint if end and hint != NO_TIME else hi - (reach * 5) // 4
            if span:
                lo = min(lo, hi - 1 - span)
            # The flush's own readings are in the table already: a restore as of the newest
            # committed reading reads past those it holds from before then.
            mine = new.time[new.sensor == ids[j]]
            mine = mine[mine < hi]
            limit = None if span else n + len(mine)
            first = rows.first[j]
            floor = self._floor if first in (NO_TIME, UNKNOWN) else int(first)
            wanted[j] = Window(int(ids[j]), max(lo, floor), hi, limit, n, span, floor, mine)
        histories = await read_histories(conn, wanted)
        with_open = [j for j in plan.restore if rows.events[j] != NO_TIME]
        since = [
            self._floor if rows.events[j] == UNKNOWN else int(rows.events[j]) for j in with_open
        ]
        restored_events: dict[int, list[Event]] = defaultdict(list)
        for r in await rows_db.open_events(
            conn, sensor_ids=[int(ids[j]) for j in with_open], since=since
        ):
            restored_events[r["sensor_id"]].append(
                Event(
                    sensor=r["sensor_id"],
                    kind=r["kind"],
                    start=r["start"],
                    end=None,
                    value=r["value"],
                    score=r["score"],
                    detail=r["detail"],
                )
            )
        empty = (np.empty(0, np.int64), np.empty(0, np.float64))
        for j in plan.restore + list(plan.quiet):
            s = int(ids[j])
            times, values = histories.get(j, empty)
            self.detector.restore(
                sensor_id=s, time=times, value=values, open_events=restored_events[s]
            )
            self._synced[s] = -1 if j in plan.quiet else rows.version[j]
        counts["restored"] += len(plan.restore)
        counts["replayed"] += len(plan.quiet)

    async def _replay(
        self,
        conn: asyncpg.Connection,
        ids: npt.NDArray[np.int32],
        rows: rows_db.Rows,
        plan: _Plan,
        counts: dict[str, int],
    ) -> tuple[list[Upsert], rows_db.Series]:
        """The stored readings the caught-up and replayed sensors run again, and the deletes of
        the events those runs write again: per sensor, those starting where one of its events
        could (an event open at the base, its unchanged run, or its first reading run again),
        that end after the base's newest reading."""
        runs = plan.catch_up + list(plan.quiet)
        if not runs:
            return [], {}
        base = self.detector.base(sensor_ids=ids)
        after, lo, ended_after = [], [], []
        for j in runs:
            start = plan.quiet[j] if j in plan.quiet else int(base.last[j]) + 1
            after.append(start - 1)
            starts = [start, int(base.open_since[j]), int(base.run_start[j])]
            lo.append(min(t for t in starts if t != NO_TIME))
            ended_after.append(self._floor - 1 if base.last[j] == NO_TIME else int(base.last[j]))
        sensors = [int(ids[j]) for j in runs]
        replay = await rows_db.stored(
            conn, sensor_ids=sensors, after=after, upto=[int(rows.last[j]) for j in runs]
        )
        counts["caught_up"] += len(plan.catch_up)
        counts["rerun"] += sum(len(t) for t, _ in replay.values())
        deletes = Upsert(DELETE_SPAN_SQL, (sensors, lo, ended_after, rows_db.to_datetime(min(lo))))
        return [deletes], replay

    def _columns(self, new: Readings, replay: rows_db.Series) -> dict[str, npt.NDArray[Any]]:
        """The readings to run: the flush's (of sensors with a rule) and the stored ones run
        again, sorted by (sensor, time), each (sensor, time) once (the flush's own readings
        are stored already and may be among those read back)."""
        keep = self.detector.with_rule(new.sensor)
        parts = [(new.sensor[keep], new.time[keep], new.value[keep])]
        for s, (t, v) in replay.items():
            parts.append((np.full(len(t), s, np.int32), t, v))
        sensor = np.concatenate([q[0] for q in parts])
        time = np.concatenate([q[1] for q in parts])
        value = np.concatenate([q[2] for q in parts])
        if len(parts) > 1:
            order = np.lexsort((time, sensor))
            sensor, time, value = sensor[order], time[order], value[order]
            once = np.ones(len(time), np.bool_)
            once[1:] = (sensor[1:] != sensor[:-1]) | (time[1:] != time[:-1])
            sensor, time, value = sensor[once], time[once], value[once]
        return {"sensor": sensor, "time": time, "value": value}

    def _update(
        self,
        pending: Pending,
        ids: npt.NDArray[np.int32],
        rows: rows_db.Rows,
        p: npt.NDArray[np.int64],
        late: npt.NDArray[np.bool_],
        first_in: npt.NDArray[np.int64],
    ) -> Upsert:
        """The rows' new versions. Where a sensor's history begins is estimated from its
        readings' pace: a restore that finds too few reads further back."""
        out = pending.outcome()
        at = np.searchsorted(out.sensor, ids)
        last, taken = out.last[at], out.accepted[at]
        known = (taken > 0) & (last != NO_TIME)
        newest = np.where(known, last, self._floor).astype(np.float64)
        prev = np.where(rows.last != NO_TIME, rows.last, self._floor - 1_000_000)
        pace = np.where(
            taken >= 2,
            (newest - first_in) / np.maximum(taken - 1, 1),
            newest - prev,
        )
        reach = np.maximum(pace, 1.0) * (out.need_readings[at] + 1) * 1.25
        span = out.need_span_us[at]
        reach = np.where(span > 0, np.maximum(reach, span), reach)
        history = np.maximum(newest - reach, self._floor)
        since = out.open_since[at]
        return Upsert(
            UPDATE_SQL,
            (
                ids.tolist(),
                _nullable(last, known),
                p.tolist(),
                _nullable(history.astype(np.int64), known),
                _nullable(since, since != NO_TIME),
                late.tolist(),
            ),
        )


def _firsts(
    sensor: npt.NDArray[np.int32], time: npt.NDArray[np.int64], ids: npt.NDArray[np.int32]
) -> npt.NDArray[np.int64]:
    """The first time of each of `ids` in columns sorted by (sensor, time)."""
    return time[np.searchsorted(sensor, ids)]


def _nullable(values: npt.NDArray[np.int64], valid: npt.NDArray[np.bool_]) -> list[int | None]:
    return [v if ok else None for v, ok in zip(values.tolist(), valid.tolist(), strict=True)]
