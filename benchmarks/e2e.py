"""End-to-end benchmark: the direct-COPY limit, a naive bridge and the ingester under load.

One run on the local stack (``deploy/local/stack up``; its ``env`` exported), in this order:

1. the limit: the load's rows (recorded by the publishers), binary-COPYed by one writer in
   flush-sized slabs sorted by (sensor, time) into a table defined like ``telemetry.readings``;
2. ``ingest run`` as its own process, rollups and anomaly filters on, fed by unpaced
   ``ingest simulate`` publisher processes: readings/s sustained between the first and the last
   commit, ingester CPU seconds per million readings, where the machine's CPU went;
3. publish-to-commit latency at half that rate (after a VACUUM, so that an autovacuum does not
   land in the window by chance), and peak RSS; with ``--backlog`` also a new ingester process
   draining a broker backlog with no publisher running;
4. the naive baseline: ``benchmarks.naive``, one INSERT per reading, a commit per message;
5. a table of the ratios, printed and written as JSON and Markdown.

    python -m benchmarks.e2e [--readings N] [--out DIR] [--format compact|json] [--backlog] ...

Every run creates its own scratch database and drops it at the end; a CHECKPOINT precedes each
measured phase. Targets are reported, never asserted: the exit status is 0 whenever the
measurements completed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import numpy as np

import ingest
from benchmarks.harness import (
    ROOT,
    BenchError,
    Child,
    Children,
    CpuAccount,
    delta,
    free_port,
    grown,
    histogram,
    http_get,
    metric_sum,
    proc_cpu_s,
    proc_status_kb,
    quantile,
    scrape,
)
from ingest import config as ingest_config
from ingest import memory
from ingest.anomaly.rules import MAX_DRIFT_SPAN
from ingest.db.migrate import migrate
from ingest.db.sink import Readings, encode_copy
from ingest.decode import DecodeLimits, decode_batch
from ingest.errors import ConfigError, IngestError
from ingest.sim.simulate import load_plant, read_record

_STACK_VARS = (
    "INGEST_DB_URL",
    "INGEST_MIGRATE_DB_URL",
    "INGEST_MQTT_URL",
    "STACK_PG_SOCKET_DIR",
    "STACK_PG_PORT",
)
# Settings the benchmark sets for the ingester itself; every other INGEST_* is passed through.
_CONTROLLED = {
    "INGEST_DB_URL",
    "INGEST_MIGRATE_DB_URL",
    "INGEST_MQTT_URL",
    "INGEST_MQTT_TOPIC_PREFIX",
    "INGEST_MQTT_CLIENT_ID",
    "INGEST_MQTT_SHARE_GROUP",
    "INGEST_MQTT_SESSION_EXPIRY_S",
    "INGEST_METRICS_HOST",
    "INGEST_METRICS_PORT",
}
_LATENCY_METRIC = "ingest_publish_to_commit_seconds"


# The targets hold with rollups and anomaly filters on: every filter on every sensor, with
# limits that suit the simulated plant (they fire on its current steps and counter plateaus),
# and drift over an hour's baseline (and a minute's window) at the simulated rate.
def default_filters(hz: float) -> dict[str, str]:
    """The ingester settings of the default filter set for sensors sampled at `hz` (the
    baseline stops at the longest a rule allows)."""
    window = max(1, round(60 * hz))
    baseline = min(max(2, round(3600 * hz)), MAX_DRIFT_SPAN - window)
    return {
        "INGEST_ROLLUPS_ENABLED": "true",
        "INGEST_ANOMALY_RULES": json.dumps(
            [
                {
                    "match": "*",
                    "min": -1e6,
                    "max": 1e6,
                    "max_rate": 1000.0,
                    "spike_window": 32,
                    "spike_threshold": 6.0,
                    "spike_min_sigma": 0.5,
                    "drift_window": window,
                    "drift_baseline": baseline,
                    "drift_sigma": 6.0,
                    "drift_min_sigma": 0.5,
                    "flatline_count": 100,
                    "flatline_seconds": 60.0,
                }
            ]
        ),
    }


_HOUR_US = 3_600_000_000
_POLL_S = 0.5  # /metrics costs the ingester CPU too: poll gently

_BENCH_SCHEMA = """
CREATE SCHEMA bench;
CREATE TABLE bench.readings_limit (LIKE telemetry.readings INCLUDING ALL);
SELECT create_hypertable('bench.readings_limit', by_range('time', INTERVAL '1 day'),
                         create_default_indexes => false);
CREATE TABLE bench.readings_naive (LIKE telemetry.readings INCLUDING ALL);
SELECT create_hypertable('bench.readings_naive', by_range('time', INTERVAL '1 day'),
                         create_default_indexes => false);
CREATE TABLE bench.sensors_naive (
    id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device  text NOT NULL,
    name    text NOT NULL,
    UNIQUE (device, name)
);
GRANT USAGE ON SCHEMA bench TO ingest;
GRANT SELECT, INSERT ON bench.readings_limit, bench.readings_naive, bench.sensors_naive TO ingest;
"""


# ------------------------------------------------------------------------------ options


@dataclass(frozen=True, slots=True)
class Options:
    readings: int
    out: Path
    fmt: str
    processes: int
    batch: int
    hz: float
    devices: int | None
    latency_seconds: float
    naive_seconds: float
    ingest_env: dict[str, str]
    keep_database: bool
    py_spy: Path | None
    backlog: bool
    shape: str = "narrow"
    plant: Path | None = None
    rounds: int = 6
    plant_devices: int = 5_000


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e",
        description="End-to-end benchmark on the local stack: direct-COPY limit, naive "
        "per-reading INSERT bridge, and the ingester under load from publisher processes.",
    )
    p.add_argument(
        "--readings", type=int, default=5_000_000, help="readings of the load (5,000,000)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder for e2e-<time>.json/.md and latest.md (benchmarks/results)",
    )
    p.add_argument("--format", dest="fmt", choices=("compact", "json"), default="compact")
    p.add_argument("--processes", type=int, default=2, help="publisher processes (2)")
    p.add_argument("--batch", type=int, default=100, help="samples per channel per message (100)")
    p.add_argument("--hz", type=float, default=10.0, help="samples per second per sensor (10)")
    p.add_argument("--devices", type=int, help="use only the first N devices of the plant (all)")
    p.add_argument(
        "--latency-seconds", type=float, default=15.0, help="length of the half-load phase (15)"
    )
    p.add_argument(
        "--naive-seconds", type=float, default=20.0, help="length of the naive baseline (20)"
    )
    p.add_argument(
        "--ingest-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra INGEST_* setting for the ingester under test; repeatable",
    )
    p.add_argument(
        "--backlog",
        action="store_true",
        help="also measure a new ingester process draining a broker backlog, no publisher "
        "running (adds about a third to the run)",
    )
    p.add_argument("--keep-database", action="store_true", help="do not drop the scratch database")
    p.add_argument(
        "--shape",
        choices=("narrow", "wide"),
        default="narrow",
        help="narrow: 240 sensors, long series per message (default); wide: 5,000 devices x 20 "
        "sensors, one sample per sensor per message, see benchmarks/wide.py",
    )
    p.add_argument(
        "--rounds", type=int, default=6, help="wide shape: rounds of one sample per sensor (6)"
    )
    p.add_argument(
        "--wide-devices", type=int, default=5_000, help="wide shape: devices, 20 sensors each"
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="profile the ingester's sustained phase with py-spy (if installed) into FILE: "
        "speedscope JSON, or a flame graph (.svg) or collapsed stacks (.txt)",
    )
    return p


def parse_options(argv: list[str] | None) -> Options:
    args = _parser().parse_args(argv)
    for name in ("readings", "processes", "batch", "rounds", "wide_devices"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 1")
    if args.hz <= 0 or args.latency_seconds <= 0 or args.naive_seconds <= 0:
        raise BenchError("--hz, --latency-seconds and --naive-seconds must be > 0")
    extra: dict[str, str] = {}
    for item in args.ingest_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("INGEST_"):
            raise BenchError(f"--ingest-env {item!r}: expected INGEST_<SECTION>_<KEY>=VALUE")
        if key in _CONTROLLED:
            raise BenchError(f"--ingest-env {key}: set by the benchmark itself")
        extra[key] = value
    return Options(
        readings=args.readings,
        out=args.out,
        fmt=args.fmt,
        processes=args.processes,
        batch=args.batch,
        hz=args.hz,
        devices=args.devices,
        latency_seconds=args.latency_seconds,
        naive_seconds=args.naive_seconds,
        ingest_env=extra,
        keep_database=args.keep_database,
        py_spy=args.py_spy,
        backlog=args.backlog,
        shape=args.shape,
        rounds=args.rounds,
        plant_devices=args.wide_devices,
    )


def _stack_env() -> dict[str, str]:
    missing = [name for name in _STACK_VARS if not os.environ.get(name)]
    if missing:
        raise BenchError(
            f"{', '.join(missing)} not set: start the local stack and export its addresses "
            "('deploy/local/stack up; set -a; eval \"$(deploy/local/stack env)\"; set +a')"
        )
    return {name: os.environ[name] for name in _STACK_VARS}


# ------------------------------------------------------------------------------ database


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@dataclass(frozen=True, slots=True)
class Scratch:
    """The run's scratch database: the superuser's (socket), the owner's and the service's URL."""

    name: str
    admin_url: str
    owner_url: str
    ingest_url: str


def _admin_url(stack: dict[str, str], database: str) -> str:
    return (
        f"postgresql://postgres@/{database}"
        f"?host={stack['STACK_PG_SOCKET_DIR']}&port={stack['STACK_PG_PORT']}"
    )


@contextlib.asynccontextmanager
async def scratch_database(stack: dict[str, str], *, keep: bool) -> AsyncIterator[Scratch]:
    """Create a migrated database owned by telemetry_owner, with the bench tables; drop it."""
    name = f"bench_e2e_{uuid.uuid4().hex[:10]}"
    await _sql(_admin_url(stack, "postgres"), f'CREATE DATABASE "{name}" OWNER telemetry_owner')
    db = Scratch(
        name=name,
        admin_url=_admin_url(stack, name),
        owner_url=_with_database(stack["INGEST_MIGRATE_DB_URL"], name),
        ingest_url=_with_database(stack["INGEST_DB_URL"], name),
    )
    try:
        await _sql(db.admin_url, "CREATE EXTENSION IF NOT EXISTS timescaledb")
        await migrate(dsn=db.owner_url)
        await _sql(db.owner_url, _BENCH_SCHEMA)
        yield db
    finally:
        if keep:
            _say(f"kept the scratch database {name}")
        else:
            await _sql(_admin_url(stack, "postgres"), f'DROP DATABASE "{name}" WITH (FORCE)')


async def _sql(url: str, sql: str, *, value: bool = False) -> Any:
    """Run `sql` on a connection of its own; with `value`, return the first row's first value."""
    conn = await asyncpg.connect(url, timeout=30)
    try:
        return await (conn.fetchval(sql, timeout=300) if value else conn.execute(sql, timeout=300))
    finally:
        await conn.close()


async def _checkpoint(db: Scratch) -> None:
    """Write dirty pages out, so no phase pays for the previous one's checkpoint."""
    await _sql(db.admin_url, "CHECKPOINT")


# ------------------------------------------------------------------------------ load


@dataclass(frozen=True, slots=True)
class Load:
    """What one publisher run sends: every sensor of the plant, `steps` messages per device."""

    sensors: int
    steps: int
    batch: int
    hz: float

    @property
    def readings(self) -> int:
        return self.sensors * self.steps * self.batch

    @property
    def duration_s(self) -> float:
        """Simulated seconds per device that make `ingest simulate` send exactly `steps`."""
        duration = self.steps * self.batch / self.hz
        while math.ceil(duration * self.hz / self.batch) > self.steps:
            duration = math.nextafter(duration, 0.0)
        return duration

    @property
    def span_us(self) -> int:
        return math.ceil(self.steps * self.batch * 1e6 / self.hz)


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")


def _published_rate(child: Child) -> float:
    """Readings/s from `ingest simulate`'s last line (its time includes starting its workers)."""
    text = child.log.read_text(errors="replace")
    match = re.search(r"done, ([\d,]+) readings in ([\d.]+)s", text)
    if not match:
        raise BenchError(f"{child.name}: no 'done' line in its output{child.tail()}")
    return int(match.group(1).replace(",", "")) / max(float(match.group(2)), 1e-9)


def recorded_slabs(paths: list[Path], *, slab: int) -> tuple[list[Readings], int]:
    """The recorded load as flush-sized slabs: messages in publication order (by time, then
    sensor), cut every `slab` readings, each slab sorted by (sensor, time) as a flush is."""
    ids: dict[tuple[str, str], int] = {}
    channels: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    for path in paths:
        for topic, name, times, values in read_record(str(path)):
            sensor = ids.setdefault((topic, name), len(ids) + 1)
            channels.append((int(times[0]), sensor, times, values))
    if not channels:
        raise BenchError("the recording holds no readings")
    channels.sort(key=lambda c: (c[0], c[1]))
    time_col = np.concatenate([c[2] for c in channels])
    value_col = np.concatenate([c[3] for c in channels])
    sensor_col = np.concatenate([np.full(len(c[2]), c[1], dtype=np.int32) for c in channels])
    slabs = []
    for lo in range(0, len(time_col), slab):
        t, s, v = time_col[lo : lo + slab], sensor_col[lo : lo + slab], value_col[lo : lo + slab]
        order = np.lexsort((t, s))
        zeros = np.zeros(len(order), dtype=np.uint8)
        slabs.append(Readings(t[order], s[order], v[order], zeros))
    return slabs, len(time_col)


def _first_message(path: Path) -> list[tuple[str, np.ndarray]]:
    """The channels of a recording's first message (until the topic changes or a name repeats)."""
    topic, channels = "", list[tuple[str, np.ndarray]]()
    for t, name, _, values in read_record(str(path)):
        if channels and (t != topic or any(name == c[0] for c in channels)):
            break
        topic = t
        channels.append((name, values))
    if not channels:
        raise BenchError(f"the recording {path} holds no readings")
    return channels


def _encode(fmt: str, channels: list[tuple[str, np.ndarray]]) -> tuple[bytes, str]:
    """A wire-format batch as `ingest simulate` encodes it (regular sampling, `dt`)."""
    t0, dt = 1_767_225_000_000_000, 100_000
    if fmt == "json":
        body = {"v": 1, "t0": t0, "ch": [{"s": s, "dt": dt, "v": v.tolist()} for s, v in channels]}
        return msgspec.json.encode(body), "application/json"
    chs = [{"s": s, "dt": dt, "v": v.astype("<f8").tobytes()} for s, v in channels]
    return msgspec.msgpack.encode({"v": 1, "t0": t0, "ch": chs}), "application/msgpack"


def measure_decode(fmt: str, record: Path, batch: int) -> dict[str, Any]:
    """decode_batch per core (process time): one message as published here, and a big batch."""
    rng = np.random.default_rng(3)
    cases = {
        f"message as published here ({batch} samples per channel)": _first_message(record),
        "100 channels x 1000 samples": [(f"s{i}", rng.normal(50, 5, 1000)) for i in range(100)],
    }
    limits = DecodeLimits(max_payload_bytes=64 * 1_048_576)
    now = 1_767_225_600_000_000
    out: dict[str, Any] = {}
    for name, channels in cases.items():
        payload, ctype = _encode(fmt, channels)
        readings = decode_batch(payload, content_type=ctype, limits=limits, now_us=now).readings
        n, started = 0, time.process_time()
        while time.process_time() - started < 0.5:
            for _ in range(20):
                decode_batch(payload, content_type=ctype, limits=limits, now_us=now)
            n += 20
        out[name] = {
            "payload_bytes": len(payload),
            "readings": readings,
            "readings_per_s_per_core": readings * n / (time.process_time() - started),
        }
    return out


# ------------------------------------------------------------------------------ the ingester


class Ingester:
    """`ingest run` under test: its environment, its metrics port, its process."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env, self.port = env, port
        self.child: Child | None = None

    async def spawn(self, children: Children) -> Ingester:
        # Fill numba's on-disk kernel cache first, as the container image does when it is built,
        # so the process under test loads its kernels rather than compiling them: its memory is
        # then the running service's, not the compiler's.
        warm = [sys.executable, "-c", "import ingest.warmup as w; w.warm_up()"]
        compiler = await children.start("kernel warm-up", warm, env=self.env)
        if await compiler.wait(timeout=300, doing="compiling the kernels") != 0:
            raise BenchError(f"kernel warm-up failed{compiler.tail()}")
        argv = [sys.executable, "-m", "ingest.cli", "run"]
        self.child = await children.start("ingest run", argv, env=self.env)
        return self

    async def ready(self, *, path: str = "/readyz", timeout: float = 180.0) -> None:  # noqa: ASYNC109
        """Wait until `path` answers 200: /healthz once serving (kernels warm), /readyz once
        connected to both the broker and the database."""
        deadline = time.monotonic() + timeout
        while (await http_get(self.port, path))[0] != 200:
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"ingest run: {path} not 200 within {timeout:.0f}s{self.tail()}")
            await asyncio.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def check_alive(self) -> None:
        assert self.child is not None
        self.child.check_alive()

    def tail(self) -> str:
        return self.child.tail() if self.child else ""

    async def metrics(self) -> dict[str, float]:
        self.check_alive()
        return await scrape(self.port)

    def memory_mb(self) -> dict[str, float]:
        return {
            "peak_rss_mb": proc_status_kb(self.pid, "VmHWM") / 1024,
            "rss_mb": proc_status_kb(self.pid, "VmRSS") / 1024,
        }

    async def stop(self) -> None:
        assert self.child is not None
        assert self.child.proc is not None
        if self.child.running:
            self.child.proc.send_signal(signal.SIGTERM)
        code = await self.child.wait(timeout=90, doing="stopping")
        if code != 0:
            raise BenchError(f"ingest run exited with status {code} on SIGTERM{self.tail()}")


_WRITTEN = "ingest_readings_written_total"


class Sample(NamedTuple):
    """One poll: counters of the same /metrics answer, and the ingester's CPU right after."""

    at: float  # monotonic
    written: float
    commit: float  # unix time of the last commit
    flush_s: float  # total time in flush transactions
    copy_s: float  # total time in COPY
    cpu: float


async def drive(
    ingester: Ingester,
    before: dict[str, float],
    readings: int,
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline
    publisher: Child | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Poll /metrics until `readings` more are written. Rate, CPU and writer time are taken
    between the first and the last poll that saw a commit (the first flush's own time is before
    the first commit, so it is left out with it)."""
    samples: list[Sample] = []
    pub_end_written: float | None = None
    began = datetime.now(UTC)
    deadline = time.monotonic() + timeout
    while True:
        m = await ingester.metrics()
        now, cpu = time.monotonic(), proc_cpu_s(ingester.pid)

        sample = Sample(
            now,
            grown(m, before, _WRITTEN),
            metric_sum(m, "ingest_last_commit_timestamp_seconds"),
            grown(m, before, "ingest_flush_duration_seconds_sum"),
            grown(m, before, "ingest_copy_duration_seconds_sum"),
            cpu,
        )
        samples.append(sample)
        rejected = {
            k: v
            for k, v in m.items()
            if v > before.get(k, 0.0)
            and k.startswith(("ingest_dead_letters_total", "ingest_readings_duplicate_total"))
        }
        if rejected:
            raise BenchError(f"the ingester rejected or skipped part of the load: {rejected}")
        if publisher is not None and publisher.proc is not None:
            code = publisher.proc.returncode
            if code not in (None, 0):
                publisher.check_alive()
            if code == 0 and pub_end_written is None:
                pub_end_written = sample.written
        if sample.written >= readings:
            break
        if now > deadline:
            raise BenchError(
                f"the ingester wrote {sample.written:,.0f} of {readings:,} readings within "
                f"{timeout:.0f}s"
            )
        await asyncio.sleep(_POLL_S)
    progress = [x for x in samples if x.written > 0]
    a, b = progress[0], progress[-1]
    window = b.commit - a.commit
    nan = math.nan
    ok = window > 0 and b.written > a.written
    out = {
        "window_utc": [began.isoformat(), datetime.now(UTC).isoformat()],
        "readings": readings,
        "readings_per_s": (b.written - a.written) / window if ok else nan,
        "commit_window_s": window,
        "cpu_s_per_million": (b.cpu - a.cpu) / (b.written - a.written) * 1e6 if ok else nan,
        "cpu_cores": (b.cpu - a.cpu) / (b.at - a.at) if ok else nan,
        "flushes": grown(m, before, "ingest_flush_readings_count"),
        "writer_busy": (b.flush_s - a.flush_s) / window if ok else nan,
        "copy_busy": (b.copy_s - a.copy_s) / window if ok else nan,
    }
    if publisher is not None:
        done = pub_end_written if pub_end_written is not None else readings
        out["backlog_at_publishers_end"] = readings - done
    return out, m


def latency(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Quantiles of publish-to-commit (per message) and of flush duration, from histogram deltas."""
    out: dict[str, Any] = {}
    for key, metric in (("", _LATENCY_METRIC), ("flush_", "ingest_flush_duration_seconds")):
        buckets = delta(histogram(after, metric), histogram(before, metric))
        total = buckets[-1][1] if buckets else 0.0
        for q in (0.5, 0.99):
            value, lo, hi = quantile(buckets, q)
            out[f"{key}p{q * 100:g}_s"] = value
            out[f"{key}p{q * 100:g}_bucket_s"] = [lo, hi]
        out[f"{key}count"] = total
        if not key:
            out["within_250ms"] = dict(buckets).get(0.25, math.nan) / total if total else math.nan
            out["bucket_bounds_s"] = [b for b, _ in buckets if not math.isinf(b)]
    return out


# ------------------------------------------------------------------------------ the run


@dataclass(slots=True)
class Results:
    started: str
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    publishers: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    limit: dict[str, Any] = field(default_factory=dict)
    sustained: dict[str, Any] = field(default_factory=dict)
    half_load: dict[str, Any] = field(default_factory=dict)
    backlog: dict[str, Any] = field(default_factory=dict)
    naive: dict[str, Any] = field(default_factory=dict)
    ingester: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Bench:
    """One run: options, scratch database, child processes, the plant and the ingester's setup."""

    def __init__(
        self, opts: Options, stack: dict[str, str], db: Scratch, children: Children
    ) -> None:
        self.opts, self.db, self.children = opts, db, children
        self.url = stack["INGEST_MQTT_URL"]
        self.run_id = uuid.uuid4().hex[:8]
        devices = load_plant(str(opts.plant) if opts.plant else None)
        self.devices = devices[: opts.devices] if opts.devices else devices
        self.sensors = sum(len(d.sensors) for d in self.devices)
        self.prefix = f"bench-{self.run_id}/telemetry"
        self.port = free_port()
        self.env = ingester_env(stack, db, opts, prefix=self.prefix, port=self.port)
        self.cfg = ingest_config.load(env=self.env)

    def load(self, readings: float) -> Load:
        steps = max(1, math.ceil(readings / (self.sensors * self.opts.batch)))
        return Load(self.sensors, steps, self.opts.batch, self.opts.hz)

    async def publisher(
        self,
        name: str,
        *,
        prefix: str,
        start_us: int,
        load: Load,
        processes: int,
        rate: float = 0.0,
        record: Path | None = None,
    ) -> Child:
        o = self.opts
        flags = {
            "--url": self.url,
            "--prefix": prefix,
            "--hz": repr(o.hz),
            "--batch": str(o.batch),
            "--format": o.fmt,
            "--start": _iso(start_us),
            "--duration": repr(load.duration_s),
            "--processes": str(processes),
            "--rate": repr(rate),
        }
        if o.devices:
            flags["--devices"] = str(o.devices)
        if o.plant:
            flags["--plant"] = str(o.plant)
        if record is not None:
            flags["--record"] = str(record)
        argv = [sys.executable, "-m", "ingest.cli", "simulate", "--quiet"]
        for flag, value in flags.items():
            argv += [flag, value]
        return await self.children.start(name, argv, env=dict(os.environ))

    async def finish(self, child: Child, *, timeout: float) -> float:  # noqa: ASYNC109
        """Wait for a publisher; returns its readings/s."""
        code = await child.wait(timeout=timeout, doing="publishing")
        if code != 0:
            raise BenchError(f"{child.name} exited with status {code}{child.tail()}")
        return _published_rate(child)

    def account(self, ingester: Ingester) -> CpuAccount:
        groups = {c.pid: c.name for c in self.children.running() if c.pid != ingester.pid}
        return CpuAccount(database=self.db.name, ingester=ingester.pid, children=groups)

    async def limit(self, slabs: list[Readings], total: int) -> dict[str, Any]:
        """One writer: encode_copy + binary COPY per slab, each its own transaction."""
        await _checkpoint(self.db)
        conn = await asyncpg.connect(self.db.ingest_url, timeout=30)
        try:
            started = time.perf_counter()
            for slab in slabs:
                await conn.copy_to_table(
                    "readings_limit",
                    schema_name="bench",
                    source=cast(Any, encode_copy(slab)),
                    columns=["time", "sensor_id", "value", "quality"],
                    format="binary",
                    timeout=300,
                )
            seconds = time.perf_counter() - started
            stored = await conn.fetchval("SELECT count(*) FROM bench.readings_limit", timeout=300)
        finally:
            await conn.close()
        if stored != total:
            raise BenchError(f"limit: {stored:,} rows stored, {total:,} expected")
        # Its rows served their purpose: leave nothing to autovacuum during the next phases.
        await _sql(self.db.owner_url, "TRUNCATE bench.readings_limit")
        return {
            "readings": total,
            "slabs": len(slabs),
            "slab_readings": len(slabs[0]),
            "seconds": seconds,
            "readings_per_s": total / seconds,
        }

    async def sustained(self, ingester: Ingester, *, start_us: int, load: Load) -> dict[str, Any]:
        """Unpaced publishers alongside the running ingester."""
        before = await ingester.metrics()
        account = self.account(ingester)
        spy = await self._py_spy(ingester.pid)
        publisher = await self.publisher(
            "publishers",
            prefix=self.prefix,
            start_us=start_us,
            load=load,
            processes=self.opts.processes,
        )
        out, _ = await drive(
            ingester, before, load.readings, timeout=_budget(load), publisher=publisher
        )
        out["publishers_readings_per_s"] = await self.finish(publisher, timeout=60)
        out["cpu"] = account.stop()
        if spy is not None:
            spy.signal_group(signal.SIGINT)
            await spy.wait(timeout=60, doing="writing its profile")
        out["bound"] = (
            "ingester"
            if out["backlog_at_publishers_end"] > 2 * self.cfg.flush.max_readings
            else "publishers"
        )
        return out

    async def half_load(
        self, ingester: Ingester, *, start_us: int, load: Load, rate: float
    ) -> dict[str, Any]:
        """One publisher paced at `rate`; latency from the histograms' deltas."""
        before = await ingester.metrics()
        account = self.account(ingester)
        publisher = await self.publisher(
            "publisher (half load)",
            prefix=self.prefix,
            start_us=start_us,
            load=load,
            processes=1,
            rate=rate,
        )
        timeout = self.opts.latency_seconds * 4 + 60
        out, after = await drive(ingester, before, load.readings, timeout=timeout)
        out["cpu"] = account.stop()
        out["target_readings_per_s"] = rate
        out["publisher_readings_per_s"] = await self.finish(publisher, timeout=60)
        out.update(latency(before, after))
        return out

    async def backlog(self, ingester: Ingester, *, start_us: int, load: Load) -> dict[str, Any]:
        """Stop the ingester, publish `load` into its broker session, start it and let it drain."""
        await ingester.stop()
        publisher = await self.publisher(
            "publishers (backlog)",
            prefix=self.prefix,
            start_us=start_us,
            load=load,
            processes=self.opts.processes,
        )
        await self.finish(publisher, timeout=_budget(load))
        await _checkpoint(self.db)
        await ingester.spawn(self.children)
        await ingester.ready(path="/healthz")
        account = self.account(ingester)
        out, _ = await drive(ingester, {}, load.readings, timeout=_budget(load))
        out["cpu"] = account.stop()
        out.update(ingester.memory_mb())
        return out

    async def naive(self, *, start_us: int) -> dict[str, Any]:
        """The reference bridge for `--naive-seconds`, fed more than it can take in that time."""
        prefix = f"bench-{self.run_id}/naive"
        argv = [sys.executable, "-m", "benchmarks.naive", "--db-url", self.db.ingest_url]
        argv += ["--mqtt-url", self.url, "--prefix", prefix]
        argv += ["--seconds", repr(self.opts.naive_seconds)]
        naive = await self.children.start("naive bridge", argv, env=dict(os.environ), pipe=True)
        line = await naive.readline(timeout=60, doing="'ready' line")
        if line != "ready":
            raise BenchError(f"naive bridge: expected 'ready', got {line[:80]!r}")
        load = self.load(self.opts.naive_seconds * 30_000)
        publisher = await self.publisher(
            "publisher (naive)", prefix=prefix, start_us=start_us, load=load, processes=1
        )
        await self.finish(publisher, timeout=120)
        text = await naive.readline(timeout=self.opts.naive_seconds + 60, doing="result line")
        result: dict[str, Any] = json.loads(text)
        await naive.wait(timeout=30, doing="exiting")
        stored = await _sql(
            self.db.owner_url, "SELECT count(*) FROM bench.readings_naive", value=True
        )
        if stored != result["readings"]:
            raise BenchError(f"naive: {stored:,} rows stored, it reported {result['readings']:,}")
        return result

    async def _py_spy(self, pid: int) -> Child | None:
        target = self.opts.py_spy
        if target is None:
            return None
        venv_bin = str(Path(sys.executable).parent)
        exe = shutil.which("py-spy") or shutil.which("py-spy", path=venv_bin)
        if exe is None:
            raise BenchError("--py-spy: py-spy is not installed (pip install py-spy)")
        fmt = {".svg": "flamegraph", ".txt": "raw"}.get(target.suffix, "speedscope")
        argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--format", fmt]
        argv += ["--output", str(target.resolve()), "--nonblocking"]
        return await self.children.start("py-spy", argv, env=dict(os.environ))


def _budget(load: Load) -> float:
    """A bound on how long `load` may take to publish or to ingest (20k readings/s at worst)."""
    return max(120.0, load.readings / 20_000)


def ingester_env(
    stack: dict[str, str], db: Scratch, opts: Options, *, prefix: str, port: int
) -> dict[str, str]:
    env = {k: v for k, v in default_filters(opts.hz).items() if k not in os.environ}
    env.update({k: v for k, v in os.environ.items() if k not in _CONTROLLED})
    env.update(
        {
            "INGEST_DB_URL": db.ingest_url,
            "INGEST_MQTT_URL": stack["INGEST_MQTT_URL"],
            "INGEST_MQTT_TOPIC_PREFIX": prefix,
            "INGEST_MQTT_CLIENT_ID": f"bench-e2e-{uuid.uuid4().hex[:8]}",
            # Long enough to hold the backlog between two ingester processes, then forgotten.
            "INGEST_MQTT_SESSION_EXPIRY_S": "600",
            "INGEST_METRICS_HOST": "127.0.0.1",
            "INGEST_METRICS_PORT": str(port),
            **opts.ingest_env,
        }
    )
    return env


async def run(opts: Options) -> Results:
    stack = _stack_env()
    wall = time.monotonic()
    res = Results(started=datetime.now(UTC).isoformat(timespec="seconds"))
    with tempfile.TemporaryDirectory(prefix="ingest-e2e-") as tmp:
        children = Children(Path(tmp))
        try:
            async with scratch_database(stack, keep=opts.keep_database) as db:
                bench = Bench(opts, stack, db, children)
                await _run_phases(bench, res, Path(tmp))
        finally:
            await children.stop_all()
    res.seconds = time.monotonic() - wall
    _add_notes(res)
    return res


async def _run_phases(bench: Bench, res: Results, folder: Path) -> None:
    opts, db, cfg = bench.opts, bench.db, bench.cfg
    main = bench.load(opts.readings)
    # The later phases' sizes follow from the measured rate; give them room in simulated time.
    half_room = bench.load(2_000_000 * opts.latency_seconds)
    spans = main.span_us + half_room.span_us + (main.span_us if opts.backlog else 0)
    start_us = (time.time_ns() // 1000 - spans - _HOUR_US) // _HOUR_US * _HOUR_US
    res.machine = await _machine(db)
    res.settings = {
        "readings": main.readings,
        "format": opts.fmt,
        "devices": len(bench.devices),
        "sensors": bench.sensors,
        "samples_per_channel_per_message": opts.batch,
        "readings_per_message": main.readings // (main.steps * len(bench.devices)),
        "hz": opts.hz,
        "publisher_processes": opts.processes,
        "first_reading": _iso(start_us),
        "flush": msgspec.to_builtins(cfg.flush),
        "mqtt_receive_maximum": cfg.mqtt.receive_maximum,
        "rollups": cfg.rollups.enabled,
        "anomaly_rules": msgspec.to_builtins(cfg.anomaly.rules),
        "ingest_env": opts.ingest_env,
    }
    _say(
        f"{main.readings:,} readings, {opts.fmt}, {len(bench.devices)} devices, {bench.sensors} "
        f"sensors, {opts.batch} samples per channel per message; database {db.name}"
    )

    # The load's rows, recorded by the publishers on a topic nobody subscribes to.
    record = folder / "load"
    recorder = await bench.publisher(
        "publishers (recording)",
        prefix=f"bench-{bench.run_id}/nobody",
        start_us=start_us,
        load=main,
        processes=opts.processes,
        record=record,
    )
    res.publishers["alone_readings_per_s"] = await bench.finish(recorder, timeout=_budget(main))
    _say(f"publishers, nobody subscribed: {res.publishers['alone_readings_per_s']:,.0f} readings/s")
    res.decode = measure_decode(opts.fmt, Path(f"{record}.0"), opts.batch)

    # 1. The limit.
    paths = [p for i in range(opts.processes) if (p := Path(f"{record}.{i}")).exists()]
    slabs, total = recorded_slabs(paths, slab=cfg.flush.max_readings)
    if total != main.readings:
        raise BenchError(f"recorded {total:,} readings, {main.readings:,} expected")
    res.limit = await bench.limit(slabs, total)
    del slabs
    _say(f"limit, direct COPY: {res.limit['readings_per_s']:,.0f} readings/s")

    # 2. The ingester, sustained, with the publishers running alongside.
    await _checkpoint(db)
    ingester = await Ingester(bench.env, bench.port).spawn(bench.children)
    await ingester.ready()
    idle_rss_mb = ingester.memory_mb()["rss_mb"]
    res.sustained = await bench.sustained(ingester, start_us=start_us, load=main)
    rate = res.sustained["readings_per_s"]
    _say(
        f"ingester, sustained: {rate:,.0f} readings/s ({res.sustained['bound']}-bound), "
        f"{res.sustained['cpu_s_per_million']:.2f} CPU-s per million readings"
    )

    # 3. Latency at half that rate. Vacuum first: an autovacuum of the chunk just filled would
    # otherwise land in this short window or not, by chance (see the notes for any that did).
    await _sql(db.owner_url, "VACUUM (ANALYZE) telemetry.readings")
    await _checkpoint(db)
    half = bench.load(min(rate / 2 * opts.latency_seconds, half_room.readings))
    next_us = start_us + main.span_us
    res.half_load = await bench.half_load(ingester, start_us=next_us, load=half, rate=rate / 2)
    _say(
        f"half load, {res.half_load['readings_per_s']:,.0f} readings/s: p50 "
        f"{_ms(res.half_load['p50_s'])}, p99 {_ms(res.half_load['p99_s'])}"
    )
    res.ingester = {**ingester.memory_mb(), "rss_when_ready_mb": idle_rss_mb}
    expected = main.readings + half.readings

    # 4. Optionally: a broker backlog drained by a fresh ingester process, no publisher running.
    if opts.backlog:
        next_us += half_room.span_us
        res.backlog = await bench.backlog(ingester, start_us=next_us, load=main)
        expected += main.readings
        _say(f"ingester, draining a backlog: {res.backlog['readings_per_s']:,.0f} readings/s")
    await ingester.stop()
    stored = await _sql(db.owner_url, "SELECT count(*) FROM telemetry.readings", value=True)
    if stored != expected:
        raise BenchError(f"telemetry.readings holds {stored:,} rows, {expected:,} were sent")
    res.notes += await _maintenance_notes(db, res)
    for table in ("rollup_1m", "rollup_1h", "anomalies"):
        res.derived[table] = await _sql(
            db.owner_url, f"SELECT count(*) FROM telemetry.{table}", value=True
        )

    # 5. The naive baseline.
    res.naive = await bench.naive(start_us=start_us)
    _say(f"naive bridge: {res.naive['readings_per_s']:,.0f} readings/s")


async def _maintenance_notes(db: Scratch, res: Results) -> list[str]:
    """Autovacuum or autoanalyze runs of the database's tables that ended during a phase."""
    conn = await asyncpg.connect(db.owner_url, timeout=30)
    try:
        rows = await conn.fetch(
            "SELECT relname, n_tup_ins, last_autovacuum, last_autoanalyze "
            "FROM pg_stat_all_tables WHERE schemaname IN ('_timescaledb_internal', 'telemetry')"
        )
    finally:
        await conn.close()
    phases = {"sustained": res.sustained, "half-load": res.half_load, "backlog": res.backlog}
    notes = []
    for name, phase in phases.items():
        if not phase:
            continue
        lo, hi = (datetime.fromisoformat(t) for t in phase["window_utc"])
        for row in rows:
            for what in ("autovacuum", "autoanalyze"):
                at = row[f"last_{what}"]
                if at is not None and lo <= at <= hi and row["n_tup_ins"] >= 100_000:
                    notes.append(
                        f"an {what} of {row['relname']} ({row['n_tup_ins']:,} rows inserted) "
                        f"ended {(at - lo).total_seconds():.1f} s into the {name} phase"
                    )
    return notes


async def _machine(db: Scratch) -> dict[str, Any]:
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


def _say(text: str) -> None:
    print(f"e2e: {text}", file=sys.stderr, flush=True)


def _add_notes(res: Results) -> None:
    sus, half = res.sustained, res.half_load
    if sus["bound"] == "publishers":
        res.notes.append(
            "publisher-bound: the ingester kept up with the publishers "
            f"({sus['publishers_readings_per_s']:,.0f} readings/s), so the sustained figure is a "
            "lower bound of what it can take"
        )
    if not any(res.derived.values()):
        res.notes.append(
            "no rollup or anomaly rows were written: rollups and anomaly filters were not active "
            "in the ingester under test (this build, or its configuration)"
        )
    if half["readings_per_s"] < 0.9 * half["target_readings_per_s"]:
        res.notes.append(
            f"the half-load phase ran at {half['readings_per_s']:,.0f} of the "
            f"{half['target_readings_per_s']:,.0f} readings/s asked"
        )
    if res.machine["load_average_at_start"][0] > 0.5:
        res.notes.append(
            f"the machine was not idle at the start (load average "
            f"{res.machine['load_average_at_start'][0]}): see 'other processes' in the CPU lines"
        )


# ------------------------------------------------------------------------------ report


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    value: str
    target: str
    met: bool | None


def targets(res: Results) -> list[Target]:
    sus, half, compact = res.sustained, res.half_load, res.settings["format"] == "compact"
    rate = sus["readings_per_s"]
    vs_limit = rate / res.limit["readings_per_s"]
    vs_naive = rate / max(res.naive["readings_per_s"], 1e-9)
    cpu = sus["cpu_s_per_million"]
    peak = max(res.ingester["peak_rss_mb"], res.backlog.get("peak_rss_mb", 0.0))
    rows = [
        Target("sustained / direct-COPY limit", f"{vs_limit:.2f}", ">= 0.90", vs_limit >= 0.9),
        Target("sustained / naive baseline", f"{vs_naive:,.0f}x", ">= 100x", vs_naive >= 100),
        Target(
            f"ingester CPU per million readings, sustained ({res.settings['format']})",
            f"{cpu:.2f} core-s",
            "<= 0.5 core-s (compact)",
            cpu <= 0.5 if compact else None,
        ),
        Target(
            "p99 publish-to-commit at half load",
            f"{_ms(half['p99_s'])} (bucket {_bucket(half['p99_bucket_s'])}); "
            f"{half['within_250ms']:.1%} within 250 ms",
            "<= 250 ms",
            half["within_250ms"] >= 0.99,
        ),
        Target(
            "p50 publish-to-commit at half load",
            f"{_ms(half['p50_s'])} (bucket {_bucket(half['p50_bucket_s'])})",
            "-",
            None,
        ),
        Target("ingester peak RSS", f"{peak:.0f} MB", "<= 300 MB", peak <= 300),
    ]
    for name, dec in res.decode.items():
        value = dec["readings_per_s_per_core"] / 1e6
        rows.append(
            Target(
                f"decode {res.settings['format']}, {name}",
                f"{value:.1f} M readings/s/core",
                ">= 20 M/s/core (compact)",
                value >= 20 if compact else None,
            )
        )
    return rows


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.0f} ms"


def _bucket(bounds: list[float]) -> str:
    lo, hi = bounds
    if math.isnan(lo):
        return "n/a"
    return f"{lo * 1e3:g}-{hi * 1e3:g} ms" if not math.isinf(hi) else f"> {lo * 1e3:g} ms"


def _cpu_line(cpu: dict[str, float]) -> str:
    parts = [f"{k} {v:.1f}" for k, v in cpu.items() if k not in ("machine", "wall")]
    cores = cpu["machine"] / max(cpu["wall"], 1e-9)
    return (
        f"{cpu['machine']:.1f} core-s busy in {cpu['wall']:.1f} s ({cores:.2f} of "
        f"{os.cpu_count()} cores): " + ", ".join(parts)
    )


def _ceiling(phase: dict[str, Any]) -> str:
    """What the machine allows at the phase's measured CPU cost, every process counted."""
    cores = os.cpu_count() or 1
    per_reading = phase["cpu"]["machine"] / phase["readings"]
    return (
        f"All processes together spent {per_reading * 1e6:.2f} core-µs per reading: at that "
        f"cost the {cores} cores allow at most {cores / per_reading:,.0f} readings/s."
    )


def render_markdown(res: Results) -> str:
    m, s, sus, limit, naive = res.machine, res.settings, res.sustained, res.limit, res.naive
    half, back = res.half_load, res.backlog
    rate, lim = sus["readings_per_s"], limit["readings_per_s"]
    naive_rate = max(naive["readings_per_s"], 1e-9)
    out = [
        f"# End-to-end benchmark, {res.started}",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, load average at "
        f"start {m['load_average_at_start'][0]}; PostgreSQL {m['postgresql']}, TimescaleDB "
        f"{m['timescaledb']}; Python {m['python']}; ingest {m['ingest']} (git {m['git']}).",
        "",
        f"Load: {s['readings']:,} readings, {s['format']}, {s['devices']} devices, "
        f"{s['sensors']} sensors, {s['samples_per_channel_per_message']} samples per channel per "
        f"message ({s['readings_per_message']} readings), {s['publisher_processes']} publisher "
        f"processes; flush at {s['flush']['max_readings']:,} readings or "
        f"{s['flush']['interval_s']} s. Whole run {res.seconds:.0f} s.",
        "",
        "| measurement | readings/s | ratio |",
        "|---|---:|---:|",
        f"| limit: binary COPY by one writer, {limit['slab_readings']:,}-reading slabs sorted by "
        f"(sensor, time) | {lim:,.0f} | 1.00 |",
        f"| ingester end to end, sustained, publishers alongside ({sus['bound']}-bound) | "
        f"{rate:,.0f} | {rate / lim:.2f} of limit |",
    ]
    if back:
        out.append(
            f"| ingester end to end, draining a broker backlog, no publisher running | "
            f"{back['readings_per_s']:,.0f} | {back['readings_per_s'] / lim:.2f} of limit |"
        )
    out += [
        f"| naive bridge: one INSERT per reading, commit per message | {naive_rate:,.0f} | "
        f"ours {rate / naive_rate:,.0f}x |",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    for t in targets(res):
        met = "-" if t.met is None else ("yes" if t.met else "**no**")
        out.append(f"| {t.name} | {t.value} | {t.target} | {met} |")
    bounds = ", ".join(f"{b * 1e3:g}" for b in half["bucket_bounds_s"])
    out += [
        "",
        "Details:",
        "",
        f"- Publishers: {res.publishers['alone_readings_per_s']:,.0f} readings/s with nobody "
        f"subscribed, {sus['publishers_readings_per_s']:,.0f} readings/s alongside the ingester "
        "(both including their processes' start); backlog when they finished: "
        f"{sus['backlog_at_publishers_end']:,.0f} readings.",
        f"- Sustained: {sus['commit_window_s']:.1f} s from first to last commit, "
        f"{sus['flushes']:.0f} flushes; the ingester used {sus['cpu_cores']:.2f} cores; its "
        f"writer was in a flush transaction {sus['writer_busy']:.0%} of the time, in COPY "
        f"{sus['copy_busy']:.0%}. Machine CPU: {_cpu_line(sus['cpu'])}. "
        f"{_ceiling(sus)}",
        f"- Half load: {half['readings_per_s']:,.0f} readings/s committed (asked "
        f"{half['target_readings_per_s']:,.0f}), {half['count']:,.0f} messages, "
        f"{half['flushes']:.0f} flushes (p50 {_ms(half['flush_p50_s'])}, p99 "
        f"{_ms(half['flush_p99_s'])} from first read to commit); ingester "
        f"{half['cpu_s_per_million']:.2f} core-s per million readings. Publish-to-commit is per "
        "message, from the ingest_publish_to_commit_seconds histogram, linear within a bucket "
        f"(bounds {bounds} ms). Machine CPU: {_cpu_line(half['cpu'])}.",
        f"- Ingester memory: peak RSS {res.ingester['peak_rss_mb']:.0f} MB (VmHWM, whole life); "
        f"{res.ingester['rss_when_ready_mb']:.0f} MB when ready, {res.ingester['rss_mb']:.0f} MB "
        "after the half-load phase.",
        f"- Filters: rollups {'on' if s['rollups'] else 'off'}, {len(s['anomaly_rules'])} anomaly "
        "rule(s)" + (f" ({_rule_text(s['anomaly_rules'][0])})" if s["anomaly_rules"] else "") + ".",
    ]
    if back:
        out.append(
            f"- Backlog: {back['readings']:,} readings drained in {back['commit_window_s']:.1f} s "
            f"by a new ingester process, {back['cpu_s_per_million']:.2f} core-s per million "
            f"readings, peak RSS {back['peak_rss_mb']:.0f} MB; writer in a flush transaction "
            f"{back['writer_busy']:.0%} of the time. Machine CPU: {_cpu_line(back['cpu'])}."
        )
    out += [
        f"- Naive bridge: {naive['readings']:,} readings in {naive['messages']:,} messages over "
        f"{naive['seconds']:.1f} s, {naive['cpu_s']:.1f} CPU-s.",
        "- Derived rows written by the ingester: "
        + ", ".join(f"{k} {v:,}" for k, v in res.derived.items())
        + ".",
    ]
    out += [f"- Note: {note}." for note in res.notes]
    return "\n".join(out) + "\n"


def _rule_text(rule: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in rule.items()
        if v is not None
    )


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_results(res: Results, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = res.started.replace("+00:00", "Z").replace(":", "")
    doc = msgspec.to_builtins(res)
    doc["targets"] = msgspec.to_builtins(targets(res))
    json_path, md_path = out / f"e2e-{stamp}.json", out / f"e2e-{stamp}.md"
    json_path.write_text(json.dumps(_finite(doc), indent=2) + "\n")
    markdown = render_markdown(res)
    md_path.write_text(markdown)
    (out / "latest.md").write_text(markdown)
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
        # The limit's writer runs here: it gets the allocator settings `ingest run` uses.
        memory.keep_freed_memory()
        if opts.shape == "wide":
            from benchmarks.wide import run_wide  # it builds on this module's phases

            return run_wide(opts)
        res = asyncio.run(run(opts))
        paths = write_results(res, opts.out)
    except BenchError as exc:
        print(f"e2e: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"e2e: the ingester's configuration: {exc}", file=sys.stderr)
        return 1
    except (IngestError, asyncpg.PostgresError, OSError) as exc:
        print(f"e2e: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("e2e: interrupted; its child processes were stopped", file=sys.stderr)
        return 130
    print(render_markdown(res))
    print(f"e2e: wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
