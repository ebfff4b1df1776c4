"""The pure parts of a flush's asset scoring (`ingest.asset.sync` does the database's): events
from the kernel's rows, a device's state in its model's layout, many devices advanced in one
kernel call, and where a re-scoring may start."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ingest.anomaly.pending import Event
from ingest.asset import kernel as k
from ingest.asset.model import run_many
from ingest.asset.rules import AssetRule
from ingest.db import asset_state as db

__all__ = ["advance", "describe", "event_of", "quiet_point", "settled", "state", "state_row"]


def describe(model: db.Model, ev_i: npt.NDArray[np.int64], ev_f: npt.NDArray[np.float64]) -> str:
    """An event's detail: T² and Q against their limits at its worst, and the sensors that
    contributed most there, with their shares."""
    m = model.model
    most = ", ".join(
        f"{m.sensors[int(j)]} {100 * float(share):.0f}%"
        for j, share in zip(ev_i[3 : 3 + k.TOP], ev_f[3 : 3 + k.TOP], strict=True)
        if j >= 0
    )
    return (
        f"T² {float(ev_f[1]):.4g} (limit {m.t2_limit:.4g}), Q {float(ev_f[2]):.4g} "
        f"(limit {m.q_limit:.4g}); most: {most}"
    )


def event_of(model: db.Model, ev_i: npt.NDArray[np.int64], ev_f: npt.NDArray[np.float64]) -> Event:
    end = int(ev_i[1])
    return Event(
        sensor=model.anchor_id,
        kind="asset",
        start=int(ev_i[0]),
        end=None if end == k.NO_TIME else end,
        value=float(ev_f[1]),
        score=float(ev_f[0]),
        detail=describe(model, ev_i, ev_f),
    )


def advance(
    devices: list[tuple[db.Locked, db.Model, AssetRule]],
    bounds: npt.NDArray[np.int64],
    index: npt.NDArray[np.int32],
    time: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
) -> tuple[list[dict[str, object]], list[Event], int]:
    """Advance devices whose readings all come after their newest scored timestamp, in one
    kernel call: device j's readings are [bounds[j], bounds[j + 1]) of the model indices,
    times and values (in time order). Returns their new state rows, their events and how many
    timestamps they took in."""
    states = [state(row, model) for row, model, _ in devices]
    ints = np.concatenate([i for i, _ in states])
    floats = np.concatenate([f for _, f in states])
    spans = np.array([(r.hold_us, r.gap_us, r.min_us) for _, _, r in devices], np.int64)
    taken, ev_dev, ev_i, ev_f = run_many(
        [model.model for _, model, _ in devices], spans, bounds, index, time, value, ints, floats
    )
    events = [event_of(devices[j][1], ev_i[e], ev_f[e]) for e, j in enumerate(ev_dev.tolist())]
    all_ints, all_floats = ints.tolist(), floats.tolist()
    rows = []
    at_i = at_f = 0
    for (row, model, _), (i, f) in zip(devices, states, strict=True):
        rows.append(
            state_row(row, model, all_ints[at_i : at_i + len(i)], all_floats[at_f : at_f + len(f)])
        )
        at_i += len(i)
        at_f += len(f)
    return rows, events, int(taken.sum())


def state_row(
    row: db.Locked, model: db.Model, ints: list[int], floats: list[float]
) -> dict[str, object]:
    """A device's new state row, as `UPDATE_SQL` takes it."""
    return {
        "device_id": row.device_id,
        "model": model.version,
        "last": None if ints[k.I_LAST] == k.NO_TIME else ints[k.I_LAST],
        "sensors": model.sensor_ids.tolist(),
        "ints": ints,
        "floats": floats,
    }


def settled(
    index: npt.NDArray[np.int32],
    times: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    settle_us: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Of time-ordered readings (as `_stored` gives them), those up to `settle_us` before the
    newest."""
    if not len(times):
        return index, times, values
    end = int(np.searchsorted(times, int(times[-1]) - settle_us, side="right"))
    return index[:end], times[:end], values[:end]


def quiet_point(
    ts: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float64],
    *,
    lo: int,
    before: int,
    gap_us: int,
) -> int | None:
    """The latest timestamp q in [lo, before) that was scored, did not offend, and has no
    offending timestamp in [q - gap_us, q); None if there is none."""
    offending = np.flatnonzero(scores > 1.0)
    off_times = ts[offending]
    candidates = np.flatnonzero((ts >= lo) & (ts < before) & (scores <= 1.0))
    for i in candidates[::-1].tolist():
        q = int(ts[i])
        at = np.searchsorted(off_times, q - gap_us)
        if at >= len(off_times) or off_times[at] >= q:
            return q
    return None


def state(row: db.Locked, model: db.Model) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """A locked state in the model's layout: a refit with other sensors keeps the open run
    and the carried values of the sensors it kept."""
    if len(row.ints) and row.sensors.tobytes() == model.sensor_ids.tobytes():
        return row.ints, row.floats  # the locked row's own arrays: this flush's to advance
    ints, floats = k.fresh_state(len(model.sensor_ids))
    if not len(row.ints):
        return ints, floats
    ints[: k.I_X] = row.ints[: k.I_X]
    floats[: k.F_X] = row.floats[: k.F_X]
    ints[k.I_TOP : k.I_TOP + k.TOP] = -1  # indices into the old sensors
    for j, sid in enumerate(model.sensor_ids.tolist()):
        at = np.flatnonzero(row.sensors == sid)
        if len(at):
            ints[k.I_X + j] = row.ints[k.I_X + int(at[0])]
            floats[k.F_X + j] = row.floats[k.F_X + int(at[0])]
    return ints, floats
