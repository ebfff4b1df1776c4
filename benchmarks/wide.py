"""End-to-end benchmark, wide shape: a plant of thousands of devices with tens of tags each,
one sample per tag per message, one message per device per round (`--shape wide`).

One run on the local stack, in a scratch database, no anomaly rules:

1. an ingester process connects once (its broker session is created) and stops;
2. `ingest simulate` publishes `--rounds` rounds (every sensor once per round, 1 Hz) into
   that session, recording the rows: the ingester is measured, not the publishers, whose
   Python costs about as much per 20-reading message as the ingester does;
3. a new ingester process drains the backlog: the first round is the first sight of every
   sensor (registration), the rest is the steady rate;
4. it stops; two more rounds are published; a third process starts against the now known
   registry: seconds from its start until ready and until a full round is written;
5. the limit: the same rows binary-COPYed by one writer in slabs of the ingester's mean flush
   size, each sorted by (sensor, time), into a table defined like `telemetry.readings`.

Rollups are on unless `--ingest-env INGEST_ROLLUPS_ENABLED=false`; their pending partials are
merged every 5 s (INGEST_ROLLUPS_MERGE_INTERVAL_S), so the steady rate includes merges.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.e2e import BenchError
from benchmarks.e2e.baselines import bench_database, checkpoint, direct_copy, value
from benchmarks.e2e.load import HOUR_US, Load, iso, recorded_slabs
from benchmarks.e2e.measure import grown, machine, proc_cpu_s
from benchmarks.e2e.options import Options
from benchmarks.e2e.processes import Children, latency, start_py_spy, stop_ingester, stop_py_spy
from benchmarks.e2e.report import finite
from benchmarks.e2e.run import Bench
from tests.support.ingester import Ingester, metric_sum, scrape

_SENSORS = {
    **{f"temp.{i:02d}": "temperature" for i in range(6)},
    **{f"vib.{i:02d}": "vibration" for i in range(4)},
    **{f"current.{i:02d}": "current" for i in range(4)},
    **{f"pressure.{i:02d}": "pressure" for i in range(3)},
    "parts": "counter",
    "energy": "energy",
    "state": "counter",
}
_WRITTEN = "ingest_readings_written_total"
_REJECTED = ("ingest_dead_letters_total", "ingest_readings_duplicate_total")
_POLL_S = 0.2
# In the steady phase a poll a second, closer again near the end: a scrape of /metrics costs
# the ingester a few ms (about 0.1 CPU-s per million readings at 0.2 s and 200,000 readings/s).
_STEADY_POLL_S = 1.0


def write_plant(path: Path, *, devices: int, per_line: int = 100) -> None:
    """A plant TOML of `devices` devices of 20 sensors each, `per_line` devices per line."""
    lines = []
    for n in range(math.ceil(devices / per_line)):
        count = min(per_line, devices - n * per_line)
        site, area = f"site{n // 25 + 1}", f"area{n // 5 % 5 + 1}"
        lines.append(f'[[line]]\npath = "{site}/{area}/line{n % 5 + 1}"\ndevices = {count}\n')
        lines.append('device_prefix = "plc"\n[line.sensors]\n')
        lines.extend(f'"{name}" = "{kind}"\n' for name, kind in _SENSORS.items())
    path.write_text("".join(lines))


@dataclass(slots=True)
class WideResults:
    started: str
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    first_sight: dict[str, Any] = field(default_factory=dict)
    steady: dict[str, Any] = field(default_factory=dict)
    drain: dict[str, Any] = field(default_factory=dict)
    restart: dict[str, Any] = field(default_factory=dict)
    limit: dict[str, Any] = field(default_factory=dict)
    ingester: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Poll:
    at: float
    written: float
    commit: float
    cpu: float
    metrics: dict[str, float]


async def _poll_until(
    ingester: Ingester,
    readings: float,
    *,
    timeout: float,  # noqa: ASYNC109
    every: float = _POLL_S,
) -> list[_Poll]:
    """Poll until `readings` are written: every `every` seconds, every `_POLL_S` once fewer
    than that many seconds' worth are left."""
    polls: list[_Poll] = []
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(ingester.port) if ingester.alive else {}
        ingester.check_alive()
        poll = _Poll(
            time.monotonic(),
            metric_sum(m, _WRITTEN),
            metric_sum(m, "ingest_last_commit_timestamp_seconds"),
            proc_cpu_s(ingester.pid),
            m,
        )
        polls.append(poll)
        bad = {k: v for k, v in m.items() if v > 0 and k.startswith(_REJECTED)}
        if bad:
            raise BenchError(f"the ingester rejected or skipped part of the load: {bad}")
        if poll.written >= readings:
            return polls
        if time.monotonic() > deadline:
            raise BenchError(f"{poll.written:,.0f} of {readings:,.0f} readings within {timeout}s")
        wait = every
        if len(polls) > 1:
            a, b = polls[-2], polls[-1]
            rate = (b.written - a.written) / max(1e-9, b.at - a.at)
            if readings - b.written < rate * every:
                wait = _POLL_S
        await asyncio.sleep(wait)


def _rate(a: _Poll, b: _Poll) -> dict[str, Any]:
    window = b.commit - a.commit
    n = b.written - a.written
    ok = window > 0 and n > 0
    flush = latency(a.metrics, b.metrics)
    flushes = grown(b.metrics, a.metrics, "ingest_flush_readings_count")
    return {
        "readings": n,
        "commit_window_s": window,
        "readings_per_s": n / window if ok else math.nan,
        "cpu_s_per_million": (b.cpu - a.cpu) / n * 1e6 if ok else math.nan,
        "flushes": flushes,
        "mean_flush_readings": n / max(1.0, flushes),
        "flush_p50_s": flush["flush_p50_s"],
        "flush_p99_s": flush["flush_p99_s"],
        "writer_busy": grown(b.metrics, a.metrics, "ingest_flush_duration_seconds_sum") / window
        if ok
        else math.nan,
        "copy_busy": grown(b.metrics, a.metrics, "ingest_copy_duration_seconds_sum") / window
        if ok
        else math.nan,
    }


async def _publish(bench: Bench, *, start_us: int, rounds: int, record: Path | None) -> None:
    load = Load(bench.sensors, rounds, 1, 1.0)
    child = await bench.publisher(
        f"publishers ({rounds} rounds)",
        prefix=bench.prefix,
        start_us=start_us,
        load=load,
        processes=bench.opts.processes,
        record=record,
    )
    await bench.finish(child, timeout=max(300.0, load.readings / 5_000))


async def _run(opts: Options, res: WideResults, folder: Path) -> None:
    children = Children(folder)
    try:
        async with bench_database(keep=opts.keep_database) as db:
            bench = Bench(opts, db, children)
            await _phases(bench, res, folder)
    finally:
        await children.stop_all()


async def _phases(bench: Bench, res: WideResults, folder: Path) -> None:
    opts, db = bench.opts, bench.db
    sensors = bench.sensors
    rounds = opts.rounds
    start_us = (time.time_ns() // 1000 - (rounds + 4) * 1_000_000 - HOUR_US) // HOUR_US
    start_us *= HOUR_US
    res.machine = await machine(db)
    res.settings = {
        "devices": len(bench.devices),
        "sensors": sensors,
        "rounds": rounds,
        "readings": sensors * rounds,
        "readings_per_message": sensors // len(bench.devices),
        "rollups": bench.cfg.rollups.enabled,
        "anomaly_rules": len(bench.cfg.anomaly.rules),
        "flush": msgspec.to_builtins(bench.cfg.flush),
        "writers": bench.cfg.db.writers,
        "mqtt_receive_maximum": bench.cfg.mqtt.receive_maximum,
        "first_reading": iso(start_us),
        "ingest_env": opts.ingest_env,
    }
    _say(f"{len(bench.devices):,} devices, {sensors:,} sensors, {rounds} rounds; {db.name}")

    # The session first, then the backlog it holds.
    ingester = await bench.spawn()
    await ingester.wait_ready(timeout=180)
    await stop_ingester(ingester)
    record = folder / "load"
    await _publish(bench, start_us=start_us, rounds=rounds, record=record)
    _say(f"published {rounds} rounds into the ingester's session")

    await checkpoint(db)
    ingester = await bench.spawn()
    await ingester.wait_ready(timeout=180)
    ready = await scrape(ingester.port)
    began = _Poll(time.monotonic(), 0.0, time.time(), proc_cpu_s(ingester.pid), ready)
    timeout = max(600.0, rounds * 60.0)
    polls = await _poll_until(ingester, sensors, timeout=timeout)
    # The profile covers the steady phase only: the first round is registration.
    spy = await start_py_spy(bench.children, opts.py_spy, ingester.pid)
    polls += await _poll_until(ingester, sensors * rounds, timeout=timeout, every=_STEADY_POLL_S)
    await stop_py_spy(spy)
    seen = next(p for p in polls if p.written >= sensors)
    res.first_sight = _rate(began, seen)
    res.steady = _rate(seen, polls[-1])
    res.drain = _rate(began, polls[-1])
    res.ingester = ingester.memory_mb()
    _say(
        f"first sight: {res.first_sight['readings_per_s']:,.0f} readings/s; steady: "
        f"{res.steady['readings_per_s']:,.0f} readings/s, "
        f"{res.steady['cpu_s_per_million']:.2f} CPU-s per million"
    )
    await stop_ingester(ingester)

    # A restart against the known registry.
    await _publish(bench, start_us=start_us + rounds * 1_000_000, rounds=2, record=None)
    await checkpoint(db)
    spawned = time.monotonic()
    ingester = await bench.spawn()
    started = time.monotonic()  # after the kernel cache was filled in its own process
    await ingester.wait_ready(timeout=180)
    ready_s = time.monotonic() - started
    polls = await _poll_until(ingester, 2 * sensors, timeout=600)
    first = next(p for p in polls if p.written >= sensors)
    res.restart = {
        "ready_s": ready_s,
        "first_round_written_s": first.at - started,
        "both_rounds_written_s": polls[-1].at - started,
        "warm_up_s": started - spawned,
        **{f"second_round_{k}": v for k, v in _rate(first, polls[-1]).items()},
    }
    _say(
        f"restart: ready in {ready_s:.1f}s, a full round written {first.at - started:.1f}s "
        "after the process started"
    )
    await stop_ingester(ingester)

    expected = sensors * (rounds + 2)
    stored = await value(db.owner_url, "SELECT count(*) FROM telemetry.readings")
    if stored != expected:
        raise BenchError(f"telemetry.readings holds {stored:,} rows, {expected:,} were sent")
    for table in ("rollup_1m", "rollup_1h"):
        res.derived[table] = await value(db.owner_url, f"SELECT count(*) FROM telemetry.{table}")
    if bench.cfg.rollups.enabled:
        counted = await value(db.owner_url, "SELECT sum(count) FROM telemetry.rollup_1m")
        if counted != expected:
            raise BenchError(f"rollup_1m counts {counted:,} readings, {expected:,} were written")

    # The limit, slabs the size of the ingester's mean steady flush.
    paths = [p for i in range(opts.processes) if (p := Path(f"{record}.{i}")).exists()]
    slab = max(1, round(res.drain["mean_flush_readings"]))
    slabs, total = recorded_slabs(paths, slab=slab)
    if total != sensors * rounds:
        raise BenchError(f"recorded {total:,} readings, {sensors * rounds:,} expected")
    res.limit = await direct_copy(db, slabs, total)
    _say(f"limit, direct COPY in {slab:,}-reading slabs: {res.limit['readings_per_s']:,.0f}/s")


def render(res: WideResults) -> str:
    f, s, r, lim = res.first_sight, res.steady, res.restart, res.limit
    ratio = s["readings_per_s"] / lim["readings_per_s"]
    rows = [
        ("first sight of every sensor", f"{f['readings_per_s']:,.0f} readings/s"),
        ("steady", f"{s['readings_per_s']:,.0f} readings/s"),
        (
            f"limit: direct COPY, {lim['slab_readings']:,}-reading sorted slabs",
            f"{lim['readings_per_s']:,.0f} readings/s",
        ),
        ("steady / limit", f"{ratio:.2f}"),
        ("ingester CPU, steady", f"{s['cpu_s_per_million']:.2f} CPU-s per million readings"),
        ("ingester CPU, first sight", f"{f['cpu_s_per_million']:.2f} CPU-s per million readings"),
        (
            "flush, steady",
            f"{s['mean_flush_readings']:,.0f} readings mean, p50 {s['flush_p50_s'] * 1000:.0f} ms,"
            f" p99 {s['flush_p99_s'] * 1000:.0f} ms; writer busy {s['writer_busy']:.0%}",
        ),
        ("ingester peak RSS", f"{res.ingester['peak_rss_mb']:.0f} MB"),
        (
            "restart with every sensor known",
            f"ready {r['ready_s']:.1f} s, a full round written {r['first_round_written_s']:.1f} s"
            f" after start; then {r['second_round_readings_per_s']:,.0f} readings/s",
        ),
    ]
    st = res.settings
    head = (
        f"wide shape: {st['devices']:,} devices x {st['readings_per_message']} sensors, one sample "
        f"each, {st['rounds']} rounds; rollups {'on' if st['rollups'] else 'off'}; "
        f"git {res.machine.get('git', '?')}\n\n| figure | value |\n|---|---|\n"
    )
    return head + "".join(f"| {a} | {b} |\n" for a, b in rows)


def _say(text: str) -> None:
    print(f"e2e wide: {text}", file=sys.stderr, flush=True)


def run_wide(opts: Options) -> int:
    """`python -m benchmarks.e2e --shape wide`: run, print the table, write JSON and Markdown."""
    res = WideResults(started=datetime.now(UTC).isoformat(timespec="seconds"))
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ingest-wide-") as tmp:
        plant = Path(tmp) / "plant.toml"
        write_plant(plant, devices=opts.plant_devices)
        # Merges every 5 s rather than 30: the steady phase lasts seconds, and it should pay
        # for the merges of its rollup partials as a plant's steady state does.
        env = {
            "INGEST_ANOMALY_RULES": "[]",
            "INGEST_ROLLUPS_MERGE_INTERVAL_S": "5",
            **opts.ingest_env,
        }
        wide = replace(opts, plant=plant, batch=1, hz=1.0, ingest_env=env)
        asyncio.run(_run(wide, res, Path(tmp)))
    res.seconds = time.monotonic() - wall
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = res.started.replace("+00:00", "Z").replace(":", "")
    doc = finite(msgspec.to_builtins(res))
    (opts.out / f"e2e-wide-{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = render(res)
    (opts.out / f"e2e-wide-{stamp}.md").write_text(text)
    print(text)
    return 0
