"""`ingest baseline`: fit each matching device's asset-health model from its stored readings of a
period the user knows was healthy, and store it (a new version) for every ingester to use."""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np

from ingest.asset.model import AssetModel, carry_forward, fit
from ingest.asset.rules import ANCHOR, AssetRule, asset_rule_for
from ingest.db import asset_state as db
from ingest.errors import ConfigError, TransientSinkError

__all__ = ["Fitted", "Request", "baseline", "command"]

_DEVICES = "SELECT id, path FROM telemetry.devices ORDER BY id"
_SENSORS = """
SELECT id, name, (extract(epoch FROM last_seen) * 1000000)::int8 AS seen
  FROM telemetry.sensors WHERE device_id = $1 AND name <> $2 ORDER BY id
"""
# The device's asset events that overlap the window: a refit leaves their spans out.
_EVENTS = """
SELECT (extract(epoch FROM a.start_time) * 1000000)::int8 AS lo,
       (extract(epoch FROM coalesce(a.end_time, $3)) * 1000000)::int8 AS hi
  FROM telemetry.anomalies a JOIN telemetry.sensors s ON s.id = a.sensor_id
 WHERE s.device_id = $1 AND s.name = $4 AND a.kind = 'asset'
   AND a.start_time < $3 AND (a.end_time IS NULL OR a.end_time >= $2)
   AND a.start_time >= $2 - interval '30 days'
"""


@dataclass(frozen=True, slots=True)
class Request:
    """What to fit: devices matching `device` (glob on the device path), sensors matching
    `sensors` (glob on the sensor name), over [start, end) or, with `last_us`, the `last_us`
    microseconds up to the device's newest reading."""

    device: str
    start_us: int | None
    end_us: int | None
    last_us: int | None = None
    sensors: str = "*"
    variance: float = 0.99
    quantile: float = 0.995
    margin: float = 1.1


@dataclass(frozen=True, slots=True)
class Fitted:
    """The outcome for one device: its model and version, or why it has none."""

    device: str
    model: AssetModel | None
    version: int = 0
    skipped: tuple[str, ...] = ()  # sensors left out, with the reason
    problem: str = ""


async def baseline(dsn: str, request: Request, *, rules: Sequence[AssetRule]) -> list[Fitted]:
    """Fit and store the models; raises ConfigError when no device matches."""
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise TransientSinkError(f"baseline: cannot connect to the database: {exc}") from exc
    try:
        devices = [
            (r["id"], r["path"])
            for r in await conn.fetch(_DEVICES)
            if fnmatch.fnmatchcase(r["path"], request.device)
        ]
        if not devices:
            raise ConfigError(f"--device {request.device!r}: matches no device")
        out = []
        for device_id, path in devices:
            rule = asset_rule_for(rules=rules, device=path) or AssetRule(match="*")
            out.append(await _one(conn, device_id, path, request, rule))
        return out
    finally:
        await conn.close()


async def _one(
    conn: asyncpg.Connection, device_id: int, path: str, request: Request, rule: AssetRule
) -> Fitted:
    rows = [
        r
        for r in await conn.fetch(_SENSORS, device_id, ANCHOR)
        if fnmatch.fnmatchcase(r["name"], request.sensors)
    ]
    if request.last_us is not None:
        seen = [r["seen"] for r in rows if r["seen"] is not None]
        if not seen:
            return Fitted(path, None, problem="no readings")
        end = max(seen) + 1
        start = end - request.last_us
    else:
        assert request.start_us is not None
        assert request.end_us is not None
        start, end = request.start_us, request.end_us
    stored = await db.readings(
        conn, sensor_ids=[r["id"] for r in rows], after=start - 1, upto=end - 1
    )
    kept, skipped = [], []
    for r in rows:
        _, v = stored[r["id"]]
        if len(v) < 2:
            skipped.append(f"{r['name']} (no readings)")
        elif np.ptp(v) == 0:
            skipped.append(f"{r['name']} (constant)")
        elif bool(np.all(np.diff(v) >= 0)):
            skipped.append(f"{r['name']} (a cumulative count)")
        else:
            kept.append(r)
    if len(kept) < 2:
        return Fitted(path, None, skipped=tuple(skipped), problem="fewer than 2 usable sensors")
    parts = [stored[r["id"]] for r in kept]
    index = np.concatenate([np.full(len(t), j, np.int32) for j, (t, _) in enumerate(parts)])
    times = np.concatenate([t for t, _ in parts])
    values = np.concatenate([v for _, v in parts])
    ts, x = carry_forward(index, times, values, len(kept), hold_us=rule.hold_us)
    for lo, hi in await conn.fetch(
        _EVENTS, device_id, db.to_datetime(start), db.to_datetime(end), ANCHOR
    ):
        inside = (ts >= lo) & (ts <= hi)
        ts, x = ts[~inside], x[~inside]
    try:
        model = fit(
            [r["name"] for r in kept],
            x,
            variance=request.variance,
            quantile=request.quantile,
            margin=request.margin,
        )
    except ValueError as exc:
        return Fitted(path, None, skipped=tuple(skipped), problem=str(exc))
    version = await db.store_model(
        conn,
        device_id=device_id,
        anchor=ANCHOR,
        sensor_ids=[r["id"] for r in kept],
        model=model,
        fitted_from=start,
        fitted_to=end,
    )
    return Fitted(path, model, version, tuple(skipped))


def command(args: argparse.Namespace) -> int:
    """`ingest baseline`: one line per device fitted (or not); exit status 1 if one was not."""
    from ingest import config as config_mod

    if (args.last is None) == (args.start is None or args.end is None):
        raise ConfigError("baseline: give either --from and --to, or --last")
    times = {}
    for flag, text in (("--from", args.start), ("--to", args.end)):
        if text is not None:
            try:
                times[flag] = config_mod.parse_rfc3339_us(text)
            except ValueError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
    if args.last is None and times["--from"] >= times["--to"]:
        raise ConfigError("baseline: --from must be before --to")
    cfg = config_mod.load(path=args.config, for_migrate=True)
    request = Request(
        device=args.device,
        start_us=times.get("--from"),
        end_us=times.get("--to"),
        last_us=None if args.last is None else round(args.last * 1e6),
        sensors=args.sensors,
        variance=args.variance,
        quantile=args.quantile,
        margin=args.margin,
    )
    dsn = cfg.db.migrate_url or cfg.db.url
    failed = 0
    for f in asyncio.run(baseline(dsn, request, rules=cfg.anomaly.assets)):
        left = f"; left out: {', '.join(f.skipped)}" if f.skipped else ""
        if f.model is None:
            failed += 1
            print(f"ingest: baseline {f.device}: not fitted: {f.problem}{left}")
            continue
        m = f.model
        print(
            f"ingest: baseline {f.device}: model version {f.version}, {len(m.sensors)} sensors "
            f"({', '.join(m.sensors)}), {m.components} components, {m.samples} timestamps, "
            f"T² limit {m.t2_limit:.4g}, Q limit {m.q_limit:.4g}{left}"
        )
    return 1 if failed else 0
