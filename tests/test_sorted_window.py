"""The plain sorted window (`ingest.anomaly.sorted_window`): a replaced value's places found by
counting agree with walking the gap, bit for bit, whatever the ties; the bound under the MAD
never exceeds it; and the adaptive detector over windows of that size gives the reference's
events."""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from ingest.anomaly import sorted_window
from ingest.anomaly.detector import AnomalyDetector
from ingest.anomaly.rules import AnomalyRule
from tests.support.anomaly_reference import T0, S, reference_events
from tests.support.properties import property_settings

PROPERTY = property_settings(60)
F64 = npt.NDArray[np.float64]


@njit(cache=False)
def _slide(buf: F64, lo: int, w: int, vals: F64) -> Any:
    """Each reading in turn into the window; the window after each, the median and the MAD
    of each full window, and the MAD's bound from the start w // 4 and carried on."""
    n = vals.shape[0]
    out = np.empty((n, w))
    med = np.empty(n)
    mad = np.empty(n)
    fresh = np.empty(n)
    carried = np.empty(n)
    hint = w // 4
    for a in range(n):
        if a < w:
            sorted_window.insert(buf, lo, a, vals[a])
        else:
            sorted_window.replace(buf, lo, w, vals[a - w], vals[a])
        out[a] = buf[lo : lo + w]
        if a >= w - 1:
            med[a] = sorted_window.median(buf, lo, w)
            mad[a] = sorted_window.mad(buf, lo, w, med[a], hint)
            fresh[a] = sorted_window.mad_bound(buf, lo, w, med[a], w // 4)[0]
            carried[a], hint = sorted_window.mad_bound(buf, lo, w, med[a], hint)
    return out, med, mad, fresh, carried


def _walked(vals: list[float], w: int) -> list[bytes]:
    """The window after each reading, kept by the plain walk: the leaving value found by
    bisection, the gap walked towards the arriving one."""
    win: list[float] = []
    out = []
    for a, x in enumerate(vals):
        if a < w:
            at = len(win)
            win.append(x)
        else:
            old = vals[a - w]
            at = bisect.bisect_left(win, old)
            assert win[at] == old
            if x > old:
                while at + 1 < w and win[at + 1] < x:
                    win[at] = win[at + 1]
                    at += 1
        while at > 0 and win[at - 1] > x:
            win[at] = win[at - 1]
            at -= 1
        win[at] = x
        out.append(np.array(win + [0.0] * (w - len(win))).tobytes())
    return out


@st.composite
def _streams(draw: st.DrawFn) -> tuple[int, list[float]]:
    w = draw(st.sampled_from([2, 3, 4, 5, 8, 16, 31, 32, 33, 64, 100, 255, 256]))
    n = draw(st.integers(w, 3 * w + 40))
    kind = draw(st.sampled_from(["walk", "ties", "zeros", "runs"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vals: npt.NDArray[Any]
    if kind == "walk":
        vals = np.cumsum(rng.normal(0.0, 0.5, n))
    elif kind == "ties":  # few distinct values: long runs of equal ones
        vals = rng.integers(0, draw(st.integers(1, 6)), n) * 0.25
    elif kind == "zeros":  # 0.0 and -0.0 equal, but not the same bits
        vals = rng.choice([0.0, -0.0, 1.0, -1.0], n)
    else:  # a stuck sensor: runs of one value, then a jump
        vals = np.repeat(rng.normal(0.0, 3.0, n // 7 + 1), 7)[:n]
    return w, [float(v) for v in vals]


@PROPERTY
@given(_streams())
def test_counted_places_keep_the_window_the_walk_keeps(case: tuple[int, list[float]]) -> None:
    w, vals = case
    lo = 3
    buf = np.full(lo + w + 2, -7.0)
    out, med, mad, fresh, carried = _slide(buf, lo, w, np.array(vals))
    walked = _walked(vals, w)
    for a in range(len(vals)):
        got = out[a].copy()
        got[min(a + 1, w) :] = 0.0
        assert got.tobytes() == walked[a]
    assert buf[:lo].tolist() == [-7.0] * lo  # nothing written outside the window
    assert buf[lo + w :].tolist() == [-7.0, -7.0]
    for a in range(w - 1, len(vals)):
        window = np.array(vals[a + 1 - w : a + 1])
        assert med[a] == np.median(window)
        assert mad[a] == np.median(np.abs(window - med[a]))
        assert fresh[a] <= mad[a]
        assert carried[a] <= mad[a]


@PROPERTY
@given(_streams())
def test_the_bound_and_the_mad_from_any_start(case: tuple[int, list[float]]) -> None:
    w, vals = case
    window = np.sort(np.array(vals[-w:]))
    med = sorted_window.median(window, 0, w)
    mad = sorted_window.mad(window, 0, w, med, w // 4) if w >= 2 else 0.0
    c = (w - 1) // 2
    for start in range(w - c - 1):
        first = min(med - window[start], window[start + c + 1] - med)
        assert sorted_window.bound_at(window, 0, w, med, start) == first
        bound, i = sorted_window.mad_bound(window, 0, w, med, start)
        assert 0 <= i <= w - c - 2
        assert first <= bound == min(med - window[i], window[i + c + 1] - med) <= mad
        assert sorted_window.bound_at(window, 0, w, med, i) == bound
    if w >= 2:  # the MAD's search gives the same from wherever it starts
        for near in (-5, *range(w), w + 5):
            assert sorted_window.mad(window, 0, w, med, near) == mad


def _events(rule: AnomalyRule, vals: list[float]) -> dict[Any, Any]:
    detector = AnomalyDetector()
    detector.assign(sensor_id=3, rule=rule)
    half = len(vals) // 2
    out: dict[Any, Any] = {}
    for part in (slice(0, half), slice(half, len(vals))):
        n = part.stop - part.start
        pending = detector.process(
            sensor=np.full(n, 3, np.int32),
            time=T0 + S * np.arange(part.start, part.stop, dtype=np.int64),
            value=np.array(vals[part], np.float64),
        )
        detector.commit(pending)
        for ev in pending.events:
            out[(ev.sensor, ev.kind, ev.start)] = (ev.end, ev.value, ev.score)
    return out


@settings(PROPERTY, max_examples=12)
@given(
    case=_streams(),
    extra=st.integers(20, 300),
    k=st.sampled_from([1.0, 2.0, 4.0]),
    floor=st.sampled_from([0.0, 0.3]),
)
def test_auto_over_larger_windows_gives_the_reference_events(
    case: tuple[int, list[float]], extra: int, k: float, floor: float
) -> None:
    w, vals = case
    w = max(w, 8)
    vals = vals + vals[: extra % (len(vals) + 1)]
    rule = AnomalyRule(
        match="*",
        detector="auto",
        auto_window=w,
        auto_recent=min(3, w),
        auto_threshold=k,
        auto_min_readings=1,
        auto_gap=2,
        auto_min_sigma=floor,
    )
    got = _events(rule, vals)
    want = reference_events(3, rule, [(T0 + S * i, v) for i, v in enumerate(vals)])
    assert got == want
