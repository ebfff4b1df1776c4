"""A small MQTT v5 publisher for `ingest simulate`: QoS 0 or 1, a window of unacknowledged
messages, acknowledgements read in chunks; its packets are built by ``ingest.mqtt.outgoing`` and
parsed by ``ingest.mqtt.packets``.

paho spends most of a load generator's time on its own bookkeeping: a PUBACK costs four reads
and a dispatch, a PUBLISH a properties object. This client writes each PUBLISH with one
system call and reads whatever acknowledgements have arrived with one more, every few
messages. It connects with a clean start and keeps no session: it is a load, not a device.

For the Sparkplug simulator's edge nodes it also takes a will message, disconnects with a
reason code (0x04 makes the broker publish the will), subscribes, and keeps the PUBLISH packets
the broker sends (QoS 0 or 1) for `received` to hand over.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

from ingest.errors import ConfigError, IngestError
from ingest.mqtt import outgoing, packets

_READ: Final = 256 * 1024
_DRAIN_EVERY: Final = 32  # messages between non-blocking reads of acknowledgements
_REASONS: Final = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8C: "bad authentication method",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9F: "connection rate exceeded",
}


def _reason(code: int) -> str:
    return _REASONS.get(code, f"reason code 0x{code:02x}")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """What an mqtts:// connection verifies the broker with, and the client's own certificate
    and key for a broker that asks for one (PEM files; None: the system's CAs, no certificate).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def option_set(self) -> str:
        return next(
            f"--{name.replace('_', '-')}"
            for name in ("ca_file", "cert_file", "key_file")
            if getattr(self, name) is not None
        )

    def context(self) -> ssl.SSLContext:
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("--key-file: set without --cert-file")
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--ca-file {self.ca_file!r}: cannot load it: {exc}") from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"--cert-file {self.cert_file!r} (--key-file {self.key_file!r}): "
                    f"cannot load them: {exc}"
                ) from None
        return context


class Publisher:
    """One connection to the broker at `url` (mqtt:// or mqtts://, credentials in the URL)."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        tls: TlsFiles | None = None,
        window: int = 1000,
        keepalive: int = 60,
        will: tuple[str, bytes, int] | None = None,
    ) -> None:
        """`will`: (topic, payload, QoS) of the will message."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"--url {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        files = tls or TlsFiles()
        secure = parts.scheme == "mqtts"
        context = files.context() if secure else None
        if not secure and files != TlsFiles():
            raise ConfigError(f"{files.option_set()}: set, but --url {url!r} is not mqtts://")
        host, port = parts.hostname, parts.port or (8883 if secure else 1883)
        self.where = f"{host}:{port}"
        self._certificate = files.cert_file is not None
        self._keepalive = keepalive
        try:
            sock = socket.create_connection((host, port), timeout=10.0)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise IngestError(
                f"cannot connect to the broker at {self.where}: {exc}{self._hint(exc)}"
            ) from None
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self._inflight = 0
        self._mid = 0
        self._since_drain = 0
        self._last_sent = time.monotonic()
        username = None if parts.username is None else unquote(parts.username)
        password = None if parts.password is None else unquote(parts.password)
        self._window = window
        self._connack: tuple[int, dict[int, int | str]] | None = None
        self._subacks: dict[int, list[int]] = {}
        self._received: list[packets.Publish] = []
        will_topic, will_payload, will_qos = will if will is not None else (None, b"", 0)
        try:
            self._send(
                outgoing.connect(
                    client_id=client_id,
                    username=username,
                    password=password,
                    keepalive=keepalive,
                    will_topic=will_topic,
                    will_payload=will_payload,
                    will_qos=will_qos,
                )
            )
            reason, props = self._wait_connack(timeout=10.0)
            if reason >= 0x80:
                detail = props.get(packets.REASON_STRING)
                raise IngestError(
                    f"the broker at {self.where} refused the connection: {_reason(reason)}"
                    + (f" ({detail})" if detail else "")
                )
        except IngestError:
            sock.close()
            raise
        window_max = props.get(packets.RECEIVE_MAXIMUM)
        if isinstance(window_max, int):
            self._window = max(1, min(window, window_max))
        server_keepalive = props.get(packets.SERVER_KEEP_ALIVE)
        if isinstance(server_keepalive, int) and server_keepalive:
            self._keepalive = server_keepalive
        self._sock.settimeout(None)

    def _wait_connack(self, *, timeout: float) -> tuple[int, dict[int, int | str]]:
        deadline = time.monotonic() + timeout
        while True:
            if self._connack is not None:
                return self._connack
            if not self._read(until=deadline):
                raise IngestError(
                    f"no answer from the broker at {self.where} within {timeout:.0f}s"
                )

    def publish(self, topic: str, payload: bytes, *, qos: int, properties: bytes) -> None:
        """Send one message; blocks while the window of unacknowledged ones is full."""
        mid = 0
        if qos:
            while self._inflight >= self._window:
                self._read(until=time.monotonic() + 60.0, wait=True)
            self._mid = self._mid % 65535 + 1
            mid = self._mid
            self._inflight += 1
        self._send(
            outgoing.publish(
                topic=topic.encode(), payload=payload, qos=qos, mid=mid, properties=properties
            )
        )
        self._since_drain += 1
        if self._since_drain >= _DRAIN_EVERY:
            self._since_drain = 0
            while self._read(until=0.0):
                pass

    def idle(self, seconds: float) -> None:
        """Wait `seconds`, reading acknowledgements and keeping the connection alive."""
        until = time.monotonic() + seconds
        while (now := time.monotonic()) < until:
            if now - self._last_sent >= self._keepalive / 2:
                self._send(outgoing.PINGREQ_PACKET)
            self._read(until=min(until, now + self._keepalive / 2), wait=True)

    def settle(self, *, timeout: float) -> None:
        """Wait until every message sent is acknowledged."""
        deadline = time.monotonic() + timeout
        while self._inflight:
            if time.monotonic() > deadline:
                raise IngestError(f"the broker did not acknowledge messages within {timeout:.0f}s")
            self._read(until=deadline, wait=True)

    def subscribe(self, topic_filter: str, *, qos: int = 0, timeout: float = 10.0) -> None:
        """Subscribe to `topic_filter` and wait for the SUBACK; IngestError if refused."""
        self._mid = self._mid % 65535 + 1
        mid = self._mid
        self._send(outgoing.subscribe(mid=mid, topic_filter=topic_filter, options=qos))
        deadline = time.monotonic() + timeout
        while mid not in self._subacks:
            if time.monotonic() > deadline:
                raise IngestError(f"the broker at {self.where} did not answer a SUBSCRIBE")
            self._read(until=deadline, wait=True)
        codes = self._subacks.pop(mid)
        if not codes or codes[0] >= 0x80:
            why = _reason(codes[0]) if codes else "no reason code"
            raise IngestError(f"the broker refused the subscription to {topic_filter!r}: {why}")

    def received(self) -> list[packets.Publish]:
        """The messages the broker sent since the last call, reading what has arrived."""
        while self._read(until=0.0):
            pass
        out, self._received = self._received, []
        return out

    def close(self, reason: int = 0) -> None:
        """DISCONNECT (reason 0x04: publish the will) and close the socket."""
        with contextlib.suppress(IngestError):
            self._send(outgoing.disconnect(reason))
        self._sock.close()

    # -- the socket --

    def _hint(self, exc: OSError) -> str:
        """What to try when TLS failed other than over the broker's certificate: a broker that
        wants a client certificate ends the handshake, or the connection right after it."""
        if (
            isinstance(exc, ssl.SSLError)
            and not isinstance(exc, ssl.SSLCertVerificationError)
            and not self._certificate
        ):
            return "; if the broker asks for a client certificate, give one with --cert-file"
        return ""

    def _failed(self, exc: OSError) -> IngestError:
        return IngestError(
            f"the connection to the broker at {self.where} failed: {exc}{self._hint(exc)}"
        )

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._failed(exc) from None
        self._last_sent = time.monotonic()

    def _read(self, *, until: float, wait: bool = False) -> bool:
        """Read and handle what arrived (waiting up to `until` if `wait`, or for the CONNACK);
        False if nothing did."""
        sock = self._sock
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending:
            left = max(0.0, until - time.monotonic()) if (wait or self._connack is None) else 0.0
            if not select.select([sock], [], [], left)[0]:
                return False
        try:
            data = sock.recv(_READ)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError as exc:
            raise self._failed(exc) from None
        if not data:
            raise IngestError(f"the broker at {self.where} closed the connection")
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        while (framed := packets.frame(self._buf, self._pos)) is not None:
            first, start, self._pos = framed
            self._handle(first, self._buf[start : self._pos])
        return True

    def _handle(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == packets.PUBACK:
            if len(body) > 2 and body[2] >= 0x80:
                raise IngestError(f"the broker refused a message: {_reason(body[2])}")
            self._inflight -= 1
        elif kind == packets.CONNACK:
            self._connack = packets.connack(body)
        elif kind == packets.PUBLISH:
            try:
                message = packets.parse_publish(first, body) or packets.parse_publish_full(
                    first, body
                )
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise IngestError(f"the broker at {self.where} sent a bad PUBLISH: {exc}") from None
            if message.qos == 1:
                self._send(outgoing.pubacks([message.mid]))
            self._received.append(message)
        elif kind == packets.SUBACK:
            mid, codes, _ = packets.acks(body)
            self._subacks[mid] = codes
        elif kind == packets.DISCONNECT:
            code, text = packets.parse_disconnect(body)
            raise IngestError(
                f"the broker at {self.where} disconnected: {_reason(code)}"
                + (f" ({text})" if text else "")
            )
