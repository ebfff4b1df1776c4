"""Asset-health test support: simulated pump streams, their wire payloads, the events stored,
and the events one pass of the kernel gives over a whole stream (what every split must give)."""

from __future__ import annotations

import asyncpg
import msgspec
import numpy as np

from ingest.asset.kernel import fresh_state
from ingest.asset.rules import AssetRule
from ingest.asset.scoring import event_of
from ingest.db import asset_state
from ingest.sim.pumps import SENSORS, Fault, Pump
from tests.support.anomaly_reference import Reading
from tests.support.cluster import Database

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
Stream = dict[str, list[Reading]]
Events = dict[int, tuple[int | None, float, float, str]]  # start -> (end, value, score, detail)


def pump_stream(pump: Pump, *, first: int, count: int, start_us: int = T0) -> Stream:
    """Samples [first, first + count) of a pump at 1 Hz, per sensor (slow ones every 5th)."""
    idx = np.arange(first, first + count, dtype=np.int64)
    out: Stream = {}
    for name, (t, v) in pump.values(idx, hz=1.0, start_us=start_us).items():
        out[name] = list(zip(t.tolist(), v.tolist(), strict=True))
    return out


def chunks(stream: Stream, seconds: int, start_us: int = T0) -> list[Stream]:
    """The stream cut into flushes of `seconds` of data each, in time order."""
    end = max(t for readings in stream.values() for t, _ in readings)
    out = []
    lo = start_us
    while lo <= end:
        hi = lo + seconds * 1_000_000
        part = {n: [(t, v) for t, v in r if lo <= t < hi] for n, r in stream.items()}
        out.append({n: r for n, r in part.items() if r})
        lo = hi
    return [c for c in out if c]


def payloads(stream: Stream, seconds: int, start_us: int = T0) -> list[bytes]:
    """Wire-format v1 MessagePack messages, one per `seconds` of the stream, every channel."""
    encoder = msgspec.msgpack.Encoder()
    out = []
    for chunk in chunks(stream, seconds, start_us):
        t0 = min(t for r in chunk.values() for t, _ in r)
        ch = [
            {
                "s": name,
                "t": np.array([t - t0 for t, _ in r], "<i8").tobytes(),
                "v": np.array([v for _, v in r], "<f8").tobytes(),
                "u": SENSORS[name][0],
            }
            for name, r in chunk.items()
        ]
        out.append(encoder.encode({"v": 1, "t0": t0, "ch": ch}))
    return out


async def asset_events(db: Database, device: str) -> Events:
    """The device's asset events as analysts see them (anomalies_v)."""
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT sensor, (extract(epoch FROM ts) * 1000000)::int8 AS start,"
            "       (extract(epoch FROM end_ts) * 1000000)::int8 AS end, value, score, detail"
            "  FROM telemetry.anomalies_v WHERE device = $1 AND kind = 'asset'",
            device,
        )
    finally:
        await conn.close()
    assert all(r["sensor"] == "(asset)" for r in rows), rows
    return {r["start"]: (r["end"], r["value"], r["score"], r["detail"]) for r in rows}


async def stored_model(db: Database, device: str) -> asset_state.Model:
    conn = await asyncpg.connect(db.owner_url)
    try:
        device_id = await conn.fetchval("SELECT id FROM telemetry.devices WHERE path = $1", device)
        (model,) = await asset_state.models(conn, [device_id])
    finally:
        await conn.close()
    return model


def one_pass(model: asset_state.Model, rule: AssetRule, stream: Stream) -> Events:
    """The events of the whole stream run through the kernel at once, from an empty state."""
    names = list(model.model.sensors)
    rows = sorted((t, names.index(n), v) for n, r in stream.items() if n in names for t, v in r)
    ints, floats = fresh_state(len(names))
    _, _, ev_i, ev_f = model.model.run(
        np.array([r[1] for r in rows], np.int32),
        np.array([r[0] for r in rows], np.int64),
        np.array([r[2] for r in rows], np.float64),
        hold_us=rule.hold_us,
        gap_us=rule.gap_us,
        min_us=rule.min_us,
        ints=ints,
        floats=floats,
    )
    out: Events = {}
    for i in range(len(ev_i)):
        e = event_of(model, ev_i[i], ev_f[i])
        out[e.start] = (e.end, e.value, e.score, e.detail)
    return out


def faulty_pump(path: str, *, at_s: int, length_s: int, kind: str = "cavitation") -> Pump:
    start = T0 + at_s * 1_000_000
    return Pump(path, 7, (Fault(kind, path, start, start + length_s * 1_000_000),))
