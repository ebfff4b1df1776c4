"""The spike filter's window in rank order (`ingest.anomaly.ranked`), and the filter over long
windows, against a plain numpy median and MAD over each window."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import numpy.typing as npt
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from ingest.anomaly import ranked
from ingest.anomaly.detector import AnomalyDetector, Event
from ingest.anomaly.layout import MAD_SCALE
from ingest.anomaly.rules import AnomalyRule
from ingest.warmup import warm_up

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
S = 1_000_000


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_up()


def _stream(w: int, n: int, seed: int) -> npt.NDArray[np.float64]:
    """A slow wave with noise, rounded to tenths (many ties), with jumps and a stuck stretch."""
    rng = np.random.default_rng(seed)
    wave = 3.0 * np.sin(np.arange(n) * (6.0 / n))
    vals = np.round(wave + rng.normal(0.0, 1.0, n), 1)
    vals[rng.random(n) < 0.03] += 9.0
    vals[n // 2 : n // 2 + w // 3] = vals[n // 2]
    out: npt.NDArray[np.float64] = vals
    return out


def _ranks(buf: npt.NDArray[np.float64], lo: int, w: int, n: int) -> npt.NDArray[np.float64]:
    lb, nb, _ = ranked.shape(w)
    return np.array([ranked.at(buf, lo, lo + (nb << lb), lb, r) for r in range(n)])


@pytest.mark.parametrize("w", [3, 4, 5, 16, 17, 100, 256, 257, 1000, 3600])
def test_ranked_window_is_the_sorted_window_with_its_median_and_mad(w: int) -> None:
    lb, nb, size = ranked.shape(w)
    assert (1 << lb) * nb >= w > (1 << lb) * (nb - 1)
    assert size == ranked.size(w) == (nb << lb) + nb
    lo = 3
    so = lo + (nb << lb)
    buf = np.zeros(lo + size + 2)
    if nb > 1:  # any ring starts will do (one block's stays 0)
        buf[so : lo + size] = np.random.default_rng(w).integers(0, 2**20, nb)
    vals = _stream(w, 2 * w + 60, w)
    for a, x in enumerate(vals):
        if a < w:
            ranked.insert(buf, lo, so, lb, a, float(x))
        else:
            ranked.replace(buf, lo, so, lb, w, float(vals[a - w]), float(x))
        window = np.sort(vals[max(0, a + 1 - w) : a + 1])
        if a % (w // 7 + 1) == 0 or a == w - 1:
            assert np.array_equal(_ranks(buf, lo, w, window.shape[0]), window)
        if a >= w - 1:
            med = ranked.median(buf, lo, so, lb, w)
            mad = ranked.mad(buf, lo, so, lb, w, med)
            assert med == np.median(window)
            assert mad == np.median(np.abs(window - med))
            for start in (0, w // 4, w - (w - 1) // 2 - 2):
                assert ranked.mad_bound(buf, lo, so, lb, w, med, start)[0] <= mad
    assert buf[:lo].tolist() == [0.0] * lo  # nothing written outside the area
    assert buf[lo + size :].tolist() == [0.0, 0.0]


def _numpy_events(
    vals: npt.NDArray[np.float64], times: npt.NDArray[np.int64], w: int, k: float, floor: float
) -> dict[int, tuple[int | None, float, float]]:
    """Spike events by the rule's definition, with numpy's median and MAD over each window:
    {start: (end, value, score)}."""
    windows = sliding_window_view(vals, w)[:-1]  # the w readings before reading i + w
    med = np.empty(windows.shape[0])
    mad = np.empty(windows.shape[0])
    for q in range(0, windows.shape[0], 128):
        part = windows[q : q + 128]
        med[q : q + 128] = np.median(part, axis=1)
        mad[q : q + 128] = np.median(np.abs(part - med[q : q + 128, None]), axis=1)
    sigma = np.maximum(MAD_SCALE * mad, floor)
    dev = np.abs(vals[w:] - med)
    with np.errstate(divide="ignore"):
        score = np.where(sigma > 0, dev / sigma, math.inf)
    off = dev > k * sigma
    out: dict[int, tuple[int | None, float, float]] = {}
    start: int | None = None
    best = (0.0, -1.0)
    for i in range(off.shape[0]):
        t = int(times[w + i])
        if off[i]:
            if start is None:
                start, best = t, (float(vals[w + i]), float(score[i]))
            elif score[i] > best[1]:
                best = (float(vals[w + i]), float(score[i]))
            last = t
        elif start is not None:
            out[start] = (last, *best)
            start = None
    if start is not None:
        out[start] = (None, *best)
    return out


@pytest.mark.parametrize(("w", "floor"), [(3600, 0.0), (3600, 0.2), (36_000, 0.0)])
def test_spike_over_long_windows_is_numpy_median_and_mad_however_cut(w: int, floor: float) -> None:
    """Events over a window of an hour at 1 Hz (and at 10 Hz), with cuts and restarts."""
    n = w + max(2_000, w // 4)
    vals = _stream(w, n, 7)
    times = T0 + np.arange(n, dtype=np.int64) * S
    rule = AnomalyRule(match="*", spike_window=w, spike_threshold=4.0, spike_min_sigma=floor)
    expected = _numpy_events(vals, times, w, 4.0, floor)
    assert len(expected) > 5
    cuts = [0, w // 3, w + 1, w + 7, w + 700, n]
    upserts: dict[int, Event] = {}
    detector = AnomalyDetector()
    detector.assign(sensor_id=5, rule=rule)
    for q, (a, b) in enumerate(pairwise(cuts)):
        if q in (0, 2, 4):  # a start: the state restored from the stored readings
            detector = AnomalyDetector()
            detector.assign(sensor_id=5, rule=rule)
            need = detector.state_needed(sensor_ids=[5])[5].readings
            detector.restore(
                sensor_id=5,
                time=times[max(0, a - need) : a],
                value=vals[max(0, a - need) : a],
                open_events=[e for e in upserts.values() if e.end is None],
            )
        pending = detector.process(
            sensor=np.full(b - a, 5, np.int32), time=times[a:b], value=vals[a:b]
        )
        detector.commit(pending)
        for ev in pending.events:
            assert ev.kind == "spike"
            upserts[ev.start] = ev
    got = {start: (e.end, e.value, e.score) for start, e in upserts.items()}
    assert got == expected
