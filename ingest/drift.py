"""The drift filter's rolling sums, exact: the recent window's sum, the baseline's sum and sum
of squares, each kept as partials (`ingest.exact`) that a reading enters and leaves in constant
time, and read once per judged reading, correctly rounded.

A window that holds a reading outside `exact.SAFE_MIN`..`exact.SAFE_MAX` in magnitude (other
than 0) is summed in eight lanes over the window instead (see `AnomalyRule`); its sums leave
such readings out and count them, so they are exact again once those readings leave.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ingest.exact import CAP, _raw_add, add, add_square, rounded, safe, two_product
from ingest.kernels import kernel

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

DR_R, DR_B, DR_Q = 0, CAP, 2 * CAP
"""Offsets of the partials of sum(recent), sum(baseline), sum(baseline**2) in a drift area."""
DRIFT_SIZE: Final = 3 * CAP
# Counts in a slot's int state, from its offset: partials of each sum, then the readings left
# out of the recent and of the baseline sums.
C_NR, C_NB, C_NQ, C_XR, C_XB = range(5)
NC: Final = 5
TQ_SIZE: Final = 4 * CAP + 8
"""Room for the partials of the centred sum of squares: one sum, 2 per partial of another, 4."""


@kernel
def _term(a: F64, q: int, centre: float, squares: bool) -> float:
    if squares:
        d = a[q] - centre
        return float(d * d)
    return float(a[q])


@kernel
def lane_sum(a: F64, lo: int, n: int, centre: float) -> float:
    """Sum of a[lo : lo + n] (of (a[q] - centre)**2 if `centre` is not NaN) in eight lanes.

    Lane r adds the terms at q = lo + r, lo + r + 8, ... in order, from 0.0; the result is
    ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
    """
    s = np.zeros(8, np.float64)
    sq = not math.isnan(centre)
    for q in range(lo, lo + n):
        s[(q - lo) % 8] += _term(a, q, centre, sq)
    return float(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])))


@kernel
def slide(
    part: F64,
    plo: int,
    cnt: I64,
    c: int,
    x: float,
    moved: float,
    gone: float,
    a: int,
    wd: int,
    wb: int,
) -> None:
    """Reading a (x) enters the recent window; reading a - wd (`moved`) goes from it to the
    baseline and a - wd - wb (`gone`) leaves the baseline, where those exist."""
    if a >= wd:
        if safe(moved):
            cnt[c + C_NR] = add(part, plo + DR_R, cnt[c + C_NR], -moved)
            cnt[c + C_NB] = add(part, plo + DR_B, cnt[c + C_NB], moved)
            cnt[c + C_NQ] = add_square(part, plo + DR_Q, cnt[c + C_NQ], moved, 1.0)
        else:
            cnt[c + C_XR] -= 1
            cnt[c + C_XB] += 1
    if a >= wd + wb:
        if safe(gone):
            cnt[c + C_NB] = add(part, plo + DR_B, cnt[c + C_NB], -gone)
            cnt[c + C_NQ] = add_square(part, plo + DR_Q, cnt[c + C_NQ], gone, -1.0)
        else:
            cnt[c + C_XB] -= 1
    if safe(x):
        cnt[c + C_NR] = add(part, plo + DR_R, cnt[c + C_NR], x)
    else:
        cnt[c + C_XR] += 1


@kernel
def fill(part: F64, plo: int, cnt: I64, c: int, v: F64, wd: int, wb: int) -> None:
    """The sums as of the last of the readings v (time order), from nothing."""
    n = v.shape[0]
    cnt[c : c + NC] = 0
    for a in range(max(0, n - wd - wb), n):
        x = v[a]
        recent = a >= n - wd
        if not safe(x):
            cnt[c + (C_XR if recent else C_XB)] += 1
        elif recent:
            cnt[c + C_NR] = add(part, plo + DR_R, cnt[c + C_NR], x)
        else:
            cnt[c + C_NB] = add(part, plo + DR_B, cnt[c + C_NB], x)
            cnt[c + C_NQ] = add_square(part, plo + DR_Q, cnt[c + C_NQ], x, 1.0)


@kernel
def centred_squares(part: F64, plo: int, cnt: I64, c: int, b: float, wb: int, tq: F64) -> float:
    """sum((x - b)**2) over the baseline, exactly, correctly rounded: as
    sum(x**2) - 2 b sum(x) + wb b**2, every product split exactly in two."""
    n = cnt[c + C_NQ]
    tq[:n] = part[plo + DR_Q : plo + DR_Q + n]
    t = -2.0 * b
    for q in range(plo + DR_B, plo + DR_B + cnt[c + C_NB]):
        hi, err = two_product(t, part[q])
        n = _raw_add(tq, 0, n, hi)
        n = _raw_add(tq, 0, n, err)
    hi, err = two_product(b, b)
    w = float(wb)
    h1, e1 = two_product(w, hi)
    h2, e2 = two_product(w, err)
    n = _raw_add(tq, 0, n, h1)
    n = _raw_add(tq, 0, n, e1)
    n = _raw_add(tq, 0, n, h2)
    n = _raw_add(tq, 0, n, e2)
    return rounded(tq, 0, n)


@kernel
def means(part: F64, plo: int, cnt: I64, c: int, wd: int, wb: int, recent: F64, base: F64) -> Any:
    """(mean of the recent window, mean of the baseline); `recent` and `base` hold the windows'
    readings, read only where a window has readings left out of its exact sum."""
    if cnt[c + C_XR] == 0:
        mean_r = rounded(part, plo + DR_R, cnt[c + C_NR]) / wd
    else:
        mean_r = lane_sum(recent, 0, wd, math.nan) / wd
    if cnt[c + C_XB] == 0:
        mean_b = rounded(part, plo + DR_B, cnt[c + C_NB]) / wb
    else:
        mean_b = lane_sum(base, 0, wb, math.nan) / wb
    return mean_r, mean_b


@kernel
def sample_sd(
    part: F64, plo: int, cnt: I64, c: int, mean_b: float, wb: int, base: F64, tq: F64
) -> float:
    """Sample standard deviation of the baseline about its mean `mean_b`."""
    if cnt[c + C_XB] == 0:
        m2 = centred_squares(part, plo, cnt, c, mean_b, wb, tq)
    else:
        m2 = lane_sum(base, 0, wb, mean_b)
    return math.sqrt(m2 / (wb - 1))
