"""What the end-to-end benchmark needs around the processes it runs: process groups, CPU
accounting from /proc, and the ingester's /metrics (counters and histogram quantiles)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A measurement could not be completed; the message is one readable line."""


# ------------------------------------------------------------------------------ processes


class Child:
    """A child process in its own process group, its stderr kept in a log file."""

    def __init__(
        self, name: str, argv: list[str], *, env: dict[str, str], log: Path, pipe: bool = False
    ) -> None:
        self.name, self.argv, self.env, self.log, self.pipe = name, argv, env, log, pipe
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.ended = 0.0
        self._log_file: IO[bytes] | None = None

    async def start(self) -> Child:
        self._log_file = self.log.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if self.pipe else asyncio.subprocess.DEVNULL,
            stderr=self._log_file,
            start_new_session=True,  # its own group: Ctrl-C reaches only us; we clean up
        )
        self.started = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}{self.tail()}")

    async def wait(self, *, timeout: float, doing: str) -> int:  # noqa: ASYNC109 - a deadline
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout=timeout)
        except TimeoutError:
            raise BenchError(
                f"{self.name} did not finish {doing} within {timeout:.0f}s{self.tail()}"
            ) from None
        self.ended = self.ended or time.monotonic()
        return code

    async def readline(self, *, timeout: float, doing: str) -> str:  # noqa: ASYNC109
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=timeout)
        except TimeoutError:
            raise BenchError(
                f"{self.name}: no {doing} within {timeout:.0f}s{self.tail()}"
            ) from None
        if not line:
            await self.wait(timeout=10, doing="exiting")
            self.check_alive()
            raise BenchError(f"{self.name} ended its output before {doing}{self.tail()}")
        return line.decode().strip()

    async def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM its group, then SIGKILL after `grace` seconds; only while it still runs."""
        if self.proc is not None and self.proc.returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=grace)
            except TimeoutError:
                self.signal_group(signal.SIGKILL)
                await self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        last = [line.strip() for line in text if line.strip()][-lines:]
        return f" (last output: {' | '.join(last)})" if last else ""


class Children:
    """Every child of the run; all still running are stopped when the run ends, however."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._all: list[Child] = []

    async def start(
        self, name: str, argv: list[str], *, env: dict[str, str], pipe: bool = False
    ) -> Child:
        log = self.folder / f"{len(self._all):02d}-{re.sub(r'[^a-z0-9]+', '-', name)}.log"
        child = Child(name, argv, env=env, log=log, pipe=pipe)
        self._all.append(child)
        return await child.start()

    def running(self) -> list[Child]:
        return [c for c in self._all if c.running]

    async def stop_all(self) -> None:
        for child in reversed(self._all):
            await child.stop(grace=5.0)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}/stat: {exc}") from None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A `kB` line of /proc/<pid>/status: VmHWM is the peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


_PG_OWN = "PostgreSQL, this run's database"


class CpuAccount:
    """Where the machine's CPU time went between start and `stop()`, by process, from /proc.

    Children of the benchmark are named after their process group; those that exited during the
    interval (publishers) are counted from the benchmark's children times. Other processes that
    exited during the interval (database sessions, other people's tests), interrupts and the
    kernel are what remains of the machine's busy time: `unaccounted`.
    """

    def __init__(self, *, database: str, ingester: int, children: dict[int, str]) -> None:
        self.database, self.ingester, self.children = database, ingester, children
        self._procs = _processes()
        self._reaped = _reaped_s()
        self._busy = _machine_busy_s()
        self._started = time.monotonic()

    def _category(self, pid: int, pgid: int, cmd: str) -> str:
        if pid == self.ingester:
            return "ingester"
        if pgid in self.children:
            return self.children[pgid]
        if pid == os.getpid():
            return "benchmark process"
        if cmd.startswith("postgres"):
            return _PG_OWN if f" {self.database} " in cmd else "PostgreSQL, rest of the server"
        if "mosquitto" in cmd.split(" ", 1)[0]:
            return "Mosquitto"
        return "other processes"

    def stop(self) -> dict[str, float]:
        """Core-seconds per category, `machine` (all cores busy) and `wall` seconds."""
        out: dict[str, float] = {}
        for key, (pgid, cmd, cpu) in _processes().items():
            before = self._procs.get(key)
            used = cpu - (before[2] if before else 0.0)
            category = self._category(key[0], pgid, cmd)
            out[category] = out.get(category, 0.0) + used
        exited = _reaped_s() - self._reaped
        if exited > 0:
            out["exited children of the benchmark (publishers)"] = exited
        machine = _machine_busy_s() - self._busy
        out["unaccounted (exited processes, kernel)"] = machine - sum(out.values())
        out = {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        out["machine"] = round(machine, 2)
        out["wall"] = round(time.monotonic() - self._started, 2)
        return out


def _processes() -> dict[tuple[int, int], tuple[int, str, float]]:
    """(pid, start time) -> (process group, command line, its own CPU seconds)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(f[11]) + int(f[12])) / _CLK_TCK
        text = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
        out[(int(entry.name), int(f[19]))] = (int(f[2]), text, cpu)
    return out


def _reaped_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _machine_busy_s() -> float:
    """Core-seconds all CPUs spent not idle since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / _CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ metrics


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of a GET on localhost, or (0, b'') when nothing listens."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return 0, b""
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    except (OSError, TimeoutError):
        return 0, b""
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split()
    return (int(parts[1]) if len(parts) > 1 else 0), body


async def scrape(port: int) -> dict[str, float]:
    """Every sample of the ingester's /metrics, keyed by name with labels."""
    status, body = await http_get(port, "/metrics")
    if status != 200:
        raise BenchError(f"GET /metrics on port {port} answered {status or 'nothing'}")
    samples: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_sum(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def grown(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return metric_sum(after, name) - metric_sum(before, name)


def histogram(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of each bucket, +Inf last."""
    buckets = []
    for key, value in samples.items():
        if key.startswith(f"{name}_bucket{{"):
            match = re.search(r'le="([^"]+)"', key)
            if match:
                buckets.append((float(match.group(1)), value))
    return sorted(buckets)


def quantile(buckets: list[tuple[float, float]], q: float) -> tuple[float, float, float]:
    """Estimate, lower and upper bucket bound of quantile `q` (linear within the bucket)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan, math.nan, math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower, lower, bound
            if count == below:
                return bound, lower, bound
            return lower + (bound - lower) * (rank - below) / (count - below), lower, bound
        lower, below = bound, count
    return lower, lower, math.inf


def delta(
    after: list[tuple[float, float]], before: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    start = dict(before)
    return [(bound, count - start.get(bound, 0.0)) for bound, count in after]
