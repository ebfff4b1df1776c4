"""MQTT v5 packets built to be sent: CONNECT, PUBLISH and its properties, PUBACK, SUBSCRIBE,
UNSUBSCRIBE, PINGREQ, DISCONNECT (the ingester's and `ingest simulate`'s)."""

from __future__ import annotations

import array
import sys
from typing import Final

from ingest.mqtt.packets import (
    CONNECT,
    CONTENT_TYPE,
    DISCONNECT,
    MAXIMUM_PACKET_SIZE,
    PUBACK,
    PUBLISH,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    SESSION_EXPIRY,
    SUBSCRIBE,
    UNSUBSCRIBE,
    USER_PROPERTY,
)

PINGREQ_PACKET: Final = b"\xc0\x00"
DISCONNECT_PACKET: Final = b"\xe0\x00"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def packet(first: int, body: bytes) -> bytes:
    """A whole packet: first byte, remaining length, body."""
    return bytes((first,)) + _varint(len(body)) + body


def connect(
    *,
    client_id: str,
    username: str | None,
    password: str | None,
    keepalive: int,
    clean_start: bool = True,
    session_expiry_s: int = 0,
    receive_maximum: int | None = None,
    maximum_packet_size: int | None = None,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_qos: int = 0,
    will_retain: bool = False,
) -> bytes:
    """A CONNECT packet, MQTT v5; by default clean start, no session kept, no properties.

    With `will_topic`, a will message (no will properties) that the broker publishes when the
    connection ends without a normal DISCONNECT, or with DISCONNECT reason 0x04."""
    if will_qos not in (0, 1, 2):
        raise ValueError(f"will QoS {will_qos} is not 0, 1 or 2")
    if len(will_payload) > 0xFFFF:
        raise ValueError(f"will payload of {len(will_payload)} bytes: at most 65535")
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
    props = b""
    if session_expiry_s:
        props += bytes((SESSION_EXPIRY,)) + session_expiry_s.to_bytes(4, "big")
    if receive_maximum is not None:
        props += bytes((RECEIVE_MAXIMUM,)) + receive_maximum.to_bytes(2, "big")
    if maximum_packet_size is not None:
        props += bytes((MAXIMUM_PACKET_SIZE,)) + maximum_packet_size.to_bytes(4, "big")
    body = _string(b"MQTT") + bytes((5, flags)) + keepalive.to_bytes(2, "big")
    body += _varint(len(props)) + props + _string(client_id.encode())
    if will_topic is not None:  # will properties (none), topic, payload
        body += b"\x00" + _string(will_topic.encode()) + _string(will_payload)
    if username is not None:
        body += _string(username.encode())
    if password is not None:
        body += _string(password.encode())
    return packet(CONNECT, body)


def publish_properties(content_type: str, user: list[tuple[str, str]]) -> bytes:
    """PUBLISH properties: a content type and user properties, length first."""
    props = bytes((CONTENT_TYPE,)) + _string(content_type.encode())
    for key, value in user:
        props += bytes((USER_PROPERTY,)) + _string(key.encode()) + _string(value.encode())
    return _varint(len(props)) + props


def publish(*, topic: bytes, payload: bytes, qos: int, mid: int, properties: bytes) -> bytes:
    """A PUBLISH packet (no retain, no dup); `properties` as publish_properties makes them."""
    head = _string(topic) + (mid.to_bytes(2, "big") if qos else b"") + properties
    return packet(PUBLISH | (qos << 1), head + payload)


def pubacks(mids: list[int]) -> bytes:
    """PUBACK packets (reason: success) for `mids`, in order, as one byte string."""
    ids = array.array("H", mids)  # each packet's last two bytes, big-endian
    if sys.byteorder == "little":
        ids.byteswap()
    raw = ids.tobytes()
    n = len(mids)
    out = bytearray(4 * n)
    out[0::4] = bytes((PUBACK,)) * n
    out[1::4] = b"\x02" * n
    out[2::4] = raw[0::2]
    out[3::4] = raw[1::2]
    return bytes(out)


def subscribe(*, mid: int, topic_filter: str, options: int) -> bytes:
    """A SUBSCRIBE packet for one filter; `options` is the subscription options byte."""
    return subscribe_many(mid=mid, filters=[(topic_filter, options)])


def subscribe_many(*, mid: int, filters: list[tuple[str, int]]) -> bytes:
    """A SUBSCRIBE packet for several (filter, options byte) pairs: one SUBACK answers all."""
    body = mid.to_bytes(2, "big") + b"\x00"
    body += b"".join(_string(f.encode()) + bytes((options,)) for f, options in filters)
    return packet(SUBSCRIBE, body)


def unsubscribe(*, mid: int, topic_filters: list[str]) -> bytes:
    """An UNSUBSCRIBE packet."""
    body = mid.to_bytes(2, "big") + b"\x00"
    body += b"".join(_string(f.encode()) for f in topic_filters)
    return packet(UNSUBSCRIBE, body)


def disconnect(
    reason: int = 0, *, reason_string: str | None = None, session_expiry_s: int | None = None
) -> bytes:
    """A DISCONNECT packet; the shortest form (two bytes) for a normal one without properties."""
    props = b""
    if session_expiry_s is not None:
        props += bytes((SESSION_EXPIRY,)) + session_expiry_s.to_bytes(4, "big")
    if reason_string is not None:
        props += bytes((REASON_STRING,)) + _string(reason_string.encode())
    if not props:
        return DISCONNECT_PACKET if reason == 0 else packet(DISCONNECT, bytes((reason,)))
    return packet(DISCONNECT, bytes((reason,)) + _varint(len(props)) + props)
