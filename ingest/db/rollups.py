"""Rollup partials merged into the rollup tables, one ingester at a time, on a connection of
its own, every `rollups.merge_interval_s`: the partials this ingester holds in memory (their
journal rows deleted in the same transaction), the journal rows of ingesters that are gone
(recovered from the readings they name), its own journal rows whose transactions went unheard
(once their server process has ended), and telemetry.rollup_pending (schema/003, 011)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

import asyncpg

from ingest import metrics
from ingest.db.sink import CLIENT_ERRORS, Sink, classify
from ingest.errors import PermanentSinkError, TransientSinkError
from ingest.partials import PARTIAL_COLUMNS, Held, PartialsJournal, partials_copy

__all__ = [
    "MERGE_SQL",
    "ROLLUP_WIDTHS",
    "RollupMerger",
    "merge_held",
    "merge_rollups",
    "new_epoch",
    "recover_in_doubt",
    "recover_orphans",
]

log = logging.getLogger(__name__)

ROLLUP_WIDTHS = ("1m", "1h")
"""telemetry.rollup_<width>: merged from telemetry.rollup_pending by MERGE_SQL."""

_MERGE = """
    SELECT {bucket} AS bucket, sensor_id, min(min) AS min, max(max) AS max, sum(sum) AS sum,
           sum(count)::int8 AS count,
           (array_agg(first ORDER BY first_time))[1] AS first, min(first_time) AS first_time,
           (array_agg(last ORDER BY last_time DESC))[1] AS last, max(last_time) AS last_time
      FROM {source} GROUP BY 1, 2"""


_ON_CONFLICT = """ON CONFLICT (sensor_id, bucket) DO UPDATE SET
    min = least(r.min, EXCLUDED.min),
    max = greatest(r.max, EXCLUDED.max),
    sum = r.sum + EXCLUDED.sum,
    count = r.count + EXCLUDED.count,
    first = CASE WHEN EXCLUDED.first_time < r.first_time THEN EXCLUDED.first ELSE r.first END,
    first_time = least(r.first_time, EXCLUDED.first_time),
    last = CASE WHEN EXCLUDED.last_time > r.last_time THEN EXCLUDED.last ELSE r.last END,
    last_time = greatest(r.last_time, EXCLUDED.last_time)
"""


def _merge_insert(table: str, source: str) -> str:
    return f"""
INSERT INTO telemetry.{table} AS r
       (bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time)
SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
  FROM {source} ORDER BY sensor_id, bucket
{_ON_CONFLICT}"""


_SET_FROM = """
    min = least(r.min, s.min),
    max = greatest(r.max, s.max),
    sum = r.sum + s.sum,
    count = r.count + s.count,
    first = CASE WHEN s.first_time < r.first_time THEN s.first ELSE r.first END,
    first_time = least(r.first_time, s.first_time),
    last = CASE WHEN s.last_time > r.last_time THEN s.last ELSE r.last END,
    last_time = greatest(r.last_time, s.last_time)"""


def _merge_staged(table: str, source: str) -> str:
    """`_merge_insert` for a stage of distinct keys, most of them in the table already: those
    rows are updated from a join (faster than the conflict path of an insert, row for row),
    the others inserted. By a plain insert: every merge holds the merge lock (`_MERGE_WAIT`,
    `_MERGE_LOCK`) and so no other transaction inserts rollup rows meanwhile, and a plant's
    new minute is 100,000 new keys, for which ON CONFLICT's speculative insertion cost more
    than the insert itself."""
    return f"""
WITH updated AS (
    UPDATE telemetry.{table} AS r SET{_SET_FROM}
      FROM {source} AS s
     WHERE r.sensor_id = s.sensor_id AND r.bucket = s.bucket
 RETURNING r.sensor_id, r.bucket
)
INSERT INTO telemetry.{table} AS r
       (bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time)
SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
  FROM {source} AS s
 WHERE NOT EXISTS (SELECT FROM updated u WHERE u.sensor_id = s.sensor_id AND u.bucket = s.bucket)
 ORDER BY sensor_id, bucket"""


# Every committed partial, moved in one statement: deleted from the pending table, aggregated
# per (sensor, minute) and per (sensor, hour), and merged into the two rollup tables. Partials
# that commit meanwhile are not in the statement's snapshot and wait for the next merge.
_MERGE_1M = _merge_insert("rollup_1m", "minute")
_MERGE_1H = _merge_insert("rollup_1h", "hour")
MERGE_SQL = f"""
WITH moved AS (DELETE FROM telemetry.rollup_pending RETURNING *),
minute AS ({_MERGE.format(bucket="bucket", source="moved")}),
hour AS ({_MERGE.format(bucket="time_bucket(INTERVAL '1 hour', bucket)", source="minute")}),
m AS ({_MERGE_1M} RETURNING 1),
h AS ({_MERGE_1H} RETURNING 1)
SELECT (SELECT count(*) FROM moved) AS partials, (SELECT count(*) FROM m) AS minutes,
       (SELECT count(*) FROM h) AS hours
"""
# The partials an ingester held, staged per width and upserted from there.
_STAGE_DDL = """
CREATE TEMPORARY TABLE IF NOT EXISTS rollup_stage_1m (LIKE telemetry.rollup_pending)
    ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS rollup_stage_1h (LIKE telemetry.rollup_pending)
    ON COMMIT DELETE ROWS
"""
_UPSERT_HELD = (
    _merge_staged("rollup_1m", "rollup_stage_1m"),
    _merge_staged("rollup_1h", "rollup_stage_1h"),
)

# Journal rows (schema/011): each ingester process writes under an epoch of its own and holds
# a session advisory lock on it; rows whose epoch nobody holds are recovered by any ingester.
_EPOCH_SQL = "SELECT nextval('telemetry.rollup_epochs')"
# Advisory lock class 18011, epoch mod 2^31.
_LOCK_EPOCH = "SELECT pg_advisory_lock(18011, ($1::int8 % 2147483648)::int4)"
_TRY_EPOCH = "SELECT pg_try_advisory_xact_lock(18011, ($1::int8 % 2147483648)::int4)"
_DELETE_HELD = """
DELETE FROM telemetry.rollup_journal WHERE epoch = $1 AND flush = ANY($2::int8[]) RETURNING flush
"""
_OTHER_EPOCHS = "SELECT DISTINCT epoch FROM telemetry.rollup_journal WHERE epoch <> $1"
# The readings journal rows name, rolled up into rollup_pending (NaN is not rolled up), the
# rows deleted: $2 NULL takes every row of the epoch.
_RECOVER = """
WITH moved AS (
    DELETE FROM telemetry.rollup_journal
     WHERE epoch = $1 AND ($2::int8[] IS NULL OR flush = ANY($2::int8[]))
 RETURNING sensors, times
), recovered AS (
    INSERT INTO telemetry.rollup_pending
           (bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time)
    SELECT time_bucket(INTERVAL '1 minute', r.time), r.sensor_id, r.value, r.value, r.value, 1,
           r.value, r.time, r.value, r.time
      FROM moved CROSS JOIN LATERAL unnest(moved.sensors, moved.times) AS k(sensor_id, t)
      JOIN telemetry.readings r
        ON r.sensor_id = k.sensor_id
       AND r.time = timestamptz 'epoch' + k.t * INTERVAL '1 microsecond'
     WHERE r.value <> 'NaN'::double precision
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved) AS rows, (SELECT count(*) FROM recovered) AS partials
"""

# Server processes still running, of those given.
_ALIVE = "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])"

# Room to sort a merge's partials in memory (this transaction only).
_MERGE_MEMORY = "SET LOCAL work_mem = '128MB'"
# One merger at a time, whatever the number of ingesters: the others skip their turn.
_MERGE_LOCK = "SELECT pg_try_advisory_xact_lock(7301998173522371379)"
_MERGE_WAIT = "SELECT pg_advisory_xact_lock(7301998173522371379)"


class _MissingRowsError(Exception):
    """Some journal rows of held partials are gone; `left`: the flush parts still there."""

    def __init__(self, left: list[int]) -> None:
        super().__init__(left)
        self.left = left


async def new_epoch(conn: asyncpg.Connection) -> int:
    """A journal epoch for a new ingester process (telemetry.rollup_epochs)."""
    return int(await conn.fetchval(_EPOCH_SQL))


async def merge_held(conn: asyncpg.Connection, held: Held, *, staged: set[str]) -> bool:
    """Upsert the partials an ingester held into the rollup tables and delete their journal
    rows, in one transaction. True if done so; False if some of those rows had been recovered
    by another ingester meanwhile (this one's epoch lock was lost): then the rows left are
    recovered from their readings instead, and `held` must be dropped. `staged`: the stage
    tables the connection has (updated)."""
    async with conn.transaction():
        await conn.execute(_MERGE_WAIT)
        await conn.execute(_MERGE_MEMORY)  # the upserts sort the staged rows in memory
        try:
            async with conn.transaction():  # a savepoint: undone if rows are missing
                rows = await conn.fetch(_DELETE_HELD, held.epoch, held.flushes)
                if len(rows) != len(set(held.flushes)):
                    raise _MissingRowsError([r["flush"] for r in rows])
        except _MissingRowsError as missing:
            found = await conn.fetchrow(_RECOVER, held.epoch, missing.left)
            assert found is not None
            metrics.ROLLUP_RECOVERED.inc(found["rows"])
            return False
        if not staged:
            await conn.execute(_STAGE_DDL)
        await conn.copy_to_table(
            "rollup_stage_1m",
            source=cast(Any, partials_copy(held.minute)),
            columns=list(PARTIAL_COLUMNS),
            format="binary",
        )
        await conn.copy_to_table(
            "rollup_stage_1h",
            source=cast(Any, partials_copy(held.hour)),
            columns=list(PARTIAL_COLUMNS),
            format="binary",
        )
        for upsert in _UPSERT_HELD:
            await conn.execute(upsert)
    staged.add("rollup_stage")
    metrics.ROLLUP_MERGES.inc()
    metrics.ROLLUP_ROWS.labels("1m").inc(len(held.minute))
    metrics.ROLLUP_ROWS.labels("1h").inc(len(held.hour))
    return True


async def recover_orphans(conn: asyncpg.Connection, *, epoch: int) -> int:
    """Move the journal rows of epochs no ingester holds into rollup_pending, rolled up from
    the readings they name; returns how many rows."""
    moved = 0
    for row in await conn.fetch(_OTHER_EPOCHS, epoch):
        async with conn.transaction():
            if not await conn.fetchval(_TRY_EPOCH, row["epoch"]):
                continue  # its ingester runs
            found = await conn.fetchrow(_RECOVER, row["epoch"], None)
            assert found is not None
            moved += found["rows"]
    metrics.ROLLUP_RECOVERED.inc(moved)
    return moved


async def recover_in_doubt(conn: asyncpg.Connection, journal: PartialsJournal) -> int:
    """Recover this ingester's journal rows whose transactions went unheard, once the server
    process that ran each has ended: from then on the row either committed or never will.
    Returns how many rows were recovered."""
    doubtful = journal.doubtful()
    if not doubtful or journal.epoch is None:
        return 0
    alive = {r["pid"] for r in await conn.fetch(_ALIVE, list(doubtful))}
    moved = 0
    for pid, flushes in doubtful.items():
        if pid in alive:
            continue
        found = await conn.fetchrow(_RECOVER, journal.epoch, flushes)
        assert found is not None
        moved += found["rows"]
        journal.resolved(pid)
    metrics.ROLLUP_RECOVERED.inc(moved)
    return moved


async def merge_rollups(conn: asyncpg.Connection) -> int | None:
    """Merge every committed rollup partial into the rollup tables, in one transaction.

    Returns how many partials were merged, or None when another ingester was merging.
    """
    async with conn.transaction():
        if not await conn.fetchval(_MERGE_LOCK):
            return None
        await conn.execute(_MERGE_MEMORY)
        row = await conn.fetchrow(MERGE_SQL)
    assert row is not None
    metrics.ROLLUP_MERGES.inc()
    metrics.ROLLUP_ROWS.labels("1m").inc(row["minutes"])
    metrics.ROLLUP_ROWS.labels("1h").inc(row["hours"])
    return int(row["partials"])


class RollupMerger:
    """Merges rollup partials every `interval_s` until `stop`, on its own connection, which
    holds the lock of the `journal`'s epoch while this ingester runs. Leaving the context
    closes it, within `wait_s`."""

    def __init__(
        self,
        *,
        dsn: str,
        connect_timeout_s: float,
        interval_s: float,
        journal: PartialsJournal | None = None,
    ) -> None:
        self._sink = Sink(dsn=dsn, connect_timeout_s=connect_timeout_s)
        self._interval_s = interval_s
        self._journal = journal
        self._stop = asyncio.Event()
        self._staged: set[str] = set()

    def stop(self) -> None:
        """A merge in progress finishes; no new one starts."""
        self._stop.set()

    def abort(self) -> None:
        """Drop the connection now: the server rolls a merge in progress back."""
        self._sink.discard()

    async def close(self, *, wait_s: float) -> None:
        if wait_s > 0:
            await self._sink.close(wait_s=min(5.0, wait_s))
        else:
            self._sink.discard()

    async def run(self) -> None:
        with contextlib.suppress(TransientSinkError, PermanentSinkError, *CLIENT_ERRORS):
            await self._connect()  # the epoch's lock from the start; else at the first merge
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval_s)
            if not self._stop.is_set():
                await self.merge_once()

    async def _connect(self) -> None:
        sink = self._sink
        if sink.connected:
            return
        await sink.connect()
        self._staged.clear()
        epoch = self._journal.epoch if self._journal is not None else None
        if epoch is not None:
            try:
                await sink.connection.fetchval(_LOCK_EPOCH, epoch)
            except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
                sink.discard()  # a connection without the lock must not merge
                raise classify(exc) from exc

    async def merge_once(self) -> None:
        """One merge: the partials held, the journals of ingesters gone, rollup_pending. A
        failure is logged and left to the next one; held partials are kept for it."""
        sink = self._sink
        held = None
        try:
            await self._connect()
            started = time.monotonic()
            journal = self._journal
            if journal is not None and journal.epoch is not None:
                held = journal.take()
                if held is not None:
                    await merge_held(sink.connection, held, staged=self._staged)
                    held = None  # merged, or recovered from the readings instead
                await recover_in_doubt(sink.connection, journal)
                await recover_orphans(sink.connection, epoch=journal.epoch)
            merged = await merge_rollups(sink.connection)
            if merged:
                log.debug("merged %d rollup partials in %.2fs", merged, time.monotonic() - started)
        except (TransientSinkError, PermanentSinkError) as exc:
            log.warning("rollup merge skipped: %s", exc)
        except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                sink.discard()
            log.warning("rollup merge skipped, the next one retries: %s", classify(exc))
        finally:
            if held is not None and self._journal is not None:
                self._journal.put_back(held)
