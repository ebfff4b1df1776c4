"""Framing runs of PUBLISH packets in one call (ingest.mqtt.framing): every message it takes is
the one the packet-by-packet parser makes, and it stops at the first packet it leaves to it."""

from __future__ import annotations

import collections

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.mqtt import outgoing, packets
from ingest.mqtt.framing import publishes, to_inbox
from ingest.mqtt.ledger import AckLedger
from ingest.mqtt.packets import Publish, parse_publish
from ingest.mqtt.received import Received

_TEXT = st.one_of(
    st.sampled_from(["ts", "k", "", "application/msgpack", "välue", "17", "0123", "1" * 19]),
    st.text(max_size=6),
)
_PROPERTY = st.one_of(
    st.tuples(st.just(0x03), _TEXT),  # content type
    st.tuples(st.just(0x26), st.tuples(_TEXT, _TEXT)),  # user property
    st.tuples(st.just(0x26), st.tuples(st.just("ts"), st.integers(0, 10**20).map(str))),
    st.tuples(st.sampled_from([0x01, 0x02, 0x23]), st.none()),  # fixed-size ones
    st.tuples(st.just(0x08), _TEXT),  # response topic: not a common one
)
_SIZES = {0x01: 1, 0x02: 4, 0x23: 2}


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _properties(props: list[tuple[int, object]]) -> bytes:
    out = b""
    for ident, value in props:
        out += bytes((ident,))
        if ident in _SIZES:
            out += bytes(_SIZES[ident])
        elif isinstance(value, tuple):
            out += _string(value[0]) + _string(value[1])
        else:
            assert isinstance(value, str)
            out += _string(value)
    return outgoing._varint(len(out)) + out


@st.composite
def _packet(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["publish"] * 6 + ["pingresp", "garbage"]))
    if kind == "pingresp":
        return b"\xd0\x00"
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=12))
    qos = draw(st.sampled_from([0, 1, 1, 2]))
    topic = draw(st.one_of(st.just("telemetry/site/line/plc-1"), st.text(max_size=8)))
    body = _string(topic) + (draw(st.integers(0, 65535)).to_bytes(2, "big") if qos else b"")
    props = _properties(draw(st.lists(_PROPERTY, max_size=4)))
    if draw(st.integers(0, 9)) == 0:  # a properties' length that lies
        props = bytes((draw(st.integers(0, 40)),)) + props[1:]
    body += props + draw(st.binary(max_size=40))
    return outgoing.packet(packets.PUBLISH | qos << 1, body)


def _publish(message: Received) -> Publish:
    t = message.token
    return Publish(
        message.topic, message.payload, message.content_type, message.published_us, t.mid, t.qos
    )


def _one_by_one(stream: bytes, pos: int) -> Publish | None:
    framed = packets.frame(stream, pos)
    if framed is None or framed[0] & 0xF0 != packets.PUBLISH:
        return None
    return parse_publish(framed[0], stream[framed[1] : framed[2]])


@settings(max_examples=400, deadline=None)
@given(st.lists(_packet(), max_size=12), st.integers(1, 20), st.integers(1, 200))
def test_what_it_frames_is_what_the_parser_makes(
    stream_packets: list[bytes], room: int, room_bytes: int
) -> None:
    stream = b"".join(stream_packets)
    rows, end = publishes(np.frombuffer(stream, np.uint8), 0, room, room_bytes, 1 << 20)
    inbox: collections.deque[Received] = collections.deque()
    ledger = AckLedger()
    nbytes, tracked = to_inbox(inbox, stream, rows.tolist(), 7, generation=3, ledger=ledger)
    assert tracked == len(ledger) == sum(m.token.qos > 0 for m in inbox)
    pos = 0
    seq = 0
    for message in inbox:
        assert message.received_ns == 7
        assert message.token.generation == 3
        assert message.token.seq == (seq if message.token.qos else -1)
        seq += message.token.qos > 0
        assert _publish(message) == _one_by_one(stream, pos)
        framed = packets.frame(stream, pos)
        assert framed is not None
        pos = framed[2]
    assert end == pos
    assert len(inbox) <= room
    assert nbytes == sum(len(m.payload) for m in inbox)
    assert nbytes - (len(inbox[-1].payload) if inbox else 0) < room_bytes
    if len(inbox) < room and nbytes < room_bytes and pos < len(stream):
        # It stopped at a packet it leaves to the parser: not a complete common PUBLISH.
        rest, _ = publishes(np.frombuffer(stream, np.uint8), pos, 1, 1 << 20, 1 << 20)
        assert not len(rest)


def test_a_stream_of_simulated_messages_is_framed_at_once_and_cut_anywhere() -> None:
    props = outgoing.publish_properties("application/msgpack", [("ts", "1764000000000000")])
    stream = b"".join(
        outgoing.publish(
            topic=f"telemetry/site1/area1/line1/plc-{i:04d}".encode(),
            payload=bytes(range(i % 200)),
            qos=1,
            mid=i + 1,
            properties=props,
        )
        for i in range(300)
    )
    data = np.frombuffer(stream, np.uint8)
    rows, end = publishes(data, 0, 1000, 1 << 30, 1 << 20)
    assert (len(rows), end) == (300, len(stream))
    inbox: collections.deque[Received] = collections.deque()
    to_inbox(inbox, stream, rows.tolist(), 0, generation=1, ledger=AckLedger())
    assert [m.token.seq for m in inbox] == list(range(300))
    assert [_publish(m) for m in inbox] == [
        Publish(
            f"telemetry/site1/area1/line1/plc-{i:04d}",
            bytes(range(i % 200)),
            "application/msgpack",
            1764000000000000,
            i + 1,
            1,
        )
        for i in range(300)
    ]
    for cut in range(0, len(stream), 997):  # a read that ends inside a packet: the rest waits
        part = stream[:cut]
        rows, end = publishes(np.frombuffer(part, np.uint8), 0, 1000, 1 << 30, 1 << 20)
        assert end == (int(rows[-1, 0]) if len(rows) else 0)
        assert packets.frame(part, end) is None  # the next packet is not complete
    rows, end = publishes(data, 0, 1000, 1 << 30, 50)  # over the maximum packet size
    assert (len(rows), end) == (0, 0)
