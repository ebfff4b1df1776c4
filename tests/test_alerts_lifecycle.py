"""The alert state machine alone: exact notifications for on-delay, off-delay, flapping,
severity changes and inhibition, however the evaluation is cut."""

from __future__ import annotations

import pytest

from ingest.alerts.lifecycle import AlertState, Event, Timing, advance

S = 1_000_000


def ev(start: float, end: float | None, severity: str = "warning", sensor: str = "temp") -> Event:
    return Event(int(start * S), None if end is None else int(end * S), severity, sensor)


def run(
    events: list[Event], horizons: list[float], timing: Timing, **kw: object
) -> tuple[AlertState, list[tuple[str, float, str]]]:
    """Evaluate at each horizon in turn (as repeated passes would); every notification."""
    st = AlertState()
    out: list[tuple[str, float, str]] = []
    for h in horizons:
        st, changes = advance(st, events, horizon=int(h * S), timing=timing, **kw)  # type: ignore[arg-type]
        out += [(c.kind, c.at / S, c.state.severity) for c in changes]
    return st, out


ON5_OFF3 = Timing(on_delay=5 * S, off_delay=3 * S)


@pytest.mark.parametrize("horizons", [[100], [12, 16, 30, 100], [float(h) for h in range(0, 101)]])
def test_on_delay_and_off_delay_give_one_open_and_one_resolve(horizons: list[float]) -> None:
    # Condition 10-20 with a gap of 1 s at 20-21 (shorter than the off-delay): one alert,
    # opened 5 s after it began, resolved 3 s after it finally ended at 30.
    events = [ev(10, 20), ev(21, 30)]
    st, out = run(events, horizons, ON5_OFF3)
    assert out == [("opened", 15, "warning"), ("resolved", 33, "warning")]
    assert st.state == "resolved"


def test_shorter_than_the_on_delay_never_opens() -> None:
    st, out = run([ev(10, 14), ev(20, 24.9)], [5, 12, 50], ON5_OFF3)
    assert out == []
    assert st.state == "inactive"


def test_pending_until_the_on_delay_is_seen_in_the_data() -> None:
    st, out = run([ev(10, None)], [14.9], ON5_OFF3)
    assert (st.state, out) == ("pending", [])
    _st2, changes = advance(st, [ev(10, None)], horizon=15 * S, timing=ON5_OFF3)
    assert [(c.kind, c.at / S) for c in changes] == [("opened", 15)]


def test_off_delay_waits_for_data_past_it() -> None:
    st, out = run([ev(0, 10)], [12], ON5_OFF3)
    assert out == [("opened", 5, "warning")]
    assert st.state == "open"  # absent for 2 s only, as far as the data shows


def test_severity_change_while_open_is_an_update_and_the_key_stays() -> None:
    events = [ev(0, 40, "warning", "a"), ev(10, 20, "critical", "b")]
    st, out = run(events, [100], Timing())
    assert out == [
        ("opened", 0, "warning"),
        ("updated", 10, "critical"),
        ("updated", 20, "warning"),
        ("resolved", 40, "warning"),
    ]
    assert st.sensors == ("a", "b")


@pytest.mark.parametrize("horizons", [[1000], [float(h) for h in range(0, 1001, 7)]])
def test_flapping_sends_one_notification_then_settles(horizons: list[float]) -> None:
    # Opens at 0, 20, 40, 60, 80 (each lasting 5 s); 3 openings within 100 s is flapping.
    timing = Timing(flap_count=3, flap_window=100 * S)
    events = [ev(t, t + 5) for t in range(0, 100, 20)]
    st, out = run(events, horizons, timing)
    assert out == [
        ("opened", 0, "warning"),
        ("resolved", 5, "warning"),
        ("opened", 20, "warning"),
        ("resolved", 25, "warning"),
        ("flapping", 40, "warning"),
        # quiet until 100 s pass without an opening or a resolve: last resolve at 85
        ("resolved", 185, "warning"),
    ]
    assert st.state == "resolved"


def test_flapping_settles_open_when_the_condition_stays() -> None:
    timing = Timing(flap_count=2, flap_window=50 * S)
    st, out = run([ev(0, 5), ev(10, None)], [200], timing)
    assert out == [
        ("opened", 0, "warning"),
        ("resolved", 5, "warning"),
        ("flapping", 10, "warning"),
        ("updated", 60, "warning"),
    ]
    assert st.state == "open"


@pytest.mark.parametrize("horizons", [[100], [20, 25, 40, 100]])
def test_inhibited_alert_stays_pending_and_opens_when_released(horizons: list[float]) -> None:
    # On-delay done at 13 while the device is flatlined (10-30): it opens when that ends.
    flatline = [(10 * S, 30 * S)]
    _st, out = run([ev(8, None)], horizons, ON5_OFF3, inhibitions=flatline)
    assert out == [("opened", 30, "warning")]


def test_silenced_alert_opens_at_the_first_evaluation_after() -> None:
    st, changes = advance(
        AlertState(), [ev(0, None)], horizon=20 * S, timing=ON5_OFF3, silenced=True
    )
    assert (st.state, changes) == ("pending", [])
    st, changes = advance(st, [ev(0, None)], horizon=21 * S, timing=ON5_OFF3)
    assert [(c.kind, c.at / S) for c in changes] == [("opened", 20)]


def test_inhibition_never_blocks_a_resolve() -> None:
    _st, out = run([ev(0, 10)], [8, 100], Timing(), inhibitions=[(5 * S, None)])
    assert out == [("opened", 0, "warning"), ("resolved", 10, "warning")]


def test_a_condition_that_ends_while_inhibited_never_opens() -> None:
    st, out = run([ev(0, 10)], [100], ON5_OFF3, inhibitions=[(0, None)])
    assert (out, st.state) == ([], "inactive")
