"""The drift filter's running sums as unevaluated pairs of doubles: each reading entered with
error-free additions (TwoSum, TwoProduct), what the few rounded additions lose measured
exactly, read correctly rounded when the bound leaves one double, and the test that settles
a reading as quiet from the leading parts and their bounds (see `ingest.anomaly.drift`)."""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ingest.anomaly.exact import BIAS2, add, bits, clear, two_product, value_sq
from ingest.jit import kernel

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

EPS: Final = 2.0**-52
"""Twice the unit roundoff: every bound in `surely_quiet` is at least twice what it needs."""
SLACK: Final = 1.0 + 2.0**-40
"""Covers the roundings of an error bound's own arithmetic (each at most 2**-53; in `lost`, for
fewer than 2**39 additions)."""


@kernel
def two_sum(a: float, b: float) -> Any:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth; any a, b without overflow)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@kernel
def enter(h: float, lo: float, lost: float, y: float) -> Any:
    """The running sum (h, lo, lost) plus y."""
    s, e = two_sum(h, y)
    lo, f = two_sum(lo, e)
    return s, lo, lost + abs(f)


@kernel
def enter_square(h: float, lo: float, third: float, lost: float, x: float, sign: float) -> Any:
    """The running sum of squares (h, lo, third, lost) plus sign * x * x (sign +-1; x safe):
    what lo cannot hold goes to `third`, and what that loses (measured exactly) to lost."""
    p, pe = two_product(x, x)
    s, e = two_sum(h, sign * p)
    t, f1 = two_sum(e, sign * pe)
    lo, f2 = two_sum(lo, t)
    g, f3 = two_sum(f1, f2)
    third, f4 = two_sum(third, g)
    return s, lo, third, lost + abs(f3) + abs(f4)


@kernel
def rounded(h: float, lo: float, err: float) -> float:
    """The double that every real within `err` of h + lo rounds to (to nearest, ties to even),
    NaN if they do not all round to one. h, lo and err are 0 or at least 2**-800 in magnitude
    and below 2**1000 (no subnormal, no overflow), as the sums of safe readings are."""
    r, d = two_sum(h, lo)  # r + d = h + lo exactly, and r = fl(h + lo)
    if err == 0.0:  # h + lo is the sum: r is it correctly rounded
        return float(r + 0.0)  # (never -0.0: an exact sum's zero is +0.0, as math.fsum's)
    if r == 0.0:  # then d == 0
        return math.nan
    b = bits(abs(r))
    up = math.ldexp(1.0, ((b >> 52) & 0x7FF) - 1075)  # the gap to the next double away from 0
    down = up * 0.5 if (b & 0xFFFFFFFFFFFFF) == 0 else up  # and towards 0
    t = d if r > 0.0 else -d  # where h + lo lies from r, away from 0
    # Every real in [t - err, t] + r and [t, t + err] + r strictly within half a gap of r
    # rounds to r; the slack covers the two roundings of these tests (t, d and the halves are
    # exact).
    if (t + err) * SLACK < 0.5 * up and (err - t) * SLACK < 0.5 * down:
        return float(r + 0.0)
    return math.nan


TINY: Final = 2.0**-600
"""Products at least this large (or 0) have an exact rounding error, far above underflow."""


@kernel
def _spread_terms(bh: float, bl: float, qh: float, ql: float, q3: float, fn: float) -> Any:
    """n Q - B**2 as six signed products (x, y, sign): n (qh + ql + q3) - (bh + bl)**2."""
    return (
        (fn, qh, 1),
        (fn, ql, 1),
        (fn, q3, 1),
        (bh, bh, -1),
        (2.0 * bh, bl, -1),
        (bl, bl, -1),
    )


@kernel
def _spread_in_doubles(bh: float, bl: float, qh: float, ql: float, q3: float, fn: float) -> Any:
    """(s, rest, bound): the twelve doubles of `rounded_spread` summed as s + rest, s with
    error-free additions of the products' leading parts, rest the plain sum of what those
    additions and the products leave, within `bound` of its exact value (twelve roundings,
    each at most 2**-53 of a partial sum); bound NaN if a product is too small for that."""
    s = 0.0
    rest = 0.0
    size = 0.0
    for x, y, sign in _spread_terms(bh, bl, qh, ql, q3, fn):
        p, pe = two_product(x, y)
        if p != 0.0 and abs(p) < TINY:
            return s, rest, math.nan
        s, e = two_sum(s, sign * p)
        rest += e
        rest += sign * pe
        size += abs(e) + abs(pe)
    return s, rest, size * 2.0**-48


@kernel
def rounded_spread(
    b: tuple[float, float, float],
    q: tuple[float, float, float, float],
    n: int,
    acc: I64,
    rng: I64,
    tmp: F64,
) -> float:
    """n sum(x**2) - sum(x)**2 correctly rounded from the baseline's running sum b = (hi, lo,
    lost) and sum of squares q = (hi, lo, third, lost), NaN if their bounds do not decide it.

    With B = hi + lo and Q = hi + lo + third, n Q - B**2 is the exact sum of twelve doubles
    (`two_product` of each of its terms), summed in the accumulator `acc` (LIMBS2 limbs, its
    range in rng[0:2]); the sums' own errors move it by at most n q.lost + b.lost (2 |B| +
    b.lost)."""
    bh, bl, eb = b
    qh, ql, q3, eq = q
    fn = float(n)
    err = (fn * eq + eb * (2.0 * (abs(bh) + abs(bl)) + eb)) * SLACK
    s, rest, bound = _spread_in_doubles(bh, bl, qh, ql, q3, fn)
    if not math.isnan(bound):  # almost always decides, far cheaper than the limbs below
        got = rounded(s, rest, (err + bound) * SLACK)
        if not math.isnan(got):
            return got
    acc[:] = 0
    clear(rng, 0)
    for x, y, sign in _spread_terms(bh, bl, qh, ql, q3, fn):
        p, pe = two_product(x, y)
        if p != 0.0:
            add(acc, 0, rng, 0, p, sign, BIAS2)
        if pe != 0.0:
            add(acc, 0, rng, 0, pe, sign, BIAS2)
    r = value_sq(acc, 0, rng, 0, tmp)
    if err == 0.0:
        return r
    if r != 0.0:
        add(acc, 0, rng, 0, r, -1, BIAS2)
    d = value_sq(acc, 0, rng, 0, tmp)  # the rest, correctly rounded: within 2**-53 |d|
    return rounded(r, d, (err + EPS * abs(d)) * SLACK)


@kernel
def surely_quiet(
    sr: float,
    er: float,
    sb: float,
    eb: float,
    sq: float,
    eq: float,
    inv_d: float,
    inv_b: float,
    inv_scale: float,
    n: float,
    k: float,
    floor: float,
) -> bool:
    """True only if the exact rule finds |r - b| <= k max(s, floor), from approximations sr,
    sb, sq of the three sums within er, eb, eq (inv_d = 1 / wd, inv_b = 1 / wb, inv_scale =
    1 / (wb (wb - 1)), n = wb): with margins far above the few roundings the exact rule adds
    and those made here (reciprocals, no square root). False says nothing."""
    mean_r = sr * inv_d
    mean_b = sb * inv_b
    dist = abs(mean_r - mean_b) + (er * inv_d + eb * inv_b) * 1.001
    dist += 4.0 * EPS * (abs(mean_r) + abs(mean_b))
    v = (n * sq - sb * sb) * inv_scale
    ev = (n * eq + 2.0 * abs(sb) * eb + eb * eb + 8.0 * EPS * (n * abs(sq) + sb * sb)) * inv_scale
    low = v - ev * 2.0 - 8.0 * EPS * abs(v)
    s2 = floor * floor
    if low > s2:
        s2 = low
    return bool(dist * dist * (1.0 + 1e-9) < k * k * s2 * (1.0 - 1e-9))
