"""What one pass of the anomaly filters produced: its events, and the state it leaves each
sensor in, waiting for the flush's transaction to commit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.anomaly.layout import E_OPEN, E_START, F64, I64, KINDS, NO_TIME, S_LAST, S_SEEN
from ingest.anomaly.params import describe
from ingest.anomaly.rules import AnomalyRule

if TYPE_CHECKING:
    from ingest.anomaly.detector import AnomalyDetector

__all__ = ["Base", "Event", "EventColumns", "Outcome", "Pending"]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One anomaly event, upserted by the key (sensor, kind, start).

    `start` is the time of the first offending reading (flatline: of the first reading of the
    unchanged run), `end` that of the last offending reading, None while the condition goes on.
    `score` is the maximum over the event and `value` the value at which it was reached (drift:
    the rolling mean); `detail` describes that worst reading.
    """

    sensor: int
    kind: str
    start: int
    end: int | None
    value: float
    score: float
    detail: str


class EventColumns(NamedTuple):
    """Events as columns, one row per event (as `Event` has them; `end` None while open)."""

    start: list[int]
    sensor: list[int]
    kind: list[str]
    end: list[int | None]
    value: list[float]
    score: list[float]
    detail: list[str]


class Outcome(NamedTuple):
    """Per sensor of a processed flush (ids ascending), the state it leaves: the newest reading
    taken in (`NO_TIME`: none yet), the earliest start of its open events (`NO_TIME`: none),
    how many readings it took in, and the history its state is rebuilt from (the last
    `need_readings` readings, and those within `need_span_us` of the newest)."""

    sensor: npt.NDArray[np.int32]
    last: I64
    open_since: I64
    accepted: I64
    need_readings: I64
    need_span_us: I64


class Base(NamedTuple):
    """Per sensor, its committed state as far as a restore or a replay needs: the newest reading
    taken in, the earliest start of its open events, the start of its unchanged run (each
    `NO_TIME` if none; an event the next readings touch starts at one of those or later; the
    unchanged run is also the auto detector's offending run not yet an event), the history a
    restore reads (as in `Outcome`), and `gap`: an ended event of kind auto is still open
    until its `gap`-th reading after its end (1 for the other kinds)."""

    last: I64
    open_since: I64
    run_start: I64
    gap: I64
    need_readings: I64
    need_span_us: I64


class Pending:
    """The outcome of one `AnomalyDetector.process` call, not yet applied to the detector.

    `events` are the upserts for the database (one per event touched by the flush), as the
    kernels left them in arrays (`count` of them): `columns` gives them as the upsert's
    columns, `events` as `Event` objects, each built only when first asked for. `late`
    counts the finite readings ignored as late (time not after the sensor's last one).
    """

    __slots__ = (
        "_before",
        "_columns",
        "_ev_f",
        "_ev_i",
        "_events",
        "_need",
        "_owner",
        "_rules",
        "_seg",
        "_state",
        "_versions",
        "late",
        "sensors",
    )

    def __init__(
        self,
        *,
        owner: AnomalyDetector,
        seg: I64,
        versions: I64,
        state: tuple[Any, ...],
        sensors: npt.NDArray[np.int32],
        before: I64,
        need: I64,
        ev_i: I64,
        ev_f: F64,
        rules: Mapping[int, AnomalyRule],
        late: int,
    ) -> None:
        self._owner = owner
        self._seg = seg
        self._versions = versions
        self._state = state
        self._before = before
        self._need = need
        self.sensors = sensors
        """The sensors processed (those with a rule), one per state slot in `_seg`."""
        self._ev_i = ev_i
        """Per event: sensor, kind (index in `KINDS`), start, end (`NO_TIME`: still open)."""
        self._ev_f = ev_f
        """Per event: value, score."""
        self._rules = rules
        """The rule of each sensor with an event, as it was when processed."""
        self._columns: EventColumns | None = None
        self._events: tuple[Event, ...] | None = None
        self.late = late

    @property
    def count(self) -> int:
        """How many events (upserts) the flush wrote."""
        return int(self._ev_i.shape[0])

    def columns(self) -> EventColumns:
        """The events as the columns of their upsert."""
        if self._columns is None:
            ev_i, ev_f, rules = self._ev_i, self._ev_f, self._rules
            sensor = ev_i[:, 0].tolist()
            kind = ev_i[:, 1].tolist()
            end = ev_i[:, 3]
            value = ev_f[:, 0].tolist()
            score = ev_f[:, 1].tolist()
            ends: list[int | None] = end.tolist()
            if bool((end == NO_TIME).any()):
                ends = [None if e == NO_TIME else e for e in ends]
            self._columns = EventColumns(
                start=ev_i[:, 2].tolist(),
                sensor=sensor,
                kind=[KINDS[k] for k in kind],
                end=ends,
                value=value,
                score=score,
                detail=[
                    describe(k, v, sc, rules[s])
                    for s, k, v, sc in zip(sensor, kind, value, score, strict=True)
                ],
            )
        return self._columns

    @property
    def events(self) -> tuple[Event, ...]:
        """The events as `Event` objects, in the kernels' order."""
        if self._events is None:
            c = self.columns()
            self._events = tuple(
                Event(sensor=s, kind=k, start=t, end=e, value=v, score=sc, detail=d)
                for t, s, k, e, v, sc, d in zip(*c, strict=True)
            )
        return self._events

    def outcome(self) -> Outcome:
        """The state each processed sensor is left in once this is committed."""
        xsi, xei = self._state[0], self._state[2]
        is_open = xei[:, :, E_OPEN] == 1
        starts = np.where(is_open, xei[:, :, E_START], np.iinfo(np.int64).max)
        since = starts.min(axis=1) if len(starts) else np.empty(0, np.int64)
        since = np.where(is_open.any(axis=1), since, NO_TIME)
        return Outcome(
            sensor=self.sensors,
            last=xsi[:, S_LAST].copy(),
            open_since=since,
            accepted=xsi[:, S_SEEN] - self._before,
            need_readings=self._need[:, 0].copy(),
            need_span_us=self._need[:, 1].copy(),
        )
