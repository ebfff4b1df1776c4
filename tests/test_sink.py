"""The sink against a real scratch database: the redelivery path and appended extras."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import numpy as np
import pytest

from ingest.db.sink import Appended, Readings, Sink, Upsert
from tests.support.cluster import Database, admin_dsn
from tests.support.process import wait_until
from tests.support.streams import T0


@dataclass(slots=True)
class _Extras:
    upserts: list[Upsert] = field(default_factory=list)


def _readings(sensors: list[int], t: int = T0) -> Readings:
    n = len(sensors)
    return Readings(
        np.full(n, t, np.int64),
        np.array(sensors, np.int32),
        np.arange(n, dtype=np.float64),
        np.zeros(n, np.uint8),
    )


@pytest.fixture
async def sink(database: Database) -> AsyncIterator[Sink]:
    sink = Sink(dsn=database.ingest_url)
    await sink.connect()
    try:
        yield sink
    finally:
        await sink.close()


async def _waiting_for_lock(conn: asyncpg.Connection, pid: int) -> bool:
    kind = await conn.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
    return bool(kind == "Lock")


async def test_redelivery_learns_the_inserted_rows_from_the_insert(
    database: Database, sink: Sink
) -> None:
    """Keys that another ingester commits between the staging and the insert of a redelivered
    slab are neither counted as inserted nor given to derive (they would be rolled up twice)."""
    # Sensor ids of their own: the database is shared with other tests (readings have no
    # foreign key to the registry).
    base = int(np.random.default_rng().integers(1 << 30, (1 << 31) - 8))
    stored, racing, new = [base + 1, base + 2], [base + 3, base + 4], [base + 5, base + 6]
    derived: list[list[int]] = []

    def derive(rows: Readings) -> _Extras:
        derived.append(rows.sensor.tolist())
        return _Extras()

    await sink.write(readings=_readings(stored), dead_letters=(), derive=derive)
    other = await asyncpg.connect(database.ingest_url)
    watcher = await asyncpg.connect(admin_dsn(database.name))  # sees every session's waits
    try:
        # Another ingester inserts the racing keys and has not committed yet.
        tx = other.transaction()
        await tx.start()
        await other.copy_records_to_table(
            "readings",
            schema_name="telemetry",
            columns=["time", "sensor_id", "value", "quality"],
            records=[(datetime.fromtimestamp(T0 / 1e6, UTC), s, 0.0, 0) for s in racing],
        )
        pid = sink.connection.get_server_pid()
        write = asyncio.create_task(
            sink.write(readings=_readings(stored + racing + new), dead_letters=(), derive=derive)
        )
        # The COPY meets the stored keys first and is rolled back; the staged insert then
        # waits on the racing keys: the other ingester commits them now.
        await wait_until(lambda: _waiting_for_lock(watcher, pid))
        await tx.commit()
        result, _ = await write
    finally:
        await other.close()
        await watcher.close()
    assert result.staged
    assert (result.inserted, result.duplicates) == (2, 4)
    assert derived[-1] == new


async def test_appended_rows_go_only_to_appendable_tables(database: Database, sink: Sink) -> None:
    with pytest.raises(ValueError, match="not appendable"):
        Appended(table="readings", columns=("time",), data=memoryview(b""), rows=0)
