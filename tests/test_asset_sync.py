"""Asset health against the real database: `ingest baseline` fits from stored readings, flushes
score against the stored model and state, and one ingester, several, out of order or restarted
all store the events one pass over the device's readings gives."""

from __future__ import annotations

import uuid

import asyncpg
import msgspec
import pytest
from prometheus_client import REGISTRY

from ingest.alerts.evaluator import Evaluator
from ingest.alerts.rules import AlertRule, Alerts, CloudEventsSink
from ingest.alerts.store import rfc3339
from ingest.asset.rules import AssetRule
from ingest.sim.pumps import SENSORS
from ingest.warmup import warm_up
from tests.support.anomaly_sync import Instance
from tests.support.asset import (
    T0,
    Stream,
    asset_events,
    chunks,
    faulty_pump,
    one_pass,
    pump_stream,
    stored_model,
)
from tests.support.cluster import Database
from tests.support.ingester import ingest_cli

RULE = AssetRule(match="*/pumps/*", hold_s=10.0, min_duration_s=10.0, gap_s=30.0, replay_s=900.0)
BASE_S = 3600
FAULT_AT, FAULT_S = 4200, 240


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_up(sparkplug=False)


def new_pump() -> str:
    return f"site-{uuid.uuid4().hex[:8]}/pumps/line1/pump-01"


async def write_all(db: Database, device: str, parts: list[Stream]) -> None:
    async with Instance(db, [], assets=[RULE]) as one:
        for part in parts:
            await one.write(device, part)


async def fitted(db: Database, device: str) -> tuple[Stream, str]:
    """A pump's healthy hour stored and fitted with `ingest baseline`; returns the hour after
    it (a cavitation fault 10 minutes in, 4 minutes long) and the command's output."""
    pump = faulty_pump(device, at_s=FAULT_AT, length_s=FAULT_S)
    healthy = pump_stream(pump, first=0, count=BASE_S)
    healthy["counter"] = [(T0 + i * 1_000_000, float(i)) for i in range(0, BASE_S, 10)]
    await write_all(db, device, chunks(healthy, 600))
    env = {"INGEST_DB_URL": db.ingest_url, "INGEST_MIGRATE_DB_URL": db.owner_url}
    status, out, err = await ingest_cli(
        "baseline",
        "--device",
        device,
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        "2026-01-01T01:00:00Z",
        env=env,
    )
    assert (status, err) == (0, ""), (out, err)
    return pump_stream(pump, first=BASE_S, count=1800), out


async def test_baseline_fits_each_device_from_its_stored_readings(db: Database) -> None:
    device = new_pump()
    _, out = await fitted(db, device)
    model = await stored_model(db, device)
    names = tuple(sorted(SENSORS))  # by sensor id: registered in name order
    assert model.version == 1
    assert model.model.sensors == names
    assert model.model.samples == BASE_S  # one vector a second, once the temperatures came
    assert out.startswith(f"ingest: baseline {device}: model version 1, 8 sensors (")
    assert out.rstrip().endswith("; left out: counter (a cumulative count)")
    conn = await asyncpg.connect(db.analyst_url)
    try:
        row = await conn.fetchrow(
            "SELECT version, sensors, samples, quantile, margin, fitted_from, fitted_to"
            "  FROM telemetry.asset_models_v WHERE device = $1",
            device,
        )
        assert row is not None
        anchor = await conn.fetchval(
            "SELECT count(*) FROM telemetry.sensors_v WHERE device = $1 AND sensor = '(asset)'",
            device,
        )
    finally:
        await conn.close()
    assert (row["version"], tuple(row["sensors"]), row["samples"]) == (1, names, 3600)
    assert (row["quantile"], row["margin"]) == (0.995, 1.1)
    assert anchor == 1
    env = {"INGEST_DB_URL": db.ingest_url, "INGEST_MIGRATE_DB_URL": db.owner_url}
    status, again, _ = await ingest_cli("baseline", "--device", device, "--last", "1800", env=env)
    assert status == 0
    assert again.startswith(f"ingest: baseline {device}: model version 2, 8 sensors (")
    assert (await stored_model(db, device)).model.samples == 1800
    status, _, err = await ingest_cli("baseline", "--device", "nowhere/*", "--last", "60", env=env)
    assert (status, err) == (2, "ingest: config: --device 'nowhere/*': matches no device\n")


async def test_flushes_score_against_the_stored_model_as_one_pass_does(db: Database) -> None:
    device = new_pump()
    later, _ = await fitted(db, device)
    model = await stored_model(db, device)
    expected = one_pass(model, RULE, later)
    assert len(expected) == 1
    ((start, (end, _, score, detail)),) = expected.items()
    fault = T0 + FAULT_AT * 1_000_000
    assert fault <= start < fault + 20_000_000
    assert end is not None
    assert fault + (FAULT_S - 20) * 1_000_000 <= end < fault + FAULT_S * 1_000_000
    assert score > 1
    # Cavitation moves flow, pressure, vibration and current; the worst point names three.
    most = detail.split("most: ")[1].split(", ")
    assert {m.rsplit(" ", 1)[0] for m in most} <= {"flow", "pressure", "vibration", "current"}
    await write_all(db, device, chunks(later, 10))
    assert await asset_events(db, device) == expected


@pytest.mark.parametrize(
    ("members", "order", "restart"),
    [
        (1, "in order", False),
        (3, "in order", False),
        (3, "pairs swapped", False),
        (2, "pairs swapped", True),
        (3, "sensors apart", False),
    ],
)
async def test_several_ingesters_in_any_order_store_the_one_pass_events(
    db: Database, members: int, order: str, restart: bool
) -> None:
    device = new_pump()
    later, _ = await fitted(db, device)
    expected = one_pass(await stored_model(db, device), RULE, later)
    parts = chunks(later, 30)
    if order == "sensors apart":  # the temperatures in flushes of their own, committed first
        parts = [
            {n: r for n, r in part.items() if n.startswith("temp.") == temps}
            for part in parts
            for temps in (True, False)
        ]
    sequence = list(range(len(parts)))
    if order == "pairs swapped":  # every second flush commits before the one before it
        for i in range(0, len(sequence) - 1, 2):
            sequence[i], sequence[i + 1] = sequence[i + 1], sequence[i]
    replays = REGISTRY.get_sample_value("ingest_asset_replays_total") or 0.0
    instances = [Instance(db, [], assets=[RULE]) for _ in range(members)]
    for one in instances:
        await one.__aenter__()
    try:
        for n, i in enumerate(sequence):
            if restart and n == len(sequence) // 2:
                await instances[0].__aexit__()
                instances[0] = await Instance(db, [], assets=[RULE]).__aenter__()
            await instances[n % members].write(device, parts[i])
    finally:
        for one in instances:
            await one.__aexit__()
    assert await asset_events(db, device) == expected
    replayed = (REGISTRY.get_sample_value("ingest_asset_replays_total") or 0.0) - replays
    assert replayed == (len(parts) // 2 if order != "in order" else 0)


async def test_an_asset_rules_alert_opens_and_resolves_with_the_asset_events(db: Database) -> None:
    device = new_pump()
    later, _ = await fitted(db, device)
    await write_all(db, device, chunks(later, 60))
    expected = sorted(one_pass(await stored_model(db, device), RULE, later).items())
    rule = msgspec.structs.replace(RULE, alert=AlertRule(condition="pump-health", severity="major"))
    hook = CloudEventsSink(name="hook", url="http://127.0.0.1:9/hook")
    settings = Alerts(sinks=(hook,), lookback_s=400 * 86400.0)
    evaluator = Evaluator(rules=[], settings=settings, assets=[rule])
    conn = await asyncpg.connect(db.ingest_url)
    try:
        await evaluator.evaluate(conn)
    finally:
        await conn.close()
    conn = await asyncpg.connect(db.owner_url)
    try:
        alert = await conn.fetchrow(
            "SELECT key, state, severity, sensors FROM telemetry.alerts_v WHERE device = $1",
            device,
        )
        assert alert is not None
        sent = await conn.fetch(
            "SELECT event, payload->>'at' AS at FROM telemetry.alert_outbox"
            " WHERE alert_key = $1 ORDER BY id",
            f"{device}:pump-health",
        )
    finally:
        await conn.close()
    assert (alert["key"], alert["state"], alert["severity"]) == (
        f"{device}:pump-health",
        "resolved",
        "major",
    )
    opened = [r["at"] for r in sent if r["event"] == "opened"]
    assert opened == [rfc3339(start) for start, _ in expected]
    assert [r["event"] for r in sent].count("resolved") == len(expected)


@pytest.mark.parametrize(("settle_s", "members"), [(0.0, 1), (40.0, 1), (40.0, 3)])
async def test_sensors_in_separate_messages_are_scored_together_once_settled(
    db: Database, settle_s: float, members: int
) -> None:
    device = new_pump()
    later, _ = await fitted(db, device)
    rule = msgspec.structs.replace(RULE, replay_s=60.0, settle_s=settle_s)
    expected = one_pass(await stored_model(db, device), rule, later)
    assert len(expected) == 1
    # Each sensor's 30 s in a message and a flush of its own, one sensor after the other.
    parts = [{name: r} for part in chunks(later, 30) for name, r in sorted(part.items())]
    before = [
        REGISTRY.get_sample_value(f"ingest_asset_{m}_total") or 0.0
        for m in ("replays", "late_readings")
    ]
    instances = [Instance(db, [], assets=[rule]) for _ in range(members)]
    for one in instances:
        await one.__aenter__()
    try:
        for n, part in enumerate(parts):
            await instances[n % members].write(device, part)
    finally:
        for one in instances:
            await one.__aexit__()
    replays, late = (
        (REGISTRY.get_sample_value(f"ingest_asset_{m}_total") or 0.0) - b
        for m, b in zip(("replays", "late_readings"), before, strict=True)
    )
    got = await asset_events(db, device)
    if settle_s:
        assert (replays, late) == (0.0, 0.0)
        assert got == expected
    else:  # each sensor after the first re-scores; the 4-minute fault outlasts replay_s
        assert replays > 0
        assert late > 0
        assert got != expected


async def test_a_late_flush_re_scores_a_settled_device_as_one_pass_does(db: Database) -> None:
    device = new_pump()
    later, _ = await fitted(db, device)
    rule = msgspec.structs.replace(RULE, settle_s=40.0)
    expected = one_pass(await stored_model(db, device), rule, later)
    parts = chunks(later, 30)
    # In each four flushes the first commits last, after the next three were scored: a pair
    # swapped would not do, as settle_s waits for it.
    for i in range(0, len(parts) - 3, 4):
        parts[i : i + 4] = [*parts[i + 1 : i + 4], parts[i]]
    replays = REGISTRY.get_sample_value("ingest_asset_replays_total") or 0.0
    late = REGISTRY.get_sample_value("ingest_asset_late_readings_total") or 0.0
    async with Instance(db, [], assets=[rule]) as one:
        for part in parts:
            await one.write(device, part)
    assert (REGISTRY.get_sample_value("ingest_asset_replays_total") or 0.0) - replays == len(
        parts
    ) // 4
    assert (REGISTRY.get_sample_value("ingest_asset_late_readings_total") or 0.0) == late
    assert await asset_events(db, device) == expected


async def test_readings_further_back_than_replay_max_s_are_stored_but_not_scored(
    db: Database,
) -> None:
    device = new_pump()
    later, _ = await fitted(db, device)
    parts = chunks(later, 60)
    before = REGISTRY.get_sample_value("ingest_asset_late_readings_total") or 0.0
    short = RULE
    async with Instance(db, [], assets=[short], replay_max_s=1200.0) as one:
        for part in parts[5:]:
            await one.write(device, part)
        await one.write(device, parts[0])  # 25 to 30 minutes behind
    late = (REGISTRY.get_sample_value("ingest_asset_late_readings_total") or 0.0) - before
    assert late == sum(len(r) for r in parts[0].values())
    rest = {n: [x for part in parts[5:] for x in part.get(n, [])] for n in later}
    assert await asset_events(db, device) == one_pass(await stored_model(db, device), short, rest)


async def test_a_refit_leaves_out_the_spans_of_the_devices_asset_events(db: Database) -> None:
    device = new_pump()
    later, _ = await fitted(db, device)
    await write_all(db, device, chunks(later, 60))
    events = await asset_events(db, device)
    assert events
    env = {"INGEST_DB_URL": db.ingest_url, "INGEST_MIGRATE_DB_URL": db.owner_url}
    status, out, err = await ingest_cli(
        "baseline", "--device", device, "--from", "2026-01-01T01:00:00Z",
        "--to", "2026-01-01T01:30:00Z", env=env,
    )  # fmt: skip
    assert (status, err) == (0, ""), out
    # One vector a second from 01:00:00 (the temperatures reported then), less the seconds
    # from each event's start to its end, both included.
    inside = sum((end - start) // 1_000_000 + 1 for start, (end, *_) in events.items() if end)
    assert (await stored_model(db, device)).model.samples == 1800 - inside


async def test_a_refit_between_flushes_is_taken_up_at_the_next_flush(db: Database) -> None:
    device = new_pump()
    later, _ = await fitted(db, device)
    parts = chunks(later, 60)
    env = {"INGEST_DB_URL": db.ingest_url, "INGEST_MIGRATE_DB_URL": db.owner_url}
    async with Instance(db, [], assets=[RULE]) as one:
        for part in parts[:5]:
            await one.write(device, part)
        status, out, err = await ingest_cli(
            "baseline", "--device", device, "--sensors", "[!v]*", "--from",
            "2026-01-01T00:00:00Z", "--to", "2026-01-01T01:00:00Z", env=env,
        )  # fmt: skip
        assert (status, err) == (0, ""), out
        assert "model version 2, 6 sensors" in out  # without vibration and voltage
        for part in parts[5:]:
            await one.write(device, part)
    model = await stored_model(db, device)
    conn = await asyncpg.connect(db.owner_url)
    try:
        row = await conn.fetchrow(
            "SELECT s.model_version, s.sensor_ids, m.sensor_ids AS model_ids"
            "  FROM telemetry.asset_state s JOIN telemetry.asset_models m USING (device_id)"
            "  JOIN telemetry.devices d ON d.id = s.device_id WHERE d.path = $1",
            device,
        )
        assert row is not None
    finally:
        await conn.close()
    assert (row["model_version"], row["sensor_ids"]) == (2, row["model_ids"])
    assert model.model.sensors == tuple(n for n in sorted(SENSORS) if not n.startswith("v"))
    # The fault (10 minutes in, after the refit) is one event, named in the new model's terms.
    events = await asset_events(db, device)
    fault = T0 + FAULT_AT * 1_000_000
    (start,) = [s for s in events if fault <= s < fault + FAULT_S * 1_000_000]
    names = {m.rsplit(" ", 1)[0] for m in events[start][3].split("most: ")[1].split(", ")}
    assert names <= set(model.model.sensors)
