"""Several `ingest run` processes on one share group store what one stores: the same readings,
rollups and anomaly events, whatever the broker deals to whom and whoever commits first.

One plant stream (3 devices x 4 sensors, injected spikes, steps, flatlines and range
excursions, one anomaly rule for every sensor) is ingested once by a single ingester (the
reference) and then, in each test, by a group that paces, bursts, loses a member to kill -9,
shrinks, grows or has an orphaned session drained. Values are multiples of 1/64, so that rollup
sums are exact in any order of addition and the comparison can be exact everywhere.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg
import msgspec
import numpy as np
import pytest

from ingest.anomaly.rules import AnomalyRule
from tests.support.anomaly_sync import one_pass_events
from tests.support.cluster import Database
from tests.support.ingester import Ingester, ingester_env
from tests.support.mqtt import Publisher, purge_session
from tests.support.net import http_get
from tests.support.process import wait_until
from tests.support.streams import T0

pytestmark = pytest.mark.slow

DEVICES = 3
SENSORS = ("temp", "vib", "current", "pressure")
MESSAGES = 40  # per device
PER = 10  # readings per sensor and message
HZ_US = 100_000
READINGS = DEVICES * len(SENSORS) * MESSAGES * PER
RULE = {
    "match": "*",
    "max": 100.0,
    "max_rate": 400.0,
    "spike_window": 16,
    "spike_threshold": 5.0,
    "spike_min_sigma": 0.5,
    "drift_window": 8,
    "drift_baseline": 40,
    "drift_sigma": 4.0,
    "drift_min_sigma": 0.25,
    "flatline_count": 12,
}


def signal(d: int, k: int) -> np.ndarray:
    """One sensor's readings: dyadic noise, and its anomalies at places of its own, most of them
    across message boundaries."""
    n = MESSAGES * PER
    rng = np.random.default_rng(100 * d + k)
    v = 50.0 + 10 * k + np.round(rng.normal(0.0, 1.0, n) * 64) / 64
    at = 40 + 23 * k + 11 * d
    v[at] += 30.0  # spike
    v[at + 80 : at + 110] += 8.0  # step: drift
    v[at + 150 : at + 170] = v[at + 150]  # flatline
    v[at + 210 : at + 214] = 150.0  # range (and rate)
    return v


Snapshot = dict[str, set[tuple[object, ...]]]


@dataclass(frozen=True)
class Stream:
    """The published messages of one run, in publishing order, under its own site."""

    site: str
    messages: list[tuple[str, bytes]]


def plant(site: str) -> Stream:
    """Each device publishes its messages in order; the devices interleave at random (fixed
    seed), so that a broker's round robin does not deal each device to one member."""
    values = {(d, k): signal(d, k) for d in range(DEVICES) for k in range(len(SENSORS))}
    turns = np.random.default_rng(5).permutation(np.repeat(np.arange(DEVICES), MESSAGES))
    sent = [0] * DEVICES
    messages = []
    for d in turns.tolist():
        lo = sent[d] * PER
        sent[d] += 1
        channels = [
            {"s": s, "dt": HZ_US, "v": values[(d, k)][lo : lo + PER].astype("<f8").tobytes()}
            for k, s in enumerate(SENSORS)
        ]
        payload = msgspec.msgpack.encode({"v": 1, "t0": T0 + lo * HZ_US, "ch": channels})
        messages.append((f"{site}/line1/dev-{d}", payload))
    return Stream(site, messages)


def in_process_events(site: str) -> dict[tuple[str, str, str, int], object]:
    """The events of the whole stream run through one detector in one pass."""
    rule = AnomalyRule(**RULE)  # type: ignore[arg-type]
    out: dict[tuple[str, str, str, int], object] = {}
    for d in range(DEVICES):
        stream = {
            s: [(T0 + i * HZ_US, float(x)) for i, x in enumerate(signal(d, k))]
            for k, s in enumerate(SENSORS)
        }
        for (s, kind, start), rest in one_pass_events(dict.fromkeys(SENSORS, rule), stream).items():
            out[(f"line1/dev-{d}", s, kind, start)] = rest
    return out


_READINGS = """
SELECT device, sensor, (extract(epoch FROM ts) * 1000000)::int8, value, quality
  FROM telemetry.readings_v WHERE device LIKE $1 || '/%'
"""
_ROLLUPS = """
SELECT device, sensor, (extract(epoch FROM bucket) * 1000000)::int8, min, max, avg, count, first,
       last, (extract(epoch FROM first_time) * 1000000)::int8,
       (extract(epoch FROM last_time) * 1000000)::int8
  FROM telemetry.{view} WHERE device LIKE $1 || '/%'
"""
_EVENTS = """
SELECT device, sensor, kind, (extract(epoch FROM ts) * 1000000)::int8,
       (extract(epoch FROM end_ts) * 1000000)::int8, value, score, detail
  FROM telemetry.anomalies_v WHERE device LIKE $1 || '/%'
"""


async def snapshot(db: Database, site: str) -> Snapshot:
    """Everything stored for the site, the site left out of the device paths."""
    conn = await asyncpg.connect(db.analyst_url)
    try:
        tables = {
            "readings": await conn.fetch(_READINGS, site),
            "rollup_1m": await conn.fetch(_ROLLUPS.format(view="rollup_1m_v"), site),
            "rollup_1h": await conn.fetch(_ROLLUPS.format(view="rollup_1h_v"), site),
            "events": await conn.fetch(_EVENTS, site),
        }
    finally:
        await conn.close()
    return {
        name: {(r[0].split("/", 1)[1], *tuple(r)[1:]) for r in rows}
        for name, rows in tables.items()
    }


def differing(got: Snapshot, want: Snapshot) -> dict[str, int]:
    """Rows per table in one and not the other."""
    return {name: len(got[name] ^ want[name]) for name in want}


async def stored(db: Database, site: str) -> int:
    conn = await asyncpg.connect(db.analyst_url)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM telemetry.readings_v WHERE device LIKE $1 || '/%'", site
        )
    finally:
        await conn.close()
    return n


async def all_stored(db: Database, site: str, *, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    async def done() -> bool:
        return await stored(db, site) >= READINGS

    await wait_until(done, timeout=timeout, every=0.2)
    assert await stored(db, site) == READINGS


def env(db: Database, mqtt_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return ingester_env(db, mqtt_url, prefix, INGEST_ANOMALY_RULES=json.dumps([RULE]), **extra)


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


async def group(
    db: Database, mqtt_url: str, prefix: str, *, members: int, name: str | None = None
) -> list[Ingester]:
    """`members` ingesters on one share group, started at once."""
    share = name or f"g{uuid.uuid4().hex[:6]}"
    procs = [
        Ingester(env(db, mqtt_url, prefix, INGEST_MQTT_SHARE_GROUP=share)) for _ in range(members)
    ]
    await asyncio.gather(*(p.start() for p in procs))
    return procs


def publish(mqtt_url: str, prefix: str, messages: Sequence[tuple[str, bytes]]) -> None:
    with Publisher(mqtt_url) as pub:
        for device, payload in messages:
            pub.publish(f"{prefix}/{device}", payload)


async def acked(members: Sequence[Ingester]) -> float:
    return sum([await m.metric("ingest_messages_acknowledged_total") for m in members if m.alive])


async def stop_all(members: Sequence[Ingester]) -> dict[str, float]:
    """SIGTERM every member still running; returns how they brought their anomaly state up to
    date (for the test's output: which paths a run took depends on timing)."""
    counts: dict[str, float] = {}
    for m in members:
        if not m.alive:
            continue
        _, body = await http_get(m.port, "/metrics")
        for line in body.decode().splitlines():
            for name in ("ingest_anomaly_state_syncs_total", "ingest_anomaly_rerun_readings_total"):
                if line.startswith(name):
                    key = line.rsplit(" ", 1)[0].removeprefix("ingest_anomaly_")
                    counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        assert await m.stop() == 0, m.log.decode()
    print(f"\nanomaly state syncs: {counts}")
    return counts


@pytest.fixture(scope="module")
async def reference(database: Database, mqtt_url: str) -> Snapshot:
    """The stream as one ingester stores it."""
    prefix = f"t{uuid.uuid4().hex[:10]}/telemetry"
    stream = plant(f"ref-{uuid.uuid4().hex[:8]}")
    one = await Ingester(env(database, mqtt_url, prefix)).start()
    try:
        await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages)
        await all_stored(database, stream.site)
    finally:
        await stop_all([one])
    got = await snapshot(database, stream.site)
    events = {(r[0], r[1], r[2], r[3]): (r[4], r[5], r[6], r[7]) for r in got["events"]}
    assert events == in_process_events(stream.site)  # one ingester: as in one pass
    assert {r[2] for r in got["events"]} == {"range", "rate", "spike", "drift", "flatline"}
    return got


@pytest.fixture
def stream() -> Stream:
    return plant(f"site-{uuid.uuid4().hex[:8]}")


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Ingester]]:
    """Members a test started; stopped at the end whatever happened."""
    started: list[Ingester] = []
    yield started
    for m in started:
        if m.alive:
            await m.kill()


def check(got: Snapshot, want: Snapshot) -> None:
    counts = differing(got, want)
    assert counts == dict.fromkeys(want, 0), counts
    assert len(got["readings"]) == READINGS


async def stored_and_stopped_equal(
    db: Database, stream: Stream, reference: Snapshot, members: Sequence[Ingester]
) -> None:
    """Once the whole stream is stored and every member stopped, the tables equal `reference`."""
    await all_stored(db, stream.site)
    await stop_all(members)
    check(await snapshot(db, stream.site), reference)


async def test_paced_rounds_over_three_ingesters(
    database: Database,
    mqtt_url: str,
    prefix: str,
    stream: Stream,
    reference: Snapshot,
    cleanup: list[Ingester],
) -> None:
    """One message per device at a time, each round stored before the next: a device's
    consecutive messages go to different ingesters, each a step behind the others."""
    cleanup += await group(database, mqtt_url, prefix, members=3)
    with Publisher(mqtt_url) as pub:
        for r in range(MESSAGES):
            for device, payload in stream.messages[r * DEVICES : (r + 1) * DEVICES]:
                pub.publish(f"{prefix}/{device}", payload)
            want = (r + 1) * DEVICES * len(SENSORS) * PER

            async def round_stored(want: int = want) -> bool:
                return await stored(database, stream.site) >= want

            await wait_until(round_stored, timeout=60, every=0.05)
    await stored_and_stopped_equal(database, stream, reference, cleanup)


async def test_a_burst_over_three_ingesters(
    database: Database,
    mqtt_url: str,
    prefix: str,
    stream: Stream,
    reference: Snapshot,
    cleanup: list[Ingester],
) -> None:
    cleanup += await group(database, mqtt_url, prefix, members=3)
    await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages)
    await stored_and_stopped_equal(database, stream, reference, cleanup)


async def test_kill_9_and_restart_of_a_member(
    database: Database,
    mqtt_url: str,
    prefix: str,
    stream: Stream,
    reference: Snapshot,
    cleanup: list[Ingester],
) -> None:
    """A member killed mid-stream comes back under its client id: the broker delivers what it
    had not acknowledged, and what queued for it meanwhile, after the others went on."""
    cleanup += await group(database, mqtt_url, prefix, members=3)
    half = len(stream.messages) // 2
    await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages[:half])

    async def some_acked() -> bool:
        return await acked(cleanup) >= half // 3

    await wait_until(some_acked, timeout=60, every=0.02)
    victim = cleanup[0]
    await victim.kill()
    await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages[half:])
    # The same client id (its session, with what it had not acknowledged); a port of its own.
    cleanup.append(await Ingester(without(victim.env, "INGEST_METRICS_PORT")).start())
    await stored_and_stopped_equal(database, stream, reference, cleanup)


async def test_scale_down_by_sigterm(
    database: Database,
    mqtt_url: str,
    prefix: str,
    stream: Stream,
    reference: Snapshot,
    cleanup: list[Ingester],
) -> None:
    cleanup += await group(database, mqtt_url, prefix, members=3)
    half = len(stream.messages) // 2
    await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages[:half])

    async def some_acked() -> bool:
        return await acked(cleanup) >= half // 3

    await wait_until(some_acked, timeout=60, every=0.02)
    leaving = cleanup[0]
    assert await leaving.stop() == 0, leaving.log.decode()
    assert b"ended" in leaving.log, leaving.log.decode()
    await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages[half:])
    await stored_and_stopped_equal(database, stream, reference, cleanup)


async def test_scale_up_mid_stream(
    database: Database,
    mqtt_url: str,
    prefix: str,
    stream: Stream,
    reference: Snapshot,
    cleanup: list[Ingester],
) -> None:
    share = f"g{uuid.uuid4().hex[:6]}"
    cleanup += await group(database, mqtt_url, prefix, members=1, name=share)
    third = len(stream.messages) // 3
    await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages[:third])
    cleanup += await group(database, mqtt_url, prefix, members=2, name=share)
    await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages[third:])
    await stored_and_stopped_equal(database, stream, reference, cleanup)


async def test_drain_of_an_orphaned_session(
    database: Database,
    mqtt_url: str,
    prefix: str,
    stream: Stream,
    reference: Snapshot,
    cleanup: list[Ingester],
) -> None:
    """A member is killed for good; its share of the stream waits in its session until
    `ingest drain` ingests it, after the other member stored the rest: all of it late."""
    cleanup += await group(database, mqtt_url, prefix, members=2)
    gone = cleanup[0]
    gone_id = gone.env["INGEST_MQTT_CLIENT_ID"]
    await gone.kill()
    try:
        await asyncio.to_thread(publish, mqtt_url, prefix, stream.messages)

        async def rest_stored() -> bool:
            return await stored(database, stream.site) >= READINGS // 2

        await wait_until(rest_stored, timeout=60)
        await asyncio.sleep(1)  # the living member has taken all of its share
        assert await stored(database, stream.site) < READINGS
        drain = Ingester(
            {**without(gone.env, "INGEST_METRICS_PORT"), "INGEST_MQTT_CLIENT_ID": "unused"},
            command=("drain", "--client-id", gone_id),
        )
        await drain.spawn()
        assert await drain.wait_exit(timeout=60) == 0, drain.log.decode()
        await all_stored(database, stream.site)
    finally:
        await asyncio.to_thread(purge_session, mqtt_url, gone_id)
    await stop_all(cleanup)
    check(await snapshot(database, stream.site), reference)
