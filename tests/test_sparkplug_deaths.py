"""Sparkplug deaths and births against the database: one stale row per metric of the last
births, nodes and devices offline, and two instances changing one node in either order."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.support.cluster import Database
from tests.support.sparkplug import T, payload
from tests.support.sparkplug_stage import Instance

STALE = 2
R = T * 1000 + 555_000  # a receive time (µs), after every timestamp of the births


@pytest.fixture
async def conn(database: Database) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(database.ingest_url)
    yield c
    await c.close()


def us(ms: int) -> int:
    return ms * 1000


def _nbirth(bd_seq: int, ms: int = T) -> bytes:
    return payload(
        ms,
        0,
        [
            {"name": "bdSeq", "datatype": 4, "long_value": bd_seq},
            {"name": "A", "alias": 1, "datatype": 10, "double_value": 1.0},
            {"name": "S", "alias": 2, "datatype": 12, "string_value": "not stored"},
        ],
    )


def _dbirth(name: str, alias: int, ms: int, seq: int) -> bytes:
    return payload(ms, seq, [{"name": name, "alias": alias, "datatype": 10, "double_value": 2.0}])


def _ndeath(bd_seq: int) -> bytes:
    return payload(None, None, [{"name": "bdSeq", "datatype": 4, "long_value": bd_seq}])


class Node:
    """Topics of one edge node of a new group."""

    def __init__(self) -> None:
        self.group = f"G{uuid.uuid4().hex[:8]}"
        self.path = f"{self.group}/e"

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"spBv1.0/{self.group}/{kind}/e" + (f"/{device}" if device else "")


async def _lives(conn: asyncpg.Connection, node: str) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT device, born_ms, online FROM telemetry.sparkplug_devices WHERE node = $1"
        " ORDER BY device",
        node,
    )
    return [tuple(r) for r in rows]


async def test_deaths_mark_the_last_births_stale_once(conn: asyncpg.Connection) -> None:
    e = Node()
    a = Instance()
    await a.flush(
        conn,
        a.accept(e.topic("NBIRTH"), _nbirth(4)),
        a.accept(e.topic("DBIRTH", "d1"), _dbirth("X", 3, T + 1, 1)),
        a.accept(e.topic("DBIRTH", "d2"), _dbirth("Y", 4, T + 2, 2)),
    )
    got = await a.flush(
        conn,
        a.accept(e.topic("DDEATH", "d1"), payload(T + 10, 3, [])),
        a.accept(e.topic("NDEATH"), _ndeath(3), received_us=R - 1),  # not the last NBIRTH's
        a.accept(e.topic("NDEATH"), _ndeath(4), received_us=R),
        a.accept(e.topic("NDEATH"), _ndeath(4), received_us=R + 1),  # offline already
        a.accept(e.topic("DDEATH", "d2"), payload(T + 20, 4, [])),  # offline with its node
    )
    # The DDEATH at its timestamp; the NDEATH at its receive time, for the node's stored
    # metrics (bdSeq and A, not the string S) and its devices still online (d2, not d1).
    assert a.rows(got) == [
        (us(T + 10), f"{e.path}/d1", "X", None, STALE),
        (R, e.path, "A", None, STALE),
        (R, e.path, "bdSeq", None, STALE),
        (R, f"{e.path}/d2", "Y", None, STALE),
    ]
    assert got.deaths_ignored == 3
    assert await _lives(conn, e.path) == [
        ("", T, False),
        ("d1", T + 1, False),
        ("d2", T + 2, False),
    ]

    # A new session: the node online again without the devices of the last one.
    got = await a.flush(
        conn,
        a.accept(e.topic("NBIRTH"), _nbirth(5, T + 100)),
        a.accept(e.topic("NDEATH"), _ndeath(5), received_us=R + 100_000),
    )
    assert [r for r in a.rows(got) if r[4] == STALE] == [
        (R + 100_000, e.path, "A", None, STALE),
        (R + 100_000, e.path, "bdSeq", None, STALE),
    ]
    assert await _lives(conn, e.path) == [("", T + 100, False)]


async def test_a_death_prepared_against_a_changed_node_is_prepared_again(
    conn: asyncpg.Connection,
) -> None:
    e = Node()
    a, b = Instance(), Instance()
    await a.flush(
        conn,
        a.accept(e.topic("NBIRTH"), _nbirth(4)),
        a.accept(e.topic("DBIRTH", "d1"), _dbirth("X", 3, T + 1, 1)),
    )
    # The edge node sends DDEATH d1, then NDEATH: A takes the first, B the second, and both
    # prepare their flushes before A commits.
    ddeath = a.accept(e.topic("DDEATH", "d1"), payload(T + 10, 2, []))
    ndeath = b.accept(e.topic("NDEATH"), _ndeath(4), received_us=R)
    at_a = await a.prepare(conn, ddeath)
    at_b = await b.prepare(conn, ndeath)
    await a.write(conn, at_a)
    with pytest.raises(asyncpg.SerializationError):
        await b.write(conn, at_b)  # the node is not at the version B read
    at_b = await b.prepare(conn, ndeath)  # what the pipeline does on that error
    await b.write(conn, at_b)
    assert a.rows(at_a) == [(us(T + 10), f"{e.path}/d1", "X", None, STALE)]
    assert b.rows(at_b) == [
        (R, e.path, "A", None, STALE),
        (R, e.path, "bdSeq", None, STALE),
    ]


@pytest.mark.parametrize("first", ["NBIRTH", "DBIRTH"])
async def test_an_nbirth_and_its_dbirth_committed_in_either_order(
    conn: asyncpg.Connection, first: str
) -> None:
    e = Node()
    a, b = Instance(), Instance()
    births = {
        "NBIRTH": (a, a.accept(e.topic("NBIRTH"), _nbirth(4))),
        "DBIRTH": (b, b.accept(e.topic("DBIRTH", "d1"), _dbirth("X", 3, T + 1, 1))),
    }
    prepared = {kind: await inst.prepare(conn, item) for kind, (inst, item) in births.items()}
    second = "DBIRTH" if first == "NBIRTH" else "NBIRTH"
    await births[first][0].write(conn, prepared[first])
    inst, item = births[second]
    with pytest.raises(asyncpg.SerializationError):
        await inst.write(conn, prepared[second])
    await inst.write(conn, await inst.prepare(conn, item))

    # Either way the node has both births: a third instance reads data of both.
    c = Instance()
    got = await c.flush(
        conn,
        c.accept(e.topic("NDATA"), payload(T + 5, 2, [{"alias": 1, "double_value": 7.0}])),
        c.accept(e.topic("DDATA", "d1"), payload(T + 6, 3, [{"alias": 3, "double_value": 8.0}])),
    )
    assert got.dead_letters == []
    assert c.rows(got) == [
        (us(T + 5), e.path, "A", 7.0, 0),
        (us(T + 6), f"{e.path}/d1", "X", 8.0, 0),
    ]
    assert await _lives(conn, e.path) == [("", T, True), ("d1", T + 1, True)]
