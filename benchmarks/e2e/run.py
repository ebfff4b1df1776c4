"""The default run's phases: the recorded load, the limit, the ingester sustained and at half
load (and draining a backlog with `--backlog`), then the naive bridge."""

from __future__ import annotations

import math
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from benchmarks.e2e import BenchError, say
from benchmarks.e2e.baselines import (
    bench_database,
    checkpoint,
    direct_copy,
    naive_bridge,
    value,
)
from benchmarks.e2e.load import (
    HOUR_US,
    Load,
    budget,
    finish_publishers,
    iso,
    measure_decode,
    recorded_slabs,
    start_publishers,
)
from benchmarks.e2e.measure import CpuAccount, machine
from benchmarks.e2e.options import Options
from benchmarks.e2e.processes import (
    Children,
    drive,
    ingester_env,
    latency,
    spawn_ingester,
    start_py_spy,
    stop_ingester,
    stop_py_spy,
)
from benchmarks.e2e.report import Results, add_notes, ms
from ingest import config as ingest_config
from ingest.sim.plant import load_plant
from tests.support.cluster import Database, execute
from tests.support.ingester import Ingester
from tests.support.net import free_port
from tests.support.process import Child
from tests.support.stack import stack_var


class Bench:
    """One run: options, scratch database, child processes, the plant and the ingester's setup."""

    def __init__(self, opts: Options, db: Database, children: Children) -> None:
        self.opts, self.db, self.children = opts, db, children
        self.url = stack_var("INGEST_MQTT_URL")
        self.run_id = uuid.uuid4().hex[:8]
        devices = load_plant(str(opts.plant) if opts.plant else None)
        self.devices = devices[: opts.devices] if opts.devices else devices
        self.sensors = sum(len(d.sensors) for d in self.devices)
        self.prefix = f"bench-{self.run_id}/telemetry"
        self.port = free_port()
        self.env = ingester_env(opts, db, mqtt_url=self.url, prefix=self.prefix)
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
        return await start_publishers(
            self.children,
            self.opts,
            name,
            url=self.url,
            prefix=prefix,
            start_us=start_us,
            load=load,
            processes=processes,
            rate=rate,
            record=record,
        )

    async def finish(self, child: Child, *, timeout: float) -> float:  # noqa: ASYNC109
        """Wait for a publisher; returns its readings/s."""
        return await finish_publishers(child, timeout=timeout)

    async def spawn(
        self, *, port: int | None = None, env: dict[str, str] | None = None
    ) -> Ingester:
        """A new `ingest run` with the run's settings (or `env`), on the run's metrics port."""
        return await spawn_ingester(self.children, env or self.env, port=port or self.port)

    def account(self, *ingesters: Ingester) -> CpuAccount:
        """CPU accounting from now: each ingester by name, other children by their group."""
        names = {i.pid: "ingester" for i in ingesters}
        if len(ingesters) > 1:
            names = {i.pid: f"ingester {n}" for n, i in enumerate(ingesters, 1)}
        groups = {c.pid: c.name for c in self.children.running() if c.pid not in names}
        return CpuAccount(database=self.db.name, ingesters=names, children=groups)

    async def record(self, load: Load, *, start_us: int, folder: Path) -> tuple[float, Path]:
        """Publish `load` on a topic nobody subscribes to, recording its rows: the publishers'
        rate alone, and where the recording went (`<path>.<n>`, one file per process)."""
        record = folder / "load"
        recorder = await self.publisher(
            "publishers (recording)",
            prefix=f"bench-{self.run_id}/nobody",
            start_us=start_us,
            load=load,
            processes=self.opts.processes,
            record=record,
        )
        return await self.finish(recorder, timeout=budget(load)), record

    async def limit(self, record: Path, load: Load) -> dict[str, Any]:
        """The recorded rows COPYed by one writer, in slabs of the ingester's flush size."""
        paths = [p for i in range(self.opts.processes) if (p := Path(f"{record}.{i}")).exists()]
        slabs, total = recorded_slabs(paths, slab=self.cfg.flush.max_readings)
        if total != load.readings:
            raise BenchError(f"recorded {total:,} readings, {load.readings:,} expected")
        return await direct_copy(self.db, slabs, total)

    async def sustained(self, ingester: Ingester, *, start_us: int, load: Load) -> dict[str, Any]:
        """Unpaced publishers alongside the running ingester."""
        before = await ingester.metrics()
        account = self.account(ingester)
        spy = await start_py_spy(self.children, self.opts.py_spy, ingester.pid)
        publisher = await self.publisher(
            "publishers",
            prefix=self.prefix,
            start_us=start_us,
            load=load,
            processes=self.opts.processes,
        )
        out, _ = await drive(
            ingester, before, load.readings, timeout=budget(load), publisher=publisher
        )
        out["publishers_readings_per_s"] = await self.finish(publisher, timeout=60)
        out["cpu"] = account.stop()
        await stop_py_spy(spy)
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

    async def backlog(
        self, ingester: Ingester, *, start_us: int, load: Load
    ) -> tuple[dict[str, Any], Ingester]:
        """Stop the ingester, publish `load` into its broker session, start a new ingester
        process with the same client id and let it drain; the figures and the new process."""
        await stop_ingester(ingester)
        publisher = await self.publisher(
            "publishers (backlog)",
            prefix=self.prefix,
            start_us=start_us,
            load=load,
            processes=self.opts.processes,
        )
        await self.finish(publisher, timeout=budget(load))
        await checkpoint(self.db)
        ingester = await self.spawn()
        await ingester.wait_ready(path="/healthz", timeout=180)
        account = self.account(ingester)
        out, _ = await drive(ingester, {}, load.readings, timeout=budget(load))
        out["cpu"] = account.stop()
        out.update(ingester.memory_mb())
        return out, ingester


async def run(opts: Options) -> Results:
    wall = time.monotonic()
    res = Results(started=datetime.now(UTC).isoformat(timespec="seconds"))
    with tempfile.TemporaryDirectory(prefix="ingest-e2e-") as tmp:
        children = Children(Path(tmp))
        try:
            async with bench_database(keep=opts.keep_database) as db:
                bench = Bench(opts, db, children)
                await _run_phases(bench, res, Path(tmp))
        finally:
            await children.stop_all()
    res.seconds = time.monotonic() - wall
    add_notes(res)
    return res


def settings(bench: Bench, main: Load, start_us: int) -> dict[str, Any]:
    """The run's settings, as the report lists them."""
    opts, cfg = bench.opts, bench.cfg
    return {
        "readings": main.readings,
        "format": opts.fmt,
        "devices": len(bench.devices),
        "sensors": bench.sensors,
        "samples_per_channel_per_message": opts.batch,
        "readings_per_message": main.readings // (main.steps * len(bench.devices)),
        "hz": opts.hz,
        "publisher_processes": opts.processes,
        "first_reading": iso(start_us),
        "flush": msgspec.to_builtins(cfg.flush),
        "mqtt_receive_maximum": cfg.mqtt.receive_maximum,
        "rollups": cfg.rollups.enabled,
        "anomaly_rules": msgspec.to_builtins(cfg.anomaly.rules),
        "ingest_env": opts.ingest_env,
    }


async def _run_phases(bench: Bench, res: Results, folder: Path) -> None:
    opts, db = bench.opts, bench.db
    main = bench.load(opts.readings)
    # The later phases' sizes follow from the measured rate; give them room in simulated time.
    half_room = bench.load(2_000_000 * opts.latency_seconds)
    spans = main.span_us + half_room.span_us + (main.span_us if opts.backlog else 0)
    start_us = (time.time_ns() // 1000 - spans - HOUR_US) // HOUR_US * HOUR_US
    res.machine = await machine(db)
    res.settings = settings(bench, main, start_us)
    say(
        f"{main.readings:,} readings, {opts.fmt}, {len(bench.devices)} devices, {bench.sensors} "
        f"sensors, {opts.batch} samples per channel per message; database {db.name}"
    )

    # The load's rows, recorded by the publishers on a topic nobody subscribes to.
    alone, record = await bench.record(main, start_us=start_us, folder=folder)
    res.publishers["alone_readings_per_s"] = alone
    say(f"publishers, nobody subscribed: {alone:,.0f} readings/s")
    res.decode = measure_decode(opts.fmt, Path(f"{record}.0"), opts.batch)

    # 1. The limit.
    res.limit = await bench.limit(record, main)
    say(f"limit, direct COPY: {res.limit['readings_per_s']:,.0f} readings/s")

    # 2. The ingester, sustained, with the publishers running alongside.
    await checkpoint(db)
    ingester = await bench.spawn()
    await ingester.wait_ready(timeout=180)
    idle_rss_mb = ingester.memory_mb()["rss_mb"]
    res.sustained = await bench.sustained(ingester, start_us=start_us, load=main)
    rate = res.sustained["readings_per_s"]
    say(
        f"ingester, sustained: {rate:,.0f} readings/s ({res.sustained['bound']}-bound), "
        f"{res.sustained['cpu_s_per_million']:.2f} CPU-s per million readings"
    )

    # 3. Latency at half that rate. Vacuum first: an autovacuum of the chunk just filled would
    # otherwise land in this short window or not, by chance (see the notes for any that did).
    await execute(db.owner_url, "VACUUM (ANALYZE) telemetry.readings")
    await checkpoint(db)
    half = bench.load(min(rate / 2 * opts.latency_seconds, half_room.readings))
    next_us = start_us + main.span_us
    res.half_load = await bench.half_load(ingester, start_us=next_us, load=half, rate=rate / 2)
    say(
        f"half load, {res.half_load['readings_per_s']:,.0f} readings/s: p50 "
        f"{ms(res.half_load['p50_s'])}, p99 {ms(res.half_load['p99_s'])}"
    )
    res.ingester = {**ingester.memory_mb(), "rss_when_ready_mb": idle_rss_mb}
    expected = main.readings + half.readings

    # 4. Optionally: a broker backlog drained by a fresh ingester process, no publisher running.
    if opts.backlog:
        next_us += half_room.span_us
        res.backlog, ingester = await bench.backlog(ingester, start_us=next_us, load=main)
        expected += main.readings
        say(f"ingester, draining a backlog: {res.backlog['readings_per_s']:,.0f} readings/s")
    await stop_ingester(ingester)
    stored = await value(db.owner_url, "SELECT count(*) FROM telemetry.readings")
    if stored != expected:
        raise BenchError(f"telemetry.readings holds {stored:,} rows, {expected:,} were sent")
    res.notes += await _maintenance_notes(db, res)
    for table in ("rollup_1m", "rollup_1h", "anomalies"):
        res.derived[table] = await value(db.owner_url, f"SELECT count(*) FROM telemetry.{table}")

    # 5. The naive baseline.
    res.naive = await naive_bridge(
        bench.children,
        opts,
        db,
        url=bench.url,
        prefix=f"bench-{bench.run_id}/naive",
        start_us=start_us,
        load=bench.load(opts.naive_seconds * 30_000),
    )
    say(f"naive bridge: {res.naive['readings_per_s']:,.0f} readings/s")


async def _maintenance_notes(db: Database, res: Results) -> list[str]:
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
