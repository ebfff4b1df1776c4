"""What the ingester is compared with, in the run's scratch database: the limit (one writer's
binary COPY of the same rows into a table defined like telemetry.readings) and a naive bridge
(benchmarks/naive.py: one INSERT per reading, a commit per message)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg

from benchmarks.e2e import BenchError, say
from benchmarks.e2e.load import Load, finish_publishers, start_publishers
from benchmarks.e2e.options import Options
from benchmarks.e2e.processes import Children
from ingest.db.sink import Readings, encode_copy
from tests.support.cluster import Database, admin_dsn, execute, scratch_database

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


@contextlib.asynccontextmanager
async def bench_database(*, keep: bool) -> AsyncIterator[Database]:
    """A migrated scratch database of the stack's cluster with the bench tables; dropped at
    the end unless `keep`."""
    async with scratch_database(prefix="bench_e2e", keep=keep) as db:
        try:
            await execute(db.owner_url, _BENCH_SCHEMA)
            yield db
        finally:
            if keep:
                say(f"kept the scratch database {db.name}")


async def value(url: str, sql: str) -> Any:
    """The first value of the first row of `sql`, on a connection of its own."""
    conn = await asyncpg.connect(url, timeout=30)
    try:
        return await conn.fetchval(sql, timeout=300)
    finally:
        await conn.close()


async def checkpoint(db: Database) -> None:
    """Write dirty pages out, so no phase pays for the previous one's checkpoint."""
    await execute(admin_dsn(db.name), "CHECKPOINT")


async def direct_copy(db: Database, slabs: list[Readings], total: int) -> dict[str, Any]:
    """The limit: one writer, encode_copy + binary COPY per slab, each its own transaction."""
    await checkpoint(db)
    conn = await asyncpg.connect(db.ingest_url, timeout=30)
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
    await execute(db.owner_url, "TRUNCATE bench.readings_limit")
    return {
        "readings": total,
        "slabs": len(slabs),
        "slab_readings": len(slabs[0]),
        "seconds": seconds,
        "readings_per_s": total / seconds,
    }


async def naive_bridge(
    children: Children,
    opts: Options,
    db: Database,
    *,
    url: str,
    prefix: str,
    start_us: int,
    load: Load,
) -> dict[str, Any]:
    """The reference bridge for `--naive-seconds`, fed `load` (more than it can take then)."""
    argv = [sys.executable, "-m", "benchmarks.naive", "--db-url", db.ingest_url]
    argv += ["--mqtt-url", url, "--prefix", prefix]
    argv += ["--seconds", repr(opts.naive_seconds)]
    naive = await children.start("naive bridge", argv, stdout=True)
    line = await naive.readline(timeout=60, doing="'ready' line")
    if line != "ready":
        raise BenchError(f"naive bridge: expected 'ready', got {line[:80]!r}")
    publisher = await start_publishers(
        children,
        opts,
        "publisher (naive)",
        url=url,
        prefix=prefix,
        start_us=start_us,
        load=load,
        processes=1,
    )
    await finish_publishers(publisher, timeout=120)
    text = await naive.readline(timeout=opts.naive_seconds + 60, doing="result line")
    result: dict[str, Any] = json.loads(text)
    await naive.wait(timeout=30, doing="exiting")
    stored = await value(db.owner_url, "SELECT count(*) FROM bench.readings_naive")
    if stored != result["readings"]:
        raise BenchError(f"naive: {stored:,} rows stored, it reported {result['readings']:,}")
    return result
