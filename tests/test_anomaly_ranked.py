"""The spike window in rank order over many blocks (`ingest.anomaly.ranked`, windows over
SMALL values): after every reading its median and MAD are numpy's over the window, bit for
bit, whatever the stream (duplicates, ties, trends, runs) and wherever the rings start."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given
from hypothesis import strategies as st
from numba import njit
from numpy.lib.stride_tricks import sliding_window_view

from ingest.anomaly import ranked
from tests.support.properties import property_settings

PROPERTY = property_settings(60)
F64 = npt.NDArray[np.float64]


@njit(cache=False)
def _run(buf: F64, lo: int, w: int, vals: F64, every: int) -> Any:
    """Each reading in turn into the window; the median and MAD of each full window, and the
    whole window in rank order at every `every`-th reading."""
    lb, nb, _ = ranked.shape(w)
    so = lo + (nb << lb)
    n = vals.shape[0]
    med = np.empty(n - w + 1)
    mad = np.empty(n - w + 1)
    low = np.empty(n - w + 1)
    snaps = np.empty(((n - w) // every + 1, w))
    hint = w // 4
    for a in range(n):
        if a < w:
            ranked.insert(buf, lo, so, lb, a, vals[a])
        else:
            ranked.replace(buf, lo, so, lb, w, vals[a - w], vals[a])
        if a >= w - 1:
            i = a - w + 1
            med[i] = ranked.median(buf, lo, so, lb, w)
            mad[i] = ranked.mad(buf, lo, so, lb, w, med[i])
            low[i], hint = ranked.mad_bound(buf, lo, so, lb, w, med[i], hint)
            if i % every == 0:
                for r in range(w):
                    snaps[i // every, r] = ranked.at(buf, lo, so, lb, r)
    return med, mad, low, snaps


def _stream(kind: str, n: int, seed: int, distinct: int) -> F64:
    rng = np.random.default_rng(seed)
    if kind == "walk":  # the newest and the oldest reading far apart in rank
        out = np.cumsum(rng.normal(0.0, 0.5, n))
    elif kind == "ties":  # few distinct values: long runs of equal ranks
        out = rng.integers(0, distinct, n).astype(np.float64) * 0.5
    elif kind == "trend":  # every reading enters at the top, the oldest leaves the bottom
        out = np.arange(n) * 0.01 + rng.normal(0.0, 0.05, n)
    elif kind == "runs":  # a stuck sensor: runs of one value, then a jump
        out = np.repeat(rng.normal(0.0, 3.0, n // 50 + 1), 50)[:n]
    else:  # "saw": alternating extremes with repeats
        out = np.where(np.arange(n) % 2 == 0, 1.0, -1.0) * rng.integers(1, distinct + 1, n)
    return np.asarray(out, np.float64)


@PROPERTY
@given(
    w=st.sampled_from([257, 300, 511, 1000, 1024, 1500, 3600]),
    kind=st.sampled_from(["walk", "ties", "trend", "runs", "saw"]),
    seed=st.integers(0, 2**32 - 1),
    distinct=st.integers(1, 40),
    extra=st.integers(1, 3000),
)
def test_many_blocks_give_numpy_median_and_mad(
    w: int, kind: str, seed: int, distinct: int, extra: int
) -> None:
    vals = _stream(kind, w + extra, seed, distinct)
    lb, nb, size = ranked.shape(w)
    assert nb > 1
    lo = 3
    buf = np.full(lo + size + 2, -7.0)
    buf[lo : lo + size] = np.random.default_rng(seed).normal(0.0, 1e3, size)  # any contents
    buf[lo + (nb << lb) : lo + size] = np.random.default_rng(seed).integers(0, 2**20, nb)
    every = max(1, extra // 5)
    med, mad, low, snaps = _run(buf, lo, w, vals, every)
    windows = sliding_window_view(vals, w)
    for q in range(0, windows.shape[0], 256):
        part = windows[q : q + 256]
        want = np.median(part, axis=1)
        assert np.array_equal(med[q : q + 256], want)
        assert np.array_equal(mad[q : q + 256], np.median(np.abs(part - want[:, None]), axis=1))
    assert np.all(low <= mad)
    assert np.array_equal(snaps, np.sort(windows[::every], axis=1))
    assert buf[:lo].tolist() == [-7.0] * lo  # nothing written outside the area
    assert buf[lo + size :].tolist() == [-7.0, -7.0]
