"""A window kept as one plain sorted array: replacing one of its values, its median, its median
absolute deviation and a cheap bound under it. The adaptive detector (`auto`) keeps its window
this way, as the spike filter does its windows of up to 256 values (`ingest.anomaly.ranked`).

Where a value leaves and where one arrives are found by counting the values below them over
the whole array, with no branch on the values: a few vector compares for the windows kept this
way, cheaper than a binary search whose every step waits on the one before and is guessed
wrong half the time. The values between then move one slot, in one run of plain copies."""

from __future__ import annotations

from typing import Any

from ingest.anomaly.layout import F64
from ingest.jit import kernel


@kernel
def median(buf: F64, lo: int, w: int) -> float:
    """Median of the sorted buf[lo : lo + w]."""
    h = w // 2
    if w % 2 == 1:
        return float(buf[lo + h])
    return float((buf[lo + h - 1] + buf[lo + h]) / 2.0)


@kernel
def replace(buf: F64, lo: int, n: int, old: float, new: float) -> Any:
    """In the sorted buf[lo : lo + n], replace the first value equal to `old` (at slot lo + p)
    by `new`, which goes to slot lo + q after the values below it and before those equal to
    it above `old` (where walking the gap from p would leave it); the values between move one
    slot towards p. Returns (p, q)."""
    win = buf[lo : lo + n]
    p = 0
    c = 0
    if new > old:
        for t in range(n):
            v = win[t]
            p += v < old
            c += v < new
        q = c - 1  # old, at p, was below new
        run = win[p : q + 1]
        for t in range(q - p):
            run[t] = run[t + 1]
    else:
        for t in range(n):
            v = win[t]
            p += v < old
            c += v <= new
        q = min(c, p)  # old and those equal to it from p on stay above new
        run = win[q : p + 1]
        for t in range(p - q, 0, -1):
            run[t] = run[t - 1]
    win[q] = new
    return p, q


@kernel
def insert(buf: F64, lo: int, n: int, new: float) -> int:
    """Add `new` to the sorted buf[lo : lo + n] (slot lo + n free), after the values equal to
    it; returns its slot from lo."""
    win = buf[lo : lo + n + 1]
    c = 0
    for t in range(n):
        c += win[t] <= new
    run = win[c:]
    for t in range(n - c, 0, -1):
        run[t] = run[t - 1]
    win[c] = new
    return c


@kernel
def bisect(buf: F64, lo: int, hi: int, x: float, right: bool) -> int:
    """First index in the sorted buf[lo:hi] whose value is > x (`right`) or >= x."""
    while lo < hi:
        mid = (lo + hi) // 2
        if buf[mid] < x or (right and buf[mid] == x):
            lo = mid + 1
        else:
            hi = mid
    return lo


@kernel
def _kth_pair(buf: F64, split: int, nl: int, nr: int, med: float, k: int, near: int) -> Any:
    """The k-th and (k-1)-th smallest |x - med| (from 0; -1.0 for none), where buf holds nl
    sorted values below `med` up to index `split` and nr sorted values from `split` on: the
    k-th of two sorted sequences, found by searching how many come from below, from `near`
    on in steps that double until one goes too far, then by bisection.
    """
    lo = max(0, k + 1 - nr)
    hi = min(k + 1, nl)
    i = min(max(near, lo), hi)
    step = 1
    direction = 0  # the way the steps go; 2 once bisecting
    while True:
        j = k + 1 - i  # deviations taken from below med, j from above
        if i > 0 and j < nr and abs(buf[split - i] - med) > abs(buf[split + j] - med):
            hi = i - 1
            if direction == 1:
                direction = 2
            elif direction == 0:
                direction = -1
        elif j > 0 and i < nl and abs(buf[split + j - 1] - med) > abs(buf[split - 1 - i] - med):
            lo = i + 1
            if direction == -1:
                direction = 2
            elif direction == 0:
                direction = 1
        else:
            break
        if direction == 2:
            i = (lo + hi) // 2
        else:
            i = min(max(i + direction * step, lo), hi)
            step *= 2
    below = abs(buf[split - i] - med) if i > 0 else -1.0
    above = abs(buf[split + j - 1] - med) if j > 0 else -1.0
    if below >= above:
        second = abs(buf[split - i + 1] - med) if i > 1 else -1.0
        return below, max(second, above)
    second = abs(buf[split + j - 2] - med) if j > 1 else -1.0
    return above, max(below, second)


@kernel
def bound_at(buf: F64, lo: int, w: int, med: float, i: int) -> float:
    """The bound `mad_bound` starts from, at rank i (0 .. w - c - 2), without moving i: as
    much a bound under the MAD, if lower, and enough for most readings (i where the last
    reading's bound ended), which then need no search."""
    c = (w - 1) // 2
    return float(min(med - buf[lo + i], buf[lo + i + c + 1] - med))


@kernel
def mad_bound(buf: F64, lo: int, w: int, med: float, i: int) -> Any:
    """(b, i): b a value the `mad` of the sorted buf[lo : lo + w] (w >= 2) is never below, med
    its median, from the ranks i and i + c + 1, c = (w - 1) // 2; i is moved first while that
    raises b (start anywhere in 0 .. w - c - 2: the last i found, the next reading).

    At most c values lie strictly between those ranks; every other deviation |x - med| is,
    rounded, at least the smaller of med - x_i and x_(i+c+1) - med (rounding is monotonic),
    so the (c+1)-th smallest deviation, and the MAD, are too. The bound is largest where the
    two meet: for an odd w it is then the MAD itself; the window changing by one value a
    reading, that i moves little from one reading to the next.
    """
    c = (w - 1) // 2
    top = w - c - 2
    a = lo + i
    b = min(med - buf[a], buf[a + c + 1] - med)
    while i < top:
        up = min(med - buf[a + 1], buf[a + c + 2] - med)
        if up <= b:
            break
        b = up
        i += 1
        a += 1
    while i > 0:
        down = min(med - buf[a - 1], buf[a + c] - med)
        if down <= b:
            break
        b = down
        i -= 1
        a -= 1
    return b, i


@kernel
def mad(buf: F64, lo: int, w: int, med: float, near: int) -> float:
    """Median of |buf[q] - med| over the sorted buf[lo : lo + w] (w >= 2), med its median.
    `near` is a rank where `mad_bound` ended (else w // 4): the smallest deviations lie
    around it, so the search for how many of them lie below med starts there."""
    split = lo + w // 2  # buf[split] >= med; values before it are <= med
    if buf[split - 1] >= med:
        split = bisect(buf, lo, split - 1, med, False)
    nl = split - lo
    upper, lower = _kth_pair(buf, split, nl, w - nl, med, w // 2, nl - near - 1)
    if w % 2 == 1:
        return float(upper)
    return float((lower + upper) / 2.0)
