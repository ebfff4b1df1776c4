"""The tests' own MQTT peer, independent of ingest.mqtt: paho clients and source helpers.

One publisher (`Publisher`, and `publish` for a list of messages), one session purger
(`purge_session`), a session probe, a subscriber that records what arrives (`MqttWatch`), a
client that takes a session over (`Intruder`), and a collector of an `ingest.mqtt` source's
messages for the source's own tests.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.mqtt import MqttSource, Received
from tests.support import SupportError

TIMEOUT = 10.0  # for one step of a test: a CONNACK, the next message
PUBLISH_TIMEOUT = 60.0  # for the broker to acknowledge everything a test published


class Outgoing(NamedTuple):
    """One message to publish at QoS 1 (a plain (topic, payload, content type) tuple will do)."""

    topic: str
    payload: bytes
    content_type: str | None = None
    ts_us: int | None = None  # sent as the user property `ts`


def _client(url: str, client_id: str, **kwargs: Any) -> tuple[mqtt.Client, str, int]:
    """A paho MQTT v5 client for `url` (credentials and TLS from the URL), not yet connected."""
    parts = urlsplit(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kwargs
    )
    if parts.username:
        client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
    return client, parts.hostname or "127.0.0.1", parts.port or 1883


class Publisher:
    """A plain paho client publishing at QoS 1; `wait` returns once the broker acknowledged
    everything published so far. Connected (CONNACK received) when constructed."""

    def __init__(
        self, url: str, *, client_id: str | None = None, ca_file: Path | None = None
    ) -> None:
        client_id = client_id or f"pub-{uuid.uuid4().hex[:8]}"
        self._client, host, port = _client(url, client_id)
        self._client.max_inflight_messages_set(500)
        self._client.max_queued_messages_set(0)
        if urlsplit(url).scheme == "mqtts":
            self._client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        connected = threading.Event()
        self._client.on_connect = lambda *args: connected.set()
        self._client.connect(host, port)
        self._client.loop_start()
        if not connected.wait(PUBLISH_TIMEOUT):
            self._client.loop_stop()
            raise SupportError(f"the publisher got no CONNACK from {host}:{port}")
        self._pending: list[mqtt.MQTTMessageInfo] = []

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        content_type: str | None = None,
        ts_us: int | None = None,
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if content_type is not None:
            props.ContentType = content_type
        if ts_us is not None:
            props.UserProperty = ("ts", str(ts_us))
        info = self._client.publish(topic, payload, qos=1, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued
            raise SupportError(f"publish to {topic[:80]!r}: rc {info.rc}")
        self._pending.append(info)

    def wait(self, timeout: float = PUBLISH_TIMEOUT) -> None:
        """Block until the broker acknowledged everything published so far."""
        for info in self._pending:
            info.wait_for_publish(timeout=timeout)
            if not info.is_published():
                raise SupportError(f"message {info.mid} not acknowledged by the broker in time")
        self._pending.clear()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._client.disconnect()
            self._client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Message = Outgoing | tuple[str, bytes, str | None]


def publish_sync(
    url: str,
    messages: Iterable[Message],
    *,
    client_id: str | None = None,
    ca_file: Path | None = None,
) -> None:
    """Publish at QoS 1 and return once the broker has acknowledged every message."""
    with Publisher(url, client_id=client_id, ca_file=ca_file) as pub:
        for message in messages:
            m = Outgoing(*message)
            pub.publish(m.topic, m.payload, content_type=m.content_type, ts_us=m.ts_us)


async def publish(
    url: str,
    messages: Iterable[Message],
    *,
    client_id: str | None = None,
    ca_file: Path | None = None,
) -> None:
    """`publish_sync` in a thread, so the event loop keeps running (sources, metrics polls)."""
    await asyncio.to_thread(publish_sync, url, list(messages), client_id=client_id, ca_file=ca_file)


def _connack(url: str, client_id: str, **connect: Any) -> bool:
    """Connect as `client_id` (reconnect off), disconnect at once: the CONNACK's session
    present flag."""
    client, host, port = _client(url, client_id, reconnect_on_failure=False)
    answer: list[bool] = []
    done = threading.Event()

    def on_connect(client: mqtt.Client, userdata: object, flags: Any, *rest: object) -> None:
        answer.append(bool(flags.session_present))
        done.set()

    client.on_connect = on_connect
    client.connect(host, port, **connect)
    client.loop_start()
    try:
        if not done.wait(timeout=TIMEOUT * 3):
            raise SupportError(f"no CONNACK for {client_id}")
    finally:
        client.disconnect()
        client.loop_stop()
    return answer[0]


def purge_session(url: str, client_id: str) -> None:
    """End the broker-side session of `client_id` (clean start, session expiry 0)."""
    _connack(url, client_id, clean_start=True)


def session_present(url: str, client_id: str) -> bool:
    """Whether the broker held a session for `client_id`. The probe resumes it without a clean
    start and with session expiry 0, so it ends any session it finds."""
    return _connack(url, client_id, clean_start=False)


class Intruder:
    """A paho client that takes over a session by client id and never acknowledges anything."""

    def __init__(self, url: str, client_id: str) -> None:
        self._client, self._host, self._port = _client(
            url, client_id, manual_ack=True, reconnect_on_failure=False
        )
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


class MqttWatch:
    """A plain paho subscriber (not the ingester's code) recording what arrives on a filter."""

    def __init__(self, url: str, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client, host, port = _client(url, f"watch-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._subscribed.wait(TIMEOUT):
            raise SupportError("the MQTT watcher did not get its subscription")

    def _on_message(self, client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def received(self) -> list[tuple[str, bytes, bool]]:
        """(topic, payload, retained) of each message so far, in arrival order."""
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# ------------------------------------------------------------------------------ our source


class Collector:
    """Iterates `source.messages()` in a task, so tests can wait for messages with timeouts."""

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
        """Exactly the next `n` messages, in arrival order; fails after `timeout_s`."""
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
        """Messages up to and including the first with `payload`."""
        taken: list[Received] = []
        async with asyncio.timeout(timeout_s):
            while not taken or taken[-1].payload != payload:
                taken += await self.take(1)
        return taken

    async def assert_idle(self, *, window: float = 0.3) -> None:
        """Nothing more arrives: a broker round trip, then a short quiet window.

        After `flush_acks` returns, every PUBLISH the broker wrote before its UNSUBACK has
        been received; the window only lets the collector task move them over.
        """
        assert await self.source.flush_acks()
        await asyncio.sleep(window)
        extra = []
        while not self.queue.empty():
            extra.append(self.queue.get_nowait().payload)
        assert extra == [], f"unexpected messages: {extra}"


async def until(predicate: Callable[[], object], *, timeout_s: float = TIMEOUT) -> None:
    """Wait until `predicate()` is true, polling; fails after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


async def wait_connected(source: MqttSource) -> None:
    """Wait until the source is connected and subscribed (polls its health flag)."""
    await until(lambda: source.connected)
