"""Every sensor has its device: the database's statement-level check (schema 016) against real
roles and concurrent transactions."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ingest.db.registry import Registry, SensorKey
from tests.support.cluster import Database, admin_dsn
from tests.support.process import wait_until

_ORPHANS = """
SELECT count(*) FROM telemetry.sensors s
 WHERE NOT EXISTS (SELECT 1 FROM telemetry.devices d WHERE d.id = s.device_id)
"""


async def _device(conn: asyncpg.Connection, path: str) -> int:
    device_id: int = await conn.fetchval(
        "INSERT INTO telemetry.devices (path, name) VALUES ($1, $1) RETURNING id", path
    )
    return device_id


async def _waiting(watcher: asyncpg.Connection, pid: int) -> None:
    """Until the server process `pid` waits for a lock."""

    async def waits() -> bool:
        kind = await watcher.fetchval(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
        )
        return bool(kind == "Lock")

    await wait_until(waits)


async def test_sensors_are_checked_once_per_statement_not_by_a_per_row_foreign_key(
    owner_conn: asyncpg.Connection,
) -> None:
    keys = await owner_conn.fetch(
        "SELECT conname FROM pg_constraint"
        " WHERE conrelid = 'telemetry.sensors'::regclass AND contype = 'f'"
    )
    triggers = await owner_conn.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'telemetry.sensors'::regclass"
        " AND NOT tgisinternal ORDER BY tgname"
    )
    assert keys == []
    assert [t["tgname"] for t in triggers] == [
        "sensors_check_device_insert",
        "sensors_check_device_update",
    ]


async def test_a_sensor_of_a_missing_device_is_refused_whole_statement(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    device = await _device(owner_conn, "plant/dev-1")
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="device check") as caught:
        await service.execute(
            "INSERT INTO telemetry.sensors (device_id, name)"
            " VALUES ($1, 'a'), ($1 + 1000, 'b'), ($1, 'c')",
            device,
        )
    assert (
        caught.value.detail
        == f'Key (device_id)=({device + 1000}) is not present in table "devices".'
    )
    # The service's own role, which may not lock devices itself, registers sensors as before.
    rows = await service.fetch(
        "INSERT INTO telemetry.sensors (device_id, name) VALUES ($1, 'a'), ($1, 'c')"
        " ON CONFLICT (device_id, name) DO NOTHING RETURNING name",
        device,
    )
    assert sorted(r["name"] for r in rows) == ["a", "c"]
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await owner_conn.execute(
            "UPDATE telemetry.sensors SET device_id = $1 + 1000 WHERE name = 'a'", device
        )
    assert await owner_conn.fetchval("SELECT count(*) FROM telemetry.sensors") == 2


async def test_a_device_that_sensors_name_is_not_deleted_renumbered_or_truncated(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    named = await _device(owner_conn, "plant/named")
    unnamed = await _device(owner_conn, "plant/unnamed")
    await service.execute("INSERT INTO telemetry.sensors (device_id, name) VALUES ($1, 'a')", named)
    for sql in (
        "DELETE FROM telemetry.devices WHERE id = $1",
        "UPDATE telemetry.devices SET id = DEFAULT WHERE id = $1",
    ):
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="device check"):
            await owner_conn.execute(sql, named)
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="device check"):
        await owner_conn.execute("TRUNCATE telemetry.devices CASCADE")
    await owner_conn.execute("DELETE FROM telemetry.devices WHERE id = $1", unnamed)
    rows = await owner_conn.fetch("SELECT id FROM telemetry.devices")
    assert [r["id"] for r in rows] == [named]


async def test_a_device_deleted_while_its_sensor_registers_leaves_no_orphan(
    db: Database, owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    # The delete first: the registration waits for it, then finds no device.
    first = await _device(owner_conn, "plant/dev-1")
    deleting = owner_conn.transaction()
    await deleting.start()
    await owner_conn.execute("DELETE FROM telemetry.devices WHERE id = $1", first)
    insert = asyncio.ensure_future(
        service.execute("INSERT INTO telemetry.sensors (device_id, name) VALUES ($1, 'a')", first)
    )
    watcher = await asyncpg.connect(admin_dsn(db.name))  # sees every session's waits
    try:
        await _waiting(watcher, service.get_server_pid())
        await deleting.commit()
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await insert
        # The registration first: the delete waits for it, then finds the sensor.
        second = await _device(owner_conn, "plant/dev-2")
        registering = service.transaction()
        await registering.start()
        await service.execute(
            "INSERT INTO telemetry.sensors (device_id, name) VALUES ($1, 'a')", second
        )
        delete = asyncio.ensure_future(
            owner_conn.execute("DELETE FROM telemetry.devices WHERE id = $1", second)
        )
        await _waiting(watcher, owner_conn.get_server_pid())
        await registering.commit()
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await delete
        assert await watcher.fetchval(_ORPHANS) == 0
        sensors = await watcher.fetch("SELECT device_id, name FROM telemetry.sensors")
    finally:
        await watcher.close()
    assert [tuple(r) for r in sensors] == [(second, "a")]


async def test_three_registries_registering_the_same_new_devices_at_once_agree_without_orphans(
    db: Database,
) -> None:
    devices = [("plant", f"line{n % 3}", f"dev-{n}") for n in range(60)]
    wanted = [SensorKey(levels, f"s{i:02d}") for levels in devices for i in range(20)]
    conns = [await asyncpg.connect(db.ingest_url) for _ in range(3)]
    try:
        registries = [Registry() for _ in conns]
        orders = [wanted, wanted[::-1], wanted[len(wanted) // 2 :] + wanted[: len(wanted) // 2]]
        refused = await asyncio.gather(
            *(
                r.resolve(c, sensors=dict.fromkeys(order))
                for r, c, order in zip(registries, conns, orders, strict=True)
            )
        )
        orphans = await conns[0].fetchval(_ORPHANS)
        stored = await conns[0].fetch(
            "SELECT s.id, d.path, s.name FROM telemetry.sensors s"
            " JOIN telemetry.devices d ON d.id = s.device_id"
        )
    finally:
        for conn in conns:
            await conn.close()
    assert list(refused) == [set(), set(), set()]
    assert orphans == 0
    ids = {(r["path"], r["name"]): r["id"] for r in stored}
    assert len(ids) == len(wanted) == 1_200
    for registry in registries:
        assert all(registry.get(k) == ids[(k.device, k.name)] for k in wanted)
