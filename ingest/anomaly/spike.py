"""The spike (Hampel) filter's verdicts on a sensor's readings of a flush, from its window in
rank order: a plain sorted array up to `ranked.SMALL` values (`ingest.anomaly.sorted_window`),
blocks of rings over that (`ingest.anomaly.ranked`). Each has its own loop, calling its
window's kernels directly: a call through the other's, or a loop serving both, costs more than
the cheaper readings do."""

from __future__ import annotations

import math
from typing import Any

from ingest.anomaly import ranked
from ingest.anomaly import sorted_window as plain
from ingest.anomaly.layout import F64, I64, MAD_SCALE
from ingest.anomaly.window import ring_at
from ingest.jit import kernel


@kernel
def _offends(dev: float, sigma: float, k: float, floor: float) -> Any:
    """(offends, score) of a reading dev from the median, sigma the window's scaled MAD."""
    if sigma < floor:
        sigma = floor
    return dev > k * sigma, dev / sigma if sigma > 0.0 else math.inf


@kernel
def _plain(ring: Any, na: int, win: F64, o: int, w: int, rule: Any, out: Any, when: I64) -> None:
    pool, po, r0, h, hcap, seen, ext, e0 = ring
    k, floor = rule
    off, score, val, start = out
    hint = w // 4  # where the bound under the MAD is looked for (`plain.mad_bound`)
    for i in range(na):
        a = seen + i
        x = ext[e0 + i]
        off[i] = False
        if a < w:
            plain.insert(win, o, a, x)
            continue
        med = plain.median(win, o, w)
        dev = abs(x - med)
        if dev > k * max(MAD_SCALE * plain.bound_at(win, o, w, med, hint), floor):
            low, hint = plain.mad_bound(win, o, w, med, hint)
            if dev > k * max(MAD_SCALE * low, floor):
                sigma = MAD_SCALE * plain.mad(win, o, w, med, hint)
                off[i], score[i] = _offends(dev, sigma, k, floor)
                val[i] = x
                start[i] = when[i]
        old = ring_at(pool, po, r0, h, hcap, seen, ext, e0, a - w)
        plain.replace(win, o, w, old, x)


@kernel
def _blocks(
    ring: Any, na: int, win: F64, o: int, so: int, lb: int, w: int, rule: Any, out: Any, when: I64
) -> None:
    pool, po, r0, h, hcap, seen, ext, e0 = ring
    k, floor = rule
    off, score, val, start = out
    for i in range(na):
        a = seen + i
        x = ext[e0 + i]
        off[i] = False
        if a < w:
            ranked.insert(win, o, so, lb, a, x)
            continue
        med = ranked.median(win, o, so, lb, w)
        dev = abs(x - med)
        if dev > k * floor:
            low = ranked.mad_bound(win, o, so, lb, w, med, 0)[0]
            if dev > k * max(MAD_SCALE * low, floor):
                sigma = MAD_SCALE * ranked.mad(win, o, so, lb, w, med)
                off[i], score[i] = _offends(dev, sigma, k, floor)
                val[i] = x
                start[i] = when[i]
        old = ring_at(pool, po, r0, h, hcap, seen, ext, e0, a - w)
        ranked.replace(win, o, so, lb, w, old, x)


@kernel
def spike_verdicts(
    ring: tuple[F64, int, int, int, int, int, F64, int],
    na: int,
    win: F64,
    o: int,
    w: int,
    rule: tuple[float, float],
    verdicts: Any,
    when: I64,
) -> None:
    """Spike verdicts on a sensor's na accepted readings, its window of w values at win[o:]
    (as `ranked.shape(w)` lays it out) advanced past them. `ring` is (pool, po, r0, h, hcap,
    seen, ext, e0) as `ring_at` takes them; `rule` is (k, floor). Writes whether each reading
    offends, and its score, value and start where it is not surely quiet.

    m = median, s = max(1.4826 MAD, floor): x offends if |x - m| > k s. s is at least the
    floor and at least what two ranks bound the MAD by, so a reading within k of those of the
    median needs no MAD: the same verdict (rounding is monotonic), and its score is never read.
    """
    lb, nb, _ = ranked.shape(w)
    if nb == 1:
        _plain(ring, na, win, o, w, rule, verdicts, when)
    else:
        _blocks(ring, na, win, o, o + (nb << lb), lb, w, rule, verdicts, when)
