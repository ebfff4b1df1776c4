"""A window kept as one plain sorted array: its median, its median absolute deviation, and
finding a value's place. The adaptive detector (`auto`) keeps its window this way and walks a
replaced value to its place itself, tracking the window's resolution as it goes."""

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
def _kth_pair(buf: F64, split: int, nl: int, nr: int, med: float, k: int) -> Any:
    """The k-th and (k-1)-th smallest |x - med| (from 0; -1.0 for none), where buf holds nl
    sorted values below `med` up to index `split` and nr sorted values from `split` on: the
    k-th of two sorted sequences, found by bisecting how many come from below.
    """
    lo = max(0, k + 1 - nr)
    hi = min(k + 1, nl)
    while True:
        i = (lo + hi) // 2  # deviations taken from below med, j from above
        j = k + 1 - i
        if i > 0 and j < nr and abs(buf[split - i] - med) > abs(buf[split + j] - med):
            hi = i - 1
        elif j > 0 and i < nl and abs(buf[split + j - 1] - med) > abs(buf[split - 1 - i] - med):
            lo = i + 1
        else:
            break
    below = abs(buf[split - i] - med) if i > 0 else -1.0
    above = abs(buf[split + j - 1] - med) if j > 0 else -1.0
    if below >= above:
        second = abs(buf[split - i + 1] - med) if i > 1 else -1.0
        return below, max(second, above)
    second = abs(buf[split + j - 2] - med) if j > 1 else -1.0
    return above, max(below, second)


@kernel
def mad(buf: F64, lo: int, w: int, med: float) -> float:
    """Median of |buf[q] - med| over the sorted buf[lo : lo + w] (w >= 2), med its median."""
    split = lo + w // 2  # buf[split] >= med; values before it are <= med
    if buf[split - 1] >= med:
        split = bisect(buf, lo, split - 1, med, False)
    nl = split - lo
    upper, lower = _kth_pair(buf, split, nl, w - nl, med, w // 2)
    if w % 2 == 1:
        return float(upper)
    return float((lower + upper) / 2.0)
