"""Connections for the MQTT source: connect, subscribe (or unsubscribe when leaving), and retry
with capped, jittered exponential backoff; reconnects logged and counted."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Sequence

from ingest.mqtt import outgoing
from ingest.mqtt.connection import Connection
from ingest.mqtt.control import ConnectionLostError, RefusedError
from ingest.mqtt.received import maximum_packet_size
from ingest.mqtt.refusals import connack_error
from ingest.mqtt.settings import Settings, parse_url
from ingest.mqtt.subscribing import subscribe, unsubscribe_stale

# The source stage's log name, as operators filter it, whatever the module layout.
logger = logging.getLogger("ingest.source")


class Connecting:
    """The connecting side of ``ingest.mqtt.source.MqttSource``: its session's settings, the
    current connection, and the connect task's loop of attempts."""

    def __init__(
        self,
        *,
        settings: Settings,
        max_payload_bytes: int,
        max_queued_bytes: int,
        on_reconnect: Callable[[], None] | None,
        extra_filters: Sequence[str],
    ) -> None:
        self._settings = settings
        self._endpoint = parse_url(settings.url)
        self._client_id = settings.session_client_id
        self._topic_filter = settings.topic_filter
        group = settings.share_group
        self._extra_filters = [f"$share/{group}/{f}" if group else f for f in extra_filters]
        self._topic_filters = [self._topic_filter, *self._extra_filters]
        self._max_packet = maximum_packet_size(max_payload_bytes)
        self._max_queued_bytes = max_queued_bytes
        self._connect_packet = outgoing.connect(
            client_id=self._client_id,
            username=self._endpoint.username,
            password=self._endpoint.password,
            keepalive=settings.keepalive_s,
            clean_start=False,
            session_expiry_s=settings.session_expiry_s,
            receive_maximum=settings.receive_maximum,
            maximum_packet_size=self._max_packet,
        )
        self._on_reconnect = on_reconnect
        self._stale: list[str] = []
        self._unsubscribed: asyncio.Future[list[str]] | None = None
        self._leaving = False
        self.session_present: bool | None = None
        """Whether the broker had a session for this client id at the first connection."""
        self._tls: ssl.SSLContext | None = None
        self._conn: Connection | None = None
        self._generation = 0
        self._ever_connected = False
        self._failures = 0
        self._delay = 0.0
        self.reconnects = 0
        """Successful connections after the first one."""

    def _backoff(self) -> float:
        """Capped exponential backoff with jitter: a random value in [delay/2, delay]."""
        settings = self._settings
        exponent = min(self._failures - 1, 32)
        delay = min(settings.reconnect_max_s, settings.reconnect_min_s * 2.0**exponent)
        return delay * random.uniform(0.5, 1.0)

    async def _connect(self) -> Connection:
        """Connect and subscribe, retrying with backoff; runs as a task owned by the source."""
        while True:
            if self._delay > 0:
                await asyncio.sleep(self._delay)
            try:
                conn = await self._connect_once()
            except (ConnectionLostError, OSError, TimeoutError) as exc:
                self._failures += 1
                self._delay = self._backoff()
                logger.warning(
                    "MQTT connect to %s failed (%s); retrying in %.2f s",
                    self._endpoint.redacted,
                    str(exc) or type(exc).__name__,
                    self._delay,
                )
                continue
            self._delay = 0.0
            self._conn = conn
            first = not self._ever_connected
            self._ever_connected = True
            if not first and not conn.session_present:
                logger.warning(
                    "MQTT broker %s had no session for %r: what was published while it was "
                    "disconnected is lost (session expired, or the broker lost its state)",
                    self._endpoint.redacted,
                    self._client_id,
                )
            logger.info(
                "MQTT %s to %s as %r, subscribed to %r (session present: %s)",
                "connected" if first else "reconnected",
                self._endpoint.redacted,
                self._client_id,
                self._topic_filter,
                conn.session_present,
            )
            if not first:
                self.reconnects += 1
                if self._on_reconnect is not None:
                    try:
                        self._on_reconnect()
                    except Exception:
                        logger.exception("on_reconnect callback failed")
            return conn

    async def _connect_once(self) -> Connection:
        settings, endpoint = self._settings, self._endpoint
        self._generation += 1
        conn = Connection(
            generation=self._generation,
            receive_maximum=settings.receive_maximum,
            max_queued_bytes=self._max_queued_bytes,
            maximum_packet_size=self._max_packet,
            keepalive_s=settings.keepalive_s,
            timeout_s=settings.timeout_s,
        )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(settings.timeout_s):
                await loop.create_connection(
                    lambda: conn,
                    endpoint.host,
                    endpoint.port,
                    ssl=self._tls,
                    server_hostname=endpoint.host if self._tls is not None else None,
                )
            await conn.start(self._connect_packet)
            if self.session_present is None:
                self.session_present = conn.session_present
            if self._leaving:
                await conn.unsubscribe(self._topic_filters)
            else:
                if self._stale:
                    await self._unsubscribe_stale(conn)
                await self._subscribe(conn)
        except RefusedError as exc:
            conn.abort()
            fatal = connack_error(exc.code, endpoint.redacted)
            if fatal is not None:
                raise fatal from exc
            raise
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _unsubscribe_stale(self, conn: Connection) -> None:
        gone = await unsubscribe_stale(conn, self._stale, self._endpoint.redacted, self._client_id)
        self._stale = []
        if self._unsubscribed is not None and not self._unsubscribed.done():
            self._unsubscribed.set_result(gone)

    async def _subscribe(self, conn: Connection) -> None:
        await subscribe(conn, self._topic_filter, self._extra_filters)
