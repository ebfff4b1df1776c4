"""What asset health costs a flush: the same pumps' flushes written with and without asset rules.

    python -m benchmarks.asset_flush [--pumps 50] [--rounds 4] [--seconds 300]

On the local stack, in a scratch database: `--pumps` simulated pumps (eight sensors each) store
a healthy hour and are fitted as `ingest baseline` fits them; then, alternately, `--seconds` of
all pumps are written without asset rules and the next `--seconds` with them, each flush holding
10 s of every pump, through the real sink and deriver (rollups on), `--rounds` times each. It
prints the median wall time and process CPU time per flush of each (from the flush's sorted
columns to its commit, as `ingest.writer` does), and their ratio within the run. Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import numpy as np

from ingest.asset.baseline import Request, baseline
from ingest.asset.rules import AssetRule
from ingest.db.registry import Registry, SensorKey
from ingest.db.sink import Readings, Sink
from ingest.derive import Deriver
from ingest.sim.pumps import Pump, pump_paths
from tests.support.asset import T0, Stream, pump_stream
from tests.support.cluster import Database, create_database, drop_database

RULE = AssetRule(match="*/pumps/*", hold_s=10.0)


class Writer:
    """One connection writing flushes of several devices, as `ingest.writer` does."""

    def __init__(self, db: Database, rules: list[AssetRule]) -> None:
        self.registry = Registry()
        self.deriver = Deriver(rules=[], assets=rules, rollups=True, registry=self.registry)
        self.sink = Sink(dsn=db.ingest_url, jit=False)

    async def columns(self, flush: dict[str, Stream]) -> Readings:
        """The flush as the writer's sorted columns, its sensors registered (not timed)."""
        conn = self.sink.connection
        keys = {SensorKey(tuple(d.split("/")), n): None for d, part in flush.items() for n in part}
        await self.registry.resolve(conn, sensors=keys)
        rows = sorted(
            (self.registry.get(SensorKey(tuple(d.split("/")), n)), t, v)
            for d, part in flush.items()
            for n, readings in part.items()
            for t, v in readings
        )
        return Readings(
            np.array([r[1] for r in rows], np.int64),
            np.array([r[0] for r in rows], np.int32),
            np.array([r[2] for r in rows], np.float64),
            np.zeros(len(rows), np.uint8),
        )

    async def write(self, readings: Readings) -> None:
        """What `ingest.writer` does with a flush's columns: prepare, write, derive, commit."""
        await self.deriver.prepare(self.sink.connection, readings=readings)
        _, derived = await self.sink.write(
            readings=readings,
            dead_letters=(),
            derive=self.deriver.derive,
            settle=self.deriver.settle,
        )
        self.deriver.commit(derived)


def window(pumps: dict[str, Pump], first: int, seconds: int) -> list[dict[str, Stream]]:
    """`seconds` of every pump from sample `first`, as flushes of 10 s each."""
    out = []
    for at in range(first, first + seconds, 10):
        out.append({d: pump_stream(p, first=at, count=10) for d, p in pumps.items()})
    return out


async def timed(
    writer: Writer, flushes: list[dict[str, Stream]]
) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for flush in flushes:
        readings = await writer.columns(flush)
        w, c = time.perf_counter(), time.process_time()
        await writer.write(readings)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return walls, cpus


async def run(*, pumps: int, rounds: int, seconds: int) -> None:
    db = await create_database(migrated=True, prefix="bench")
    try:
        fleet = {d: Pump(d, i) for i, d in enumerate(pump_paths(pumps))}
        plain, scored = Writer(db, []), Writer(db, [RULE])
        await plain.sink.connect()
        await scored.sink.connect()
        for flush in window(fleet, 0, 3600):
            await plain.write(await plain.columns(flush))
        fitted = await baseline(
            db.owner_url,
            Request(device="*/pumps/*", start_us=T0, end_us=T0 + 3_600_000_000),
            rules=[RULE],
        )
        assert all(f.model is not None for f in fitted), fitted
        first = 3600
        results: dict[str, tuple[list[float], list[float]]] = {
            "without": ([], []),
            "with": ([], []),
        }
        for _ in range(rounds):
            for name, writer in (("without", plain), ("with", scored)):
                walls, cpus = await timed(writer, window(fleet, first, seconds))
                results[name][0].extend(walls)
                results[name][1].extend(cpus)
                first += seconds
        await plain.sink.close()
        await scored.sink.close()
    finally:
        await drop_database(db)
    per_flush = pumps * (5 * 10 + 3 * 2)
    print(
        f"asset health in the flush: {pumps} pumps x 8 sensors, flushes of 10 s "
        f"({per_flush:,} readings), {rounds} x {seconds // 10} flushes each, alternating"
    )
    base_wall = statistics.median(results["without"][0])
    base_cpu = statistics.median(results["without"][1])
    for name, (walls, cpus) in results.items():
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(
            f"{name + ' asset rules':<22} wall {wall * 1e3:7.1f} ms ({wall / base_wall:4.2f}x)  "
            f"CPU {cpu * 1e3:7.1f} ms ({cpu / base_cpu:4.2f}x)  "
            f"{cpu / per_flush * 1e9:6.0f} ns CPU a reading"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.asset_flush", description=__doc__)
    p.add_argument("--pumps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=int, default=300)
    args = p.parse_args(argv)
    asyncio.run(run(pumps=args.pumps, rounds=args.rounds, seconds=args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
