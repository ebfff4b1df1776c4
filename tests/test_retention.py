"""`ingest retain` against the real TimescaleDB: whole old chunks go, everything newer stays."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support.cluster import Database, create_database, drop_database
from tests.support.ingester import ingest_cli

CUTOFF = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    """A migrated database of its own, holding rows of several ages in four tables."""
    database = await create_database(migrated=True)
    conn = await asyncpg.connect(database.owner_url)
    try:
        for age in ("200 days", "100 days", "10 days", "1 hour"):
            await conn.execute(
                "INSERT INTO telemetry.readings VALUES (now() - $1::text::interval, 7, 1.5, 0)", age
            )
        for age in ("60 days", "1 day"):
            await conn.execute(
                "INSERT INTO telemetry.dead_letters VALUES (now() - $1::text::interval, 't', '', 'r')",
                age,
            )
        for age in ("40 days", "1 day"):
            await conn.execute(
                "INSERT INTO telemetry.rollup_1m VALUES (date_trunc('minute', now() - $1::text::interval),"
                " 7, 1, 1, 1, 1, 1, now() - $1::text::interval, 1, now() - $1::text::interval)",
                age,
            )
        await conn.execute(
            "INSERT INTO telemetry.anomalies (start_time, sensor_id, kind)"
            " VALUES (now() - interval '400 days', 7, 'spike')"
        )
    finally:
        await conn.close()
    yield database
    await drop_database(database)


async def ingest_retain(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    return await ingest_cli("retain", *args, env=env, timeout=60)


async def ages(db: Database) -> dict[str, list[int]]:
    """Age in whole days of every row per table, oldest first."""
    conn = await asyncpg.connect(db.owner_url)
    try:
        out = {}
        for table, column in (
            ("readings", "time"),
            ("dead_letters", "received_at"),
            ("rollup_1m", "bucket"),
            ("anomalies", "start_time"),
        ):
            out[table] = [
                r[0]
                for r in await conn.fetch(
                    f"SELECT extract(day FROM now() - {column})::int FROM telemetry.{table}"
                    f" ORDER BY {column}"
                )
            ]
        return out
    finally:
        await conn.close()


def settings(db: Database, **days: str) -> dict[str, str]:
    env = {"INGEST_DB_URL": db.ingest_url, "INGEST_MIGRATE_DB_URL": db.owner_url}
    env.update({f"INGEST_RETENTION_{table.upper()}_DAYS": d for table, d in days.items()})
    return env


BEFORE = {
    "readings": [200, 100, 10, 0],
    "dead_letters": [60, 1],
    "rollup_1m": [40, 1],
    "anomalies": [400],
}


async def test_retain_drops_the_chunks_older_than_each_tables_retention(db: Database) -> None:
    assert await ages(db) == BEFORE
    env = settings(db, readings="30", dead_letters="30", rollup_1m="14")
    code, out, err = await ingest_retain(env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, out
    for line, table, dropped, days in zip(
        lines, ("readings", "rollup_1m", "dead_letters"), (2, 1, 1), (30, 14, 30), strict=True
    ):
        assert re.fullmatch(
            rf"ingest: retain telemetry\.{table}: dropped {dropped} chunk\(s\) with data older "
            rf"than {CUTOFF} \({days} days\)",
            line,
        ), line
    # Anomalies have no retention set: kept, however old.
    assert await ages(db) == {
        "readings": [10, 0],
        "dead_letters": [1],
        "rollup_1m": [1],
        "anomalies": [400],
    }
    code, out, _ = await ingest_retain(env=env)  # again: nothing left to drop
    assert code == 0
    assert [line.split(": ")[2].split(" with")[0] for line in out.splitlines()] == [
        "dropped 0 chunk(s)"
    ] * 3


async def test_dry_run_lists_the_chunks_and_drops_nothing(db: Database) -> None:
    code, out, err = await ingest_retain("--dry-run", env=settings(db, readings="50"))
    assert code == 0, err
    assert re.fullmatch(
        rf"ingest: retain telemetry\.readings: would drop 2 chunk\(s\) with data older than "
        rf"{CUTOFF} \(50 days\)\n",
        out,
    ), out
    assert await ages(db) == BEFORE


async def test_no_retention_set_drops_nothing(db: Database) -> None:
    code, out, err = await ingest_retain(env=settings(db))
    assert code == 0, err
    assert out == "ingest: retain: no retention set (retention.*_days), nothing dropped\n"
    assert await ages(db) == BEFORE


async def test_the_service_role_may_not_drop_chunks(db: Database) -> None:
    env = {**settings(db, readings="30"), "INGEST_MIGRATE_DB_URL": ""}
    code, out, err = await ingest_retain(env=env)
    assert code == 1
    assert out == ""
    assert err == (
        "ingest: retain: telemetry.readings: dropping chunks needs the tables' owner; give "
        "db.migrate_url (INGEST_MIGRATE_DB_URL), the role 'ingest migrate' uses\n"
    )
    assert await ages(db) == BEFORE


@pytest.mark.parametrize("days", ["-1", "0.01", "nan", "forever"])
async def test_bad_retention_is_one_line_naming_the_key(db: Database, days: str) -> None:
    code, _, err = await ingest_retain(env=settings(db, anomalies=days))
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(
        "ingest: config: retention.anomalies_days (INGEST_RETENTION_ANOMALIES_DAYS): "
    ), err
    assert await ages(db) == BEFORE
