"""Several ingesters, one database: each sensor's events are those of its readings in time order,
whichever ingester writes which flush and in whatever order they commit.

The "ingesters" here are in-process: each has its own registry, deriver (detector and state
cache) and connection, and writes flushes through the real sink, as `ingest.writer` does; the
flushes are committed one after another in the order a test chooses. (`test_scale_out.py` runs
real `ingest run` processes on a share group.)
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

import asyncpg
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from ingest.anomaly.detector import AnomalyDetector
from ingest.anomaly.layout import KINDS
from ingest.anomaly.params import describe
from ingest.anomaly.rules import AnomalyRule
from ingest.db.registry import Registry, SensorKey
from ingest.db.sink import Readings, Sink
from ingest.derive import Deriver
from ingest.warmup import warm_up
from tests.support.cluster import Database
from tests.test_anomaly import T0, Reading, S, reference_events, scenarios

Split = list[dict[str, list[Reading]]]
Got = dict[tuple[str, str, int], tuple[int | None, object, object, str]]


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_up(sparkplug=False)


class Instance:
    """One ingester's writing side: registry, deriver and one connection."""

    def __init__(
        self, db: Database, rules: Sequence[AnomalyRule], *, replay_max_s: float = 86400.0
    ) -> None:
        self.registry = Registry()
        self.deriver = Deriver(
            rules=rules, rollups=True, registry=self.registry, replay_max_s=replay_max_s
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


PROPERTY = settings(
    max_examples=60,
    deadline=None,  # no timed assertions
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@PROPERTY
@given(scenario=scenarios(), data=st.data())
async def test_flushes_committed_in_any_order_by_any_ingester_give_the_in_order_events(
    database: Database,
    scenario: tuple[dict[int, AnomalyRule | None], dict[int, list[Reading]]],
    data: st.DataObject,
) -> None:
    rule_map, numbered = scenario
    rules, stream = named(rule_map, numbered)
    device = new_device()
    n_flushes = data.draw(st.integers(1, 7), label="flushes")
    flushes: Split = [{} for _ in range(n_flushes)]
    for name, readings in stream.items():
        cuts = sorted(
            data.draw(
                st.lists(
                    st.integers(0, len(readings)), min_size=n_flushes - 1, max_size=n_flushes - 1
                )
            )
        )
        bounds = [0, *cuts, len(readings)]
        for k in range(n_flushes):
            if bounds[k] < bounds[k + 1]:
                flushes[k][name] = readings[bounds[k] : bounds[k + 1]]
    in_order = data.draw(st.booleans(), label="committed in order (round robin)")
    order = list(range(n_flushes))
    if not in_order:
        order = data.draw(st.permutations(order), label="commit order")
    members = data.draw(st.integers(1, 3), label="ingesters")
    writer = [data.draw(st.integers(0, members - 1)) for _ in range(n_flushes)]
    restarts = data.draw(st.sets(st.integers(0, n_flushes - 1)), label="restart before")
    rule_list = list(rules.values())
    instances = [Instance(database, rule_list) for _ in range(members)]
    before = syncs()
    for ingester in instances:
        await ingester.__aenter__()
    try:
        for step, k in enumerate(order):
            i = writer[k]
            if step in restarts:
                await instances[i].__aexit__()
                instances[i] = await Instance(database, rule_list).__aenter__()
            if flushes[k]:
                assert await instances[i].write(device, flushes[k]) == 0
    finally:
        for ingester in instances:
            await ingester.__aexit__()
    for how, count in syncs().items():
        if count > before[how]:
            event(f"state {how}")
    assert await events_of(database, device) == expected_events(rules, stream)


async def test_a_late_flush_that_breaks_an_open_event_splits_it(database: Database) -> None:
    """B commits readings 20-29, which continue a flatline that began at 10, before A commits
    10-19, which break it at 15: the event B wrote (from 10, open) is replaced by the in-order
    ones, and the state both go on from is the in-order one."""
    rule = AnomalyRule(match="*/temp", flatline_count=4, spike_window=5, max=50.0)
    device = new_device()
    values = [10.0 + (i % 3) * 0.25 for i in range(10)] + [20.0] * 5 + [21.0] + [20.0] * 14
    values += [60.0, 61.0] + [12.0] * 8
    readings = [(T0 + i * S, v) for i, v in enumerate(values)]
    async with Instance(database, [rule]) as a, Instance(database, [rule]) as b:
        await a.write(device, {"temp": readings[:10]})
        await b.write(device, {"temp": readings[20:30]})  # first: the run looks unbroken
        before = syncs()
        await a.write(device, {"temp": readings[10:20]})  # late: the run broke at 15
        assert syncs()["replayed"] == before["replayed"] + 1
        await a.write(device, {"temp": readings[30:35]})  # A goes on from B's and its own
        await b.write(device, {"temp": readings[35:38]})  # B restores: A rewrote history
        assert syncs()["restored"] == before["restored"] + 1
        await a.write(device, {"temp": readings[38:40]})  # A catches up with B's three
        assert syncs()["caught_up"] == before["caught_up"] + 1
    assert await events_of(database, device) == expected_events({"temp": rule}, {"temp": readings})


async def test_a_flush_older_than_the_replay_limit_is_skipped_and_counted(
    database: Database,
) -> None:
    rule = AnomalyRule(match="*/temp", max=50.0)
    device = new_device()
    early = [(T0 + i * S, 60.0 if i == 3 else 1.0) for i in range(10)]
    later = [(T0 + (100 + i) * S, 70.0 if i == 5 else 1.0) for i in range(10)]
    async with Instance(database, [rule], replay_max_s=30.0) as a:
        assert await a.write(device, {"temp": later}) == 0
        assert await a.write(device, {"temp": early}) == 10  # 90 s before the newest
    assert await events_of(database, device) == expected_events({"temp": rule}, {"temp": later})


def plant_signal(n: int, seed: int) -> list[float]:
    """Noise with a spike, a step (drift), a flatline and a range excursion."""
    rng = np.random.default_rng(seed)
    v = 50.0 + np.round(rng.normal(0.0, 1.0, n) * 64) / 64  # dyadic: exact sums anywhere
    v[n // 5] += 40.0
    v[2 * n // 5 : 2 * n // 5 + 30] += 12.0
    v[3 * n // 5 : 3 * n // 5 + 25] = v[3 * n // 5]
    v[4 * n // 5 : 4 * n // 5 + 4] = 120.0
    return v.tolist()


@pytest.mark.parametrize("swap", [False, True], ids=["in-order", "neighbours-swapped"])
async def test_round_robin_over_three_ingesters_catches_up_and_gives_the_in_order_events(
    database: Database, swap: bool
) -> None:
    """Flushes of 5 readings dealt out to three ingesters in turn, committed in order (each
    ingester's cache is two flushes behind: it catches up) or with every pair of neighbours
    swapped (every other flush is late: replayed)."""
    rule = AnomalyRule(
        match="*",
        max=100.0,
        max_rate=30.0,
        spike_window=16,
        spike_threshold=5.0,
        spike_min_sigma=0.5,
        drift_window=8,
        drift_baseline=40,
        drift_sigma=4.0,
        flatline_count=10,
    )
    device = new_device()
    stream = {
        name: [(T0 + i * S // 10, v) for i, v in enumerate(plant_signal(400, seed))]
        for seed, name in enumerate(("temp", "vib"))
    }
    flushes = [{name: r[k : k + 5] for name, r in stream.items()} for k in range(0, 400, 5)]
    order = list(range(len(flushes)))
    if swap:
        for k in range(0, len(order) - 1, 2):
            order[k], order[k + 1] = order[k + 1], order[k]
    before = syncs()
    members = [Instance(database, [rule]) for _ in range(3)]
    for ingester in members:
        await ingester.__aenter__()
    try:
        for k in order:
            assert await members[k % 3].write(device, flushes[k]) == 0
    finally:
        for ingester in members:
            await ingester.__aexit__()
    after = syncs()
    how = "replayed" if swap else "caught_up"
    assert after[how] - before[how] >= len(flushes)  # nearly every flush, for both sensors
    rules = {name: rule for name in stream}
    expected = expected_events(rules, stream)
    assert one_pass_events(rules, stream) == expected
    assert {kind for _, kind, _ in expected} == set(KINDS)
    assert await events_of(database, device) == expected
