"""MQTT v5 packets: their codes, framing a byte stream, parsing what a client receives.

No I/O here; the packets a client sends are built in ``ingest.mqtt.outgoing``. The connection
(``ingest.mqtt.connection``) reads the socket in large chunks and frames every packet in them;
runs of common PUBLISH packets are framed and parsed at once by ``ingest.mqtt.framing`` (as
``parse_publish`` parses them), others take the fast parser (``parse_publish``), anything
unusual the complete one (``parse_publish_full``).
`ingest simulate` publishes with ``ingest.sim.publisher``, which parses its packets here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

PUBLISH: Final = 0x30
PUBACK: Final = 0x40
TS_PROPERTY: Final = "ts"
"""User property with the publisher's clock, integer µs since the Unix epoch (latency only)."""

CONNECT: Final = 0x10
CONNACK: Final = 0x20
PINGRESP: Final = 0xD0
DISCONNECT: Final = 0xE0

# CONNACK properties: identifier -> size in bytes, or "s" (string or binary: 2-byte length),
# "p" (string pair), "v" (variable byte integer).
_CONNACK_PROPERTIES: Final[dict[int, int | str]] = {
    0x11: 4, 0x12: "s", 0x13: 2, 0x15: "s", 0x16: "s", 0x1A: "s", 0x1C: "s", 0x1F: "s",
    0x21: 2, 0x22: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip
RECEIVE_MAXIMUM: Final = 0x21
SERVER_KEEP_ALIVE: Final = 0x13
REASON_STRING: Final = 0x1F
SESSION_EXPIRY: Final = 0x11
MAXIMUM_PACKET_SIZE: Final = 0x27
SUBSCRIBE: Final = 0x82
SUBACK: Final = 0x90
UNSUBSCRIBE: Final = 0xA2
UNSUBACK: Final = 0xB0
PINGREQ: Final = 0xC0
MAX_REMAINING_LENGTH: Final = 268_435_455
"""The largest remaining length a variable byte integer can carry."""
# Every MQTT v5 property: identifier -> size in bytes, or "s" (string or binary: 2-byte length),
# "p" (string pair), "v" (variable byte integer).
_PROPERTIES: Final[dict[int, int | str]] = {
    **_CONNACK_PROPERTIES,
    0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "s", 0x0B: "v", 0x17: 1, 0x18: 4, 0x19: 1,
    0x23: 2,
}  # fmt: skip

# Fixed-size PUBLISH properties skipped here: payload format indicator, message expiry
# interval, topic alias.
_SKIP: Final = {0x01: 1, 0x02: 4, 0x23: 2}
CONTENT_TYPE: Final = 0x03
USER_PROPERTY: Final = 0x26


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


def _read_varint(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """(value, where it ends) of the variable byte integer at data[at:], or None if the data
    ends first; MalformedPacketError if it runs over four bytes."""
    value = shift = 0
    while True:
        if at >= len(data):
            return None
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 21:
            raise MalformedPacketError("variable byte integer longer than four bytes")


def frame(buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """(first byte, body start, end) of the packet at buf[pos:], or None until it is complete.

    Raises MalformedPacketError for a remaining length longer than four bytes.
    """
    got = _read_varint(buf, pos + 1)
    if got is None:
        return None
    length, at = got
    end = at + length
    return None if end > len(buf) else (buf[pos], at, end)


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
    topic, a malformed packet): ``parse_publish_full`` decides what those are.
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
    got = _read_varint(data, at)  # the properties' length
    if got is None:
        return None
    length, at = got
    end = at + length
    if end > len(data) or not topic:
        return None
    content_type = None
    user: list[tuple[str, str]] = []
    while at < end:
        ident = data[at]
        at += 1
        if ident == CONTENT_TYPE:
            content_type, at = _utf8(data, at)
        elif ident == USER_PROPERTY:
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


def connack(body: bytes) -> tuple[int, dict[int, int | str]]:
    """(reason code, the numeric and text properties) of a CONNACK body."""
    found, _ = properties(body, 2, allowed=_CONNACK_PROPERTIES, packet_name="CONNACK")
    return body[1], found


def properties(
    body: bytes,
    at: int,
    *,
    allowed: dict[int, int | str] = _PROPERTIES,
    packet_name: str = "",
) -> tuple[dict[int, int | str], int]:
    """(numeric and text properties, where they end) of the property block at body[at:].

    User properties and binary values are skipped; ValueError if the block is malformed or
    holds a property outside `allowed` (`packet_name` names the packet in the message).
    """
    got = _read_varint(body, at)
    if got is None:
        raise ValueError(f"{packet_name or 'the packet'} ends inside its properties' length")
    length, at = got
    end = at + length
    if end > len(body):
        raise ValueError("the properties run past the packet")
    found: dict[int, int | str] = {}
    while at < end:
        ident = body[at]
        at += 1
        kind = allowed.get(ident)
        if isinstance(kind, int):
            found[ident] = int.from_bytes(body[at : at + kind], "big")
            at += kind
        elif kind == "s":
            n = int.from_bytes(body[at : at + 2], "big")
            found[ident] = body[at + 2 : at + 2 + n].decode("utf-8", "replace")
            at += 2 + n
        elif kind == "p":
            _, at = _utf8(body, at)
            _, at = _utf8(body, at)
        elif kind == "v":
            value = _read_varint(body, at)
            if value is None:
                raise ValueError("a property ends inside its value")
            found[ident], at = value
        else:
            raise ValueError(
                f"unknown {packet_name + ' ' if packet_name else ''}property 0x{ident:02x}"
            )
    if at != end:
        raise ValueError("a property runs past the properties' length")
    return found, end


def parse_publish_full(command: int, body: bytes) -> Publish:
    """Any PUBLISH at QoS 0 or 1, every property allowed (those not needed are skipped).

    ValueError names what is wrong: QoS 2 (never granted here), a topic alias (none allowed
    here: no Topic Alias Maximum is announced), a malformed packet.
    """
    qos = (command & 0x06) >> 1
    if qos > 1:
        raise ValueError(f"PUBLISH at QoS {qos}, more than the subscription granted")
    try:
        n = int.from_bytes(body[0:2], "big")
        at = 2 + n
        if at > len(body):
            raise ValueError("the topic runs past the packet")
        topic = body[2:at].decode("utf-8")
        mid = 0
        if qos:
            mid = int.from_bytes(body[at : at + 2], "big")
            at += 2
        found, end = properties(body, at)
        user = _user_properties(body, at)  # the block is known to be well formed now
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed PUBLISH ({exc})") from None
    if 0x23 in found:
        raise ValueError("PUBLISH with a topic alias, which this client does not allow")
    if not topic:
        raise ValueError("PUBLISH without a topic")
    content_type = found.get(CONTENT_TYPE)
    return Publish(
        topic,
        body[end:],
        content_type if isinstance(content_type, str) else None,
        published_us(user),
        mid,
        qos,
    )


def _user_properties(body: bytes, at: int) -> list[tuple[str, str]]:
    got = _read_varint(body, at)
    assert got is not None  # properties() read it already
    length, at = got
    end = at + length
    pairs: list[tuple[str, str]] = []
    while at < end:
        ident = body[at]
        at += 1
        if ident == USER_PROPERTY:
            key, at = _utf8(body, at)
            value, at = _utf8(body, at)
            pairs.append((key, value))
            continue
        kind = _PROPERTIES[ident]
        if isinstance(kind, int):
            at += kind
        elif kind == "s":
            at += 2 + int.from_bytes(body[at : at + 2], "big")
        else:  # "v"
            skipped = _read_varint(body, at)
            assert skipped is not None
            at = skipped[1]
    return pairs


def acks(body: bytes) -> tuple[int, list[int], str | None]:
    """(packet id, reason codes, reason string) of a SUBACK or UNSUBACK body."""
    if len(body) < 3:
        raise ValueError("SUBACK or UNSUBACK shorter than its header")
    found, end = properties(body, 2)
    text = found.get(REASON_STRING)
    mid = int.from_bytes(body[0:2], "big")
    return mid, list(body[end:]), text if isinstance(text, str) else None


def parse_disconnect(body: bytes) -> tuple[int, str | None]:
    """(reason code, reason string) of a DISCONNECT body."""
    if not body:
        return 0, None
    if len(body) == 1:
        return body[0], None
    found, _ = properties(body, 1)
    text = found.get(REASON_STRING)
    return body[0], text if isinstance(text, str) else None
