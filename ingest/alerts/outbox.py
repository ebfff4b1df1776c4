"""The outbox dispatcher: delivers committed notifications, in order per alert and sink.

Every ingester runs one. A pass takes, in one transaction, up to `batch` due rows with
`FOR UPDATE SKIP LOCKED` (so instances share the work and never send one row at the same
time), only rows with no earlier pending row of the same alert and sink (so a resolve never
overtakes its open), sends them concurrently, records each outcome and commits. A crash
before the commit leaves the rows pending: they are sent again (at least once; receivers
deduplicate by the notification id). It wakes on NOTIFY and polls as a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from typing import Any

import asyncpg

from ingest import metrics
from ingest.alerts.rules import Alerts
from ingest.alerts.sinks import Outcome, Sink, build
from ingest.alerts.store import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

_TAKE = """
SELECT o.id, o.sink, o.alert_key, o.event, o.payload::text AS payload, o.attempts
  FROM telemetry.alert_outbox o
 WHERE o.status = 'pending' AND o.next_attempt <= now()
   AND NOT EXISTS (SELECT 1 FROM telemetry.alert_outbox p
                    WHERE p.status = 'pending' AND p.sink = o.sink
                      AND p.alert_key = o.alert_key AND p.id < o.id)
 ORDER BY o.id
 LIMIT $1
   FOR UPDATE OF o SKIP LOCKED
"""
_DELIVERED = """
UPDATE telemetry.alert_outbox SET status = 'delivered', attempts = attempts + 1,
       delivered_at = now(), last_error = NULL
 WHERE id = ANY($1::bigint[])
"""
_RETRY = """
UPDATE telemetry.alert_outbox SET attempts = attempts + 1, last_error = $2,
       next_attempt = now() + make_interval(secs => $3)
 WHERE id = $1
"""
_FAILED = """
UPDATE telemetry.alert_outbox SET status = 'failed', attempts = attempts + 1, last_error = $2
 WHERE id = $1
"""
_LAG = """
SELECT coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), 0),
       count(*) FILTER (WHERE status = 'pending'),
       count(*) FILTER (WHERE status = 'failed')
  FROM telemetry.alert_outbox WHERE status <> 'delivered'
"""
_NEXT_DUE = """
SELECT extract(epoch FROM min(next_attempt) - now()) FROM telemetry.alert_outbox
 WHERE status = 'pending'
"""


def backoff(attempt: int, *, low: float, high: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter above half: attempt 1 waits about `low`."""
    ceiling = min(high, low * 2.0 ** max(0, attempt - 1))
    return float(ceiling * (0.5 + rng.random() / 2))


class Dispatcher:
    """Delivers the outbox on its own connections. `run` is called from one task only."""

    def __init__(self, *, settings: Alerts, sinks: dict[str, Sink] | None = None) -> None:
        self.settings = settings
        self._own_client: Any = None
        if sinks is None:
            sinks, self._own_client = build(settings.sinks, timeout_s=settings.timeout_s)
        self.sinks = sinks
        self._wake = asyncio.Event()
        self._rng = random.Random()

    async def pass_once(self, conn: asyncpg.Connection) -> int:
        """Deliver one batch of due rows; returns how many were taken."""
        async with conn.transaction():
            rows = await conn.fetch(_TAKE, self.settings.batch)
            if not rows:
                return 0
            outcomes = await asyncio.gather(*(self._send(r) for r in rows))
            delivered = []
            for row, outcome in zip(rows, outcomes, strict=True):
                sink = row["sink"]
                if outcome.result == "delivered":
                    delivered.append(row["id"])
                    metrics.ALERT_NOTIFICATIONS.labels(sink, "sent").inc()
                    continue
                attempt = row["attempts"] + 1
                if outcome.result == "failed" or attempt >= self.settings.max_attempts:
                    await conn.execute(_FAILED, row["id"], outcome.error)
                    metrics.ALERT_NOTIFICATIONS.labels(sink, "failed").inc()
                    log.warning(
                        "alert notification %d (%s, %s) to %s failed after %d attempt(s): %s",
                        row["id"],
                        row["alert_key"],
                        row["event"],
                        sink,
                        attempt,
                        outcome.error,
                    )
                    continue
                delay = backoff(
                    attempt,
                    low=self.settings.retry_min_s,
                    high=self.settings.retry_max_s,
                    rng=self._rng,
                )
                if outcome.retry_after_s is not None:
                    delay = max(outcome.retry_after_s, 0.0)
                await conn.execute(_RETRY, row["id"], outcome.error, delay)
                metrics.ALERT_NOTIFICATIONS.labels(sink, "retried").inc()
            if delivered:
                await conn.execute(_DELIVERED, delivered)
            return len(rows)

    async def _send(self, row: asyncpg.Record) -> Outcome:
        sink = self.sinks.get(row["sink"])
        if sink is None:
            return Outcome("failed", f"sink {row['sink']!r} is not configured")
        note: dict[str, Any] = json.loads(row["payload"])
        try:
            return await sink.send(note)
        except Exception as exc:  # a sink's own bug must not stop delivery to the others
            log.exception("alert sink %s raised", row["sink"])
            return Outcome("retry", f"{type(exc).__name__}")

    async def gauges(self, conn: asyncpg.Connection) -> float | None:
        """Set the outbox gauges; return seconds until the next pending row is due (or None)."""
        row = await conn.fetchrow(_LAG)
        assert row is not None
        lag, pending, failed = row
        metrics.ALERT_OUTBOX_LAG.set(float(lag))
        metrics.ALERT_OUTBOX_PENDING.set(pending)
        metrics.ALERT_OUTBOX_FAILED.set(failed)
        due = await conn.fetchval(_NEXT_DUE)
        return None if due is None else float(due)

    def _notified(self, *_args: object) -> None:
        self._wake.set()

    async def run(self, *, dsn: str, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set: on NOTIFY, when a retry is due, and every poll interval."""
        conn: asyncpg.Connection | None = None
        try:
            while not stop.is_set():
                wait = self.settings.poll_interval_s
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(dsn)
                        await conn.add_listener(NOTIFY_CHANNEL, self._notified)
                    self._wake.clear()
                    while await self.pass_once(conn) and not stop.is_set():
                        pass
                    due = await self.gauges(conn)
                    if due is not None:
                        wait = min(wait, max(due, 0.05))
                except Exception as exc:  # never take ingestion down with it
                    if isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError):
                        log.warning("alert dispatcher: database error, retrying: %s", exc)
                    else:
                        log.exception("alert dispatcher failed, retrying")
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                stopped = asyncio.ensure_future(stop.wait())
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait(
                        {stopped, woken}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    stopped.cancel()
                    woken.cancel()
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            for sink in self.sinks.values():
                await sink.aclose()
            if self._own_client is not None:
                await self._own_client.aclose()
