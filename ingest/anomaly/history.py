"""Reading a sensor's past back for `ingest.anomaly.sync`: the history a state is restored from
(read again further back while it comes up short), and where a late flush's replay may start.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest.db import anomaly_state as rows_db

__all__ = ["Window", "read_histories", "replay_starts"]

_GROWTH = 4  # a history read that came up short looks this many times further back


@dataclass(frozen=True, slots=True)
class Window:
    """A history read: a sensor's newest `limit` finite readings in [lo, hi) (all if None), of
    which it needs `need`, and all within `span` of the newest; none is older than `floor`;
    `mine` are the flush's own readings in range, which do not count."""

    sensor: int
    lo: int
    hi: int
    limit: int | None
    need: int
    span: int
    floor: int
    mine: npt.NDArray[np.int64]


async def read_histories(
    conn: asyncpg.Connection, wanted: dict[int, Window]
) -> dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """Each wanted window read, and read again further back while it came up short."""
    out: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]] = {}
    while wanted:
        todo = list(wanted)
        got = await rows_db.history(
            conn,
            sensor_ids=[wanted[j].sensor for j in todo],
            lo=[wanted[j].lo for j in todo],
            hi=[wanted[j].hi for j in todo],
            n=[wanted[j].limit for j in todo],
        )
        for j in todo:
            window = wanted.pop(j)
            times, values = got[window.sensor]
            if len(window.mine):
                keep = ~np.isin(times, window.mine)
                times, values = times[keep], values[keep]
            enough = len(times) >= window.need and (
                not window.span or (len(times) > 0 and window.lo <= int(times[-1]) - window.span)
            )
            if enough or window.lo <= window.floor:
                out[j] = (times, values)
            else:
                lo = max(window.floor, window.hi - _GROWTH * (window.hi - window.lo))
                wanted[j] = dataclasses.replace(window, lo=lo)
    return out


async def replay_starts(
    conn: asyncpg.Connection,
    *,
    sensor_ids: Sequence[int],
    earliest: Sequence[int],
    oldest: Sequence[int],
    gaps: Sequence[int],
) -> list[int | None]:
    """For each sensor, where the replay of a flush whose oldest reading is `oldest` starts: the
    latest x at or before it such that none of the sensor's events is open just before x, or
    None if that lies before `earliest`.

    An event is open just before x if it started before x and the first reading after its end
    (if it has ended; of kind auto, the sensor's `gaps`-th) is at x or later: the state there
    holds its running worst score, which the stored event (its worst over its whole length)
    does not tell, so the replay must start
    before it. Readings before `earliest` are not looked at: an event that ended before then
    with no reading after it counts as open (its sensor is then not replayed)."""
    if not sensor_ids:
        return []
    found = await rows_db.event_candidates(conn, sensor_ids=sensor_ids, w=earliest, p=oldest)
    index = {s: j for j, s in enumerate(sensor_ids)}
    ended = [k for k, c in enumerate(found) if c.end is not None]
    nexts = await rows_db.next_readings(
        conn,
        sensor_ids=[found[k].sensor for k in ended],
        after=[max(found[k].end or 0, earliest[index[found[k].sensor]] - 1) for k in ended],
        before=[oldest[index[found[k].sensor]] for k in ended],
        nth=[gaps[index[found[k].sensor]] if found[k].kind == "auto" else 1 for k in ended],
    )
    follows: list[int | None] = [None] * len(found)
    for k, n in zip(ended, nexts, strict=True):
        follows[k] = n
    by_sensor: dict[int, list[tuple[rows_db.Candidate, int | None]]] = defaultdict(list)
    for c, n in zip(found, follows, strict=True):
        by_sensor[index[c.sensor]].append((c, n))
    out: list[int | None] = []
    for j in range(len(sensor_ids)):
        x = oldest[j]
        while x >= earliest[j]:
            spanning = [
                c.start
                for c, n in by_sensor[j]
                if c.start < x and (c.end is None or n is None or n >= x)
            ]
            if not spanning:
                break
            x = min(spanning)
        out.append(x if x >= earliest[j] else None)
    return out
