"""Exact sums: a rolling sum reads as math.fsum of the window it holds, bit for bit."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.anomaly import drift, exact

PROPERTY = settings(
    max_examples=300,
    deadline=None,  # no timed assertions
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

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


@PROPERTY
@given(values=st.lists(moderate, min_size=2, max_size=60), data=st.data())
def test_the_drift_sums_are_exact_however_they_were_built(
    values: list[float], data: st.DataObject
) -> None:
    """Slid reading by reading, or filled at once from the history (a restore): the same
    correctly rounded means and spread."""
    wd = data.draw(st.integers(1, 6))
    wb = data.draw(st.integers(2, len(values)))
    areas = [np.zeros(drift.DRIFT_SIZE, np.int64) for _ in range(2)]
    counts = [np.zeros(drift.NC, np.int64) for _ in range(2)]
    slid, filled = areas
    drift.empty(counts[0], 0)
    for a, x in enumerate(values):
        moved = values[a - wd] if a >= wd else 0.0
        gone = values[a - wd - wb] if a >= wd + wb else 0.0
        drift.slide(slid, 0, counts[0], 0, x, moved, gone, a, wd, wb)
        if a % 7 == 0:
            drift.tidy(slid, 0, counts[0], 0)
    drift.fill(filled, 0, counts[1], 0, np.array(values), wd, wb)
    n = len(values)
    recent = values[max(0, n - wd) :]
    base = values[max(0, n - wd - wb) : max(0, n - wd)]
    nothing = np.zeros(0, np.float64)
    t = np.empty(drift.SCRATCH, np.int64)
    span = np.empty(2, np.int64)
    tmp = np.empty(drift.SCRATCH, np.float64)
    for acc, cnt in zip(areas, counts, strict=True):
        assert cnt[drift.C_XR] == cnt[drift.C_XB] == 0
        mean_r, mean_b = drift.means(acc, 0, cnt, 0, wd, wb, recent=nothing, base=nothing, tmp=tmp)
        assert mean_r == math.fsum(recent) / wd
        assert mean_b == math.fsum(base) / wb
        got = exact.spread(
            acc, drift.DR_Q, cnt, drift.C_Q, acc, drift.DR_B, len(base), t, span, tmp
        )
        want = len(base) * sum(Fraction(v) ** 2 for v in base) - sum(map(Fraction, base)) ** 2
        assert got == float(want)


def test_readings_beyond_the_exact_range_are_counted_not_summed() -> None:
    acc = np.zeros(drift.DRIFT_SIZE, np.int64)
    cnt = np.zeros(drift.NC, np.int64)
    drift.empty(cnt, 0)
    tmp = np.empty(drift.SCRATCH, np.float64)
    values = [1.0, 1e-310, 2.0**301, 3.0, 4.0, 5.0, 6.0, 7.0]
    seen = []
    for a, x in enumerate(values):
        moved = values[a - 2] if a >= 2 else 0.0
        gone = values[a - 4] if a >= 4 else 0.0
        drift.slide(acc, 0, cnt, 0, x, moved, gone, a, 2, 2)
        seen.append((int(cnt[drift.C_XR]), int(cnt[drift.C_XB])))
    # recent, baseline at a = 3: (2**301, 3), (1, 1e-310); a = 4: (3, 4), (1e-310, 2**301) ...
    assert seen[3:] == [(1, 1), (0, 2), (0, 1), (0, 0), (0, 0)]
    nothing = np.zeros(0, np.float64)
    assert drift.means(acc, 0, cnt, 0, 2, 2, nothing, nothing, tmp) == (6.5, 4.5)


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
