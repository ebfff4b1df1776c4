"""The drift filter's rolling sums, exact: the recent window's sum, the baseline's sum and sum
of squares, each a long accumulator (`ingest.anomaly.exact`) that a reading enters and leaves in
constant time, read once per judged reading, correctly rounded.

A window that holds a reading outside `exact.SAFE_MIN`..`exact.SAFE_MAX` in magnitude (other
than 0) is summed in eight lanes over the window instead (see `AnomalyRule`); its sums leave
such readings out and count them, so they are exact again once those readings leave.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ingest.anomaly.exact import (
    BIAS,
    LIMBS,
    LIMBS2,
    add,
    add_square,
    clear,
    normalize,
    safe,
    spread,
    value_sq,
)
from ingest.anomaly.exact import value as exact_value
from ingest.jit import kernel

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

DR_R, DR_B, DR_Q = 0, LIMBS, 2 * LIMBS
"""Offsets of the limbs of sum(recent), sum(baseline), sum(baseline**2) in a drift area."""
DRIFT_SIZE: Final = 2 * LIMBS + LIMBS2
# Drift's ints in a slot's int state, from its offset: the limb range (lo, hi) of each sum,
# then the readings left out of the recent and of the baseline sums.
C_R, C_Q, C_B, C_XR, C_XB = 0, 2, 4, 6, 7
NC: Final = 8
SCRATCH: Final = LIMBS2 + 8
"""Limbs of scratch `variance` needs (and floats of scratch for rounding)."""


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
def empty(cnt: I64, c: int) -> None:
    """No reading in any sum (the limbs must be zero)."""
    clear(cnt, c + C_R)
    clear(cnt, c + C_Q)
    clear(cnt, c + C_B)
    cnt[c + C_XR] = 0
    cnt[c + C_XB] = 0


@kernel
def copy_sums(dst: I64, do: int, src: I64, so: int, cnt: I64, c: int) -> None:
    """Copy the sums (limb ranges in cnt from c) from src[so:] to dst[do:]; every other limb of
    the destination becomes zero."""
    dst[do : do + DRIFT_SIZE] = 0
    for k, r in ((DR_R, C_R), (DR_Q, C_Q), (DR_B, C_B)):
        lo = cnt[c + r]
        hi = cnt[c + r + 1]
        if lo <= hi:
            dst[do + k + lo : do + k + hi + 1] = src[so + k + lo : so + k + hi + 1]


@kernel
def slide(
    acc: I64,
    o: int,
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
    baseline and a - wd - wb (`gone`) leaves the baseline, where those exist. (A 0 changes
    no sum.)"""
    if a >= wd and moved != 0.0:
        if safe(moved):
            add(acc, o + DR_R, cnt, c + C_R, moved, -1, BIAS)
            add(acc, o + DR_B, cnt, c + C_B, moved, 1, BIAS)
            add_square(acc, o + DR_Q, cnt, c + C_Q, moved, 1)
        else:
            cnt[c + C_XR] -= 1
            cnt[c + C_XB] += 1
    if a >= wd + wb and gone != 0.0:
        if safe(gone):
            add(acc, o + DR_B, cnt, c + C_B, gone, -1, BIAS)
            add_square(acc, o + DR_Q, cnt, c + C_Q, gone, -1)
        else:
            cnt[c + C_XB] -= 1
    if x != 0.0:
        if safe(x):
            add(acc, o + DR_R, cnt, c + C_R, x, 1, BIAS)
        else:
            cnt[c + C_XR] += 1


@kernel
def tidy(acc: I64, o: int, cnt: I64, c: int) -> None:
    """Carry every sum (after a flush's readings: bounds how far the limbs can grow)."""
    normalize(acc, o + DR_R, cnt, c + C_R)
    normalize(acc, o + DR_Q, cnt, c + C_Q)
    normalize(acc, o + DR_B, cnt, c + C_B)


@kernel
def fill(acc: I64, o: int, cnt: I64, c: int, v: F64, wd: int, wb: int) -> None:
    """The sums as of the last of the readings v (time order), from zeroed limbs."""
    n = v.shape[0]
    empty(cnt, c)
    for a in range(max(0, n - wd - wb), n):
        x = v[a]
        recent = a >= n - wd
        if x == 0.0:
            continue
        if not safe(x):
            cnt[c + (C_XR if recent else C_XB)] += 1
        elif recent:
            add(acc, o + DR_R, cnt, c + C_R, x, 1, BIAS)
        else:
            add(acc, o + DR_B, cnt, c + C_B, x, 1, BIAS)
            add_square(acc, o + DR_Q, cnt, c + C_Q, x, 1)
    tidy(acc, o, cnt, c)


@kernel
def means(
    acc: I64, o: int, cnt: I64, c: int, wd: int, wb: int, recent: F64, base: F64, tmp: F64
) -> Any:
    """(mean of the recent window, mean of the baseline); `recent` and `base` hold the windows'
    readings, read only where a window has readings left out of its exact sum."""
    if cnt[c + C_XR] == 0:
        mean_r = exact_value(acc, o + DR_R, cnt, c + C_R, tmp) / wd
    else:
        mean_r = lane_sum(recent, 0, wd, math.nan) / wd
    if cnt[c + C_XB] == 0:
        mean_b = exact_value(acc, o + DR_B, cnt, c + C_B, tmp) / wb
    else:
        mean_b = lane_sum(base, 0, wb, math.nan) / wb
    return mean_r, mean_b


@kernel
def sample_sd(
    acc: I64,
    o: int,
    cnt: I64,
    c: int,
    mean_b: float,
    wb: int,
    base: F64,
    t: I64,
    span: I64,
    tmp: F64,
) -> float:
    """Sample standard deviation of the baseline: exact, sqrt(v / (wb (wb - 1))) with v =
    wb sum(x**2) - sum(x)**2 correctly rounded; in eight lanes about `mean_b`, over (wb - 1),
    where the baseline holds readings left out of its exact sums."""
    if cnt[c + C_XB] == 0:
        v = spread(acc, o + DR_Q, cnt, c + C_Q, acc, o + DR_B, wb, t, span, tmp)
        return math.sqrt(v / (float(wb) * float(wb - 1)))
    return math.sqrt(lane_sum(base, 0, wb, mean_b) / (wb - 1))


RESYNC: Final = 64
"""Judged readings between two reads of the exact sums into the running approximations."""
_U: Final = 2.0**-52
"""Twice the unit roundoff: every bound below is at least twice what it needs to be."""


@kernel
def resync(acc: I64, o: int, cnt: I64, c: int, approx: F64, tmp: F64) -> None:
    """approx[:6] = the three sums correctly rounded, and a bound on each one's error (and
    approx[6:9] the reciprocals `surely_quiet` needs, set by the caller)."""
    approx[0] = exact_value(acc, o + DR_R, cnt, c + C_R, tmp)
    approx[1] = exact_value(acc, o + DR_B, cnt, c + C_B, tmp)
    approx[2] = value_sq(acc, o + DR_Q, cnt, c + C_Q, tmp)
    for k in range(3):
        approx[3 + k] = _U * abs(approx[k])


@kernel
def track(approx: F64, x: float, moved: float, gone: float, a: int, wd: int, wb: int) -> None:
    """`slide` in plain floating point, with a bound on the error it accumulates."""
    if a >= wd and moved != 0.0 and safe(moved):
        approx[0] -= moved
        approx[3] += _U * abs(approx[0])
        approx[1] += moved
        approx[4] += _U * abs(approx[1])
        sq = moved * moved
        approx[2] += sq
        approx[5] += _U * (sq + abs(approx[2]))
    if a >= wd + wb and gone != 0.0 and safe(gone):
        approx[1] -= gone
        approx[4] += _U * abs(approx[1])
        sq = gone * gone
        approx[2] -= sq
        approx[5] += _U * (sq + abs(approx[2]))
    if x != 0.0 and safe(x):
        approx[0] += x
        approx[3] += _U * abs(approx[0])


@kernel
def surely_quiet(approx: F64, wd: int, wb: int, k: float, floor: float) -> bool:
    """True only if the exact rule (`means`, `sample_sd`) finds |r - b| <= k max(s, floor):
    from the running approximations and their error bounds, with margins far above the few
    roundings the exact rule adds and those made here (reciprocals, no square root). False
    says nothing."""
    sr, sb, sq, er, eb, eq = approx[0], approx[1], approx[2], approx[3], approx[4], approx[5]
    inv_d = approx[6]
    inv_b = approx[7]
    mean_r = sr * inv_d
    mean_b = sb * inv_b
    dist = abs(mean_r - mean_b) + (er * inv_d + eb * inv_b) * 1.001
    dist += 4.0 * _U * (abs(mean_r) + abs(mean_b))
    n = float(wb)
    inv_scale = approx[8]
    v = (n * sq - sb * sb) * inv_scale
    ev = (n * eq + 2.0 * abs(sb) * eb + eb * eb + 8.0 * _U * (n * abs(sq) + sb * sb)) * inv_scale
    low = v - ev * 2.0 - 8.0 * _U * abs(v)
    s2 = floor * floor
    if low > s2:
        s2 = low
    return bool(dist * dist * (1.0 + 1e-9) < k * k * s2 * (1.0 - 1e-9))
