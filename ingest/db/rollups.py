"""Rollup partials merged into the rollup tables: one statement, one ingester at a time, on a
connection of its own, every `rollups.merge_interval_s`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg

from ingest import metrics
from ingest.db.sink import CLIENT_ERRORS, Sink, classify
from ingest.errors import PermanentSinkError, TransientSinkError

__all__ = ["MERGE_SQL", "ROLLUP_WIDTHS", "RollupMerger", "merge_rollups"]

log = logging.getLogger(__name__)

ROLLUP_WIDTHS = ("1m", "1h")
"""telemetry.rollup_<width>: merged from telemetry.rollup_pending by MERGE_SQL."""

_MERGE = """
    SELECT {bucket} AS bucket, sensor_id, min(min) AS min, max(max) AS max, sum(sum) AS sum,
           sum(count)::int8 AS count,
           (array_agg(first ORDER BY first_time))[1] AS first, min(first_time) AS first_time,
           (array_agg(last ORDER BY last_time DESC))[1] AS last, max(last_time) AS last_time
      FROM {source} GROUP BY 1, 2"""


def _merge_insert(table: str, source: str) -> str:
    return f"""
INSERT INTO telemetry.{table} AS r
       (bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time)
SELECT bucket, sensor_id, min, max, sum, count, first, first_time, last, last_time
  FROM {source} ORDER BY sensor_id, bucket
ON CONFLICT (sensor_id, bucket) DO UPDATE SET
    min = least(r.min, EXCLUDED.min),
    max = greatest(r.max, EXCLUDED.max),
    sum = r.sum + EXCLUDED.sum,
    count = r.count + EXCLUDED.count,
    first = CASE WHEN EXCLUDED.first_time < r.first_time THEN EXCLUDED.first ELSE r.first END,
    first_time = least(r.first_time, EXCLUDED.first_time),
    last = CASE WHEN EXCLUDED.last_time > r.last_time THEN EXCLUDED.last ELSE r.last END,
    last_time = greatest(r.last_time, EXCLUDED.last_time)
RETURNING 1"""


# Every committed partial, moved in one statement: deleted from the pending table, aggregated
# per (sensor, minute) and per (sensor, hour), and merged into the two rollup tables. Partials
# that commit meanwhile are not in the statement's snapshot and wait for the next merge.
_MERGE_1M = _merge_insert("rollup_1m", "minute")
_MERGE_1H = _merge_insert("rollup_1h", "hour")
MERGE_SQL = f"""
WITH moved AS (DELETE FROM telemetry.rollup_pending RETURNING *),
minute AS ({_MERGE.format(bucket="bucket", source="moved")}),
hour AS ({_MERGE.format(bucket="time_bucket(INTERVAL '1 hour', bucket)", source="minute")}),
m AS ({_MERGE_1M}),
h AS ({_MERGE_1H})
SELECT (SELECT count(*) FROM moved) AS partials, (SELECT count(*) FROM m) AS minutes,
       (SELECT count(*) FROM h) AS hours
"""
# Room to sort a merge's partials in memory (this transaction only).
_MERGE_MEMORY = "SET LOCAL work_mem = '128MB'"
# One merger at a time, whatever the number of ingesters: the others skip their turn.
_MERGE_LOCK = "SELECT pg_try_advisory_xact_lock(7301998173522371379)"


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
    """Merges the pending rollup partials every `interval_s` until `stop`, on its own
    connection. Leaving the context closes it, within `wait_s`."""

    def __init__(self, *, dsn: str, connect_timeout_s: float, interval_s: float) -> None:
        self._sink = Sink(dsn=dsn, connect_timeout_s=connect_timeout_s)
        self._interval_s = interval_s
        self._stop = asyncio.Event()

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
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval_s)
            if not self._stop.is_set():
                await self.merge_once()

    async def merge_once(self) -> None:
        """One merge; a failure is logged and left to the next one."""
        sink = self._sink
        try:
            if not sink.connected:
                await sink.connect()
            started = time.monotonic()
            merged = await merge_rollups(sink.connection)
            if merged:
                log.debug("merged %d rollup partials in %.2fs", merged, time.monotonic() - started)
        except (TransientSinkError, PermanentSinkError) as exc:
            log.warning("rollup merge skipped: %s", exc)
        except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                sink.discard()
            log.warning("rollup merge skipped, the next one retries: %s", classify(exc))
