"""`--instances N`: N `ingest run` processes on one shared subscription, the same stream.

One run on the local stack, in a scratch database, settings as the default run's (rollups
and every anomaly filter on): the load is recorded and its rows COPYed by one writer (the
limit, as in the default run); then N ingesters join one share group (`mqtt.share_group`),
each with its own client id and metrics port, and unpaced publishers send the load. Reported:
the total rate between the first and the last commit of any instance and its ratio to the
limit, each instance's share, CPU-s per million readings it wrote, writer time and database
retries, and lock waits. Lock waits are sampled: every 50 ms a query of pg_stat_activity
counts the `ingest` role's sessions of the run's database and those waiting on a heavyweight
lock (wait_event_type 'Lock'), by wait event; each observation stands for one interval of one
session's time. Deadlocks are pg_stat_database's counter for the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import msgspec

from benchmarks.e2e import BenchError, say
from benchmarks.e2e.baselines import bench_database, checkpoint, value
from benchmarks.e2e.load import HOUR_US, Load, budget
from benchmarks.e2e.measure import machine, proc_cpu_s
from benchmarks.e2e.options import Options
from benchmarks.e2e.processes import WRITTEN, Children, stop_ingester
from benchmarks.e2e.report import cpu_line, finite
from benchmarks.e2e.run import Bench, settings
from tests.support.cluster import Database, admin_dsn
from tests.support.ingester import Ingester, metric_sum
from tests.support.net import free_port
from tests.support.process import Child

_POLL_S = 0.5
_LOCK_POLL_S = 0.05
_REJECTED = ("ingest_dead_letters_total", "ingest_readings_duplicate_total")


@dataclass(slots=True)
class InstancesResults:
    started: str
    instances: int
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    publishers: dict[str, Any] = field(default_factory=dict)
    limit: dict[str, Any] = field(default_factory=dict)
    total: dict[str, Any] = field(default_factory=dict)
    each: list[dict[str, Any]] = field(default_factory=list)
    locks: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ lock waits


class LockSampler:
    """Samples pg_stat_activity for the `ingest` role's sessions of one database until
    stopped: how many there were, how many were busy, how many waited on a lock (and which)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.samples = 0
        self.busy = 0  # session observations not idle
        self.waiting = 0  # session observations with wait_event_type 'Lock'
        self.most_waiting = 0
        self.events: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._seconds = 0.0
        self._deadlocks = 0

    async def __aenter__(self) -> LockSampler:
        self._deadlocks = await self._deadlock_count()
        self._task = asyncio.create_task(self._run(), name="lock sampler")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _deadlock_count(self) -> int:
        count: int = await value(
            admin_dsn(self.db.name),
            f"SELECT deadlocks FROM pg_stat_database WHERE datname = '{self.db.name}'",
        )
        return count

    async def _run(self) -> None:
        conn = await asyncpg.connect(admin_dsn(self.db.name), timeout=30)
        started = time.monotonic()
        try:
            while True:
                rows = await conn.fetch(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
                    " WHERE datname = current_database() AND usename = 'ingest'"
                )
                self.samples += 1
                self.busy += sum(1 for r in rows if r["state"] not in (None, "idle"))
                locked = [r["wait_event"] for r in rows if r["wait_event_type"] == "Lock"]
                self.waiting += len(locked)
                self.most_waiting = max(self.most_waiting, len(locked))
                self.events.update(locked)
                self._seconds = time.monotonic() - started
                await asyncio.sleep(_LOCK_POLL_S)
        finally:
            await conn.close()

    async def result(self) -> dict[str, Any]:
        interval = self._seconds / max(1, self.samples - 1)
        return {
            "method": "pg_stat_activity sampled every "
            f"{_LOCK_POLL_S * 1000:.0f} ms: sessions of the ingest role in the run's database",
            "samples": self.samples,
            "sampled_s": round(self._seconds, 2),
            "interval_s": interval,
            "busy_observations": self.busy,
            "lock_wait_observations": self.waiting,
            "lock_wait_share_of_busy": self.waiting / self.busy if self.busy else math.nan,
            "lock_wait_s_estimate": self.waiting * interval,
            "most_waiting_at_once": self.most_waiting,
            "by_wait_event": dict(self.events.most_common()),
            "deadlocks": await self._deadlock_count() - self._deadlocks,
        }


# ------------------------------------------------------------------------------ polling


class Poll(NamedTuple):
    at: float
    written: list[float]
    commit: float  # the latest commit of any instance, unix time
    cpu: list[float]
    flush_s: list[float]
    retries: list[float]


async def _poll(ingesters: list[Ingester]) -> tuple[Poll, list[dict[str, float]]]:
    metrics = [await i.metrics() for i in ingesters]
    poll = Poll(
        time.monotonic(),
        [metric_sum(m, WRITTEN) for m in metrics],
        max(metric_sum(m, "ingest_last_commit_timestamp_seconds") for m in metrics),
        [proc_cpu_s(i.pid) for i in ingesters],
        [metric_sum(m, "ingest_flush_duration_seconds_sum") for m in metrics],
        [metric_sum(m, "ingest_db_retries_total") for m in metrics],
    )
    return poll, metrics


async def drive_all(
    ingesters: list[Ingester],
    readings: int,
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline
    publisher: Child,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll every instance until they wrote `readings` between them (they start from zero).
    The total and each instance's figures between the first and the last poll that saw a
    commit."""
    polls: list[Poll] = []
    pub_end_written: float | None = None
    began = datetime.now(UTC)
    deadline = time.monotonic() + timeout
    while True:
        poll, metrics = await _poll(ingesters)
        polls.append(poll)
        bad = {k: v for m in metrics for k, v in m.items() if v > 0 and k.startswith(_REJECTED)}
        if bad:
            raise BenchError(f"an ingester rejected or skipped part of the load: {bad}")
        code = publisher.proc.returncode if publisher.proc else None
        if code not in (None, 0):
            publisher.check_alive()
        if code == 0 and pub_end_written is None:
            pub_end_written = sum(poll.written)
        if sum(poll.written) >= readings:
            break
        if time.monotonic() > deadline:
            raise BenchError(
                f"the ingesters wrote {sum(poll.written):,.0f} of {readings:,} readings "
                f"within {timeout:.0f}s"
            )
        await asyncio.sleep(_POLL_S)
    progress = [p for p in polls if sum(p.written) > 0]
    a, b = progress[0], progress[-1]
    window = b.commit - a.commit
    n = sum(b.written) - sum(a.written)
    ok = window > 0 and n > 0
    cpu = [y - x for x, y in zip(a.cpu, b.cpu, strict=True)]
    total = {
        "window_utc": [began.isoformat(), datetime.now(UTC).isoformat()],
        "readings": readings,
        "readings_per_s": n / window if ok else math.nan,
        "commit_window_s": window,
        "cpu_s_per_million": sum(cpu) / n * 1e6 if ok else math.nan,
        "backlog_at_publishers_end": readings - (pub_end_written or readings),
    }
    each = []
    for k in range(len(ingesters)):
        wrote = b.written[k] - a.written[k]
        each.append(
            {
                "readings": wrote,
                "share": wrote / n if n else math.nan,
                "cpu_s": cpu[k],
                "cpu_s_per_million": cpu[k] / wrote * 1e6 if wrote > 0 else math.nan,
                "cpu_cores": cpu[k] / (b.at - a.at) if b.at > a.at else math.nan,
                "writer_busy": (b.flush_s[k] - a.flush_s[k]) / window if ok else math.nan,
                "db_retries": b.retries[k] - a.retries[k],
            }
        )
    return total, each


# ------------------------------------------------------------------------------ the run


async def _phases(bench: Bench, res: InstancesResults, folder: Path) -> None:
    opts, db, n = bench.opts, bench.db, res.instances
    main = bench.load(opts.readings)
    start_us = (time.time_ns() // 1000 - main.span_us - HOUR_US) // HOUR_US * HOUR_US
    res.machine = await machine(db)
    res.settings = {**settings(bench, main, start_us), "instances": n}
    say(
        f"{_ingesters(n)} on one share group; {main.readings:,} readings, {bench.sensors} "
        f"sensors; database {db.name}"
    )
    alone, record = await bench.record(main, start_us=start_us, folder=folder)
    res.publishers["alone_readings_per_s"] = alone
    res.limit = await bench.limit(record, main)
    say(f"limit, direct COPY: {res.limit['readings_per_s']:,.0f} readings/s")

    await checkpoint(db)
    group = f"bench{bench.run_id}"
    ingesters = []
    for k in range(1, n + 1):
        env = {
            **bench.env,
            "INGEST_MQTT_SHARE_GROUP": group,
            "INGEST_MQTT_CLIENT_ID": f"bench-e2e-{bench.run_id}-{k}",
        }
        ingesters.append(await bench.spawn(port=free_port(), env=env))
    for ingester in ingesters:
        await ingester.wait_ready(timeout=180)
    res.total, res.each = await _sustained(bench, ingesters, start_us=start_us, load=main)
    for each, ingester in zip(res.each, ingesters, strict=True):
        each.update(ingester.memory_mb())
    await asyncio.gather(*(stop_ingester(i) for i in ingesters))
    say(
        f"{_ingesters(n)}: {res.total['readings_per_s']:,.0f} readings/s in total, CPU-s per "
        "million readings " + ", ".join(f"{e['cpu_s_per_million']:.2f}" for e in res.each)
    )
    stored = await value(db.owner_url, "SELECT count(*) FROM telemetry.readings")
    if stored != main.readings:
        raise BenchError(f"telemetry.readings holds {stored:,} rows, {main.readings:,} were sent")
    for table in ("rollup_1m", "rollup_1h", "anomalies"):
        res.derived[table] = await value(db.owner_url, f"SELECT count(*) FROM telemetry.{table}")


async def _sustained(
    bench: Bench, ingesters: list[Ingester], *, start_us: int, load: Load
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    account = bench.account(*ingesters)
    async with LockSampler(bench.db) as locks:
        publisher = await bench.publisher(
            "publishers",
            prefix=bench.prefix,
            start_us=start_us,
            load=load,
            processes=bench.opts.processes,
        )
        total, each = await drive_all(
            ingesters, load.readings, timeout=budget(load), publisher=publisher
        )
    total["publishers_readings_per_s"] = await bench.finish(publisher, timeout=60)
    total["cpu"] = account.stop()
    total["locks"] = await locks.result()
    bound = total["backlog_at_publishers_end"] > 2 * bench.cfg.flush.max_readings
    total["bound"] = "ingesters" if bound else "publishers"
    return total, each


def _ingesters(n: int) -> str:
    return f"{n} ingester{'s' if n > 1 else ''}"


def render(res: InstancesResults) -> str:
    m, s, t, lim, lk = res.machine, res.settings, res.total, res.limit, res.total["locks"]
    rate, limit = t["readings_per_s"], lim["readings_per_s"]
    events = ", ".join(f"{k} {v}" for k, v in lk["by_wait_event"].items()) or "none"
    out = [
        f"# End-to-end benchmark, {_ingesters(res.instances)} on one share group, {res.started}",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, load average at "
        f"start {m['load_average_at_start'][0]}; PostgreSQL {m['postgresql']}, TimescaleDB "
        f"{m['timescaledb']}; Python {m['python']}; ingest {m['ingest']} (git {m['git']}).",
        "",
        f"Load: {s['readings']:,} readings, {s['format']}, {s['sensors']} sensors, "
        f"{s['readings_per_message']} readings per message, {s['publisher_processes']} "
        f"publisher processes; rollups {'on' if s['rollups'] else 'off'}, "
        f"{len(s['anomaly_rules'])} anomaly rule(s). Whole run {res.seconds:.0f} s.",
        "",
        "| measurement | readings/s | ratio |",
        "|---|---:|---:|",
        f"| limit: binary COPY by one writer, {lim['slab_readings']:,}-reading slabs | "
        f"{limit:,.0f} | 1.00 |",
        f"| {_ingesters(res.instances)} on one share group, total, sustained "
        f"({t['bound']}-bound) | {rate:,.0f} | {rate / limit:.2f} of limit |",
        "",
        "| instance | share of readings | CPU-s per million readings | cores | writer busy | "
        "database retries | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, e in enumerate(res.each, 1):
        out.append(
            f"| {k} | {e['share']:.0%} | {e['cpu_s_per_million']:.2f} | {e['cpu_cores']:.2f} | "
            f"{e['writer_busy']:.0%} | {e['db_retries']:.0f} | {e['peak_rss_mb']:.0f} MB |"
        )
    out += [
        f"| all | 100% | {t['cpu_s_per_million']:.2f} | | | | |",
        "",
        f"- Lock waits: {lk['method']}; {lk['samples']:,} samples over {lk['sampled_s']:.1f} s: "
        f"{lk['lock_wait_observations']:,} observations of a session waiting on a lock out of "
        f"{lk['busy_observations']:,} of a busy session ({lk['lock_wait_share_of_busy']:.1%}), "
        f"about {lk['lock_wait_s_estimate']:.2f} session-seconds, at most "
        f"{lk['most_waiting_at_once']} at once; by wait event: {events}. Deadlocks "
        f"(pg_stat_database): {lk['deadlocks']}.",
        f"- Sustained: {t['commit_window_s']:.1f} s from the first to the last commit; "
        f"publishers {t['publishers_readings_per_s']:,.0f} readings/s alongside, backlog when "
        f"they finished {t['backlog_at_publishers_end']:,.0f} readings. Machine CPU: "
        f"{cpu_line(t['cpu'])}.",
        "- Derived rows: " + ", ".join(f"{k} {v:,}" for k, v in res.derived.items()) + ".",
    ]
    return "\n".join(out) + "\n"


async def _run(opts: Options, res: InstancesResults, folder: Path) -> None:
    children = Children(folder)
    try:
        async with bench_database(keep=opts.keep_database) as db:
            await _phases(Bench(opts, db, children), res, folder)
    finally:
        await children.stop_all()


def run_instances(opts: Options) -> int:
    """`python -m benchmarks.e2e --instances N`: run, print the table, write JSON and Markdown."""
    assert opts.instances is not None
    res = InstancesResults(
        started=datetime.now(UTC).isoformat(timespec="seconds"), instances=opts.instances
    )
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ingest-instances-") as tmp:
        asyncio.run(_run(opts, res, Path(tmp)))
    res.seconds = time.monotonic() - wall
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = res.started.replace("+00:00", "Z").replace(":", "")
    name = f"e2e-instances-{res.instances}-{stamp}"
    doc = finite(msgspec.to_builtins(res))
    (opts.out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = render(res)
    (opts.out / f"{name}.md").write_text(text)
    print(text)
    return 0
