"""A restore, a catch-up and a replay read only recent chunks, however many the readings have.

A scratch database with 1-hour chunks holds 400 hours of readings (400 chunks). The statements
the ingesters send while restoring, catching up and merging a late flush are captured as sent
(asyncpg's query logger) and explained with the same arguments: each plans, and runs, a few
chunks of the readings, never all of them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from ingest.anomaly.rules import AnomalyRule
from tests.support.anomaly_reference import T0
from tests.support.anomaly_sync import (
    Instance,
    events_of,
    new_device,
    one_pass_events,
    plant_signal,
    syncs,
)
from tests.support.cluster import Database

MINUTE = 60_000_000
HOURS = 400
RULE = AnomalyRule(
    match="*",
    max=100.0,
    spike_window=16,
    spike_threshold=5.0,
    drift_window=8,
    drift_baseline=40,
    flatline_count=10,
)


def chunk_scans(plan: dict[str, Any], chunks: set[str]) -> tuple[int, int]:
    """(chunks of the readings in the plan, of those the ones that ran)."""
    planned = ran = 0
    stack = [plan["Plan"]]
    while stack:
        node = stack.pop()
        if node.get("Relation Name") in chunks:
            planned += 1
            ran += node.get("Actual Loops", 0) > 0
        stack.extend(node.get("Plans", []))
    return planned, ran


@pytest.fixture
async def owner(db: Database) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db.owner_url)
    await conn.execute("SELECT set_chunk_time_interval('telemetry.readings', interval '1 hour')")
    yield conn
    await conn.close()


async def test_restore_catch_up_and_replay_read_only_recent_chunks(
    db: Database, owner: asyncpg.Connection
) -> None:
    device = new_device()
    n = HOURS * 60
    stream = {"temp": [(T0 + i * MINUTE, v) for i, v in enumerate(plant_signal(n, 3))]}
    history, recent = stream["temp"][: n - 60], stream["temp"][n - 60 :]
    async with Instance(db, [RULE]) as first:
        for k in range(0, len(history), 2_000):
            await first.write(device, {"temp": history[k : k + 2_000]})

    sent: list[tuple[str, tuple[Any, ...]]] = []

    def log(query: Any) -> None:
        sent.append((query.query, tuple(query.args)))

    before = syncs()
    hour = 3600.0  # the default anomaly.replay_max_s: a replay looks back at most that far
    async with (
        Instance(db, [RULE], replay_max_s=hour) as a,
        Instance(db, [RULE], replay_max_s=hour) as b,
    ):
        for ingester in (a, b):
            ingester.sink.connection.add_query_logger(log)
        await a.write(device, {"temp": recent[0:10]})  # restores (a new cache)
        await b.write(device, {"temp": recent[20:30]})  # restores
        await b.write(device, {"temp": recent[10:20]})  # late: replays from before 10
        await a.write(device, {"temp": recent[30:40]})  # restores (b rewrote history)
        await b.write(device, {"temp": recent[40:60]})  # catches up with a's 10
    after = syncs()
    assert {how: after[how] - before[how] for how in after} == {
        "restored": 3,
        "caught_up": 1,
        "replayed": 1,
    }
    assert await events_of(db, device) == one_pass_events({"temp": RULE}, stream)

    readings_chunks = {
        r["chunk_name"]
        for r in await owner.fetch(
            "SELECT chunk_name FROM timescaledb_information.chunks"
            " WHERE hypertable_schema = 'telemetry' AND hypertable_name = 'readings'"
        )
    }
    assert len(readings_chunks) >= HOURS
    reads = [
        (q, args)
        for q, args in sent
        if "telemetry.readings" in q and q.lstrip().upper().startswith(("SELECT", "DELETE"))
    ]
    assert len(reads) >= 4
    await check_bounded(owner, reads, readings_chunks)

    # A sensor whose history predates the state table (its row is missing): the first flush
    # finds its newest reading from the registry's last_seen, and restores from there.
    await owner.execute(
        "DELETE FROM telemetry.anomaly_state s USING telemetry.sensors_v v"
        " WHERE v.sensor_id = s.sensor_id AND v.device = $1",
        device,
    )
    sent.clear()
    later = [(T0 + (n + i) * MINUTE, 50.0 + i % 2) for i in range(30)]
    before = syncs()
    async with Instance(db, [RULE]) as c:
        c.sink.connection.add_query_logger(log)
        await c.write(device, {"temp": later})
    assert syncs()["restored"] == before["restored"] + 1
    assert await events_of(db, device) == one_pass_events(
        {"temp": RULE}, {"temp": stream["temp"] + later}
    )
    reads = [(q, args) for q, args in sent if "telemetry.readings" in q]
    assert any(q.lstrip().startswith("INSERT INTO telemetry.anomaly_state") for q, _ in reads)
    await check_bounded(owner, reads, readings_chunks)


async def check_bounded(
    owner: asyncpg.Connection, reads: list[tuple[str, tuple[Any, ...]]], chunks: set[str]
) -> None:
    """Each statement, explained with its arguments, plans and runs a few chunks only."""
    for query, args in reads:
        tx = owner.transaction()
        await tx.start()
        try:
            plan = json.loads(
                await owner.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + query, *args)
            )[0]
        finally:
            await tx.rollback()
        planned, ran = chunk_scans(plan, chunks)
        assert 1 <= planned <= 3, (planned, query)
        assert ran <= 2, (ran, query)
