"""Sparkplug test helpers: one ingester's Sparkplug stage against the real database."""

from __future__ import annotations

import math
import time
from typing import Any

import asyncpg

from ingest.db.registry import Registry
from ingest.sparkplug.stage import Item, Prepared, SparkplugStage

WINDOW = (0, 2**62)


class Instance:
    """One ingester's Sparkplug state, committing its node states like the sink would."""

    def __init__(self, **stage: Any) -> None:
        self.stage = SparkplugStage(**stage)
        self.registry = Registry()
        self.index = 0

    def accept(self, topic: str, data: bytes, *, received_us: int | None = None) -> Item:
        item = self.stage.accept(
            index=self.index,
            topic=topic,
            payload=data,
            received_us=time.time_ns() // 1000 if received_us is None else received_us,
            window=WINDOW,
            max_metrics=1000,
        )
        assert item is not None
        self.index += 1
        return item

    async def prepare(
        self, conn: asyncpg.Connection, *items: Item, now_us: int | None = None
    ) -> Prepared:
        now = time.time_ns() // 1000 if now_us is None else now_us
        return await self.stage.prepare(conn, items=items, registry=self.registry, now_us=now)

    async def write(self, conn: asyncpg.Connection, prepared: Prepared) -> None:
        async with conn.transaction():
            for upsert in prepared.upserts:
                await conn.execute(upsert.sql, *upsert.columns)
        await self.stage.merge_seq(conn, prepared)
        self.stage.committed(prepared)

    async def flush(
        self, conn: asyncpg.Connection, *items: Item, now_us: int | None = None
    ) -> Prepared:
        prepared = await self.prepare(conn, *items, now_us=now_us)
        await self.write(conn, prepared)
        return prepared

    def rows(self, prepared: Prepared) -> list[tuple[int, str, str, float | None, int]]:
        """The readings as (time, device path, sensor, value (None: NaN), quality), sorted."""
        cols = prepared.columns
        out = []
        for t, s, v, q in zip(cols.time, cols.sensor, cols.value, cols.quality, strict=True):
            device, name = self.registry.name_of(int(s))
            out.append((int(t), device, name, None if math.isnan(v) else float(v), int(q)))
        return sorted(out, key=lambda r: (r[0], r[1], r[2]))

    def named(self, group: str, prepared: Prepared) -> dict[str, float]:
        out = {}
        for sensor, value in zip(prepared.columns.sensor, prepared.columns.value, strict=True):
            out[self.registry.name_of(int(sensor))[1]] = float(value)
        return out
