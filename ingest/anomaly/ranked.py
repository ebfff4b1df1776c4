"""The spike filter's window, kept in rank order: the value of any rank is read in constant
time, and a reading replaces another in O(sqrt(W)) moves.

The W values are cut, in rank order, into blocks of B = 2**lb slots (B about 2 sqrt(W); one
block up to `SMALL` values): block k holds ranks kB .. kB + B - 1, the last block the rest.
Each block is a ring: its first rank is at slot `start[k]`, so one value leaves a block's
front or back, or enters it, without moving the others. A value replacing another moves at
most B values inside each of the two blocks involved, and one value across each block between
them.

An area of a sensor's pool, from `lo`: nb * B values, then nb ring starts from `so` = lo +
nb * B (small integers, held as floats). `shape(w)` gives lb, nb and the area's length.
"""

from __future__ import annotations

from typing import Any, Final

from ingest.anomaly.layout import F64
from ingest.jit import kernel

SMALL: Final = 256
"""Windows up to this many values are one block whose ring never turns (its start stays 0): a
plain sorted array, where walking the values costs less than finding and crossing blocks."""


@kernel
def shape(w: int) -> Any:
    """(lb, nb, size) of a window of w values: block size 2**lb, block count, area length."""
    if w <= 0:
        return 0, 0, 0
    lb = 2
    if w <= SMALL:
        while (1 << lb) < w:
            lb += 1
    while (1 << (2 * lb)) < 4 * w:  # B >= 2 sqrt(w)
        lb += 1
    nb = (w + (1 << lb) - 1) >> lb
    return lb, nb, (nb << lb) + nb


@kernel
def size(w: int) -> int:
    """Pool elements of the area of a window of w values (0 for none)."""
    return int(shape(w)[2])


@kernel
def at(buf: F64, lo: int, so: int, lb: int, r: int) -> float:
    """The value of rank r (from 0)."""
    k = r >> lb
    return float(buf[lo + (k << lb) + ((int(buf[so + k]) + r) & ((1 << lb) - 1))])


@kernel
def bisect(buf: F64, lo: int, so: int, lb: int, a: int, b: int, x: float, right: bool) -> int:
    """First rank in a..b - 1 whose value is > x (`right`) or >= x; b if none."""
    while a < b:
        mid = (a + b) // 2
        v = at(buf, lo, so, lb, mid)
        if v < x or (right and v == x):
            a = mid + 1
        else:
            b = mid
    return a


@kernel
def _plain_bisect(buf: F64, lo: int, a: int, b: int, x: float, right: bool) -> int:
    """`bisect` in a window of one block (ranks are slots from lo)."""
    while a < b:
        mid = (a + b) // 2
        if buf[lo + mid] < x or (right and buf[lo + mid] == x):
            a = mid + 1
        else:
            b = mid
    return a


@kernel
def clear(buf: F64, lo: int, w: int) -> None:
    """Every ring starts at its first slot: the area's first values are then in rank order."""
    lb, nb, _ = shape(w)
    buf[lo + (nb << lb) : lo + (nb << lb) + nb] = 0.0


# -- one block, a ring of B slots holding n values (local ranks 0 .. n - 1) ------------------


@kernel
def _slot(buf: F64, lo: int, so: int, lb: int, k: int, i: int) -> int:
    return int(lo + (k << lb) + ((int(buf[so + k]) + i) & ((1 << lb) - 1)))


@kernel
def _push_front(buf: F64, lo: int, so: int, lb: int, k: int, x: float) -> None:
    s = so + k
    buf[s] = (int(buf[s]) - 1) & ((1 << lb) - 1)
    buf[lo + (k << lb) + int(buf[s])] = x


@kernel
def _pop_front(buf: F64, lo: int, so: int, lb: int, k: int) -> float:
    s = so + k
    x = buf[lo + (k << lb) + int(buf[s])]
    buf[s] = (int(buf[s]) + 1) & ((1 << lb) - 1)
    return float(x)


@kernel
def _shift(buf: F64, base: int, top: int, q: int, steps: int, step: int) -> int:
    """`steps` times, slot q takes the value of its neighbour q + step in the ring of slots
    base..top, which becomes q; returns the last q (the gap). Slots, not ranks: a mask per
    value read would cost several times the move."""
    for _ in range(steps):
        r = q + step
        if r > top:
            r = base
        elif r < base:
            r = top
        buf[q] = buf[r]
        q = r
    return q


@kernel
def _remove(buf: F64, lo: int, so: int, lb: int, k: int, n: int, i: int) -> None:
    """Remove local rank i, moving the shorter side of the block."""
    base = lo + (k << lb)
    q = _slot(buf, lo, so, lb, k, i)
    if i < n - 1 - i:
        _shift(buf, base, base + (1 << lb) - 1, q, i, -1)
        buf[so + k] = (int(buf[so + k]) + 1) & ((1 << lb) - 1)
    else:
        _shift(buf, base, base + (1 << lb) - 1, q, n - 1 - i, 1)


@kernel
def _insert(buf: F64, lo: int, so: int, lb: int, k: int, n: int, i: int, x: float) -> None:
    """Insert x at local rank i (n < B), moving the shorter side of the block."""
    base = lo + (k << lb)
    if i < n - i:
        buf[so + k] = (int(buf[so + k]) - 1) & ((1 << lb) - 1)
        q = _shift(buf, base, base + (1 << lb) - 1, _slot(buf, lo, so, lb, k, 0), i, 1)
    else:
        q = _shift(buf, base, base + (1 << lb) - 1, _slot(buf, lo, so, lb, k, n), n - i, -1)
    buf[q] = x


# -- the window --------------------------------------------------------------------------------


@kernel
def _length(lb: int, k: int, n: int) -> int:
    """Values in block k of a window holding n."""
    return max(0, min(1 << lb, n - (k << lb)))


@kernel
def insert(buf: F64, lo: int, so: int, lb: int, n: int, x: float) -> None:
    """Add x to a window holding n < w values."""
    if so - lo == 1 << lb:  # one block
        q = _plain_bisect(buf, lo, 0, n, x, True)
        for r in range(lo + n, lo + q, -1):
            buf[r] = buf[r - 1]
        buf[lo + q] = x
        return
    m = (1 << lb) - 1
    q = bisect(buf, lo, so, lb, 0, n, x, True)
    b = q >> lb
    z = n >> lb  # the block with room
    if b == z:
        _insert(buf, lo, so, lb, z, n & m, q & m, x)
        return
    carry = buf[_slot(buf, lo, so, lb, b, m)]  # block b is full: its last moves on
    _insert(buf, lo, so, lb, b, m, q & m, x)
    for k in range(b + 1, z):
        last = buf[_slot(buf, lo, so, lb, k, m)]
        _push_front(buf, lo, so, lb, k, carry)
        carry = last
    _push_front(buf, lo, so, lb, z, carry)


@kernel
def _lower_bound(buf: F64, lo: int, so: int, lb: int, w: int, x: float) -> int:
    """First rank of w whose value is >= x (w if none), with no branch on the values."""
    base = 0
    n = w
    while n > 1:
        half = n >> 1
        base = base + half if at(buf, lo, so, lb, base + half) < x else base
        n -= half
    return base + 1 if at(buf, lo, so, lb, base) < x else base


@kernel
def replace(buf: F64, lo: int, so: int, lb: int, w: int, old: float, new: float) -> None:
    """In a full window (w values), replace one value equal to `old` by `new`.

    The gap `old` leaves walks towards `new`'s place: inside a block value by value, and past
    a whole block by handing one value over its edge (each block's first to the block before,
    or each block's last to the block after), then value by value in new's block.
    """
    m = (1 << lb) - 1
    nb = (w + m) >> lb
    if nb == 1:
        q = lo + _plain_bisect(buf, lo, 0, w, old, False)
        if new > old:
            while q + 1 < lo + w and buf[q + 1] < new:
                buf[q] = buf[q + 1]
                q += 1
        else:
            while q > lo and buf[q - 1] > new:
                buf[q] = buf[q - 1]
                q -= 1
        buf[q] = new
        return
    p = _lower_bound(buf, lo, so, lb, w, old)  # the value of rank p is `old`
    c = p >> lb
    g = p & m
    if new >= old:
        if c < nb - 1 and new > at(buf, lo, so, lb, (c + 1) << lb):
            _remove(buf, lo, so, lb, c, m + 1, g)
            k = c + 1
            while True:
                buf[_slot(buf, lo, so, lb, k - 1, m)] = _pop_front(buf, lo, so, lb, k)
                if k == nb - 1 or new <= at(buf, lo, so, lb, (k + 1) << lb):
                    break
                k += 1
            c = k
            buf[so + c] = (int(buf[so + c]) - 1) & m  # the gap is at local 0 of block c
            g = 0
        base = lo + (c << lb)
        top = base + m
        q = _slot(buf, lo, so, lb, c, g)
        for _ in range(_length(lb, c, w) - 1 - g):
            r = q + 1 if q < top else base
            nxt = buf[r]
            if nxt >= new:
                break
            buf[q] = nxt
            q = r
    else:
        if c > 0 and new < at(buf, lo, so, lb, (c << lb) - 1):
            _remove(buf, lo, so, lb, c, _length(lb, c, w), g)
            k = c - 1
            while True:
                _push_front(buf, lo, so, lb, k + 1, buf[_slot(buf, lo, so, lb, k, m)])
                if k == 0 or new >= at(buf, lo, so, lb, (k << lb) - 1):
                    break
                k -= 1
            c = k
            g = m  # the gap is at the end of block c
        base = lo + (c << lb)
        top = base + m
        q = _slot(buf, lo, so, lb, c, g)
        for _ in range(g):
            r = q - 1 if q > base else top
            prv = buf[r]
            if prv <= new:
                break
            buf[q] = prv
            q = r
    buf[q] = new


@kernel
def median(buf: F64, lo: int, so: int, lb: int, w: int) -> float:
    """Median of a full window (the mean of the middle two of an even count)."""
    h = w // 2
    if w % 2 == 1:
        return at(buf, lo, so, lb, h)
    return float((at(buf, lo, so, lb, h - 1) + at(buf, lo, so, lb, h)) / 2.0)


@kernel
def mad_floor(buf: F64, lo: int, so: int, lb: int, w: int, med: float) -> float:
    """A value the window's `mad` is never below, in two reads.

    At most (w - 1) // 2 values lie strictly between the ranks i and j below, and med lies
    between their values; every other deviation |x - med| is, rounded, at least the smaller of
    med - x_i and x_j - med (rounding is monotonic), so the median deviation (the mean of the
    middle two, for an even w) is too.
    """
    c = (w - 1) // 2
    i = (w - c - 2) // 2
    j = i + c + 1
    return min(med - at(buf, lo, so, lb, i), at(buf, lo, so, lb, j) - med)


@kernel
def _dev(buf: F64, lo: int, so: int, lb: int, r: int, med: float) -> float:
    return abs(at(buf, lo, so, lb, r) - med)


@kernel
def _kth_pair(
    buf: F64, lo: int, so: int, lb: int, split: int, nl: int, nr: int, med: float, k: int
) -> Any:
    """The k-th and (k-1)-th smallest |x - med| (from 0; -1.0 for none), where the nl values
    of rank < split are <= med and the nr from `split` on are >= med: the k-th of two sorted
    sequences, found by bisecting how many come from below.
    """
    lo_i = max(0, k + 1 - nr)
    hi_i = min(k + 1, nl)
    while True:
        i = (lo_i + hi_i) // 2  # deviations taken from below med, j from above
        j = k + 1 - i
        if (
            i > 0
            and j < nr
            and _dev(buf, lo, so, lb, split - i, med) > _dev(buf, lo, so, lb, split + j, med)
        ):
            hi_i = i - 1
        elif (
            j > 0
            and i < nl
            and _dev(buf, lo, so, lb, split + j - 1, med)
            > _dev(buf, lo, so, lb, split - 1 - i, med)
        ):
            lo_i = i + 1
        else:
            break
    below = _dev(buf, lo, so, lb, split - i, med) if i > 0 else -1.0
    above = _dev(buf, lo, so, lb, split + j - 1, med) if j > 0 else -1.0
    if below >= above:
        second = _dev(buf, lo, so, lb, split - i + 1, med) if i > 1 else -1.0
        return below, max(second, above)
    second = _dev(buf, lo, so, lb, split + j - 2, med) if j > 1 else -1.0
    return above, max(below, second)


@kernel
def mad(buf: F64, lo: int, so: int, lb: int, w: int, med: float) -> float:
    """Median of |x - med| over a full window (w >= 2), med its median: the deviations below
    and above med are two sorted sequences, merged by bisection in O(log w) reads."""
    split = w // 2  # the value of rank split is >= med; those before it are <= med
    if at(buf, lo, so, lb, split - 1) >= med:
        split = bisect(buf, lo, so, lb, 0, split - 1, med, False)
    upper, lower = _kth_pair(buf, lo, so, lb, split, split, w - split, med, w // 2)
    if w % 2 == 1:
        return float(upper)
    return float((lower + upper) / 2.0)
