"""Asset health end to end: pumps published over MQTT, `ingest run` processes scoring them with
the model `ingest baseline` fitted from what they stored, the events read from anomalies_v."""

from __future__ import annotations

import json

import asyncpg
import pytest

from ingest.asset.rules import AssetRule
from tests.support.asset import (
    T0,
    Stream,
    asset_events,
    faulty_pump,
    one_pass,
    payloads,
    pump_stream,
    stored_model,
)
from tests.support.cluster import Database
from tests.support.ingester import Ingester, ingest_cli, ingester_env, share_group
from tests.support.mqtt import publish
from tests.support.process import wait_until

pytestmark = pytest.mark.slow

RULE = AssetRule(match="*/pumps/*", hold_s=10.0, min_duration_s=10.0, gap_s=30.0)
DEVICE = "plant9/pumps/line1/pump-03"


async def send(db: Database, mqtt_url: str, prefix: str, stream: Stream) -> None:
    """Publish the stream (one message per 10 s of it) and wait until all of it is stored."""
    await publish(mqtt_url, [(f"{prefix}/{DEVICE}", p, None) for p in payloads(stream, 10)])
    total = sum(len(r) for r in stream.values())
    times = [t for r in stream.values() for t, _ in r]

    async def stored() -> bool:
        conn = await asyncpg.connect(db.analyst_url)
        try:
            n = await conn.fetchval(
                "SELECT count(*) FROM telemetry.readings_v WHERE device = $1"
                "   AND ts >= to_timestamp($2 / 1e6) AND ts <= to_timestamp($3 / 1e6)",
                DEVICE,
                min(times),
                max(times),
            )
        finally:
            await conn.close()
        return bool(n == total)

    await wait_until(stored, timeout=120)


async def test_pumps_over_mqtt_give_the_one_pass_events_across_a_restart(
    db: Database, mqtt_url: str, prefix: str
) -> None:
    env = ingester_env(
        db,
        mqtt_url,
        prefix,
        INGEST_ANOMALY_ASSETS=json.dumps([msgspec_rule(RULE)]),
        INGEST_MIGRATE_DB_URL=db.owner_url,
    )
    pump = faulty_pump(DEVICE, at_s=4200, length_s=240)
    proc = await Ingester(env).start()
    try:
        await send(db, mqtt_url, prefix, pump_stream(pump, first=0, count=3600))
        status, out, err = await ingest_cli(
            "baseline",
            "--device",
            "*/pumps/*",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-01-01T01:00:00Z",
            env=env,
        )
        assert (status, err) == (0, ""), out
        first = pump_stream(pump, first=3600, count=700)  # the fault starts at 4200 s
        await send(db, mqtt_url, prefix, first)
    finally:
        assert await proc.stop() == 0
    # A new process: no cache, the state comes from the database.
    proc = await Ingester(env).start()
    try:
        second = pump_stream(pump, first=4300, count=1100)
        await send(db, mqtt_url, prefix, second)
        timestamps = await proc.metric("ingest_asset_timestamps_total")
    finally:
        assert await proc.stop() == 0
    stream = {n: first[n] + second[n] for n in first}
    expected = one_pass(await stored_model(db, DEVICE), RULE, stream)
    fault = T0 + 4200 * 1_000_000
    (during,) = [s for s in expected if fault <= s < fault + 240_000_000]
    assert expected[during][0] is not None  # closed
    assert await asset_events(db, DEVICE) == expected
    assert timestamps == 1100  # the second process scored each of its timestamps once


def msgspec_rule(rule: AssetRule) -> dict[str, object]:
    return {
        "match": rule.match,
        "hold_s": rule.hold_s,
        "min_duration_s": rule.min_duration_s,
        "gap_s": rule.gap_s,
    }


async def test_three_ingesters_on_a_share_group_store_the_one_pass_events(
    db: Database, mqtt_url: str, prefix: str
) -> None:
    pump = faulty_pump(DEVICE, at_s=4200, length_s=240)
    env = ingester_env(db, mqtt_url, prefix, INGEST_MIGRATE_DB_URL=db.owner_url)
    one = await Ingester(env).start()
    try:
        await send(db, mqtt_url, prefix, pump_stream(pump, first=0, count=3600))
    finally:
        assert await one.stop() == 0
    status, out, err = await ingest_cli(
        "baseline", "--device", DEVICE, "--from", "2026-01-01T00:00:00Z",
        "--to", "2026-01-01T01:00:00Z", env=env,
    )  # fmt: skip
    assert (status, err) == (0, ""), out
    members = await share_group(
        db, mqtt_url, prefix, members=3, INGEST_ANOMALY_ASSETS=json.dumps([msgspec_rule(RULE)])
    )
    try:
        later = pump_stream(pump, first=3600, count=1800)
        await send(db, mqtt_url, prefix, later)
        scored = [await m.metric("ingest_asset_timestamps_total") for m in members]
        late = [await m.metric("ingest_asset_late_readings_total") for m in members]
        replays = [await m.metric("ingest_asset_replays_total") for m in members]
    finally:
        for m in members:
            assert await m.stop() == 0
    assert sum(1 for n in scored if n > 0) >= 2, scored  # the messages went round
    expected = one_pass(await stored_model(db, DEVICE), RULE, later)
    assert await asset_events(db, DEVICE) == expected, (scored, late, replays)
