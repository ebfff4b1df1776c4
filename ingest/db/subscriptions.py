"""The topic filters of each client id's broker session (telemetry.mqtt_subscriptions), so that
the filters a configuration no longer names are unsubscribed from rather than left in the
session, still routing messages to it.

A session keeps its subscriptions across connections and a client cannot ask the broker for
them. So before subscribing, an ingester records its filters and reads the others recorded for
its client id; the source unsubscribes from those (`MqttSource.forget`), and only once the
broker confirmed are they forgotten (`ingest.session`). Each client id has its own rows, so
any number of ingesters can do this at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from ingest.db.sink import CLIENT_ERRORS

log = logging.getLogger(__name__)

_RECORD_SQL = """
INSERT INTO telemetry.mqtt_subscriptions (client_id, topic_filter)
SELECT $1, f FROM unnest($2::text[]) AS f
ON CONFLICT DO NOTHING
"""
_STALE_SQL = """
SELECT topic_filter FROM telemetry.mqtt_subscriptions
 WHERE client_id = $1 AND NOT topic_filter = ANY($2::text[])
 ORDER BY topic_filter
"""
_FORGET_ALL_SQL = "DELETE FROM telemetry.mqtt_subscriptions WHERE client_id = $1"
_FORGET_SQL = """
DELETE FROM telemetry.mqtt_subscriptions WHERE client_id = $1 AND topic_filter = ANY($2::text[])
"""


async def record(conn: asyncpg.Connection, client_id: str, filters: Sequence[str]) -> list[str]:
    """Record that `client_id`'s session is subscribed to `filters`, before subscribing (so no
    crash leaves a filter unrecorded); return the other filters recorded for it, which the
    session may still hold. On a database error: a warning, and none."""
    try:
        async with conn.transaction():
            await conn.execute(_RECORD_SQL, client_id, list(filters))
            rows = await conn.fetch(_STALE_SQL, client_id, list(filters))
    except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
        log.warning("could not record the MQTT filters of %r: %s", client_id, exc)
        return []
    return [r["topic_filter"] for r in rows]


async def forget(conn: asyncpg.Connection, client_id: str, filters: Sequence[str] | None) -> None:
    """Forget filters the session no longer holds (None: all of them, the session ended)."""
    if filters is None:
        await conn.execute(_FORGET_ALL_SQL, client_id)
    else:
        await conn.execute(_FORGET_SQL, client_id, list(filters))


async def forget_apart(
    filters: Sequence[str] | None, *, dsn: str, client_id: str, timeout_s: float
) -> None:
    """`forget` on a connection of its own (the writer's may be busy). A failure leaves the
    filters recorded: the next start unsubscribes from them again, which is harmless."""
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
        try:
            await forget(conn, client_id, filters)
        finally:
            await conn.close(timeout=timeout_s)
    except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
        log.warning("could not forget the MQTT filters of %r: %s", client_id, exc)
