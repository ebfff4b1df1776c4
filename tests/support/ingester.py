"""`ingest run` (or `ingest drain`) as a child process, its settings, and its /metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from tests.support import SupportError
from tests.support.cluster import Database
from tests.support.net import free_port, http_get
from tests.support.process import Child, wait_until

WARM_UP = [sys.executable, "-c", "from ingest.warmup import warm_up; warm_up()"]
"""Fills numba's on-disk cache with the compiled kernels, as the container image's build does;
an `ingest run` started afterwards loads them instead of compiling them."""


def warm_up_kernels() -> None:
    subprocess.run(WARM_UP, check=True, timeout=600)


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


# ------------------------------------------------------------------------------ metrics


async def scrape(port: int) -> dict[str, float]:
    """Every sample of an ingester's /metrics, keyed by name with labels."""
    status, body = await http_get(port, "/metrics")
    if status != 200:
        raise SupportError(f"GET /metrics on port {port} answered {status or 'nothing'}")
    samples: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_sum(samples: dict[str, float], name: str) -> float:
    """The sum of every sample of `name`, whatever its labels."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def proc_status_kb(pid: int, key: str) -> int:
    """A `kB` line of /proc/<pid>/status: VmRSS is the resident set size, VmHWM its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise SupportError(f"/proc/{pid}/status has no {key}")


# ------------------------------------------------------------------------------ the process


class Ingester:
    """`ingest <command>` as a child process, serving its metrics on a port of its own.

    Its environment is this process's (unless not `inherit`), then the metrics address, then
    `env`. Its stderr is kept in memory, or in the file `log`; with `own_group` it runs in a
    process group of its own (see `process.Child`).
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        command: Sequence[str] = ("run",),
        port: int | None = None,
        inherit: bool = True,
        log: Path | None = None,
        own_group: bool = False,
    ) -> None:
        self.command = tuple(command)
        self.port = port or free_port()
        self.env = {
            **(os.environ if inherit else {}),
            "INGEST_METRICS_PORT": str(self.port),
            "INGEST_METRICS_HOST": "127.0.0.1",
            **env,
        }
        self.child = Child(
            f"ingest {self.command[0]}",
            [sys.executable, "-m", "ingest.cli", *self.command],
            env=self.env,
            log=log,
            own_group=own_group,
        )

    async def start(self, *, ready_timeout: float = 60.0) -> Ingester:
        """Start it and wait until it is ready (connected to the broker and the database)."""
        await self.spawn()
        await self.wait_ready(timeout=ready_timeout)
        return self

    async def spawn(self) -> Ingester:
        """Start it without waiting for readiness."""
        await self.child.start()
        return self

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.child.proc

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def alive(self) -> bool:
        return self.child.running

    @property
    def log(self) -> bytes:
        """Its stderr so far."""
        return self.child.output

    def tail(self) -> str:
        return self.child.tail()

    def check_alive(self) -> None:
        self.child.check_alive()

    async def wait_ready(self, *, timeout: float = 60.0, path: str = "/readyz") -> None:  # noqa: ASYNC109
        """Wait until `path` answers 200: /healthz once serving (kernels loaded), /readyz once
        connected to both the broker and the database. Fails at once if it exits."""

        async def ready() -> bool:
            if not self.alive:
                raise SupportError(
                    f"{self.child.name} exited ({self.proc and self.proc.returncode}): "
                    f"{self.log.decode(errors='replace')}"
                )
            status, _ = await http_get(self.port, path)
            return status == 200

        await wait_until(ready, timeout=timeout)

    def rss(self) -> int:
        """Resident set size in bytes."""
        return proc_status_kb(self.pid, "VmRSS") * 1024

    def memory_mb(self) -> dict[str, float]:
        """Peak (VmHWM, whole life) and current resident set size, in MB."""
        return {
            "peak_rss_mb": proc_status_kb(self.pid, "VmHWM") / 1024,
            "rss_mb": proc_status_kb(self.pid, "VmRSS") / 1024,
        }

    async def metrics(self) -> dict[str, float]:
        """Every sample of its /metrics; fails if it exited."""
        self.check_alive()
        return await scrape(self.port)

    async def metric(self, name: str) -> float:
        """The sum of every sample of `name` in the exposition."""
        return metric_sum(await scrape(self.port), name)

    async def wait_exit(self, *, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Its exit status, once it exited on its own."""
        return await self.child.wait(timeout=timeout, doing="exiting")

    async def stop(self, *, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """SIGTERM, then its exit status (SIGKILL after `timeout` seconds)."""
        code = await self.child.stop(grace=timeout)
        assert code is not None, "stop() of an ingester never started"
        return code

    async def kill(self) -> None:
        """SIGKILL: no flush, no acknowledgement, no goodbye."""
        await self.child.kill()


# ------------------------------------------------------------------------------ in tests


def ingester_env(db: Database, mqtt_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The settings of an ingester under test: quick flushes and retries, its own client id."""
    return {
        "INGEST_DB_URL": db.ingest_url,
        "INGEST_MQTT_URL": mqtt_url,
        "INGEST_MQTT_TOPIC_PREFIX": prefix,
        "INGEST_MQTT_CLIENT_ID": f"ingest-{uuid.uuid4().hex[:8]}",
        "INGEST_MQTT_RECONNECT_MIN_S": "0.1",
        "INGEST_MQTT_RECONNECT_MAX_S": "1",
        "INGEST_FLUSH_INTERVAL_S": "0.05",
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
