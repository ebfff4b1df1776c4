"""The naive baseline: a hand-written MQTT-to-PostgreSQL bridge, one INSERT per reading.

This is what many hand-written bridges do, written without any of the ingester's code: a paho
subscriber hands each message to the main thread, which decodes it with plain msgspec into Python
objects and runs one parameterised ``INSERT ... VALUES ($1, $2, $3, $4)`` per reading, committing
once per message. Sensors are registered on first sight in its own table. It understands the
wire format's batch map (``dt`` or ``t`` times, bin or array values), which is what
``ingest simulate`` publishes.

    python -m benchmarks.naive --db-url URL --mqtt-url URL --prefix P --seconds 20

It prints ``ready`` once subscribed, then, at the end, one JSON line with what it committed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import resource
import struct
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.naive", description=__doc__)
    parser.add_argument("--db-url", required=True, help="postgresql://user:pass@host:port/db")
    parser.add_argument("--mqtt-url", required=True, help="mqtt://host:port")
    parser.add_argument("--prefix", required=True, help="topic prefix to subscribe under")
    parser.add_argument("--table", default="bench.readings_naive", help="readings table")
    parser.add_argument("--sensors-table", default="bench.sensors_naive", help="sensor ids")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="stop this long after the first message"
    )
    parser.add_argument(
        "--idle", type=float, default=10.0, help="stop after this long without a message"
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=30.0, help="give up if not subscribed by then"
    )
    return parser


class Bridge:
    """Subscribes with paho (its network thread) and inserts from the main thread."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subscribed = threading.Event()
        self.sensor_ids: dict[tuple[str, str], int] = {}
        self.insert_sql = (
            f"INSERT INTO {args.table} (time, sensor_id, value, quality) VALUES ($1, $2, $3, $4)"
        )
        self.readings = 0
        self.messages = 0
        self.first_received = 0.0
        self.last_commit = 0.0

    def connect_mqtt(self) -> mqtt.Client:
        parts = urlsplit(self.args.mqtt_url)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"naive-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if parts.username:
            client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))

        def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            client.subscribe(f"{self.args.prefix}/#", qos=1)

        def on_subscribe(*_: Any) -> None:
            self.subscribed.set()

        def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            self.inbox.put((msg.topic, bytes(msg.payload)))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        client.loop_start()
        return client

    async def sensor_id(self, conn: asyncpg.Connection, device: str, name: str) -> int:
        key = (device, name)
        known = self.sensor_ids.get(key)
        if known is None:
            table = self.args.sensors_table
            await conn.execute(
                f"INSERT INTO {table} (device, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                device,
                name,
            )
            known = await conn.fetchval(
                f"SELECT id FROM {table} WHERE device = $1 AND name = $2", device, name
            )
            self.sensor_ids[key] = known
        return int(known)

    async def handle(self, conn: asyncpg.Connection, topic: str, payload: bytes) -> None:
        """Decode one message into Python objects and insert it reading by reading."""
        if payload.lstrip()[:1] in (b"{", b"["):
            batch = msgspec.json.decode(payload)
        else:
            batch = msgspec.msgpack.decode(payload)
        device = topic[len(self.args.prefix) + 1 :]
        t0 = batch["t0"]
        count = 0
        async with conn.transaction():
            for ch in batch["ch"]:
                sensor = await self.sensor_id(conn, device, ch["s"])
                raw = ch["v"]
                if isinstance(raw, bytes):
                    code = "f" if ch.get("vt") == "f4" else "d"
                    values = struct.unpack(f"<{len(raw) // struct.calcsize(code)}{code}", raw)
                else:
                    values = raw
                offsets: Sequence[int]
                if "dt" in ch:
                    offsets = [i * ch["dt"] for i in range(len(values))]
                elif isinstance(ch.get("t"), bytes):
                    offsets = struct.unpack(f"<{len(ch['t']) // 8}q", ch["t"])
                else:
                    offsets = ch.get("t", [0])
                quality = ch.get("q", 0)
                for i, value in enumerate(values):
                    ts = _EPOCH + timedelta(microseconds=t0 + offsets[i])
                    q = quality if isinstance(quality, int) else quality[i]
                    await conn.execute(self.insert_sql, ts, sensor, float(value), q)
                count += len(values)
        self.readings += count
        self.messages += 1
        self.last_commit = time.time()

    async def run(self) -> dict[str, Any]:
        conn = await asyncpg.connect(self.args.db_url, timeout=30)
        client = self.connect_mqtt()
        try:
            if not self.subscribed.wait(self.args.ready_timeout):
                raise SystemExit(f"naive: not subscribed within {self.args.ready_timeout}s")
            print("ready", flush=True)
            deadline = float("inf")
            while time.time() < deadline:
                try:
                    topic, payload = self.inbox.get(timeout=self.args.idle)
                except queue.Empty:
                    break
                if not self.messages and not self.first_received:
                    self.first_received = time.time()
                    deadline = self.first_received + self.args.seconds
                await self.handle(conn, topic, payload)
        finally:
            client.disconnect()
            client.loop_stop()
            await conn.close()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = self.last_commit - self.first_received if self.messages else 0.0
        return {
            "readings": self.readings,
            "messages": self.messages,
            "seconds": elapsed,
            "readings_per_s": self.readings / elapsed if elapsed > 0 else 0.0,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "left_unread": self.inbox.qsize(),
        }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = asyncio.run(Bridge(args).run())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
