"""Asset health: the scoring kernel on small constructed multi-sensor series, exactly.

A hand-made model of three sensors a, b, c that move together (one component along (1, 1, 1),
its variance 3; T² limit 4, Q limit 0.5): a vector (x, x, x) is normal for any x within the
load's range, while (1.6, 0.4, 1.0) breaks the pattern though no sensor leaves that range.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ingest import config
from ingest.asset.kernel import NO_TIME, fresh_state
from ingest.asset.model import AssetModel, carry_forward, fit, run_many
from ingest.asset.scoring import quiet_point
from ingest.errors import ConfigError

S = 1_000_000
MODEL = AssetModel(
    sensors=("a", "b", "c"),
    mean=np.zeros(3),
    scale=np.ones(3),
    loadings=np.full((3, 1), 1 / math.sqrt(3)),
    eigenvalues=np.array([3.0]),
    t2_limit=4.0,
    q_limit=0.5,
    samples=100,
    quantile=0.995,
    margin=1.1,
)

Rows = list[tuple[int, int, float]]  # (time s, sensor index, value)


def vectors(*rows: tuple[float, float, float]) -> Rows:
    """One vector per second from t = 1, every sensor at once."""
    return [(i + 1, j, v) for i, row in enumerate(rows) for j, v in enumerate(row)]


def run(
    rows: Rows,
    *,
    hold_s: int = 10,
    gap_s: int = 0,
    min_s: int = 0,
    cuts: tuple[int, ...] = (),
) -> tuple[list[tuple[int, float]], list[tuple[int, int | None, int, tuple[str, ...]]]]:
    """Scores per time and events (start s, end s, worst s, top sensors), the rows cut into
    calls at the given times (the state carried between them, as between flushes)."""
    ints, floats = fresh_state(3)
    scores: list[tuple[int, float]] = []
    events: dict[int, tuple[int, int | None, int, tuple[str, ...]]] = {}
    bounds = [0, *cuts, 10**9]
    for lo, hi in itertools.pairwise(bounds):
        part = sorted(r for r in rows if lo < r[0] <= hi)
        if not part:
            continue
        ts, sc, ev_i, _ = MODEL.run(
            np.array([r[1] for r in part], np.int32),
            np.array([r[0] * S for r in part], np.int64),
            np.array([r[2] for r in part], np.float64),
            hold_us=hold_s * S,
            gap_us=gap_s * S,
            min_us=min_s * S,
            ints=ints,
            floats=floats,
        )
        scores += [(t // S, s) for t, s in zip(ts.tolist(), sc.tolist(), strict=True)]
        for e in ev_i.tolist():
            end = None if e[1] == NO_TIME else e[1] // S
            top = tuple(MODEL.sensors[j] for j in e[3:] if j >= 0)
            events[e[0] // S] = (e[0] // S, end, e[2] // S, top)
    return scores, sorted(events.values())


def by_hand(z: tuple[float, float, float]) -> float:
    """max(T²/4, Q/0.5) of a vector under MODEL, written out."""
    along = sum(z) / math.sqrt(3)
    t2 = along * along / 3.0
    q = max(sum(x * x for x in z) - along * along, 0.0)
    return max(t2 / 4.0, q / 0.5)


def test_a_joint_shift_no_single_sensor_shows_is_an_event_naming_the_sensors_that_moved() -> None:
    normal = [(1.0, 1.0, 1.0), (-1.5, -1.5, -1.5), (1.8, 1.8, 1.8)]
    shifted = (1.6, 0.4, 1.0)  # each sensor inside the range the normal rows span
    rows = vectors(*normal, shifted, shifted, (0.5, 0.5, 0.5))
    scores, events = run(rows)
    assert [t for t, _ in scores] == [1, 2, 3, 4, 5, 6]
    assert [s for _, s in scores] == pytest.approx(
        [by_hand(v) for v in (*normal, shifted, shifted, (0.5, 0.5, 0.5))], rel=1e-12, abs=1e-12
    )
    assert [s > 1 for _, s in scores] == [False, False, False, True, True, False]
    # Closed at t = 6 (scored, not offending, more than gap 0 after t = 5); a and b moved
    # against each other, c stayed with the load.
    assert events == [(4, 5, 4, ("a", "b", "c"))]


def test_detail_shares_are_each_sensors_residual_and_t2_parts() -> None:
    ints, floats = fresh_state(3)
    rows = vectors((1.6, 0.4, 1.0))
    _, _, ev_i, ev_f = MODEL.run(
        np.array([r[1] for r in rows], np.int32),
        np.array([r[0] * S for r in rows], np.int64),
        np.array([r[2] for r in rows], np.float64),
        hold_us=10 * S,
        gap_us=0,
        min_us=0,
        ints=ints,
        floats=floats,
    )
    # r = z - mean(z) = (0.6, -0.6, 0); T² parts z_j * (1/3) / 4 = z_j / 12.
    parts = [0.36 / 0.5 + 1.6 / 12, 0.36 / 0.5 + 0.4 / 12, 1.0 / 12]
    shares = [p / sum(parts) for p in parts]
    assert ev_i.tolist() == [[1 * S, NO_TIME, 1 * S, 0, 1, 2]]  # open: nothing came after
    assert ev_f[0, 0] == pytest.approx(0.72 / 0.5, rel=1e-12)  # score Q / limit
    assert ev_f[0, 1] == pytest.approx(1.0, rel=1e-12)  # T² of (1, 1, 1) on average
    assert ev_f[0, 2] == pytest.approx(0.72, rel=1e-12)  # Q
    assert ev_f[0, 3:].tolist() == pytest.approx(shares, rel=1e-12)


def test_a_slower_sensor_carries_its_last_value_forward_within_hold() -> None:
    # a and b every second, c at t = 1 and t = 5 only; hold 3 s.
    rows: Rows = [(t, j, 1.0) for t in range(1, 10) for j in (0, 1)]
    rows += [(1, 2, 1.0), (5, 2, 1.0)]
    scores, events = run(rows, hold_s=3)
    scored = [t for t, s in scores if not math.isnan(s)]
    # c's value of t = 1 serves t = 1..4, that of t = 5 serves 5..8; t = 9 is 4 s after it.
    assert [t for t, _ in scores] == list(range(1, 10))
    assert scored == [1, 2, 3, 4, 5, 6, 7, 8]
    assert events == []
    # c's carried value against a and b moving: at t = 3 a and b read 2.0, c still 1.0.
    rows2 = [r if not (r[0] == 3 and r[1] < 2) else (3, r[1], 2.0) for r in rows]
    scores2, events2 = run(rows2, hold_s=3)
    assert dict(scores2)[3] == pytest.approx(by_hand((2.0, 2.0, 1.0)), rel=1e-12)
    assert events2 == [(3, 3, 3, ("c", "a", "b"))]


def test_runs_shorter_than_min_duration_are_no_event_and_runs_within_gap_are_one() -> None:
    bad, good = (1.6, 0.4, 1.0), (1.0, 1.0, 1.0)
    # Offending at 2, 3, then at 7, 8 and 10, 11 (gap 2 s, minimum duration 2 s).
    rows = vectors(good, bad, bad, good, good, good, bad, bad, good, bad, bad, good, good, good)
    _, events = run(rows, gap_s=2, min_s=2)
    # 2-3 lasts 1 s and ends at t = 6 (3 s after it): no event. 7-11 is one run (t = 9 is 1 s
    # after 8), closed at t = 14, the first scored time more than 2 s after 11.
    assert events == [(7, 11, 7, ("a", "b", "c"))]
    _, no_gap = run(rows, gap_s=0, min_s=2)
    assert no_gap == []  # runs 2-3, 7-8 and 10-11, each 1 s long
    _, at_once = run(rows, gap_s=0, min_s=0)
    assert at_once == [
        (2, 3, 2, ("a", "b", "c")),
        (7, 8, 7, ("a", "b", "c")),
        (10, 11, 10, ("a", "b", "c")),
    ]


@pytest.mark.parametrize("cuts", [(), (1,), (3, 4), (6, 9, 10), tuple(range(1, 15))])
def test_events_do_not_depend_on_how_the_stream_is_cut(cuts: tuple[int, ...]) -> None:
    bad, good = (1.6, 0.4, 1.0), (1.0, 1.0, 1.0)
    rows = vectors(good, bad, bad, good, good, good, bad, bad, good, bad, bad, good, good, good)
    whole = run(rows, gap_s=2, min_s=2)
    assert whole[1] == [(7, 11, 7, ("a", "b", "c"))]
    assert run(rows, gap_s=2, min_s=2, cuts=cuts) == whole


def test_many_devices_in_one_call_advance_exactly_as_each_alone() -> None:
    """Devices of different sizes, rules and states in one `run_many` call: the same states and
    events as each device's own `run`, bit for bit, and each event with its device."""
    rng = np.random.default_rng(7)
    models, spans, states, parts = [], [], [], []
    for j, d in enumerate((3, 2, 5, 3, 4)):
        loadings = np.linalg.qr(rng.normal(size=(d, d)))[0][:, : max(1, d - 2)]
        models.append(
            AssetModel(
                tuple("abcde"[:d]),
                rng.normal(size=d),
                rng.uniform(0.5, 2.0, d),
                np.ascontiguousarray(loadings),
                np.asarray(rng.uniform(0.5, 3.0, loadings.shape[1]), np.float64),
                2.0 + j,
                1.0 + j / 2,
                100,
                0.995,
                1.1,
            )
        )
        spans.append((3 * S, j * S, (j % 3) * S))
        ints, floats = fresh_state(d)
        if j == 3:  # a device with a past: carried values and an open run
            past = models[j].run(
                np.array([0, 1, 2], np.int32),
                np.array([S, S, S], np.int64),
                np.array([9.0, -9.0, 9.0]),
                hold_us=3 * S,
                gap_us=j * S,
                min_us=0,
                ints=ints,
                floats=floats,
            )
            assert len(past[0]) == 1
        states.append((ints, floats))
        n = 40 * d
        time = np.sort(rng.integers(2, 40, n)) * S
        sensor = rng.integers(0, d, n).astype(np.int32)
        value = rng.normal(0, 1.5, n)
        value[rng.random(n) < 0.05] = np.nan
        parts.append((sensor, time, value))
    alone = []
    for model, span, (ints, floats), (sensor, time, value) in zip(
        models, spans, states, parts, strict=True
    ):
        i, f = ints.copy(), floats.copy()
        ts, _, ev_i, ev_f = model.run(
            sensor, time, value, hold_us=span[0], gap_us=span[1], min_us=span[2], ints=i, floats=f
        )
        alone.append((len(ts), i, f, ev_i, ev_f))
    ints = np.concatenate([s[0] for s in states])
    floats = np.concatenate([s[1] for s in states])
    taken, ev_dev, ev_i, ev_f = run_many(
        models,
        np.array(spans, np.int64),
        np.cumsum([0] + [len(p[0]) for p in parts]),
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
        ints,
        floats,
    )
    assert taken.tolist() == [a[0] for a in alone]
    assert ints.tolist() == [x for a in alone for x in a[1].tolist()]
    assert floats.tobytes() == b"".join(a[2].tobytes() for a in alone)
    assert ev_dev.tolist() == [j for j, a in enumerate(alone) for _ in range(len(a[3]))]
    assert ev_i.tolist() == [e for a in alone for e in a[3].tolist()]
    assert ev_f.tobytes() == b"".join(a[4].tobytes() for a in alone)
    assert len(ev_dev) > 3  # the case has events to compare


def test_carry_forward_builds_the_vectors_the_kernel_scores() -> None:
    sensor = np.array([0, 1, 0, 1, 2, 0, 1, 0], np.int32)
    time = np.array([1, 1, 2, 2, 2, 3, 3, 8], np.int64) * S
    value = np.array([1.0, 2.0, 1.5, 2.5, 9.0, np.nan, 3.0, 4.0])
    ts, x = carry_forward(sensor, time, value, 3, hold_us=4 * S)
    # t = 1: c unseen; t = 3: a's NaN is skipped, its 1.5 of t = 2 carried; t = 8: b's 3.0
    # (t = 3) and c's 9.0 (t = 2) are older than 4 s.
    assert ts.tolist() == [2 * S, 3 * S]
    assert x.tolist() == [[1.5, 2.5, 9.0], [1.5, 3.0, 9.0]]


def test_fit_limits_are_the_baselines_own_score_quantile_times_the_margin() -> None:
    rng = np.random.default_rng(3)
    load = rng.normal(size=400)
    x = np.stack([load, 2 * load + 5, -load, rng.normal(size=400)], axis=1)
    x[:, :3] += 0.05 * rng.normal(size=(400, 3))
    model = fit(("a", "b", "c", "d"), x, variance=0.9, quantile=0.9, margin=2.0)
    z = (x - x.mean(axis=0)) / x.std(axis=0, ddof=1)
    assert model.mean.tolist() == pytest.approx(x.mean(axis=0).tolist(), rel=1e-12)
    assert model.components == 2  # the load, and d
    t = z @ model.loadings
    t2 = (t * t / model.eigenvalues).sum(axis=1)
    q = (z * z).sum(axis=1) - (t * t).sum(axis=1)
    assert model.t2_limit == pytest.approx(2.0 * float(np.quantile(t2, 0.9)), rel=1e-9)
    assert model.q_limit == pytest.approx(2.0 * float(np.quantile(q, 0.9)), rel=1e-9)
    with pytest.raises(ValueError, match="at least 40 timestamps, got 39"):
        fit(("a", "b", "c", "d"), x[:39])


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            '[{"match": "plant1/pumps/*", "gap_s": -1}]',
            "anomaly.assets[0] (INGEST_ANOMALY_ASSETS): asset rule 'plant1/pumps/*': gap_s must be "
            "from 0 to 86400 seconds, got -1.0",
        ),
        (
            '[{"match": "*", "settle_s": 7200}]',
            "anomaly.assets[0] (INGEST_ANOMALY_ASSETS): asset rule '*': settle_s must be from 0 to "
            "3600 seconds, got 7200.0",
        ),
        (
            '[{"match": ""}]',
            "anomaly.assets[0] (INGEST_ANOMALY_ASSETS): asset rule: match must be a non-empty glob, "
            "got ''",
        ),
        (
            '[{"match": "*", "hold": 5}]',
            "anomaly.assets[0].hold: unknown key (see the configuration table in the README)",
        ),
        (
            '[{"match": "*", "alert": {"condition": "pump", "kinds": ["range"]}}]',
            "anomaly.assets[0] (INGEST_ANOMALY_ASSETS): asset rule '*': alert: kinds: an asset "
            "rule's alert takes its asset events; leave kinds out",
        ),
    ],
)
def test_bad_asset_rules_are_refused_naming_the_key(rules: str, message: str) -> None:
    env = {"INGEST_DB_URL": "postgresql://x@h/db", "INGEST_ANOMALY_ASSETS": rules}
    with pytest.raises(ConfigError) as err:
        config.load(env=env)
    assert str(err.value) == message


def test_asset_rules_load_from_the_environment() -> None:
    env = {
        "INGEST_DB_URL": "postgresql://x@h/db",
        "INGEST_ANOMALY_ASSETS": '[{"match": "*/pumps/*", "hold_s": 10, '
        '"alert": {"condition": "pump-health", "severity": "major"}}]',
    }
    (rule,) = config.load(env=env).anomaly.assets
    assert (rule.match, rule.hold_us, rule.gap_us, rule.min_us) == (
        "*/pumps/*",
        10 * S,
        30 * S,
        30 * S,
    )
    assert rule.alert is not None
    assert (rule.alert.condition, rule.alert.severity) == ("pump-health", "major")


def test_a_replay_starts_at_the_latest_quiet_timestamp_before_the_late_readings() -> None:
    ts = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], np.int64) * S
    nan = float("nan")
    scores = np.array([0.5, 2.0, 0.5, 0.5, nan, 0.5, 3.0, 0.5, 0.5])
    # Before 9 s with gap 2 s: 8 follows an offending 7; 6 has nothing offending in [4, 6).
    # Before 6 s: 5 was not scored, 4 and 3 are at most 2 s after the offending 2 (its run is
    # not over there), 1 is quiet.
    assert quiet_point(ts, scores, lo=1 * S, before=9 * S, gap_us=2 * S) == 6 * S
    assert quiet_point(ts, scores, lo=1 * S, before=6 * S, gap_us=2 * S) == 1 * S
    assert quiet_point(ts, scores, lo=1 * S, before=4 * S, gap_us=2 * S) == 1 * S
    assert quiet_point(ts, scores, lo=2 * S, before=4 * S, gap_us=2 * S) is None
    assert quiet_point(ts, scores, lo=1 * S, before=9 * S, gap_us=0) == 8 * S
