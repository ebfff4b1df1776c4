"""Reading a sensor's history ring: the anomaly filters' readings that leave their windows."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ingest.jit import kernel

F64 = npt.NDArray[np.float64]


@kernel
def ring_at(
    pool: F64, po: int, r0: int, h: int, hcap: int, seen: int, ext: F64, e0: int, a: int
) -> float:
    """Finite reading a (counted from the sensor's first): from this flush's accepted values
    ext[e0:] if a >= seen, else from the ring of the last h = min(seen, hcap), whose oldest
    is at pool[po + r0]."""
    if a >= seen:
        return float(ext[e0 + a - seen])
    q = r0 + a - seen + h
    if q >= hcap:
        q -= hcap
    return float(pool[po + q])


@kernel
def ring_window(
    win: F64,
    pool: F64,
    po: int,
    r0: int,
    h: int,
    hcap: int,
    seen: int,
    ext: F64,
    e0: int,
    lo: int,
    n: int,
) -> None:
    """Readings lo .. lo + n - 1 into win[:n]."""
    for q in range(n):
        win[q] = ring_at(pool, po, r0, h, hcap, seen, ext, e0, lo + q)
