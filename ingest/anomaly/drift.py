"""The drift filter's statistics, exact: the recent window's mean, the baseline's mean and
sample standard deviation, each a function of its window alone, bit for bit.

A reading enters and leaves three running sums (recent, baseline, baseline of squares) kept
as unevaluated pairs of doubles with error-free transformations (`two_sum`, `two_product`) and
a bound on what their few rounded additions lost, measured exactly. Most readings are settled
by the sums' leading parts within those bounds (`surely_quiet`); the others read each sum
correctly rounded from its pair whenever the bound leaves only one double it can round to
(`rounded`, `rounded_spread`), which is almost always. Otherwise, and while a window holds a
reading outside `exact.SAFE_MIN`..`exact.SAFE_MAX` in magnitude (other than 0), the statistics
are computed from the window's readings in the ring (`drift_verdicts`): long fixed-point
accumulators (`ingest.anomaly.exact`: `fill`, `means`, `sample_sd`), or eight lanes for such a
window (see `AnomalyRule`); the pairs then restart from those exact sums (`restart`).
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ingest.anomaly.exact import (
    BIAS,
    BIAS2,
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
from ingest.anomaly.pairs import (
    EPS,
    SLACK,
    enter,
    enter_square,
    rounded,
    rounded_spread,
    surely_quiet,
    two_sum,
)
from ingest.anomaly.window import ring_at, ring_window
from ingest.jit import kernel

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

DR_R, DR_B, DR_Q = 0, LIMBS, 2 * LIMBS
"""Offsets of the limbs of sum(recent), sum(baseline), sum(baseline**2) in an exact area."""
LIMB_SIZE: Final = 2 * LIMBS + LIMBS2
# Drift's ints in a slot's int state, from its offset: the readings left out of the recent and
# of the baseline sums (C_XR, C_XB); C_R, C_Q, C_B are the limb ranges of an exact area's
# sums in a scratch copy of them.
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
def tidy(acc: I64, o: int, cnt: I64, c: int) -> None:
    """Carry every sum (bounds how far the limbs can grow)."""
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


# -- the running sums: pairs of doubles -------------------------------------------------------

DD_R, DD_B, DD_Q = 0, 3, 6
"""Offsets of sum(recent), sum(baseline), sum(baseline**2) in a slot's drift area (floats):
each is (hi, lo, lost), whose exact value differs from hi + lo by at most lost: the sum of what
the rounded additions into lo lost, each measured exactly (so 0 while they were all exact).
The sum of squares has a third part (at DD_Q + 3) that takes those losses in, and `lost`
sums what that part's own roundings lost: its exact value is within lost of hi + lo + third
(the squares of readings on a large offset need the precision, see `rounded_spread`)."""
DRIFT_SIZE: Final = 10


@kernel
def _read(acc: I64, off: int, rng: I64, r: int, squares: bool, tmp: F64) -> float:
    if squares:
        return float(value_sq(acc, off, rng, r, tmp))
    return float(exact_value(acc, off, rng, r, tmp))


@kernel
def _restart_one(
    sums: F64, at: int, acc: I64, off: int, rng: I64, r: int, squares: bool, tmp: F64
) -> None:
    """A running sum at sums[at:] from an exact one: hi its value correctly rounded, lo (and
    for squares the third part) what is left, correctly rounded; lost 0 when they are exact,
    else 2**-52 times the last part (what is left then is within 2**-53 of it). Takes them out
    of the accumulator."""
    bias = BIAS2 if squares else BIAS
    last = 0.0
    for part in range(3 if squares else 2):
        x = _read(acc, off, rng, r, squares, tmp)
        if x != 0.0:
            add(acc, off, rng, r, x, -1, bias)
        sums[at + (part if part < 2 else 3)] = x
        last = x
    normalize(acc, off, rng, r)
    left = False
    for q in range(rng[r], rng[r + 1] + 1):
        if acc[off + q] != 0:
            left = True
    sums[at + 2] = EPS * abs(last) if left else 0.0


@kernel
def restart(sums: F64, so: int, acc: I64, cnt: I64, c: int, tmp: F64) -> None:
    """The running sums at sums[so:] from the exact ones in acc (limb ranges in cnt from c);
    consumes acc."""
    _restart_one(sums, so + DD_R, acc, DR_R, cnt, c + C_R, False, tmp)
    _restart_one(sums, so + DD_B, acc, DR_B, cnt, c + C_B, False, tmp)
    _restart_one(sums, so + DD_Q, acc, DR_Q, cnt, c + C_Q, True, tmp)


@kernel
def restore_sums(sums: F64, so: int, cnt: I64, c: int, v: F64, wd: int, wb: int) -> None:
    """The running sums and counts (cnt from c) as of the last of the readings v (time order)."""
    acc = np.zeros(LIMB_SIZE, np.int64)
    scratch = np.zeros(NC, np.int64)
    tmp = np.empty(SCRATCH, np.float64)
    fill(acc, 0, scratch, 0, v, wd, wb)
    empty(cnt, c)
    cnt[c + C_XR] = scratch[C_XR]
    cnt[c + C_XB] = scratch[C_XB]
    restart(sums, so, acc, scratch, 0, tmp)


@kernel
def workspace(n: int) -> Any:
    """The arrays `drift_verdicts` works in, for windows of up to n readings (wd + wb): made
    once a flush, not once a sensor."""
    return (
        np.empty(n, np.float64),
        np.empty(LIMB_SIZE, np.int64),
        np.empty(NC, np.int64),
        np.empty(SCRATCH, np.int64),
        np.empty(2, np.int64),
        np.empty(SCRATCH, np.float64),
        np.empty(LIMBS2, np.int64),
        np.empty(2, np.int64),
    )


@kernel
def drift_verdicts(
    ring: tuple[F64, int, int, int, int, int, F64, int],
    na: int,
    sums: F64,
    so: int,
    cnt: I64,
    c: int,
    rule: tuple[int, int, float, float],
    verdicts: Any,
    when: I64,
    work: Any,
) -> None:
    """Drift's verdicts on a sensor's na accepted readings, from and into its running sums
    (sums[so:], counts in cnt from c; reset where the sensor has seen nothing).

    `ring` is (pool, po, r0, h, hcap, seen, ext, e0) as `ring_at` takes them; `rule` is
    (wd, wb, k, floor). Writes (offending, score, value, start) for each reading; value and
    start wherever a reading is judged and not surely quiet, the score wherever the distance
    exceeds k floors. `work` is `workspace` of at least wd + wb readings.
    """
    pool, po, r0, h, hcap, seen, ext, e0 = ring
    wd, wb, k, floor = rule
    off, score, val, start = verdicts
    if seen == 0:
        sums[so : so + DRIFT_SIZE] = 0.0
    rh, rl, rx = sums[so + DD_R], sums[so + DD_R + 1], sums[so + DD_R + 2]
    bh, bl, bx = sums[so + DD_B], sums[so + DD_B + 1], sums[so + DD_B + 2]
    qh, ql, qx = sums[so + DD_Q], sums[so + DD_Q + 1], sums[so + DD_Q + 2]
    q3 = sums[so + DD_Q + 3]
    xr = cnt[c + C_XR]
    xb = cnt[c + C_XB]
    inv_d = 1.0 / wd
    inv_b = 1.0 / wb
    inv_scale = 1.0 / (float(wb) * float(wb - 1))
    n = float(wb)
    buf, acc, counts, tlimbs, span, tmp, sq, srng = work
    win = buf[: wd + wb]  # the window, when the sums do not decide a reading
    for i in range(na):
        a = seen + i
        x = ext[e0 + i]
        if a >= wd:
            moved = ring_at(pool, po, r0, h, hcap, seen, ext, e0, a - wd)
            if safe(moved):
                rh, rl, rx = enter(rh, rl, rx, -moved)
                bh, bl, bx = enter(bh, bl, bx, moved)
                qh, ql, q3, qx = enter_square(qh, ql, q3, qx, moved, 1.0)
            else:
                xr -= 1
                xb += 1
            if a >= wd + wb:
                gone = ring_at(pool, po, r0, h, hcap, seen, ext, e0, a - wd - wb)
                if safe(gone):
                    bh, bl, bx = enter(bh, bl, bx, -gone)
                    qh, ql, q3, qx = enter_square(qh, ql, q3, qx, gone, -1.0)
                else:
                    xb -= 1
        if safe(x):
            rh, rl, rx = enter(rh, rl, rx, x)
        else:
            xr += 1
        off[i] = False
        if a < wd - 1 + wb:
            continue
        mean_r = math.nan
        mean_b = math.nan
        dist = 0.0
        sd = math.nan
        decided = False
        if xr == 0 and xb == 0:
            er = abs(rl) + rx * SLACK
            eb = abs(bl) + bx * SLACK
            eq = abs(ql) + abs(q3) + qx * SLACK
            if surely_quiet(rh, er, bh, eb, qh, eq, inv_d, inv_b, inv_scale, n, k, floor):
                continue
            sum_r = rounded(rh, rl, rx * SLACK)
            if math.isnan(sum_r):  # (a tie within the bound) the recent window summed again
                ring_window(win, pool, po, r0, h, hcap, seen, ext, e0, a - wd + 1, wd)
                acc[:] = 0
                fill(acc, 0, counts, 0, win[:wd], wd, 0)
                _restart_one(sums, so + DD_R, acc, DR_R, counts, C_R, False, tmp)
                rh, rl, rx = sums[so + DD_R], sums[so + DD_R + 1], sums[so + DD_R + 2]
                sum_r = rh
            mean_r = sum_r / wd
            mean_b = rounded(bh, bl, bx * SLACK) / wb
            decided = not math.isnan(mean_b)
            if decided:
                dist = abs(mean_r - mean_b)
                if dist > k * floor:
                    v = rounded_spread((bh, bl, bx * SLACK), (qh, ql, q3, qx), wb, sq, srng, tmp)
                    decided = not math.isnan(v)
                    sd = math.sqrt(v / (float(wb) * float(wb - 1)))
        if not decided:  # from the window's readings: exact, or in lanes
            ring_window(win, pool, po, r0, h, hcap, seen, ext, e0, a - wd - wb + 1, wd + wb)
            acc[:] = 0
            fill(acc, 0, counts, 0, win, wd, wb)
            recent = win[wb:]
            base = win[:wb]
            mean_r, mean_b = means(acc, 0, counts, 0, wd, wb, recent, base, tmp)
            dist = abs(mean_r - mean_b)
            if dist > k * floor:
                sd = sample_sd(acc, 0, counts, 0, mean_b, wb, base, tlimbs, span, tmp)
            restart(sums, so, acc, counts, 0, tmp)  # the same sums, exactly or nearly so
            rh, rl, rx = sums[so + DD_R], sums[so + DD_R + 1], sums[so + DD_R + 2]
            bh, bl, bx = sums[so + DD_B], sums[so + DD_B + 1], sums[so + DD_B + 2]
            qh, ql, qx = sums[so + DD_Q], sums[so + DD_Q + 1], sums[so + DD_Q + 2]
            q3 = sums[so + DD_Q + 3]
        # sd >= the floor: within k floors of the baseline needs no variance.
        if dist > k * floor:
            if sd < floor:
                sd = floor
            off[i] = dist > k * sd
            score[i] = dist / sd if sd > 0.0 else math.inf
        val[i] = mean_r
        start[i] = when[i]
    rh, rl = two_sum(rh, rl)  # keeps lo small: what the next additions lose stays small
    bh, bl = two_sum(bh, bl)
    qh, ql = two_sum(qh, ql)
    ql, q3 = two_sum(ql, q3)
    sums[so + DD_R], sums[so + DD_R + 1], sums[so + DD_R + 2] = rh, rl, rx
    sums[so + DD_B], sums[so + DD_B + 1], sums[so + DD_B + 2] = bh, bl, bx
    sums[so + DD_Q], sums[so + DD_Q + 1], sums[so + DD_Q + 2] = qh, ql, qx
    sums[so + DD_Q + 3] = q3
    cnt[c + C_XR] = xr
    cnt[c + C_XB] = xb
