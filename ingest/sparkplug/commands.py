"""Rebirth requests: NCMD `Node Control/Rebirth` = true to an edge node whose alias is unknown.

Optional (`sparkplug.rebirth`), best effort, at most once per 5 s per edge node, published
through aiomqtt's public API on a connection of its own (QoS 0, as Sparkplug commands are).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Final
from urllib.parse import unquote, urlsplit

import aiomqtt

from ingest.sparkplug.encode import Metric, encode_payload

log = logging.getLogger(__name__)

__all__ = ["RebirthRequester", "rebirth_payload"]

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
