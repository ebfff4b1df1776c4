"""Sparkplug DATA naming an alias whose birth another instance has not committed yet: held,
read again in later flushes, a dead letter only after sparkplug.unknown_alias_wait_s."""

from __future__ import annotations

import dataclasses
import signal
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from ingest.sparkplug.stage import Item
from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env
from tests.support.mqtt import Publisher
from tests.support.process import wait_until
from tests.support.rows import stored
from tests.support.sparkplug import T, payload
from tests.support.sparkplug_stage import Instance

WAIT_US = 500_000


@pytest.fixture
async def conn(database: Database) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(database.ingest_url)
    yield c
    await c.close()


def _birth(group: str) -> tuple[str, bytes]:
    return f"spBv1.0/{group}/NBIRTH/e", payload(
        T,
        0,
        [
            {"name": "bdSeq", "datatype": 4, "long_value": 1},
            {"name": "Temp", "alias": 5, "datatype": 10, "double_value": 20.5},
        ],
    )


def _data(group: str, seq: int, value: float) -> tuple[str, bytes]:
    return f"spBv1.0/{group}/NDATA/e", payload(T + seq, seq, [{"alias": 5, "double_value": value}])


def _again(inst: Instance, item: Item) -> Item:
    """`item` as the pipeline carries it into the next flush: the same message (read at its
    intake), at a new place."""
    inst.index += 1
    return dataclasses.replace(item, index=inst.index - 1)


async def test_data_before_its_birth_waits_for_it(conn: asyncpg.Connection) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    a = Instance(unknown_alias_wait_s=WAIT_US / 1e6)
    data = a.accept(*_data(group, 1, 21.5), received_us=T * 1000)
    got = await a.flush(conn, data, now_us=T * 1000 + 1)
    assert (got.held, got.dead_letters, len(got.columns.time)) == ([data.index], [], 0)

    # The birth arrives (here at this instance; from another, it is read from the database).
    birth = a.accept(*_birth(group), received_us=T * 1000 + 2)
    got = await a.flush(conn, birth, _again(a, data), now_us=T * 1000 + 3)
    assert (got.held, got.dead_letters) == ([], [])
    assert a.rows(got) == [
        (T * 1000, f"{group}/e", "Temp", 20.5, 0),
        (T * 1000, f"{group}/e", "bdSeq", 1.0, 0),
        ((T + 1) * 1000, f"{group}/e", "Temp", 21.5, 0),
    ]


async def test_a_birth_committed_by_another_instance_is_looked_up_again(
    conn: asyncpg.Connection,
) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    a, b = Instance(), Instance(unknown_alias_wait_s=WAIT_US / 1e6)
    data = b.accept(*_data(group, 1, 21.5), received_us=T * 1000)
    assert (await b.flush(conn, data, now_us=T * 1000 + 1)).held == [data.index]
    await a.flush(conn, a.accept(*_birth(group)))
    got = await b.flush(conn, _again(b, data), now_us=T * 1000 + 2)
    assert (got.held, got.dead_letters) == ([], [])
    assert b.rows(got) == [((T + 1) * 1000, f"{group}/e", "Temp", 21.5, 0)]


async def test_an_alias_no_birth_defines_is_a_dead_letter_after_the_wait(
    conn: asyncpg.Connection,
) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    asked: list[tuple[str, str]] = []
    a = Instance(
        unknown_alias_wait_s=WAIT_US / 1e6, on_unknown_alias=lambda g, e: asked.append((g, e))
    )
    data = a.accept(*_data(group, 1, 21.5), received_us=T * 1000)
    assert (await a.flush(conn, data, now_us=T * 1000 + WAIT_US - 1)).held == [data.index]
    assert asked == []
    data = _again(a, data)
    got = await a.flush(conn, data, now_us=T * 1000 + WAIT_US)
    reason = f"metrics[0].alias: 5 is not defined by a birth of edge node '{group}/e'"
    assert (got.held, got.dead_letters) == ([], [(data.index, reason)])
    assert asked == [(group, "e")]  # a rebirth request, when configured


async def test_without_a_wait_the_dead_letter_is_at_once(conn: asyncpg.Connection) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    a = Instance(unknown_alias_wait_s=0)
    data = a.accept(*_data(group, 1, 21.5), received_us=T * 1000)
    got = await a.flush(conn, data, now_us=T * 1000)
    assert got.held == []
    assert [i for i, _ in got.dead_letters] == [data.index]


async def test_held_messages_are_capped_keeping_the_newest(conn: asyncpg.Connection) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    a = Instance(unknown_alias_wait_s=WAIT_US / 1e6, max_held=2)
    items = [a.accept(*_data(group, i, i), received_us=T * 1000 + i) for i in range(3)]
    got = await a.flush(conn, *items, now_us=T * 1000 + 10)
    assert got.held == [items[1].index, items[2].index]
    assert [i for i, _ in got.dead_letters] == [items[0].index]
    assert await _held_gauge() == 2


async def _held_gauge() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("ingest_sparkplug_messages_held")
    assert value is not None
    return value


async def test_data_reaching_the_instance_without_the_birth_is_stored(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    """Two `ingest run` on one share group: A takes the NBIRTH and cannot commit it (the test
    holds a lock on the node table), then leaves the group; B takes the NDATA, holds it until A
    has committed, and stores it."""
    group = f"G{uuid.uuid4().hex[:8]}"
    env = ingester_env(
        database,
        mqtt_url,
        prefix,
        INGEST_SPARKPLUG_GROUPS=f'["{group}"]',
        INGEST_MQTT_SHARE_GROUP=f"g{uuid.uuid4().hex[:6]}",
        INGEST_SPARKPLUG_UNKNOWN_ALIAS_WAIT_S="60",
    )
    owner = await asyncpg.connect(database.owner_url)
    lock = owner.transaction()
    await lock.start()
    locked = True
    await owner.execute("LOCK TABLE telemetry.sparkplug_nodes IN SHARE MODE")  # reads pass
    a = await Ingester(env).start()
    b: Ingester | None = None
    try:
        with Publisher(mqtt_url) as pub:
            pub.publish(*_birth(group))
            pub.wait()

            async def a_waits_for_the_lock() -> bool:
                return bool(
                    await owner.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE NOT granted"
                        " AND relation = 'telemetry.sparkplug_nodes'::regclass"
                    )
                )

            await wait_until(a_waits_for_the_lock, timeout=60)
            b = await Ingester(
                {**env, "INGEST_MQTT_CLIENT_ID": f"b-{uuid.uuid4().hex[:8]}"}
            ).start()
            assert a.proc is not None
            a.proc.send_signal(signal.SIGTERM)  # A leaves the group; its flush waits

            async def a_left() -> bool:
                return b"unsubscribed from" in a.log

            await wait_until(a_left, timeout=60)
            pub.publish(*_data(group, 1, 21.5))  # only B is in the group now
            pub.wait()

            async def b_holds_it() -> float:
                assert b is not None
                return await b.metric("ingest_sparkplug_messages_held")

            await wait_until(b_holds_it, timeout=60)
        await lock.rollback()  # A commits the birth; B finds it at its next flush
        locked = False
        assert await a.wait_exit(timeout=60) == 0, a.log.decode()
        await acked_at_least(b, 1)
        assert await b.metric("ingest_sparkplug_messages_held") == 0
        assert await b.metric("ingest_dead_letters_total") == 0
    finally:
        if locked:
            await lock.rollback()
        await owner.close()
        if a.alive:
            await a.stop()
        if b is not None:
            assert await b.stop() == 0, b.log.decode()
    node = f"{group}/e"
    assert await stored(database, group) == [
        (T * 1000, node, "Temp", 20.5, 0),
        ((T + 1) * 1000, node, "Temp", 21.5, 0),
        (T * 1000, node, "bdSeq", 1.0, 0),
    ]
    conn = await asyncpg.connect(database.analyst_url)
    try:
        letters = await conn.fetchval(
            "SELECT count(*) FROM telemetry.dead_letters WHERE topic LIKE $1", f"spBv1.0/{group}/%"
        )
    finally:
        await conn.close()
    assert letters == 0
