"""Anomaly filters: a plain-Python reference defines them; the kernels must match it exactly."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given
from hypothesis import strategies as st

from ingest.anomaly import detector as anomaly
from ingest.anomaly import filters
from ingest.anomaly.detector import KINDS, AnomalyDetector, Event, Pending, StateNeed
from ingest.anomaly.layout import MAD_SCALE
from ingest.anomaly.rules import AnomalyRule, rule_for
from ingest.warmup import warm_up
from tests.support.anomaly_reference import (
    T0,
    Key,
    Outcome,
    Reading,
    S,
    reference_events,
    scenarios,
    streams,
)
from tests.support.properties import property_settings

PROPERTY = property_settings(300, HealthCheck.data_too_large)


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_up()


def columns(chunk: dict[int, list[Reading]]) -> dict[str, np.ndarray]:
    rows = sorted((s, t, v) for s, readings in chunk.items() for t, v in readings)
    return {
        "sensor": np.array([r[0] for r in rows], np.int32),
        "time": np.array([r[1] for r in rows], np.int64),
        "value": np.array([r[2] for r in rows], np.float64),
    }


def tail(history: list[Reading], need: StateNeed, *, everything: bool) -> list[Reading]:
    """What the pipeline reads from the database for `need`: finite readings, newest last."""
    finite = [(t, v) for t, v in history if math.isfinite(v)]
    if everything or not finite:
        return finite
    start = max(0, len(finite) - need.readings)
    if need.span_us:
        latest = finite[-1][0]
        start = min([start] + [i for i, (t, _) in enumerate(finite) if t > latest - need.span_us])
    return finite[start:]


def fresh(rules: dict[int, AnomalyRule | None]) -> AnomalyDetector:
    detector = AnomalyDetector()
    for sensor, rule in rules.items():
        detector.assign(sensor_id=sensor, rule=rule)
    return detector


def restore_all(
    detector: AnomalyDetector,
    history: dict[int, list[Reading]],
    upserts: dict[Key, Event],
    *,
    everything: bool = False,
) -> None:
    for sensor, need in detector.state_needed(sensor_ids=list(history)).items():
        got = tail(history[sensor], need, everything=everything)
        detector.restore(
            sensor_id=sensor,
            time=np.array([t for t, _ in got], np.int64),
            value=np.array([v for _, v in got], np.float64),
            open_events=[e for e in upserts.values() if e.sensor == sensor and e.end is None],
        )


def apply(upserts: dict[Key, Event], events: Iterable[Event]) -> None:
    """Upsert by (sensor, kind, start) as the database does; a closed event never changes."""
    for ev in events:
        key = (ev.sensor, ev.kind, ev.start)
        before = upserts.get(key)
        assert before is None or before.end is None, f"closed event updated: {before} -> {ev}"
        assert before is None or ev.score >= before.score
        upserts[key] = ev


def from_columns(pending: Pending) -> list[Event]:
    """The events of a pending as the columns of their upsert have them."""
    c = pending.columns()
    assert len({len(column) for column in c}) == 1
    assert len(c.start) == pending.count
    return [
        Event(sensor=s, kind=k, start=t, end=e, value=v, score=sc, detail=d)
        for t, s, k, e, v, sc, d in zip(*c, strict=True)
    ]


def outcomes(upserts: dict[Key, Event]) -> dict[Key, Outcome]:
    return {k: (e.end, e.value, e.score) for k, e in upserts.items()}


def split_in_order(
    draw: Callable[..., Any], stream: dict[int, list[Reading]], flushes: int
) -> list[dict[int, list[Reading]]]:
    """Cut each sensor's stream at random points: flush k holds its k-th piece."""
    out: list[dict[int, list[Reading]]] = [{} for _ in range(flushes)]
    for sensor, readings in stream.items():
        cuts = sorted(
            draw(
                st.lists(st.integers(0, len(readings)), min_size=flushes - 1, max_size=flushes - 1)
            )
        )
        bounds = [0, *cuts, len(readings)]
        for k in range(flushes):
            out[k][sensor] = readings[bounds[k] : bounds[k + 1]]
    return out


# ------------------------------------------------------------------------------------------
# The key properties
# ------------------------------------------------------------------------------------------


def note(text: str) -> None:
    """Count a case in the statistics (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(text)


def drive(
    rule_map: dict[int, AnomalyRule | None],
    flushes: list[dict[int, list[Reading]]],
    *,
    restarts: set[int],
    retries: set[int] = frozenset(),  # type: ignore[assignment]
    everything: bool = False,
    restore_new: bool = True,
) -> dict[Key, Event]:
    """Run flushes in order, as the pipeline does, restarting before the flushes in `restarts`."""
    upserts: dict[Key, Event] = {}
    history: dict[int, list[Reading]] = {s: [] for s in rule_map}
    detector = fresh(rule_map)
    if restore_new:
        restore_all(detector, history, upserts, everything=everything)
    for k, chunk in enumerate(flushes):
        if k in restarts:
            for ev in upserts.values():
                if ev.end is None:
                    note(f"restored an open {ev.kind} event")
            detector = fresh(rule_map)
            restore_all(detector, history, upserts, everything=everything)
        cols = columns(chunk)
        pending = detector.process(**cols)
        if k in retries:  # the transaction failed: drop the pending, process the flush again
            again = detector.process(**cols)
            assert again.events == pending.events
            pending = again
        detector.commit(pending)
        assert pending.late == 0
        written = from_columns(pending)  # as the flush writes them
        assert written == list(pending.events)
        apply(upserts, written)
        for sensor, readings in chunk.items():
            history[sensor].extend(readings)
    for e in upserts.values():
        assert e.detail
        assert e.kind in KINDS
        note(f"{e.kind} event")
    return upserts


def reference_all(
    rule_map: dict[int, AnomalyRule | None], stream: dict[int, list[Reading]]
) -> dict[Key, Outcome]:
    expected: dict[Key, Outcome] = {}
    for sensor, rule in rule_map.items():
        if rule is not None:
            expected.update(reference_events(sensor, rule, stream[sensor]))
    return expected


@PROPERTY
@given(scenario=scenarios(), data=st.data())
def test_any_split_and_restart_gives_the_reference_events(
    scenario: tuple[dict[int, AnomalyRule | None], dict[int, list[Reading]]], data: st.DataObject
) -> None:
    rule_map, stream = scenario
    n_flushes = data.draw(st.integers(1, 6), label="flushes")
    upserts = drive(
        rule_map,
        split_in_order(data.draw, stream, n_flushes),
        restarts=data.draw(st.sets(st.integers(1, max(1, n_flushes - 1))), label="restarts"),
        retries=data.draw(st.sets(st.integers(0, n_flushes - 1)), label="retries"),
        everything=data.draw(st.booleans(), label="restore from the whole history"),
        restore_new=data.draw(st.booleans(), label="restore new sensors (from nothing)"),
    )
    assert outcomes(upserts) == reference_all(rule_map, stream)


one_filter = st.one_of(
    st.builds(
        lambda lo: AnomalyRule(match="*", min=lo, max=lo + 3.0), st.sampled_from([-1.0, 0.0])
    ),
    st.builds(lambda r: AnomalyRule(match="*", max_rate=r), st.sampled_from([0.5, 4.0])),
    st.builds(lambda w: AnomalyRule(match="*", spike_window=w), st.integers(3, 6)),
    st.builds(
        lambda w, b: AnomalyRule(match="*", drift_window=w, drift_baseline=b, drift_sigma=1.0),
        st.integers(1, 4),
        st.integers(2, 5),
    ),
    st.builds(lambda n: AnomalyRule(match="*", flatline_count=n), st.integers(2, 7)),
    st.builds(
        lambda x: AnomalyRule(match="*", flatline_seconds=x), st.sampled_from([0.5, 2.0, 3.5, 7.0])
    ),
    st.builds(
        lambda n, x: AnomalyRule(match="*", flatline_count=n, flatline_seconds=x),
        st.integers(2, 7),
        st.sampled_from([2.0, 7.0]),
    ),
)


@PROPERTY
@given(rule=one_filter, data=st.data())
def test_restart_before_every_flush_gives_the_reference_events(
    rule: AnomalyRule, data: st.DataObject
) -> None:
    stream = {5: data.draw(streams(max_len=30, repeat=2), label="stream")}
    flushes = split_in_order(data.draw, stream, data.draw(st.integers(2, 10), label="flushes"))
    upserts = drive({5: rule}, flushes, restarts=set(range(len(flushes))))
    assert outcomes(upserts) == reference_all({5: rule}, stream)


@PROPERTY
@given(scenario=scenarios(), data=st.data())
def test_late_readings_are_ignored_and_counted(
    scenario: tuple[dict[int, AnomalyRule | None], dict[int, list[Reading]]], data: st.DataObject
) -> None:
    rule_map, stream = scenario
    n_flushes = data.draw(st.integers(1, 5), label="flushes")
    # Any partition: a later flush may hold earlier readings (late data).
    flushes: list[dict[int, list[Reading]]] = [{s: [] for s in stream} for _ in range(n_flushes)]
    for sensor, readings in stream.items():
        for reading in readings:
            flushes[data.draw(st.integers(0, n_flushes - 1))][sensor].append(reading)

    detector = fresh(rule_map)
    upserts: dict[Key, Event] = {}
    late = 0
    for chunk in flushes:
        pending = detector.process(**columns(chunk))
        detector.commit(pending)
        apply(upserts, pending.events)
        late += pending.late

    expected: dict[Key, Outcome] = {}
    expected_late = 0
    for sensor, rule in rule_map.items():
        if rule is None:
            continue
        accepted: list[Reading] = []
        for chunk in flushes:
            for t, v in sorted(chunk[sensor]):
                if not math.isfinite(v):
                    continue
                if accepted and t <= accepted[-1][0]:
                    expected_late += 1
                else:
                    accepted.append((t, v))
        expected.update(reference_events(sensor, rule, accepted))
    assert outcomes(upserts) == expected
    assert late == expected_late


def test_many_sensors_grow_and_compact_the_state() -> None:
    rng = np.random.default_rng(3)
    rule_a = AnomalyRule(match="*", spike_window=9, drift_window=3, drift_baseline=20)
    rule_b = AnomalyRule(match="*", max_rate=3.0, flatline_count=3, spike_window=4)
    rule_map: dict[int, AnomalyRule | None] = {s: (rule_a if s % 3 else rule_b) for s in range(300)}
    detector = fresh(rule_map)
    for s in range(0, 300, 7):  # reassign some: new slots, and the pool compacts as it grows
        detector.assign(sensor_id=s, rule=None)
        detector.assign(sensor_id=s, rule=rule_b if s % 3 else rule_a)
        rule_map[s] = rule_b if s % 3 else rule_a
    stream = {
        s: [
            (T0 + i * S, float(v))
            for i, v in enumerate(rng.integers(0, 4, 60) * rng.normal(1, 0.2, 60))
        ]
        for s in range(300)
    }
    upserts: dict[Key, Event] = {}
    for k in range(3):
        chunk = {s: r[k * 20 : (k + 1) * 20] for s, r in stream.items()}
        pending = detector.process(**columns(chunk))
        detector.commit(pending)
        apply(upserts, pending.events)
    expected: dict[Key, Outcome] = {}
    for s, rule in rule_map.items():
        assert rule is not None
        expected.update(reference_events(s, rule, stream[s]))
    assert expected
    assert outcomes(upserts) == expected


# ------------------------------------------------------------------------------------------
# Each filter on a hand-checked example
# ------------------------------------------------------------------------------------------


def run(rule: AnomalyRule, vals: Sequence[float], *, step: int = S) -> list[Event]:
    detector = AnomalyDetector()
    detector.assign(sensor_id=3, rule=rule)
    pending = detector.process(
        sensor=np.full(len(vals), 3, np.int32),
        time=T0 + step * np.arange(len(vals), dtype=np.int64),
        value=np.array(vals, np.float64),
    )
    detector.commit(pending)
    return list(pending.events)


def at(i: int) -> int:
    return T0 + i * S


def test_range() -> None:
    events = run(AnomalyRule(match="*", min=0.0, max=10.0), [0, 5, 11, 12, 3, -1, 4, -2])
    assert events == [
        Event(
            sensor=3,
            kind="range",
            start=at(2),
            end=at(3),
            value=12.0,
            score=2.0,
            detail="above max 10.0",
        ),
        Event(
            sensor=3,
            kind="range",
            start=at(5),
            end=at(5),
            value=-1.0,
            score=1.0,
            detail="below min 0.0",
        ),
        Event(
            sensor=3,
            kind="range",
            start=at(7),
            end=None,
            value=-2.0,
            score=2.0,
            detail="below min 0.0",
        ),
    ]


def test_rate() -> None:
    events = run(AnomalyRule(match="*", max_rate=2.0), [0, 1, 10, 11, 12])
    assert events == [
        Event(
            sensor=3,
            kind="rate",
            start=at(2),
            end=at(2),
            value=10.0,
            score=4.5,
            detail="rate 4.5 x max_rate 2.0/s",
        )
    ]
    # per second, not per reading: the same step over half a second is twice the rate
    (event,) = run(AnomalyRule(match="*", max_rate=2.0), [0, 1, 10, 11, 12], step=S // 2)
    assert event.score == 9.0


def test_spike_uses_the_median_and_mad_of_the_previous_window() -> None:
    events = run(AnomalyRule(match="*", spike_window=5), [10, 11, 10, 12, 11, 50, 11, 10])
    assert len(events) == 1
    ev = events[0]
    assert (ev.kind, ev.start, ev.end, ev.value) == ("spike", at(5), at(5), 50.0)
    assert ev.score == 39.0 / (MAD_SCALE * 1.0)
    assert ev.detail == "26.3 scaled MADs from the median of the last 5"


@pytest.mark.parametrize("window", [3, 4, 31, 32, 64, 1024])
def test_spike_with_wide_windows_and_ties(window: int) -> None:
    rng = np.random.default_rng(window)
    vals = np.round(rng.normal(0.0, 1.0, 3 * window + 50), 1)  # many ties
    vals[rng.random(vals.shape[0]) < 0.05] += 8.0
    rule = AnomalyRule(match="*", spike_window=window, spike_threshold=2.0)
    stream = {3: [(at(i), float(v)) for i, v in enumerate(vals)]}
    flushes = split_in_order(lambda _: [window + 1, 2 * window], stream, 3)
    expected = reference_all({3: rule}, stream)
    assert expected
    assert outcomes(drive({3: rule}, flushes, restarts={2})) == expected


def test_spike_on_a_flat_window_scores_infinity_unless_floored() -> None:
    (ev,) = run(AnomalyRule(match="*", spike_window=3), [4, 4, 4, 5, 4])
    assert ev.score == math.inf
    assert run(AnomalyRule(match="*", spike_window=3, spike_min_sigma=0.5), [4, 4, 4, 5, 4]) == []


def test_drift_compares_the_rolling_mean_with_the_baseline_before_it() -> None:
    vals = [1, 2, 1, 2, 1, 2, 10, 10, 2, 1, 2, 1, 2]
    events = run(AnomalyRule(match="*", drift_window=2, drift_baseline=4), vals)
    first = events[0]
    # opens at the first 10 (mean 6.0), peaks at the second (mean 10.0, baseline 1.5 +- 0.577)
    assert (first.kind, first.start, first.end, first.value) == ("drift", at(6), at(7), 10.0)
    assert first.score == pytest.approx(8.5 / math.sqrt(1 / 3))
    assert first.detail.startswith("mean of the last 2 is ")


@pytest.mark.parametrize("offset", [0.0, -7.25, 1e3, 1e6, 3e11])
def test_drift_right_at_the_floor_matches_the_reference(offset: float) -> None:
    """Steps of exactly, just under and just over k * drift_min_sigma, on large offsets and
    long enough to slide and re-sum the running window sums many times."""
    rule = AnomalyRule(
        match="*", drift_window=16, drift_baseline=64, drift_sigma=3.0, drift_min_sigma=0.5
    )
    quiet = 3.0 * 0.5
    steps = [quiet, math.nextafter(quiet, 0), math.nextafter(quiet, 9), quiet * (1 - 1e-13)]
    steps += [quiet * (1 + 1e-13), -quiet, math.nextafter(-quiet, 0), 2 * quiet, quiet / 2]
    vals: list[float] = []
    for i, step in enumerate(steps):
        vals += [offset + 1e-9 * offset * (i % 3)] * 97 + [offset + step] * (29 + i)
    apart = S  # one reading a second
    upserts: dict[Key, Event] = {}
    apply(upserts, run(rule, vals, step=apart))
    expected = reference_events(3, rule, [(T0 + apart * i, v) for i, v in enumerate(vals)])
    assert outcomes(upserts) == expected
    assert expected  # some of the steps do offend


@pytest.mark.parametrize("offset", [0.0, -7.25, 1e6, 3e11])
def test_drift_over_a_long_baseline_is_exact_however_the_stream_is_cut(offset: float) -> None:
    """Hundreds of readings slide through exact sums across flushes and restarts; a reading
    beyond 2**300 sends its windows to eight lanes until it has left them."""
    rng = np.random.default_rng(11)
    n = 1_400
    vals = offset + np.cumsum(rng.normal(0.0, 0.5, n))
    vals[700:760] += 25.0  # a shift
    vals[900] = 2.0**301
    vals[901] = 1e-310
    rule = AnomalyRule(match="*", drift_window=20, drift_baseline=300, drift_sigma=3.0)
    stream = {3: [(at(i), float(v)) for i, v in enumerate(vals)]}
    cuts = [1, 319, 320, 333, 905, 1_000]
    flushes = split_in_order(lambda _: cuts, stream, len(cuts) + 1)
    expected = reference_all({3: rule}, stream)
    assert len(expected) >= 2
    assert outcomes(drive({3: rule}, flushes, restarts={2, 4, 5})) == expected
    assert outcomes(drive({3: rule}, flushes, restarts=set())) == expected


@pytest.mark.parametrize("data", ["steps of 0.1", "1/64 on 1e15", "cancelling 1e16", "zeros"])
def test_drift_on_ties_and_cancellation_is_exact_however_the_stream_is_cut(data: str) -> None:
    """Readings whose sums land on or near ties between two doubles (quantized, or on a large
    offset), readings that cancel each other, and a stretch of zeros (a sum of exactly 0):
    the running sums decide most reads, the window the others, the same events either way."""
    rng = np.random.default_rng(13)
    n = 900
    noise = rng.normal(0.0, 1.0, n)
    if data == "steps of 0.1":
        vals = 20.0 + np.round(np.cumsum(noise * 0.3), 1)
    elif data == "1/64 on 1e15":
        vals = 1e15 + np.round(noise * 3.0 * 64) / 64
    elif data == "cancelling 1e16":
        vals = noise.copy()
        vals[::7] += 1e16
        vals[3::7] -= 1e16
    else:
        vals = np.round(noise, 2)
        vals[300:560] = 0.0
    vals[420:470] += 1e17 if data == "cancelling 1e16" else 40.0  # a shift
    rule = AnomalyRule(match="*", drift_window=10, drift_baseline=200, drift_sigma=3.0)
    stream = {3: [(at(i), float(v)) for i, v in enumerate(vals)]}
    cuts = [1, 209, 210, 333, 471, 800]
    flushes = split_in_order(lambda _: cuts, stream, len(cuts) + 1)
    expected = reference_all({3: rule}, stream)
    assert expected
    assert outcomes(drive({3: rule}, flushes, restarts={2, 4})) == expected
    assert outcomes(drive({3: rule}, flushes, restarts=set())) == expected


def test_flatline_by_count_and_by_seconds_starts_with_the_run() -> None:
    vals = [1, 2, 2, 2, 2, 3]
    expected = Event(
        sensor=3,
        kind="flatline",
        start=at(1),
        end=at(4),
        value=2.0,
        score=3.0,
        detail="unchanged for 3 s",
    )
    assert run(AnomalyRule(match="*", flatline_count=3), vals) == [expected]
    assert run(AnomalyRule(match="*", flatline_seconds=2.0), vals) == [expected]
    assert run(AnomalyRule(match="*", flatline_seconds=2.000001), vals) == [expected]
    assert run(AnomalyRule(match="*", flatline_count=5), vals) == []


def test_non_finite_values_are_skipped_entirely() -> None:
    vals = [1, 2, math.nan, 2, math.inf, 2, -math.inf, 3]
    (ev,) = run(AnomalyRule(match="*", flatline_count=3, max=3.5), vals)
    assert (ev.kind, ev.start, ev.end) == ("flatline", at(1), at(5))
    (ev,) = run(AnomalyRule(match="*", max_rate=0.6), vals)
    assert (ev.start, ev.end, ev.value, ev.score) == (at(1), at(1), 2.0, 1 / 0.6)


# ------------------------------------------------------------------------------------------
# Transactions, restore, assignment
# ------------------------------------------------------------------------------------------


def flush(values_: Sequence[float], *, first: int = 0, sensor: int = 1) -> dict[str, np.ndarray]:
    n = len(values_)
    return {
        "sensor": np.full(n, sensor, np.int32),
        "time": T0 + S * (first + np.arange(n, dtype=np.int64)),
        "value": np.array(values_, np.float64),
    }


def test_an_event_spans_flushes_as_one_key() -> None:
    detector = fresh({1: AnomalyRule(match="*", max=1.0)})
    got = []
    first = 0
    for vals in ([0, 2, 3], [5], [], [math.nan], [4, 0]):
        pending = detector.process(**flush(vals, first=first))
        detector.commit(pending)
        first += len(vals)
        got.append([(e.start, e.end, e.score) for e in pending.events])
    assert got == [[(at(1), None, 2.0)], [(at(1), None, 4.0)], [], [], [(at(1), at(5), 4.0)]]


def test_process_does_not_touch_committed_state() -> None:
    detector = fresh({1: AnomalyRule(match="*", max=1.0, spike_window=3, flatline_count=2)})
    first = detector.process(**flush([0, 0, 5, 5, 0]))
    second = detector.process(**flush([0, 0, 5, 5, 0]))
    assert first.events == second.events
    assert first.events
    detector.commit(second)
    with pytest.raises(RuntimeError, match="stale"):
        detector.commit(first)
    third = detector.process(**flush([0, 0, 5, 5, 0]))
    assert third.late == 5
    assert third.events == ()


def test_commit_refuses_a_pending_made_stale_by_restore_or_assign() -> None:
    rule = AnomalyRule(match="*", max=1.0)
    detector = fresh({1: rule})
    pending = detector.process(**flush([2]))
    detector.restore(sensor_id=1, time=np.array([T0 - S]), value=np.array([0.0]), open_events=())
    with pytest.raises(RuntimeError, match="stale"):
        detector.commit(pending)
    pending = detector.process(**flush([2]))
    with pytest.raises(RuntimeError, match="another detector"):
        fresh({1: rule}).commit(pending)
    detector.assign(sensor_id=1, rule=AnomalyRule(match="*", max=2.0))
    with pytest.raises(RuntimeError, match="stale"):
        detector.commit(pending)


def test_events_are_described_by_the_rules_they_were_processed_with() -> None:
    """A pending's events are built when first read: a rule assigned since does not change
    them, nor does a sensor that lost its rule."""
    detector = fresh({1: AnomalyRule(match="*", max=1.0), 2: AnomalyRule(match="*", min=0.0)})
    pending = detector.process(
        sensor=np.array([1, 1, 2], np.int32),
        time=np.array([T0, T0 + S, T0], np.int64),
        value=np.array([0.0, 3.0, -1.0]),
    )
    detector.assign(sensor_id=1, rule=AnomalyRule(match="*", max=2.0))
    detector.assign(sensor_id=2, rule=None)
    assert pending.count == 2
    assert pending.columns() == (
        [T0 + S, T0],
        [1, 2],
        ["range", "range"],
        [None, None],
        [3.0, -1.0],
        [2.0, 1.0],
        ["above max 1.0", "below min 0.0"],
    )
    assert [e.detail for e in pending.events] == ["above max 1.0", "below min 0.0"]
    quiet = fresh({1: AnomalyRule(match="*", max=1.0)}).process(**flush([0.0]))
    assert quiet.count == 0
    assert quiet.columns() == ([], [], [], [], [], [], [])
    assert quiet.events == ()


def test_sensors_without_rule_are_skipped() -> None:
    detector = fresh({1: AnomalyRule(match="*", max=1.0), 2: None})
    cols: dict[str, Any] = {
        "sensor": np.array([0, 1, 2, 2, 5_000_000], np.int32),
        "time": np.array([T0, T0, T0, T0 + 1, T0], np.int64),
        "value": np.full(5, 9.0),
    }
    pending = detector.process(**cols)
    assert [e.sensor for e in pending.events] == [1]
    assert detector.state_needed(sensor_ids=[0, 1, 2, 5_000_000]) == {
        1: StateNeed(readings=1, span_us=0)
    }
    detector.commit(pending)
    assert detector.state_needed(sensor_ids=np.array([1, 2])) == {}
    detector.assign(sensor_id=1, rule=None)
    assert detector.rule(sensor_id=1) is None
    assert detector.process(**cols).events == ()


def test_unsorted_input_is_refused() -> None:
    detector = fresh({1: AnomalyRule(match="*", max=1.0)})
    with pytest.raises(ValueError, match="row 1"):
        detector.process(
            sensor=np.array([2, 1], np.int32), time=np.array([1, 2]), value=np.zeros(2)
        )
    with pytest.raises(ValueError, match="row 2"):
        detector.process(
            sensor=np.array([1, 1, 1], np.int32), time=np.array([1, 2, 2]), value=np.zeros(3)
        )


@pytest.mark.parametrize(
    ("rule", "need"),
    [
        (AnomalyRule(match="*", max=1.0), StateNeed(readings=1, span_us=0)),
        (AnomalyRule(match="*", spike_window=9), StateNeed(readings=9, span_us=0)),
        (
            AnomalyRule(match="*", drift_window=3, drift_baseline=10),
            StateNeed(readings=13, span_us=0),
        ),
        (AnomalyRule(match="*", flatline_count=4), StateNeed(readings=3, span_us=0)),
        (AnomalyRule(match="*", flatline_seconds=1.5), StateNeed(readings=1, span_us=1_500_000)),
        (
            AnomalyRule(match="*", flatline_seconds=1.5, flatline_count=30, spike_window=5),
            StateNeed(readings=29, span_us=0),
        ),
    ],
)
def test_state_needed(rule: AnomalyRule, need: StateNeed) -> None:
    detector = fresh({4: rule})
    assert detector.state_needed(sensor_ids=[4]) == {4: need}
    detector.restore(sensor_id=4, time=np.zeros(0, np.int64), value=np.zeros(0), open_events=())
    assert detector.state_needed(sensor_ids=[4]) == {}
    detector.forget(sensor_ids=[4])
    assert detector.state_needed(sensor_ids=[4]) == {4: need}
    detector.assign(sensor_id=4, rule=rule)  # the same rule: keeps the state
    detector.restore(sensor_id=4, time=np.zeros(0, np.int64), value=np.zeros(0), open_events=())
    detector.assign(sensor_id=4, rule=rule)
    assert detector.state_needed(sensor_ids=[4]) == {}


def test_restore_checks_its_input() -> None:
    detector = fresh({1: AnomalyRule(match="*", max=1.0)})
    other = Event(sensor=2, kind="range", start=T0, end=None, value=2.0, score=1.0, detail="")
    with pytest.raises(ValueError, match="not an open event"):
        detector.restore(
            sensor_id=1, time=np.array([T0]), value=np.array([2.0]), open_events=[other]
        )
    with pytest.raises(ValueError, match="increasing"):
        detector.restore(sensor_id=1, time=np.array([T0, T0]), value=np.zeros(2), open_events=())
    detector.restore(sensor_id=9, time=np.array([T0]), value=np.zeros(1), open_events=())  # no rule


# ------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "sets no filter"),
        ({"min": 2.0, "max": 1.0}, "min 2.0 is above max 1.0"),
        ({"max": math.nan}, "max must be a finite number"),
        ({"max_rate": 0.0}, "max_rate must be a finite number > 0"),
        ({"spike_window": 2}, "spike_window must be an integer from 3 to 36000"),
        ({"spike_window": 4.0}, "spike_window must be an integer"),
        ({"spike_threshold": 2.0, "max": 1.0}, "spike_threshold is set but spike_window is not"),
        ({"spike_window": 5, "spike_threshold": -1.0}, "spike_threshold must be"),
        ({"drift_window": 5}, "drift_window is set but drift_baseline is not"),
        ({"drift_window": 5, "drift_baseline": 1}, "drift_baseline must be an integer from 2"),
        ({"drift_window": 50_000, "drift_baseline": 50_001}, "drift_baseline must be at most"),
        ({"flatline_count": 1}, "flatline_count must be an integer from 2"),
        ({"flatline_seconds": 0.0}, "flatline_seconds must be a number of seconds"),
        ({"max": True}, "max must be a finite number"),
    ],
)
def test_rule_validation_names_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        AnomalyRule(match="line1/*", **fields)  # type: ignore[arg-type]
    assert "anomaly rule 'line1/*': " in str(info.value)


def test_rule_from_config_data_gets_the_path() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"spike_window must be .* at `\$\[1\]`"):
        msgspec.convert(
            [{"match": "*", "max": 1}, {"match": "*", "spike_window": 1}], list[AnomalyRule]
        )
    with pytest.raises(msgspec.ValidationError, match="unknown field `maxx`"):
        msgspec.convert({"match": "*", "maxx": 1}, AnomalyRule)
    (rule,) = msgspec.convert(
        [{"match": "a/*", "max": 1, "flatline_seconds": 60}], list[AnomalyRule]
    )
    assert run(rule, [0, 2]) != []


def test_rule_for_takes_the_first_match() -> None:
    hot = AnomalyRule(match="press-*/temp*", max=90.0)
    any_temp = AnomalyRule(match="*/temp*", max=120.0)
    rules = [hot, any_temp]
    assert rule_for(rules=rules, path="press-07/temp.oil") is hot
    assert rule_for(rules=rules, path="mill-1/temp.oil") is any_temp
    assert rule_for(rules=rules, path="mill-1/Temp") is None  # case-sensitive
    assert rule_for(rules=[AnomalyRule(match="*", max=1.0)], path="a/b/c") is not None
    assert rule_for(rules=[], path="a/b") is None


# ------------------------------------------------------------------------------------------
# Threads: the writers call `process` from worker threads
# ------------------------------------------------------------------------------------------


def _busy_detector() -> tuple[AnomalyDetector, dict[str, np.ndarray]]:
    """Sensors 1..40 with full windows, and sensor 0's pool area before theirs released, so
    that the next pool growth compacts (moves) all of theirs."""
    rule = AnomalyRule(match="*", spike_window=8, drift_window=4, drift_baseline=30)
    detector = fresh({s: rule for s in range(41)})
    rng = np.random.default_rng(8)
    stream = {
        s: [(at(i), float(v)) for i, v in enumerate(rng.normal(0, 1, 60))] for s in range(1, 41)
    }
    detector.commit(detector.process(**columns({s: r[:40] for s, r in stream.items()})))
    detector.assign(sensor_id=0, rule=None)
    return detector, columns({s: r[40:] for s, r in stream.items()})


def test_state_changes_wait_for_a_process_running_in_another_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rule assigned while a flush is processed (the pool grows and compacts) changes
    nothing that flush sees: the assignment waits until the kernel is done."""
    detector, cols = _busy_detector()
    alone = detector.process(**cols)
    big = AnomalyRule(match="*", drift_window=5, drift_baseline=9_000)
    assigned = threading.Event()
    late: list[bool] = []
    real = filters.process_flush

    def assign_meanwhile(*args: Any) -> object:
        def assign() -> None:
            detector.assign(sensor_id=99, rule=big)  # the pool must grow: it compacts
            assigned.set()

        worker = threading.Thread(target=assign)
        worker.start()
        workers.append(worker)
        late.append(not assigned.wait(1.0))  # with no lock it is done at once
        return real(*args)

    workers: list[threading.Thread] = []
    monkeypatch.setattr(anomaly, "process_flush", assign_meanwhile)
    meanwhile = detector.process(**cols)
    monkeypatch.setattr(anomaly, "process_flush", real)
    workers[0].join()
    assert assigned.is_set()
    assert late == [True]
    assert meanwhile.events == alone.events
    detector.commit(meanwhile)  # still valid: sensor 99 is not in it
    assert detector.rule(sensor_id=99) == big


def test_processes_in_several_threads_run_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second `process` runs while the first is inside its kernel: readers share."""
    detector, cols = _busy_detector()
    alone = detector.process(**cols)
    real = filters.process_flush
    results: list[Pending] = []
    finished = threading.Event()

    def process_meanwhile(*args: Any) -> object:
        if threading.current_thread() is threading.main_thread():

            def other() -> None:
                results.append(detector.process(**cols))
                finished.set()

            threading.Thread(target=other).start()
            assert finished.wait(60.0)  # waits forever, the test's timeout aside, if exclusive
        return real(*args)

    monkeypatch.setattr(anomaly, "process_flush", process_meanwhile)
    first = detector.process(**cols)
    assert [p.events for p in (first, *results)] == [alone.events, alone.events]
