"""The registry against a real scratch database: caps, bulk loading, message shapes."""

from __future__ import annotations

import asyncio
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


# ------------------------------------------------------------------------------ exact contents
# The tests below have a database each (`db`), so that they can compare whole tables.


async def _tables(db: Database) -> dict[str, list[tuple[object, ...]]]:
    """The registry's tables by path, ids replaced by the paths they stand for."""
    conn = await asyncpg.connect(db.owner_url)
    try:
        assets = await conn.fetch(
            "SELECT a.path, p.path AS parent, a.name, a.depth FROM telemetry.assets a"
            " LEFT JOIN telemetry.assets p ON p.id = a.parent_id ORDER BY a.path"
        )
        devices = await conn.fetch(
            "SELECT d.path, d.name, a.path AS asset FROM telemetry.devices d"
            " LEFT JOIN telemetry.assets a ON a.id = d.asset_id ORDER BY d.path"
        )
        sensors = await conn.fetch(
            "SELECT s.id, d.path, s.name, s.unit,"
            " (extract(epoch FROM s.last_seen) * 1000000)::bigint AS last_seen"
            " FROM telemetry.sensors s JOIN telemetry.devices d ON d.id = s.device_id"
            " ORDER BY d.path, s.name"
        )
    finally:
        await conn.close()
    return {
        "assets": [tuple(r) for r in assets],
        "devices": [tuple(r) for r in devices],
        "sensors": [tuple(r) for r in sensors],
    }


async def test_first_sight_registers_assets_devices_and_sensors_exactly(db: Database) -> None:
    conn = await asyncpg.connect(db.ingest_url)
    try:
        registry = Registry(max_sensors_per_device=2)
        one, two = ("plant", "line1", "press-1"), ("plant", "line2", "robot-1")
        sensors = {
            SensorKey(one, "temp"): "degC",
            SensorKey(one, "speed"): None,
            SensorKey(one, "torque"): "Nm",  # over the cap of 2: refused
            SensorKey(two, "temp"): "K",
            SensorKey(("solo",), "x"): None,  # a device without assets above it
        }
        latest = {SensorKey(one, "temp"): 1_767_225_600_000_001, SensorKey(two, "temp"): 0}
        refused = await registry.resolve(conn, sensors=sensors, latest=latest)
    finally:
        await conn.close()
    assert refused == {SensorKey(one, "torque")}
    tables = await _tables(db)
    assert tables["assets"] == [
        ("plant", None, "plant", 1),
        ("plant/line1", "plant", "line1", 2),
        ("plant/line2", "plant", "line2", 2),
    ]
    assert tables["devices"] == [
        ("plant/line1/press-1", "press-1", "plant/line1"),
        ("plant/line2/robot-1", "robot-1", "plant/line2"),
        ("solo", "solo", None),
    ]
    assert [s[1:] for s in tables["sensors"]] == [
        ("plant/line1/press-1", "speed", None, None),
        ("plant/line1/press-1", "temp", "degC", 1_767_225_600_000_001),
        ("plant/line2/robot-1", "temp", "K", 0),
        ("solo", "x", None, None),
    ]
    assert {
        registry.get(SensorKey(tuple(str(p).split("/")), str(n)))
        for _, p, n, *_ in tables["sensors"]
    } == {s[0] for s in tables["sensors"]}
    assert registry.get(SensorKey(one, "torque")) is None


async def test_a_new_unit_is_written_and_no_unit_changes_nothing(db: Database) -> None:
    key = SensorKey(("plant", "dev"), "temp")
    conn = await asyncpg.connect(db.ingest_url)
    try:
        registry = Registry()
        await registry.resolve(conn, sensors={key: "degC"})
        await registry.resolve(conn, sensors={key: "K"})
        await registry.resolve(conn, sensors={key: None})  # a message without a unit
        other = Registry()  # another ingester, which saw the unit first as degC
        await other.resolve(conn, sensors={key: None})
    finally:
        await conn.close()
    assert [s[2:4] for s in (await _tables(db))["sensors"]] == [("temp", "K")]
    assert other.get(key) == registry.get(key)


async def test_a_sensor_registered_first_by_another_ingester_gets_the_unit_it_names(
    db: Database,
) -> None:
    """One flush's sensors, some registered meanwhile by another ingester with other units:
    each gets its one id, and the units the later flush names are written."""
    levels = ("plant", "line1", "dev")
    conn = await asyncpg.connect(db.ingest_url)
    try:
        first = Registry()
        await first.resolve(
            conn, sensors={SensorKey(levels, "b"): "bar", SensorKey(levels, "d"): None}
        )
        later = Registry()
        wanted = {
            SensorKey(levels, n): u for n, u in [("a", "K"), ("b", "psi"), ("c", None), ("d", "V")]
        }
        await later.resolve(
            conn, sensors=wanted, latest=dict.fromkeys(wanted, 1_700_000_000_000_000)
        )
        stored = await conn.fetch("SELECT id, name, unit FROM telemetry.sensors ORDER BY name")
    finally:
        await conn.close()
    assert [(r["name"], r["unit"]) for r in stored] == [
        ("a", "K"),
        ("b", "psi"),
        ("c", None),
        ("d", "V"),
    ]
    assert [later.get(k) for k in wanted] == [r["id"] for r in stored]
    assert first.get(SensorKey(levels, "b")) == later.get(SensorKey(levels, "b"))
    assert later.message_ids(levels, ("b",), ("psi",)) is None
    assert later.remember(levels, ("a", "b"), ("K", "psi")).tolist() == [
        r["id"] for r in stored[:2]
    ]


async def test_two_registries_registering_the_same_sensors_at_once_agree(db: Database) -> None:
    devices = [("plant", f"line{n % 2}", f"dev-{n}") for n in range(20)]
    wanted = {SensorKey(levels, name): None for levels in devices for name in ("a", "b", "c")}
    a_conn, b_conn = await asyncpg.connect(db.ingest_url), await asyncpg.connect(db.ingest_url)
    try:
        a, b = Registry(), Registry()
        refused = await asyncio.gather(
            a.resolve(a_conn, sensors=wanted),
            b.resolve(b_conn, sensors=wanted),
        )
    finally:
        await a_conn.close()
        await b_conn.close()
    assert list(refused) == [set(), set()]
    assert all(a.get(k) == b.get(k) is not None for k in wanted)
    tables = await _tables(db)
    assert len(tables["sensors"]) == len(wanted) == 60
    assert len(tables["devices"]) == 20
    assert [r[0] for r in tables["assets"]] == ["plant", "plant/line0", "plant/line1"]


async def test_a_loaded_registry_resolves_known_sensors_without_the_database(
    db: Database,
) -> None:
    known = {SensorKey(("plant", "dev-1"), name): "bar" for name in ("p1", "p2")}
    conn = await asyncpg.connect(db.ingest_url)
    try:
        empty = Registry()
        await empty.load(conn)  # nothing registered yet
        await Registry().resolve(conn, sensors=known)
        loaded = Registry()
        await loaded.load(conn)
    finally:
        await conn.close()
    assert len(empty) == 0
    assert len(loaded) == 2
    # Every name and unit is known: resolving touches no connection (this one is closed).
    assert await loaded.resolve(conn, sensors=known) == set()
    assert [loaded.name_of(loaded.get(k) or 0) for k in known] == [
        ("plant/dev-1", "p1"),
        ("plant/dev-1", "p2"),
    ]


async def test_registries_meeting_the_same_new_sensors_in_opposite_orders_do_not_deadlock(
    db: Database,
) -> None:
    """Each ingester meets a plant's sensors in its own arrival order; every round, two register
    the same 2,000 new ones, one in reverse, at the same moment: both succeed, with one id each."""
    conns = [await asyncpg.connect(db.ingest_url) for _ in range(2)]
    try:
        for run in range(5):
            devices = [(f"order-{run}", "line1", f"dev-{n}") for n in range(100)]
            forward = [SensorKey(levels, f"s{i:02d}") for levels in devices for i in range(20)]
            a, b = Registry(), Registry()
            refused = await asyncio.gather(
                a.resolve(conns[0], sensors=dict.fromkeys(forward)),
                b.resolve(conns[1], sensors=dict.fromkeys(reversed(forward))),
            )
            assert list(refused) == [set(), set()]
            assert all(a.get(k) == b.get(k) is not None for k in forward)
            assert len({a.get(k) for k in forward}) == 2_000
    finally:
        for conn in conns:
            await conn.close()


async def test_a_registration_meeting_sensors_registered_meanwhile_inside_a_transaction(
    db: Database,
) -> None:
    """The plain insert collides with a sensor another ingester registered: only that insert is
    undone (a savepoint), the sensors are registered again skipping it, and the transaction
    around goes on."""
    levels = ("plant", "line1", "dev")
    wanted = {SensorKey(levels, n): None for n in ("a", "b", "c")}
    conn = await asyncpg.connect(db.ingest_url)
    try:
        other = Registry()
        await other.resolve(conn, sensors={SensorKey(levels, "b"): None})
        registry = Registry()
        async with conn.transaction():
            await registry.resolve(conn, sensors=wanted)
            inside = await conn.fetchval("SELECT count(*) FROM telemetry.sensors")
        stored = await conn.fetch("SELECT id, name FROM telemetry.sensors ORDER BY name")
    finally:
        await conn.close()
    assert inside == 3
    assert [r["name"] for r in stored] == ["a", "b", "c"]
    assert [registry.get(k) for k in wanted] == [r["id"] for r in stored]
    assert registry.get(SensorKey(levels, "b")) == other.get(SensorKey(levels, "b"))


async def test_messages_naming_a_sensor_twice_register_it_once_with_the_later_unit(
    db: Database,
) -> None:
    """A flush's messages resolved together: a new sensor named twice gets the unit named last
    and its latest reading time; a known sensor's unit changed and changed back is not written."""
    levels = ("plant", "line1", "dev")
    conn = await asyncpg.connect(db.ingest_url)
    try:
        registry = Registry()
        await registry.resolve(conn, sensors={SensorKey(levels, "known"): "degC"})
        before = registry.units_version
        messages = [
            (levels, ("a", "b", "known"), ("bar", None, "K"), (5, 7, 9)),
            (levels, ("b", "a", "known"), ("V", None, "degC"), (6, 3, 10)),
        ]
        assert await registry.resolve_messages(conn, messages=messages) == set()
        stored = await conn.fetch(
            "SELECT name, unit, (extract(epoch FROM last_seen) * 1e6)::int8 AS t"
            " FROM telemetry.sensors ORDER BY name"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in stored] == [("a", "bar", 5), ("b", "V", 7), ("known", "degC", None)]
    assert registry.units_version == before
    assert registry.remember(levels, ("a", "b"), ("bar", "V")).tolist() == [
        registry.get(SensorKey(levels, n)) for n in ("a", "b")
    ]
