"""The alert tests' surroundings: a real HTTP receiver process, and seeded history."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from tests.support.net import free_port


class Receiver:
    """`python -m tests.support.alert_receiver` as a child process: a real HTTP server on
    loopback."""

    def __init__(self, record: Path, *, port: int | None = None) -> None:
        self.record = record
        self.port = port or free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Receiver:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.alert_receiver",
            str(self.record),
            str(self.port),
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=30)
        assert int(line) == self.port
        return self

    async def stop(self) -> None:
        """SIGKILL: from now on the port refuses connections."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def answer(self, *answers: dict[str, Any]) -> None:
        """Queue answers for the next requests (see tests/support/alert_receiver.py)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = json.dumps({"answers": list(answers)}).encode()
        writer.write(
            b"POST /_control HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await reader.read()
        writer.close()

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        out = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [r for r in out if path is None or r["path"] == path]

    def events(self, path: str = "/hook") -> list[tuple[str, str]]:
        """(type, subject) of each CloudEvent answered 2xx and not a duplicate, in order."""
        out = []
        for r in self.requests(path):
            if 200 <= r["status"] < 300 and not r["duplicate"]:
                doc = json.loads(r["body"])
                out.append((doc["type"].rsplit(".", 1)[-1], doc["data"]["key"]))
        return out


# ------------------------------------------------------------------------------ seeded history


def at(base: datetime, seconds: float) -> datetime:
    return base + timedelta(seconds=seconds)


async def seed_device(conn: asyncpg.Connection, device: str, sensors: list[str]) -> dict[str, int]:
    """Register a device and its sensors as the ingester would; sensor name -> id."""
    levels = device.split("/")
    for depth in range(1, len(levels)):
        path = "/".join(levels[:depth])
        await conn.execute(
            "INSERT INTO telemetry.assets (path, parent_id, name, depth)"
            " SELECT $1, (SELECT id FROM telemetry.assets WHERE path = $2), $3, $4"
            " ON CONFLICT (path) DO NOTHING",
            path,
            "/".join(levels[: depth - 1]),
            levels[depth - 1],
            depth,
        )
    device_id = await conn.fetchval(
        "INSERT INTO telemetry.devices (path, name, asset_id)"
        " VALUES ($1, $2, (SELECT id FROM telemetry.assets WHERE path = $3)) RETURNING id",
        device,
        levels[-1],
        "/".join(levels[:-1]),
    )
    out = {}
    for name in sensors:
        out[name] = await conn.fetchval(
            "INSERT INTO telemetry.sensors (device_id, name) VALUES ($1, $2) RETURNING id",
            device_id,
            name,
        )
    return out


async def readings_until(
    conn: asyncpg.Connection, sensor_id: int, start: datetime, end: datetime, *, every_s: float = 1
) -> None:
    """One reading per `every_s` from start to end inclusive (what the horizon is read from)."""
    times = []
    t = start
    while t <= end:
        times.append(t)
        t += timedelta(seconds=every_s)
    await conn.executemany(
        "INSERT INTO telemetry.readings (time, sensor_id, value) VALUES ($1, $2, 1.0)"
        " ON CONFLICT DO NOTHING",
        [(t, sensor_id) for t in times],
    )
    await conn.execute(
        "UPDATE telemetry.sensors SET last_seen = greatest(last_seen, $2) WHERE id = $1",
        sensor_id,
        end,
    )


async def anomaly(
    conn: asyncpg.Connection,
    sensor_id: int,
    kind: str,
    start: datetime,
    end: datetime | None,
) -> None:
    """Write or close an anomaly event as the kernels' upsert does."""
    await conn.execute(
        "INSERT INTO telemetry.anomalies (start_time, sensor_id, kind, end_time, value, score)"
        " VALUES ($1, $2, $3, $4, 100.0, 1.0)"
        " ON CONFLICT (sensor_id, kind, start_time) DO UPDATE SET end_time = excluded.end_time",
        start,
        sensor_id,
        kind,
        end,
    )


def now_base() -> datetime:
    """A base data time a minute ago, on a whole second (silence is judged by the clock)."""
    return datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60)
