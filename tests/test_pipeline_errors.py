"""The writer's errors: defects reported as what they are, and a device's sensor cap."""

from __future__ import annotations

import time
import uuid

import pytest

from ingest import config, metrics
from ingest.db.sink import Readings
from ingest.decode import DecodeLimits, decode_batch
from ingest.errors import InternalError
from ingest.flush import Accepted, FlushJob
from ingest.pipeline import Pipeline
from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env
from tests.support.mqtt import Publisher
from tests.support.rows import dead_letters, stored
from tests.support.streams import T0, batch_payload, f8


def _job(site: str) -> FlushJob:
    payload = batch_payload(T0, [{"s": "temp", "dt": 1000, "v": f8([1.0, 2.0])}])
    batch = decode_batch(
        payload, content_type=None, limits=DecodeLimits(max_payload_bytes=1 << 20), now_us=T0
    )
    job = FlushJob()
    job.accepted.append(Accepted((site, "dev-1"), batch))
    job.readings = batch.readings
    return job


@pytest.mark.parametrize("stage", ["resolve", "prepare"])
async def test_a_defect_is_reported_as_itself_and_keeps_the_connection(
    database: Database, mqtt_url: str, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config.load(env=ingester_env(database, mqtt_url, "unused"))
    pipeline = Pipeline(cfg, health=metrics.Health())

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug of ours")

    if stage == "resolve":
        monkeypatch.setattr(pipeline.registry, "message_ids", broken)
    else:

        async def prepare(conn: object, *, readings: Readings) -> None:
            broken()

        monkeypatch.setattr(pipeline.deriver, "prepare", prepare)
    await pipeline.writer.sinks[0].connect()
    try:
        with pytest.raises(InternalError) as caught:
            await pipeline.writer.write_once(
                _job(f"site-{uuid.uuid4().hex[:8]}"), set(), time.time()
            )
        assert str(caught.value) == f"{stage}: ValueError: a bug of ours"
        assert pipeline.writer.sinks[0].connected
    finally:
        await pipeline.writer.sinks[0].close()


async def test_sensors_beyond_a_devices_cap_are_dead_letters(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    site = f"site-{uuid.uuid4().hex[:8]}"
    device = f"{site}/line1/chatty"
    env = ingester_env(database, mqtt_url, prefix, INGEST_LIMITS_MAX_SENSORS_PER_DEVICE="3")
    ingester = await Ingester(env).start()
    payloads = [
        batch_payload(T0, [{"s": n, "dt": 1000, "v": f8([1.0])} for n in ("a", "b")]),
        batch_payload(T0 + 1000, [{"s": n, "dt": 1000, "v": f8([2.0])} for n in ("a", "c")]),
        # A fourth and fifth name: the whole message is refused, its known sensors too.
        batch_payload(T0 + 2000, [{"s": n, "dt": 1000, "v": f8([3.0])} for n in ("a", "d")]),
        batch_payload(T0 + 3000, [{"s": "e", "dt": 1000, "v": f8([4.0])}]),
        batch_payload(T0 + 4000, [{"s": "b", "dt": 1000, "v": f8([5.0])}]),
    ]
    try:
        with Publisher(mqtt_url) as pub:
            for payload in payloads:
                pub.publish(f"{prefix}/{device}", payload)
        await acked_at_least(ingester, len(payloads))
        assert await ingester.metric('ingest_dead_letters_total{field="sensor"}') == 2
    finally:
        assert await ingester.stop() == 0, ingester.log.decode()
    rows = await stored(database, site)
    assert [(r[0] - T0, r[2], r[3]) for r in rows] == [
        (0, "a", 1.0),
        (1000, "a", 2.0),
        (0, "b", 1.0),
        (4000, "b", 5.0),
        (1000, "c", 2.0),
    ]
    letters = await dead_letters(database, prefix)
    assert [(p, r) for _, p, r, _ in letters] == [
        (
            payloads[2],
            f"sensor: device {device} already has 3 sensors (limits.max_sensors_per_device);"
            " 'd' is not registered",
        ),
        (
            payloads[3],
            f"sensor: device {device} already has 3 sensors (limits.max_sensors_per_device);"
            " 'e' is not registered",
        ),
    ]
