"""What a database holds, as the tests compare it: readings, dead letters, and locks."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg

from tests.support.cluster import Database
from tests.support.ingester import Ingester
from tests.support.process import wait_until
from tests.support.streams import Row


async def stored(db: Database, site: str) -> list[Row]:
    """Every reading of the site, as the analysts see it (in µs, device, sensor, time order)."""
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT (extract(epoch FROM ts) * 1000000)::bigint AS t, device, sensor, value, quality"
            "  FROM telemetry.readings_v WHERE device LIKE $1 || '/%' ORDER BY 2, 3, 1",
            site,
        )
    finally:
        await conn.close()
    return [(r["t"], r["device"], r["sensor"], r["value"], r["quality"]) for r in rows]


async def stored_count(db: Database, site: str) -> int:
    conn = await asyncpg.connect(db.analyst_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM telemetry.readings_v WHERE device LIKE $1 || '/%'", site
        )
    finally:
        await conn.close()
    return count


async def assert_exactly_once(
    db: Database, site: str, expected: set[Row], *, running: Sequence[Ingester] = ()
) -> None:
    """Wait until the site holds as many readings as expected, then compare them all.

    Fails at once, with its log, if one of the `running` ingesters exits meanwhile.
    """

    async def all_there() -> bool:
        for service in running:
            assert service.alive, f"ingest run exited: {service.log.decode()}"
        return await stored_count(db, site) >= len(expected)

    await wait_until(all_there, timeout=120)
    rows = await stored(db, site)
    assert len(rows) == len(expected), "a reading was stored twice"
    missing = expected - set(rows)
    extra = set(rows) - expected
    problems = (
        f"{len(missing)} readings missing (e.g. {sorted(missing)[:3]}), "
        f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})"
    )
    assert not missing, problems
    assert not extra, problems


async def dead_letters(db: Database, prefix: str) -> list[tuple[str, bytes, str, str | None]]:
    """(topic, payload, reason, content type) of the dead letters under `prefix`, in the order
    they were received."""
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT topic, payload, reason, content_type FROM telemetry.dead_letters"
            " WHERE topic LIKE $1 || '/%' ORDER BY received_at, reason",
            prefix,
        )
    finally:
        await conn.close()
    return [(r["topic"], r["payload"], r["reason"], r["content_type"]) for r in rows]


@dataclass(frozen=True)
class DeadLetterDigest:
    """A dead letter with its payload's digest and length in place of the payload."""

    topic: str
    payload_md5: str
    payload_len: int
    reason: str
    content_type: str | None


async def dead_letter_digests(db: Database, prefix: str) -> list[DeadLetterDigest]:
    """The dead letters under `prefix`, payloads as digests (for large, hostile payloads)."""
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT topic, md5(payload) AS md5, length(payload) AS len, reason, content_type"
            "  FROM telemetry.dead_letters WHERE starts_with(topic, $1 || '/')",
            prefix,
        )
    finally:
        await conn.close()
    return [
        DeadLetterDigest(r["topic"], r["md5"], r["len"], r["reason"], r["content_type"])
        for r in rows
    ]


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@contextlib.asynccontextmanager
async def table_lock(db: Database, *tables: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold ACCESS EXCLUSIVE locks on `tables` in an owner transaction until the block ends."""
    conn = await asyncpg.connect(db.owner_url)
    try:
        await conn.execute("SET lock_timeout = '30s'")  # taking the lock is bounded too
        tx = conn.transaction()
        await tx.start()
        try:
            for table in tables:
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield conn
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def ingest_waits_for_lock(conn: asyncpg.Connection) -> bool:
    """Whether a session of the `ingest` role is blocked on a lock (seen from the lock holder)."""
    waiting: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE NOT l.granted AND a.usename = 'ingest' AND l.database = ("
        "SELECT oid FROM pg_database WHERE datname = current_database()))"
    )
    return waiting
