"""Sparkplug seq gaps counted once for a share group: the merge rules, the merge of two
instances in the database, and two `ingest run` on one share group."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.sparkplug.seq import Seen, SeqState, merge, merge_flush
from tests.support.cluster import Database
from tests.support.ingester import share_group
from tests.support.mqtt import Publisher
from tests.support.process import wait_until
from tests.support.sparkplug import T, payload

R = 2.0  # the reorder timeout of these tests, s
SHARED_R = 5.0  # and of the share group


def _merge(state: SeqState, seqs: Sequence[int], now: float, *, nbirth_ms: int = -1) -> int:
    seen = [Seen(s, T + s if s != 0 else nbirth_ms, s == 0 and nbirth_ms >= 0) for s in seqs]
    return merge(state, seen, now=now, reorder_s=R)


def test_one_ingester_in_order_has_no_gap_and_counts_a_lost_one() -> None:
    state = SeqState()
    assert merge(state, [Seen(s % 256, T + s) for s in range(0, 600)], now=0, reorder_s=0) == 0
    assert (state.next, state.pending) == (600, {})  # positions go on past 255
    # 600, 601 and 603-604 lost: two gaps, seen as soon as the next seq comes.
    assert merge(state, [Seen(602 % 256, T + 602)], now=1, reorder_s=0) == 1
    assert merge(state, [Seen(605 % 256, T + 605)], now=2, reorder_s=0) == 1


def test_seq_numbers_split_over_instances_have_no_gap() -> None:
    state = SeqState()
    odd, even = list(range(1, 120, 2)), list(range(2, 120, 2))
    # The instance with the odd ones commits first, then the other within the timeout (and
    # within 127 seq numbers: the most the window tells apart from late ones).
    assert _merge(state, [0, *odd], now=0.0, nbirth_ms=T) == 0
    assert len(state.pending) == len(odd) - 1
    assert _merge(state, even, now=R - 0.1) == 0
    assert (state.next, state.pending) == (120, {})


def test_a_lost_seq_is_counted_once_the_timeout_has_passed() -> None:
    state = SeqState()
    assert _merge(state, [0, 1, 2, 4, 5, 8], now=0.0, nbirth_ms=T) == 0  # 3, 6, 7 may come
    assert _merge(state, [9], now=R - 0.01) == 0
    assert _merge(state, [7], now=R - 0.005) == 0  # 7 came, later than 8
    assert _merge(state, [10], now=R) == 2  # 3, and 6: two gaps
    assert _merge(state, [3], now=R + 1) == 0  # too late: behind, changes nothing
    assert (state.next, state.pending, state.in_gap) == (11, {}, False)


def test_a_run_of_lost_seq_numbers_is_one_gap_and_wraps_at_256() -> None:
    state = SeqState()
    assert merge(state, [Seen(s, T + s) for s in range(250, 256)], now=0, reorder_s=0) == 0
    assert merge(state, [Seen(4, T + 260)], now=0, reorder_s=0) == 1  # 0-3 lost
    assert state.next == 261


def test_a_dbirth_merged_before_its_nbirth_and_late_messages_of_the_last_session() -> None:
    state = SeqState()
    assert _merge(state, [0, 1, 2, 3], now=0.0, nbirth_ms=T) == 0
    # A rebirth at T + 500: its DBIRTH (seq 1) is merged before its NBIRTH (seq 0), and a
    # message of the old session (seq 4, older than the NBIRTH) comes after both.
    rebirth = T + 500
    assert merge(state, [Seen(1, rebirth + 1)], now=0.5, reorder_s=R) == 0
    assert merge(state, [Seen(0, rebirth, nbirth=True)], now=0.6, reorder_s=R) == 0
    assert merge(state, [Seen(4, T + 4), Seen(2, rebirth + 2)], now=R + 5, reorder_s=R) == 0
    # The new sequence goes on from where its DBIRTH was placed (positions keep counting).
    assert state.next is not None
    assert (state.next % 256, state.session_ms, state.pending) == (3, rebirth, {})


def test_a_redelivered_flush_changes_nothing() -> None:
    state = SeqState()
    seqs = [0, 1, 2, 4]
    assert _merge(state, seqs, now=0.0, nbirth_ms=T) == 0
    before = (state.next, dict(state.pending))
    assert _merge(state, seqs, now=0.1, nbirth_ms=T) == 0
    assert (state.next, state.pending) == before


def _runs(lost: set[int], n: int) -> int:
    """Runs of consecutive numbers of `lost` in 1..n-1."""
    return sum(1 for s in range(1, n) if s in lost and s - 1 not in lost)


@settings(max_examples=60, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_any_split_over_instances_counts_what_was_lost(rng: random.Random) -> None:
    """Sequences of one to three NBIRTH sessions, spread over one to three instances (round
    robin or at random), in flushes of any size, some messages held and merged again after
    the next ones, several messages of one timestamp, merged in any order of the instances
    within the timeout: once it has passed, the gaps counted are the runs lost."""
    k, per_ms = rng.randint(1, 3), rng.choice([1, 3])
    state, gaps, want, now, t0 = SeqState(), 0, 0, 0.0, T
    for _ in range(rng.randint(1, 3)):
        n = rng.choice([20, 150, 300])  # 300: past a wrap of the seq
        lost = set(rng.sample(range(1, n - 1), rng.randint(0, 4)))  # the last one comes
        want += _runs(lost, n)
        seen = [Seen(0, t0, nbirth=True)]
        seen += [Seen(s % 256, t0 + s // per_ms) for s in range(1, n) if s not in lost]
        taken: list[list[Seen]] = [[] for _ in range(k)]
        for i, m in enumerate(seen):
            taken[rng.randrange(k) if rng.random() < 0.3 else i % k].append(m)
        flushes: list[list[list[Seen]]] = []
        for mine in taken:
            flushes.append([])
            held: list[Seen] = []
            for i in range(0, len(mine), size := rng.randint(1, 40)):
                flushes[-1].append(mine[i : i + size] + held)
                held = [m for m in mine[i : i + size] if rng.random() < 0.05]
            if held:
                flushes[-1].append(held)
        while any(flushes):
            now += 0.01
            instance = rng.choice([f for f in flushes if f])
            gaps += merge(state, instance.pop(0), now=now, reorder_s=R)
        now += R + 1
        gaps += merge(state, [], now=now, reorder_s=R)
        t0 += n + 1000
    assert gaps == want


@pytest.fixture
async def conns(database: Database) -> AsyncIterator[tuple[asyncpg.Connection, ...]]:
    a, b = await asyncpg.connect(database.ingest_url), await asyncpg.connect(database.ingest_url)
    yield a, b
    await a.close()
    await b.close()


async def test_two_instances_merge_into_one_sequence_in_the_database(
    conns: tuple[asyncpg.Connection, ...],
) -> None:
    a, b = conns
    node = f"G{uuid.uuid4().hex[:8]}/e"
    flush = [Seen(0, T, nbirth=True)] + [Seen(s, T + s) for s in (1, 3, 5, 7, 8, 11)]
    assert await merge_flush(a, {node: flush}, reorder_s=R, now=100.0) == {node: 0}
    # B took 2, 4 and 6 and commits them after A, within the timeout.
    flush = [Seen(s, T + s) for s in (2, 4, 6)]
    assert await merge_flush(b, {node: flush}, reorder_s=R, now=101.0) == {node: 0}
    # 9 and 10 did not come: one gap, counted by the instance whose merge settles it.
    assert await merge_flush(a, {node: [Seen(12, T + 12)]}, reorder_s=R, now=103.0) == {node: 1}
    row = await a.fetchrow(
        "SELECT next, session_ms, in_gap, pending::text FROM telemetry.sparkplug_seq"
        " WHERE node = $1",
        node,
    )
    assert row is not None
    assert tuple(row) == (13, T, False, "[]")


async def test_ingesters_of_a_share_group_count_a_gap_once(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    group = f"G{uuid.uuid4().hex[:8]}"
    members = await share_group(
        database,
        mqtt_url,
        prefix,
        members=2,
        INGEST_SPARKPLUG_GROUPS=f'["{group}"]',
        INGEST_SPARKPLUG_REORDER_TIMEOUT_S=str(SHARED_R),
    )

    async def total(name: str) -> float:
        return sum([await m.metric(name) for m in members])

    try:
        base = f"spBv1.0/{group}"
        birth = [{"name": "bdSeq", "datatype": 4, "long_value": 1}]
        birth.append({"name": "Temp", "alias": 1, "datatype": 10, "double_value": 1.0})
        with Publisher(mqtt_url) as pub:
            pub.publish(f"{base}/NBIRTH/e", payload(T, 0, birth))
            for s in range(1, 300):  # 20 lost; the seq wraps at 256
                if s != 20:
                    data = [{"alias": 1, "double_value": float(s)}]
                    pub.publish(f"{base}/NDATA/e", payload(T + s, s % 256, data))

            loop = asyncio.get_running_loop()
            began, progress = loop.time(), []  # (s, acknowledged by each), for a failure

            async def all_acked() -> bool:
                acked = [await m.metric("ingest_messages_acknowledged_total") for m in members]
                progress.append((round(loop.time() - began, 2), acked))
                return sum(acked) >= 299

            await wait_until(all_acked, timeout=120)
            # Both took some: without the merge each would count dozens of gaps.
            assert all([await m.metric("ingest_messages_acknowledged_total") for m in members])
            # Once the timeout has passed, the node's next message settles the gap.
            await asyncio.sleep(SHARED_R)
            pub.publish(f"{base}/NDATA/e", payload(T + 300, 300 % 256, data))

            async def counted() -> bool:
                return await total("ingest_messages_acknowledged_total") >= 300

            await wait_until(counted, timeout=60)
        gaps = [await m.metric("ingest_sparkplug_seq_gaps_total") for m in members]
        # Exact while neither commits a message more than SHARED_R after the other commits a
        # later one; `progress` tells whether that held.
        assert sum(gaps) == 1, (gaps, progress)
    finally:
        for m in members:
            assert await m.stop() == 0, m.log.decode()
