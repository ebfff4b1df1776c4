"""Exact sums: a rolling sum reads as math.fsum of the window it holds, bit for bit."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.anomaly import drift, exact, pairs
from tests.support.properties import property_settings

PROPERTY = property_settings(300, HealthCheck.data_too_large)

moderate = st.one_of(
    st.just(0.0),
    st.floats(exact.SAFE_MIN, exact.SAFE_MAX),
    st.floats(-exact.SAFE_MAX, -exact.SAFE_MIN),
    st.sampled_from([1.0, -1.0, 1e16, -1e16, 0.1, 2.0**-300, 2.0**300, -(2.0**300), 2.0**-299]),
    st.builds(math.ldexp, st.floats(-1.0, 1.0), st.integers(-299, 299)).filter(
        lambda x: x == 0.0 or exact.SAFE_MIN <= abs(x) <= exact.SAFE_MAX
    ),  # every binade
)


class Sum:
    """One accumulator with its scratch, driven from Python."""

    def __init__(self, limbs: int) -> None:
        self.acc = np.zeros(limbs, np.int64)
        self.rng = np.zeros(2, np.int64)
        self.tmp = np.empty(drift.SCRATCH, np.float64)
        exact.clear(self.rng, 0)

    def add(self, x: float, sign: int) -> None:
        if x != 0.0:  # callers leave zeros out: they change no sum
            exact.add(self.acc, 0, self.rng, 0, x, sign, exact.BIAS)

    def value(self) -> float:
        return float(exact.value(self.acc, 0, self.rng, 0, self.tmp))


@PROPERTY
@given(values=st.lists(moderate, max_size=300), window=st.integers(1, 40))
def test_a_rolling_sum_is_the_correctly_rounded_sum_of_its_window(
    values: list[float], window: int
) -> None:
    total = Sum(exact.LIMBS)
    for i, x in enumerate(values):
        total.add(x, 1)
        if i >= window:
            total.add(values[i - window], -1)
        held = values[max(0, i - window + 1) : i + 1]
        if i % 3 == 0:  # read (and carry) now and then: carrying changes nothing
            assert total.value() == math.fsum(held)
    held = values[max(0, len(values) - window) :]
    assert total.value() == math.fsum(held)
    lo, hi = total.rng.tolist()
    exact_value = sum(
        Fraction(int(total.acc[k])) * Fraction(2) ** (30 * k - 390) for k in range(lo, hi + 1)
    )
    assert exact_value == sum(map(Fraction, held))


def test_ties_round_to_even_and_cancellation_is_exact() -> None:
    for terms in (
        [1.0, 2.0**-53],  # a tie: stays at 1.0
        [1.0, 2.0**-53, 2.0**-300],  # just above the tie
        [1.0 + 2.0**-52, 2.0**-53],  # a tie: to even, up
        [1e90, 1.0, -1e90],
        [2.0**300, -(2.0**300), -(2.0**-300)],
        [0.1] * 10,
    ):
        total = Sum(exact.LIMBS)
        for x in terms:
            total.add(x, 1)
        assert total.value() == math.fsum(terms), terms


def _frac_spread(base: list[float]) -> Fraction:
    total = sum(map(Fraction, base), Fraction(0))
    return len(base) * sum((Fraction(v) ** 2 for v in base), Fraction(0)) - total**2


class Pairs:
    """The drift filter's three running sums (recent, baseline, baseline of squares), slid
    reading by reading as the kernel slides them."""

    def __init__(self, wd: int, wb: int) -> None:
        self.wd, self.wb = wd, wb
        self.r = (0.0, 0.0, 0.0)
        self.b = (0.0, 0.0, 0.0)
        self.q = (0.0, 0.0, 0.0, 0.0)  # hi, lo, third, lost

    def slide(self, values: list[float], a: int) -> None:
        wd, wb = self.wd, self.wb
        if a >= wd:
            moved = values[a - wd]
            self.r = pairs.enter(*self.r, -moved)
            self.b = pairs.enter(*self.b, moved)
            self.q = pairs.enter_square(*self.q, moved, 1.0)
            if a >= wd + wb:
                gone = values[a - wd - wb]
                self.b = pairs.enter(*self.b, -gone)
                self.q = pairs.enter_square(*self.q, gone, -1.0)
        self.r = pairs.enter(*self.r, values[a])

    def check(self, recent: list[float], base: list[float]) -> tuple[int, int]:
        """Every pair is within its bound of its exact sum, and reads as math.fsum when its
        bound decides it; returns how many of the three reads it decided (and of 3)."""
        decided = 0
        for (h, lo, lost), window in ((self.r, recent), (self.b, base)):
            want = sum(map(Fraction, window))
            assert abs(want - Fraction(h) - Fraction(lo)) <= Fraction(lost * pairs.SLACK)
            got = pairs.rounded(h, lo, lost * pairs.SLACK)
            if not math.isnan(got):
                decided += 1
                assert got == math.fsum(window)
        qh, ql, q3, qx = self.q
        want = sum(Fraction(v) ** 2 for v in base)
        assert abs(want - Fraction(qh) - Fraction(ql) - Fraction(q3)) <= Fraction(qx * pairs.SLACK)
        bh, bl, bx = self.b
        acc = np.empty(exact.LIMBS2, np.int64)
        rng = np.empty(2, np.int64)
        tmp = np.empty(drift.SCRATCH)
        got = pairs.rounded_spread((bh, bl, bx * pairs.SLACK), self.q, len(base), acc, rng, tmp)
        if not math.isnan(got):
            decided += 1
            assert got == float(_frac_spread(base))
        return decided, 3


@settings(PROPERTY, max_examples=150)
@given(values=st.lists(moderate, min_size=2, max_size=80), data=st.data())
def test_the_running_sums_are_within_their_bounds_and_read_exactly(
    values: list[float], data: st.DataObject
) -> None:
    """Slid reading by reading over any safe readings, cancelling ones too: each running sum
    lies within its bound of the exact sum, and a read the bound decides is math.fsum's (the
    spread: n sum(x**2) - sum(x)**2 correctly rounded)."""
    wd = data.draw(st.integers(1, 6))
    wb = data.draw(st.integers(2, max(2, len(values) - wd)))
    pairs = Pairs(wd, wb)
    for a in range(len(values)):
        pairs.slide(values, a)
        if a >= wd + wb - 1:
            pairs.check(values[a - wd + 1 : a + 1], values[a - wd - wb + 1 : a - wd + 1])


@pytest.mark.parametrize("offset", [0.0, 1e8, -3e11, 1e15])
def test_the_running_sums_decide_almost_every_read_of_noisy_and_quantized_data(
    offset: float,
) -> None:
    """Near ties are what the bound cannot decide: random readings on large offsets (most
    of their digits cancel in the spread), and readings in steps of 0.1 and of 1/64 (whose
    sums land on or near a tie between two doubles), decided at least 99 times in 100."""
    rng = np.random.default_rng(7)
    n = 1_500
    for values in (
        (offset + np.cumsum(rng.normal(0.0, 0.5, n))).tolist(),
        (offset + np.round(rng.normal(0.0, 3.0, n), 1)).tolist(),
        (offset + np.round(rng.normal(0.0, 3.0, n) * 64) / 64).tolist(),
    ):
        wd, wb = 16, 500
        pairs = Pairs(wd, wb)
        decided = total = 0
        for a in range(n):
            pairs.slide(values, a)
            if a >= wd + wb - 1 and a % 10 == 0:
                got, of = pairs.check(
                    values[a - wd + 1 : a + 1], values[a - wd - wb + 1 : a - wd + 1]
                )
                decided += got
                total += of
        assert decided >= 0.99 * total


@PROPERTY
@given(values=st.lists(moderate, min_size=2, max_size=60), data=st.data())
def test_a_restore_restarts_the_running_sums_from_the_exact_ones(
    values: list[float], data: st.DataObject
) -> None:
    """Filled at once from the history (a restore): each running sum is its exact sum
    correctly rounded plus the rest correctly rounded, within the bound it states."""
    wd = data.draw(st.integers(1, 6))
    wb = data.draw(st.integers(2, len(values)))
    sums = np.full(drift.DRIFT_SIZE, np.nan)
    cnt = np.zeros(drift.NC, np.int64)
    drift.restore_sums(sums, 0, cnt, 0, np.array(values), wd, wb)
    n = len(values)
    recent = values[max(0, n - wd) :]
    base = values[max(0, n - wd - wb) : max(0, n - wd)]
    assert cnt[drift.C_XR] == cnt[drift.C_XB] == 0
    for at, window, squares in (
        (drift.DD_R, recent, False),
        (drift.DD_B, base, False),
        (drift.DD_Q, base, True),
    ):
        h, lo, lost, *rest = sums[at : at + (4 if squares else 3)].tolist()
        want = sum(Fraction(v) ** 2 if squares else Fraction(v) for v in window)
        assert h == float(want)
        assert lo == float(want - Fraction(h))
        held = Fraction(h) + Fraction(lo)
        if squares:
            assert rest == [float(want - held)]
            held += Fraction(rest[0])
        assert abs(want - held) <= Fraction(lost)
        assert (lost == 0.0) == (want == held)


def test_rounded_is_exact_on_ties_and_refuses_what_it_cannot_tell() -> None:
    one = 1.0
    half_ulp = 2.0**-53
    assert pairs.rounded(one, half_ulp, 0.0) == 1.0  # a tie, exact: to even
    assert pairs.rounded(1.0 + 2.0**-52, half_ulp, 0.0) == 1.0 + 2.0**-51
    assert math.isnan(pairs.rounded(one, half_ulp, 2.0**-100))  # either side of the tie
    assert pairs.rounded(one, half_ulp / 2, 2.0**-100) == 1.0
    assert pairs.rounded(one, -(2.0**-55), 2.0**-100) == 1.0  # below a power of two: finer
    assert math.isnan(pairs.rounded(one, -(2.0**-54), 2.0**-100))  # a tie below it
    assert pairs.rounded(0.0, 0.0, 0.0) == 0.0
    assert math.copysign(1.0, pairs.rounded(-0.0, 0.0, 0.0)) == 1.0
    assert math.isnan(pairs.rounded(0.0, 0.0, 2.0**-700))
    assert pairs.rounded(-3.0, 2.0**-60, 2.0**-70) == -3.0


def test_readings_beyond_the_exact_range_are_counted_not_summed() -> None:
    """A restore counts them (and the kernel's sliding, in tests/test_anomaly.py)."""
    values = [1.0, 1e-310, 2.0**301, 3.0, 4.0, 5.0, 6.0, 7.0]
    sums = np.zeros(drift.DRIFT_SIZE)
    cnt = np.zeros(drift.NC, np.int64)
    seen = []
    for a in range(3, len(values)):
        drift.restore_sums(sums, 0, cnt, 0, np.array(values[: a + 1]), 2, 2)
        seen.append((int(cnt[drift.C_XR]), int(cnt[drift.C_XB])))
    # recent, baseline at a = 3: (2**301, 3), (1, 1e-310); a = 4: (3, 4), (1e-310, 2**301) ...
    assert seen == [(1, 1), (0, 2), (0, 1), (0, 0), (0, 0)]
    assert sums[drift.DD_R : drift.DD_R + 3].tolist() == [13.0, 0.0, 0.0]
    assert sums[drift.DD_B : drift.DD_B + 3].tolist() == [9.0, 0.0, 0.0]
    assert sums[drift.DD_Q : drift.DD_Q + 4].tolist() == [41.0, 0.0, 0.0, 0.0]


def test_a_sum_of_squares_over_the_whole_exact_range_is_exact() -> None:
    """Squares one per binade from 2**-300 to 2**300, added then half taken away again."""
    acc = np.zeros(exact.LIMBS2, np.int64)
    rng = np.zeros(2, np.int64)
    exact.clear(rng, 0)
    generator = np.random.default_rng(5)
    terms = [
        math.ldexp(float(generator.uniform(-1.0, 1.0)), int(e))
        for e in generator.permutation(np.arange(-299, 301)).tolist()
    ]
    terms = [x for x in terms if x != 0.0]
    for x in terms:
        exact.add_square(acc, 0, rng, 0, x, 1)
    for x in terms[::2]:
        exact.add_square(acc, 0, rng, 0, x, -1)
    exact.normalize(acc, 0, rng, 0)
    lo, hi = rng.tolist()
    got = sum(Fraction(int(acc[k])) * Fraction(2) ** (30 * k - 780) for k in range(lo, hi + 1))
    assert got == sum(Fraction(x) ** 2 for x in terms[1::2])
