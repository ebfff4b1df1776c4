"""The alert evaluator: advances every (device, condition) alert from committed anomaly events.

Runs in every ingester. Each device is evaluated in a transaction of its own under a
transaction-scoped advisory lock on the device (tried, never waited for: another instance is
doing it), from what is committed: the alert rows, the anomaly events and the newest reading
time of each sensor. The alert rows and their outbox notifications are written in that same
transaction. The state machine (`lifecycle.advance`) reads no clock, so one instance or three
write the same rows; only silence compares the database's clock with the last reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from ingest import metrics
from ingest.alerts.latest import newest_readings
from ingest.alerts.lifecycle import AlertState, Change, Event, Timing, advance
from ingest.alerts.rules import KINDS, SEVERITIES, AlertRule, Alerts
from ingest.alerts.store import EPOCH, state_of, to_us, write_changes
from ingest.anomaly.rules import AnomalyRule, rule_for
from ingest.asset.rules import ANCHOR, AssetRule, asset_rule_for

log = logging.getLogger(__name__)

LOCK_CLASS = 0x616C7274  # "alrt": advisory lock (LOCK_CLASS, device id) while evaluating

_CANDIDATES = """
SELECT DISTINCT s.device_id
  FROM telemetry.anomalies a JOIN telemetry.sensors s ON s.id = a.sensor_id
 WHERE a.start_time >= now() - make_interval(secs => $1)
UNION
SELECT device_id FROM telemetry.alerts WHERE state IN ('pending', 'open', 'flapping')
"""
_SENSORS = """
SELECT s.id, s.device_id, d.path, s.name
  FROM telemetry.sensors s JOIN telemetry.devices d ON d.id = s.device_id
 WHERE s.device_id = ANY($1::int[])
"""
_LOCK = "SELECT pg_try_advisory_xact_lock($1::int, $2::int)"
_ALERTS = """
SELECT id, key, condition, severity, state, phase, flapping, since, clear_since, opened_at,
       resolved_at, opens, flap_since, sensors, cursor, version
  FROM telemetry.alerts WHERE device_id = $1 FOR UPDATE
"""
_EVENTS = """
SELECT sensor_id, kind, start_time, end_time
  FROM telemetry.anomalies
 WHERE sensor_id = ANY($1::int[]) AND start_time >= $2 AND (end_time IS NULL OR end_time > $3)
"""
ASSET_KINDS: tuple[str, ...] = ("asset",)
# The horizon of a device's asset events: the newest timestamp its scoring took in.
_SCORED = """
SELECT m.anchor_id AS id, s.last_time AS t
  FROM telemetry.asset_models m JOIN telemetry.asset_state s ON s.device_id = m.device_id
 WHERE m.anchor_id = ANY($1::int[])
"""
_META = """
SELECT asset, criticality, asset_type, team, ci_id FROM telemetry.device_meta_v WHERE device_id = $1
"""
_DEVICES_SEEN = """
SELECT d.id, d.path, max(s.last_seen) AS seen, now() AS now
  FROM telemetry.devices d JOIN telemetry.sensors s ON s.device_id = d.id
 GROUP BY d.id, d.path
"""
_OPEN_BY_SEVERITY = """
SELECT severity, count(*) FROM telemetry.alerts WHERE state IN ('open', 'flapping') GROUP BY 1
"""


def rule_kinds(rule: AnomalyRule) -> tuple[str, ...]:
    """The anomaly kinds an anomaly rule's alert covers: its own list, else the rule's filters."""
    assert rule.alert is not None
    if rule.alert.kinds:
        return rule.alert.kinds
    has = {
        "range": rule.min is not None or rule.max is not None,
        "rate": rule.max_rate is not None,
        "spike": rule.spike_window is not None,
        "drift": rule.drift_window is not None,
        "flatline": rule.flatline_count is not None or rule.flatline_seconds is not None,
        "auto": rule.detector is not None,
    }
    return tuple(k for k in KINDS if has[k])


@dataclass(slots=True)
class _Condition:
    """One condition of one device: its first rule's timing and the sensors that feed it."""

    name: str
    rule: AlertRule
    sensors: dict[int, tuple[str, str, tuple[str, ...]]]  # id -> (name, severity, kinds)

    @property
    def flatline_only(self) -> bool:
        return all(kinds == ("flatline",) for _, _, kinds in self.sensors.values())


class Evaluator:
    """Evaluates alerts on its own connection. Called from one task only."""

    def __init__(
        self,
        *,
        rules: Sequence[AnomalyRule],
        settings: Alerts,
        assets: Sequence[AssetRule] = (),
    ) -> None:
        self.rules = tuple(rules)
        self.assets = tuple(assets)
        self.settings = settings
        alerts = [r.alert for r in self.rules] + [r.alert for r in self.assets]
        self._has_rules = any(a is not None for a in alerts)

    # ------------------------------------------------------------------ one pass

    async def evaluate(self, conn: asyncpg.Connection, *, silence: bool = True) -> int:
        """One pass over every device that may have an alert to advance; returns notifications.

        `silence`: also judge every device's silence (a pass over all devices).
        """
        written = 0
        if silence and self.settings.silence_s > 0:
            written += await self._silence(conn)
        if self._has_rules:
            ids = [r[0] for r in await conn.fetch(_CANDIDATES, self.settings.lookback_s)]
            by_device: dict[int, list[asyncpg.Record]] = {}
            for row in await conn.fetch(_SENSORS, ids):
                by_device.setdefault(row["device_id"], []).append(row)
            for device_id, sensors in sorted(by_device.items()):
                conditions = self._conditions(sensors)
                if conditions:
                    path = sensors[0]["path"]
                    every = [r["id"] for r in sensors]
                    written += await self._device(conn, device_id, path, conditions, every)
        counts = {s: 0 for s in SEVERITIES}
        for severity, count in await conn.fetch(_OPEN_BY_SEVERITY):
            counts[severity] = count
        for severity, count in counts.items():
            metrics.ALERTS_OPEN.labels(severity).set(count)
        return written

    def _conditions(self, sensors: list[asyncpg.Record]) -> dict[str, _Condition]:
        out: dict[str, _Condition] = {}
        for row in sensors:
            if row["name"] == ANCHOR:  # the device's asset events (ingest/asset)
                asset = asset_rule_for(rules=self.assets, device=row["path"])
                if asset is None or asset.alert is None:
                    continue
                alert, kinds = asset.alert, ASSET_KINDS
            else:
                rule = rule_for(rules=self.rules, path=f"{row['path']}/{row['name']}")
                if rule is None or rule.alert is None:
                    continue
                alert, kinds = rule.alert, rule_kinds(rule)
            cond = out.setdefault(alert.condition, _Condition(alert.condition, alert, {}))
            cond.sensors[row["id"]] = (row["name"], alert.severity, kinds)
        return out

    async def _device(
        self,
        conn: asyncpg.Connection,
        device_id: int,
        path: str,
        conditions: dict[str, _Condition],
        every_sensor: list[int],
    ) -> int:
        async with conn.transaction():
            if not await conn.fetchval(_LOCK, LOCK_CLASS, device_id):
                return 0  # another instance is evaluating this device right now
            rows = {r["condition"]: r for r in await conn.fetch(_ALERTS, device_id)}
            silent = rows.get(self.settings.silence_condition)
            is_silent = silent is not None and silent["state"] in ("open", "flapping")
            sensor_ids = sorted({s for c in conditions.values() for s in c.sensors})
            latest = {k: to_us(t) for k, t in (await newest_readings(conn, sensor_ids)).items()}
            if self.assets:
                for r in await conn.fetch(_SCORED, sensor_ids):
                    latest[r["id"]] = to_us(r["t"])
            if not latest:
                return 0
            floor = min(
                [datetime.now(UTC) - timedelta(seconds=self.settings.lookback_s)]
                + [r["since"] for r in rows.values() if r["since"] is not None]
            )
            cursors = [
                r["cursor"] for c, r in rows.items() if c in conditions and r["cursor"] is not None
            ]
            after = min(cursors) if len(cursors) == len(conditions) else EPOCH
            # Every sensor of the device: a flatline anywhere on it holds back its alerts.
            events = await conn.fetch(_EVENTS, every_sensor, floor, after)
            flatlines = [
                (to_us(e["start_time"]) or 0, to_us(e["end_time"]))
                for e in events
                if e["kind"] == "flatline"
            ]
            meta = await conn.fetchrow(_META, device_id)
            written = 0
            for cond in conditions.values():
                written += await self._condition(
                    conn,
                    device_id,
                    path,
                    cond,
                    rows.get(cond.name),
                    events,
                    latest,
                    meta,
                    inhibitions=() if cond.flatline_only else flatlines,
                    silenced=is_silent,
                )
            return written

    async def _condition(
        self,
        conn: asyncpg.Connection,
        device_id: int,
        path: str,
        cond: _Condition,
        row: asyncpg.Record | None,
        events: Sequence[asyncpg.Record],
        latest: dict[int, int | None],
        meta: asyncpg.Record | None,
        *,
        inhibitions: Sequence[tuple[int, int | None]],
        silenced: bool,
    ) -> int:
        mine = [
            Event(to_us(e["start_time"]) or 0, to_us(e["end_time"]), sev, name)
            for e in events
            if (info := cond.sensors.get(e["sensor_id"])) is not None
            for name, sev, kinds in (info,)
            if e["kind"] in kinds
        ]
        if row is None and not mine:
            return 0
        # The horizon: data time up to which every feeding sensor is committed. A sensor far
        # behind the others (gone quiet) does not hold the others back; silence covers it.
        times = sorted(t for s in cond.sensors if (t := latest.get(s)) is not None)
        if not times:
            return 0
        stale = max(60_000_000, int(max(cond.rule.on_delay_s, cond.rule.off_delay_s) * 2e6))
        horizon = min(t for t in times if t >= times[-1] - stale)
        timing = Timing(
            on_delay=int(cond.rule.on_delay_s * 1e6),
            off_delay=int(cond.rule.off_delay_s * 1e6),
            flap_count=cond.rule.flap_count,
            flap_window=int(cond.rule.flap_window_s * 1e6),
        )
        before = AlertState() if row is None else state_of(row)
        after, changes = advance(
            before,
            mine,
            horizon=horizon,
            timing=timing,
            inhibitions=inhibitions,
            silenced=silenced,
        )
        if row is not None and dataclasses.replace(after, cursor=before.cursor) == before:
            return 0  # nothing but the cursor moved: evaluating again from it gives the same
        return await write_changes(
            conn,
            sinks=self.settings.sinks,
            device_id=device_id,
            path=path,
            condition=cond.name,
            row=row,
            st=after,
            changes=changes,
            meta=meta,
        )

    # ------------------------------------------------------------------ silence

    async def _silence(self, conn: asyncpg.Connection) -> int:
        """Open a silence alert for a device whose newest reading is older than silence_s by
        the database's clock; resolve it when readings come again."""
        cfg = self.settings
        name = cfg.silence_condition
        open_ids = {
            r[0]
            for r in await conn.fetch(
                "SELECT device_id FROM telemetry.alerts"
                " WHERE condition = $1 AND state IN ('open', 'flapping')",
                name,
            )
        }
        written = 0
        for dev in await conn.fetch(_DEVICES_SEEN):
            if dev["seen"] is None or not fnmatch.fnmatchcase(dev["path"], cfg.silence_match):
                continue
            # last_seen lags the truth by up to a minute: it only picks the candidates.
            quiet = (dev["now"] - dev["seen"]).total_seconds() > cfg.silence_s
            if quiet or dev["id"] in open_ids:
                written += await self._silence_device(conn, dev["id"], dev["path"])
        return written

    async def _silence_device(self, conn: asyncpg.Connection, device_id: int, path: str) -> int:
        cfg = self.settings
        async with conn.transaction():
            if not await conn.fetchval(_LOCK, LOCK_CLASS, device_id):
                return 0
            rows = {r["condition"]: r for r in await conn.fetch(_ALERTS, device_id)}
            row = rows.get(cfg.silence_condition)
            ids = [
                r[0]
                for r in await conn.fetch(
                    "SELECT id FROM telemetry.sensors WHERE device_id = $1", device_id
                )
            ]
            last = max(
                (await newest_readings(conn, ids)).values(),
                default=None,
            )
            now = await conn.fetchval("SELECT now()")
            if last is None:
                return 0
            silent = (now - last).total_seconds() > cfg.silence_s
            st = AlertState(severity=cfg.silence_severity) if row is None else state_of(row)
            last_us = to_us(last) or 0
            changes: list[Change] = []
            if silent and st.phase != "open":
                st.phase, st.since = "open", last_us
                st.opened_at, st.resolved_at = last_us + int(cfg.silence_s * 1e6), None
                changes.append(Change("opened", st.opened_at, st.copy()))
            elif not silent and st.phase == "open":
                st.phase, st.since, st.resolved_at = "resolved", None, last_us
                changes.append(Change("resolved", last_us, st.copy()))
            if not changes:
                return 0
            st.cursor = last_us
            meta = await conn.fetchrow(_META, device_id)
            return await write_changes(
                conn,
                sinks=cfg.sinks,
                device_id=device_id,
                path=path,
                condition=cfg.silence_condition,
                row=row,
                st=st,
                changes=changes,
                meta=meta,
            )

    # ------------------------------------------------------------------ the task

    async def run(self, *, dsn: str, stop: asyncio.Event) -> None:
        """Evaluate every `evaluate_interval_s` until `stop` is set; reconnect on errors."""
        conn: asyncpg.Connection | None = None
        delay = self.settings.evaluate_interval_s
        # Silence looks at every device: judged every tenth of silence_s, not every pass.
        silence_every = max(self.settings.evaluate_interval_s, self.settings.silence_s / 10)
        silence_due = 0.0
        while not stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(dsn)
                silence = time.monotonic() >= silence_due
                await self.evaluate(conn, silence=silence)
                if silence:
                    silence_due = time.monotonic() + silence_every
                delay = self.settings.evaluate_interval_s
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("alert evaluation failed, retrying: %s", exc)
                await _discard(conn)
                conn, delay = None, min(max(delay * 2, 1.0), 30.0)
            except Exception:  # never take ingestion down with it; say so loudly
                log.exception("alert evaluation failed, retrying")
                await _discard(conn)
                conn, delay = None, min(max(delay * 2, 1.0), 30.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        await _discard(conn)


async def _discard(conn: asyncpg.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close()
