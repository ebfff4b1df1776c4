"""Turning one filter's verdicts into anomaly events: opened, extended, closed, written as
upsert rows (sensor, kind, start, end) and (value, score)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ingest.anomaly.layout import E_LAST, E_OPEN, E_SCORE, E_START, E_VALUE, F64, I64, NO_TIME
from ingest.jit import kernel


@kernel
def _grow(ev_i: I64, ev_f: F64) -> Any:
    cap = ev_i.shape[0] * 2
    new_i = np.empty((cap, 4), np.int64)
    new_f = np.empty((cap, 2), np.float64)
    new_i[: ev_i.shape[0]] = ev_i
    new_f[: ev_f.shape[0]] = ev_f
    return new_i, new_f


@kernel
def _emit(
    ev_i: I64, ev_f: F64, m: int, sid: int, kind: int, start: int, end: int, v: float, sc: float
) -> None:
    """Row m of the event upserts: (sensor, kind, start, end or NO_TIME) and (value, score)."""
    ev_i[m, 0] = sid
    ev_i[m, 1] = kind
    ev_i[m, 2] = start
    ev_i[m, 3] = end
    ev_f[m, 0] = v
    ev_f[m, 1] = sc


@kernel
def _track(
    kind: int,
    sid: int,
    i: int,
    n: int,
    verdicts: Any,
    when: I64,
    oi: I64,
    of: F64,
    ev_i: I64,
    ev_f: F64,
    m: int,
    touched: bool,
) -> Any:
    """Turn one filter's verdicts on readings i..n-1 (at times `when`) into events.

    `verdicts` holds the (offending, score, value, start) columns; `oi`/`of` are the open-event
    state of this sensor and kind, updated in place. Appends an upsert to ev_i/ev_f for every
    event that ends, and at the end for the event left open if an offending reading touched
    it. Stops early, returning where, when ev_i is full (arrays are never reassigned in the
    loop: that would cost a reference count per reading). Returns (i, m, touched).
    """
    off, score, value, start = verdicts
    is_open = oi[E_OPEN] == 1
    ev_start = oi[E_START]
    ev_last = oi[E_LAST]
    ev_value = of[E_VALUE]
    ev_score = of[E_SCORE]
    room = ev_i.shape[0] - 1  # the last row is kept for the event left open
    while i < n:
        if off[i]:
            if not is_open:
                is_open = True
                ev_start = start[i]
                ev_value = value[i]
                ev_score = score[i]
            elif score[i] > ev_score:
                ev_value = value[i]
                ev_score = score[i]
            ev_last = when[i]
            touched = True
        elif is_open:
            if m >= room:
                break
            _emit(ev_i, ev_f, m, sid, kind, ev_start, ev_last, ev_value, ev_score)
            m += 1
            is_open = False
        i += 1
    if i == n and touched and is_open:
        _emit(ev_i, ev_f, m, sid, kind, ev_start, NO_TIME, ev_value, ev_score)
        m += 1
    oi[E_OPEN] = 1 if is_open else 0
    oi[E_START] = ev_start
    oi[E_LAST] = ev_last
    of[E_VALUE] = ev_value
    of[E_SCORE] = ev_score
    return i, m, touched


@kernel
def events(
    kind: int,
    sid: int,
    n: int,
    verdicts: Any,
    when: I64,
    oi: I64,
    of: F64,
    ev_i: I64,
    ev_f: F64,
    m: int,
) -> Any:
    """`_track` over all n readings, growing the event arrays as needed: (ev_i, ev_f, m).
    With no event open and no offending reading, nothing changes."""
    off = verdicts[0]
    if oi[E_OPEN] == 0:
        hits = 0
        for q in range(n):  # counted with no branch: a few vector adds
            hits += off[q]
        if hits == 0:
            return ev_i, ev_f, m
    i = 0
    touched = False
    while True:
        if m >= ev_i.shape[0] - 1:
            ev_i, ev_f = _grow(ev_i, ev_f)
        i, m, touched = _track(kind, sid, i, n, verdicts, when, oi, of, ev_i, ev_f, m, touched)
        if i == n:
            return ev_i, ev_f, m


@kernel
def gated_events(
    kind: int,
    sid: int,
    n: int,
    verdicts: Any,
    when: I64,
    oi: I64,
    of: F64,
    run: I64,
    worst: F64,
    gate: Any,
    ev_i: I64,
    ev_f: F64,
    m: int,
) -> Any:
    """Events from verdicts on readings 0..n-1 that must last and may pause: `gate` is (M, G).

    An event opens once M consecutive readings offend and starts at the first of them; it ends
    at its last offending reading once G consecutive readings have not. `run` holds the
    offending run's length, its first reading's time and the quiet readings since the open
    event last offended (at `ri`, `ri + 1`, `ri + 2` of `gate`'s third item); `worst` the
    run's worst value and score (at `gate`'s fourth item). Returns (ev_i, ev_f, m).
    """
    off, score, value, _ = verdicts
    min_run, gap, ri, wi = gate
    need = m + n // gap + 2
    if need > ev_i.shape[0]:
        new_i = np.empty((max(need, 2 * ev_i.shape[0]), 4), np.int64)
        new_f = np.empty((new_i.shape[0], 2), np.float64)
        new_i[:m] = ev_i[:m]
        new_f[:m] = ev_f[:m]
        ev_i, ev_f = new_i, new_f
    is_open = oi[E_OPEN] == 1
    touched = False
    count = run[ri]
    quiet = run[ri + 2]
    for i in range(n):
        if off[i]:
            if count == 0 or score[i] > worst[wi + 1]:
                worst[wi] = value[i]
                worst[wi + 1] = score[i]
            if count == 0:
                run[ri + 1] = when[i]
            count += 1
            quiet = 0
            if is_open:
                if score[i] > of[E_SCORE]:
                    of[E_VALUE] = value[i]
                    of[E_SCORE] = score[i]
                oi[E_LAST] = when[i]
                touched = True
            elif count >= min_run:
                is_open = True
                oi[E_START] = run[ri + 1]
                oi[E_LAST] = when[i]
                of[E_VALUE] = worst[wi]
                of[E_SCORE] = worst[wi + 1]
                touched = True
        else:
            count = 0
            if is_open:
                quiet += 1
                if quiet >= gap:
                    _emit(
                        ev_i, ev_f, m, sid, kind, oi[E_START], oi[E_LAST], of[E_VALUE], of[E_SCORE]
                    )
                    m += 1
                    is_open = False
                    touched = False
                    quiet = 0
    if touched and is_open:
        _emit(ev_i, ev_f, m, sid, kind, oi[E_START], NO_TIME, of[E_VALUE], of[E_SCORE])
        m += 1
    oi[E_OPEN] = 1 if is_open else 0
    run[ri] = count
    run[ri + 2] = quiet
    return ev_i, ev_f, m
