"""The ack ledger (ingest.mqtt.ledger): acknowledging many at once releases exactly what
acknowledging them one by one does."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.mqtt.ledger import AckLedger


def _ledger(mids: list[int]) -> AckLedger:
    ledger = AckLedger()
    for mid in mids:
        ledger.track(mid)
    return ledger


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 40),
    st.lists(st.lists(st.integers(-3, 45), max_size=12), max_size=6),
    st.lists(st.integers(0, 40), max_size=3),
)
def test_ack_many_releases_what_acking_one_by_one_does(
    count: int, rounds: list[list[int]], oldest_first: list[int]
) -> None:
    mids = [(7 * i) % 65535 + 1 for i in range(count)]
    one, many = _ledger(mids), _ledger(mids)
    # Besides arbitrary lists (repeats, unknown, out of order), runs of the oldest ones.
    for seqs in [*rounds, *[list(range(k)) for k in oldest_first]]:
        done, released = 0, []
        for seq in seqs:
            got = one.ack(seq)
            if got is not None:
                done += 1
                released += got
        assert many.ack_many(seqs) == (done, released)
        assert len(many) == len(one)
    tail = many.track(99)
    assert tail == one.track(99)


def test_acking_the_oldest_at_once_releases_those_acked_early_after_them() -> None:
    ledger = _ledger([10, 11, 12, 13, 14])
    assert ledger.ack(3) == []
    assert ledger.ack_many([0, 1, 2]) == (3, [10, 11, 12, 13])
    assert ledger.ack_many([4]) == (1, [14])
    assert ledger.ack_many([4, 5]) == (0, [])
    assert len(ledger) == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(-2, 30), max_size=8)), max_size=12))
def test_acks_one_at_a_time_and_many_at_once_mixed_release_in_arrival_order(
    steps: list[tuple[bool, list[int]]],
) -> None:
    """Whatever mix of `ack` and `ack_many`, a packet id is released once, after every
    earlier one, and only once it and every earlier one were acknowledged."""
    mids = [i + 100 for i in range(25)]
    ledger = AckLedger()
    assert ledger.track_many(mids[:10]) == 0
    for mid in mids[10:]:
        ledger.track(mid)
    acked: set[int] = set()
    released: list[int] = []
    for many, seqs in steps:
        if many:
            done, got = ledger.ack_many(seqs)
        else:
            done, got = 0, []
            for seq in seqs:
                one = ledger.ack(seq)
                if one is not None:
                    done += 1
                    got += one
        assert done == len({s for s in seqs if 0 <= s < len(mids)} - acked)
        acked |= {s for s in seqs if 0 <= s < len(mids)}
        released += got
        expected = 0
        while expected in acked:
            expected += 1
        assert released == mids[:expected]
        assert len(ledger) == len(mids) - expected
