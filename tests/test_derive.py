"""End to end: rollups and anomaly events computed on the way in, across flushes and restarts."""

from __future__ import annotations

import json
import math

import asyncpg
import numpy as np

from ingest.db.registry import Registry
from ingest.db.sink import Readings
from ingest.derive import Deriver
from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env
from tests.support.mqtt import Publisher
from tests.support.streams import T0, publish_series

HZ_US = 100_000  # 10 readings per second
N = 600
RULES = [
    {
        "match": "*/line1/*",
        "spike_window": 20,
        "spike_threshold": 6.0,
        "spike_min_sigma": 1.0,
        "drift_window": 20,
        "drift_baseline": 100,
        "drift_sigma": 4.0,
        "drift_min_sigma": 2.0,
        "flatline_count": 20,
    }
]


def signals() -> dict[str, np.ndarray]:
    """Four sensors of one device: one clean, one spike, one drift, one flatline, from i = 300."""
    i = np.arange(N)
    rng = np.random.default_rng(11)
    base = {
        name: 50 + np.sin(2 * math.pi * i / 100) + rng.uniform(-0.1, 0.1, N)
        for name in ("clean", "spiky", "drifting", "stuck")
    }
    base["spiky"][300] += 100.0
    base["drifting"][300:] += np.minimum(np.arange(N - 300) * 0.5, 20.0)  # a 20-unit shift
    base["stuck"][300:400] = base["stuck"][300]
    return {name: np.round(v, 6) for name, v in base.items()}


async def test_anomalies_and_rollups_survive_flush_splits_and_a_restart(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    site = f"site{np.random.default_rng().integers(1 << 30)}"
    device = f"{site}/line1/press-1"
    values = signals()
    env = ingester_env(database, mqtt_url, prefix, INGEST_ANOMALY_RULES=json.dumps(RULES))

    first = await Ingester(env).start()
    with Publisher(mqtt_url) as pub:
        sent = publish_series(pub, f"{prefix}/{device}", values, 0, 350, 37, dt_us=HZ_US)
    await acked_at_least(first, sent)
    assert await first.stop() == 0
    second = await Ingester(env).start()  # a new process: state rebuilt from the database
    with Publisher(mqtt_url) as pub:
        sent = publish_series(pub, f"{prefix}/{device}", values, 350, N, 23, dt_us=HZ_US)
        # A device resending its first half: stored once, rolled up once, detected once.
        sent += publish_series(pub, f"{prefix}/{device}", values, 0, 350, 50, dt_us=HZ_US)
    await acked_at_least(second, sent)
    assert await second.metric("ingest_readings_duplicate_total") == 4 * 350
    assert await second.stop() == 0

    conn = await asyncpg.connect(database.analyst_url)
    try:
        events = await conn.fetch(
            "SELECT sensor, kind, (extract(epoch FROM ts) * 1000000)::int8 AS start,"
            "       (extract(epoch FROM end_ts) * 1000000)::int8 AS end"
            "  FROM telemetry.anomalies_v WHERE device = $1 ORDER BY sensor, kind",
            device,
        )
        mismatched = await conn.fetch(
            ROLLUP_CHECK.format(table="rollup_1m_v", width="1 minute"), device
        )
        mismatched += await conn.fetch(
            ROLLUP_CHECK.format(table="rollup_1h_v", width="1 hour"), device
        )
        counts = await conn.fetch(
            "SELECT sensor, sum(count) AS n FROM telemetry.rollup_1m_v WHERE device = $1 GROUP BY 1 ORDER BY 1",
            device,
        )
    finally:
        await conn.close()
    got = {(e["sensor"], e["kind"]): (e["start"], e["end"]) for e in events}
    assert len(events) == 3, [tuple(e) for e in events]
    assert got[("spiky", "spike")] == (T0 + 300 * HZ_US, T0 + 300 * HZ_US)
    assert got[("stuck", "flatline")] == (T0 + 300 * HZ_US, T0 + 399 * HZ_US)
    drift_start, drift_end = got[("drifting", "drift")]
    assert T0 + 300 * HZ_US < drift_start < drift_end < T0 + N * HZ_US
    assert [tuple(r) for r in counts] == [(s, N) for s in ("clean", "drifting", "spiky", "stuck")]
    assert [tuple(r) for r in mismatched] == []


# Rows where the ingester's rollup differs from time_bucket over the stored raw readings.
ROLLUP_CHECK = """
WITH raw AS (
    SELECT time_bucket('{width}', ts) AS bucket, sensor, min(value) AS min, max(value) AS max,
           avg(value) AS avg, count(*) AS count,
           (array_agg(value ORDER BY ts))[1] AS first,
           (array_agg(value ORDER BY ts DESC))[1] AS last,
           min(ts) AS first_time, max(ts) AS last_time
      FROM telemetry.readings_v WHERE device = $1 GROUP BY 1, 2
)
SELECT coalesce(r.bucket, v.bucket) AS bucket, coalesce(r.sensor, v.sensor) AS sensor
  FROM raw r FULL JOIN telemetry.{table} v
    ON v.device = $1 AND v.bucket = r.bucket AND v.sensor = r.sensor
 WHERE (v.device = $1 OR v.device IS NULL)
   AND (r.bucket IS NULL OR v.bucket IS NULL OR r.min <> v.min OR r.max <> v.max
        OR abs(r.avg - v.avg) > 1e-9 * abs(r.avg) OR r.count <> v.count OR r.first <> v.first
        OR r.last <> v.last OR r.first_time <> v.first_time OR r.last_time <> v.last_time)
"""


def test_split_keeps_each_sensor_in_one_part() -> None:
    """Without asset rules a flush's parts are runs of whole sensors, views of the slab,
    which together hold every row once, in order."""
    deriver = Deriver(rules=[], rollups=False, registry=Registry())
    sensor = np.array([1, 1, 1, 2, 3, 3, 3, 3, 4, 7], np.int32)
    time = np.arange(len(sensor), dtype=np.int64)
    value = np.arange(len(sensor), dtype=np.float64) / 2
    slab = Readings(time, sensor, value, np.zeros(len(sensor), np.uint8))
    assert deriver.split(slab, 1) == [slab]
    for parts in (2, 3, 4):
        got = deriver.split(slab, parts)
        assert len(got) == parts
        assert np.concatenate([p.time for p in got]).tolist() == time.tolist()
        assert np.concatenate([p.value for p in got]).tolist() == value.tolist()
        owners = [{int(s) for s in p.sensor} for p in got]
        for i, a in enumerate(owners):
            assert all(not a & b for b in owners[i + 1 :])
        assert all(np.shares_memory(p.time, time) for p in got if len(p))
    assert [p.sensor.tolist() for p in deriver.split(slab, 2)] == [
        [1, 1, 1, 2],  # the cut at row 5 moved back to where sensor 3 starts
        [3, 3, 3, 3, 4, 7],
    ]
