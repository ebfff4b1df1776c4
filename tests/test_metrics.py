"""Metrics, health endpoints and logs of a running ingester."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest

from ingest.metrics import BatchHistogram, reason_field
from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env
from tests.support.mqtt import Publisher
from tests.support.net import http_get
from tests.support.streams import T0
from tests.support.tools import promtool


@pytest.mark.parametrize(
    ("reason", "field"),
    [
        ("ch[3].v: length 23 is not a multiple of 8", "ch.v"),
        ("ch[0].q[12]: 300 is above the maximum 255", "ch.q"),
        ("payload: 2000000 bytes exceeds the 1048576-byte limit", "payload"),
        ("topic: level 2 after the prefix 'a b' has a character outside ...", "topic"),
        ("content-type: 'text/csv' is not application/msgpack or application/json", "content-type"),
        ("x' OR 1=1 --: nonsense", "other"),
        ("no colon at all and much longer than any field name could be", "other"),
    ],
)
def test_dead_letter_label_is_the_field_without_indices(reason: str, field: str) -> None:
    assert reason_field(reason) == field


def test_batch_histogram_exposes_what_a_histogram_observing_each_value_does() -> None:
    # Binary fractions: the sum is exact in any order. Values on a bound count in its bucket.
    buckets = (0.0078125, 0.25, 1.0, 60.0)
    values = [0.0, 0.0078125, 0.015625, 0.25, 0.375, 1.0, 59.5, 60.0, 100.0]
    batch = BatchHistogram("lag_seconds", "Lag.", buckets=buckets)
    batch.observe_many(np.array(values[:4]))
    batch.observe_many(np.array(values[4:]))
    batch.observe_many(np.empty(0))
    one = CollectorRegistry()
    each = Histogram("lag_seconds", "Lag.", buckets=buckets, registry=one)
    for v in values:
        each.observe(v)
    got = generate_latest(REGISTRY).decode().splitlines()
    want = generate_latest(one).decode().splitlines()
    assert [
        line for line in got if line.startswith(("lag_seconds", "# HELP lag", "# TYPE lag"))
    ] == [line for line in want if "_created" not in line]
    REGISTRY.unregister(batch)


async def test_live_ingester_serves_metrics_health_and_json_logs(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    proc = await Ingester(
        ingester_env(database, mqtt_url, prefix, INGEST_LOG_FORMAT="json")
    ).start()
    try:
        good = msgspec.msgpack.encode(
            {"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 1, "v": [1.0, 2.0]}]}
        )
        with Publisher(mqtt_url) as pub:
            pub.publish(f"{prefix}/site/dev-1", good)
            pub.publish(f"{prefix}/site/dev-1", b"\xc1")
            pub.publish(f"{prefix}/site/dev-1", msgspec.msgpack.encode({"v": 9}))

        await acked_at_least(proc, 3)
        assert await http_get(proc.port, "/healthz") == (200, b"ok\n")
        assert await http_get(proc.port, "/readyz") == (
            200,
            b"broker: connected\ndatabase: connected\nschema: current\n",
        )
        assert (await http_get(proc.port, "/nope"))[0] == 404
        status, body = await http_get(proc.port, "/metrics")
        assert status == 200
        text = body.decode()
        assert 'ingest_dead_letters_total{field="payload"} 1.0' in text
        assert 'ingest_dead_letters_total{field="v"} 1.0' in text
        assert "ingest_readings_written_total 2.0" in text
        assert "ingest_ready 1.0" in text
        assert "ingest_sensors_known 1.0" in text
        promtool("check", "metrics", stdin=text)  # Prometheus's own linter, on live values
    finally:
        assert await proc.stop() == 0
    lines = proc.log.decode().splitlines()
    assert lines, "no log lines"
    entries = [msgspec.json.decode(line) for line in lines]  # every line is one JSON object
    assert all(set(e) >= {"ts", "level", "logger", "msg"} for e in entries)
    assert entries[-1]["msg"] == "stopped"
    assert any(e["logger"] == "ingest.source" and "subscribed" in e["msg"] for e in entries)
    # One line per notable event, never one per message.
    assert len(entries) < 10
