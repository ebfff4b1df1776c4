"""Rollup kernel: a plain-Python reference defines it; any split of the stream merges to it."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import kernels
from ingest import rollup as rollups
from ingest.anomaly import detector as anomaly
from ingest.anomaly import filters
from ingest.anomaly.rules import AnomalyRule
from ingest.rollup import DAY_US, HOUR_US, MINUTE_US, Rollup, rollup
from ingest.warmup import warm_up
from tests.support.properties import property_settings

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z

PROPERTY = property_settings(200, HealthCheck.data_too_large)

Row = tuple[float, float, float, int, float, int, float, int]  # min max sum count first ft last lt
Rows = dict[tuple[int, int], Row]


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_up()


def reference_rollup(readings: list[tuple[int, int, float]], bucket_us: int) -> Rows:
    """Aggregate (sensor, time, value) readings in any order; NaN values are left out."""
    groups: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for sensor, t, v in readings:
        if not math.isnan(v):
            groups.setdefault((sensor, t // bucket_us * bucket_us), []).append((t, v))
    out: Rows = {}
    for key, points in groups.items():
        points.sort()
        total = 0.0
        for _, v in points:
            total += v
        vals = [v for _, v in points]
        out[key] = (
            min(vals),
            max(vals),
            total,
            len(vals),
            points[0][1],
            points[0][0],
            points[-1][1],
            points[-1][0],
        )
    return out


def merge_rollups(a: Rows, b: Rows) -> Rows:
    """What the database upsert does with partial rollups of the same (sensor, bucket)."""
    out = dict(a)
    for key, r in b.items():
        o = out.get(key)
        if o is None:
            out[key] = r
            continue
        first = (o[4], o[5]) if o[5] < r[5] else (r[4], r[5])
        last = (o[6], o[7]) if o[7] > r[7] else (r[6], r[7])
        out[key] = (min(o[0], r[0]), max(o[1], r[1]), o[2] + r[2], o[3] + r[3], *first, *last)
    return out


def rows(r: Rollup) -> Rows:
    assert len({len(c) for c in (r.bucket, r.min, r.max, r.sum, r.count, r.first_time)}) == 1
    assert r.sensor.dtype == np.int32
    assert r.bucket.dtype == r.count.dtype == r.first_time.dtype == r.last_time.dtype == np.int64
    keys = list(zip(r.sensor.tolist(), r.bucket.tolist(), strict=True))
    assert keys == sorted(set(keys)), "one row per (sensor, bucket), sorted"
    cols = (r.min, r.max, r.sum, r.count, r.first, r.first_time, r.last, r.last_time)
    return dict(zip(keys, zip(*(c.tolist() for c in cols), strict=True), strict=True))


def run(readings: list[tuple[int, int, float]], bucket_us: int) -> Rollup:
    readings = sorted(readings)
    return rollup(
        sensor=np.array([r[0] for r in readings], np.int32),
        time=np.array([r[1] for r in readings], np.int64),
        value=np.array([r[2] for r in readings], np.float64),
        bucket_us=bucket_us,
    )


@st.composite
def streams(draw: st.DrawFn, *, exact: bool) -> list[tuple[int, int, float]]:
    """Unique (sensor, time) readings; with `exact`, values whose sums are exact in float64."""
    value = (
        st.integers(-(2**20), 2**20).map(lambda i: i / 4)
        if exact
        else st.one_of(st.floats(-1e6, 1e6), st.sampled_from([0.0, -0.0, 1.5]))
    )
    value = st.one_of(value, st.just(math.nan))
    keys = st.tuples(
        st.sampled_from([0, 3, 4, 2**31 - 1]),
        st.one_of(
            st.integers(T0 - 2 * HOUR_US, T0 + 2 * HOUR_US),
            st.integers(-3 * MINUTE_US, 3 * MINUTE_US),  # around (and before) the epoch
            st.sampled_from([T0, T0 - 1, T0 + MINUTE_US, T0 + MINUTE_US - 1, T0 + HOUR_US]),
        ),
    )
    picked = draw(st.lists(keys, max_size=80, unique=True))
    return [(s, t, draw(value)) for s, t in picked]


def split_and_merge(
    readings: list[tuple[int, int, float]], parts: list[int], bucket_us: int
) -> tuple[Rows, Rows]:
    n_flushes = max(parts, default=0) + 1
    merged: Rows = {}
    for k in range(n_flushes):
        flush = [r for r, p in zip(readings, parts, strict=True) if p == k]
        merged = merge_rollups(merged, rows(run(flush, bucket_us)))
    return merged, reference_rollup(readings, bucket_us)


@PROPERTY
@given(data=st.data(), bucket_us=st.sampled_from([MINUTE_US, HOUR_US]))
def test_any_split_merges_to_the_reference_exactly(data: st.DataObject, bucket_us: int) -> None:
    readings = data.draw(streams(exact=True))
    parts = data.draw(st.lists(st.integers(0, 4), min_size=len(readings), max_size=len(readings)))
    merged, expected = split_and_merge(readings, parts, bucket_us)
    assert merged == expected


@PROPERTY
@given(data=st.data(), bucket_us=st.sampled_from([MINUTE_US, HOUR_US]))
def test_any_split_merges_to_the_reference_up_to_sum_rounding(
    data: st.DataObject, bucket_us: int
) -> None:
    readings = data.draw(streams(exact=False))
    parts = data.draw(st.lists(st.integers(0, 4), min_size=len(readings), max_size=len(readings)))
    merged, expected = split_and_merge(readings, parts, bucket_us)
    assert merged.keys() == expected.keys()
    for key, row in merged.items():
        want = expected[key]
        assert row[:2] == want[:2]
        assert row[3:] == want[3:]
        assert row[2] == pytest.approx(want[2], rel=1e-12, abs=1e-6)
    # the whole stream in one flush is exactly the reference, sum included
    assert rows(run(readings, bucket_us)) == expected


@given(t=st.integers(0, 2**62), bucket_us=st.sampled_from([MINUTE_US, HOUR_US, DAY_US, 1]))
@settings(database=None)
def test_buckets_align_like_time_bucket_with_its_default_origin(t: int, bucket_us: int) -> None:
    origin = int(datetime(2000, 1, 3, tzinfo=UTC).timestamp()) * 1_000_000
    got = run([(1, t, 1.0)], bucket_us).bucket.tolist()
    assert got == [origin + (t - origin) // bucket_us * bucket_us]


def test_buckets_of_known_times() -> None:
    def us(text: str) -> int:
        return int(datetime.fromisoformat(text).timestamp() * 1_000_000)

    got = run([(1, us("2024-01-01T11:27:59.999999+00:00"), 1.0)], HOUR_US).bucket.tolist()
    assert got == [us("2024-01-01T11:00:00+00:00")]
    got = run([(1, -1, 1.0)], MINUTE_US).bucket.tolist()
    assert got == [-MINUTE_US]  # floor, not truncation, before the epoch


def test_a_bucket_of_nan_only_has_no_row() -> None:
    r = run([(1, T0, math.nan), (1, T0 + HOUR_US, 2.0), (2, T0, math.nan)], MINUTE_US)
    assert rows(r) == {(1, T0 + HOUR_US): (2.0, 2.0, 2.0, 1, 2.0, T0 + HOUR_US, 2.0, T0 + HOUR_US)}
    assert len(run([], MINUTE_US)) == 0


def test_first_and_last_skip_nan() -> None:
    r = run([(1, T0, math.nan), (1, T0 + 1, 5.0), (1, T0 + 2, 7.0), (1, T0 + 3, math.nan)], HOUR_US)
    assert rows(r) == {(1, T0): (5.0, 7.0, 12.0, 2, 5.0, T0 + 1, 7.0, T0 + 2)}


def test_read_only_and_other_dtype_input() -> None:
    sensor = np.array([1, 1], np.int64)
    time = np.array([T0, T0 + 1], np.int64)
    value = np.array([1.0, 2.0])
    for a in (time, value):
        a.flags.writeable = False
    r = rollup(sensor=sensor, time=time, value=value, bucket_us=MINUTE_US)  # type: ignore[arg-type]
    assert rows(r) == {(1, T0): (1.0, 2.0, 3.0, 2, 1.0, T0, 2.0, T0 + 1)}


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="not sorted by \\(sensor, time\\) at row 1"):
        rollup(
            sensor=np.array([1, 1], np.int32),
            time=np.array([T0, T0]),
            value=np.zeros(2),
            bucket_us=MINUTE_US,
        )
    with pytest.raises(ValueError, match="at row 2"):
        rollup(
            sensor=np.array([1, 2, 1], np.int32),
            time=np.array([T0, T0, T0 + 1]),
            value=np.zeros(3),
            bucket_us=MINUTE_US,
        )
    with pytest.raises(ValueError, match="divisor of one day"):
        run([], 7 * DAY_US)
    with pytest.raises(ValueError, match="divisor of one day"):
        run([], 0)
    with pytest.raises(TypeError, match="bucket_us must be an int"):
        run([], True)
    with pytest.raises(TypeError):
        run([], 60e6)  # type: ignore[arg-type]
    assert len(run([(1, T0, 1.0)], np.int64(MINUTE_US))) == 1  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="equal length"):
        rollup(sensor=np.zeros(2, np.int32), time=np.zeros(1), value=np.zeros(2), bucket_us=1)  # type: ignore[arg-type]


def test_gather_takes_runs_in_the_order_given() -> None:
    time = np.arange(10, 20, dtype=np.int64)
    value = (time * 0.5).astype(np.float64)
    quality = np.arange(10, dtype=np.uint8)
    starts = np.array([6, 0, 3], np.int64)
    lengths = np.array([4, 2, 1], np.int64)
    sensors = np.array([7, 8, 9], np.int32)
    t, s, v, q = kernels.gather(time, value, quality, starts, lengths, sensors)
    assert t.tolist() == [16, 17, 18, 19, 10, 11, 13]
    assert s.tolist() == [7, 7, 7, 7, 8, 8, 9]
    assert v.tolist() == [8.0, 8.5, 9.0, 9.5, 5.0, 5.5, 6.5]
    assert q.tolist() == [6, 7, 8, 9, 0, 1, 3]
    assert (t.dtype, s.dtype, v.dtype, q.dtype) == (np.int64, np.int32, np.float64, np.uint8)
    empty = kernels.gather(time, value, quality, starts[:0], lengths[:0], sensors[:0])
    assert [len(column) for column in empty] == [0, 0, 0, 0]


def _signatures() -> dict[str, int]:
    return {
        f"{module.__name__}.{name}": len(fn.signatures)
        for module in (kernels, rollups, filters)
        for name, fn in vars(module).items()
        if hasattr(fn, "signatures")
    }


def test_after_warm_up_nothing_compiles_again() -> None:
    """Read-only buffers (np.frombuffer), other dtypes and empty flushes reuse the warm kernels."""
    warm_up()
    before = _signatures()
    entry_points = (
        "ingest.rollup._rollup_count",
        "ingest.rollup._rollup_fill",
        "ingest.kernels.check_sorted",
        "ingest.kernels.gather",
        "ingest.anomaly.filters.process_flush",
        "ingest.anomaly.filters.commit_flush",
    )
    assert all(before[name] == 1 for name in entry_points), before
    n = 600
    sensor = np.frombuffer(np.repeat(np.arange(6, dtype=np.int32), 100).tobytes(), np.int32)
    time = np.frombuffer((T0 + np.tile(np.arange(100), 6) * 1_000_000).tobytes(), np.int64)
    value = np.frombuffer(np.random.default_rng(1).normal(size=n).tobytes(), np.float64)
    detector = anomaly.AnomalyDetector()
    for s in range(6):
        detector.assign(
            sensor_id=s,
            rule=AnomalyRule(match="*", max=1.0, spike_window=5, flatline_count=3),
        )
    for cols in ((sensor, time, value), (sensor.astype(np.int64), time, value.astype(np.float32))):
        detector.commit(detector.process(sensor=cols[0], time=cols[1], value=cols[2]))  # type: ignore[arg-type]
    detector.commit(detector.process(sensor=sensor[:0], time=time[:0], value=value[:0]))
    for width in (MINUTE_US, HOUR_US):
        rollup(sensor=sensor, time=time, value=value, bucket_us=width)
    rollup(sensor=sensor[:0], time=time[:0], value=value[:0], bucket_us=MINUTE_US)
    assert _signatures() == before
