"""The alert state machine: pending -> open -> resolved, with flapping damped, in data time.

A pure function of the alert's stored state, the anomaly events of its condition and the data
time up to which the device's readings are committed (the horizon). It never reads a clock,
so whichever instance evaluates an alert, and however often, the same changes come out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ingest.alerts.rules import rank

Phase = Literal["inactive", "pending", "open", "resolved"]
ChangeKind = Literal["opened", "updated", "flapping", "resolved"]


@dataclass(frozen=True, slots=True)
class Timing:
    """An alert rule's delays and flapping limits, in µs of data time."""

    on_delay: int = 0
    off_delay: int = 0
    flap_count: int = 0
    flap_window: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One anomaly event of the condition: active on [start, end); end None while ongoing."""

    start: int
    end: int | None
    severity: str
    sensor: str


@dataclass(slots=True)
class AlertState:
    """What the database stores of one alert (times in µs of data time)."""

    phase: Phase = "inactive"
    flapping: bool = False
    severity: str = "info"
    since: int | None = None
    clear_since: int | None = None
    opened_at: int | None = None
    resolved_at: int | None = None
    opens: list[int] = field(default_factory=list)
    flap_since: int | None = None
    cursor: int | None = None
    sensors: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        """The state shown in alerts_v: inactive, pending, open, flapping or resolved."""
        return "flapping" if self.flapping else self.phase

    def copy(self) -> AlertState:
        return dataclasses.replace(self, opens=list(self.opens))


@dataclass(frozen=True, slots=True)
class Change:
    """A notification: what changed, at which data time, and the alert right after."""

    kind: ChangeKind
    at: int
    state: AlertState


def advance(
    state: AlertState,
    events: Sequence[Event],
    *,
    horizon: int,
    timing: Timing,
    inhibitions: Sequence[tuple[int, int | None]] = (),
    silenced: bool = False,
) -> tuple[AlertState, list[Change]]:
    """Run the alert from its cursor to `horizon`; return its new state and the notifications.

    - pending: the condition (any event active) began; opens once it has lasted `on_delay`,
      but not while inhibited: inside one of `inhibitions` ([start, end) in data time, end
      None while ongoing; it then opens when that ends) or `silenced` (the device is silent
      now: tried again at the next evaluation);
    - open: resolves once the condition has been absent for `off_delay`; a severity change
      while open is an `updated` notification;
    - flapping: the `flap_count`-th opening within `flap_window` sends one `flapping`
      notification, then nothing until one `flap_window` passes without an opening or a
      resolve; it then settles with `updated` (still open) or `resolved`.
    """
    st = state.copy()
    out: list[Change] = []
    start = st.cursor if st.cursor is not None else min((e.start for e in events), default=None)
    if start is None or horizon < start:
        return st, out

    def inhibited(t: int) -> bool:
        return silenced or any(a <= t and (b is None or b > t) for a, b in inhibitions)

    def notify(kind: ChangeKind, at: int) -> None:
        out.append(Change(kind, at, st.copy()))

    def open_(t: int, severity: str) -> None:
        st.phase, st.opened_at, st.resolved_at, st.severity = "open", t, None, severity
        st.opens = [o for o in st.opens if o > t - timing.flap_window] + [t]
        if st.flapping:
            st.flap_since = t
        elif timing.flap_count and len(st.opens) >= timing.flap_count:
            st.flapping, st.flap_since = True, t
            notify("flapping", t)
        else:
            notify("opened", t)

    def resolve(t: int) -> None:
        st.phase, st.resolved_at, st.clear_since, st.since = "resolved", t, None, None
        if st.flapping:
            st.flap_since = t
        else:
            notify("resolved", t)

    def step(t: int) -> None:
        active = [e for e in events if e.start <= t and (e.end is None or e.end > t)]
        if active:
            severity = max((e.severity for e in active), key=rank)
            sensors = {e.sensor for e in active}
            st.clear_since = None
            if st.phase in ("inactive", "resolved"):
                st.phase, st.since, st.sensors = "pending", t, ()
            st.sensors = tuple(sorted(set(st.sensors) | sensors))
            if st.phase == "pending":
                assert st.since is not None
                if t - st.since >= timing.on_delay and not inhibited(t):
                    open_(t, severity)
            elif st.phase == "open" and severity != st.severity:
                st.severity = severity
                if not st.flapping:
                    notify("updated", t)
        elif st.phase == "pending":
            st.phase = "inactive" if st.opened_at is None else "resolved"
            st.since = None
        elif st.phase == "open":
            if st.clear_since is None:
                st.clear_since = t
            if t - st.clear_since >= timing.off_delay:
                resolve(t)
        if st.flapping and st.flap_since is not None and t - st.flap_since >= timing.flap_window:
            st.flapping, st.flap_since, st.opens = False, None, []
            notify("updated" if st.phase == "open" else "resolved", t)

    t = start
    step(t)
    while True:
        candidates = [e.start for e in events if e.start > t]
        candidates += [e.end for e in events if e.end is not None and e.end > t]
        if st.phase == "pending" and st.since is not None:
            candidates.append(st.since + timing.on_delay)
            if st.since + timing.on_delay <= t:  # held back: try again when an inhibition ends
                candidates += [b for a, b in inhibitions if b is not None and a <= t < b]
        if st.phase == "open" and st.clear_since is not None:
            candidates.append(st.clear_since + timing.off_delay)
        if st.flapping and st.flap_since is not None:
            candidates.append(st.flap_since + timing.flap_window)
        later = [c for c in candidates if t < c <= horizon]
        if not later:
            break
        t = min(later)
        step(t)
    st.cursor = max(horizon, st.cursor or horizon)
    return st, out
