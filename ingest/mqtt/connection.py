"""One MQTT v5 client connection on ``asyncio.Protocol``: inbox, flow control, PUBACKs.

Everything here runs in the event loop's thread and nothing but ``wait``, ``start``,
``subscribe``, ``unsubscribe`` and ``close`` awaits. The socket is read in the large chunks the
transport delivers; every packet in a chunk is framed here (a run of common PUBLISH packets
by one call of ``ingest.mqtt.framing``, anything else one by one), PUBLISH packets go to the
inbox and the few control packets a subscriber receives are answered on the spot
(``ingest.mqtt.control``: requests and their answers, keepalive, writes, DISCONNECT).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Final, cast

import numpy as np

from ingest.mqtt import framing, packets
from ingest.mqtt.control import MALFORMED, PACKET_TOO_LARGE, PROTOCOL_ERROR, Control
from ingest.mqtt.ledger import AckLedger
from ingest.mqtt.received import Received, from_publish

_PUBLISH: Final = packets.PUBLISH


class Connection(Control):
    """One network connection to the broker, as a subscriber with manual acknowledgement.

    - Received PUBLISH packets wait in the inbox (``wait``, then ``take``). Reading stops
      while the inbox holds ``receive_maximum`` messages or ``max_queued_bytes`` of payload,
      until it has drained to half of both; TCP flow control then holds the rest at the
      broker, and nothing is refused or reordered. A conforming broker never sends that many
      unacknowledged messages, but Mosquitto 2.0.11 does.
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
        super().__init__(keepalive_s=keepalive_s, timeout_s=timeout_s)
        self.generation = generation
        self.limit = receive_maximum
        self.max_queued_bytes = max_queued_bytes
        self.maximum_packet_size = maximum_packet_size
        self.ledger = AckLedger()
        """Its QoS 1 messages, from their arrival until PUBACKed (those in the inbox too)."""
        self.inbox: collections.deque[Received] = collections.deque()
        """Received messages not handed out yet, in order, each as the source hands it out."""
        self.queued_bytes = 0
        self._queued_tracked = 0  # messages in the inbox that the ledger tracks
        self.progress = asyncio.Event()
        """Set when the ledger shrinks or the connection ends."""
        self._buf = b""  # received bytes from self._pos on are not framed yet
        self._pos = 0
        self._stamp = 0
        self._waiter: asyncio.Future[None] | None = None

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
        self._lose(exc)
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
