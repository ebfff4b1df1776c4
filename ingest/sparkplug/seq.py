"""Gaps in Sparkplug `seq` numbers, counted once across every ingester of a share group.

Each ingester sees some of an edge node's messages; none can tell a lost seq from one another
ingester took. So the seq numbers of each node are merged in the database
(`telemetry.sparkplug_seq`), after each flush, in one transaction for the flush's nodes, locked
in node order. A seq missing from the merged sequence is counted as lost (a run of them as one
gap) when the node's messages are merged again at least the reorder timeout (Sparkplug's
"Reorder Timeout") after a later seq was: another ingester had that long to commit it. With one
ingester, a timeout of 0 counts a gap as soon as the next message shows it. The ingester that
settles a gap counts it, so the sum over the ingesters is what one ingester alone counts.

The seq wraps at 256, so a message is placed on the node's sequence by its payload timestamp
(every Sparkplug DATA and BIRTH has one): after the latest message merged that is older, or
next to one as old; the messages of one flush follow one another. A message older than the
last one settled, or placed before the first position not settled, is a redelivery or later
than the timeout, and changes nothing. So the
count is exact while no ingester commits a node's message more than the timeout after another
ingester committed a later one, and the edge node's clock does not go back within a sequence.
An NBIRTH (seq 0) starts a new sequence; messages older than the NBIRTH belong to the one
before and change nothing, and what was not settled of that one is not counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
import msgspec

__all__ = ["Seen", "SeqState", "merge", "merge_flush"]

_CLAIM = """
INSERT INTO telemetry.sparkplug_seq (node)
SELECT n FROM unnest($1::text[]) AS n ORDER BY n
ON CONFLICT (node) DO NOTHING
"""
_LOCK = """
SELECT node, next, last_pos, last_ms, session_ms, in_gap, tentative_until,
       pending::text AS pending,
       extract(epoch FROM clock_timestamp())::float8 AS now
  FROM telemetry.sparkplug_seq WHERE node = ANY($1::text[]) ORDER BY node FOR UPDATE
"""
_UPDATE = """
UPDATE telemetry.sparkplug_seq s
   SET next = u.next, last_pos = u.last_pos, last_ms = u.last_ms, session_ms = u.session_ms,
       in_gap = u.in_gap, tentative_until = u.tentative_until, pending = u.pending::jsonb
  FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::boolean[],
              $7::float8[], $8::text[])
       AS u(node, next, last_pos, last_ms, session_ms, in_gap, tentative_until, pending)
 WHERE s.node = u.node
"""
_PENDING = msgspec.json.Decoder(list[tuple[int, int, float]])


@dataclass(frozen=True, slots=True)
class Seen:
    """A message's seq, its payload timestamp (ms) and whether it is an NBIRTH."""

    seq: int
    ms: int
    nbirth: bool = False


@dataclass(slots=True)
class SeqState:
    """What is merged of one edge node's seq numbers. Positions count messages from the
    sequence's start; a message's position is its seq modulo 256."""

    next: int | None = None  # the first position not settled; None before the first message
    last_pos: int | None = None  # the last settled position whose message came
    last_ms: int | None = None  # and that message's timestamp
    session_ms: int | None = None  # the timestamp of the NBIRTH the sequence started at
    in_gap: bool = False  # the last position settled was missing
    # Begun by a message other than an NBIRTH: until this time (s) an earlier one may still
    # come from another ingester and begin it, and nothing is settled.
    tentative_until: float | None = None
    # position -> (payload ms, merge time in s) of the messages merged at or after `next`
    pending: dict[int, tuple[int, float]] = field(default_factory=dict)


def merge(state: SeqState, seen: Sequence[Seen], *, now: float, reorder_s: float) -> int:
    """Merge one flush's messages of a node (in arrival order) into `state` at time `now`
    (seconds); the gaps it settles."""
    prev: tuple[int, int] | None = None  # (position, ms) of the flush's last message placed
    for m in seen:
        if state.session_ms is not None and m.ms < state.session_ms:
            continue  # a message of the sequence before the last NBIRTH
        if m.nbirth and (state.session_ms is None or m.ms > state.session_ms):
            _begin(state, m.ms)
            prev = None
        if state.next is None:
            state.next, state.tentative_until = m.seq, now + reorder_s
        if state.last_ms is not None and m.ms < state.last_ms:
            continue  # older than a message settled: came already, or too late
        if prev is None or prev[1] > m.ms:
            prev = _reference(state, m.ms)
        pos = _after(prev, m.seq, m.ms)
        if pos < state.next and state.tentative_until is not None and now < state.tentative_until:
            state.next = pos  # an earlier message, in time to begin the sequence
        if pos >= state.next:
            state.pending.setdefault(pos, (m.ms, now))
            prev = (pos, m.ms)
    return _settle(state, now=now, reorder_s=reorder_s)


def _begin(state: SeqState, ms: int) -> None:
    """A new sequence, begun by an NBIRTH at `ms`: what is not settled of the one before is
    dropped; messages of the new one may have been merged before its NBIRTH."""
    state.session_ms, state.in_gap = ms, False
    state.pending = {p: v for p, v in state.pending.items() if v[0] >= ms}
    if state.last_ms is not None and state.last_ms >= ms:
        return  # it has begun already: the NBIRTH is placed like any message
    if state.pending:  # it begins at the NBIRTH's place (seq 0), before the first one merged
        first = min(state.pending)
        start = first - first % 256
        nothing_settled = state.tentative_until is not None or state.next is None
        state.next = start if nothing_settled else max(state.next or 0, start)
    else:
        state.next = 0
    state.last_pos = state.last_ms = state.tentative_until = None


def _reference(state: SeqState, ms: int) -> tuple[int, int]:
    """The position and timestamp to place a message of timestamp `ms` after: the latest
    merged message not newer, else (a message older than all) the first not settled."""
    known = [(t, p) for p, (t, _) in state.pending.items() if t <= ms]
    if state.last_ms is not None and state.last_pos is not None:
        known.append((state.last_ms, state.last_pos))
    if known:
        t, p = max(known)
        return p, t
    assert state.next is not None
    return state.next, ms


def _after(ref: tuple[int, int], seq: int, ms: int) -> int:
    """The position of `seq` just after `ref`, or nearest to it if both are as old."""
    pos, t = ref
    if t < ms:
        return pos + 1 + (seq - pos - 1) % 256
    return pos + (seq - pos + 128) % 256 - 128


def _settle(state: SeqState, *, now: float, reorder_s: float) -> int:
    """Settle positions from `next` on: those that came, and those missing while a later one
    was merged `reorder_s` ago; the gaps (runs of missing ones) this counts."""
    if state.tentative_until is not None:
        if now < state.tentative_until:
            return 0
        state.tentative_until = None
    gaps = 0
    pending = state.pending
    old = sum(1 for _, at in pending.values() if at <= now - reorder_s)
    while pending and state.next is not None:
        came = pending.pop(state.next, None)
        if came is not None:
            state.last_pos, state.last_ms, state.in_gap = state.next, came[0], False
            old -= came[1] <= now - reorder_s
        elif old:
            gaps += not state.in_gap
            state.in_gap = True
        else:
            break  # the missing seq may still come from another ingester
        state.next += 1
    return gaps


async def merge_flush(
    conn: asyncpg.Connection,
    seen: Mapping[str, Sequence[Seen]],
    *,
    reorder_s: float,
    now: float | None = None,
) -> dict[str, int]:
    """Merge a committed flush's seq numbers (by node, in arrival order) into the database, in
    one transaction; the gaps settled, by node. `now`: the time of the merge (s), else the
    database's clock."""
    nodes = sorted(seen)
    gaps: dict[str, int] = {}
    async with conn.transaction():
        await conn.execute(_CLAIM, nodes)
        cols: tuple[list[object], ...] = ([], [], [], [], [], [], [], [])
        for row in await conn.fetch(_LOCK, nodes):
            node = row["node"]
            pending = {p: (ms, at) for p, ms, at in _PENDING.decode(row["pending"])}
            state = SeqState(
                next=row["next"],
                last_pos=row["last_pos"],
                last_ms=row["last_ms"],
                session_ms=row["session_ms"],
                in_gap=row["in_gap"],
                tentative_until=row["tentative_until"],
                pending=pending,
            )
            at = row["now"] if now is None else now
            gaps[node] = merge(state, seen[node], now=at, reorder_s=reorder_s)
            entries = [(p, *state.pending[p]) for p in sorted(state.pending)]
            values = (
                node,
                state.next,
                state.last_pos,
                state.last_ms,
                state.session_ms,
                state.in_gap,
                state.tentative_until,
                msgspec.json.encode(entries).decode(),
            )
            for col, value in zip(cols, values, strict=True):
                col.append(value)
        await conn.execute(_UPDATE, *cols)
    return gaps
