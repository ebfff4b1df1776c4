"""In-process ingesters for the state-sync tests, and the events they must produce.

Each `Instance` has its own registry, deriver (detector and state cache) and connection, and
writes flushes through the real sink, as `ingest.writer` does."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

import asyncpg
import msgspec
import numpy as np
from prometheus_client import REGISTRY

from ingest.anomaly.detector import AnomalyDetector
from ingest.anomaly.layout import KINDS
from ingest.anomaly.params import describe
from ingest.anomaly.rules import AnomalyRule
from ingest.asset.rules import AssetRule
from ingest.db.registry import Registry, SensorKey
from ingest.db.sink import Readings, Sink
from ingest.derive import Deriver
from tests.support.anomaly_reference import Reading, reference_events
from tests.support.cluster import Database

Split = list[dict[str, list[Reading]]]
Got = dict[tuple[str, str, int], tuple[int | None, object, object, str]]


class Instance:
    """One ingester's writing side: registry, deriver and one connection."""

    def __init__(
        self,
        db: Database,
        rules: Sequence[AnomalyRule],
        *,
        replay_max_s: float = 86400.0,
        assets: Sequence[AssetRule] = (),
    ) -> None:
        self.registry = Registry()
        self.deriver = Deriver(
            rules=rules,
            assets=assets,
            rollups=True,
            registry=self.registry,
            replay_max_s=replay_max_s,
        )
        self.sink = Sink(dsn=db.ingest_url, jit=False)  # as ingest.writer's

    async def __aenter__(self) -> Instance:
        await self.sink.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sink.close()

    async def write(self, device: str, chunk: dict[str, list[Reading]]) -> int:
        """One flush of `device`'s readings; returns the readings skipped as late."""
        conn = self.sink.connection
        levels = tuple(device.split("/"))
        keys = {SensorKey(levels, name): None for name in chunk}
        await self.registry.resolve(conn, sensors=keys)
        rows = sorted(
            (self.registry.get(SensorKey(levels, name)), t, v)
            for name, readings in chunk.items()
            for t, v in readings
        )
        readings = Readings(
            np.array([r[1] for r in rows], np.int64),
            np.array([r[0] for r in rows], np.int32),
            np.array([r[2] for r in rows], np.float64),
            np.zeros(len(rows), np.uint8),
        )
        await self.deriver.prepare(conn, readings=readings)
        _, derived = await self.sink.write(
            readings=readings,
            dead_letters=(),
            derive=self.deriver.derive,
            settle=self.deriver.settle,
        )
        self.deriver.commit(derived)
        return 0 if derived.pending is None else derived.pending.late


def syncs() -> dict[str, float]:
    """How often the state was restored, caught up and replayed so far (this process)."""
    return {
        how: REGISTRY.get_sample_value("ingest_anomaly_state_syncs_total", {"how": how}) or 0.0
        for how in ("restored", "caught_up", "replayed")
    }


def _key(x: float) -> object:
    return "nan" if math.isnan(x) else x


async def events_of(db: Database, device: str) -> Got:
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT sensor, kind, (extract(epoch FROM ts) * 1000000)::int8 AS start,"
            "       (extract(epoch FROM end_ts) * 1000000)::int8 AS end, value, score, detail"
            "  FROM telemetry.anomalies_v WHERE device = $1",
            device,
        )
    finally:
        await conn.close()
    return {
        (r["sensor"], r["kind"], r["start"]): (
            r["end"],
            _key(r["value"]),
            _key(r["score"]),
            r["detail"],
        )
        for r in rows
    }


def expected_events(rules: dict[str, AnomalyRule], stream: dict[str, list[Reading]]) -> Got:
    out: Got = {}
    for name, rule in rules.items():
        for (_, kind, start), (end, value, score) in reference_events(
            0, rule, stream[name]
        ).items():
            detail = describe(KINDS.index(kind), value, score, rule)
            out[(name, kind, start)] = (end, _key(value), _key(score), detail)
    return out


def one_pass_events(rules: dict[str, AnomalyRule], stream: dict[str, list[Reading]]) -> Got:
    """The events of one detector given each sensor's whole stream at once, in time order (for
    streams too long for the plain-Python reference, which `test_anomaly` holds it to)."""
    detector = AnomalyDetector()
    names = sorted(rules)
    for i, name in enumerate(names):
        detector.assign(sensor_id=i, rule=rules[name])
    rows = [(i, t, v) for i, name in enumerate(names) for t, v in stream[name]]
    pending = detector.process(
        sensor=np.array([r[0] for r in rows], np.int32),
        time=np.array([r[1] for r in rows], np.int64),
        value=np.array([r[2] for r in rows], np.float64),
    )
    return {
        (names[e.sensor], e.kind, e.start): (e.end, _key(e.value), _key(e.score), e.detail)
        for e in pending.events
    }


def named(
    rule_map: dict[int, AnomalyRule | None], stream: dict[int, list[Reading]]
) -> tuple[dict[str, AnomalyRule], dict[str, list[Reading]]]:
    """Sensor numbers as names, each rule matching its own sensor only."""
    rules = {
        f"s{s}": msgspec.structs.replace(rule, match=f"*/s{s}")
        for s, rule in rule_map.items()
        if rule is not None
    }
    return rules, {f"s{s}": readings for s, readings in stream.items()}


def new_device() -> str:
    return f"sync-{uuid.uuid4().hex[:10]}/line/dev"


def plant_signal(n: int, seed: int) -> list[float]:
    """Noise with a spike, a step (drift), a flatline and a range excursion."""
    rng = np.random.default_rng(seed)
    v = 50.0 + np.round(rng.normal(0.0, 1.0, n) * 64) / 64  # dyadic: exact sums anywhere
    v[n // 5] += 40.0
    v[2 * n // 5 : 2 * n // 5 + 30] += 12.0
    v[3 * n // 5 : 3 * n // 5 + 25] = v[3 * n // 5]
    v[4 * n // 5 : 4 * n // 5 + 4] = 120.0
    return [float(x) for x in v]
