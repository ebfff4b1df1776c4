"""Several ingesters, one database: each sensor's events are those of its readings in time order,
whichever ingester writes which flush and in whatever order they commit.

The "ingesters" here are in-process: each has its own registry, deriver (detector and state
cache) and connection, and writes flushes through the real sink, as `ingest.writer` does; the
flushes are committed one after another in the order a test chooses. (`test_scale_out.py` runs
real `ingest run` processes on a share group.)
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import strategies as st

from ingest.anomaly.layout import KINDS
from ingest.anomaly.rules import AnomalyRule
from ingest.warmup import warm_up
from tests.support.anomaly_reference import T0, Reading, S, scenarios
from tests.support.anomaly_sync import (
    Instance,
    Split,
    events_of,
    expected_events,
    named,
    new_device,
    one_pass_events,
    plant_signal,
    syncs,
)
from tests.support.cluster import Database
from tests.support.properties import property_settings


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_up(sparkplug=False)


PROPERTY = property_settings(60, HealthCheck.function_scoped_fixture)


@PROPERTY
@given(scenario=scenarios(), data=st.data())
async def test_flushes_committed_in_any_order_by_any_ingester_give_the_in_order_events(
    database: Database,
    scenario: tuple[dict[int, AnomalyRule | None], dict[int, list[Reading]]],
    data: st.DataObject,
) -> None:
    rule_map, numbered = scenario
    rules, stream = named(rule_map, numbered)
    device = new_device()
    n_flushes = data.draw(st.integers(1, 7), label="flushes")
    flushes: Split = [{} for _ in range(n_flushes)]
    for name, readings in stream.items():
        cuts = sorted(
            data.draw(
                st.lists(
                    st.integers(0, len(readings)), min_size=n_flushes - 1, max_size=n_flushes - 1
                )
            )
        )
        bounds = [0, *cuts, len(readings)]
        for k in range(n_flushes):
            if bounds[k] < bounds[k + 1]:
                flushes[k][name] = readings[bounds[k] : bounds[k + 1]]
    in_order = data.draw(st.booleans(), label="committed in order (round robin)")
    order = list(range(n_flushes))
    if not in_order:
        order = data.draw(st.permutations(order), label="commit order")
    members = data.draw(st.integers(1, 3), label="ingesters")
    writer = [data.draw(st.integers(0, members - 1)) for _ in range(n_flushes)]
    restarts = data.draw(st.sets(st.integers(0, n_flushes - 1)), label="restart before")
    rule_list = list(rules.values())
    instances = [Instance(database, rule_list) for _ in range(members)]
    before = syncs()
    for ingester in instances:
        await ingester.__aenter__()
    try:
        for step, k in enumerate(order):
            i = writer[k]
            if step in restarts:
                await instances[i].__aexit__()
                instances[i] = await Instance(database, rule_list).__aenter__()
            if flushes[k]:
                assert await instances[i].write(device, flushes[k]) == 0
    finally:
        for ingester in instances:
            await ingester.__aexit__()
    for how, count in syncs().items():
        if count > before[how]:
            event(f"state {how}")
    assert await events_of(database, device) == expected_events(rules, stream)


async def test_a_late_flush_that_breaks_an_open_event_splits_it(database: Database) -> None:
    """B commits readings 20-29, which continue a flatline that began at 10, before A commits
    10-19, which break it at 15: the event B wrote (from 10, open) is replaced by the in-order
    ones, and the state both go on from is the in-order one."""
    rule = AnomalyRule(match="*/temp", flatline_count=4, spike_window=5, max=50.0)
    device = new_device()
    values = [10.0 + (i % 3) * 0.25 for i in range(10)] + [20.0] * 5 + [21.0] + [20.0] * 14
    values += [60.0, 61.0] + [12.0] * 8
    readings = [(T0 + i * S, v) for i, v in enumerate(values)]
    async with Instance(database, [rule]) as a, Instance(database, [rule]) as b:
        await a.write(device, {"temp": readings[:10]})
        await b.write(device, {"temp": readings[20:30]})  # first: the run looks unbroken
        before = syncs()
        await a.write(device, {"temp": readings[10:20]})  # late: the run broke at 15
        assert syncs()["replayed"] == before["replayed"] + 1
        await a.write(device, {"temp": readings[30:35]})  # A goes on from B's and its own
        await b.write(device, {"temp": readings[35:38]})  # B restores: A rewrote history
        assert syncs()["restored"] == before["restored"] + 1
        await a.write(device, {"temp": readings[38:40]})  # A catches up with B's three
        assert syncs()["caught_up"] == before["caught_up"] + 1
    assert await events_of(database, device) == expected_events({"temp": rule}, {"temp": readings})


async def test_a_late_flush_within_the_gap_after_an_auto_event_merges_into_it(
    database: Database,
) -> None:
    """B commits 26-31, which end the auto event A opened at 20 (4 quiet readings), then 22-25,
    whose spike at 23 lies within the gap: in order, 20 and 23 are one event.
    The replay must start before 20, not at 22 (the event is open until its 4th reading after
    its end), or it writes two."""
    rule = AnomalyRule(
        match="*/temp",
        detector="auto",
        auto_window=8,
        auto_recent=1,
        auto_min_readings=1,
        auto_gap=4,
    )
    device = new_device()
    values = [float(i % 2) for i in range(32)]
    values[20] = values[23] = 10.0
    readings = [(T0 + i * S, v) for i, v in enumerate(values)]
    async with Instance(database, [rule]) as a, Instance(database, [rule]) as b:
        await a.write(device, {"temp": readings[:22]})
        await b.write(device, {"temp": readings[26:32]})
        before = syncs()
        await b.write(device, {"temp": readings[22:26]})  # late, and no cache before them
        assert syncs()["replayed"] == before["replayed"] + 1
    expected = expected_events({"temp": rule}, {"temp": readings})
    assert [(k[1], k[2], v[0]) for k, v in expected.items()] == [("auto", T0 + 20 * S, T0 + 23 * S)]
    assert await events_of(database, device) == expected


async def test_a_flush_older_than_the_replay_limit_is_skipped_and_counted(
    database: Database,
) -> None:
    rule = AnomalyRule(match="*/temp", max=50.0)
    device = new_device()
    early = [(T0 + i * S, 60.0 if i == 3 else 1.0) for i in range(10)]
    later = [(T0 + (100 + i) * S, 70.0 if i == 5 else 1.0) for i in range(10)]
    async with Instance(database, [rule], replay_max_s=30.0) as a:
        assert await a.write(device, {"temp": later}) == 0
        assert await a.write(device, {"temp": early}) == 10  # 90 s before the newest
    assert await events_of(database, device) == expected_events({"temp": rule}, {"temp": later})


@pytest.mark.parametrize("swap", [False, True], ids=["in-order", "neighbours-swapped"])
async def test_round_robin_over_three_ingesters_catches_up_and_gives_the_in_order_events(
    database: Database, swap: bool
) -> None:
    """Flushes of 5 readings dealt out to three ingesters in turn, committed in order (each
    ingester's cache is two flushes behind: it catches up) or with every pair of neighbours
    swapped (every other flush is late: replayed)."""
    rule = AnomalyRule(
        match="*",
        max=100.0,
        max_rate=30.0,
        spike_window=16,
        spike_threshold=5.0,
        spike_min_sigma=0.5,
        drift_window=8,
        drift_baseline=40,
        drift_sigma=4.0,
        flatline_count=10,
        detector="auto",
        auto_window=16,
        auto_min_readings=3,
        auto_gap=6,
    )
    device = new_device()
    stream = {
        name: [(T0 + i * S // 10, v) for i, v in enumerate(plant_signal(400, seed))]
        for seed, name in enumerate(("temp", "vib"))
    }
    flushes = [{name: r[k : k + 5] for name, r in stream.items()} for k in range(0, 400, 5)]
    order = list(range(len(flushes)))
    if swap:
        for k in range(0, len(order) - 1, 2):
            order[k], order[k + 1] = order[k + 1], order[k]
    before = syncs()
    members = [Instance(database, [rule]) for _ in range(3)]
    for ingester in members:
        await ingester.__aenter__()
    try:
        for k in order:
            assert await members[k % 3].write(device, flushes[k]) == 0
    finally:
        for ingester in members:
            await ingester.__aexit__()
    after = syncs()
    how = "replayed" if swap else "caught_up"
    assert after[how] - before[how] >= len(flushes)  # nearly every flush, for both sensors
    rules = {name: rule for name in stream}
    expected = expected_events(rules, stream)
    assert one_pass_events(rules, stream) == expected
    assert {kind for _, kind, _ in expected} == set(KINDS)
    assert await events_of(database, device) == expected
