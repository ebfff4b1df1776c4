"""`ingest assets import`: YAML and CSV asset metadata, idempotent, bad rows named by line;
shown in sensors_v. And `ingest retain` dropping delivered notifications."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from ingest.alerts.assets import AssetFileError, read
from ingest.config import Retention
from ingest.db.retention import retain
from tests.support.alerts import seed_device
from tests.support.cluster import Database
from tests.support.ingester import ingest_cli

YAML = """\
# the press shop and one press of it
assets:
  - path: plant1/press-shop
    type: area
    criticality: 4
    team: maintenance-a
    description: Press shop, hall 2
  - path: plant1/press-shop/line1/press-01
    type: press
    criticality: 5
    ci_id: CI0042
"""


def env(db: Database) -> dict[str, str]:
    return {"INGEST_MIGRATE_DB_URL": db.owner_url, "INGEST_DB_URL": db.ingest_url}


async def test_yaml_import_is_idempotent_and_shown_in_sensors_v(
    db: Database, tmp_path: Path
) -> None:
    owner = await asyncpg.connect(db.owner_url)
    try:
        await seed_device(owner, "plant1/press-shop/line1/press-01", ["spindle.temp"])
        await seed_device(owner, "plant1/press-shop/line1/press-02", ["spindle.temp"])
        await seed_device(owner, "plant2/assembly/line1/robot-01", ["spindle.temp"])
    finally:
        await owner.close()
    path = tmp_path / "assets.yaml"
    path.write_text(YAML)
    code, out, err = await ingest_cli("assets", "import", str(path), env=env(db))
    assert (code, err) == (0, "")
    assert out == f"ingest: assets import {path}: 2 row(s), 2 changed\n"
    code, out, _ = await ingest_cli("assets", "import", str(path), env=env(db))
    assert out == f"ingest: assets import {path}: 2 row(s), 0 changed\n"
    analyst = await asyncpg.connect(db.analyst_url)
    try:
        rows = await analyst.fetch(
            "SELECT device, asset, asset_type, criticality, team, description, ci_id"
            "  FROM telemetry.sensors_v ORDER BY device"
        )
    finally:
        await analyst.close()
    assert [tuple(r) for r in rows] == [
        (
            "plant1/press-shop/line1/press-01",
            "plant1/press-shop/line1",
            "press",
            5,
            "maintenance-a",
            "Press shop, hall 2",
            "CI0042",
        ),
        (
            "plant1/press-shop/line1/press-02",
            "plant1/press-shop/line1",
            "area",
            4,
            "maintenance-a",
            "Press shop, hall 2",
            None,
        ),
        ("plant2/assembly/line1/robot-01", "plant2/assembly/line1", None, 3, None, None, None),
    ]


async def test_csv_import_and_a_bad_row_names_its_line(db: Database, tmp_path: Path) -> None:
    good = tmp_path / "assets.csv"
    good.write_text(
        "path,type,criticality,team,description,ci_id\n"
        'plant1/press-shop,area,4,maintenance-a,"Press shop, hall 2",\n'
        "plant1/press-shop/line1/press-01,press,5,,,CI0042\n"
    )
    code, out, err = await ingest_cli("assets", "import", str(good), env=env(db))
    assert (code, out, err) == (0, f"ingest: assets import {good}: 2 row(s), 2 changed\n", "")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,criticality\nplant1/a,2\nplant1/b,7\n")
    code, out, err = await ingest_cli("assets", "import", str(bad), env=env(db))
    assert (code, out) == (1, "")
    assert err == f"ingest: {bad}:3: criticality must be an integer from 1 to 5, got '7'\n"
    owner = await asyncpg.connect(db.owner_url)
    try:  # nothing of the bad file was written
        assert await owner.fetchval("SELECT count(*) FROM telemetry.asset_meta") == 2
    finally:
        await owner.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "- path: plant1/a\n  criticality: 2\n- path: 'bad path'\n",
            "{f}:3: path 'bad path' must be topic levels",
        ),
        ("- path: plant1/a\n- type: press\n", "{f}:2: path is missing"),
        ("- path: plant1/a\n  owner: me\n", "{f}:1: unknown field 'owner'"),
        (
            "- path: plant1/a\n  criticality: high\n",
            "{f}:1: criticality must be an integer from 1 to 5, got 'high'",
        ),
        (
            "- path: plant1/a\n- path: plant1/a\n",
            "{f}: path 'plant1/a' appears twice (rows 1 and 2)",
        ),
        ("- path: [unclosed\n", "{f}:2: not valid YAML"),
        ("path: plant1/a\n", "{f}: expected a list of assets"),
    ],
)
def test_bad_yaml_rows_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "assets.yaml"
    path.write_text(text)
    with pytest.raises(AssetFileError) as info:
        read(str(path))
    assert str(info.value).startswith(message.format(f=path))


async def test_retain_drops_delivered_notifications_only(db: Database) -> None:
    owner = await asyncpg.connect(db.owner_url)
    try:
        await seed_device(owner, "p/a/l/d", ["t"])
        alert_id = await owner.fetchval(
            "INSERT INTO telemetry.alerts (key, device_id, condition, severity, state, phase)"
            " SELECT 'p/a/l/d:c', id, 'c', 'major', 'open', 'open' FROM telemetry.devices RETURNING id"
        )
        for status in ("delivered", "pending", "failed", "delivered"):
            await owner.execute(
                "INSERT INTO telemetry.alert_outbox (alert_id, alert_key, sink, event, payload, status,"
                " delivered_at) VALUES ($1, 'p/a/l/d:c', 'hook', 'opened', $2::jsonb, $3,"
                " CASE WHEN $3 = 'delivered' THEN now() END)",
                alert_id,
                json.dumps({}),
                status,
            )
        later = datetime.now(UTC) + timedelta(days=3)
        retention = Retention(alert_deliveries_days=1)
        [dry] = await retain(dsn=db.owner_url, retention=retention, dry_run=True, now=later)
        assert (dry.table, len(dry.chunks)) == ("alert_outbox", 2)
        [done] = await retain(dsn=db.owner_url, retention=retention, now=later)
        assert len(done.chunks) == 2
        left = await owner.fetch("SELECT status FROM telemetry.alert_outbox ORDER BY id")
        assert [r[0] for r in left] == ["pending", "failed"]
        [kept] = await retain(dsn=db.owner_url, retention=retention)
        assert kept.chunks == ()
    finally:
        await owner.close()
