"""The Sparkplug stage: messages to reading columns, births to alias tables, deaths to stale rows.

`accept` runs in the intake task for every message (decode, time window; never awaits).
`prepare` runs in the writer task once per flush: it reads the versions of the nodes the flush
touches (one query per flush, more only for the nodes another instance changed), registers the
births' sensors, then walks the flush's messages in arrival order. The database is
the source of truth; this object's node states are a cache, and a flush that changes a node
checks in its transaction that the node is still at the version it read.

DATA naming an alias no birth defined may name one that another instance has received and not
committed yet: it is held (not acknowledged) and read again in the next flushes, for at most
`unknown_alias_wait_s` after its receipt, before it becomes a dead letter.

After a flush has committed, `merge_seq` merges the seq numbers of its messages with those of
every other instance in the database and counts the gaps (see `seq`).
"""

from __future__ import annotations

import logging
from collections import Counter as Counts
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import asyncpg
import numpy as np
from prometheus_client import Counter, Gauge

from ingest.db.registry import Registry, SensorKey
from ingest.db.sink import Upsert
from ingest.errors import PayloadError
from ingest.sparkplug import values as sv
from ingest.sparkplug.aliases import AliasTable
from ingest.sparkplug.kernel import (
    C_DATATYPE,
    C_FLAGS,
    C_NAME_START,
    F_ALIAS,
)
from ingest.sparkplug.nodes import (
    NodeState,
    dbirth,
    ddeath,
    load,
    nbirth,
    ndeath,
    state_upserts,
)
from ingest.sparkplug.readings import (
    ANY_TIME,
    NUMERIC,
    Columns,
    Item,
    UnknownAliasError,
    bd_seq,
    birth_readings,
    data_readings,
    empty,
    sensor_name,
    stale_readings,
)
from ingest.sparkplug.seq import Seen, merge_flush
from ingest.sparkplug.topic import parse_topic
from ingest.sparkplug.wire import (
    decode_data,
    decode_payload,
    metric_path,
)

log = logging.getLogger(__name__)

__all__ = ["Columns", "Item", "Prepared", "SparkplugStage", "compile_kernels"]

MESSAGES = Counter(
    "ingest_sparkplug_messages_total", "Sparkplug messages received, by type.", ["type"]
)
SKIPPED = Counter(
    "ingest_sparkplug_metrics_skipped_total",
    "Sparkplug metric values not stored, by why: null, nonnumeric, novalue, transient.",
    ["why"],
)
SEQ_GAPS = Counter(
    "ingest_sparkplug_seq_gaps_total",
    "Gaps in an edge node's seq (0-255) merged from every ingester: runs of seq numbers that "
    "did not come within the reorder timeout.",
)
DEATHS_IGNORED = Counter(
    "ingest_sparkplug_deaths_ignored_total",
    "Sparkplug deaths that changed nothing: an NDEATH whose bdSeq is not the last NBIRTH's, "
    "or the death of an edge node or device already offline.",
)
HELD = Gauge(
    "ingest_sparkplug_messages_held",
    "Sparkplug DATA naming an alias no birth has defined yet, held for a later flush.",
)

MAX_HELD: Final = 10_000
"""At most this many messages are held; beyond, the oldest become dead letters at once."""

_NO_TABLE: Final = AliasTable.empty()
_NO_TIMES: Final = np.empty(0, np.int64)


@dataclass(slots=True)
class Prepared:
    """A flush's Sparkplug part: its readings, dead letters (message index, reason), the
    messages held for a later flush (index), the node-state writes for the same transaction,
    and what to count once it committed (`SparkplugStage.committed`)."""

    columns: Columns
    dead_letters: list[tuple[int, str]] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    upserts: list[Upsert] = field(default_factory=list)
    stale_rows: int = 0
    skipped: Counts[str] = field(default_factory=Counts)
    deaths_ignored: int = 0
    seen: dict[str, list[Seen]] = field(default_factory=dict)  # seq numbers, by node


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, the Sparkplug kernels (see `ingest.warmup`)."""
    from ingest.sparkplug.encode import Metric, encode_payload

    data = encode_payload(timestamp=1, seq=0, metrics=[Metric("m", alias=1, datatype=10, value=1)])
    decoded = decode_payload(data + b"\x12\x04\x4a\x02\x0a\x00", max_metrics=10)
    sv.metric_times(decoded.rows, payload_ms=decoded.timestamp, received_us=0)
    sv.metric_columns(decoded.rows, table=AliasTable.empty())
    decode_data(
        data, _NO_TABLE, max_metrics=10, received_us=0, window=ANY_TIME, store_transient=False
    )


class SparkplugStage:
    """Sparkplug messages of the flushes. `accept` is called from the intake task only,
    `prepare` from the writer task only; neither is called concurrently with itself."""

    def __init__(
        self,
        *,
        store_transient: bool = False,
        on_unknown_alias: Callable[[str, str], None] | None = None,
        unknown_alias_wait_s: float = 0.0,
        max_held: int = MAX_HELD,
        reorder_timeout_s: float = 0.0,
    ) -> None:
        """`on_unknown_alias(group, edge node)`: called (never awaited) for DATA that becomes a
        dead letter because it names an alias no birth defined, e.g. to ask for a rebirth."""
        self._store_transient = store_transient
        self._on_unknown_alias = on_unknown_alias
        self._wait_us = round(unknown_alias_wait_s * 1_000_000)
        self._max_held = max_held
        self._reorder_s = reorder_timeout_s
        self._nodes: dict[str, NodeState] = {}

    # ------------------------------------------------------------------ intake

    def accept(
        self,
        *,
        index: int,
        topic: str,
        payload: bytes,
        received_us: int,
        window: tuple[int, int],
        max_metrics: int,
    ) -> Item | None:
        """Decode one message; None for one that is ignored (STATE, commands). Raises
        PayloadError for a malformed topic or payload, or a time outside `window`."""
        parsed = parse_topic(topic)
        MESSAGES.labels(parsed.kind or "ignored").inc()
        if parsed.kind is None:
            return None
        if parsed.kind in ("NDATA", "DDATA"):
            data = decode_data(
                payload,
                self._table(parsed.node),
                max_metrics=max_metrics,
                received_us=received_us,
                window=window,
                store_transient=self._store_transient,
            )
            if data is not None:  # no name, no error: the common case, in one kernel call
                return Item(index, parsed, data.decoded, _NO_TIMES, received_us, data)
        decoded = decode_payload(payload, max_metrics=max_metrics)
        times = sv.metric_times(decoded.rows, payload_ms=decoded.timestamp, received_us=received_us)
        lo, hi = window
        if decoded.timestamp is not None and not lo <= decoded.timestamp * 1000 <= hi:
            raise PayloadError("timestamp: outside the accepted window")
        if len(times):
            bad = np.flatnonzero((times < lo) | (times > hi))
            if len(bad):
                which = metric_path(decoded.rows, int(bad[0]))
                raise PayloadError(f"{which}.timestamp: outside the accepted window")
        if parsed.kind != "NDEATH":
            for row in np.flatnonzero(decoded.rows[:, C_NAME_START] >= 0).tolist():
                name = decoded.name(row)  # every name must be UTF-8: raises PayloadError here
                if name is not None and "\x00" in name:  # PostgreSQL text cannot hold NUL
                    raise PayloadError(f"{metric_path(decoded.rows, row)}.name: contains NUL")
        return Item(index, parsed, decoded, times, received_us)

    def _table(self, node: str) -> AliasTable:
        state = self._nodes.get(node)
        return state.table if state is not None else _NO_TABLE

    # ------------------------------------------------------------------ flush

    async def prepare(
        self,
        conn: asyncpg.Connection,
        *,
        items: Sequence[Item],
        registry: Registry,
        now_us: int,
    ) -> Prepared:
        """The readings, dead letters, held messages and node-state writes of a flush's
        Sparkplug messages. Counts nothing: call `committed` once the flush committed (a flush
        whose transaction failed before any part of it committed is prepared again)."""
        out = Prepared(empty())
        if not items:
            return out
        read = await self._refresh(conn, sorted({it.topic.node for it in items}), registry)
        names = self._births_and_names(items)
        if names:
            await registry.resolve(conn, sensors=dict.fromkeys(names))
        parts: list[Columns] = []
        changed: set[str] = set()
        waiting: list[tuple[Item, str]] = []
        for item in items:
            try:
                part = self._item(item, registry, changed, out)
            except UnknownAliasError as exc:
                if now_us < item.received_us + self._wait_us:
                    waiting.append((item, exc.reason))
                else:
                    self._give_up(item, exc.reason, out)
                continue
            except PayloadError as exc:
                out.dead_letters.append((item.index, exc.reason))
                continue
            if part is not None:
                parts.append(part)
        waiting.sort(key=lambda w: w[0].received_us, reverse=True)
        for item, reason in waiting[self._max_held :]:  # the oldest, beyond the cap
            self._give_up(item, reason, out)
        out.held = sorted(item.index for item, _ in waiting[: self._max_held])
        for item in items:  # held ones too: they came (and merging one twice changes nothing)
            seq, kind = item.decoded.seq, item.topic.kind
            if seq is not None and kind != "NDEATH":
                ms = item.decoded.timestamp
                seen = Seen(seq, item.received_us // 1000 if ms is None else ms, kind == "NBIRTH")
                out.seen.setdefault(item.topic.node, []).append(seen)
        if parts:
            out.columns = Columns(
                np.concatenate([p.time for p in parts]),
                np.concatenate([p.sensor for p in parts]),
                np.concatenate([p.value for p in parts]),
                np.concatenate([p.quality for p in parts]),
            )
        if changed:
            out.upserts = state_upserts({n: self._nodes[n] for n in changed}, read)
        return out

    def committed(self, prepared: Prepared) -> None:
        """Count what a committed flush did."""
        for why, count in prepared.skipped.items():
            SKIPPED.labels(why).inc(count)
        if prepared.deaths_ignored:
            DEATHS_IGNORED.inc(prepared.deaths_ignored)
        HELD.set(len(prepared.held))

    async def merge_seq(self, conn: asyncpg.Connection, prepared: Prepared) -> None:
        """Merge the seq numbers of a committed flush into the database and count the gaps
        this settles (its own transaction; merging a flush again changes nothing)."""
        if not prepared.seen:
            return
        gaps = await merge_flush(conn, prepared.seen, reorder_s=self._reorder_s)
        for node, count in gaps.items():
            if count:
                SEQ_GAPS.inc(count)
                log.info("sparkplug node %s: %d gap(s) in seq", node, count)

    def _give_up(self, item: Item, reason: str, out: Prepared) -> None:
        out.dead_letters.append((item.index, reason))
        if self._on_unknown_alias is not None:
            self._on_unknown_alias(item.topic.group, item.topic.edge)

    async def _refresh(
        self, conn: asyncpg.Connection, nodes: list[str], registry: Registry
    ) -> dict[str, int]:
        """The database's version of each of `nodes` (absent: none there). Reloads the nodes
        another instance changed and makes their sensors known to the registry; forgets the
        ones the database does not have (what a flush that did not commit left here)."""
        versions, changed = await load(conn, nodes, self._nodes)
        for node in nodes:
            if node not in versions:
                self._nodes.pop(node, None)
        self._nodes.update(changed)
        keys: list[SensorKey] = []
        for node, state in changed.items():
            for device, metrics in state.devices.items():
                levels = (*node.split("/", 1), device) if device else tuple(node.split("/", 1))
                keys += [SensorKey(levels, m.name) for m in metrics if m.sensor is not None]
        if keys:
            await registry.resolve(conn, sensors=dict.fromkeys(keys))
        return versions

    def _births_and_names(self, items: Sequence[Item]) -> list[SensorKey]:
        """Sensors named in the flush: the births' numeric metrics and data sent by name."""
        keys: list[SensorKey] = []
        for item in items:
            kind, rows = item.topic.kind, item.decoded.rows
            if item.data is not None:  # read at intake: aliases only, no name
                continue
            if kind in ("NBIRTH", "DBIRTH"):
                wanted = np.isin(rows[:, C_DATATYPE], list(NUMERIC))
            elif kind in ("NDATA", "DDATA"):
                wanted = (rows[:, C_FLAGS] & F_ALIAS) == 0
            else:
                continue
            state = self._nodes.get(item.topic.node)
            for row in np.flatnonzero(wanted).tolist():
                name = sensor_name(item, state, row)
                if name:
                    keys.append(SensorKey(item.topic.levels, name))
        return keys

    def _item(
        self, item: Item, registry: Registry, changed: set[str], out: Prepared
    ) -> Columns | None:
        kind, node = item.topic.kind, item.topic.node
        if kind in ("NBIRTH", "DBIRTH"):
            return self._birth(item, registry, changed, out)
        if kind in ("NDATA", "DDATA"):
            state = self._nodes.get(node)
            return data_readings(
                item, state, registry, store_transient=self._store_transient, skipped=out.skipped
            )
        state = self._nodes.get(node)
        if kind == "NDEATH":
            bd = bd_seq(item.decoded)
            death = ndeath(state, bd) if state is not None else None
            at = item.received_us
            what = f"NDEATH bdSeq {bd}"
        else:  # DDEATH
            device, ms = item.topic.device or "", item.decoded.timestamp
            death = ddeath(state, device, ms=ms) if state is not None else None
            at = item.received_us if ms is None else ms * 1000
            what = f"DDEATH of {device!r}"
        if death is None:
            out.deaths_ignored += 1
            log.info(
                "sparkplug node %s: %s changes nothing (offline, or another birth)", node, what
            )
            return None
        self._nodes[node], stale = death
        changed.add(node)
        out.stale_rows += len(stale)
        return stale_readings(at, stale)

    def _birth(self, item: Item, registry: Registry, changed: set[str], out: Prepared) -> Columns:
        topic, ms = item.topic, item.decoded.timestamp
        columns, metrics = birth_readings(
            item, registry, store_transient=self._store_transient, skipped=out.skipped
        )
        old = self._nodes.get(topic.node)
        if topic.kind == "NBIRTH":
            state = nbirth(old, metrics, bd_seq=bd_seq(item.decoded), ms=ms)
        else:
            state = dbirth(old, topic.device or "", metrics, ms=ms)
        if state is not None:
            self._nodes[topic.node] = state
            changed.add(topic.node)
        else:
            log.info("sparkplug node %s: %s older than the last birth", topic.node, topic.kind)
        return columns
