"""Sparkplug B end to end: payloads built from the official schema, the real broker, two
`ingest run` processes one after the other, and the real database, compared reading by reading."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.sparkplug.commands import RebirthRequester
from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env
from tests.support.mqtt import Publisher
from tests.support.process import wait_until
from tests.support.rows import stored
from tests.support.sparkplug import T, payload, payload_class

STALE = 2


def nbirth(bd_seq: int) -> bytes:
    return payload(
        T,
        0,
        [
            {"name": "bdSeq", "datatype": 4, "long_value": bd_seq},
            {"name": "Temp", "alias": 1, "datatype": 3, "int_value": 2**32 - 12},
            {
                "name": "Pressure",
                "alias": 2,
                "datatype": 10,
                "double_value": 1.5,
                "timestamp": T + 5,
            },
            {"name": "Small", "alias": 3, "datatype": 1, "int_value": 2**32 - 3},
            {"name": "Big", "alias": 4, "datatype": 4, "long_value": 2**64 - 5},
            {"name": "Flag", "alias": 5, "datatype": 11, "boolean_value": True},
            {"name": "Label", "alias": 6, "datatype": 12, "string_value": "hello"},
            {"name": "Node Control/Rebirth", "alias": 7, "datatype": 11, "boolean_value": False},
            {
                "name": "Motor1",
                "alias": 8,
                "datatype": 19,
                "members": [
                    {"name": "speed", "datatype": 9, "float_value": 2.5},
                    {"name": "on", "datatype": 11, "boolean_value": True},
                ],
            },
            {"name": "Nul", "alias": 9, "datatype": 10, "is_null": True},
            {"name": "Q", "alias": 10, "datatype": 10, "double_value": 3.0, "quality": 500},
            {"name": "Tmp", "alias": 11, "datatype": 10, "double_value": 4.0, "is_transient": True},
        ],
    )


def us(ms: int) -> int:
    return ms * 1000


async def _nan_free(db: Database, group: str) -> list[tuple[int, str, str, float | None, int]]:
    return [(t, d, s, None if math.isnan(v) else v, q) for t, d, s, v, q in await stored(db, group)]


async def test_births_data_and_deaths_land_exactly_across_a_restart(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    node, dev = f"{group}/edge1", f"{group}/edge1/dev1"
    # One ingester: a seq gap is counted as soon as the next message shows it.
    env = ingester_env(
        database,
        mqtt_url,
        prefix,
        INGEST_SPARKPLUG_GROUPS=f'["{group}"]',
        INGEST_SPARKPLUG_REORDER_TIMEOUT_S="0",
    )
    base = f"spBv1.0/{group}"

    first = await Ingester(env).start()
    try:
        with Publisher(mqtt_url) as pub:
            pub.publish(f"{base}/NBIRTH/edge1", nbirth(7))
            pub.publish(f"{base}/NCMD/edge1", payload(T, None, []))  # ignored
            pub.publish("spBv1.0/STATE/host1", b'{"online": true}')  # not in the group filter
        await acked_at_least(first, 2)
    finally:
        assert await first.stop() == 0, first.log.decode()

    # Another process, after a restart, with no rebirth: the aliases come from the database.
    second = await Ingester(
        {**env, "INGEST_MQTT_CLIENT_ID": f"ingest-{uuid.uuid4().hex[:8]}"}
    ).start()
    before_death = time.time_ns() // 1000
    try:
        with Publisher(mqtt_url) as pub:
            pub.publish(
                f"{base}/NDATA/edge1",
                payload(
                    T + 1000,
                    1,
                    [
                        {"alias": 1, "int_value": 2**32 - 1},
                        {"alias": 2, "double_value": 2.5, "timestamp": T + 1005},
                        {"alias": 8, "members": [{"name": "speed", "float_value": 3.5}]},
                        {"alias": 5, "boolean_value": False},
                        {"alias": 6, "string_value": "x"},
                        {"alias": 9, "is_null": True},
                    ],
                ),
            )
            pub.publish(
                f"{base}/DBIRTH/edge1/dev1",
                payload(
                    T + 2000,
                    2,
                    [
                        {"name": "Level", "alias": 20, "datatype": 7, "long_value": 2**32 - 1},
                        {"name": "Mode", "alias": 21, "datatype": 2, "int_value": 2**32 - 2},
                    ],
                ),
            )
            pub.publish(
                f"{base}/DDATA/edge1/dev1",
                payload(
                    T + 3000,
                    3,
                    [{"alias": 20, "int_value": 10}, {"alias": 21, "int_value": 2**32 - 300}],
                ),
            )
            pub.publish(
                f"{base}/NDATA/edge1", payload(T + 5000, 5, [{"alias": 99, "double_value": 1}])
            )
            pub.publish(f"{base}/NDATA/edge1", payload(T + 5000, 5, [])[:-1] + b"\xff")
            pub.publish(f"{base}/DDEATH/edge1/dev1", payload(T + 6000, 6, []))
            pub.publish(
                f"{base}/NDEATH/edge1",
                payload(None, None, [{"name": "bdSeq", "datatype": 4, "long_value": 3}]),
            )
            pub.publish(
                f"{base}/NDEATH/edge1",
                payload(None, None, [{"name": "bdSeq", "datatype": 4, "long_value": 7}]),
            )
        await acked_at_least(second, 8)
        assert await second.metric("ingest_sparkplug_seq_gaps_total") == 1
        assert await second.metric("ingest_sparkplug_deaths_ignored_total") == 1
    finally:
        assert await second.stop() == 0, second.log.decode()
    after_death = time.time_ns() // 1000

    rows = await _nan_free(database, group)
    death = [r for r in rows if r[0] >= before_death]
    alive = [r for r in rows if r[0] < before_death]
    assert alive == sorted(
        [
            (us(T), node, "Big", -5.0, 0),
            (us(T), node, "Flag", 1.0, 0),
            (us(T + 1000), node, "Flag", 0.0, 0),
            (us(T), node, "Motor1/on", 1.0, 0),
            (us(T), node, "Motor1/speed", 2.5, 0),
            (us(T + 1000), node, "Motor1/speed", 3.5, 0),
            (us(T), node, "Node Control/Rebirth", 0.0, 0),
            (us(T + 5), node, "Pressure", 1.5, 0),
            (us(T + 1005), node, "Pressure", 2.5, 0),
            (us(T), node, "Q", 3.0, STALE),
            (us(T), node, "Small", -3.0, 0),
            (us(T), node, "Temp", -12.0, 0),
            (us(T + 1000), node, "Temp", -1.0, 0),
            (us(T), node, "bdSeq", 7.0, 0),
            (us(T + 2000), dev, "Level", 4294967295.0, 0),
            (us(T + 3000), dev, "Level", 10.0, 0),
            (us(T + 6000), dev, "Level", None, STALE),
            (us(T + 2000), dev, "Mode", -2.0, 0),
            (us(T + 3000), dev, "Mode", -300.0, 0),
            (us(T + 6000), dev, "Mode", None, STALE),
        ],
        key=lambda r: (r[1], r[2], r[0]),
    )
    # NDEATH: one stale row per stored metric of the node's last NBIRTH and of its devices
    # still online, at the receive time; dev1 went stale at its DDEATH already.
    assert all(
        before_death <= r[0] <= after_death and r[3] is None and r[4] == STALE for r in death
    )
    assert sorted((r[1], r[2]) for r in death) == sorted(
        [(node, n) for n in ("Big", "Flag", "Motor1/on", "Motor1/speed", "Node Control/Rebirth")]
        + [(node, n) for n in ("Nul", "Pressure", "Q", "Small", "Temp", "Tmp", "bdSeq")]
    )
    assert len({r[0] for r in death}) == 1

    conn = await asyncpg.connect(database.analyst_url)
    try:
        letters = await conn.fetch(
            "SELECT topic, reason FROM telemetry.dead_letters WHERE topic LIKE $1 ORDER BY reason",
            f"{base}/%",
        )
        aliases = await conn.fetch(
            "SELECT device, name, alias, datatype, sensor_id IS NOT NULL AS stored"
            "  FROM telemetry.sparkplug_metrics WHERE node = $1 ORDER BY device, name",
            node,
        )
        rollups = await conn.fetch(
            "SELECT device, sensor, count, min, max FROM telemetry.rollup_1m_v"
            " WHERE device LIKE $1 || '/%' AND sensor IN ('Temp', 'Level') ORDER BY 1, 2",
            group,
        )
        assets = await conn.fetch(
            "SELECT device, asset FROM telemetry.sensors_v WHERE device LIKE $1 || '/%' GROUP BY 1, 2 ORDER BY 1",
            group,
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in letters] == [
        (
            f"{base}/NDATA/edge1",
            f"metrics[0].alias: 99 is not defined by a birth of edge node '{node}'",
        ),
        (f"{base}/NDATA/edge1", "seq: varint runs past the end at byte 7"),
    ]
    assert [tuple(r) for r in aliases] == [
        ("", "Big", 4, 4, True),
        ("", "Flag", 5, 11, True),
        ("", "Label", 6, 12, False),
        ("", "Motor1", 8, 19, False),
        ("", "Motor1/on", None, 11, True),
        ("", "Motor1/speed", None, 9, True),
        ("", "Node Control/Rebirth", 7, 11, True),
        ("", "Nul", 9, 10, True),
        ("", "Pressure", 2, 10, True),
        ("", "Q", 10, 10, True),
        ("", "Small", 3, 1, True),
        ("", "Temp", 1, 3, True),
        ("", "Tmp", 11, 10, True),
        ("", "bdSeq", None, 4, True),
        ("dev1", "Level", 20, 7, True),
        ("dev1", "Mode", 21, 2, True),
    ]
    assert [tuple(r) for r in assets] == [(node, group), (dev, node)]
    # Rollups take Sparkplug readings like any others; the deaths' stale rows stay out.
    assert [tuple(r) for r in rollups] == [
        (node, "Temp", 2, -12.0, -1.0),
        (dev, "Level", 2, 10.0, 4294967295.0),
    ]


@pytest.mark.parametrize("store_transient", [False, True])
async def test_transient_metrics_are_stored_only_when_configured(
    database: Database, mqtt_url: str, prefix: str, store_transient: bool
) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    env = ingester_env(
        database,
        mqtt_url,
        prefix,
        INGEST_SPARKPLUG_GROUPS=f'["{group}"]',
        INGEST_SPARKPLUG_STORE_TRANSIENT=str(store_transient).lower(),
    )
    proc = await Ingester(env).start()
    try:
        with Publisher(mqtt_url) as pub:
            pub.publish(f"spBv1.0/{group}/NBIRTH/e", nbirth(1))
        await acked_at_least(proc, 1)
    finally:
        assert await proc.stop() == 0, proc.log.decode()
    names = {r[2] for r in await stored(database, group)}
    assert ("Tmp" in names) is store_transient


async def test_an_unknown_alias_asks_for_a_rebirth_when_configured(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    heard: list[tuple[str, bytes]] = []
    parts = urlsplit(mqtt_url)
    listener = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    listener.on_message = lambda c, u, msg: heard.append((msg.topic, bytes(msg.payload)))
    if parts.username:
        listener.username_pw_set(parts.username, parts.password)
    listener.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    listener.loop_start()
    listener.subscribe(f"spBv1.0/{group}/NCMD/#", qos=1)
    env = ingester_env(
        database,
        mqtt_url,
        prefix,
        INGEST_SPARKPLUG_GROUPS=f'["{group}"]',
        INGEST_SPARKPLUG_REBIRTH="true",
    )
    proc = await Ingester(env).start()
    try:
        with Publisher(mqtt_url) as pub:
            pub.publish(
                f"spBv1.0/{group}/NDATA/e1", payload(T, 1, [{"alias": 5, "double_value": 1}])
            )
        await acked_at_least(proc, 1)

        async def asked() -> bool:
            return bool(heard)

        await wait_until(asked, timeout=30)
    finally:
        listener.loop_stop()
        listener.disconnect()
        assert await proc.stop() == 0, proc.log.decode()
    topic, data = heard[0]
    assert topic == f"spBv1.0/{group}/NCMD/e1"
    command = payload_class().FromString(data)
    assert [(m.name, m.datatype, m.boolean_value) for m in command.metrics] == [
        ("Node Control/Rebirth", 11, True)
    ]


async def test_rebirth_requests_are_at_most_one_per_interval_per_node() -> None:
    requester = RebirthRequester(url="mqtt://127.0.0.1:1", client_id="x", min_interval_s=3600)
    for _ in range(3):
        requester.want("g", "e1")
    requester.want("g", "e2")
    assert requester.pending() == 2


async def test_host_application_state_online_then_offline(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    host = f"h{uuid.uuid4().hex[:8]}"
    heard: list[dict[str, Any]] = []
    parts = urlsplit(mqtt_url)
    listener = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            heard.append(msgspec.json.decode(msg.payload))

    listener.on_message = on_message
    if parts.username:
        listener.username_pw_set(parts.username, parts.password)
    listener.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    listener.loop_start()
    listener.subscribe(f"spBv1.0/STATE/{host}", qos=1)
    env = ingester_env(database, mqtt_url, prefix, INGEST_SPARKPLUG_HOST_ID=host)
    proc = await Ingester(env).start()
    try:

        async def online() -> bool:
            return any(h["online"] for h in heard)

        await wait_until(online, timeout=30)
    finally:
        assert await proc.stop() == 0, proc.log.decode()

    async def offline() -> bool:
        return bool(heard) and not heard[-1]["online"]

    try:
        await wait_until(offline, timeout=30)
    finally:
        listener.publish(f"spBv1.0/STATE/{host}", b"", qos=1, retain=True).wait_for_publish(10)
        listener.loop_stop()
        listener.disconnect()
    assert heard[0]["online"] is True
    assert heard[-1] == {"online": False, "timestamp": heard[0]["timestamp"]}
