"""Alerts end to end: a publisher, the broker, `ingest run` processes with their real anomaly
filters, the database, an HTTP receiver process and an MQTT subscriber."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.alerts import Receiver, seed_device
from tests.support.cluster import Database
from tests.support.ingester import Ingester, ingest_cli, ingester_env
from tests.support.mqtt import MqttWatch, Publisher
from tests.support.net import free_port
from tests.support.process import wait_until
from tests.support.streams import batch_payload, f8

pytestmark = pytest.mark.slow

RULES = [
    {
        "match": "*/spindle.temp",
        "max": 90.0,
        "alert": {
            "condition": "overheating",
            "severity": "major",
            "on_delay_s": 2.0,
            "off_delay_s": 2.0,
        },
    }
]


def alert_env(
    db: Database, mqtt_url: str, prefix: str, sinks: list[dict[str, Any]], **extra: str
) -> dict[str, str]:
    settings = {
        "INGEST_ANOMALY_RULES": json.dumps(RULES),
        "INGEST_ALERTS_SINKS": json.dumps(sinks),
        "INGEST_ALERTS_EVALUATE_INTERVAL_S": "0.2",
        "INGEST_ALERTS_RETRY_MIN_S": "0.1",
        "INGEST_ALERTS_RETRY_MAX_S": "0.5",
        "INGEST_ALERTS_TIMEOUT_S": "2",
    }
    return ingester_env(db, mqtt_url, prefix, **{**settings, **extra})


def overheating(
    pub: Publisher, prefix: str, device: str, *, start_us: int, seconds: int, hot: tuple[int, int]
) -> int:
    """One message per second of 10 readings (100 ms apart); spindle.temp at 120 degC during
    `hot` (seconds from the start), 50 otherwise. Returns the readings published."""
    for s in range(seconds):
        value = 120.0 if hot[0] <= s < hot[1] else 50.0
        payload = batch_payload(
            start_us + s * 1_000_000,
            [{"s": "spindle.temp", "dt": 100_000, "v": f8([value] * 10)}],
        )
        pub.publish(f"{prefix}/{device}", payload)
    pub.wait()
    return seconds * 10


def recent_us() -> int:
    """A data time two minutes ago: the stream ends before the ingester's clock."""
    return (time.time_ns() // 1000 // 1_000_000 - 120) * 1_000_000


async def outbox_rows(db: Database) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.owner_url)
    try:
        return await conn.fetch(
            "SELECT id, sink, alert_key, event, status, payload->>'id' AS nid"
            "  FROM telemetry.alert_outbox ORDER BY id"
        )
    finally:
        await conn.close()


async def test_one_incident_is_one_alert_at_every_sink_closed_when_it_ends(
    db: Database, mqtt_url: str, prefix: str, receiver: Receiver
) -> None:
    alerts_prefix = f"alerts-{uuid.uuid4().hex[:8]}"
    sinks = [
        {"type": "cloudevents", "name": "webhook", "url": f"{receiver.url}/hook"},
        {
            "type": "servicenow",
            "name": "itsm",
            "url": receiver.url,
            "username": "u",
            "password": "p",
        },
        {"type": "mqtt", "name": "broker", "url": mqtt_url, "topic_prefix": alerts_prefix},
    ]
    device = "plant1/press-shop/line1/press-01"
    watch = MqttWatch(mqtt_url, f"{alerts_prefix}/#")
    proc = await Ingester(alert_env(db, mqtt_url, prefix, sinks)).start()
    try:
        with Publisher(mqtt_url) as pub:
            overheating(pub, prefix, device, start_us=recent_us(), seconds=30, hot=(10, 20))

        async def all_delivered() -> bool:
            rows = await outbox_rows(db)
            return len(rows) == 6 and all(r["status"] == "delivered" for r in rows)

        await wait_until(all_delivered, timeout=60)

        async def mqtt_both() -> bool:
            return len(watch.received()) == 2

        await wait_until(mqtt_both)
    finally:
        watch.close()
        assert await proc.stop() == 0, proc.log.decode()
    key = f"{device}:overheating"
    assert receiver.events("/hook") == [("opened", key), ("resolved", key)]
    records = [
        json.loads(r["body"])["records"][0] for r in receiver.requests("/api/global/em/jsonv2")
    ]
    assert [(r["message_key"], r["severity"]) for r in records] == [(key, "2"), (key, "0")]
    topic = f"{alerts_prefix}/{device}/overheating"
    [(t1, opened, r1), (t2, cleared, _r2)] = watch.received()
    assert (t1, r1, json.loads(opened)["state"]) == (topic, False, "open")
    assert (t2, cleared) == (topic, b"")
    conn = await asyncpg.connect(db.analyst_url)
    try:
        row = await conn.fetchrow(
            "SELECT state, sensors FROM telemetry.alerts_v WHERE key = $1", key
        )
        assert row is not None
    finally:
        await conn.close()
    assert (row["state"], row["sensors"]) == ("resolved", ["spindle.temp"])


async def test_kill_9_between_commit_and_delivery_every_notification_arrives_once(
    db: Database, mqtt_url: str, prefix: str, receiver: Receiver
) -> None:
    sinks = [{"type": "cloudevents", "name": "webhook", "url": f"{receiver.url}/hook"}]
    env = alert_env(db, mqtt_url, prefix, sinks, INGEST_ALERTS_TIMEOUT_S="60")
    await receiver.answer({"hang": 5})  # the first request is received, then left hanging
    first = await Ingester(env).start()
    devices = [f"plant1/press-shop/line1/press-{n:02d}" for n in range(3)]
    with Publisher(mqtt_url) as pub:
        for device in devices:
            overheating(pub, prefix, device, start_us=recent_us(), seconds=20, hot=(5, 10))

    async def hanging() -> bool:
        return any(r["hung"] for r in receiver.requests())

    await wait_until(hanging, timeout=60)
    await first.kill()  # the request is out, its delivery not committed
    second = await Ingester(
        {**env, "INGEST_MQTT_CLIENT_ID": f"ingest-{uuid.uuid4().hex[:8]}"}
    ).start()
    try:

        async def all_delivered() -> bool:
            rows = await outbox_rows(db)
            return len(rows) == 6 and all(r["status"] == "delivered" for r in rows)

        await wait_until(all_delivered, timeout=90)
    finally:
        assert await second.stop() == 0, second.log.decode()
    ids = [r["nid"] for r in await outbox_rows(db)]
    processed = [r["id"] for r in receiver.requests() if not r["duplicate"]]
    assert sorted(processed) == sorted(ids)  # every notification, each processed once
    assert len(receiver.requests()) >= len(ids)
    for device in devices:
        key = f"{device}:overheating"
        assert [e for e in receiver.events() if e[1] == key] == [("opened", key), ("resolved", key)]


async def test_two_ingesters_share_the_outbox_without_sending_twice(
    db: Database, mqtt_url: str, prefix: str, receiver: Receiver
) -> None:
    sinks = [{"type": "cloudevents", "name": "webhook", "url": f"{receiver.url}/hook"}]
    # Small batches, slow answers and a short poll: both dispatchers find due rows to take,
    # however late either one starts listening.
    env = alert_env(
        db, mqtt_url, prefix, sinks, INGEST_ALERTS_BATCH="5", INGEST_ALERTS_POLL_INTERVAL_S="0.5"
    )
    procs = [
        await Ingester(
            {**env, "INGEST_MQTT_CLIENT_ID": f"ingest-{n}-{uuid.uuid4().hex[:6]}"}
        ).start()
        for n in range(2)
    ]
    await receiver.answer(*[{"hang": 0.3}] * 60)
    keys = [f"plant1/shop/line1/dev-{n:02d}:overheating" for n in range(20)]
    owner = await asyncpg.connect(db.owner_url)
    try:
        for key in keys:
            device = key.split(":")[0]
            await seed_device(owner, device, ["spindle.temp"])
            alert_id = await owner.fetchval(
                "INSERT INTO telemetry.alerts (key, device_id, condition, severity, state, phase)"
                " SELECT $1, id, 'overheating', 'major', 'resolved', 'resolved'"
                " FROM telemetry.devices WHERE path = $2 RETURNING id",
                key,
                device,
            )
            for v, event in enumerate(("opened", "updated", "resolved"), start=1):
                doc = {
                    "id": f"{alert_id}.{v}",
                    "key": key,
                    "event": event,
                    "device": device,
                    "at": "2026-01-01T00:00:00Z",
                }
                await owner.execute(
                    "INSERT INTO telemetry.alert_outbox (alert_id, alert_key, sink, event, payload)"
                    " VALUES ($1, $2, 'webhook', $3, $4::jsonb)",
                    alert_id,
                    key,
                    event,
                    json.dumps(doc),
                )
        await owner.execute("SELECT pg_notify('ingest_alert_outbox', '')")
    finally:
        await owner.close()
    try:

        async def all_delivered() -> bool:
            rows = await outbox_rows(db)
            return all(r["status"] == "delivered" for r in rows)

        await wait_until(all_delivered, timeout=90)
        sent = [await p.metric("ingest_alert_notifications_total") for p in procs]
    finally:
        for p in procs:
            assert await p.stop() == 0, p.log.decode()
    requests = receiver.requests()
    assert len(requests) == 60
    assert not any(r["duplicate"] for r in requests)
    assert sum(sent) == 60
    assert all(s > 0 for s in sent), f"one ingester sent everything: {sent}"
    for key in keys:
        assert [e[0] for e in receiver.events() if e[1] == key] == ["opened", "updated", "resolved"]


async def test_an_unreachable_sink_never_blocks_ingestion(
    db: Database, mqtt_url: str, prefix: str
) -> None:
    sinks = [{"type": "cloudevents", "name": "webhook", "url": f"http://127.0.0.1:{free_port()}/x"}]
    proc = await Ingester(alert_env(db, mqtt_url, prefix, sinks)).start()
    published = 0
    try:
        with Publisher(mqtt_url) as pub:
            for n in range(4):
                device = f"plant1/press-shop/line1/press-{n:02d}"
                published += overheating(
                    pub, prefix, device, start_us=recent_us(), seconds=15, hot=(3, 8)
                )

        async def all_stored() -> bool:
            conn = await asyncpg.connect(db.analyst_url)
            try:
                return bool(
                    await conn.fetchval("SELECT count(*) FROM telemetry.readings") == published
                )
            finally:
                await conn.close()

        await wait_until(all_stored, timeout=60)

        async def outbox_grew() -> bool:
            rows = await outbox_rows(db)
            return len(rows) == 8 and await proc.metric("ingest_alert_outbox_pending") == 8

        await wait_until(outbox_grew, timeout=60)
        assert all(r["status"] == "pending" for r in await outbox_rows(db))
        assert await proc.metric("ingest_alert_outbox_lag_seconds") > 0
        assert await proc.metric("ingest_alert_notifications_total") > 0  # retried ones
        # Ingestion goes on while the sink stays down.
        with Publisher(mqtt_url) as pub:
            published += overheating(
                pub,
                prefix,
                "plant1/press-shop/line1/press-09",
                start_us=recent_us(),
                seconds=5,
                hot=(9, 9),
            )
        await wait_until(all_stored, timeout=60)
    finally:
        assert await proc.stop() == 0, proc.log.decode()


def demo_rules() -> str:
    """The anomaly rules (with their alerts) that deploy/local/demo runs the demo plant with."""
    text = (Path(__file__).resolve().parent.parent / "deploy" / "local" / "demo").read_text()
    return text.split("<<'JSON'\n", 1)[1].split("\nJSON\n", 1)[0]


async def test_the_demo_plant_overheating_is_one_alert_per_incident_everywhere(
    db: Database, mqtt_url: str, prefix: str, receiver: Receiver
) -> None:
    alerts_prefix = f"alerts-{uuid.uuid4().hex[:8]}"
    sinks = [
        {"type": "cloudevents", "name": "webhook", "url": f"{receiver.url}/hook"},
        {"type": "servicenow", "name": "itsm", "url": receiver.url},
        {"type": "mqtt", "name": "broker", "url": mqtt_url, "topic_prefix": alerts_prefix},
    ]
    env = alert_env(db, mqtt_url, prefix, sinks, INGEST_ANOMALY_RULES=demo_rules())
    watch = MqttWatch(mqtt_url, f"{alerts_prefix}/#")
    proc = await Ingester(env).start()
    press = "plant1/press-shop/line1/press-01"
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 300))
    try:
        code, _out, err = await ingest_cli(
            *("simulate", "--url", mqtt_url, "--prefix", prefix, "--devices", "5"),
            *("--start", start, "--duration", "120", "--quiet"),
            # two incidents: overheating from 20 s to 50 s and from 80 s to 95 s
            *("--anomaly", f"overheat:{press}/spindle.temp@20+30"),
            *("--anomaly", f"overheat:{press}/spindle.temp@80+15"),
        )
        assert code == 0, err

        async def all_delivered() -> bool:
            rows = await outbox_rows(db)
            return len(rows) == 12 and all(r["status"] == "delivered" for r in rows)

        await wait_until(all_delivered, timeout=120)

        async def mqtt_all() -> bool:
            return len(watch.received()) == 4

        await wait_until(mqtt_all)
    finally:
        watch.close()
        assert await proc.stop() == 0, proc.log.decode()
    key = f"{press}:overheating"
    assert receiver.events("/hook") == [("opened", key), ("resolved", key)] * 2
    records = [
        json.loads(r["body"])["records"][0] for r in receiver.requests("/api/global/em/jsonv2")
    ]
    assert [(r["message_key"], r["severity"]) for r in records] == [(key, "2"), (key, "0")] * 2
    topic = f"{alerts_prefix}/{press}/overheating"
    assert [(t, p == b"") for t, p, _ in watch.received()] == [(topic, False), (topic, True)] * 2


async def test_silence_opens_when_a_device_stops_and_resolves_when_it_speaks_again(
    db: Database, mqtt_url: str, prefix: str, receiver: Receiver
) -> None:
    sinks = [{"type": "cloudevents", "name": "webhook", "url": f"{receiver.url}/hook"}]
    device = "plant1/press-shop/line1/press-07"
    env = alert_env(
        db,
        mqtt_url,
        prefix,
        sinks,
        INGEST_ALERTS_SILENCE_S="3",
        INGEST_ALERTS_SILENCE_MATCH="plant1/*",
    )
    proc = await Ingester(env).start()
    key = f"{device}:silence"
    try:
        with Publisher(mqtt_url) as pub:  # five seconds of data ending now, then nothing
            now_s = time.time_ns() // 1000 // 1_000_000
            overheating(
                pub, prefix, device, start_us=(now_s - 5) * 1_000_000, seconds=5, hot=(9, 9)
            )

        async def opened() -> bool:
            return receiver.events() == [("opened", key)]

        await wait_until(opened, timeout=60)
        with Publisher(mqtt_url) as pub:  # it speaks again
            now_s = time.time_ns() // 1000 // 1_000_000
            overheating(pub, prefix, device, start_us=now_s * 1_000_000, seconds=1, hot=(9, 9))

        async def resolved() -> bool:
            return receiver.events()[:2] == [("opened", key), ("resolved", key)]

        await wait_until(resolved, timeout=60)
    finally:
        assert await proc.stop() == 0, proc.log.decode()
    # It went quiet again after its one second: a second silence may have opened since.
    assert receiver.events() in (
        [("opened", key), ("resolved", key)],
        [("opened", key), ("resolved", key), ("opened", key)],
    )
