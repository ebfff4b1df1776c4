"""The MQTT source stage: one persistent MQTT v5 session, QoS 1, acknowledged only on request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Self

from ingest.mqtt.connecting import Connecting
from ingest.mqtt.connection import Connection
from ingest.mqtt.control import ConnectionLostError
from ingest.mqtt.received import AckToken, Received, maximum_packet_size
from ingest.mqtt.settings import Settings, tls_context

__all__ = ["AckToken", "MqttSource", "Received", "maximum_packet_size"]

# The source stage's log name, as operators filter it, whatever the module layout.
logger = logging.getLogger("ingest.source")


class _Messages:
    """The iterator ``MqttSource.messages()`` returns; each ``__anext__`` is cancellation-safe."""

    def __init__(self, source: MqttSource) -> None:
        self._source = source

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received:
        return await self._source.next_message()


class MqttSource(Connecting):
    """The MQTT source stage: a persistent MQTT v5 session at QoS 1 with manual acknowledgement.

    Use as ``async with MqttSource(settings=...) as source``. Entering does not connect (the
    service must start and wait while the broker is down): the first connection is made by the
    first ``__anext__`` of ``messages()``, and every connection loss is followed by reconnects
    with capped, jittered exponential backoff, forever. Only faults a retry cannot fix leave
    ``messages()``, as ``ConfigError`` (refused credentials or subscription, unreadable TLS files).
    Exiting disconnects cleanly, which flushes the acknowledgements already given.

    Acknowledge each message with ``ack(received.token)`` once its data is committed. Until
    then the broker keeps it. The broker sends at most ``receive_maximum`` unacknowledged
    messages (MQTT v5 Receive Maximum), so stopping to iterate is enough backpressure; the
    source enforces the same bound itself, for brokers that exceed it: it hands out at most
    ``receive_maximum`` unacknowledged messages and queues at most ``receive_maximum`` more,
    or ``max_queued_bytes`` of payload (beyond that it stops reading the socket). After a
    reconnect the broker redelivers the unacknowledged ones, under new tokens; acknowledging a
    token of an earlier connection does nothing.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        max_payload_bytes: int = 1_048_576,
        max_queued_bytes: int = 64 * 1024 * 1024,
        on_reconnect: Callable[[], None] | None = None,
        extra_filters: Sequence[str] = (),
    ) -> None:
        """``max_payload_bytes`` sets the Maximum Packet Size announced to the broker.
        ``extra_filters`` are subscribed besides the prefix's, through the same share group."""
        super().__init__(
            settings=settings,
            max_payload_bytes=max_payload_bytes,
            max_queued_bytes=max_queued_bytes,
            on_reconnect=on_reconnect,
            extra_filters=extra_filters,
        )
        # A filter nobody subscribes to: unsubscribing from it is a side-effect-free round trip.
        self._flush_filter = f"{settings.topic_prefix}/$ingest-ack-flush"
        self._end_session = False
        self._entered = False
        self._closed = False
        self._connector: asyncio.Task[Connection] | None = None

    async def __aenter__(self) -> Self:
        """Load the TLS files (``ConfigError`` if unreadable); does not connect."""
        if self._entered:
            raise RuntimeError("MqttSource is not reentrant")
        if self._endpoint.tls:
            self._tls = await asyncio.to_thread(tls_context, self._settings)
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop connecting and disconnect cleanly; iteration then ends."""
        self._closed = True
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.cancel()
            await asyncio.wait([connector])
            if not connector.cancelled() and connector.exception() is not None:
                logger.debug("MQTT connect failed at close: %s", connector.exception())
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close(session_expiry_s=0 if self._end_session else None)

    @property
    def connected(self) -> bool:
        """Whether a connection is up and subscribed (for health checks)."""
        return self._conn is not None and self._conn.alive

    @property
    def topic_filters(self) -> tuple[str, ...]:
        """Every filter this source subscribes to, share group included."""
        return tuple(self._topic_filters)

    def forget(self, filters: Sequence[str]) -> None:
        """Filters the session may hold from an earlier configuration: the first connection
        that finds the session unsubscribes from them before subscribing. Call before iterating.
        """
        self._stale = [f for f in filters if f not in self._topic_filters]
        self._unsubscribed = asyncio.get_running_loop().create_future() if self._stale else None

    async def forgotten(self) -> list[str]:
        """The filters of `forget` that the session no longer holds: the broker confirmed the
        UNSUBSCRIBE (or had no such subscription), or found no session at all. Waits for the
        first connection that got that far."""
        if self._unsubscribed is None:
            return []
        return await asyncio.shield(self._unsubscribed)

    @property
    def queued(self) -> int:
        """Messages received from the broker and not handed out yet."""
        return 0 if self._conn is None else len(self._conn.inbox)

    @property
    def maximum_packet_size(self) -> int:
        """The Maximum Packet Size this source announces in its CONNECT."""
        return self._max_packet

    def messages(self) -> AsyncIterator[Received]:
        """Messages in arrival order, forever, reconnecting as needed.

        Iterate from one task only. Cancelling a pending ``__anext__`` (a timeout around it) is
        safe: no message is lost and a connection attempt in progress carries on. Raises
        ``ConfigError`` when the broker refuses the credentials or the subscription; ends when
        the source is closed.
        """
        if not self._entered:
            raise RuntimeError("use MqttSource as an async context manager")
        return _Messages(self)

    def ack(self, token: AckToken) -> bool:
        """Acknowledge one message. Never awaits; call it from the event loop's thread.

        Returns ``True`` if the acknowledgement belongs to the current connection: the PUBACK
        is then written, or held until every earlier message of this connection is
        acknowledged too. Returns ``False`` if the connection that delivered the message is gone
        (or the token was already used): the broker redelivers that message after the reconnect,
        under a new token. QoS 0 tokens need no acknowledgement and return ``True``.
        """
        if token.qos == 0:
            return True
        conn = self._conn
        if conn is None or conn.generation != token.generation:
            return False
        return conn.ack(token.seq)

    def ack_all(self, tokens: Iterable[AckToken]) -> int:
        """`ack` for each of `tokens`, in order; how many returned ``True``."""
        conn = self._conn
        done = 0
        seqs = []
        for token in tokens:
            if token.qos == 0:
                done += 1
            elif conn is not None and conn.generation == token.generation:
                seqs.append(token.seq)
        if seqs and conn is not None:
            done += conn.ack_all(seqs)
        return done

    async def flush_acks(self) -> bool:
        """Wait until the broker has processed every PUBACK written so far.

        One UNSUBSCRIBE round trip on the current connection, so it also waits for every message
        the broker sent before. Returns ``False`` if there is no connection (acknowledgements
        the broker did not get are void: it redelivers those messages), or if the answer does
        not come within ``timeout_s``.
        """
        conn = self._conn
        if conn is None or not conn.alive:
            return False
        try:
            await conn.unsubscribe([self._flush_filter])
        except (ConnectionLostError, TimeoutError):
            return False
        return True

    async def leave(self) -> bool:
        """Stop the subscription from taking new messages: UNSUBSCRIBE, and after a reconnect
        unsubscribe again instead of subscribing.

        What the broker already holds for this session (sent, or queued in it) still arrives and
        must be acknowledged as usual. Returns ``True`` once the broker confirmed; ``False`` if
        there is no connection or no answer within ``timeout_s``.
        """
        self._leaving = True
        conn = self._conn
        if conn is None or not conn.alive:
            return False
        try:
            codes, _ = await conn.unsubscribe(self._topic_filters)
        except (ConnectionLostError, TimeoutError):
            return False
        # 0x00 success, 0x11 no subscription existed: either way none is left.
        return all(code < 0x80 for code in codes)

    def end_session_on_close(self) -> None:
        """Make closing end the broker-side session (DISCONNECT with Session Expiry 0), so the
        broker neither keeps nor routes anything to it. Only once nothing is left in it: what
        it still holds is dropped with it."""
        self._end_session = True

    def ready(self) -> Received | None:
        """The next message if one can be handed out without waiting, else None. Never
        awaits; call it from the event loop's thread, in the task iterating ``messages()``."""
        conn = self._conn
        if conn is None or conn.lost or not conn.inbox or conn.handed_out >= conn.limit:
            return None
        return conn.take()

    async def next_message(self) -> Received:
        """The next message (``messages()`` is the public way to iterate)."""
        while True:
            conn = self._conn
            if conn is None:
                conn = await self._connection()
            if conn.lost:
                # What it received and did not hand out yet goes too: the broker sends it again.
                self._lost(conn)
            elif conn.inbox and conn.handed_out < conn.limit:  # the usual case: no await
                return conn.take()
            elif conn.handed_out >= conn.limit:
                # At most receive_maximum unacknowledged messages are handed out, even when
                # the broker sends more (Mosquitto 2.0.11 does).
                conn.progress.clear()
                await conn.progress.wait()
            else:
                await conn.wait()

    async def _connection(self) -> Connection:
        if self._closed:
            raise StopAsyncIteration
        if self._connector is None:
            self._connector = asyncio.create_task(self._connect(), name="mqtt-connect")
        connector = self._connector
        try:
            return await asyncio.shield(connector)
        except asyncio.CancelledError:
            if self._closed_while_connecting():
                raise StopAsyncIteration from None
            raise
        finally:
            if connector.done() and self._connector is connector:
                self._connector = None

    def _closed_while_connecting(self) -> bool:
        """The connect task was cancelled by ``__aexit__``, not this task by its owner."""
        task = asyncio.current_task()
        return self._closed and not (task is not None and task.cancelling())

    def _lost(self, conn: Connection) -> None:
        if self._conn is conn:
            self._conn = None
        if self._closed:
            return
        lived = time.monotonic() - conn.connected_at
        self._failures = 1 if lived >= self._settings.reconnect_max_s else self._failures + 1
        self._delay = self._backoff()
        logger.warning(
            "MQTT connection to %s lost; reconnecting in %.2f s (%s)",
            self._endpoint.redacted,
            self._delay,
            conn.error or "closed by the broker",
        )
