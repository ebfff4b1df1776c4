"""MQTT test helpers: a plain paho publisher and session tools, independent of ingest.mqtt."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.mqtt import MqttSource, Received

TIMEOUT = 10.0


@dataclass(frozen=True)
class Outgoing:
    """One message to publish at QoS 1."""

    topic: str
    payload: bytes
    content_type: str | None = None
    ts_us: int | None = None


def _client(url: str, client_id: str, **kwargs: Any) -> tuple[mqtt.Client, str, int]:
    parts = urlsplit(url)
    assert parts.scheme == "mqtt", "the tests use a plain mqtt:// broker"
    assert parts.hostname
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
        **kwargs,
    )
    if parts.username:
        client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
    return client, parts.hostname, parts.port or 1883


def publish_sync(url: str, messages: Iterable[Outgoing], *, client_id: str) -> None:
    """Publish at QoS 1 and return once the broker has acknowledged every message."""
    client, host, port = _client(url, client_id)
    client.max_inflight_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    try:
        infos = []
        for m in messages:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if m.content_type is not None:
                props.ContentType = m.content_type
            if m.ts_us is not None:
                props.UserProperty = ("ts", str(m.ts_us))
            info = client.publish(m.topic, m.payload, qos=1, properties=props)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
            infos.append(info)
        for info in infos:
            info.wait_for_publish(timeout=TIMEOUT)
            assert info.is_published(), "the broker did not acknowledge a publish in time"
    finally:
        client.disconnect()
        client.loop_stop()


async def publish(url: str, messages: Iterable[Outgoing], *, client_id: str) -> None:
    """``publish_sync`` in a thread, so the event loop keeps serving the sources under test."""
    await asyncio.to_thread(publish_sync, url, list(messages), client_id=client_id)


def purge_session_sync(url: str, client_id: str) -> None:
    """End the broker-side session of ``client_id`` (clean start, session expiry 0)."""
    client, host, port = _client(url, client_id)
    done = threading.Event()
    client.on_connect = lambda *args: done.set()
    client.connect(host, port, clean_start=True)
    client.loop_start()
    try:
        assert done.wait(timeout=TIMEOUT), f"no CONNACK for {client_id}"
    finally:
        client.disconnect()
        client.loop_stop()


def session_present_sync(url: str, client_id: str) -> bool:
    """Whether the broker held a session for ``client_id``. The probe resumes it without a
    clean start and with session expiry 0, so it ends any session it finds."""
    client, host, port = _client(url, client_id)
    answer: list[bool] = []
    done = threading.Event()

    def on_connect(client: mqtt.Client, userdata: object, flags: Any, *rest: object) -> None:
        answer.append(bool(flags.session_present))
        done.set()

    client.on_connect = on_connect
    client.connect(host, port, clean_start=False)
    client.loop_start()
    try:
        assert done.wait(timeout=TIMEOUT), f"no CONNACK for {client_id}"
    finally:
        client.disconnect()
        client.loop_stop()
    return answer[0]


class Intruder:
    """A paho client that takes over a session by client id and never acknowledges anything."""

    def __init__(self, url: str, client_id: str) -> None:
        self._client, self._host, self._port = _client(url, client_id, manual_ack=True)
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self._client.on_connect = lambda *args: self.connected.set()
        self._client.on_disconnect = lambda *args: self.disconnected.set()

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        self._client.connect(self._host, self._port, clean_start=False, properties=props)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Collector:
    """Iterates ``source.messages()`` in a task, so tests can wait for messages with timeouts."""

    def __init__(self, source: MqttSource) -> None:
        self.source = source
        self.queue: asyncio.Queue[Received] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run(), name="collector")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.wait([self._task])

    async def _run(self) -> None:
        async for message in self.source.messages():
            self.queue.put_nowait(message)

    async def take(self, n: int, *, timeout_s: float = TIMEOUT) -> list[Received]:
        """Exactly the next ``n`` messages, in arrival order; fails after ``timeout_s``."""
        assert self._task is not None
        taken: list[Received] = []
        async with asyncio.timeout(timeout_s):
            while len(taken) < n:
                get = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({get, self._task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self._task.result()  # raises what ended the iteration
                    raise AssertionError("messages() ended")
                taken.append(get.result())
        return taken

    async def take_until(self, payload: bytes, *, timeout_s: float = TIMEOUT) -> list[Received]:
        """Messages up to and including the first with ``payload``."""
        taken: list[Received] = []
        async with asyncio.timeout(timeout_s):
            while not taken or taken[-1].payload != payload:
                taken += await self.take(1)
        return taken

    async def assert_idle(self, *, window: float = 0.3) -> None:
        """Nothing more arrives: a broker round trip, then a short quiet window.

        After ``flush_acks`` returns, every PUBLISH the broker wrote before its UNSUBACK has
        been received; the window only lets the collector task move them over.
        """
        assert await self.source.flush_acks()
        await asyncio.sleep(window)
        extra = [m.payload for m in _drain(self.queue)]
        assert extra == [], f"unexpected messages: {extra}"


def _drain(queue: asyncio.Queue[Received]) -> list[Received]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def until(predicate: Callable[[], object], *, timeout_s: float = TIMEOUT) -> None:
    """Wait until ``predicate()`` is true, polling; fails after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


async def wait_connected(source: MqttSource) -> None:
    """Wait until the source is connected and subscribed (polls its health flag)."""
    await until(lambda: source.connected)
