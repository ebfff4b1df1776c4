"""The registry against a real scratch database: caps, bulk loading, message shapes."""

from __future__ import annotations

import uuid

import asyncpg
import numpy as np

from ingest.db.registry import Registry, SensorKey
from tests.support.cluster import Database

SITE = f"reg-{uuid.uuid4().hex[:8]}"  # the database is shared by the module's tests
LEVELS = (SITE, "line1", "dev-1")


def keys(*names: str, levels: tuple[str, ...] = LEVELS) -> dict[SensorKey, str | None]:
    return {SensorKey(levels, name): None for name in names}


async def test_a_device_gets_at_most_its_cap_of_sensors_across_registries(
    database: Database,
) -> None:
    conn = await asyncpg.connect(database.ingest_url)
    try:
        first = Registry(max_sensors_per_device=3)
        refused = await first.resolve(conn, sensors=keys("a", "b", "c", "d", "e"))
        assert refused == set(keys("d", "e"))
        assert [first.get(k) is not None for k in keys("a", "b", "c", "d")] == [1, 1, 1, 0]
        # Another ingester, which knows nothing yet, counts what the database holds.
        second = Registry(max_sensors_per_device=3)
        assert await second.resolve(conn, sensors=keys("a", "f")) == set(keys("f"))
        assert second.get(SensorKey(LEVELS, "a")) == first.get(SensorKey(LEVELS, "a"))
        # Other devices have their own room.
        other = (SITE, "line1", "dev-2")
        assert await second.resolve(conn, sensors=keys("f", levels=other)) == set()
        count = await conn.fetchval(
            "SELECT count(*) FROM telemetry.sensors s JOIN telemetry.devices d"
            " ON d.id = s.device_id WHERE d.path LIKE $1 || '/%'",
            SITE,
        )
    finally:
        await conn.close()
    assert count == 4


async def test_load_reads_the_whole_registry_in_bulk(database: Database) -> None:
    conn = await asyncpg.connect(database.ingest_url)
    try:
        writer = Registry()
        names = [f"s{i}" for i in range(50)]
        devices = [(f"{SITE}-load", f"line{d % 3}", f"dev-{d}") for d in range(20)]
        wanted = {SensorKey(levels, n): "degC" for levels in devices for n in names}
        assert await writer.resolve(conn, sensors=wanted) == set()
        sensor = np.array([writer.get(SensorKey(devices[0], "s0"))], np.int32)
        await conn.execute(
            "UPDATE telemetry.sensors SET last_seen = 'epoch'::timestamptz + interval '1 hour'"
            " WHERE id = $1",
            int(sensor[0]),
        )
        reader = Registry()
        await reader.load(conn)
    finally:
        await conn.close()
    assert len(wanted) == 1000
    assert all(reader.get(k) == writer.get(k) for k in wanted)
    assert reader.name_of(int(sensor[0])) == (f"{SITE}-load/line0/dev-0", "s0")
    # last_seen comes with it: written an hour after the epoch, due again a minute later.
    hour = np.array([3_600_000_000], np.int64)
    assert not reader.last_seen_due(sensor, hour + 59_999_999)[0]
    assert reader.last_seen_due(sensor, hour + 60_000_000)[0]


async def test_a_message_shape_is_resolved_once_until_a_unit_changes(database: Database) -> None:
    conn = await asyncpg.connect(database.ingest_url)
    try:
        registry = Registry()
        levels = (SITE, "line1", "dev-shapes")
        names, units = ("a", "b"), ("degC", None)
        assert registry.message_ids(levels, names, units) is None
        await registry.resolve(
            conn, sensors={SensorKey(levels, "a"): "degC", **keys("b", levels=levels)}
        )
        ids = registry.remember(levels, names, units)
        assert ids.tolist() == [registry.get(SensorKey(levels, n)) for n in names]
        assert registry.message_ids(levels, names, units) is ids
        assert registry.message_ids(levels, names, ("K", None)) is None  # another unit
        await registry.resolve(conn, sensors={SensorKey(levels, "b"): "bar"})
        assert registry.message_ids(levels, names, units) is None  # a unit changed since
    finally:
        await conn.close()
