"""The Sparkplug stage of two instances sharing one database: a rebirth seen by one is used by
the other, checked with one query per flush."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import numpy as np
import pytest

from ingest.db.registry import SensorKey
from ingest.errors import PayloadError
from ingest.sparkplug.stage import SparkplugStage
from ingest.sparkplug.topic import parse_topic
from tests.support.cluster import Database
from tests.support.sparkplug import T, payload
from tests.support.sparkplug_stage import Instance


@pytest.fixture
async def conn(database: Database) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(database.ingest_url)
    yield c
    await c.close()


def _birth(aliases: dict[str, int]) -> bytes:
    return payload(
        T,
        0,
        [{"name": "bdSeq", "datatype": 4, "long_value": 1}]
        + [
            {"name": n, "alias": a, "datatype": 10, "double_value": 0.0} for n, a in aliases.items()
        ],
    )


def _data(values: dict[int, float], seq: int) -> bytes:
    return payload(T + seq, seq, [{"alias": a, "double_value": v} for a, v in values.items()])


async def test_a_rebirth_at_one_instance_is_used_by_the_other(conn: asyncpg.Connection) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    birth, data = f"spBv1.0/{group}/NBIRTH/e", f"spBv1.0/{group}/NDATA/e"
    a, b = Instance(), Instance()
    await a.flush(conn, a.accept(birth, _birth({"Temp": 1, "Pressure": 2})))
    got = await b.flush(conn, b.accept(data, _data({1: 5.0, 2: 6.0}, 1)))
    assert b.named(group, got) == {"Temp": 5.0, "Pressure": 6.0}

    await a.flush(conn, a.accept(birth, _birth({"Temp": 2, "Pressure": 1})))  # aliases swapped
    queries: list[Any] = []
    conn.add_query_logger(lambda q: queries.append(q) if q.query.startswith("SELECT") else None)
    got = await b.flush(conn, b.accept(data, _data({1: 7.0, 2: 8.0}, 2)))
    assert b.named(group, got) == {"Pressure": 7.0, "Temp": 8.0}
    # the versions of the flush's nodes, then the changed node's metrics and devices
    assert len(queries) == 3
    queries.clear()
    got = await b.flush(conn, b.accept(data, _data({1: 9.0}, 3)))
    assert b.named(group, got) == {"Pressure": 9.0}
    assert len(queries) == 1  # nothing changed: one query for the whole flush


async def test_a_dbirth_alias_and_an_unknown_one(conn: asyncpg.Connection) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    a = Instance()
    items = [
        a.accept(f"spBv1.0/{group}/NBIRTH/e", _birth({"Temp": 1})),
        a.accept(
            f"spBv1.0/{group}/DBIRTH/e/d",
            payload(T, 1, [{"name": "Level", "alias": 7, "datatype": 3, "int_value": 2**32 - 1}]),
        ),
        a.accept(f"spBv1.0/{group}/DDATA/e/d", _data({7: 3.0}, 2)),
        a.accept(f"spBv1.0/{group}/NDATA/e", _data({8: 1.0}, 3)),
    ]
    prepared = await a.flush(conn, *items)
    assert prepared.dead_letters == [
        (3, f"metrics[0].alias: 8 is not defined by a birth of edge node '{group}/e'")
    ]
    level = a.registry.get(SensorKey((group, "e", "d"), "Level"))
    assert level is not None
    picked = prepared.columns.sensor == level
    assert prepared.columns.value[picked].tolist() == [-1.0, 3.0]
    assert np.all(prepared.columns.quality == 0)


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("spBv1.0/g/NBIRTH/e/d", "topic: NBIRTH takes no device"),
        ("spBv1.0/g/DDATA/e", "topic: DDATA has no device"),
        ("spBv1.0/g/XDATA/e", "topic: unknown Sparkplug message type 'XDATA'"),
        (
            "spBv1.0/g/NDATA",
            "topic: a Sparkplug topic is spBv1.0/<group>/<type>/<edge node>[/<device>]",
        ),
    ],
)
def test_bad_topics(topic: str, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_topic(topic)
    assert caught.value.reason == reason


def test_state_and_commands_are_ignored() -> None:
    for topic in ("spBv1.0/STATE/host", "spBv1.0/g/NCMD/e", "spBv1.0/g/DCMD/e/d"):
        assert parse_topic(topic).kind is None


async def test_a_birth_naming_a_metric_twice_keeps_the_last(conn: asyncpg.Connection) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    a = Instance()
    birth = payload(
        T,
        0,
        [
            {"name": "x", "alias": 1, "datatype": 10, "double_value": 1.0},
            {"name": "x", "alias": 2, "datatype": 10, "double_value": 2.0},
        ],
    )
    await a.flush(conn, a.accept(f"spBv1.0/{group}/NBIRTH/e", birth))
    rows = await conn.fetch(
        "SELECT name, alias FROM telemetry.sparkplug_metrics WHERE node = $1", f"{group}/e"
    )
    assert [tuple(r) for r in rows] == [("x", 2)]


def test_a_name_with_nul_is_refused() -> None:
    with pytest.raises(PayloadError, match=r"metrics\[0\].name: contains NUL"):
        Instance().accept("spBv1.0/g/NBIRTH/e", payload(T, 0, [{"name": "a\x00b", "datatype": 10}]))


def test_a_payload_timestamp_outside_the_window_is_refused() -> None:
    stage = SparkplugStage()
    for ts in (0, 2**64 - 1):
        with pytest.raises(PayloadError, match=r"^timestamp: outside the accepted window$"):
            stage.accept(
                index=0,
                topic="spBv1.0/g/DDEATH/e/d",
                payload=payload(ts, 1, []),
                received_us=T * 1000,
                window=(T * 1000 - 10**9, T * 1000 + 10**9),
                max_metrics=10,
            )


async def test_data_read_at_intake_is_used_while_the_aliases_stand(
    conn: asyncpg.Connection,
) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    a = Instance()
    await a.flush(conn, a.accept(f"spBv1.0/{group}/NBIRTH/e", _birth({"Temp": 1, "Flow": 2})))
    item = a.accept(f"spBv1.0/{group}/NDATA/e", _data({1: 5.0, 2: 6.0}, 1))
    assert item.data is not None  # read in one call at intake, with the node's aliases
    got = await a.flush(conn, item)
    assert a.named(group, got) == {"Temp": 5.0, "Flow": 6.0}

    # Data arriving after a birth of the same flush is read again with the birth's aliases.
    early = a.accept(f"spBv1.0/{group}/NDATA/e", _data({1: 7.0, 2: 8.0}, 2))
    again = a.accept(f"spBv1.0/{group}/NBIRTH/e", _birth({"Temp": 2, "Flow": 1}))
    late = a.accept(f"spBv1.0/{group}/NDATA/e", _data({1: 9.0}, 1))
    got = await a.flush(conn, early, again, late)
    assert got.columns.value.tolist() == [7.0, 8.0, 1.0, 0.0, 0.0, 9.0]
    names = [a.registry.name_of(int(s))[1] for s in got.columns.sensor]
    assert names == ["Temp", "Flow", "bdSeq", "Temp", "Flow", "Flow"]
