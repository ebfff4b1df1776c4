"""The outbox dispatcher and the sinks against real peers: an HTTP receiver process and the
stack's Mosquitto. Retries, Retry-After, permanent failures, order per alert, payloads."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
from prometheus_client import REGISTRY

from ingest.alerts.outbox import Dispatcher
from ingest.alerts.rules import Alerts, CloudEventsSink, MqttSink, PagerDutySink, ServiceNowSink
from ingest.alerts.sinks import retry_after
from tests.support.alerts import Receiver, seed_device
from tests.support.cluster import Database
from tests.support.mqtt import MqttWatch
from tests.support.process import wait_until


def note(key: str, event: str, n: int, **extra: Any) -> dict[str, Any]:
    device, condition = key.rsplit(":", 1)
    return {
        "id": f"1.{n}",
        "key": key,
        "event": event,
        "at": f"2026-03-04T05:06:{n:02d}.250000Z",
        "device": device,
        "asset": device.rsplit("/", 1)[0],
        "condition": condition,
        "severity": "major",
        "criticality": 4,
        "priority": 16,
        "state": "resolved" if event == "resolved" else "open",
        "since": "2026-03-04T05:06:00Z",
        "opened_at": "2026-03-04T05:06:01Z",
        "resolved_at": None,
        "sensors": ["spindle.temp"],
        "asset_type": "press",
        "team": "maintenance-a",
        "ci_id": "CI0042",
        **extra,
    }


async def enqueue(
    owner: asyncpg.Connection, sink: str, notes: list[dict[str, Any]], device: str | None = None
) -> None:
    """Outbox rows as the evaluator writes them (an alert row per key first)."""
    for doc in notes:
        dev = doc["device"]
        if not await owner.fetchval("SELECT 1 FROM telemetry.devices WHERE path = $1", dev):
            await seed_device(owner, dev, ["spindle.temp"])
        alert_id = await owner.fetchval(
            "INSERT INTO telemetry.alerts (key, device_id, condition, severity, state, phase)"
            " SELECT $1, id, $2, 'major', 'open', 'open' FROM telemetry.devices WHERE path = $3"
            " ON CONFLICT (key) DO UPDATE SET version = telemetry.alerts.version RETURNING id",
            doc["key"],
            doc["condition"],
            dev,
        )
        await owner.execute(
            "INSERT INTO telemetry.alert_outbox (alert_id, alert_key, sink, event, payload)"
            " VALUES ($1, $2, $3, $4, $5::jsonb)",
            alert_id,
            doc["key"],
            sink,
            doc["event"],
            json.dumps(doc),
        )


def settings(*sinks: Any, **kw: Any) -> Alerts:
    base: dict[str, Any] = {"retry_min_s": 0.05, "retry_max_s": 0.2, "timeout_s": 2.0}
    return Alerts(sinks=sinks, **{**base, **kw})


async def drain(d: Dispatcher, conn: asyncpg.Connection, *, timeout: float = 30) -> None:  # noqa: ASYNC109
    """Run passes until nothing is pending."""

    async def done() -> bool:
        await d.pass_once(conn)
        return not await conn.fetchval(
            "SELECT count(*) FROM telemetry.alert_outbox WHERE status = 'pending'"
        )

    await wait_until(done, timeout=timeout, every=0.05)


async def deliveries(conn: asyncpg.Connection) -> list[tuple[str, str, str, int, str | None]]:
    rows = await conn.fetch(
        "SELECT alert_key, event, status, attempts, last_error FROM telemetry.alert_deliveries_v ORDER BY id"
    )
    return [tuple(r) for r in rows]


def count(sink: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "ingest_alert_notifications_total", {"sink": sink, "outcome": outcome}
    )
    return value or 0.0


async def test_a_resolve_never_overtakes_its_open_through_retries(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection, receiver: Receiver
) -> None:
    sink = CloudEventsSink(name="hook", url=f"{receiver.url}/hook")
    d = Dispatcher(settings=settings(sink))
    key_a, key_b = "p/a/l/press-01:overheating", "p/a/l/press-02:overheating"
    await enqueue(
        owner_conn,
        "hook",
        [note(key_a, "opened", 1), note(key_b, "opened", 2), note(key_a, "resolved", 3)],
    )
    retried = count("hook", "retried")
    await receiver.answer({"status": 500}, {"status": 503})
    await drain(d, service)
    # The first pass takes both opens (a's resolve waits behind a's open); both fail, are
    # retried after a backoff, then the resolve follows its open.
    got = [(r["status"], r["id"]) for r in receiver.requests()]
    # Across alerts the order is free (sent concurrently, retried with jitter) ...
    assert sorted(got) == [
        (200, "1.1"),
        (200, "1.2"),
        (200, "1.3"),
        (500, "1.1"),
        (503, "1.2"),
    ] or sorted(got) == [(200, "1.1"), (200, "1.2"), (200, "1.3"), (500, "1.2"), (503, "1.1")]
    # ... within one alert it is the outbox's: a's resolve only after a's open got through.
    ids = [i for _, i in got]
    assert ids.index("1.3") > max(n for n, i in enumerate(ids) if i == "1.1")
    assert count("hook", "retried") - retried == 2
    assert [r[:4] for r in await deliveries(owner_conn)] == [
        (key_a, "opened", "delivered", 2),
        (key_b, "opened", "delivered", 2),
        (key_a, "resolved", "delivered", 1),
    ]


async def test_cloudevents_structured_json(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection, receiver: Receiver
) -> None:
    sink = CloudEventsSink(
        name="hook", url=f"{receiver.url}/hook", headers={"Authorization": "Bearer t0ken"}
    )
    await enqueue(owner_conn, "hook", [note("plant1/shop/line1/press-01:overheating", "opened", 7)])
    await drain(Dispatcher(settings=settings(sink)), service)
    [req] = receiver.requests()
    assert req["headers"]["content-type"] == "application/cloudevents+json"
    assert req["headers"]["authorization"] == "Bearer t0ken"
    event = json.loads(req["body"])
    assert {k: v for k, v in event.items() if k != "data"} == {
        "specversion": "1.0",
        "id": "1.7",
        "source": "/ingest/alerts",
        "type": "io.ingest.alert.opened",
        "subject": "plant1/shop/line1/press-01",
        "time": "2026-03-04T05:06:07.250000Z",
        "datacontenttype": "application/json",
    }
    assert event["data"]["key"] == "plant1/shop/line1/press-01:overheating"


async def test_servicenow_payload_field_by_field(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection, receiver: Receiver
) -> None:
    sink = ServiceNowSink(name="itsm", url=receiver.url, username="ingest", password="s3cret")
    key = "plant1/shop/line1/press-01:overheating"
    await enqueue(owner_conn, "itsm", [note(key, "opened", 7), note(key, "resolved", 9)])
    await drain(Dispatcher(settings=settings(sink)), service)
    opened, resolved = receiver.requests()
    assert opened["path"] == "/api/global/em/jsonv2"
    assert opened["headers"]["authorization"] == "Basic aW5nZXN0OnMzY3JldA=="  # ingest:s3cret
    assert opened["headers"]["content-type"] == "application/json"
    [record] = json.loads(opened["body"])["records"]
    info = json.loads(record.pop("additional_info"))
    assert record == {
        "source": "ingest",
        "node": "plant1/shop/line1/press-01",
        "type": "overheating",
        "resource": "spindle.temp",
        "metric_name": "overheating",
        "message_key": key,
        "severity": "2",
        "time_of_event": "2026-03-04 05:06:07",
        "description": "overheating on plant1/shop/line1/press-01 opened (severity major, priority 16, sensors spindle.temp)",
    }
    assert info == {
        "asset": "plant1/shop/line1",
        "asset_path": "plant1/shop/line1/press-01",
        "ci_id": "CI0042",
        "criticality": "4",
        "notification_id": "1.7",
        "priority": "16",
        "state": "open",
        "team": "maintenance-a",
    }
    assert all(isinstance(v, str) for v in info.values())
    [clear] = json.loads(resolved["body"])["records"]
    assert (clear["severity"], clear["message_key"], clear["time_of_event"]) == (
        "0",
        key,
        "2026-03-04 05:06:09",
    )


async def test_pagerduty_trigger_and_resolve(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection, receiver: Receiver
) -> None:
    sink = PagerDutySink(name="pd", routing_key="R0UT1NG", url=f"{receiver.url}/v2/enqueue")
    key = "plant1/shop/line1/press-01:overheating"
    await enqueue(owner_conn, "pd", [note(key, "opened", 1), note(key, "resolved", 2)])
    await drain(Dispatcher(settings=settings(sink)), service)
    trigger, resolve = (json.loads(r["body"]) for r in receiver.requests())
    assert (trigger["event_action"], trigger["dedup_key"], trigger["routing_key"]) == (
        "trigger",
        key,
        "R0UT1NG",
    )
    assert trigger["payload"]["severity"] == "error"
    assert trigger["payload"]["source"] == "plant1/shop/line1/press-01"
    assert resolve == {"routing_key": "R0UT1NG", "event_action": "resolve", "dedup_key": key}


async def test_429_waits_for_retry_after_and_other_4xx_fail_at_once(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection, receiver: Receiver
) -> None:
    sink = CloudEventsSink(name="hook", url=f"{receiver.url}/hook")
    d = Dispatcher(settings=settings(sink))
    await enqueue(owner_conn, "hook", [note("p/a/l/d1:c", "opened", 1)])
    await receiver.answer({"status": 429, "retry_after": "3600"})
    await d.pass_once(service)
    wait = await service.fetchval(
        "SELECT extract(epoch FROM next_attempt - now()) FROM telemetry.alert_outbox"
    )
    assert 3500 < wait <= 3600  # the receiver's hour, not the backoff's fraction of a second
    assert await d.pass_once(service) == 0  # not due
    failed = count("hook", "failed")
    await enqueue(owner_conn, "hook", [note("p/a/l/d2:c", "opened", 2)])
    await receiver.answer({"status": 400})
    await d.pass_once(service)
    assert await deliveries(owner_conn) == [
        ("p/a/l/d1:c", "opened", "pending", 1, "HTTP 429"),
        ("p/a/l/d2:c", "opened", "failed", 1, "HTTP 400"),
    ]
    assert count("hook", "failed") - failed == 1
    assert len(receiver.requests()) == 2
    await d.gauges(service)
    assert REGISTRY.get_sample_value("ingest_alert_outbox_failed") == 1


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert retry_after("120", now=now) == 120
    assert retry_after("Wed, 04 Mar 2026 05:07:07 GMT", now=now) == 60
    assert retry_after("soon", now=now) is None
    assert retry_after(None) is None


async def test_failed_after_max_attempts_and_a_refusing_sink_is_retried(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection, receiver: Receiver
) -> None:
    sink = CloudEventsSink(name="hook", url=f"{receiver.url}/hook")
    d = Dispatcher(settings=settings(sink, max_attempts=3))
    await enqueue(owner_conn, "hook", [note("p/a/l/d1:c", "opened", 1)])
    await receiver.stop()  # refuses connections from now on
    await drain(d, service)
    [(_key, _event, status, attempts, error)] = await deliveries(owner_conn)
    assert (status, attempts) == ("failed", 3)
    assert error is not None
    assert "Connect" in error


async def test_a_timed_out_request_is_retried_and_the_receiver_sees_it_twice(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection, receiver: Receiver
) -> None:
    sink = CloudEventsSink(name="hook", url=f"{receiver.url}/hook")
    d = Dispatcher(settings=settings(sink, timeout_s=0.5))
    await enqueue(owner_conn, "hook", [note("p/a/l/d1:c", "opened", 1)])
    await receiver.answer({"hang": 2})
    await drain(d, service)
    first, second = receiver.requests()
    assert (first["id"], first["hung"], first["duplicate"]) == ("1.1", True, False)
    assert (second["id"], second["duplicate"]) == ("1.1", True)
    assert [r[2:4] for r in await deliveries(owner_conn)] == [("delivered", 2)]


async def test_mqtt_retained_while_open_and_cleared_on_resolve(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection, mqtt_url: str
) -> None:
    prefix = f"alerts-{uuid.uuid4().hex[:8]}"
    sink = MqttSink(name="broker", url=mqtt_url, topic_prefix=prefix)
    d = Dispatcher(settings=settings(sink))
    key = "plant1/shop/line1/press-01:overheating"
    topic = f"{prefix}/plant1/shop/line1/press-01/overheating"
    watch = MqttWatch(mqtt_url, f"{prefix}/#")
    try:
        await enqueue(owner_conn, "broker", [note(key, "opened", 1)])
        await drain(d, service)
        late = MqttWatch(mqtt_url, f"{prefix}/#")  # subscribes after: gets the retained alert

        async def late_got_it() -> bool:
            return bool(late.received())

        await wait_until(late_got_it)
        [(t, payload, retained)] = late.received()
        late.close()
        assert (t, retained, json.loads(payload)["key"]) == (topic, True, key)

        await enqueue(owner_conn, "broker", [note(key, "resolved", 2)])
        await drain(d, service)

        async def both() -> bool:
            return len(watch.received()) == 2

        await wait_until(both)
        assert [(t, p == b"") for t, p, _ in watch.received()] == [(topic, False), (topic, True)]
        later = MqttWatch(mqtt_url, f"{prefix}/#")
        await asyncio.sleep(0.5)  # nothing retained may arrive; no timing is asserted
        assert later.received() == []
        later.close()
    finally:
        watch.close()
        for s in d.sinks.values():
            await s.aclose()


async def test_the_dispatcher_wakes_on_notify_and_stops_when_told(
    db: Database, owner_conn: asyncpg.Connection, receiver: Receiver
) -> None:
    # A poll interval of ten minutes: only the NOTIFY of the evaluator's commit can wake it.
    sink = CloudEventsSink(name="hook", url=f"{receiver.url}/hook")
    d = Dispatcher(settings=settings(sink, poll_interval_s=600.0))
    stop = asyncio.Event()
    task = asyncio.create_task(d.run(dsn=db.ingest_url, stop=stop))
    try:

        async def connected() -> bool:  # the dispatcher's session is up (it then LISTENs)
            return bool(
                await owner_conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND usename = 'ingest'"
                )
            )

        await wait_until(connected)
        await asyncio.sleep(1)  # let it reach its wait; nothing below depends on how long
        async with owner_conn.transaction():
            await enqueue(owner_conn, "hook", [note("p/a/l/d1:c", "opened", 1)])
            await owner_conn.execute("SELECT pg_notify('ingest_alert_outbox', '')")

        async def delivered() -> bool:
            return len(receiver.requests()) == 1

        await wait_until(delivered, timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)  # returns on stop, not after ten minutes
