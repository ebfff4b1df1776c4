"""Exact sums for the anomaly kernels: long fixed-point accumulators (Kulisch) of doubles and
of their squares, read once, correctly rounded.

An accumulator is a run of int64 limbs, limb k worth 2**(30 k - bias), of which `lo..hi` are
in use. Adding or subtracting a double scatters its 53-bit significand over three limbs with
integer additions, exact whatever came before, so a rolling sum takes a new term and gives an
old one back with no error at all: its rounded value is a function of the terms it holds.
`normalize` carries between limbs (each then holds 30 bits, the top one a sign); `rounded` is
the exact value correctly rounded to a double (ties to even), as `math.fsum` gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast

import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from ingest.jit import kernel

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

SAFE_MIN: Final = 2.0**-300
SAFE_MAX: Final = 2.0**300
"""Terms of magnitude in [SAFE_MIN, SAFE_MAX] (or 0) fit the accumulators below, squared too,
and their products with the filter's means never underflow: those sums are exact."""

BITS: Final = 30
MASK: Final = (1 << BITS) - 1
BIAS: Final = 390
"""Bit position of 2**0 in a sum of terms: the lowest bit of SAFE_MIN is at 2**-352."""
LIMBS: Final = 26
"""Limbs of a sum of up to 100,000 terms up to SAFE_MAX (2**317 < 2**(30 * 24 - 390))."""
BIAS2: Final = 2 * BIAS
"""Bit position of 2**0 in a sum of squares, so that the square of a sum lands on its grid."""
LIMBS2: Final = 52
"""Limbs of a sum of squares, or of 100,000 times it less a sum squared."""

_P2: Final = np.array([2.0 ** (BITS * k - BIAS) for k in range(LIMBS)])
_P2SQ: Final = np.array([2.0 ** (BITS * k - BIAS2) for k in range(LIMBS2)])


def _fma_intrinsic(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fma(args[0], args[1], args[2])

    return sig, codegen


_fma = cast(Callable[[float, float, float], float], intrinsic(_fma_intrinsic))
"""a * b + c with one rounding (LLVM's fma: the hardware instruction where there is one)."""


def _bits_intrinsic(typingctx: Any, x: Any) -> Any:
    sig = types.int64(types.float64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


bits = cast(Callable[[float], int], intrinsic(_bits_intrinsic))
"""The IEEE 754 bits of a double, as an int64 (no array on the way)."""


@kernel
def two_product(a: float, b: float) -> Any:
    """(p, e) with p = fl(a * b) and p + e = a * b exactly (no underflow or overflow)."""
    p = a * b
    return p, _fma(a, b, -p)


@kernel
def safe(x: float) -> bool:
    """True if x may go into an exact sum (by `add` if it is not 0): 0, or a magnitude within
    [SAFE_MIN, SAFE_MAX]."""
    m = abs(x)
    return x == 0.0 or (m >= 2.0**-300 and m <= 2.0**300)


@kernel
def clear(rng: I64, r: int) -> None:
    """Mark the accumulator whose range is rng[r], rng[r + 1] empty."""
    rng[r] = 1 << 20
    rng[r + 1] = -1


@kernel
def add(acc: I64, off: int, rng: I64, r: int, x: float, sign: int, bias: int) -> None:
    """acc += sign * x (sign +-1) exactly; x must be a normal double (not 0: see `safe`)."""
    b = bits(x)
    sg = -sign if b < 0 else sign
    m = (b & 0xFFFFFFFFFFFFF) | 0x10000000000000
    pos = ((b >> 52) & 0x7FF) - 1075 + bias
    k = pos // BITS
    s = pos - BITS * k
    low = (m & MASK) << s
    high = (m >> BITS) << s
    acc[off + k] += sg * (low & MASK)
    acc[off + k + 1] += sg * ((low >> BITS) + (high & MASK))
    acc[off + k + 2] += sg * (high >> BITS)
    if k < rng[r]:
        rng[r] = k
    if k + 2 > rng[r + 1]:
        rng[r + 1] = k + 2


@kernel
def add_square(acc: I64, off: int, rng: I64, r: int, x: float, sign: int) -> None:
    """acc (a sum of squares) += sign * x * x, exactly (x safe, not 0)."""
    hi, err = two_product(x, x)
    add(acc, off, rng, r, hi, sign, BIAS2)
    if err != 0.0:
        add(acc, off, rng, r, err, sign, BIAS2)


@kernel
def normalize(acc: I64, off: int, rng: I64, r: int) -> None:
    """Carry so that limbs lo..hi - 1 hold 0 .. 2**30 - 1 and limb hi a sign and less than
    2**30 in magnitude; then trim zero limbs off both ends. The value is unchanged."""
    lo = rng[r]
    hi = rng[r + 1]
    if lo > hi:
        return
    carry = 0
    for k in range(off + lo, off + hi):
        v = acc[k] + carry
        acc[k] = v & MASK
        carry = v >> BITS
    v = acc[off + hi] + carry
    while v >= 1 << BITS or v < -(1 << BITS):
        acc[off + hi] = v & MASK
        v >>= BITS
        hi += 1
    acc[off + hi] = v
    while hi > lo and (acc[off + hi] == 0 or acc[off + hi] == -1):
        if acc[off + hi] == -1:  # fold a top -1 into the limb below, which becomes negative
            acc[off + hi] = 0
            acc[off + hi - 1] -= 1 << BITS
        hi -= 1
    while lo < hi and acc[off + lo] == 0:
        lo += 1
    rng[r] = lo
    rng[r + 1] = hi


@kernel
def rounded_limbs(acc: I64, off: int, lo: int, hi: int, scale: F64, tmp: F64) -> float:
    """The value of normalized limbs lo..hi (worth `scale`) correctly rounded to a double:
    they are non-overlapping partials in increasing magnitude, as `math.fsum` keeps them, so
    its last step applies (summed from the top; a tie decided by the next partial's sign)."""
    n = 0
    for k in range(lo, hi + 1):
        v = acc[off + k]
        if v != 0:
            tmp[n] = float(v) * scale[k]
            n += 1
    if n == 0:
        return 0.0
    j = n - 1
    total = tmp[j]
    err = 0.0
    while j > 0:
        x = total
        j -= 1
        y = tmp[j]
        total = x + y
        err = y - (total - x)
        if err != 0.0:
            break
    if j > 0 and ((err < 0.0 and tmp[j - 1] < 0.0) or (err > 0.0 and tmp[j - 1] > 0.0)):
        y = err * 2.0
        x = total + y
        if y == x - total:
            total = x
    return float(total)


@kernel
def value(acc: I64, off: int, rng: I64, r: int, tmp: F64) -> float:
    """The sum, correctly rounded (normalizes it first)."""
    normalize(acc, off, rng, r)
    return rounded_limbs(acc, off, rng[r], rng[r + 1], _P2, tmp)


@kernel
def spread(
    sq: I64, off: int, rng: I64, r: int, s: I64, soff: int, n: int, t: I64, span: I64, tmp: F64
) -> float:
    """n * sum(x**2) - sum(x)**2 exactly, correctly rounded, from the sum of squares `sq` and
    the sum `s` (ranges at rng[r] and rng[r + 2]) of the same n terms; `t` (LIMBS2 + 8
    limbs), `span` (2) and `tmp` (LIMBS2) are scratch."""
    normalize(sq, off, rng, r)
    normalize(s, soff, rng, r + 2)
    qlo, qhi = rng[r], rng[r + 1]
    slo, shi = rng[r + 2], rng[r + 3]
    lo = min(qlo, 2 * slo)
    hi = max(qhi, 2 * shi) + 2
    if lo > hi:
        return 0.0
    t[lo : hi + 1] = 0
    for k in range(qlo, qhi + 1):
        p = n * sq[off + k]
        t[k] += p & MASK
        t[k + 1] += p >> BITS
    for i in range(slo, shi + 1):
        si = s[soff + i]
        for j in range(slo, shi + 1):
            p = si * s[soff + j]
            t[i + j] -= p & MASK
            t[i + j + 1] -= p >> BITS
    span[0] = lo
    span[1] = hi
    normalize(t, 0, span, 0)
    return rounded_limbs(t, 0, span[0], span[1], _P2SQ, tmp)


@kernel
def value_sq(acc: I64, off: int, rng: I64, r: int, tmp: F64) -> float:
    """A sum of squares, correctly rounded (normalizes it first)."""
    normalize(acc, off, rng, r)
    return rounded_limbs(acc, off, rng[r], rng[r + 1], _P2SQ, tmp)
