"""Framing a run of common PUBLISH packets in one kernel call.

A socket read holds tens of PUBLISH packets. `publishes` frames and parses as many of them as
the inbox's bounds allow, one row of numbers each, and stops before anything else: a control
packet, an incomplete one, or a PUBLISH that is not common (QoS 2, a property other than the
content type, user properties, the payload format indicator, message expiry and topic alias,
a byte outside ASCII in its topic, content type or user properties, anything malformed). The
connection takes those one at a time with ``ingest.mqtt.packets``, as before; what this
accepts, ``packets.parse_publish`` parses to the same message.
"""

from __future__ import annotations

import collections
from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.jit import small_kernel
from ingest.mqtt import outgoing
from ingest.mqtt.ledger import AckLedger
from ingest.mqtt.received import AckToken, Received

__all__ = ["COLUMNS", "compile_kernels", "publishes", "to_inbox"]

COLUMNS: Final = 9
"""A row: packet end, first byte, topic start and end, packet id, content type start and end
(-1: none), the ``ts`` user property (-1: none), payload start."""

_MAX_TS_DIGITS: Final = 18  # within int64; a longer `ts` takes the complete parser


@small_kernel
def _ascii(buf: npt.NDArray[np.uint8], a: int, b: int) -> bool:
    bits = np.uint8(0)
    for i in range(a, b):  # no early exit: the loop is vectorized
        bits |= buf[i]
    return bool(bits < 0x80)


@small_kernel
def _string(buf: npt.NDArray[np.uint8], at: int, end: int) -> tuple[int, int]:
    """(start, end) of the ASCII string with a two-byte length at `at`, within `end`; start -1
    if it is not."""
    if at + 2 > end:
        return -1, at
    start = at + 2
    stop = start + (buf[at] << 8 | buf[at + 1])
    if stop > end or not _ascii(buf, start, stop):
        return -1, at
    return start, stop


@small_kernel
def _varint(buf: npt.NDArray[np.uint8], at: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the variable byte integer of at most four bytes at `at`,
    within `end`; value -1 if it is incomplete or longer."""
    value = 0
    shift = 0
    while at < end and shift <= 21:
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    return -1, at


@small_kernel
def publishes(
    buf: npt.NDArray[np.uint8], pos: int, room: int, room_bytes: int, max_packet: int
) -> tuple[npt.NDArray[np.int64], int]:
    """(rows, end) of the common PUBLISH packets from `pos` on: at most `room` of them, and
    none more once their payloads reach `room_bytes`; none longer than `max_packet`."""
    size = buf.shape[0]
    out = np.empty((min(room, (size - pos) // 4 + 1), COLUMNS), np.int64)
    n = 0
    taken = 0
    while n < out.shape[0] and taken < room_bytes and pos < size:
        command = buf[pos]
        if command & 0xF0 != 0x30 or (command >> 1) & 3 > 1:
            break
        length, at = _varint(buf, pos + 1, size)  # the remaining length
        if length < 0:
            break
        end = at + length
        if end > size or end - pos > max_packet or at + 2 > end:
            break
        qos = (command >> 1) & 3
        topic_end = at + 2 + (buf[at] << 8 | buf[at + 1])
        if topic_end == at + 2 or topic_end > end or not _ascii(buf, at + 2, topic_end):
            break
        topic_start = at + 2
        at = topic_end
        mid = 0
        if qos:
            if at + 2 > end:
                break
            mid = buf[at] << 8 | buf[at + 1]
            at += 2
        props, at = _varint(buf, at, end)  # the properties' length, then the properties
        if props < 0 or at + props > end:
            break
        props_end = at + props
        ct_start = ct_end = ts = -1
        common = True
        while common and at < props_end:
            ident = buf[at]
            at += 1
            if ident == 0x01:
                at += 1
            elif ident == 0x02:
                at += 4
            elif ident == 0x23:
                at += 2
            elif ident == 0x03:
                ct_start, at = _string(buf, at, props_end)
                ct_end = at
                common = ct_start >= 0
            elif ident == 0x26:
                key, at = _string(buf, at, props_end)
                key_end = at
                a, at = _string(buf, at, props_end)
                common = key >= 0 and a >= 0
                if common and key_end - key == 2 and buf[key] == 116 and buf[key + 1] == 115:
                    if at - a > _MAX_TS_DIGITS:
                        common = False  # a "ts" this long: the complete parser decides
                        break
                    value = 0
                    digits = at > a
                    for i in range(a, at):
                        if buf[i] < 48 or buf[i] > 57:
                            digits = False
                            break
                        value = value * 10 + (buf[i] - 48)
                    if digits:
                        ts = value  # the last decimal one counts
            else:
                common = False
        if not common or at != props_end:
            break
        row = out[n]
        row[0], row[1], row[2], row[3], row[4] = end, command, topic_start, topic_end, mid
        row[5], row[6], row[7], row[8] = ct_start, ct_end, ts, props_end
        n += 1
        taken += end - props_end
        pos = end
    return out[:n], pos


def to_inbox(
    inbox: collections.deque[Received],
    buf: bytes,
    rows: list[list[int]],
    stamp: int,
    *,
    generation: int,
    ledger: AckLedger,
) -> tuple[int, int]:
    """The messages of `publishes` rows of `buf`, into `inbox` as the source hands them out,
    received at `stamp`, their QoS 1 ones tracked in the connection's `ledger` (tokens of
    connection `generation`): each message is one object, built once. Returns their payloads'
    bytes and how many were tracked."""
    append = inbox.append
    nbytes = 0
    mids: list[int] = []
    seq = ledger.next_seq
    for end, command, ts, te, mid, cs, ce, published, start in rows:
        nbytes += end - start
        qos = (command >> 1) & 3
        if qos:
            token = AckToken(generation, seq, mid, qos)
            seq += 1
            mids.append(mid)
        else:
            token = AckToken(generation, -1, mid, 0)
        append(
            Received(
                buf[ts:te].decode("ascii"),
                buf[start:end],
                None if cs < 0 else buf[cs:ce].decode("ascii"),
                stamp,
                None if published < 0 else published,
                token,
            )
        )
    if mids:
        ledger.track_many(mids)
    return nbytes, len(mids)


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, this module's kernels (see `ingest.warmup`)."""
    props = outgoing.publish_properties("application/msgpack", [("ts", "1")])
    packet = outgoing.publish(topic=b"a/b", payload=b"x", qos=1, mid=1, properties=props)
    publishes(np.frombuffer(packet, np.uint8), 0, 10, 1 << 20, 1 << 20)
