"""What a flush writes besides its readings: registry last-seen times, rollups, anomaly events."""

from __future__ import annotations

import asyncpg
import numpy as np

from ingest.config import Config
from ingest.registry import LAST_SEEN_SQL, Registry
from ingest.sink import Readings, Upsert


def segment_ends(sensor: np.ndarray) -> np.ndarray:
    """Index of the last row of each sensor's run in a slab sorted by sensor."""
    if not len(sensor):
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.append(sensor[1:] != sensor[:-1], True))


class Deriver:
    """Computes a flush's extra writes, transactionally. Called from the writer task only.

    `prepare` may read the database; `derive` never awaits and is called inside the flush's
    transaction with the rows that were new; `commit` or `abandon` follows the transaction.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._registry: Registry | None = None
        self._last_seen: list[int] = []

    def warm_up(self) -> None:
        """Compile (or load from cache) every kernel before the first message."""

    async def prepare(
        self, conn: asyncpg.Connection, *, readings: Readings, registry: Registry
    ) -> None:
        self._registry = registry

    def derive(self, new: Readings) -> list[tuple[str, Upsert]]:
        out: list[tuple[str, Upsert]] = []
        if self._registry is not None and len(new):
            ends = segment_ends(new.sensor)
            due = set(self._registry.last_seen_due(new.sensor[ends].tolist()))
            self._last_seen = sorted(due)
            if due:
                pick = [i for i in ends.tolist() if int(new.sensor[i]) in due]
                out.append(
                    (
                        "last_seen",
                        Upsert(
                            LAST_SEEN_SQL, (new.sensor[pick].tolist(), _timestamps(new.time[pick]))
                        ),
                    )
                )
        return out

    def commit(self) -> None:
        self._last_seen = []

    def abandon(self) -> None:
        if self._registry is not None:
            self._registry.forget_last_seen(self._last_seen)
        self._last_seen = []


def _timestamps(us: np.ndarray) -> list[object]:
    from datetime import UTC, datetime, timedelta

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return [epoch + timedelta(microseconds=int(u)) for u in us.tolist()]
