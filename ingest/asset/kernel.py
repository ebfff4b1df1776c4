"""The asset-health kernel: a device's readings scored against its PCA model (Hotelling's T² and
the residual Q) at each of its timestamps, and the runs of offending timestamps made events.

State per device, in two flat arrays (`ingest.asset.sync` keeps them in the database):

- ints: `I_LAST` the newest timestamp taken in; the open run: `I_FIRST` its first offending
  timestamp (`NO_TIME`: no run), `I_OFF` its last, `I_QUAL` 1 once it lasted the minimum
  duration (an event), `I_WORST_T` the time of its worst score, `I_TOP`.. the three sensors
  that contributed most there (-1: none); from `I_X` on, the time of each sensor's carried
  value (`NO_TIME`: none yet).
- floats: `F_WORST` the run's worst score, `F_T2` and `F_Q` there, `F_SHARE`.. the three
  sensors' shares of it; from `F_X` on, each sensor's carried value (0 where it has none).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.jit import kernel

__all__ = [
    "F_Q",
    "F_SHARE",
    "F_T2",
    "F_WORST",
    "F_X",
    "I_FIRST",
    "I_LAST",
    "I_OFF",
    "I_QUAL",
    "I_TOP",
    "I_WORST_T",
    "I_X",
    "NO_TIME",
    "TOP",
    "advance",
    "fresh_state",
]

NO_TIME: Final = -(2**63)
TOP: Final = 3
I_LAST, I_FIRST, I_OFF, I_QUAL, I_WORST_T, I_TOP = 0, 1, 2, 3, 4, 5
I_X: Final = I_TOP + TOP
F_WORST, F_T2, F_Q, F_SHARE = 0, 1, 2, 3
F_X: Final = F_SHARE + TOP


def fresh_state(d: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The state of a device with `d` model sensors that has seen nothing."""
    ints = np.full(I_X + d, NO_TIME, np.int64)
    ints[I_QUAL] = 0
    ints[I_TOP : I_TOP + TOP] = -1
    return ints, np.zeros(F_X + d, np.float64)


I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@kernel
def _contributions(
    z: F64, loadings: F64, inv_eig: F64, t2_limit: float, q_limit: float, out: F64
) -> None:
    """Each sensor's part of the score at the standardized vector z: its squared residual
    r_j² / q_limit (r = z - P P'z) plus, where positive, its part of T², z_j (P diag(1/lambda)
    P'z)_j / t2_limit. Never negative: a sensor pulled below the others' pattern counts as much
    as one pushed above it."""
    d, k = loadings.shape
    a = np.zeros(k)
    for c in range(k):
        s = 0.0
        for j in range(d):
            s += loadings[j, c] * z[j]
        a[c] = s
    for j in range(d):
        proj = 0.0
        t2 = 0.0
        for c in range(k):
            proj += loadings[j, c] * a[c]
            t2 += loadings[j, c] * a[c] * inv_eig[c]
        r = z[j] - proj
        out[j] = r * r / q_limit + max(z[j] * t2, 0.0) / t2_limit


@kernel
def _advance_into(
    sensor: npt.NDArray[np.int32],
    time: I64,
    value: F64,
    mean: F64,
    inv_scale: F64,
    loadings: F64,
    inv_eig: F64,
    t2_limit: float,
    q_limit: float,
    hold_us: int,
    gap_us: int,
    min_us: int,
    ints: I64,
    floats: F64,
    times: I64,
    scores: F64,
    ev_i: I64,
    ev_f: F64,
    n_ev: int,
) -> tuple[int, int]:
    """`advance`, writing the times and scores from `times[0]` and the events from
    `ev_i[n_ev]` on (room for one more than the readings); returns (times written, n_ev)."""
    n = time.shape[0]
    d, k = loadings.shape
    n_ts = 0
    z = np.empty(d)
    contrib = np.empty(d)
    touched = False
    i = 0
    while i < n:
        t = time[i]
        while i < n and time[i] == t:
            v = value[i]
            if np.isfinite(v):
                j = sensor[i]
                floats[F_X + j] = v
                ints[I_X + j] = t
            i += 1
        ints[I_LAST] = t
        times[n_ts] = t
        scores[n_ts] = np.nan
        n_ts += 1
        valid = True
        for j in range(d):
            xt = ints[I_X + j]
            if xt == NO_TIME or t - xt > hold_us:
                valid = False
                break
        if not valid:
            continue
        zz = 0.0
        for j in range(d):
            z[j] = (floats[F_X + j] - mean[j]) * inv_scale[j]
            zz += z[j] * z[j]
        t2 = 0.0
        pp = 0.0
        for c in range(k):
            s = 0.0
            for j in range(d):
                s += loadings[j, c] * z[j]
            pp += s * s
            t2 += s * s * inv_eig[c]
        q = max(zz - pp, 0.0)
        score = max(t2 / t2_limit, q / q_limit)
        scores[n_ts - 1] = score
        if score <= 1.0:
            # A run whose last offending timestamp is more than the gap behind is over.
            if ints[I_FIRST] != NO_TIME and t - ints[I_OFF] > gap_us:
                if ints[I_QUAL] == 1:
                    ev_i[n_ev, 0] = ints[I_FIRST]
                    ev_i[n_ev, 1] = ints[I_OFF]
                    ev_i[n_ev, 2] = ints[I_WORST_T]
                    ev_f[n_ev, 0] = floats[F_WORST]
                    ev_f[n_ev, 1] = floats[F_T2]
                    ev_f[n_ev, 2] = floats[F_Q]
                    for c in range(TOP):
                        ev_i[n_ev, 3 + c] = ints[I_TOP + c]
                        ev_f[n_ev, 3 + c] = floats[F_SHARE + c]
                    n_ev += 1
                ints[I_FIRST] = NO_TIME
                ints[I_OFF] = NO_TIME
                ints[I_QUAL] = 0
                touched = False
            continue
        if ints[I_FIRST] == NO_TIME:
            ints[I_FIRST] = t
            floats[F_WORST] = -1.0
        ints[I_OFF] = t
        if score > floats[F_WORST]:
            floats[F_WORST] = score
            floats[F_T2] = t2
            floats[F_Q] = q
            ints[I_WORST_T] = t
            _contributions(z, loadings, inv_eig, t2_limit, q_limit, contrib)
            positive = 0.0
            for j in range(d):
                positive += contrib[j]
            for c in range(TOP):
                best = -1
                for j in range(d):
                    if contrib[j] > 0 and (best < 0 or contrib[j] > contrib[best]):
                        taken = False
                        for e in range(c):
                            if ints[I_TOP + e] == j:
                                taken = True
                        if not taken:
                            best = j
                ints[I_TOP + c] = best
                floats[F_SHARE + c] = contrib[best] / positive if best >= 0 else 0.0
        if ints[I_QUAL] == 0 and t - ints[I_FIRST] >= min_us:
            ints[I_QUAL] = 1
        if ints[I_QUAL] == 1:
            touched = True
    if touched and ints[I_FIRST] != NO_TIME and ints[I_QUAL] == 1:
        ev_i[n_ev, 0] = ints[I_FIRST]
        ev_i[n_ev, 1] = NO_TIME
        ev_i[n_ev, 2] = ints[I_WORST_T]
        ev_f[n_ev, 0] = floats[F_WORST]
        ev_f[n_ev, 1] = floats[F_T2]
        ev_f[n_ev, 2] = floats[F_Q]
        for c in range(TOP):
            ev_i[n_ev, 3 + c] = ints[I_TOP + c]
            ev_f[n_ev, 3 + c] = floats[F_SHARE + c]
        n_ev += 1
    return n_ts, n_ev


@kernel
def advance(
    sensor: npt.NDArray[np.int32],
    time: I64,
    value: F64,
    mean: F64,
    inv_scale: F64,
    loadings: F64,
    inv_eig: F64,
    t2_limit: float,
    q_limit: float,
    hold_us: int,
    gap_us: int,
    min_us: int,
    ints: I64,
    floats: F64,
) -> tuple[I64, F64, I64, F64]:
    """Take in one device's readings (model sensor index, time, value; sorted by time), newer
    than `ints[I_LAST]`, advancing the state in place.

    At each distinct time the readings there replace their sensors' carried values; the
    timestamp is scored when every sensor has a value at most `hold_us` old: z = (x - mean) *
    inv_scale, T² = sum (P'z)_c² / lambda_c, Q = |z|² - |P'z|², score = max(T² / t2_limit,
    Q / q_limit); it offends when score > 1. Offending timestamps form a run until a scored
    timestamp that does not offend lies more than `gap_us` after the run's last offending one:
    that closes it. A run that has lasted `min_us` (last minus first offending time) is an
    event.

    Returns (times, scores): every distinct time taken in, with its score (NaN: not scored);
    and (ev_i, ev_f): per event touched, [start, end (NO_TIME: open), worst time, top sensors]
    and [worst score, T², Q, top shares].
    """
    n = time.shape[0]
    times = np.empty(n, np.int64)
    scores = np.empty(n, np.float64)
    ev_i = np.empty((n + 1, 3 + TOP), np.int64)
    ev_f = np.empty((n + 1, 3 + TOP), np.float64)
    n_ts, n_ev = _advance_into(
        sensor,
        time,
        value,
        mean,
        inv_scale,
        loadings,
        inv_eig,
        t2_limit,
        q_limit,
        hold_us,
        gap_us,
        min_us,
        ints,
        floats,
        times,
        scores,
        ev_i,
        ev_f,
        0,
    )
    return times[:n_ts], scores[:n_ts], ev_i[:n_ev], ev_f[:n_ev]


@kernel
def advance_many(
    bounds: I64,
    sensor: npt.NDArray[np.int32],
    time: I64,
    value: F64,
    dims: I64,
    mean: F64,
    inv_scale: F64,
    loadings: F64,
    inv_eig: F64,
    limits: F64,
    spans: I64,
    ints: I64,
    floats: F64,
) -> tuple[I64, I64, I64, F64]:
    """`advance` for many devices at once: device j's readings are [bounds[j], bounds[j+1]),
    its model sensors d = dims[j, 0] and components k = dims[j, 1]; its mean, 1 / scale and
    1 / eigenvalues, its loadings (d x k, C order) and its state follow the devices before it
    in `mean`, `inv_scale`, `inv_eig`, `loadings`, `ints` and `floats` (the state advances in
    place). `limits[j]` is its (T² limit, Q limit), `spans[j]` its (hold, gap, min) in µs.

    Returns the number of distinct times each device took in, and its events: the device of
    each, then ev_i and ev_f as `advance` gives them.
    """
    m = dims.shape[0]
    n = time.shape[0]
    taken = np.zeros(m, np.int64)
    times = np.empty(n, np.int64)
    scores = np.empty(n, np.float64)
    ev_i = np.empty((n + m, 3 + TOP), np.int64)
    ev_f = np.empty((n + m, 3 + TOP), np.float64)
    ev_dev = np.empty(n + m, np.int64)
    n_ev = 0
    at_m = 0  # offsets of device j's model vectors, loadings, components and state
    at_l = 0
    at_k = 0
    at_s = 0
    for j in range(m):
        d = dims[j, 0]
        k = dims[j, 1]
        lo = bounds[j]
        hi = bounds[j + 1]
        first = n_ev
        taken[j], n_ev = _advance_into(
            sensor[lo:hi],
            time[lo:hi],
            value[lo:hi],
            mean[at_m : at_m + d],
            inv_scale[at_m : at_m + d],
            loadings[at_l : at_l + d * k].reshape((d, k)),
            inv_eig[at_k : at_k + k],
            limits[j, 0],
            limits[j, 1],
            spans[j, 0],
            spans[j, 1],
            spans[j, 2],
            ints[at_s + j * I_X : at_s + j * I_X + I_X + d],
            floats[at_s + j * F_X : at_s + j * F_X + F_X + d],
            times,
            scores,
            ev_i,
            ev_f,
            n_ev,
        )
        ev_dev[first:n_ev] = j
        at_m += d
        at_l += d * k
        at_k += k
        at_s += d
    return taken, ev_dev[:n_ev], ev_i[:n_ev], ev_f[:n_ev]
