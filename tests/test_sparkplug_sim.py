"""`ingest simulate --format sparkplug`: what the edge nodes publish, read back with upb, lands
in the database reading by reading."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from ingest.sparkplug.encode import Metric, encode_payload
from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingest_cli, ingester_env
from tests.support.process import wait_until
from tests.support.rows import stored
from tests.support.sparkplug import payload_class

STALE = 2


@settings(max_examples=200, deadline=None)
@given(
    ts=st.none() | st.integers(0, 2**64 - 1),
    seq=st.none() | st.integers(0, 255),
    metrics=st.lists(
        st.tuples(
            st.none() | st.text(max_size=8),
            st.none() | st.integers(0, 2**64 - 1),
            st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
            st.integers(-(2**31), 2**31 - 1),
        ),
        max_size=6,
    ),
)
def test_encoder_agrees_with_upb(
    ts: int | None, seq: int | None, metrics: list[tuple[str | None, int | None, int, int]]
) -> None:
    data = encode_payload(
        timestamp=ts,
        seq=seq,
        metrics=[Metric(n, alias=a, datatype=d, value=v) for n, a, d, v in metrics],
    )
    parsed = payload_class().FromString(data)
    assert (parsed.timestamp if parsed.HasField("timestamp") else None) == ts
    assert (parsed.seq if parsed.HasField("seq") else None) == seq
    for m, (name, alias, datatype, value) in zip(parsed.metrics, metrics, strict=True):
        assert (m.name if m.HasField("name") else None) == name
        assert (m.alias if m.HasField("alias") else None) == alias
        assert m.datatype == datatype
        field = m.WhichOneof("value")
        if datatype in (1, 2, 3, 5, 6):
            assert (field, m.int_value) == ("int_value", value & 0xFFFFFFFF)
        elif datatype in (4, 7, 8):
            assert (field, m.long_value) == ("long_value", value % 2**64)
        elif datatype == 9:
            assert field == "float_value"
        elif datatype == 10:
            assert (field, m.double_value) == ("double_value", float(value))
        elif datatype == 11:
            assert (field, m.boolean_value) == ("boolean_value", bool(value))
        else:
            assert (field, m.string_value) == ("string_value", str(value))


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _value(m: Any, datatype: int) -> float:
    if datatype == 9:
        return float(m.float_value)
    if datatype == 10:
        return float(m.double_value)
    if datatype == 11:
        return float(m.boolean_value)
    if datatype == 3:
        return float(_signed(m.int_value, 32))
    if datatype == 4:
        return float(_signed(m.long_value, 64))
    raise AssertionError(f"the simulator does not send datatype {datatype}")


def expected_rows(messages: list[tuple[str, bytes]]) -> list[tuple[int, str, str, float, int]]:
    """The readings the messages must produce, decoded by upb (deaths left out)."""
    rows = {}
    table: dict[int, tuple[str, str, int]] = {}
    for topic, data in messages:
        _, group, kind, edge, *device = topic.split("/")
        where = "/".join([group, edge, *device])
        p = payload_class().FromString(data)
        for m in p.metrics:
            ts = m.timestamp if m.HasField("timestamp") else p.timestamp
            if kind in ("NBIRTH", "DBIRTH"):
                if m.HasField("alias"):
                    table[m.alias] = (where, m.name, m.datatype)
                name, datatype = m.name, m.datatype
            elif kind == "DDATA":
                where, name, datatype = table[m.alias]
            else:
                continue
            rows[(where, name, ts * 1000)] = _value(m, datatype)
    return sorted(
        ((t, d, n, v, 0) for (d, n, t), v in rows.items()), key=lambda r: (r[1], r[2], r[0])
    )


async def test_a_simulated_plant_lands_exactly(
    database: Database, mqtt_url: str, prefix: str, tmp_path: Path
) -> None:
    site = f"S{uuid.uuid4().hex[:8]}"
    plant = tmp_path / "plant.toml"
    plant.write_text(
        f'[[line]]\npath = "{site}/area/line1"\ndevices = 2\n'
        'sensors = { "temp" = "temperature", "parts" = "counter", "vib" = "vibration" }\n'
    )
    received: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        with lock:
            received.append((msg.topic, bytes(msg.payload)))

    parts = urlsplit(mqtt_url)
    listener = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    listener.on_message = on_message
    if parts.username:
        listener.username_pw_set(parts.username, parts.password)
    listener.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    listener.loop_start()
    listener.subscribe(f"spBv1.0/{site}/#", qos=1)
    env = ingester_env(database, mqtt_url, prefix, INGEST_SPARKPLUG_GROUPS=f'["{site}"]')
    proc = await Ingester(env).start()
    try:
        code, _, err = await ingest_cli(
            "simulate",
            "--format",
            "sparkplug",
            "--plant",
            str(plant),
            "--hz",
            "10",
            "--batch",
            "5",
            "--duration",
            "2",
            "--start",
            "2026-01-01T00:00:00Z",
            "--quiet",
            env={"INGEST_MQTT_URL": mqtt_url},
        )
        assert code == 0, err

        async def all_heard() -> bool:
            with lock:
                return any("/NDEATH/" in t for t, _ in received)

        await wait_until(all_heard, timeout=30)
        with lock:
            messages = list(received)
        # NBIRTH, 2 DBIRTH, 4 steps x 2 DDATA, 2 DDEATH, NDEATH
        assert len(messages) == 14
        await acked_at_least(proc, len(messages))
    finally:
        listener.loop_stop()
        listener.disconnect()
        assert await proc.stop() == 0, proc.log.decode()

    rows = await stored(database, site)
    alive = [r for r in rows if not math.isnan(r[3])]
    dead = [r for r in rows if math.isnan(r[3])]
    assert alive == expected_rows(messages)
    assert all(r[4] == STALE for r in dead)
    # each DDEATH: the device's 3 metrics; the NDEATH: the node's 2 (its devices are offline
    # since their DDEATHs, and their metrics stale once)
    assert len(dead) == 2 * 3 + 2
    assert len(set(dead)) == len(dead)


@pytest.mark.parametrize("hz", ["1001"])
async def test_sparkplug_times_are_milliseconds(hz: str) -> None:
    code, _, err = await ingest_cli(
        "simulate",
        "--format",
        "sparkplug",
        "--hz",
        hz,
        "--duration",
        "1",
        "--quiet",
        env={"INGEST_MQTT_URL": "mqtt://127.0.0.1:1"},
    )
    assert code != 0
    assert "--hz must be <= 1000" in err


async def test_edge_nodes_answer_a_rebirth_command(mqtt_url: str, tmp_path: Path) -> None:
    site = f"S{uuid.uuid4().hex[:8]}"
    plant = tmp_path / "plant.toml"
    plant.write_text(
        f'[[line]]\npath = "{site}/line1"\ndevices = 1\nsensors = {{ "t" = "temperature" }}\n'
    )
    heard: list[tuple[str, bytes]] = []
    parts = urlsplit(mqtt_url)
    listener = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    listener.on_message = lambda c, u, msg: heard.append((msg.topic, bytes(msg.payload)))
    if parts.username:
        listener.username_pw_set(parts.username, parts.password)
    listener.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    listener.loop_start()
    listener.subscribe(f"spBv1.0/{site}/#", qos=1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest.cli",
        "simulate",
        "--format",
        "sparkplug",
        "--plant",
        str(plant),
        "--hz",
        "10",
        "--batch",
        "5",
        "--duration",
        "30",
        "--realtime",
        "--answer-rebirth",
        "--quiet",
        env={**os.environ, "INGEST_MQTT_URL": mqtt_url},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def data_seen() -> bool:
            return any("/DDATA/" in t for t, _ in heard)

        await wait_until(data_seen, timeout=60)
        command = payload_class()()
        metric = command.metrics.add()
        metric.name = "Node Control/Rebirth"
        metric.datatype = 11
        metric.boolean_value = True
        asked_at = len(heard)
        listener.publish(f"spBv1.0/{site}/NCMD/line1", command.SerializeToString(), qos=1)

        async def reborn() -> bool:
            return any("/NBIRTH/" in t for t, _ in heard[asked_at:])

        await wait_until(reborn, timeout=30)
    finally:
        proc.terminate()
        await proc.wait()
        listener.loop_stop()
        listener.disconnect()
    kinds = [t.split("/")[2] for t, _ in heard]
    again = kinds.index("NBIRTH", asked_at)
    assert kinds[again : again + 2] == ["NBIRTH", "DBIRTH"]
    assert payload_class().FromString(heard[again][1]).seq == 0
