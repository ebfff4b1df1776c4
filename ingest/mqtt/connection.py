"""One MQTT v5 client connection on ``asyncio.Protocol``: inbox, flow control, keepalive, PUBACKs.

Everything here runs in the event loop's thread and nothing but ``get``, ``start``,
``subscribe``, ``unsubscribe`` and ``close`` awaits. The socket is read in the large chunks the
transport delivers; every packet in a chunk is framed here (a run of common PUBLISH packets
by one call of ``ingest.mqtt.framing``, anything else one by one), PUBLISH packets go to the
inbox and the few control packets a subscriber receives are answered on the spot.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Final, cast

import numpy as np

from ingest.errors import IngestError
from ingest.mqtt import framing, outgoing, packets
from ingest.mqtt.ledger import AckLedger
from ingest.mqtt.received import Received, from_publish

# The source stage's log name, as operators filter it, whatever the module layout.
logger = logging.getLogger("ingest.source")

_PINGRESP: Final = packets.PINGRESP
_PUBLISH: Final = packets.PUBLISH
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


class Connection(asyncio.Protocol):
    """One network connection to the broker, as a subscriber with manual acknowledgement.

    - Received PUBLISH packets wait in the inbox (``get``). Reading stops while the inbox holds
      ``receive_maximum`` messages or ``max_queued_bytes`` of payload, until it has drained to
      half of both; TCP flow control then holds the rest at the broker, and nothing is refused
      or reordered. A conforming broker never sends that many unacknowledged messages, but
      Mosquitto 2.0.11 does.
    - Reading does not stop before the SUBACK (with a session present the broker sends its
      backlog first, at most Receive Maximum of it), nor while an answer is due (a PINGRESP, an
      UNSUBACK): then it reads on up to twice the bounds, so that keepalive keeps working while
      intake is paused.
    - ``ack`` releases PUBACKs in arrival order (the ledger), all those due in one write.
    """

    def __init__(
        self,
        *,
        generation: int,
        receive_maximum: int,
        max_queued_bytes: int,
        maximum_packet_size: int,
        keepalive_s: int,
        timeout_s: float,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.generation = generation
        self.limit = receive_maximum
        self.max_queued_bytes = max_queued_bytes
        self.maximum_packet_size = maximum_packet_size
        self.keepalive_s = keepalive_s
        self.timeout_s = timeout_s
        self.ledger = AckLedger()
        """Its QoS 1 messages, from their arrival until PUBACKed (those in the inbox too)."""
        self.inbox: collections.deque[Received] = collections.deque()
        """Received messages not handed out yet, in order, each as the source hands it out."""
        self.queued_bytes = 0
        self._queued_tracked = 0  # messages in the inbox that the ledger tracks
        self.session_present = False
        self.subscribed = False
        self.alive = False
        """CONNACK accepted and the connection not lost."""
        self.lost = False
        self.connected_at = 0.0
        self.error: str | None = None
        """Why the connection ended, if not by ``close``."""
        self.progress = asyncio.Event()
        """Set when the ledger shrinks or the connection ends."""
        self._transport: asyncio.Transport | None = None
        self._buf = b""  # received bytes from self._pos on are not framed yet
        self._pos = 0
        self._stamp = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
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

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._stamp = time.time_ns()
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = data
        self._pos = 0
        self._take()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
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
        self._wake()
        self.progress.set()
        if not self._closed.done():
            self._closed.set_result(None)

    # -- reading --

    def _take(self) -> None:
        """Frame and handle every complete packet received, unless the inbox is full."""
        buf, pos, inbox, stamp = self._buf, self._pos, self.inbox, self._stamp
        limit, max_bytes = self.limit, self.max_queued_bytes
        delivered = False
        data = np.frombuffer(buf, np.uint8)
        try:
            while pos < len(buf):
                if (len(inbox) >= limit or self.queued_bytes >= max_bytes) and self._blocked():
                    self._pause()
                    break
                room = limit - len(inbox)
                if room > 0 and self.queued_bytes < max_bytes:
                    # The usual case: a run of common PUBLISH packets, framed in one call.
                    rows, pos = framing.publishes(
                        data, pos, room, max_bytes - self.queued_bytes, self.maximum_packet_size
                    )
                    if len(rows):
                        nbytes, tracked = framing.to_inbox(
                            inbox,
                            buf,
                            rows.tolist(),
                            stamp,
                            generation=self.generation,
                            ledger=self.ledger,
                        )
                        self.queued_bytes += nbytes
                        self._queued_tracked += tracked
                        delivered = True
                        continue
                # Anything else, one packet at a time.
                framed = packets.frame(buf, pos)
                if framed is None:
                    if len(buf) - pos > self.maximum_packet_size:
                        self._fail(PACKET_TOO_LARGE, "the broker sent a packet over the maximum")
                    break
                command, start, end = framed
                if end - pos > self.maximum_packet_size:
                    self._fail(PACKET_TOO_LARGE, "the broker sent a packet over the maximum")
                    break
                pos = end
                if command & 0xF0 == _PUBLISH:
                    body = buf[start:end]
                    message = packets.parse_publish(command, body)
                    if message is None:
                        message = packets.parse_publish_full(command, body)
                    inbox.append(
                        from_publish(message, stamp, generation=self.generation, ledger=self.ledger)
                    )
                    self.queued_bytes += len(message.payload)
                    self._queued_tracked += message.qos > 0
                    delivered = True
                else:
                    self._control(command, buf[start:end])
                    if self.lost or self._transport is None or self._transport.is_closing():
                        break
        except packets.MalformedPacketError as exc:
            self._fail(MALFORMED, f"malformed packet: {exc}")
        except ValueError as exc:
            self._fail(PROTOCOL_ERROR, str(exc))
        finally:
            self._pos = pos
        if delivered:
            self._wake()

    def _blocked(self) -> bool:
        """Whether reading must stop: the inbox is at its bounds, or at twice them while an
        answer is due (a PINGRESP, SUBACK or UNSUBACK), and the SUBACK was read."""
        queued, nbytes = len(self.inbox), self.queued_bytes
        if queued < self.limit and nbytes < self.max_queued_bytes:
            return False
        if not self.subscribed:
            return False
        if self._pings or self._answers:
            return queued >= 2 * self.limit or nbytes >= 2 * self.max_queued_bytes
        return True

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._transport is not None and not self.lost and not self._blocked():
            self._paused = False
            if self._pings:  # their PINGRESPs could not be read until now
                self._ping_sent = self._loop.time()
            self._transport.resume_reading()
            if self._pos < len(self._buf):
                self._take()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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

    # -- writing and keepalive --

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

    # -- used by the source --

    @property
    def handed_out(self) -> int:
        """QoS 1 messages taken from the inbox and not yet PUBACKed."""
        return len(self.ledger) - self._queued_tracked

    def take(self) -> Received:
        """The next message (the inbox must not be empty). Never awaits.

        Reading stopped at the inbox's bounds resumes once it has drained to half of them:
        then what waits in the socket comes in large reads, framed many packets a call,
        rather than one packet and two flow-control switches per message taken."""
        item = self.inbox.popleft()
        self.queued_bytes -= len(item.payload)
        if item.token.seq >= 0:
            self._queued_tracked -= 1
        if (
            self._paused
            and 2 * len(self.inbox) <= self.limit
            and 2 * self.queued_bytes <= self.max_queued_bytes
        ):
            self._resume()
        return item

    async def wait(self) -> None:
        """Wait until the inbox holds a message or the connection has ended.

        Cancellation loses nothing. Call from one task.
        """
        if self.inbox or self.lost:
            return
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def ack(self, seq: int) -> bool:
        """Acknowledge message `seq`. The PUBACKs it releases are written at the end of this
        turn of the event loop, together with all others released meanwhile, in one write.

        ``False`` once the connection is being dropped or closed, even before the transport
        reports it lost: a PUBACK written then would never reach the broker."""
        if self.lost or not self.alive:
            return False
        released = self.ledger.ack(seq)
        if released is None:
            return False
        if released:
            if not self._acks:
                self._loop.call_soon(self._write, b"")
            self._acks += released
            self.progress.set()
        return True

    def ack_all(self, seqs: list[int]) -> int:
        """`ack` for each of `seqs`, in order; how many returned ``True``."""
        if self.lost or not self.alive:
            return 0
        done, released = self.ledger.ack_many(seqs)
        if released:
            if not self._acks:
                self._loop.call_soon(self._write, b"")
            self._acks += released
            self.progress.set()
        return done

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
