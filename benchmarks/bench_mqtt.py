"""Micro-benchmark of the MQTT source: CPU per 5 KB message drained from a broker backlog.

A backlog of QoS 1 messages (5 KB payloads, the ``ts`` user property and a content type, as
``ingest simulate`` publishes them) waits in the local Mosquitto for a persistent session; the
source then drains it under uvloop, acknowledging every message as it takes it, and the CPU
time of this process (user + system, every thread) is divided by the messages drained. The
broker and the publisher run in other processes and are not counted.

The baseline, drained in the same run from the same kind of backlog: paho-mqtt's public API
with manual acknowledgement (``manual_ack=True``, ``ack()`` in ``on_message``, its network
thread), the way a hand-written bridge would do it.

Run: ``python -m benchmarks.bench_mqtt`` on the local stack (``INGEST_MQTT_URL``), or under
``make bench``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from ingest.mqtt import MqttSource, Settings
from ingest.mqtt.outgoing import publish_properties
from ingest.sim.publisher import Publisher

MESSAGES = 10_000
PAYLOAD = 5_000
ROUNDS = 3


def _publish_backlog(url: str, prefix: str) -> None:
    payload = os.urandom(PAYLOAD)
    pub = Publisher(url, f"bench-pub-{uuid.uuid4().hex[:8]}")
    try:
        for i in range(MESSAGES):
            props = publish_properties("application/msgpack", [("ts", str(time.time_ns() // 1000))])
            pub.publish(f"{prefix}/site/line/dev{i % 40}", payload, qos=1, properties=props)
        pub.settle(timeout=120.0)
    finally:
        pub.close()


async def _subscribe_once(settings: Any) -> None:
    async with MqttSource(settings=settings) as source:
        waiting = asyncio.ensure_future(anext(source.messages()))
        while not source.connected:  # noqa: ASYNC110 - the source has no event for it
            await asyncio.sleep(0.01)
        waiting.cancel()


async def _drain(settings: Any) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to take and acknowledge MESSAGES messages."""
    cpu, wall = time.process_time(), time.perf_counter()
    async with MqttSource(settings=settings) as source:
        it = source.messages()
        for _ in range(MESSAGES):
            message = await anext(it)
            source.ack(message.token)
        assert await source.flush_acks()
    return time.process_time() - cpu, time.perf_counter() - wall


def _run(coro_fn: Callable[[], Any]) -> Any:
    import uvloop

    return uvloop.run(coro_fn())


def ours(url: str) -> tuple[float, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        url=url,
        client_id=f"bench-src-{uuid.uuid4().hex[:8]}",
        topic_prefix=prefix,
        session_expiry_s=600,
    )
    _run(lambda: _subscribe_once(settings))
    _publish_backlog(url, prefix)
    result: tuple[float, float] = _run(lambda: _drain(settings))
    _purge(url, settings.client_id)
    return result


def _paho_client(url: str, client_id: str, **kwargs: Any) -> tuple[Any, str, int]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    parts = urlsplit(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kwargs
    )
    return client, parts.hostname or "127.0.0.1", parts.port or 1883


def _purge(url: str, client_id: str) -> None:
    client, host, port = _paho_client(url, client_id)
    done = threading.Event()
    client.on_connect = lambda *args: done.set()
    client.connect(host, port, clean_start=True)
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()


def paho(url: str) -> tuple[float, float]:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    client_id = f"bench-paho-{uuid.uuid4().hex[:8]}"
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    props.ReceiveMaximum = 1000

    def session(on_message: Callable[..., None] | None) -> tuple[Any, threading.Event]:
        client, host, port = _paho_client(url, client_id, manual_ack=True)
        subscribed = threading.Event()
        client.on_subscribe = lambda *args: subscribed.set()
        if on_message is not None:
            client.on_message = on_message
        client.connect(host, port, clean_start=False, properties=props)
        client.subscribe(f"{prefix}/#", qos=1)
        return client, subscribed

    client, subscribed = session(None)
    client.loop_start()
    subscribed.wait(10)
    client.disconnect()
    client.loop_stop()
    _publish_backlog(url, prefix)

    done = threading.Event()
    count = [0]

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        c.ack(message.mid, message.qos)
        count[0] += 1
        if count[0] == MESSAGES:
            done.set()

    cpu, wall = time.process_time(), time.perf_counter()
    client, _ = session(on_message)
    client.loop_start()
    done.wait(300)
    client.disconnect()
    client.loop_stop()
    result = time.process_time() - cpu, time.perf_counter() - wall
    _purge(url, client_id)
    return result


def measure(url: str) -> list[str]:
    """Both drains, ROUNDS times each, interleaved; the report's lines."""
    runs: dict[str, list[tuple[float, float]]] = {"our source": [], "paho manual ack": []}
    for _ in range(ROUNDS):
        runs["our source"].append(ours(url))
        runs["paho manual ack"].append(paho(url))
    lines = [f"MQTT drain, {MESSAGES:,} QoS 1 messages of {PAYLOAD:,} bytes, median of {ROUNDS}:"]
    medians = {}
    for name, results in runs.items():
        cpu_us = statistics.median(c for c, _ in results) / MESSAGES * 1e6
        rate = MESSAGES / statistics.median(w for _, w in results)
        medians[name] = cpu_us
        spread = ", ".join(f"{c / MESSAGES * 1e6:.1f}" for c, _ in results)
        lines.append(
            f"  {name:<20} {cpu_us:6.1f} µs CPU per message ({spread}); {rate:,.0f} messages/s"
        )
    ratio = medians["our source"] / medians["paho manual ack"]
    lines.append(f"  source / paho: {ratio:.2f} of paho's CPU per message")
    return lines


class _Summary:
    """Prints the figures after the run, as the other micro-benchmarks do."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section("MQTT source, CPU per message drained")
        for line in self.lines:
            terminalreporter.write_line(line)


def test_mqtt_drain(request: pytest.FixtureRequest) -> None:
    if not request.config.getoption("benchmark_enable", default=False):
        pytest.skip("a benchmark: run with --benchmark-enable (make bench)")
    url = os.environ.get("INGEST_MQTT_URL")
    if not url:
        pytest.skip("INGEST_MQTT_URL is not set: run on the local stack")
    summary = _Summary()
    request.config.pluginmanager.register(summary, "bench_mqtt_summary")
    summary.lines = measure(url)


if __name__ == "__main__":
    for line in measure(os.environ["INGEST_MQTT_URL"]):
        print(line, flush=True)
