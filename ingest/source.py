"""The MQTT source stage: one persistent MQTT v5 session, QoS 1, acknowledged only on request."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, cast
from urllib.parse import SplitResult, unquote, urlsplit

import aiomqtt
import msgspec
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingest import mqttwire
from ingest.errors import ConfigError
from ingest.mqttwire import Publish, published_us

__all__ = ["AckToken", "MqttSource", "Received", "Settings"]

logger = logging.getLogger(__name__)
_paho_logger = logging.getLogger(f"{__name__}.paho")

_DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}
# The reader takes up to this many bytes per system call, and at most so many calls before
# letting the event loop run other work.
_READ_CHUNK: Final = 256 * 1024
_READS_PER_WAKEUP: Final = 8
# CONNACK refusals that a retry cannot fix, and the setting to blame.
_CONNACK_FATAL: Final = {
    0x84: ("mqtt.url", "the broker does not support MQTT v5"),
    0x85: ("mqtt.client_id", "the broker rejected the client identifier"),
    0x86: ("mqtt.url", "bad user name or password"),
    0x87: ("mqtt.url", "not authorized to connect"),
    0x8C: ("mqtt.url", "bad authentication method"),
}
# SUBACK refusals that a retry cannot fix.
_SUBACK_FATAL: Final = {
    0x87: ("mqtt.topic_prefix", "not authorized to subscribe"),
    0x8F: ("mqtt.topic_prefix", "the broker rejected the topic filter"),
    0x9E: ("mqtt.share_group", "the broker does not support shared subscriptions"),
    0xA2: ("mqtt.topic_prefix", "the broker does not support wildcard subscriptions"),
}


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Connection settings of the source; every check names its key as ``mqtt.<field>``."""

    url: str
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` (default ports 1883 and 8883)."""
    client_id: str
    """Stable across restarts of one instance: it names the broker-side persistent session."""
    topic_prefix: str = "telemetry"
    share_group: str | None = None
    """Subscribe as ``$share/<group>/<prefix>/#`` so that the instances split the messages."""
    extra_filters: tuple[str, ...] = ()
    """Further topic filters (Sparkplug's), subscribed with the prefix, shared the same way,
    without the broker's retained messages (Sparkplug retains only STATE, which is ignored)."""
    receive_maximum: int = 1000
    """MQTT v5 Receive Maximum: the most unacknowledged QoS 1 messages the broker may send."""
    session_expiry_s: int = 3600
    """How long the broker keeps the session (and queues messages) while disconnected."""
    keepalive_s: int = 30
    timeout_s: float = 10.0
    """Wait this long for CONNACK, SUBACK, UNSUBACK and a clean disconnect."""
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_insecure: bool = False
    """Skip the server host name check (the certificate chain is still verified)."""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        endpoint = _parse_url(self.url)
        if not self.client_id or len(self.client_id.encode()) > 65535:
            raise ConfigError("mqtt.client_id: must be 1 to 65535 bytes")
        if not self.topic_prefix or any(c in self.topic_prefix for c in "+#\0"):
            raise ConfigError("mqtt.topic_prefix: must be non-empty, without '+', '#' or NUL")
        if self.share_group is not None and (
            not self.share_group or any(c in self.share_group for c in "/+#\0")
        ):
            raise ConfigError("mqtt.share_group: must be non-empty, without '/', '+', '#' or NUL")
        if not 1 <= self.receive_maximum <= 65535:
            raise ConfigError("mqtt.receive_maximum: must be 1 to 65535")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError("mqtt.session_expiry_s: must be 0 to 4294967295")
        if not 1 <= self.keepalive_s <= 65535:
            raise ConfigError("mqtt.keepalive_s: must be 1 to 65535")
        if not self.timeout_s > 0:
            raise ConfigError("mqtt.timeout_s: must be > 0")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("mqtt.reconnect_min_s: must be > 0 and <= mqtt.reconnect_max_s")
        tls_fields = {
            "tls_ca_file": self.tls_ca_file,
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
        }
        if not endpoint.tls:
            for key, value in tls_fields.items():
                if value is not None:
                    raise ConfigError(f"mqtt.{key}: set, but mqtt.url is not mqtts://")
            if self.tls_insecure:
                raise ConfigError("mqtt.tls_insecure: set, but mqtt.url is not mqtts://")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ConfigError("mqtt.tls_key_file: set without mqtt.tls_cert_file")

    def __repr__(self) -> str:
        # Never print the password that the URL may carry.
        return f"Settings(url={_parse_url(self.url).redacted!r}, client_id={self.client_id!r}, ...)"


class AckToken(msgspec.Struct, frozen=True, gc=False):
    """Opaque handle to acknowledge one message; valid only on the connection that delivered it."""

    generation: int
    seq: int
    mid: int
    qos: int


class Received(msgspec.Struct, frozen=True, gc=False):
    """One MQTT message as the source hands it to the pipeline."""

    topic: str
    payload: bytes
    content_type: str | None
    """The MQTT v5 content-type property, if the publisher set one."""
    received_ns: int
    """``time.time_ns()`` when the message arrived from the socket."""
    published_us: int | None
    """The user property ``ts`` (publisher's clock, µs since the Unix epoch) if present and an
    integer. Only for end-to-end latency metrics; never trusted as a reading time."""
    token: AckToken


class _Endpoint(NamedTuple):
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    redacted: str


def _parse_url(url: str) -> _Endpoint:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"mqtt.url: not a valid URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"mqtt.url: the scheme must be mqtt:// or mqtts://, not {scheme!r}")
    if not parts.hostname:
        raise ConfigError("mqtt.url: no host name")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError("mqtt.url: must be mqtt[s]://[user:pass@]host[:port], nothing after it")
    if port == 0:
        raise ConfigError("mqtt.url: port 0")
    port = port or _DEFAULT_PORTS[scheme]
    username = None if parts.username is None else unquote(parts.username)
    password = None if parts.password is None else unquote(parts.password)
    return _Endpoint(
        host=parts.hostname,
        port=port,
        tls=scheme == "mqtts",
        username=username,
        password=password,
        redacted=_redact(parts, scheme=scheme, port=port),
    )


def _redact(parts: SplitResult, *, scheme: str, port: int) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    user = "" if parts.username is None else f"{parts.username}:***@"
    return f"{scheme}://{user}{host}:{port}"


def _tls_context(settings: Settings) -> ssl.SSLContext:
    """Build the TLS context (blocking file reads: call in a thread)."""
    try:
        context = ssl.create_default_context(cafile=settings.tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls_ca_file: cannot load {settings.tls_ca_file!r}: {exc}") from exc
    if settings.tls_cert_file is not None:
        try:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"mqtt.tls_cert_file: cannot load {settings.tls_cert_file!r} "
                f"(key {settings.tls_key_file!r}): {exc}"
            ) from exc
    if settings.tls_insecure:
        context.check_hostname = False
    return context


class _Inbox(asyncio.Queue["tuple[Publish | None, int]"]):
    """The connection's received messages, each with its arrival time; ``None`` ends it.

    The reader puts parsed PUBLISH packets with ``deliver``. aiomqtt also holds it as its
    message queue (``queue_type``) and calls ``put_nowait`` with a ``Message`` for the rare
    packet paho parses (see ``_ManualAckConnection``), and ``None`` is the end-of-connection
    marker, queued behind the messages already received. The size is bounded by the reader
    pausing, not here: refusing a message would leave it unacknowledged until the next
    reconnect.
    """

    def deliver(self, message: Publish | None, received_ns: int) -> None:
        super().put_nowait((message, received_ns))

    def put_nowait(self, item: Any) -> None:
        """aiomqtt's entry: a ``Message`` that paho parsed."""
        message = cast("aiomqtt.Message", item)
        props = message.properties
        payload = message.payload
        self.deliver(
            Publish(
                topic=message.topic.value,
                payload=payload if isinstance(payload, bytes) else bytes(payload),
                content_type=getattr(props, "ContentType", None),
                published_us=published_us(getattr(props, "UserProperty", ())),
                mid=message.mid,
                qos=message.qos,
            ),
            time.time_ns(),
        )


def _paho_in_packet(command: int, body: bytes) -> Any:
    """paho's incoming-packet state for a whole packet read (command 0: none in progress)."""
    return {
        "command": command,
        "have_remaining": 1 if command else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(body),
        "packet": bytearray(body),
        "to_process": 0,
        "pos": 0,
    }


class _ManualAckConnection:
    """One connection: an aiomqtt client with manual PUBACKs, flow control and an ack ledger.

    This is the only code that touches aiomqtt's private attribute ``Client._client`` (the paho
    client; aiomqtt 2.5 has no public way to turn automatic acknowledgement off). Through it:

    - ``manual_ack_set(True)``. PUBACKs go out in the order the PUBLISHes arrived, as MQTT
      requires [MQTT-4.6.0-2]: an acknowledgement given early is held until every earlier
      message of this connection is acknowledged. The PUBACKs released together are queued on
      paho's output as one write.
    - paho's ``on_connect`` and ``on_disconnect`` are wrapped (session-present flag, end marker).
    - The socket reader aiomqtt registers is replaced by one that reads the socket in large
      chunks and frames the packets itself (paho reads a packet with four system calls). It
      parses common PUBLISH packets (``ingest.mqttwire``) straight into the inbox and hands
      every other packet to paho's packet handler, as paho's own reader would.
    - That reader stops while the inbox holds ``limit`` messages. A conforming broker never
      sends that many unacknowledged messages, but Mosquitto 2.0.11 does (each PUBACK can
      release up to Receive Maximum more messages); TCP flow control then holds them back, and
      nothing is refused or reordered. At most one chunk waits unparsed meanwhile.
    """

    def __init__(
        self, *, client: aiomqtt.Client, inbox: _Inbox, generation: int, limit: int
    ) -> None:
        inner = getattr(client, "_client", None)
        if not isinstance(inner, paho.Client):
            msg = "aiomqtt.Client._client is not a paho Client: update the manual-ack adapter"
            raise TypeError(msg)
        inner.manual_ack_set(True)
        callbacks = (inner.on_connect, inner.on_disconnect, inner.on_socket_open)
        if any(callback is None for callback in callbacks):
            msg = "aiomqtt.Client no longer sets paho's callbacks: update the manual-ack adapter"
            raise TypeError(msg)
        self._aiomqtt_callbacks: tuple[Callable[..., None], ...] = cast(
            "tuple[Callable[..., None], ...]", callbacks
        )
        inner.on_connect = self._on_connect
        inner.on_disconnect = self._on_disconnect
        inner.on_socket_open = self._on_socket_open
        self._paho = inner
        self._loop = asyncio.get_running_loop()
        self.client = client
        self.inbox = inbox
        self.generation = generation
        self.limit = limit
        self.alive = False
        self.subscribed = False
        self.session_present = False
        self.connected_at = 0.0
        self.progress = asyncio.Event()
        """Set when the ledger shrinks or the connection ends."""
        self._closing = False
        self._fd = -1
        self._paused = False
        self._buf = b""  # received bytes from self._pos on are not parsed yet
        self._pos = 0
        self._stamp = 0  # time.time_ns() when the last chunk arrived
        # Messages handed out and not yet PUBACKed, in arrival order: seq of the first, then
        # [mid, qos, acknowledged] per message.
        self._head = 0
        self._ledger: collections.deque[list[int]] = collections.deque()

    # -- paho callbacks (in the event loop's thread, except as noted) --

    def _on_connect(self, *args: Any) -> None:
        self.session_present = bool(getattr(args[2], "session_present", False))
        self._aiomqtt_callbacks[0](*args)

    def _on_disconnect(self, *args: Any) -> None:
        self.alive = False
        # paho may call this from aiomqtt's connect thread: go through the loop.
        self._loop.call_soon_threadsafe(self._ended)
        if self._closing or not getattr(args[3], "is_failure", False):
            self._aiomqtt_callbacks[1](*args)
        # An unexpected loss is not passed on: aiomqtt would store it as the exception of a
        # future that only its MessagesIterator (unused here) retrieves, and asyncio would log
        # "Future exception was never retrieved" at every reconnect. Socket clean-up does not
        # depend on it (aiomqtt's on_socket_close does that).

    def _ended(self) -> None:
        self.inbox.deliver(None, time.time_ns())
        self.progress.set()

    def _on_socket_open(self, *args: Any) -> None:
        # Called in aiomqtt's connect thread. aiomqtt schedules add_reader(its callback); ours,
        # scheduled after it, replaces it for the same file descriptor.
        self._aiomqtt_callbacks[2](*args)
        self._loop.call_soon_threadsafe(self._watch, args[2].fileno())

    def _watch(self, fd: int) -> None:
        if self._paho.socket() is not None:
            self._fd = fd
            self._loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        client = self._paho
        try:
            if client._in_packet["command"]:
                # paho's reader began this packet before this reader took over: paho ends it.
                client.loop_read()
                return
            for _ in range(_READS_PER_WAKEUP):
                if not self._take_packets():
                    return
                sock = client.socket()
                if sock is None:
                    return
                try:
                    data = sock.recv(_READ_CHUNK)
                except (BlockingIOError, ssl.SSLWantReadError):
                    return
                except ssl.SSLWantWriteError:
                    client._call_socket_register_write()
                    return
                except OSError as exc:
                    logger.debug("MQTT socket read failed: %s", exc)
                    data = b""
                if not data:
                    client._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                    return
                client._last_bytes_received = paho.time_func()
                self._stamp = time.time_ns()
                self._buf = self._buf[self._pos :] + data if self._pos < len(self._buf) else data
                self._pos = 0
            self._take_packets()
        except Exception as exc:  # a paho or aiomqtt callback failed: drop the connection
            logger.warning("MQTT read failed (%r); dropping the connection", exc)
            self.abort()

    def _take_packets(self) -> bool:
        """Pass on every complete packet received; False if paused or the connection ended.

        Never pauses before the SUBACK is read: with a session present the broker sends its
        queued messages ahead of the SUBACK, and pausing then would stall the subscription.
        It sends at most Receive Maximum of them unacknowledged.
        """
        buf, pos, inbox = self._buf, self._pos, self.inbox
        try:
            while pos < len(buf):
                if self.subscribed and inbox.qsize() >= self.limit:
                    self._paused = True
                    self._loop.remove_reader(self._fd)
                    return False
                try:
                    framed = mqttwire.frame(buf, pos)
                except mqttwire.MalformedPacketError as exc:
                    logger.warning("MQTT stream broken (%s); dropping the connection", exc)
                    self._paho._loop_rc_handle(MQTTErrorCode.MQTT_ERR_PROTOCOL)
                    return False
                if framed is None:
                    break
                command, start, pos = framed
                body = buf[start:pos]
                if command & 0xF0 == mqttwire.PUBLISH:
                    message = mqttwire.parse_publish(command, body)
                    if message is not None:
                        inbox.deliver(message, self._stamp)
                        continue
                if not self._paho_handles(command, body):
                    return False
        finally:
            self._pos = pos
        return True

    def _paho_handles(self, command: int, body: bytes) -> bool:
        """Give one packet to paho's handler, as paho's reader does; False if it closed."""
        client = self._paho
        client._in_packet = _paho_in_packet(command, body)
        try:
            rc = client._packet_handle()
        except MalformedPacket as exc:
            logger.debug("MQTT packet malformed: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            client._in_packet = _paho_in_packet(0, b"")  # paho's state between packets
        if rc:
            client._loop_rc_handle(rc)
        return client.socket() is not None

    def _resume(self) -> None:
        if self._paused and self.inbox.qsize() < self.limit:
            self._paused = False
            if self._paho.socket() is not None:
                self._loop.add_reader(self._fd, self._on_readable)
                self._loop.call_soon(self._on_readable)

    # -- used by MqttSource --

    async def open(self, *, topic_filter: str | list[str], timeout_s: float) -> None:
        await self.client.__aenter__()
        self.alive = True
        self.connected_at = time.monotonic()
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        if isinstance(topic_filter, list):
            extra = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            pairs = [(f, options if i == 0 else extra) for i, f in enumerate(topic_filter)]
            result = await self.client.subscribe(pairs, timeout=timeout_s)
        else:
            result = await self.client.subscribe(topic_filter, options=options, timeout=timeout_s)
        for code in result:
            value = code.value if isinstance(code, ReasonCode) else code
            if value in _SUBACK_FATAL:
                key, reason = _SUBACK_FATAL[value]
                raise ConfigError(f"{key}: subscribing to {topic_filter!r} failed: {reason}")
            if value == 0:
                raise ConfigError(
                    f"mqtt.url: the broker granted only QoS 0 for {topic_filter!r}; "
                    "acknowledgement after commit needs QoS 1"
                )
            if value >= 0x80:
                raise aiomqtt.MqttCodeError(value, f"Subscribing to {topic_filter!r} failed")
        self.subscribed = True

    def abort(self) -> None:
        """Drop a half-open or broken connection without waiting."""
        self.alive = False
        self._closing = True
        if self._paho.socket() is not None:
            self._paho.disconnect()

    async def close(self) -> None:
        """Disconnect cleanly; queued PUBACKs are written before the DISCONNECT.

        A connection that is already lost needs nothing: its socket is closed.
        """
        if self._closing or not self.alive:
            return
        self._closing = True
        try:
            await self.client.__aexit__(None, None, None)
        except aiomqtt.MqttError as exc:
            logger.warning("MQTT disconnect was not clean: %s", exc)
        self.alive = False

    async def next(self) -> tuple[Publish | None, int]:
        item = await self.inbox.get()
        self._resume()
        return item

    @property
    def unacked(self) -> int:
        return len(self._ledger)

    def track(self, *, mid: int, qos: int) -> int:
        """Record a message about to be handed out; returns its sequence number."""
        seq = self._head + len(self._ledger)
        self._ledger.append([mid, qos, 0])
        return seq

    def ack(self, seq: int) -> bool:
        index = seq - self._head
        if not self.alive or not 0 <= index < len(self._ledger):
            return False
        self._ledger[index][2] = 1
        if index == 0:
            mids: list[int] = []
            while self._ledger and self._ledger[0][2]:
                mid, qos, _ = self._ledger.popleft()
                self._head += 1
                if qos == 1:
                    mids.append(mid)
                    continue
                self._send_pubacks(mids)
                self._paho.ack(mid, qos)
            self._send_pubacks(mids)
            self.progress.set()
        return True

    def _send_pubacks(self, mids: list[int]) -> None:
        if mids:
            self._paho._packet_queue(mqttwire.PUBACK, mqttwire.pubacks(mids), 0, 1)
            mids.clear()


class _Messages:
    """The iterator ``MqttSource.messages()`` returns; each ``__anext__`` is cancellation-safe."""

    def __init__(self, source: MqttSource) -> None:
        self._source = source

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received:
        return await self._source._next()


class MqttSource:
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
    ``receive_maximum`` unacknowledged messages and holds at most ``receive_maximum`` more in
    its queue (beyond that it stops reading the socket). After a reconnect the broker
    redelivers the unacknowledged ones, under new tokens; acknowledging a token of an earlier
    connection does nothing.
    """

    def __init__(
        self, *, settings: Settings, on_reconnect: Callable[[], None] | None = None
    ) -> None:
        """Check the settings; raises ``ConfigError`` naming the key if they are wrong."""
        self._settings = settings
        self._endpoint = _parse_url(settings.url)
        filters = [f"{settings.topic_prefix}/#", *settings.extra_filters]
        if settings.share_group is not None:
            filters = [f"$share/{settings.share_group}/{f}" for f in filters]
        self._topic_filter = filters[0] if len(filters) == 1 else filters
        # A filter nobody subscribes to: unsubscribing from it is a side-effect-free round trip.
        self._flush_filter = f"{settings.topic_prefix}/$ingest-ack-flush"
        self._properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        self._properties.SessionExpiryInterval = settings.session_expiry_s
        self._properties.ReceiveMaximum = settings.receive_maximum
        self._on_reconnect = on_reconnect
        self._tls: ssl.SSLContext | None = None
        self._entered = False
        self._closed = False
        self._conn: _ManualAckConnection | None = None
        self._connector: asyncio.Task[_ManualAckConnection] | None = None
        self._generation = 0
        self._ever_connected = False
        self._failures = 0
        self._delay = 0.0
        self.reconnects = 0
        """Successful connections after the first one."""

    async def __aenter__(self) -> Self:
        """Load the TLS files (``ConfigError`` if unreadable); does not connect."""
        if self._entered:
            raise RuntimeError("MqttSource is not reentrant")
        if self._endpoint.tls:
            self._tls = await asyncio.to_thread(_tls_context, self._settings)
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
            await conn.close()

    @property
    def connected(self) -> bool:
        """Whether a connection is up and subscribed (for health checks)."""
        return self._conn is not None and self._conn.alive

    @property
    def queued(self) -> int:
        """Messages received from the broker and not handed out yet (at most receive_maximum)."""
        return 0 if self._conn is None else self._conn.inbox.qsize()

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
        is then queued for sending, or held until every earlier message of this connection is
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

    async def flush_acks(self) -> bool:
        """Wait until the broker has processed every PUBACK queued so far.

        One UNSUBSCRIBE round trip on the current connection, so it also waits for every message
        the broker sent before. Returns ``False`` if there is no connection (acknowledgements
        the broker did not get are void: it redelivers those messages), or if the answer does
        not come within ``timeout_s`` (also while the queue is full and reading is paused).
        """
        conn = self._conn
        if conn is None or not conn.alive:
            return False
        try:
            await conn.client.unsubscribe(self._flush_filter, timeout=self._settings.timeout_s)
        except aiomqtt.MqttError:
            return False
        return True

    async def _next(self) -> Received:
        while True:
            conn = self._conn
            if conn is None:
                if self._closed:
                    raise StopAsyncIteration
                if self._connector is None:
                    self._connector = asyncio.create_task(self._connect(), name="mqtt-connect")
                connector = self._connector
                try:
                    conn = await asyncio.shield(connector)
                except asyncio.CancelledError:
                    if self._closed_while_connecting():
                        raise StopAsyncIteration from None
                    raise
                finally:
                    if connector.done() and self._connector is connector:
                        self._connector = None
            # At most receive_maximum unacknowledged messages are handed out, even when the
            # broker sends more (Mosquitto 2.0.11 does).
            while conn.alive and conn.unacked >= conn.limit:
                conn.progress.clear()
                await conn.progress.wait()
            message, received_ns = await conn.next()
            if message is None:
                self._lost(conn)
                continue
            return self._received(conn, message, received_ns)

    def _closed_while_connecting(self) -> bool:
        """The connect task was cancelled by ``__aexit__``, not this task by its owner."""
        task = asyncio.current_task()
        return self._closed and not (task is not None and task.cancelling())

    def _received(self, conn: _ManualAckConnection, message: Publish, received_ns: int) -> Received:
        seq = conn.track(mid=message.mid, qos=message.qos) if message.qos > 0 else -1
        return Received(
            topic=message.topic,
            payload=message.payload,
            content_type=message.content_type,
            received_ns=received_ns,
            published_us=message.published_us,
            token=AckToken(generation=conn.generation, seq=seq, mid=message.mid, qos=message.qos),
        )

    def _lost(self, conn: _ManualAckConnection) -> None:
        if self._conn is conn:
            self._conn = None
        if self._closed:
            return
        lived = time.monotonic() - conn.connected_at
        self._failures = 1 if lived >= self._settings.reconnect_max_s else self._failures + 1
        self._delay = self._backoff()
        logger.warning(
            "MQTT connection to %s lost; reconnecting in %.2f s",
            self._endpoint.redacted,
            self._delay,
        )

    def _backoff(self) -> float:
        """Capped exponential backoff with jitter: a random value in [delay/2, delay]."""
        settings = self._settings
        exponent = min(self._failures - 1, 32)
        delay = min(settings.reconnect_max_s, settings.reconnect_min_s * 2.0**exponent)
        return delay * random.uniform(0.5, 1.0)

    async def _connect(self) -> _ManualAckConnection:
        """Connect and subscribe, retrying with backoff; runs as a task owned by the source."""
        while True:
            if self._delay > 0:
                await asyncio.sleep(self._delay)
            try:
                conn = await self._connect_once()
            except aiomqtt.MqttError as exc:
                self._failures += 1
                self._delay = self._backoff()
                logger.warning(
                    "MQTT connect to %s failed (%s); retrying in %.2f s",
                    self._endpoint.redacted,
                    exc,
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
                    self._settings.client_id,
                )
            logger.info(
                "MQTT %s to %s as %r, subscribed to %r (session present: %s)",
                "connected" if first else "reconnected",
                self._endpoint.redacted,
                self._settings.client_id,
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

    async def _connect_once(self) -> _ManualAckConnection:
        settings = self._settings
        endpoint = self._endpoint
        inbox = _Inbox()

        def queue_factory(*, maxsize: int) -> _Inbox:
            return inbox

        client = aiomqtt.Client(
            endpoint.host,
            endpoint.port,
            username=endpoint.username,
            password=endpoint.password,
            logger=_paho_logger,
            identifier=settings.client_id,
            # aiomqtt builds its queue as queue_type(maxsize=...) and only calls put_nowait().
            queue_type=cast("type[asyncio.Queue[aiomqtt.Message]]", queue_factory),
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            keepalive=settings.keepalive_s,
            timeout=settings.timeout_s,
            properties=self._properties,
            tls_context=self._tls,
        )
        self._generation += 1
        conn = _ManualAckConnection(
            client=client,
            inbox=inbox,
            generation=self._generation,
            limit=settings.receive_maximum,
        )
        try:
            await conn.open(topic_filter=self._topic_filter, timeout_s=settings.timeout_s)
        except MqttConnectError as exc:
            conn.abort()
            code = exc.rc.value if isinstance(exc.rc, ReasonCode) else None
            if code in _CONNACK_FATAL:
                key, reason = _CONNACK_FATAL[code]
                raise ConfigError(
                    f"{key}: {endpoint.redacted} refused the connection: {reason}"
                ) from exc
            raise
        except BaseException:
            conn.abort()
            raise
        return conn
