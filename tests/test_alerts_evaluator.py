"""The alert evaluator against the real database: exact alert rows and outbox notifications
from committed anomaly events, one evaluator or several at once."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import asyncpg

from ingest.alerts.evaluator import Evaluator
from ingest.alerts.latest import newest_readings
from ingest.alerts.rules import AlertRule, Alerts, CloudEventsSink
from ingest.anomaly.rules import AnomalyRule
from tests.support.alerts import anomaly, at, now_base, readings_until, seed_device
from tests.support.cluster import Database

HOOK = CloudEventsSink(name="hook", url="http://127.0.0.1:9/hook")
OVERHEAT = AnomalyRule(
    match="*/temp",
    max=90.0,
    alert=AlertRule(condition="overheating", severity="major", on_delay_s=5, off_delay_s=3),
)
STUCK = AnomalyRule(
    match="*/pressure", flatline_count=10, alert=AlertRule(condition="stuck", severity="minor")
)


async def outbox(conn: asyncpg.Connection) -> list[tuple[str, str, str, str]]:
    rows = await conn.fetch(
        "SELECT alert_key, event, payload::text FROM telemetry.alert_outbox ORDER BY id"
    )
    out = []
    for r in rows:
        doc = json.loads(r["payload"])
        out.append((r["alert_key"], r["event"], doc["at"][11:19], doc["state"]))
    return out


async def test_on_delay_and_off_delay_write_one_open_and_one_resolve(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    base = now_base().replace(second=0)
    dev = "plant1/press-shop/line1/press-01"
    ids = await seed_device(owner_conn, dev, ["temp"])
    await owner_conn.execute(
        "INSERT INTO telemetry.asset_meta (path, criticality, ci_id) VALUES"
        " ('plant1/press-shop', 4, 'CI-SHOP'), ($1, NULL, 'CI-PRESS-01')",
        dev,
    )
    ev = Evaluator(rules=[OVERHEAT], settings=Alerts(sinks=(HOOK,)))
    key = f"{dev}:overheating"

    await readings_until(owner_conn, ids["temp"], at(base, 0), at(base, 12))
    await anomaly(owner_conn, ids["temp"], "range", at(base, 10), None)
    await ev.evaluate(service)
    state = await owner_conn.fetchval("SELECT state FROM telemetry.alerts_v WHERE key = $1", key)
    assert state == "pending"
    assert await outbox(owner_conn) == []

    await readings_until(owner_conn, ids["temp"], at(base, 13), at(base, 16))
    await ev.evaluate(service)
    assert await outbox(owner_conn) == [(key, "opened", f"{at(base, 15):%H:%M:%S}", "open")]

    await anomaly(owner_conn, ids["temp"], "range", at(base, 10), at(base, 20))
    await readings_until(owner_conn, ids["temp"], at(base, 17), at(base, 22))
    await ev.evaluate(service)
    assert len(await outbox(owner_conn)) == 1  # absent for 2 s of a 3 s off-delay

    await readings_until(owner_conn, ids["temp"], at(base, 23), at(base, 23))
    await ev.evaluate(service)
    await ev.evaluate(service)  # once more: nothing new
    assert await outbox(owner_conn) == [
        (key, "opened", f"{at(base, 15):%H:%M:%S}", "open"),
        (key, "resolved", f"{at(base, 23):%H:%M:%S}", "resolved"),
    ]
    row = await owner_conn.fetchrow("SELECT * FROM telemetry.alerts_v WHERE key = $1", key)
    assert row is not None
    assert row["asset"] == "plant1/press-shop/line1"
    assert (row["device"], row["condition"], row["severity"]) == (dev, "overheating", "major")
    assert (row["criticality"], row["priority"], row["ci_id"]) == (4, 16, "CI-PRESS-01")
    assert row["state"] == "resolved"
    assert (row["opened_at"], row["resolved_at"]) == (at(base, 15), at(base, 23))
    assert row["sensors"] == ["temp"]
    payload = json.loads(
        await owner_conn.fetchval("SELECT payload::text FROM telemetry.alert_outbox LIMIT 1")
    )
    assert payload["priority"] == 16
    assert payload["ci_id"] == "CI-PRESS-01"
    assert payload["key"] == key
    assert "major" not in payload["key"]


async def test_three_evaluators_at_once_write_what_one_writes(
    db: Database, owner_conn: asyncpg.Connection
) -> None:
    base = now_base().replace(second=0)
    devices = [f"plant1/press-shop/line1/press-{n:02d}" for n in range(6)]
    for n, dev in enumerate(devices):
        ids = await seed_device(owner_conn, dev, ["temp"])
        await readings_until(owner_conn, ids["temp"], at(base, 0), at(base, 40))
        # n+1 incidents of 8 s each, 10 s apart
        for k in range(n % 3 + 1):
            await anomaly(owner_conn, ids["temp"], "range", at(base, 10 * k), at(base, 10 * k + 8))
    ev = Evaluator(rules=[OVERHEAT], settings=Alerts(sinks=(HOOK,)))
    conns = [await asyncpg.connect(db.ingest_url) for _ in range(3)]
    try:
        for _ in range(3):
            await asyncio.gather(*(ev.evaluate(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    got = await outbox(owner_conn)
    # Gaps of 2 s are shorter than the 3 s off-delay: each device has one incident.
    expected = []
    for n, dev in enumerate(devices):
        end = 10 * (n % 3) + 8
        expected += [
            (f"{dev}:overheating", "opened", f"{at(base, 5):%H:%M:%S}", "open"),
            (f"{dev}:overheating", "resolved", f"{at(base, end + 3):%H:%M:%S}", "resolved"),
        ]
    assert sorted(got) == sorted(expected)


async def test_flatlined_device_holds_back_its_other_alerts(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    base = now_base().replace(second=0)
    dev = "plant2/assembly/line1/robot-03"
    ids = await seed_device(owner_conn, dev, ["temp", "pressure"])
    for sensor in ("temp", "pressure"):
        await readings_until(owner_conn, ids[sensor], at(base, 0), at(base, 40))
    await anomaly(owner_conn, ids["pressure"], "flatline", at(base, 5), at(base, 30))
    await anomaly(owner_conn, ids["temp"], "range", at(base, 8), None)
    ev = Evaluator(rules=[OVERHEAT, STUCK], settings=Alerts(sinks=(HOOK,)))
    await ev.evaluate(service)
    assert sorted(await outbox(owner_conn)) == sorted(
        [
            (f"{dev}:stuck", "opened", f"{at(base, 5):%H:%M:%S}", "open"),
            (f"{dev}:stuck", "resolved", f"{at(base, 30):%H:%M:%S}", "resolved"),
            # on-delay done at 13, held back until the flatline ended at 30
            (f"{dev}:overheating", "opened", f"{at(base, 30):%H:%M:%S}", "open"),
        ]
    )


async def test_silence_opens_by_the_database_clock_and_resolves_on_the_next_reading(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    base = now_base()
    dev = "plant1/press-shop/line1/press-09"
    ids = await seed_device(owner_conn, dev, ["temp"])
    other = await seed_device(owner_conn, "plant9/elsewhere/line1/dev", ["temp"])
    await readings_until(owner_conn, ids["temp"], at(base, 0), at(base, 10))
    await readings_until(owner_conn, other["temp"], at(base, 0), at(base, 10))
    settings = Alerts(silence_s=5, silence_match="plant1/*", sinks=(HOOK,))
    ev = Evaluator(rules=[], settings=settings)
    await ev.evaluate(service)
    await ev.evaluate(service)
    key = f"{dev}:silence"
    assert await outbox(owner_conn) == [(key, "opened", f"{at(base, 15):%H:%M:%S}", "open")]
    latest = now_base() + timedelta(seconds=60)
    await readings_until(owner_conn, ids["temp"], latest, latest)
    await ev.evaluate(service)
    await ev.evaluate(service)
    assert await outbox(owner_conn) == [
        (key, "opened", f"{at(base, 15):%H:%M:%S}", "open"),
        (key, "resolved", f"{latest:%H:%M:%S}", "resolved"),
    ]
    assert (
        await owner_conn.fetchval("SELECT severity FROM telemetry.alerts_v WHERE key = $1", key)
        == "major"
    )


async def test_a_sink_gets_only_the_alerts_it_asks_for(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    base = now_base().replace(second=0)
    ids = await seed_device(owner_conn, "plant1/a/l/dev", ["temp", "pressure"])
    for sensor in ("temp", "pressure"):
        await readings_until(owner_conn, ids[sensor], at(base, 0), at(base, 20))
    await anomaly(owner_conn, ids["pressure"], "flatline", at(base, 0), at(base, 2))
    await anomaly(owner_conn, ids["temp"], "range", at(base, 3), None)
    sinks = (
        HOOK,
        CloudEventsSink(name="majors", url="http://127.0.0.1:9/", min_severity="major"),
        CloudEventsSink(name="stuck", url="http://127.0.0.1:9/", match="*/stuck"),
    )
    ev = Evaluator(rules=[OVERHEAT, STUCK], settings=Alerts(sinks=sinks))
    await ev.evaluate(service)
    rows = await owner_conn.fetch(
        "SELECT sink, alert_key, event FROM telemetry.alert_outbox ORDER BY id"
    )
    got = sorted((r["sink"], r["alert_key"].rsplit(":", 1)[1], r["event"]) for r in rows)
    assert got == [
        ("hook", "overheating", "opened"),
        ("hook", "stuck", "opened"),
        ("hook", "stuck", "resolved"),
        ("majors", "overheating", "opened"),
        ("stuck", "stuck", "opened"),
        ("stuck", "stuck", "resolved"),
    ]


async def test_a_flatline_without_an_alert_of_its_own_still_holds_back_the_others(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    base = now_base().replace(second=0)
    dev = "plant2/assembly/line1/robot-04"
    ids = await seed_device(owner_conn, dev, ["temp", "pressure"])
    for sensor in ("temp", "pressure"):
        await readings_until(owner_conn, ids[sensor], at(base, 0), at(base, 40))
    await anomaly(owner_conn, ids["pressure"], "flatline", at(base, 5), None)
    await anomaly(owner_conn, ids["temp"], "range", at(base, 8), at(base, 20))
    plain = AnomalyRule(match="*/pressure", flatline_count=10)
    ev = Evaluator(rules=[OVERHEAT, plain], settings=Alerts(sinks=(HOOK,)))
    await ev.evaluate(service)
    assert await outbox(owner_conn) == []
    state = await owner_conn.fetchval(
        "SELECT state FROM telemetry.alerts_v WHERE key = $1", f"{dev}:overheating"
    )
    assert state == "inactive"  # pending while flatlined, gone before the flatline ended


async def test_newest_readings_start_at_last_seen_and_fall_back_where_it_is_ahead(
    owner_conn: asyncpg.Connection, service: asyncpg.Connection
) -> None:
    base = now_base().replace(second=0)
    ids = await seed_device(owner_conn, "plant1/newest/line1/dev", ["a", "b", "c", "d"])
    await readings_until(owner_conn, ids["a"], at(base, -3600), at(base, 30))
    await readings_until(owner_conn, ids["b"], at(base, -7200), at(base, -7100))
    await readings_until(owner_conn, ids["d"], at(base, 0), at(base, 5))
    await owner_conn.executemany(
        "UPDATE telemetry.sensors SET last_seen = $2 WHERE id = $1",
        [
            (ids["a"], at(base, 10)),  # behind the newest reading, as the ingester keeps it
            (ids["b"], at(base, 0)),  # ahead of everything stored: found without the bound
            (ids["c"], at(base, 0)),  # no reading at all
        ],
    )
    got = await newest_readings(service, [ids[s] for s in "abcd"])
    assert got == {ids["a"]: at(base, 30), ids["b"]: at(base, -7100), ids["d"]: at(base, 5)}
