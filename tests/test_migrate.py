"""Migrations: applied once under concurrency, tampering refused, hypertables present."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from ingest.db.migrate import default_schema_dir, load_migrations, migrate
from tests.support.cluster import Database
from tests.support.ingester import ingest_cli

SCHEMA_FILES = sorted(p.name for p in Path(str(default_schema_dir())).glob("*.sql"))


def _migrate_env(db: Database) -> dict[str, str]:
    return {"INGEST_DB_URL": db.ingest_url, "INGEST_MIGRATE_DB_URL": db.owner_url}


async def test_concurrent_migrate_applies_each_file_once(empty_database: Database) -> None:
    env = _migrate_env(empty_database)
    results = await asyncio.gather(*(ingest_cli("migrate", env=env) for _ in range(4)))
    assert [r[0] for r in results] == [0, 0, 0, 0], [r[2] for r in results]
    applied_lines = [
        line for r in results for line in r[2].splitlines() if "applied migration" in line
    ]
    assert sorted(line.rsplit(" ", 1)[-1] for line in applied_lines) == SCHEMA_FILES
    conn = await asyncpg.connect(empty_database.owner_url)
    try:
        rows = await conn.fetch(
            "SELECT name, checksum FROM telemetry.schema_migrations ORDER BY name"
        )
    finally:
        await conn.close()
    expected = [(m.name, m.checksum) for m in load_migrations(default_schema_dir())]
    assert [(r["name"], r["checksum"]) for r in rows] == expected
    code, out, _ = await ingest_cli("migrate", env=env)
    assert code == 0
    assert out.strip() == "ingest: 0 migration(s) applied, schema is current"


async def test_changed_migration_is_refused(empty_database: Database, tmp_path: Path) -> None:
    schema = tmp_path / "schema"
    shutil.copytree(str(default_schema_dir()), schema)
    await migrate(dsn=empty_database.owner_url, schema_dir=schema)
    first = schema / SCHEMA_FILES[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    code, out, err = await ingest_cli(
        "migrate", "--schema-dir", str(schema), env=_migrate_env(empty_database)
    )
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"ingest: migration {SCHEMA_FILES[0]} has changed since it was applied (checksum "
    )
    assert lines[0].endswith("add a new migration instead of editing an applied one")


async def test_missing_applied_migration_is_refused(
    empty_database: Database, tmp_path: Path
) -> None:
    schema = tmp_path / "schema"
    shutil.copytree(str(default_schema_dir()), schema)
    await migrate(dsn=empty_database.owner_url, schema_dir=schema)
    (schema / SCHEMA_FILES[-1]).unlink()
    code, _, err = await ingest_cli(
        "migrate", "--schema-dir", str(schema), env=_migrate_env(empty_database)
    )
    assert code == 1
    assert err.strip() == (
        f"ingest: migration {SCHEMA_FILES[-1]} is recorded as applied but is missing from the "
        "schema folder"
    )


async def test_hypertables_are_in_timescaledb_catalog(database: Database) -> None:
    conn = await asyncpg.connect(database.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT hypertable_name, d.column_name, d.time_interval"
            "  FROM timescaledb_information.hypertables h"
            "  JOIN timescaledb_information.dimensions d USING (hypertable_schema, hypertable_name)"
            " WHERE hypertable_schema = 'telemetry' ORDER BY 1"
        )
    finally:
        await conn.close()
    found = {r["hypertable_name"]: r["column_name"] for r in rows}
    assert found == {
        "anomalies": "start_time",
        "dead_letters": "received_at",
        "readings": "time",
        "rollup_1h": "bucket",
        "rollup_1m": "bucket",
    }


async def test_readings_have_only_the_unique_index(database: Database) -> None:
    conn = await asyncpg.connect(database.owner_url)
    try:
        rows = await conn.fetch(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'telemetry' AND tablename = 'readings'"
        )
    finally:
        await conn.close()
    assert [r["indexdef"] for r in rows] == [
        "CREATE UNIQUE INDEX readings_sensor_time_key ON telemetry.readings "
        'USING btree (sensor_id, "time")'
    ]


@pytest.mark.parametrize("bad", ["INGEST_DB_URL=mysql://x", "INGEST_FLUSH_INTERVAL_S=soon"])
async def test_bad_config_is_one_line_naming_the_key(bad: str) -> None:
    key, value = bad.split("=", 1)
    code, _, err = await ingest_cli(
        "migrate", env={"INGEST_DB_URL": "postgresql://x/y", key: value}
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("ingest: config: ")
    assert f"({key})" in err
