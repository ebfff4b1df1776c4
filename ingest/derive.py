"""What a flush writes besides its readings: rollups, anomaly events, sensors' last-seen times."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest import metrics
from ingest.anomaly.detector import AnomalyDetector, Event, EventColumns, Pending
from ingest.anomaly.rules import AnomalyRule, rule_for
from ingest.anomaly.sync import Settled, StateSync
from ingest.asset.rules import AssetRule
from ingest.asset.sync import AssetScorer, AssetSettled
from ingest.db.registry import Registry
from ingest.db.sink import Appended, Extra, Readings, Upsert
from ingest.partials import PARTIAL_COLUMNS, PartialsJournal, partials_copy
from ingest.rollup import MINUTE_US, Rollup, rollup

# Microseconds since the Unix epoch to timestamptz, exactly, inside the database.
_TS = "(timestamptz 'epoch' + {} * interval '1 microsecond')"


# A flush writes one journal row naming its new readings and its ingester holds their 1-minute
# partials in memory until the next merge (schema/011, ingest.partials). Without a journal
# epoch (a deriver used on its own), it appends the partials to telemetry.rollup_pending with
# one COPY instead; ingest.db.rollups moves both into the rollup tables in bulk.
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


def segment_ends(sensor: npt.NDArray[np.int32]) -> npt.NDArray[np.intp]:
    """Index of the last row of each sensor's run in a slab sorted by sensor."""
    if not len(sensor):
        return np.empty(0, dtype=np.intp)
    return np.flatnonzero(np.append(sensor[1:] != sensor[:-1], True))


def _pending_append(partials: Rollup) -> Appended:
    """The 1-minute rollup partials of a flush's new rows, as one COPY into rollup_pending."""
    return Appended(
        table="rollup_pending",
        columns=PARTIAL_COLUMNS,
        data=partials_copy(partials),
        rows=len(partials.sensor),
    )


def _anomaly_upsert(events: Sequence[Event] | EventColumns) -> Upsert:
    if isinstance(events, EventColumns):
        return Upsert(ANOMALY_SQL, tuple(events))
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

    base: list[Extra]
    """Writes that do not depend on the anomaly state: rollup partials (and a Sparkplug birth's
    aliases, which `ingest.writer` puts first)."""
    anomaly: list[Extra] = dataclasses.field(default_factory=list)
    """The anomaly events, and from `Deriver.settle` on, the replaced spans and the new state
    versions."""
    tail: list[Extra] = dataclasses.field(default_factory=list)
    rollup_partials: int = 0
    """Rollup partials computed, for the metrics."""
    pending: Pending | None = None
    settled: Settled | None = None
    asset: AssetSettled | None = None
    last_seen: tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]] | None = None
    """Sensors whose last-seen time this writes, and those times."""
    held: tuple[int, Rollup] | None = None
    """The journal's flush part number and its partials, held in memory once committed."""

    @property
    def upserts(self) -> list[Extra]:
        return [*self.base, *self.anomaly, *self.tail]


class Deriver:
    """Computes a flush's extra writes. Called from the writer task only.

    `prepare` gives the flush's sensors their rules before its transactions. In each
    transaction, `derive` runs while the readings are written: it never awaits and changes
    nothing, so it may run in worker threads, for disjoint sets of sensors at once; then
    `settle`, with the readings written, locks the anomaly state of the sensors with a rule,
    brings it up to date (`ingest.anomaly.sync`) and completes the anomaly writes. `commit`
    applies a `Derived` once the transaction that wrote it has committed; a `Derived` whose
    transaction failed is dropped.
    """

    def __init__(
        self,
        *,
        rules: Sequence[AnomalyRule],
        assets: Sequence[AssetRule] = (),
        rollups: bool,
        registry: Registry,
        replay_max_s: float = 3600.0,
        floor_us: int = 946_684_800_000_000,
        journal: PartialsJournal | None = None,
    ) -> None:
        self._rules = tuple(rules)
        self._rollups = rollups
        self.journal = journal if journal is not None else PartialsJournal()
        self._registry = registry
        self.detector = AnomalyDetector()
        self.assets = AssetScorer(
            rules=assets, registry=registry, replay_max_us=round(replay_max_s * 1e6)
        )
        self.sync = StateSync(
            self.detector, replay_max_us=round(replay_max_s * 1e6), floor_us=floor_us
        )
        self._assigned: set[int] = set()
        self._open: set[tuple[int, str, int]] = set()  # open events, to count new ones

    async def prepare(self, conn: asyncpg.Connection, *, readings: Readings) -> None:
        """Give new sensors their anomaly rule, and those with a rule their state row."""
        if not self._rules or not len(readings):
            return
        sensor_ids = readings.sensor[segment_ends(readings.sensor)]
        for sensor_id in sensor_ids.tolist():
            if sensor_id not in self._assigned:
                device, name = self._registry.name_of(sensor_id)
                rule = rule_for(rules=self._rules, path=f"{device}/{name}")
                self.detector.assign(sensor_id=sensor_id, rule=rule)
                self._assigned.add(sensor_id)
        await self.sync.ensure_rows(conn, sensor_ids[self.detector.with_rule(sensor_ids)])

    def derive(self, new: Readings) -> Derived:
        """The extra writes for rows of a flush that were new. Never awaits, changes nothing.

        The anomaly filters run here on the cached state where every sensor has one; `settle`
        keeps that outcome if the cache proves current."""
        base: list[Extra] = []
        if not len(new):
            return Derived(base)
        partials = 0
        held = None
        if self._rollups:
            minute = rollup(sensor=new.sensor, time=new.time, value=new.value, bucket_us=MINUTE_US)
            partials = len(minute.sensor)
            if self.journal.epoch is None:
                base.append(_pending_append(minute))
            else:
                flush, row = self.journal.entry(new.sensor, new.time)
                base.append(row)
                held = (flush, minute)
        pending = None
        anomaly: list[Extra] = []
        if self._rules and self.sync.cached(new.sensor):
            pending = self.detector.process(sensor=new.sensor, time=new.time, value=new.value)
            if pending.count:
                anomaly.append(_anomaly_upsert(pending.columns()))
        ends = segment_ends(new.sensor)  # each sensor's latest new reading
        latest_sensor, latest_time = new.sensor[ends], new.time[ends]
        due = self._registry.last_seen_due(latest_sensor, latest_time)
        last_seen = (latest_sensor[due], latest_time[due])
        tail: list[Extra] = []
        if len(last_seen[0]):
            tail.append(Upsert(LAST_SEEN_SQL, (last_seen[0].tolist(), last_seen[1].tolist())))
        return Derived(base, anomaly, tail, partials, pending, None, None, last_seen, held)

    async def settle(self, conn: asyncpg.Connection, new: Readings, derived: Derived) -> Derived:
        """In the flush's transaction, its new rows written: lock the anomaly state of their
        sensors with a rule, and settle the anomaly writes against it; then score their
        devices' asset health (`ingest.asset.sync`), whose state rows are locked after."""
        if not len(new):
            return derived
        if self._rules:
            settled = await self.sync.settle(conn, new, derived.pending)
            if settled is not None:
                anomaly: list[Extra] = list(settled.deletes)
                if settled.pending.count:
                    anomaly.append(_anomaly_upsert(settled.pending.columns()))
                anomaly.append(settled.update)
                derived = dataclasses.replace(
                    derived, anomaly=anomaly, pending=settled.pending, settled=settled
                )
        if self.assets.enabled:
            asset = await self.assets.settle(conn, new)
            if asset is not None:
                extra: list[Extra] = list(asset.deletes)
                if asset.events:
                    extra.append(_anomaly_upsert(asset.events))
                extra.append(asset.update)
                derived = dataclasses.replace(
                    derived, anomaly=[*derived.anomaly, *extra], asset=asset
                )
        return derived

    def split(self, readings: Readings, parts: int) -> list[Readings]:
        """Sorted `readings` in `parts` parts, one per writer connection, each sensor's in one
        part, and each device's scored for asset health in one part. Without asset rules, the
        parts are runs of whole sensors of about equal size, views of the slab (a flush of
        10,000 readings: 0.3-0.5 ms by masks, 10 µs by runs); else by key."""
        if parts == 1:
            return [readings]
        if self.assets.enabled:
            part_of = self.assets.part_keys(readings.sensor) % parts
            return [readings.select(part_of == p) for p in range(parts)]
        sensor = readings.sensor
        n = len(sensor)
        if not n:
            return [readings] * parts
        # Each cut moved back to the start of its sensor's run.
        at = sensor[np.arange(1, parts) * n // parts]
        cuts = [0, *np.searchsorted(sensor, at, side="left").tolist(), n]
        return [readings.rows(cuts[p], cuts[p + 1]) for p in range(parts)]

    def in_doubt(self, server_pid: int, derived: Sequence[Derived]) -> None:
        """The transaction that wrote `derived` on the server process `server_pid` may have
        committed (its connection failed before the outcome came back): their journal rows
        are recovered from their readings once that process has ended (`PartialsJournal`)."""
        flushes = [d.held[0] for d in derived if d.held is not None]
        if flushes:
            self.journal.in_doubt(server_pid, flushes)

    def commit(self, derived: Derived) -> None:
        """`derived` committed: advance the anomaly state and count what was written."""
        pending = derived.pending
        if pending is not None:
            self.detector.commit(pending)
            metrics.LATE_READINGS.inc(pending.late)
            if pending.count:
                c = pending.columns()
                for sensor, kind, start, end in zip(c.sensor, c.kind, c.start, c.end, strict=True):
                    key = (sensor, kind, start)
                    if key not in self._open:
                        metrics.ANOMALIES.labels(kind).inc()
                    if end is None:
                        self._open.add(key)
                    else:
                        self._open.discard(key)
        if derived.settled is not None:
            self.sync.committed(derived.settled)
            for how, count in derived.settled.counts.items():
                if how == "rerun":
                    metrics.ANOMALY_RERUN_READINGS.inc(count)
                else:
                    metrics.ANOMALY_STATE_SYNCS.labels(how).inc(count)
        if derived.asset is not None:
            for event in derived.asset.events:
                key = (event.sensor, event.kind, event.start)
                if key not in self._open:
                    metrics.ANOMALIES.labels(event.kind).inc()
                if event.end is None:
                    self._open.add(key)
                else:
                    self._open.discard(key)
            metrics.ASSET_TIMESTAMPS.inc(derived.asset.timestamps)
            metrics.ASSET_REPLAYS.inc(derived.asset.replays)
            metrics.ASSET_LATE_READINGS.inc(derived.asset.late)
        if derived.last_seen is not None and len(derived.last_seen[0]):
            self._registry.last_seen_written(*derived.last_seen)
        if derived.held is not None:
            self.journal.add(*derived.held)
        metrics.ROLLUP_PARTIALS.inc(derived.rollup_partials)
