"""What the evaluator writes: an alert row and, in the same transaction, its outbox rows.

Also the conversions between the database's timestamps and the state machine's µs, and the
notification document every sink maps from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ingest import metrics
from ingest.alerts.lifecycle import AlertState, Change
from ingest.alerts.rules import SinkConfig, rank, sink_wants

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "ingest_alert_outbox"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_UPSERT = """
INSERT INTO telemetry.alerts AS a (key, device_id, condition, severity, state, since,
    clear_since, opened_at, resolved_at, opens, flap_since, sensors, cursor, version, phase,
    flapping)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
ON CONFLICT (key) DO UPDATE SET severity = $4, state = $5, since = $6, clear_since = $7,
    opened_at = $8, resolved_at = $9, opens = $10, flap_since = $11, sensors = $12,
    cursor = $13, version = $14, phase = $15, flapping = $16, updated_at = now()
RETURNING id
"""
_OUTBOX = """
INSERT INTO telemetry.alert_outbox (alert_id, alert_key, sink, event, payload)
SELECT $1, $2, o.sink, o.event, o.payload::jsonb
  FROM unnest($3::text[], $4::text[], $5::text[]) AS o(sink, event, payload)
"""
_NOTIFY = "SELECT pg_notify('ingest_alert_outbox', '')"


def to_us(value: datetime | None) -> int | None:
    if value is None:
        return None
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def to_dt(us: int | None) -> datetime | None:
    return None if us is None else EPOCH + timedelta(microseconds=us)


def rfc3339(us: int | None) -> str | None:
    dt = to_dt(us)
    return None if dt is None else dt.isoformat().replace("+00:00", "Z")


def state_of(row: asyncpg.Record) -> AlertState:
    return AlertState(
        phase=row["phase"],
        flapping=row["flapping"],
        severity=row["severity"],
        since=to_us(row["since"]),
        clear_since=to_us(row["clear_since"]),
        opened_at=to_us(row["opened_at"]),
        resolved_at=to_us(row["resolved_at"]),
        opens=[to_us(o) or 0 for o in row["opens"]],
        flap_since=to_us(row["flap_since"]),
        cursor=to_us(row["cursor"]),
        sensors=tuple(row["sensors"]),
    )


async def write_changes(
    conn: asyncpg.Connection,
    *,
    sinks: Sequence[SinkConfig],
    device_id: int,
    path: str,
    condition: str,
    row: asyncpg.Record | None,
    st: AlertState,
    changes: Sequence[Change],
    meta: asyncpg.Record | None,
) -> int:
    """Upsert the alert `<path>:<condition>` as `st` and queue `changes` for each sink that
    wants them; the caller's transaction makes it one commit. Returns len(changes)."""
    key = f"{path}:{condition}"
    version = (0 if row is None else row["version"]) + len(changes)
    alert_id = await conn.fetchval(
        _UPSERT,
        key,
        device_id,
        condition,
        st.severity,
        st.state,
        to_dt(st.since),
        to_dt(st.clear_since),
        to_dt(st.opened_at),
        to_dt(st.resolved_at),
        [to_dt(o) for o in st.opens],
        to_dt(st.flap_since),
        list(st.sensors),
        to_dt(st.cursor),
        version,
        st.phase,
        st.flapping,
    )
    if not changes:
        return 0
    names: list[str] = []
    kinds: list[str] = []
    payloads: list[str] = []
    first = version - len(changes) + 1
    for n, change in enumerate(changes):
        doc = notification(
            alert_id=alert_id,
            version=first + n,
            key=key,
            device=path,
            condition=condition,
            change=change,
            meta=meta,
        )
        text = json.dumps(doc, sort_keys=True)
        for sink in sinks:
            if sink_wants(sink, device=path, condition=condition, severity=doc["severity"]):
                names.append(sink.name)
                kinds.append(change.kind)
                payloads.append(text)
    if names:
        await conn.execute(_OUTBOX, alert_id, key, names, kinds, payloads)
        await conn.execute(_NOTIFY)
    metrics.ALERT_CHANGES.inc(len(changes))
    log.info("alert %s: %s", key, ", ".join(f"{c.kind} at {rfc3339(c.at)}" for c in changes))
    return len(changes)


def notification(
    *,
    alert_id: int,
    version: int,
    key: str,
    device: str,
    condition: str,
    change: Change,
    meta: asyncpg.Record | None,
) -> dict[str, Any]:
    """The notification every sink maps from: the alert as it was right after the change."""
    st = change.state
    criticality = 3 if meta is None else int(meta["criticality"])
    return {
        "id": f"{alert_id}.{version}",
        "key": key,
        "event": change.kind,
        "at": rfc3339(change.at),
        "device": device,
        "asset": None if meta is None else meta["asset"],
        "condition": condition,
        "severity": st.severity,
        "criticality": criticality,
        "priority": rank(st.severity) * criticality,
        "state": "resolved" if change.kind == "resolved" else st.state,
        "since": rfc3339(st.since),
        "opened_at": rfc3339(st.opened_at),
        "resolved_at": rfc3339(st.resolved_at) if change.kind == "resolved" else None,
        "sensors": list(st.sensors),
        "asset_type": None if meta is None else meta["asset_type"],
        "team": None if meta is None else meta["team"],
        "ci_id": None if meta is None else meta["ci_id"],
    }
