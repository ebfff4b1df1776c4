"""Schema migrations: apply `schema/*.sql` in order, once, under an advisory lock."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg

from ingest.errors import MigrationError, TransientSinkError

log = logging.getLogger(__name__)

# Any constant shared by every ingester of a database; pg_advisory_lock takes a bigint.
_LOCK_KEY = 0x696E6765_73740001

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS telemetry;
CREATE TABLE IF NOT EXISTS telemetry.schema_migrations (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ingest') THEN
        GRANT USAGE ON SCHEMA telemetry TO ingest;
        GRANT SELECT ON telemetry.schema_migrations TO ingest;
    END IF;
END
$$;
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file of the schema folder."""

    name: str
    sql: str
    checksum: str


def default_schema_dir() -> Traversable:
    """The migrations shipped inside the package as `ingest.schema` (the top-level `schema/`
    folder of the source tree, mapped by pyproject.toml)."""
    return resources.files("ingest.schema")


def load_migrations(schema_dir: Traversable) -> list[Migration]:
    """Read every `*.sql` file of `schema_dir` (a folder or package resources), sorted by name."""
    if not schema_dir.is_dir():
        raise MigrationError(f"schema folder {schema_dir} does not exist")
    found = []
    for entry in sorted(schema_dir.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql") or not entry.is_file():
            continue
        data = entry.read_bytes()
        found.append(Migration(entry.name, data.decode("utf-8"), hashlib.sha256(data).hexdigest()))
    if not found:
        raise MigrationError(f"schema folder {schema_dir} holds no .sql files")
    return found


def _check_applied(migrations: list[Migration], applied: dict[str, str]) -> None:
    known = {m.name: m for m in migrations}
    for name, checksum in applied.items():
        migration = known.get(name)
        if migration is None:
            raise MigrationError(
                f"migration {name} is recorded as applied but is missing from the schema folder"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {name} has changed since it was applied "
                f"(checksum {checksum[:12]} recorded, {migration.checksum[:12]} on disk); "
                "add a new migration instead of editing an applied one"
            )


async def pending(conn: asyncpg.Connection, *, migrations: list[Migration]) -> list[Migration]:
    """Migrations not yet applied; raises MigrationError when an applied one has changed."""
    exists = await conn.fetchval("SELECT to_regclass('telemetry.schema_migrations') IS NOT NULL")
    applied: dict[str, str] = {}
    if exists:
        rows = await conn.fetch("SELECT name, checksum FROM telemetry.schema_migrations")
        applied = {r["name"]: r["checksum"] for r in rows}
    _check_applied(migrations, applied)
    return [m for m in migrations if m.name not in applied]


async def migrate(*, dsn: str, schema_dir: Path | Traversable | None = None) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the names applied.

    Safe to run from many processes at once: a session advisory lock serialises them, and each
    one re-reads what is applied after taking it.
    """
    migrations = load_migrations(schema_dir or default_schema_dir())
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.CannotConnectNowError) as exc:
        raise TransientSinkError(f"cannot connect to the database for migrations: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"cannot connect to the database for migrations: {exc}") from exc
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(_BOOTSTRAP)
            for migration in await pending(conn, migrations=migrations):
                try:
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO telemetry.schema_migrations (name, checksum) "
                            "VALUES ($1, $2)",
                            migration.name,
                            migration.checksum,
                        )
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
                log.info("applied migration %s", migration.name)
                applied_now.append(migration.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"migrating failed: {exc}") from exc
    finally:
        await conn.close()
    return applied_now
