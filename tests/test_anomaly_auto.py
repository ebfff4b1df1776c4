"""The adaptive detector (`detector = "auto"`): exact behaviour on small constructed series, the
same events however the stream is cut or restored, and through the real service."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import asyncpg
import numpy as np
import pytest

from ingest.anomaly.detector import AnomalyDetector, Event
from ingest.anomaly.params import StateNeed, compile_rule
from ingest.anomaly.rules import AnomalyRule
from ingest.warmup import warm_up
from tests.support.anomaly_reference import T0, S, reference_events
from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env
from tests.support.mqtt import Publisher
from tests.support.streams import publish_series

SMALL = {"detector": "auto", "auto_window": 8, "auto_recent": 1, "auto_gap": 1}
ALTERNATING = [float(i % 2) for i in range(24)]  # median 0.5, resolution 1: s = 1


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_up()


def auto(**kw: object) -> AnomalyRule:
    return AnomalyRule(match="*", **{**SMALL, **kw})  # type: ignore[arg-type]


def run(rule: AnomalyRule, vals: Sequence[float]) -> list[Event]:
    detector = AnomalyDetector()
    detector.assign(sensor_id=3, rule=rule)
    pending = detector.process(
        sensor=np.full(len(vals), 3, np.int32),
        time=T0 + S * np.arange(len(vals), dtype=np.int64),
        value=np.array(vals, np.float64),
    )
    detector.commit(pending)
    return list(pending.events)


def at(i: int) -> int:
    return T0 + i * S


def ev(start: int, end: int | None, value: float, score: float, window: int = 8) -> Event:
    detail = f"{score:.3g} x the threshold from the median of the last {window}"
    return Event(
        sensor=3,
        kind="auto",
        start=at(start),
        end=None if end is None else at(end),
        value=value,
        score=score,
        detail=detail,
    )


def test_a_spike_is_judged_in_units_of_the_window_and_its_resolution() -> None:
    # Window of 0s and 1s: m = 0.5, MAD 0.5 (1.4826 * 0.5 < 1), resolution 1: s = 1. 10 is 9.5
    # from m: 9.5 / (4 s) by itself, 9.5 / (2 s) as the mean of the last reading.
    vals = [*ALTERNATING, 10.0, *ALTERNATING[:8]]
    assert run(auto(auto_min_readings=1), vals) == [ev(24, 24, 10.0, 4.75)]
    assert run(auto(auto_min_readings=1, auto_shift_threshold=10.0), vals) == [
        ev(24, 24, 10.0, 2.375)
    ]
    assert run(auto(auto_min_readings=2), vals) == []  # one reading is not a fault


def test_a_quantized_sensor_does_not_fire_on_one_quantum() -> None:
    # Mostly 20.0 with steps of one quantum (0.5): MAD 0, so the resolution is the scale.
    vals = [20.5, 20.0, 20.0, 19.5, 20.0, 20.5, 20.5, 20.0] * 5
    assert run(auto(auto_min_readings=1, auto_shift_threshold=1.0), vals) == []
    # Three quanta away is three times the threshold of one s (kr = 1).
    assert run(auto(auto_min_readings=1, auto_shift_threshold=1.0), [*vals, 21.5]) == [
        ev(len(vals), None, 21.5, 3.0)
    ]


def test_a_window_of_equal_readings_scores_any_change_infinite_unless_floored() -> None:
    vals = [5.0] * 10 + [5.25]
    assert run(auto(auto_min_readings=1), vals) == [ev(10, None, 5.25, math.inf)]
    assert run(auto(auto_min_readings=1, auto_min_sigma=0.1), vals) == [ev(10, None, 5.25, 1.25)]


def test_a_level_shift_is_one_event_until_the_window_has_learned_it() -> None:
    # From reading 24 the level is 5 higher; the median follows once half the window has moved.
    vals = ALTERNATING + [v + 5.0 for v in ALTERNATING]
    got = run(auto(auto_min_readings=2, auto_gap=3), vals)
    assert got == [ev(24, 27, 6.0, 2.5)]  # reading 25: m = 1, MAD 0.5, s = 1, |6 - 1| / 2
    assert got == [
        Event(
            sensor=3,
            kind="auto",
            start=k[2],
            end=o[0],
            value=o[1],
            score=o[2],
            detail=got[0].detail,
        )
        for k, o in reference_events(
            3, auto(auto_min_readings=2, auto_gap=3), enumerate_at(vals)
        ).items()
    ]


def enumerate_at(vals: Sequence[float]) -> list[tuple[int, float]]:
    return [(at(i), v) for i, v in enumerate(vals)]


def test_a_drift_is_caught_once_it_leaves_the_window_behind() -> None:
    # A ramp of 0.3 a reading from reading 40 on, over readings alternating 0 and 1.
    vals = [float(i % 2) + 0.3 * max(0, i - 39) for i in range(120)]
    rule = auto(auto_window=32, auto_recent=4, auto_min_readings=2, auto_gap=4)
    expected = reference_events(3, rule, enumerate_at(vals))
    got = run(rule, vals)
    assert [(e.start, e.end, e.value, e.score) for e in got] == [
        (k[2], *o) for k, o in sorted(expected.items())
    ]
    assert [(e.start, e.end) for e in got] == [(at(53), at(58))]
    # Slower than about kr s per half window, the window learns it: no event.
    slow = [float(i % 2) + 0.1 * max(0, i - 39) for i in range(120)]
    assert run(rule, slow) == []


def test_nothing_is_judged_during_the_learning_period() -> None:
    assert run(auto(auto_min_readings=1), [0.0, 1.0] * 3 + [1e6, 0.0]) == []  # reading 7 of 8
    assert run(auto(auto_min_readings=1), [0.0, 1.0] * 4 + [1e6]) == [ev(8, None, 1e6, 499999.75)]


def test_an_event_needs_its_minimum_run_and_starts_with_it() -> None:
    two = [*ALTERNATING, 10.0, 11.0, *ALTERNATING[:4]]
    assert run(auto(auto_min_readings=3), two) == []
    three = [*ALTERNATING, 10.0, 12.0, 11.0, *ALTERNATING[:4]]
    # reading 25: m = 1 (the 10 is in the window), MAD 0.5, s = 1, |12 - 1| / 2
    assert run(auto(auto_min_readings=3), three) == [ev(24, 26, 12.0, 5.5)]


def test_runs_closer_than_the_gap_are_one_event() -> None:
    vals = [*ALTERNATING, 10.0, 0.0, 1.0, 0.0, 12.0, *ALTERNATING[:8]]  # 3 quiet readings between
    assert run(auto(auto_min_readings=1, auto_gap=4), vals) == [ev(24, 28, 12.0, 5.75)]
    assert run(auto(auto_min_readings=1, auto_gap=3), vals) == [
        ev(24, 24, 10.0, 4.75),
        ev(28, 28, 12.0, 5.75),
    ]
    # Within the gap, a run shorter than the minimum extends the open event.
    # (12 is now judged against a window holding two 10s: s = 1.4826, 11 / (2 s) < 4.75.)
    assert run(auto(auto_min_readings=2, auto_gap=4), [*vals[:24], 10.0, *vals[24:]]) == [
        ev(24, 29, 10.0, 4.75)
    ]


def test_the_state_needs_the_window_and_the_verdicts_its_run_and_gap_recall() -> None:
    assert compile_rule(AnomalyRule(match="*", detector="auto")).need == StateNeed(
        readings=256 + 64, span_us=0
    )
    rule = AnomalyRule(match="*", detector="auto", auto_min_readings=100, auto_gap=2)
    assert compile_rule(rule).need == StateNeed(readings=256 + 99, span_us=0)


def plant(n: int, seed: int) -> np.ndarray:
    """A quantized noisy sensor with a spike, a level shift and a drift."""
    rng = np.random.default_rng(seed)
    v = 50.0 + np.cumsum(rng.normal(0.0, 0.05, n)) + rng.normal(0.0, 0.3, n)
    v[n // 5] += 6.0
    v[2 * n // 5 : 2 * n // 5 + 40] += 4.0
    v[3 * n // 5 :] += np.minimum(np.arange(n - 3 * n // 5) * 0.02, 5.0)
    return np.round(v * 10.0) / 10.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_events_however_the_stream_is_cut_and_restored(seed: int) -> None:
    rule = AnomalyRule(match="*", detector="auto", auto_window=64, auto_gap=16)
    vals = plant(2000, seed)
    times = T0 + S * np.arange(len(vals), dtype=np.int64)
    expected = reference_events(3, rule, list(zip(times.tolist(), vals.tolist(), strict=True)))
    assert len(expected) >= 3
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(vals)), 40, replace=False))
    for restart in (False, True):
        detector = AnomalyDetector()
        detector.assign(sensor_id=3, rule=rule)
        upserts: dict[tuple[int, str, int], Event] = {}
        lo = 0
        for hi in [*cuts.tolist(), len(vals)]:
            if restart:  # a new detector restored from the stored readings and open events
                detector = AnomalyDetector()
                detector.assign(sensor_id=3, rule=rule)
                need = detector.state_needed(sensor_ids=[3]).get(3)
                assert need is not None
                first = max(0, lo - need.readings)
                detector.restore(
                    sensor_id=3,
                    time=times[first:lo],
                    value=vals[first:lo],
                    open_events=[e for e in upserts.values() if e.end is None],
                )
            pending = detector.process(
                sensor=np.full(hi - lo, 3, np.int32), time=times[lo:hi], value=vals[lo:hi]
            )
            detector.commit(pending)
            for e in pending.events:
                upserts[(e.sensor, e.kind, e.start)] = e
            lo = hi
        assert {k: (e.end, e.value, e.score) for k, e in upserts.items()} == expected


# ------------------------------------------------------------------------------------------
# Through the service: MQTT in, telemetry.anomalies_v out
# ------------------------------------------------------------------------------------------

HZ_US = 100_000
N = 900


async def test_the_service_stores_the_auto_events_of_its_readings(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    site = f"site{np.random.default_rng().integers(1 << 30)}"
    device = f"{site}/line1/pump-1"
    values = {f"s{seed}": plant(N, seed) for seed in (4, 5)}
    values["steady"] = np.round(20.0 + np.random.default_rng(6).normal(0.0, 0.2, N), 1)
    rule = {"match": "*/line1/*", "detector": "auto", "auto_window": 64, "auto_gap": 16}
    env = ingester_env(database, mqtt_url, prefix, INGEST_ANOMALY_RULES=json.dumps([rule]))

    first = await Ingester(env).start()
    with Publisher(mqtt_url) as pub:
        sent = publish_series(pub, f"{prefix}/{device}", values, 0, 500, 37, dt_us=HZ_US)
    await acked_at_least(first, sent)
    assert await first.stop() == 0
    second = await Ingester(env).start()  # a new process: state rebuilt from the database
    with Publisher(mqtt_url) as pub:
        sent = publish_series(pub, f"{prefix}/{device}", values, 500, N, 23, dt_us=HZ_US)
    await acked_at_least(second, sent)
    assert await second.stop() == 0

    conn = await asyncpg.connect(database.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT sensor, kind, (extract(epoch FROM ts) * 1000000)::int8 AS start,"
            "       (extract(epoch FROM end_ts) * 1000000)::int8 AS end, value, score"
            "  FROM telemetry.anomalies_v WHERE device = $1",
            device,
        )
    finally:
        await conn.close()
    got = {(r["sensor"], r["kind"], r["start"]): (r["end"], r["value"], r["score"]) for r in rows}
    parsed = AnomalyRule(match="*", detector="auto", auto_window=64, auto_gap=16)
    times = (T0 + HZ_US * np.arange(N, dtype=np.int64)).tolist()
    expected = {}
    for name, v in values.items():
        ref = reference_events(0, parsed, list(zip(times, v.tolist(), strict=True)))
        expected.update({(name, k[1], k[2]): o for k, o in ref.items()})
    assert len(expected) >= 4
    assert not any(name == "steady" for name, _, _ in expected)
    assert got == expected
