"""Exact sums for the anomaly kernels: a sum kept as floating-point partials (Shewchuk's
non-overlapping expansions, the technique behind `math.fsum`), exact products, and the sum
read once, correctly rounded.

A sum lives in `p[lo : lo + n]`: at most `cap` non-zero, non-overlapping partials in increasing
order of magnitude whose exact (real) sum is the value. Adding or subtracting a double is
exact, so a rolling sum can take a new term and give an old one back with no error at all,
whatever happened before: its rounded value is a function of the terms it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast

import numpy as np
import numpy.typing as npt
from numba.core import types
from numba.extending import intrinsic

from ingest.kernels import kernel

F64 = npt.NDArray[np.float64]

SAFE_MIN: Final = 2.0**-300
SAFE_MAX: Final = 2.0**300
"""Terms whose magnitude lies in [SAFE_MIN, SAFE_MAX] (or that are 0) keep every sum of up to
100,000 of them, every square and every product the drift filter forms, free of overflow and
underflow, so that each is exact and the partials number at most CAP - 4 after `_renorm`."""

CAP: Final = 32
"""Room for the partials of one sum."""


def _fma_intrinsic(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fma(args[0], args[1], args[2])

    return sig, codegen


_fma = cast(Callable[[float, float, float], float], intrinsic(_fma_intrinsic))
"""a * b + c with one rounding (LLVM's fma: the hardware instruction where there is one)."""


@kernel
def two_product(a: float, b: float) -> Any:
    """(p, e) with p = fl(a * b) and p + e = a * b exactly (no underflow or overflow)."""
    p = a * b
    return p, _fma(a, b, -p)


@kernel
def safe(x: float) -> bool:
    """True if x may go into an exact sum: 0, or a magnitude within [SAFE_MIN, SAFE_MAX]."""
    m = abs(x)
    return x == 0.0 or (m >= 2.0**-300 and m <= 2.0**300)


@kernel
def _raw_add(p: F64, lo: int, n: int, x: float) -> int:
    """Add x to the sum in p[lo : lo + n] (Shewchuk's grow-expansion with zeros dropped,
    as `math.fsum` does); returns the new count, at most n + 1."""
    i = lo
    for j in range(lo, lo + n):
        y = p[j]
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        err = y - (hi - x)
        if err != 0.0:
            p[i] = err
            i += 1
        x = hi
    if x != 0.0:
        p[i] = x
        i += 1
    return i - lo


@kernel
def rounded(p: F64, lo: int, n: int) -> float:
    """The sum in p[lo : lo + n] correctly rounded to a double (half to even), as the last
    step of `math.fsum`."""
    if n == 0:
        return 0.0
    j = lo + n - 1
    hi = p[j]
    err = 0.0
    while j > lo:
        x = hi
        j -= 1
        y = p[j]
        hi = x + y
        err = y - (hi - x)
        if err != 0.0:
            break
    if j > lo and ((err < 0.0 and p[j - 1] < 0.0) or (err > 0.0 and p[j - 1] > 0.0)):
        y = err * 2.0
        x = hi + y
        if y == x - hi:
            hi = x
    return float(hi)


@kernel
def _renorm(p: F64, lo: int, n: int) -> int:
    """Rewrite the sum in p[lo : lo + n] as t0 = round(sum), t1 = round(sum - t0), ...: each
    term at most half an ulp of the one before, so their number is bounded by the span of the
    sum's bits over 53 (for terms within SAFE_MIN..SAFE_MAX: at most 27). Returns the count."""
    tops = np.empty(48, np.float64)  # 2,098 bits of doubles over 53, and then some
    k = 0
    while n > 0:
        t = rounded(p, lo, n)
        tops[k] = t
        k += 1
        n = _raw_add(p, lo, n, -t)
    for q in range(k):
        p[lo + q] = tops[k - 1 - q]
    return k


@kernel
def _compress(p: F64, lo: int, n: int) -> int:
    """Shewchuk's Compress, in place: the same sum in as few non-overlapping partials as two
    linear passes find (usually as few as its bits need). Returns the count."""
    hi = lo + n - 1
    q_sum = p[hi]
    bottom = hi
    for i in range(hi - 1, lo - 1, -1):
        a = q_sum
        q_sum = a + p[i]
        err = p[i] - (q_sum - a)
        if err != 0.0:
            p[bottom] = q_sum
            bottom -= 1
            q_sum = err
    p[bottom] = q_sum
    top = lo
    for i in range(bottom + 1, hi + 1):
        a = p[i]
        s = a + q_sum
        err = q_sum - (s - a)
        q_sum = s
        if err != 0.0:
            p[top] = err
            top += 1
    if q_sum != 0.0:
        p[top] = q_sum
        top += 1
    return top - lo


COMPRESS_AT: Final = 4
"""A sum whose partials reach this count is compressed before the next addition."""


@kernel
def add(p: F64, lo: int, n: int, x: float) -> int:
    """Add x exactly to the sum in p[lo : lo + n] (room for CAP); returns the new count."""
    if n >= COMPRESS_AT:
        n = _compress(p, lo, n)
        if n >= CAP - 1:
            n = _renorm(p, lo, n)
    return _raw_add(p, lo, n, x)


@kernel
def add_square(p: F64, lo: int, n: int, x: float, sign: float) -> int:
    """Add sign * x * x (sign +-1.0) exactly to the sum in p[lo : lo + n]."""
    hi, err = two_product(x, x)
    n = add(p, lo, n, sign * hi)
    if err != 0.0:
        n = add(p, lo, n, sign * err)
    return n
