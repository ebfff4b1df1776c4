"""What the ingester publishes to Sparkplug edge nodes, through aiomqtt's public API.

- Rebirth requests (`sparkplug.rebirth`): NCMD `Node Control/Rebirth` = true to an edge node
  whose alias is unknown, best effort, at most once per 5 s per node, QoS 0 as Sparkplug
  commands are.
- Host Application state (`sparkplug.host_id`): `spBv1.0/STATE/<host id>`, retained, QoS 1,
  JSON `{"online": ..., "timestamp": ...}`, with the offline state as will message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Final
from urllib.parse import unquote, urlsplit

import aiomqtt
import msgspec

from ingest.sparkplug.encode import Metric, encode_payload

log = logging.getLogger(__name__)

__all__ = ["HostApplication", "RebirthRequester", "rebirth_payload"]

MIN_INTERVAL_S: Final = 5.0
_QUEUE: Final = 1000


def rebirth_payload(now_ms: int) -> bytes:
    return encode_payload(
        timestamp=now_ms,
        seq=None,
        metrics=[Metric("Node Control/Rebirth", timestamp=now_ms, datatype=11, value=True)],
    )


class RebirthRequester:
    """`want` is called from the writer task (never awaits); `run` publishes, in a task of
    its own, reconnecting after a broker failure, until cancelled."""

    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        tls_ca_file: str | None = None,
        min_interval_s: float = MIN_INTERVAL_S,
    ) -> None:
        self._url = url
        self._client_id = client_id
        self._ca = tls_ca_file
        self._interval = min_interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=_QUEUE)
        self.sent = 0

    def want(self, group: str, edge: str) -> None:
        """Ask for a rebirth of the edge node unless one was asked within the interval."""
        now = time.monotonic()
        key = (group, edge)
        if now - self._last.get(key, -1e18) < self._interval:
            return
        try:
            self._queue.put_nowait(key)
        except asyncio.QueueFull:  # best effort: the next unknown alias asks again
            return
        self._last[key] = now

    def pending(self) -> int:
        """Requests waiting to be published."""
        return self._queue.qsize()

    async def run(self) -> None:
        parts = urlsplit(self._url)
        tls = None
        if parts.scheme.lower() == "mqtts":
            tls = await asyncio.to_thread(ssl.create_default_context, cafile=self._ca)
        delay = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    parts.hostname or "127.0.0.1",
                    parts.port or (8883 if tls else 1883),
                    username=None if parts.username is None else unquote(parts.username),
                    password=None if parts.password is None else unquote(parts.password),
                    identifier=self._client_id,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    tls_context=tls,
                ) as client:
                    delay = 0.5
                    while True:
                        group, edge = await self._queue.get()
                        topic = f"spBv1.0/{group}/NCMD/{edge}"
                        await client.publish(topic, rebirth_payload(time.time_ns() // 1_000_000))
                        self.sent += 1
                        log.info("sparkplug: asked edge node %s/%s for a rebirth", group, edge)
            except aiomqtt.MqttError as exc:
                log.warning("sparkplug rebirth requests: %s; reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


def _endpoint(url: str) -> tuple[str, int, str | None, str | None, bool]:
    parts = urlsplit(url)
    tls = parts.scheme.lower() == "mqtts"
    return (
        parts.hostname or "127.0.0.1",
        parts.port or (8883 if tls else 1883),
        None if parts.username is None else unquote(parts.username),
        None if parts.password is None else unquote(parts.password),
        tls,
    )


class HostApplication:
    """The ingester as a Sparkplug Host Application. `run` holds the connection (a task of its
    own, reconnecting, until cancelled); `offline` publishes the offline state before a clean
    stop, since a clean disconnect does not send the will."""

    def __init__(
        self, *, url: str, client_id: str, host_id: str, tls_ca_file: str | None = None
    ) -> None:
        self._url = url
        self._client_id = client_id
        self._ca = tls_ca_file
        self.topic = f"spBv1.0/STATE/{host_id}"
        self._client: aiomqtt.Client | None = None
        self._since = 0

    def _state(self, *, online: bool) -> bytes:
        return msgspec.json.encode({"online": online, "timestamp": self._since})

    async def run(self) -> None:
        host, port, username, password, tls = _endpoint(self._url)
        context = None
        if tls:
            context = await asyncio.to_thread(ssl.create_default_context, cafile=self._ca)
        delay = 0.5
        while True:
            self._since = time.time_ns() // 1_000_000
            will = aiomqtt.Will(self.topic, self._state(online=False), qos=1, retain=True)
            try:
                async with aiomqtt.Client(
                    host,
                    port,
                    username=username,
                    password=password,
                    identifier=self._client_id,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    tls_context=context,
                    will=will,
                ) as client:
                    await client.publish(self.topic, self._state(online=True), qos=1, retain=True)
                    self._client = client
                    delay = 0.5
                    await asyncio.Event().wait()  # until cancelled
            except aiomqtt.MqttError as exc:
                log.warning("sparkplug host state: %s; reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            finally:
                self._client = None

    async def offline(self) -> None:
        """Publish the offline state (best effort, a few seconds at most)."""
        client = self._client
        if client is None:
            return
        try:
            async with asyncio.timeout(5):
                await client.publish(self.topic, self._state(online=False), qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("sparkplug host state: offline not published: %s", exc)
