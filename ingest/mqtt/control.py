"""The control side of one MQTT v5 client connection: CONNECT, SUBSCRIBE and UNSUBSCRIBE and their
answers, keepalive, writes (the PUBACKs due first), DISCONNECT.

``ingest.mqtt.connection`` builds on it with the reading side: the inbox, its flow control, the
PUBACKs released in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from ingest.errors import IngestError
from ingest.mqtt import outgoing, packets

# The source stage's log name, as operators filter it, whatever the module layout.
logger = logging.getLogger("ingest.source")

_PINGRESP: Final = packets.PINGRESP
# DISCONNECT reason codes this client sends.
MALFORMED: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
PACKET_TOO_LARGE: Final = 0x95


class ConnectionLostError(IngestError):
    """The connection failed, was lost, or the broker refused something; a retry may help."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        """The broker's reason code, where it gave one."""


class RefusedError(ConnectionLostError):
    """The broker answered CONNECT with a refusal (its reason code in ``code``)."""


class Control(asyncio.Protocol):
    """Everything a connection sends, and the control packets it receives (not PUBLISH).

    Requests (CONNECT, SUBSCRIBE, UNSUBSCRIBE) wait for their answers, which the reading side
    hands to ``_control`` with the other control packets. Keepalive sends a PINGREQ after half
    the keepalive without sending anything. ``_resume`` is the reading side's: it reads on
    while an answer is due.
    """

    def __init__(self, *, keepalive_s: int, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.keepalive_s = keepalive_s
        self.timeout_s = timeout_s
        self.session_present = False
        self.subscribed = False
        self.alive = False
        """CONNACK accepted and the connection not lost."""
        self.lost = False
        self.connected_at = 0.0
        self.error: str | None = None
        """Why the connection ended, if not by ``close``."""
        self._transport: asyncio.Transport | None = None
        self._paused = False  # reading stopped at the inbox's bounds
        self._connack: asyncio.Future[tuple[int, bool, dict[int, int | str]]] = (
            self._loop.create_future()
        )
        self._answers: dict[int, asyncio.Future[tuple[list[int], str | None]]] = {}
        self._mid = 0
        self._acks: list[int] = []  # packet ids due a PUBACK, written at the next write
        self._last_sent = 0.0
        self._pings = 0  # PINGREQs without their PINGRESP yet
        self._ping_sent = 0.0  # when the oldest of them went out
        self._timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()

    def _resume(self) -> None:
        """Read on, if reading was stopped (the reading side decides how far)."""

    def _lose(self, exc: Exception | None) -> None:
        """The connection is lost: every request waiting for an answer fails."""
        self.lost = True
        self.alive = False
        if self.error is None and exc is not None:
            self.error = str(exc) or type(exc).__name__
        if self._timer is not None:
            self._timer.cancel()
        failure = ConnectionLostError(f"connection lost ({self.error or 'closed by the broker'})")
        if not self._connack.done():
            self._connack.set_exception(failure)
            self._connack.exception()  # retrieved: the waiter may be gone already
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(failure)
                answer.exception()
        self._answers.clear()

    def _control(self, command: int, body: bytes) -> None:
        kind = command & 0xF0
        if kind == _PINGRESP:
            if self._pings:
                self._pings -= 1
                self._ping_sent = self._loop.time()
        elif kind in (packets.SUBACK, packets.UNSUBACK):
            mid, codes, reason = packets.acks(body)
            if kind == packets.SUBACK:
                # The backlog of a resumed session came before it: from here on, the bounds
                # apply, also to the rest of this chunk.
                self.subscribed = True
            answer = self._answers.pop(mid, None)
            if answer is None:
                raise ValueError(f"an answer to packet id {mid}, which is not waiting for one")
            if not answer.done():
                answer.set_result((codes, reason))
        elif kind == packets.CONNACK and not self._connack.done():
            if len(body) < 2:
                raise ValueError("CONNACK shorter than its header")
            code, props = packets.connack(body)
            self._connack.set_result((code, bool(body[0] & 1), props))
        elif kind == packets.DISCONNECT:
            code, text = packets.parse_disconnect(body)
            self.error = f"the broker disconnected: reason code 0x{code:02x}" + (
                f" ({text})" if text else ""
            )
            self.abort()
        else:
            raise ValueError(f"unexpected packet type 0x{kind:02x}")

    def _fail(self, code: int, reason: str) -> None:
        """A protocol violation by the broker: DISCONNECT with `code`, then close."""
        self.error = reason
        logger.warning("MQTT stream broken (%s); dropping the connection", reason)
        self._write(outgoing.disconnect(code))
        if self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> bool:
        """Write `data` after the PUBACKs due, in one write."""
        transport = self._transport
        if transport is None or self.lost or transport.is_closing():
            return False
        if self._acks:
            data = outgoing.pubacks(self._acks) + data
            self._acks = []
        if not data:
            return True
        transport.write(data)
        self._last_sent = self._loop.time()
        return True

    def _tick(self) -> None:
        """Keepalive: a PINGREQ after half the keepalive without sending anything; the
        connection is dropped when a PINGRESP is overdue, unless reading is stopped at the
        inbox's bounds (the PINGRESP then waits in the socket behind messages not read yet)."""
        now = self._loop.time()
        if self._pings and now - self._ping_sent >= self.keepalive_s and not self._paused:
            self.error = f"no PINGRESP within {self.keepalive_s} s"
            self.abort()
            return
        if now - self._last_sent >= self.keepalive_s / 2 and self._write(outgoing.PINGREQ_PACKET):
            if not self._pings:
                self._ping_sent = now
            self._pings += 1
            self._resume()  # read on until the PINGRESP, within twice the bounds
        self._timer = self._loop.call_later(self.keepalive_s / 2, self._tick)

    async def start(self, connect_packet: bytes) -> dict[int, int | str]:
        """Send CONNECT and wait for CONNACK; its properties. ConnectionLostError if refused."""
        self._write(connect_packet)
        async with asyncio.timeout(self.timeout_s):
            reason, self.session_present, props = await self._connack
        if reason >= 0x80:
            text = props.get(packets.REASON_STRING)
            raise RefusedError(
                f"the broker refused the connection: reason code 0x{reason:02x}"
                + (f" ({text})" if text else ""),
                code=reason,
            )
        server_keepalive = props.get(packets.SERVER_KEEP_ALIVE)
        if isinstance(server_keepalive, int) and server_keepalive:
            self.keepalive_s = server_keepalive
        self.alive = True
        self.connected_at = time.monotonic()
        self._timer = self._loop.call_later(self.keepalive_s / 2, self._tick)
        return props

    def _packet_id(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid

    async def _request(self, make: bytes, mid: int) -> tuple[list[int], str | None]:
        answer: asyncio.Future[tuple[list[int], str | None]] = self._loop.create_future()
        self._answers[mid] = answer
        if not self._write(make):
            self._answers.pop(mid, None)
            raise ConnectionLostError("connection lost")
        self._resume()  # read on until the answer, within twice the bounds
        try:
            async with asyncio.timeout(self.timeout_s):
                return await answer
        finally:
            self._answers.pop(mid, None)

    async def subscribe(self, filters: list[tuple[str, int]]) -> tuple[list[int], str | None]:
        """SUBSCRIBE to (filter, options byte) pairs in one packet; the SUBACK's reason codes
        (one per filter) and reason string."""
        mid = self._packet_id()
        return await self._request(outgoing.subscribe_many(mid=mid, filters=filters), mid)

    async def unsubscribe(self, topic_filters: list[str]) -> tuple[list[int], str | None]:
        """UNSUBSCRIBE; the UNSUBACK's reason codes and reason string."""
        mid = self._packet_id()
        return await self._request(outgoing.unsubscribe(mid=mid, topic_filters=topic_filters), mid)

    def abort(self) -> None:
        """Drop the connection without waiting."""
        self.alive = False
        if self._transport is not None:
            self._transport.abort()

    async def close(self, reason: int = 0, *, session_expiry_s: int | None = None) -> None:
        """DISCONNECT after every PUBACK already queued, then wait for the socket to close.

        ``session_expiry_s`` replaces the session's expiry (0: the broker ends the session now).
        """
        self.alive = False
        if self._transport is None or self.lost:
            return
        self._write(outgoing.disconnect(reason, session_expiry_s=session_expiry_s))
        self._transport.close()
        try:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.shield(self._closed)
        except TimeoutError:
            logger.warning("MQTT disconnect was not clean: the socket did not close in time")
            self._transport.abort()
