"""The wide shape, small: many devices, 20 sensors each, one sample per sensor per message,
through a kill -9 and restarts, with one ingester and with two on a share group; readings and
rollups compared exactly with what was sent."""

from __future__ import annotations

import asyncio

import asyncpg
import numpy as np

from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env, share_group
from tests.support.mqtt import Publisher, purge_session
from tests.support.rows import assert_exactly_once
from tests.support.streams import T0, Row, batch_payload, f8, new_prefix, new_site

DEVICES, SENSORS, ROUNDS = 200, 20, 6
SECOND = 1_000_000


def wide_stream(site: str) -> tuple[list[list[tuple[str, bytes]]], set[Row]]:
    """Per round, one message per device holding one sample of each of its sensors."""
    rng = np.random.default_rng(18)
    rounds: list[list[tuple[str, bytes]]] = []
    rows: set[Row] = set()
    for r in range(ROUNDS):
        # Rounds 30 s apart: the stream crosses minute buckets, and an hour with the last.
        t = T0 + r * 30 * SECOND + (3_600 * SECOND if r == ROUNDS - 1 else 0)
        messages = []
        for d in range(DEVICES):
            device = f"{site}/area{d % 4}/line{d % 7}/plc-{d:03d}"
            values = np.round(rng.normal(50, 5, SENSORS), 6)
            channels = [
                {"s": f"tag.{s:02d}", "dt": 1, "v": f8([values[s]])} for s in range(SENSORS)
            ]
            messages.append((device, batch_payload(t, channels, seq=r)))
            rows.update((t, device, f"tag.{s:02d}", float(values[s]), 0) for s in range(SENSORS))
        rounds.append(messages)
    return rounds, rows


# Rows where the rollups differ from time_bucket over the stored readings, for a whole site.
ROLLUP_MISMATCH = """
WITH raw AS (
    SELECT time_bucket('{width}', r.time) AS bucket, r.sensor_id, min(value) AS min,
           max(value) AS max, sum(value) AS sum, count(*) AS count,
           (array_agg(value ORDER BY r.time))[1] AS first,
           (array_agg(value ORDER BY r.time DESC))[1] AS last,
           min(r.time) AS first_time, max(r.time) AS last_time
      FROM telemetry.readings r JOIN telemetry.sensors s ON s.id = r.sensor_id
      JOIN telemetry.devices d ON d.id = s.device_id
     WHERE d.path LIKE $1 || '/%' GROUP BY 1, 2
), got AS (
    SELECT v.* FROM telemetry.{table} v JOIN telemetry.sensors s ON s.id = v.sensor_id
      JOIN telemetry.devices d ON d.id = s.device_id WHERE d.path LIKE $1 || '/%'
)
SELECT coalesce(r.bucket, v.bucket) AS bucket, coalesce(r.sensor_id, v.sensor_id) AS sensor
  FROM raw r FULL JOIN got v ON v.bucket = r.bucket AND v.sensor_id = r.sensor_id
 WHERE r.bucket IS NULL OR v.bucket IS NULL OR r.min <> v.min OR r.max <> v.max
    OR abs(r.sum - v.sum) > 1e-9 * abs(r.sum) OR r.count <> v.count OR r.first <> v.first
    OR r.last <> v.last OR r.first_time <> v.first_time OR r.last_time <> v.last_time
"""


async def rollup_mismatches(db: Database, site: str, table: str) -> list[tuple[object, ...]]:
    width = "1 minute" if "1m" in table else "1 hour"
    conn = await asyncpg.connect(db.owner_url)
    try:
        rows = await conn.fetch(ROLLUP_MISMATCH.format(width=width, table=table), site)
    finally:
        await conn.close()
    return [tuple(r) for r in rows]


async def pending_partials(db: Database, site: str) -> int:
    conn = await asyncpg.connect(db.owner_url)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM telemetry.rollup_pending p"
            "  JOIN telemetry.sensors s ON s.id = p.sensor_id"
            "  JOIN telemetry.devices d ON d.id = s.device_id WHERE d.path LIKE $1 || '/%'",
            site,
        )
    finally:
        await conn.close()
    return n


async def test_wide_shape_through_a_kill_9_keeps_readings_and_rollups_exact(
    database: Database, mqtt_url: str
) -> None:
    site, prefix = new_site(), new_prefix()
    # Merges every half second, so that some happen mid-stream, between flushes and kills.
    env = ingester_env(
        database,
        mqtt_url,
        prefix,
        INGEST_MQTT_RECEIVE_MAXIMUM="100",
        INGEST_ROLLUPS_MERGE_INTERVAL_S="0.5",
    )
    rounds, expected = wide_stream(site)
    pub = Publisher(mqtt_url)
    try:
        first = await Ingester(env).start()
        for messages in rounds[:3]:
            for device, payload in messages:
                pub.publish(f"{prefix}/{device}", payload)
        await acked_at_least(first, DEVICES)  # the first sight of every sensor is committed
        await first.kill()  # mid-stream: flushes in flight, partials pending
        for messages in rounds[3:]:
            for device, payload in messages:
                pub.publish(f"{prefix}/{device}", payload)
        pub.wait()
    finally:
        pub.close()

    second = await Ingester(env).start()  # the same session: the rest and the redeliveries
    try:
        await assert_exactly_once(database, site, expected, running=[second])
        # Exact while partials may still be pending: the views add them to the merged rows.
        assert await rollup_mismatches(database, site, "rollup_1m_all") == []
        assert await rollup_mismatches(database, site, "rollup_1h_all") == []
    finally:
        assert await second.stop() == 0, second.log.decode()
        await asyncio.to_thread(purge_session, mqtt_url, env["INGEST_MQTT_CLIENT_ID"])
    # After a stop everything is merged, and the rollup tables alone are exact.
    assert await pending_partials(database, site) == 0
    # Each sensor's last_seen is its last reading (the last round is over a minute later).
    conn = await asyncpg.connect(database.analyst_url)
    try:
        last_seen = await conn.fetch(
            "SELECT DISTINCT (extract(epoch FROM last_seen) * 1000000)::int8 AS t"
            "  FROM telemetry.sensors_v WHERE device LIKE $1 || '/%'",
            site,
        )
    finally:
        await conn.close()
    assert [r["t"] for r in last_seen] == [max(row[0] for row in expected)]
    assert await rollup_mismatches(database, site, "rollup_1m") == []
    assert await rollup_mismatches(database, site, "rollup_1h") == []


async def test_wide_shape_over_two_ingesters_and_a_kill_9_keeps_rollups_exact(
    database: Database, mqtt_url: str
) -> None:
    site, prefix = new_site(), new_prefix()
    members = await share_group(
        database,
        mqtt_url,
        prefix,
        members=2,
        INGEST_MQTT_RECEIVE_MAXIMUM="100",
        INGEST_ROLLUPS_MERGE_INTERVAL_S="0.5",
    )
    rounds, expected = wide_stream(site)
    pub = Publisher(mqtt_url)
    try:
        for messages in rounds[:3]:
            for device, payload in messages:
                pub.publish(f"{prefix}/{device}", payload)
        for member in members:
            await acked_at_least(member, DEVICES // 4)
        # Each holds partials in memory and journal rows; one is killed with them.
        await members[0].kill()
        for messages in rounds[3:]:
            for device, payload in messages:
                pub.publish(f"{prefix}/{device}", payload)
        pub.wait()
    finally:
        pub.close()
    # The same client id (its session, with what it had not acknowledged); a port of its own.
    env = {k: v for k, v in members[0].env.items() if k != "INGEST_METRICS_PORT"}
    members[0] = await Ingester(env).start()
    try:
        await assert_exactly_once(database, site, expected, running=members)
        assert await rollup_mismatches(database, site, "rollup_1m_all") == []
        assert await rollup_mismatches(database, site, "rollup_1h_all") == []
    finally:
        for member in members:
            assert await member.stop() == 0, member.log.decode()
        for member in members:
            await asyncio.to_thread(purge_session, mqtt_url, member.env["INGEST_MQTT_CLIENT_ID"])
    assert await pending_partials(database, site) == 0
    assert await rollup_mismatches(database, site, "rollup_1m") == []
    assert await rollup_mismatches(database, site, "rollup_1h") == []
