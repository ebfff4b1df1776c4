"""The spike filter's window, kept in rank order: the value of any rank is read in constant
time, and a reading replaces another in O(sqrt(W)) moves.

The W values are cut, in rank order, into blocks of B = 2**lb slots (B about 4 sqrt(W); one
block up to `SMALL` values): block k holds ranks kB .. kB + B - 1, the last block the rest.
Each block is a ring: its first rank is at slot `start[k]`, so one value leaves a block's
front or back, or enters it, without moving the others. A value replacing another moves at
most B values inside each of the two blocks involved, in at most two runs of plain copies
each (no compare per value), and one value across each block between them. The searches
(where `old` is, where `new` goes) are binary, with no branch on the values.

An area of a sensor's pool, from `lo`: nb * B values, then nb ring starts from `so` = lo +
nb * B (small integers, held as floats). `shape(w)` gives lb, nb and the area's length.
"""

from __future__ import annotations

from typing import Any, Final

from ingest.anomaly import sorted_window as plain
from ingest.anomaly.layout import F64
from ingest.jit import kernel

SMALL: Final = 256
"""Windows up to this many values are one block whose ring never turns (its start stays 0): a
plain sorted array (`ingest.anomaly.sorted_window` replaces its values), where finding both
places by counting and moving the values between in one run costs less than crossing blocks."""


@kernel
def shape(w: int) -> Any:
    """(lb, nb, size) of a window of w values: block size 2**lb, block count, area length."""
    if w <= 0:
        return 0, 0, 0
    lb = 2
    if w <= SMALL:
        while (1 << lb) < w:
            lb += 1
    while (1 << (2 * lb)) < (4 if w <= SMALL else 16) * w:  # B >= 2 sqrt(w), over SMALL 4 sqrt(w)
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
        plain.insert(buf, lo, n, x)
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
def _down(buf: F64, base: int, m: int, ps: int, n: int) -> None:
    """The n values from slot base + ps on, around the ring of slots base .. base + m, each
    move one slot down: in at most two runs of plain copies."""
    if n <= 0:
        return
    if ps == 0:
        buf[base + m] = buf[base]
        ps = 1
        n -= 1
    first = min(n, m + 1 - ps)
    run = buf[base + ps - 1 : base + ps + first]
    for t in range(first):
        run[t] = run[t + 1]
    rest = n - first
    if rest > 0:
        buf[base + m] = buf[base]
        run = buf[base : base + rest]
        for t in range(rest - 1):
            run[t] = run[t + 1]


@kernel
def _up(buf: F64, base: int, m: int, ps: int, n: int, x: float) -> None:
    """x enters slot base + ps, and the n values from there on, around the ring of slots
    base .. base + m, each move one slot up (over the slot after them)."""
    first = min(n + 1, m + 1 - ps)
    run = buf[base + ps : base + ps + first]
    for t in range(first):
        y = run[t]
        run[t] = x
        x = y
    rest = n + 1 - first
    if rest > 0:
        run = buf[base : base + rest]
        for t in range(rest):
            y = run[t]
            run[t] = x
            x = y


@kernel
def _below(buf: F64, base: int, m: int, s: int, n: int, x: float) -> int:
    """How many of the n sorted values from slot base + s on, around the ring of slots
    base .. base + m, are < x; no branch on the values."""
    b = 0
    while n > 1:
        half = n >> 1
        b = b + half if buf[base + ((s + b + half - 1) & m)] < x else b
        n -= half
    return b + 1 if n == 1 and buf[base + ((s + b) & m)] < x else b


@kernel
def _first(buf: F64, lo: int, so: int, lb: int, k: int) -> float:
    return float(buf[lo + (k << lb) + (int(buf[so + k]) & ((1 << lb) - 1))])


@kernel
def _rank_of(buf: F64, lo: int, so: int, lb: int, w: int, x: float) -> int:
    """First rank whose value is >= x (w if none): the last block whose first value is < x
    (else the first block), then the place in it, with no branch on the values."""
    nb = (w + (1 << lb) - 1) >> lb
    k = 0
    n = nb
    while n > 1:
        half = n >> 1
        k = k + half if _first(buf, lo, so, lb, k + half) < x else k
        n -= half
    m = (1 << lb) - 1
    return (k << lb) + _below(buf, lo + (k << lb), m, int(buf[so + k]), _length(lb, k, w), x)


@kernel
def replace(buf: F64, lo: int, so: int, lb: int, w: int, old: float, new: float) -> None:
    """In a full window (w values), replace one value equal to `old` by `new`.

    The gap `old` leaves moves towards `new`'s place: inside a block by moving the values
    between in one or two runs of copies, and past a whole block by handing one value over
    its edge (each block's first to the block before, or each block's last to the block
    after), then inside new's block.
    """
    m = (1 << lb) - 1
    nb = (w + m) >> lb
    if nb == 1:
        plain.replace(buf, lo, w, old, new)
        return
    p = _rank_of(buf, lo, so, lb, w, old)  # the value of rank p is `old`
    c = p >> lb
    g = p & m
    base = lo + (c << lb)
    s = int(buf[so + c]) & m
    if new >= old:
        if c == nb - 1 or new <= _first(buf, lo, so, lb, c + 1):  # new stays in block c
            n = _below(buf, base, m, (s + g + 1) & m, _length(lb, c, w) - 1 - g, new)
            _down(buf, base, m, (s + g + 1) & m, n)
            buf[base + ((s + g + n) & m)] = new
            return
        _down(buf, base, m, (s + g + 1) & m, m - g)  # the gap to the end of block c
        k = c + 1
        while True:  # block k's first fills the gap at the end of block k - 1
            prev = lo + ((k - 1) << lb)
            base = lo + (k << lb)
            s = int(buf[so + k]) & m
            buf[prev + ((int(buf[so + k - 1]) + m) & m)] = buf[base + s]
            if k == nb - 1 or new <= _first(buf, lo, so, lb, k + 1):
                break
            buf[so + k] = (s + 1) & m  # its first slot is now its last: the gap
            k += 1
        n = _below(buf, base, m, (s + 1) & m, _length(lb, k, w) - 1, new)
        _down(buf, base, m, (s + 1) & m, n)
        buf[base + ((s + n) & m)] = new
        return
    if c == 0 or new >= buf[lo + ((c - 1) << lb) + ((int(buf[so + c - 1]) + m) & m)]:
        n = _below(buf, base, m, s, g, new)  # new stays in block c
        _up(buf, base, m, (s + n) & m, g - n, new)
        return
    k = c - 1
    prev = lo + (k << lb)
    _up(buf, base, m, s, g, buf[prev + ((int(buf[so + k]) + m) & m)])
    while k > 0:  # block k's last fills the gap at the front of block k + 1
        last = buf[lo + ((k - 1) << lb) + ((int(buf[so + k - 1]) + m) & m)]
        if new >= last:
            break
        base = lo + (k << lb)
        s = (int(buf[so + k]) - 1) & m  # its last slot is now its first: the gap
        buf[so + k] = s
        buf[base + s] = last
        k -= 1
    base = lo + (k << lb)
    s = int(buf[so + k]) & m
    n = _below(buf, base, m, s, m, new)
    _up(buf, base, m, (s + n) & m, m - n, new)


@kernel
def median(buf: F64, lo: int, so: int, lb: int, w: int) -> float:
    """Median of a full window (the mean of the middle two of an even count)."""
    h = w // 2
    if w % 2 == 1:
        return at(buf, lo, so, lb, h)
    return float((at(buf, lo, so, lb, h - 1) + at(buf, lo, so, lb, h)) / 2.0)


@kernel
def mad_bound(buf: F64, lo: int, so: int, lb: int, w: int, med: float, i: int) -> Any:
    """(b, i): a value b the window's `mad` is never below, from the ranks i and i + c + 1 as
    `ingest.anomaly.sorted_window.mad_bound` has them (c = (w - 1) // 2). One block: i moves
    from where it is given while that raises b. Over many blocks (where each rank read waits
    on its block's ring start) the two ranks are those around the median, and i is returned
    as given."""
    if so - lo == 1 << lb:  # one block
        return plain.mad_bound(buf, lo, w, med, i)
    c = (w - 1) // 2
    r = (w - c - 2) // 2
    return min(med - at(buf, lo, so, lb, r), at(buf, lo, so, lb, r + c + 1) - med), i


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
