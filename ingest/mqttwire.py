"""MQTT v5 packets on the source's read path: framing a byte stream, parsing PUBLISH.

No I/O here. The source reads the socket in large chunks, frames every packet in them, parses
the PUBLISH packets it receives at QoS 0 and 1 itself and hands anything else (including a
PUBLISH this module does not take) to paho, which decides what it means.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

PUBLISH: Final = 0x30
PUBACK: Final = 0x40
TS_PROPERTY: Final = "ts"
"""User property with the publisher's clock, integer µs since the Unix epoch (latency only)."""

# Fixed-size PUBLISH properties skipped here: payload format indicator, message expiry
# interval, topic alias.
_SKIP: Final = {0x01: 1, 0x02: 4, 0x23: 2}
_CONTENT_TYPE: Final = 0x03
_USER_PROPERTY: Final = 0x26


class MalformedPacketError(ValueError):
    """The stream is not MQTT: a remaining length over four bytes."""


class Publish(NamedTuple):
    """A PUBLISH packet as the source needs it."""

    topic: str
    payload: bytes
    content_type: str | None
    published_us: int | None
    """The ``ts`` user property if present and an integer, else None."""
    mid: int
    qos: int


def frame(buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """(first byte, body start, end) of the packet at buf[pos:], or None until it is complete."""
    n = len(buf)
    at = pos + 1
    length = shift = 0
    while True:
        if at >= n:
            return None
        byte = buf[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise MalformedPacketError("remaining length longer than four bytes")
    end = at + length
    return None if end > n else (buf[pos], at, end)


def published_us(user_properties: Iterable[tuple[str, str]]) -> int | None:
    """The value of the last ``ts`` user property if it is a decimal integer."""
    found = None
    for key, value in user_properties:
        if key == TS_PROPERTY and value.isascii() and value.isdigit():
            found = int(value)
    return found


def _utf8(data: bytes, at: int) -> tuple[str, int]:
    n = int.from_bytes(data[at : at + 2], "big")
    end = at + 2 + n
    if end > len(data):
        raise ValueError("string runs past the properties")
    return data[at + 2 : end].decode("utf-8"), end


def parse_publish(command: int, body: bytes) -> Publish | None:
    """The PUBLISH packet with first byte `command` and variable header and payload `body`.

    None for anything unusual (QoS 2, a property not listed here, a topic alias without a
    topic, a malformed packet): paho handles those.
    """
    try:
        return _parse(command, body)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _parse(command: int, data: bytes) -> Publish | None:
    qos = (command & 0x06) >> 1
    if qos > 1:
        return None
    n = int.from_bytes(data[0:2], "big")
    at = 2 + n
    topic = data[2:at].decode("utf-8")
    mid = 0
    if qos:
        mid = int.from_bytes(data[at : at + 2], "big")
        at += 2
    length = shift = 0  # variable byte integer
    while True:
        byte = data[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            return None
    end = at + length
    if end > len(data) or not topic:
        return None
    content_type = None
    user: list[tuple[str, str]] = []
    while at < end:
        ident = data[at]
        at += 1
        if ident == _CONTENT_TYPE:
            content_type, at = _utf8(data, at)
        elif ident == _USER_PROPERTY:
            key, at = _utf8(data, at)
            value, at = _utf8(data, at)
            user.append((key, value))
        elif ident in _SKIP:
            at += _SKIP[ident]
        else:
            return None
    if at != end:
        return None
    return Publish(topic, data[end:], content_type, published_us(user), mid, qos)


def pubacks(mids: list[int]) -> bytes:
    """PUBACK packets (reason: success) for `mids`, in order, as one byte string."""
    return b"".join(bytes((PUBACK, 2, mid >> 8, mid & 0xFF)) for mid in mids)
