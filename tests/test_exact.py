"""Exact sums: a rolling sum kept as partials reads as math.fsum of the window it holds."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import drift, exact

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
    st.sampled_from([1.0, -1.0, 1e16, -1e16, 0.1, 2.0**-300, 2.0**300, 3.0 * 2.0**-299]),
    st.builds(
        lambda m, e: math.ldexp(m, e), st.floats(0.5, 1.0), st.integers(-299, 299)
    ),  # every binade: many partials
)


@PROPERTY
@given(values=st.lists(moderate, max_size=400), window=st.integers(1, 40))
def test_a_rolling_sum_is_the_correctly_rounded_sum_of_its_window(
    values: list[float], window: int
) -> None:
    p = np.zeros(exact.CAP, np.float64)
    n = 0
    for i, x in enumerate(values):
        n = exact.add(p, 0, n, x)
        if i >= window:
            n = exact.add(p, 0, n, -values[i - window])
        assert n <= exact.CAP
        held = values[max(0, i - window + 1) : i + 1]
        assert exact.rounded(p, 0, n) == math.fsum(held)
        assert sum(map(Fraction, p[:n].tolist())) == sum(map(Fraction, held))


@PROPERTY
@given(values=st.lists(moderate, min_size=2, max_size=60), data=st.data())
def test_the_drift_sums_are_exact_however_they_were_built(
    values: list[float], data: st.DataObject
) -> None:
    """Slid reading by reading, or filled at once from the history (a restore): the same
    correctly rounded means and centred sum of squares."""
    wd = data.draw(st.integers(1, 6))
    wb = data.draw(st.integers(2, len(values)))
    slid = np.zeros(drift.DRIFT_SIZE, np.float64)
    filled = np.zeros(drift.DRIFT_SIZE, np.float64)
    cs = np.zeros(drift.NC, np.int64)
    cf = np.zeros(drift.NC, np.int64)
    tq = np.empty(drift.TQ_SIZE, np.float64)
    for a, x in enumerate(values):
        moved = values[a - wd] if a >= wd else 0.0
        gone = values[a - wd - wb] if a >= wd + wb else 0.0
        drift.slide(slid, 0, cs, 0, x, moved, gone, a, wd, wb)
    drift.fill(filled, 0, cf, 0, np.array(values), wd, wb)
    n = len(values)
    recent = values[max(0, n - wd) :]
    base = values[max(0, n - wd - wb) : max(0, n - wd)]
    empty = np.zeros(0, np.float64)
    for part, cnt in ((slid, cs), (filled, cf)):
        assert cnt[drift.C_XR] == cnt[drift.C_XB] == 0
        mean_r, mean_b = drift.means(part, 0, cnt, 0, wd, wb, empty, empty)
        assert mean_r == math.fsum(recent) / wd
        assert mean_b == math.fsum(base) / wb
        b = math.fsum(base) / max(1, len(base))
        m2 = drift.centred_squares(part, 0, cnt, 0, b, len(base), tq)
        assert m2 == float(sum((Fraction(v) - Fraction(b)) ** 2 for v in base))


def test_readings_beyond_the_exact_range_are_counted_not_summed() -> None:
    part = np.zeros(drift.DRIFT_SIZE, np.float64)
    cnt = np.zeros(drift.NC, np.int64)
    values = [1.0, 1e-310, 2.0**301, 3.0, 4.0, 5.0, 6.0, 7.0]
    seen = []
    for a, x in enumerate(values):
        moved = values[a - 2] if a >= 2 else 0.0
        gone = values[a - 4] if a >= 4 else 0.0
        drift.slide(part, 0, cnt, 0, x, moved, gone, a, 2, 2)
        seen.append((int(cnt[drift.C_XR]), int(cnt[drift.C_XB])))
    # recent, baseline at a = 3: (2**301, 3), (1, 1e-310); a = 4: (3, 4), (1e-310, 2**301) ...
    assert seen[3:] == [(1, 1), (0, 2), (0, 1), (0, 0), (0, 0)]
    assert exact.rounded(part, drift.DR_B, cnt[drift.C_NB]) == 4.0 + 5.0
    assert exact.rounded(part, drift.DR_R, cnt[drift.C_NR]) == 6.0 + 7.0


def test_the_partials_stay_bounded_over_the_whole_exact_range() -> None:
    """Terms one per binade from 2**-300 to 2**300, squared: far more distinct bits than the
    partials could hold one by one, so they are renormalised, and stay exact."""
    p = np.zeros(exact.CAP, np.float64)
    n = 0
    terms: list[float] = []
    rng = np.random.default_rng(5)
    for e in rng.permutation(np.arange(-300, 301)).tolist():
        x = math.ldexp(float(rng.uniform(0.5, 1.0)), int(e))
        n = exact.add_square(p, 0, n, x, 1.0)
        terms.append(x)
        assert n <= exact.CAP
    assert exact.rounded(p, 0, n) == float(sum(Fraction(x) ** 2 for x in terms))
    for x in terms[::2]:
        n = exact.add_square(p, 0, n, x, -1.0)
    assert exact.rounded(p, 0, n) == float(sum(Fraction(x) ** 2 for x in terms[1::2]))
