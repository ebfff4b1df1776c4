"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg
import msgspec
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.harness import free_port, http_get
from tests.conftest import Database

T = TypeVar("T")


async def ingest_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,  # noqa: ASYNC109 - a deadline for the whole command
) -> tuple[int, str, str]:
    """Run `ingest <args>` to the end with the environment plus `env`: (status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest.cli",
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - a polling deadline
    every: float = 0.1,
) -> T:
    """Poll an async predicate until it returns a truthy value; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(every)


class Publisher:
    """A plain paho client, separate from the ingester's code, publishing at QoS 1."""

    def __init__(self, url: str, *, client_id: str | None = None) -> None:
        parts = urlsplit(url)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.max_inflight_messages_set(500)
        self._client.max_queued_messages_set(0)
        if parts.username:
            self._client.username_pw_set(parts.username, parts.password)
        self._client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self._client.loop_start()
        self._pending: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, *, content_type: str | None = None) -> None:
        props = None
        if content_type is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ContentType = content_type
        info = self._client.publish(topic, payload, qos=1, properties=props)
        self._pending.append(info)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until the broker acknowledged everything published so far."""
        for info in self._pending:
            info.wait_for_publish(timeout=timeout)
            if not info.is_published():
                raise AssertionError(f"message {info.mid} not acknowledged by the broker")
        self._pending.clear()

    def close(self) -> None:
        self.wait()
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ingester:
    """`ingest run` as a child process of the test, with its own metrics port."""

    def __init__(self, env: dict[str, str], *, command: Sequence[str] = ("run",)) -> None:
        self.command = tuple(command)
        self.port = free_port()
        self.env = {
            **os.environ,
            "INGEST_METRICS_PORT": str(self.port),
            "INGEST_METRICS_HOST": "127.0.0.1",
            "INGEST_FLUSH_INTERVAL_S": "0.05",
            **env,
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.log = b""

    async def start(self, *, ready_timeout: float = 60.0) -> Ingester:
        """Start `ingest run` and wait until it is ready."""
        await self.spawn()
        await self.wait_ready(timeout=ready_timeout)
        return self

    async def spawn(self) -> Ingester:
        """Start `ingest run` without waiting for readiness."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ingest.cli",
            *self.command,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_log())
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_ready(self, *, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        async def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"ingest run exited: {self.log.decode()}")
            status, _ = await http_get(self.port, "/readyz")
            return status == 200

        await wait_until(ready, timeout=timeout)

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS of /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    async def wait_exit(self, *, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def _read_log(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.log += chunk

    async def metric(self, name: str) -> float:
        """The sum of every sample of `name` in the exposition."""
        status, body = await http_get(self.port, "/metrics")
        assert status == 200
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def stop(self, *, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """SIGTERM, then wait for the exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout=timeout)
        await self._reader
        return code

    async def kill(self) -> None:
        """SIGKILL: no flush, no acknowledgement, no goodbye."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        await self._reader


# ------------------------------------------------------------------------------ streams

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in µs
Row = tuple[int, str, str, float, int]  # (time µs, device, sensor, value, quality)


def ingester_env(db: Database, mqtt_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "INGEST_DB_URL": db.ingest_url,
        "INGEST_MQTT_URL": mqtt_url,
        "INGEST_MQTT_TOPIC_PREFIX": prefix,
        "INGEST_MQTT_CLIENT_ID": f"ingest-{uuid.uuid4().hex[:8]}",
        "INGEST_MQTT_RECONNECT_MIN_S": "0.1",
        "INGEST_MQTT_RECONNECT_MAX_S": "1",
        # Split every flush over the writers, however small, so the tests' modest streams go
        # through the parallel path (partial commits, retries of one part) as big ones do.
        "INGEST_DB_SPLIT_MIN_READINGS": "1",
        "INGEST_DB_RETRY_MIN_S": "0.1",
        "INGEST_DB_RETRY_MAX_S": "1",
        **extra,
    }


async def share_group(
    db: Database, mqtt_url: str, prefix: str, *, members: int, **extra: str
) -> list[Ingester]:
    """`members` ingesters started on one new share group, each with its own client id."""
    group = f"g{uuid.uuid4().hex[:6]}"
    env = {"INGEST_MQTT_SHARE_GROUP": group, **extra}
    return [
        await Ingester(ingester_env(db, mqtt_url, prefix, **env)).start() for _ in range(members)
    ]


async def acked_at_least(proc: Ingester, n: int, *, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    async def done() -> bool:
        return await proc.metric("ingest_messages_acknowledged_total") >= n

    await wait_until(done, timeout=timeout)


def f8(values: Iterable[float]) -> bytes:
    return np.asarray(list(values), dtype="<f8").tobytes()


def batch_payload(t0: int, channels: list[dict[str, object]], *, seq: int | None = None) -> bytes:
    doc: dict[str, object] = {"v": 1, "t0": t0, "ch": channels}
    if seq is not None:
        doc["seq"] = seq
    return msgspec.msgpack.encode(doc)


def stream(
    site: str, *, devices: int, messages: int, per_message: int, seed: int = 7
) -> tuple[list[tuple[str, bytes]], set[Row]]:
    """A regular stream: each device sends `messages` batches of `per_message` readings.

    Returns (device path, payload) in publishing order and the rows they must produce.
    """
    out: list[tuple[str, bytes]] = []
    rows: set[Row] = set()
    rng = np.random.default_rng(seed)
    for m in range(messages):
        for d in range(devices):
            device = f"{site}/line1/dev-{d:02d}"
            values = np.round(rng.normal(50, 5, per_message), 6)
            t0 = T0 + m * per_message * 1000
            out.append(
                (device, batch_payload(t0, [{"s": "temp", "dt": 1000, "v": f8(values)}], seq=m))
            )
            rows.update((t0 + i * 1000, device, "temp", float(v), 0) for i, v in enumerate(values))
    return out, rows


async def stored(db: Database, site: str) -> list[Row]:
    """Every reading of the site, as the analysts see it (in µs, device, sensor, time order)."""
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT (extract(epoch FROM ts) * 1000000)::bigint AS t, device, sensor, value, quality"
            "  FROM telemetry.readings_v WHERE device LIKE $1 || '/%' ORDER BY 2, 3, 1",
            site,
        )
    finally:
        await conn.close()
    return [(r["t"], r["device"], r["sensor"], r["value"], r["quality"]) for r in rows]
