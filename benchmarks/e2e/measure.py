"""What the benchmark measures besides the ingester's /metrics: CPU time from /proc, by
process and for the machine; histogram quantiles; the machine and the software it ran."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg

import ingest
from benchmarks.e2e import BenchError
from tests.support.cluster import Database
from tests.support.ingester import metric_sum
from tests.support.stack import ROOT

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ CPU


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}/stat: {exc}") from None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


_PG_OWN = "PostgreSQL, this run's database"


class CpuAccount:
    """Where the machine's CPU time went between start and `stop()`, by process, from /proc.

    The ingesters under test are named by `ingesters` (pid -> name); other children of the
    benchmark after their process group (`children`); those that exited during the interval
    (publishers) are counted from the benchmark's children times. Other processes that exited
    during the interval (database sessions, other people's tests), interrupts and the kernel
    are what remains of the machine's busy time: `unaccounted`.
    """

    def __init__(
        self, *, database: str, ingesters: dict[int, str], children: dict[int, str]
    ) -> None:
        self.database, self.ingesters, self.children = database, ingesters, children
        self._procs = _processes()
        self._reaped = _reaped_s()
        self._busy = _machine_busy_s()
        self._started = time.monotonic()

    def _category(self, pid: int, pgid: int, cmd: str) -> str:
        if pid in self.ingesters:
            return self.ingesters[pid]
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


# ------------------------------------------------------------------------------ histograms


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


# ------------------------------------------------------------------------------ the machine


async def machine(db: Database) -> dict[str, Any]:
    """The machine, the servers' versions and the code's revision."""
    conn = await asyncpg.connect(db.owner_url, timeout=30)
    try:
        pg = await conn.fetchval("SHOW server_version")
        tsdb = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
        )
    finally:
        await conn.close()
    model, mem_kb = _cpu_and_memory()
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "postgresql": str(pg),
        "timescaledb": str(tsdb),
        "python": platform.python_version(),
        "ingest": ingest.__version__,
        "git": _git_revision(),
    }


def _cpu_and_memory() -> tuple[str, int]:
    """The CPU model and the RAM in kB, from /proc."""
    model, mem_kb = "unknown", 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    return model, mem_kb


def _git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{'+dirty' if dirty else ''}"
