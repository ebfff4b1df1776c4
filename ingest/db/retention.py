"""`ingest retain`: drop each hypertable's chunks that hold only data older than its retention.

TimescaleDB's `drop_chunks` (in its Apache-licensed core) removes whole chunks, so a table keeps
at least its retention and at most one chunk interval more. Dropping a chunk needs the table's
owner, so this runs with the migration role, from a scheduler, never inside the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from ingest.config import Retention
from ingest.errors import IngestError

# (table in the telemetry schema, its retention setting)
TABLES = (
    ("readings", "readings_days"),
    ("rollup_1m", "rollup_1m_days"),
    ("rollup_1h", "rollup_1h_days"),
    ("anomalies", "anomalies_days"),
    ("dead_letters", "dead_letters_days"),
)


_SHOW = "SELECT show_chunks($1::regclass, older_than => $2::timestamptz)::text"
_DROP = "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)::text"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `retain` did (or, dry, would do) to one table."""

    table: str
    days: float
    cutoff: datetime
    chunks: tuple[str, ...]


_DELIVERED = """
SELECT id::text FROM telemetry.alert_outbox WHERE status = 'delivered' AND delivered_at < $1
"""
_DELETE_DELIVERED = """
DELETE FROM telemetry.alert_outbox WHERE status = 'delivered' AND delivered_at < $1
RETURNING id::text
"""


async def _drop_delivered(
    conn: asyncpg.Connection, *, days: float, cutoff: datetime, dry_run: bool
) -> Outcome:
    """Delivered alert notifications older than the cutoff (a plain table: rows, not chunks)."""
    rows = await conn.fetch(_DELIVERED if dry_run else _DELETE_DELIVERED, cutoff)
    return Outcome("alert_outbox", days, cutoff, tuple(r[0] for r in rows))


async def retain(
    *, dsn: str, retention: Retention, dry_run: bool = False, now: datetime | None = None
) -> list[Outcome]:
    """Drop (or with `dry_run` only list) the chunks entirely older than each cutoff.

    Tables whose retention is 0 are left alone. Raises IngestError with one readable line when
    the role does not own the tables or the schema is missing.
    """
    now = now or datetime.now(UTC)
    query = _SHOW if dry_run else _DROP
    out: list[Outcome] = []
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise IngestError(f"retain: cannot connect to the database: {exc}") from None
    try:
        for table, key in TABLES:
            days = float(getattr(retention, key))
            if not days:
                continue
            cutoff = now - timedelta(days=days)
            try:
                rows = await conn.fetch(query, f"telemetry.{table}", cutoff)
            except asyncpg.InsufficientPrivilegeError:
                raise IngestError(
                    f"retain: telemetry.{table}: dropping chunks needs the tables' owner; "
                    "give db.migrate_url (INGEST_MIGRATE_DB_URL), the role 'ingest migrate' uses"
                ) from None
            except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
                raise IngestError(
                    f"retain: telemetry.{table} does not exist; run 'ingest migrate' first"
                ) from None
            out.append(Outcome(table, days, cutoff, tuple(r[0] for r in rows)))
        if retention.alert_deliveries_days:  # alerts: delivered outbox rows (ingest/alerts)
            cutoff = now - timedelta(days=retention.alert_deliveries_days)
            days = retention.alert_deliveries_days
            out.append(await _drop_delivered(conn, days=days, cutoff=cutoff, dry_run=dry_run))
    finally:
        await conn.close()
    return out
