"""The pipeline's acknowledgement step and its metric, with a stand-in for the source."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
from prometheus_client import REGISTRY

from ingest import config, metrics
from ingest.flush import FlushJob
from ingest.mqtt import AckToken, Received
from ingest.pipeline import Pipeline

ACKED = "ingest_messages_acknowledged_total"


class _Source:
    """Takes the acknowledgements of connection 2 only, as the source does after a reconnect."""

    def __init__(self) -> None:
        self.offered: list[AckToken] = []

    def ack(self, token: AckToken) -> bool:
        self.offered.append(token)
        return token.generation == 2

    def ack_all(self, tokens: Iterable[AckToken]) -> int:
        return sum(self.ack(token) for token in tokens)


def _received(generation: int, seq: int) -> Received:
    token = AckToken(generation=generation, seq=seq, mid=seq + 1, qos=1)
    return Received(f"t/d{seq}", b"", None, 0, None, token)


async def test_acknowledged_metric_counts_only_the_acknowledgements_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = config.load(env={"INGEST_DB_URL": "postgresql://ingest@127.0.0.1:1/none"})
    pipeline = Pipeline(cfg, health=metrics.Health())
    source = _Source()
    monkeypatch.setattr(pipeline, "source", source)

    async def committed(job: FlushJob) -> None:
        pass

    monkeypatch.setattr(pipeline.writer, "write", committed)
    # Received on connection 1, committed after the reconnect (connection 2): the broker
    # refuses nothing, but those acknowledgements are void; it delivers the messages again.
    job = FlushJob(received=[_received(1, 0), _received(2, 0), _received(1, 1), _received(2, 1)])
    before = REGISTRY.get_sample_value(ACKED) or 0.0
    writer = asyncio.create_task(pipeline._writer())
    await pipeline._queue.put(job)
    await pipeline._queue.put(None)
    async with asyncio.timeout(10):
        await writer
    assert [t.generation for t in source.offered] == [1, 2, 1, 2]  # every one is offered
    assert (REGISTRY.get_sample_value(ACKED) or 0.0) - before == 2
