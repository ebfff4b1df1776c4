"""MQTT packets (ingest.mqtt.packets): framing and parsing, against paho as an independent peer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.mqtt import outgoing, packets
from ingest.mqtt.outgoing import pubacks
from ingest.mqtt.packets import Publish, frame, parse_publish


def _props(values: dict[str, object]) -> bytes:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for key, value in values.items():
        setattr(properties, key, value)
    return properties.pack()  # type: ignore[no-untyped-call,no-any-return]


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize(
    "props",
    [
        {},
        {"ContentType": "application/msgpack"},
        {"ContentType": "application/json", "UserProperty": [("ts", "17"), ("k", "välue")]},
        {"PayloadFormatIndicator": 1, "MessageExpiryInterval": 60, "TopicAlias": 3},
    ],
)
def test_parse_publish_matches_paho(qos: int, props: dict[str, object]) -> None:
    from paho.mqtt import _packet
    from paho.mqtt.enums import MQTTProtocolVersion

    topic = b"telemetry/plant1/press-shop/line2/press-07"
    body = len(topic).to_bytes(2, "big") + topic
    body += (4242).to_bytes(2, "big") if qos else b""
    body += _props(props) + b"\x00\x01payload"
    command = 0x30 | (qos << 1) | 0x01
    ours = parse_publish(command, body)
    theirs = _packet.decode_publish(command, body, MQTTProtocolVersion.MQTTv5)
    assert ours == Publish(
        topic=theirs.topic.decode(),
        payload=bytes(theirs.payload),
        content_type=getattr(theirs.properties, "ContentType", None),
        published_us=17 if props.get("UserProperty") else None,
        mid=theirs.mid,
        qos=theirs.qos,
    )


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], None),
        ([("ts", "1700000000000000")], 1_700_000_000_000_000),
        ([("ts", "1"), ("ts", "2")], 2),
        ([("ts", "-5")], None),
        ([("ts", "12.5")], None),
        ([("ts", "١٢")], None),  # Arabic-Indic digits: isdigit() is True, isascii() is not
        ([("TS", "5")], None),
    ],
)
def test_published_us_reads_only_a_decimal_ts(
    pairs: list[tuple[str, str]], expected: int | None
) -> None:
    assert packets.published_us(pairs) == expected


def test_parse_publish_leaves_the_unusual_to_the_full_parser() -> None:
    topic = b"a/b"
    head = len(topic).to_bytes(2, "big") + topic + (1).to_bytes(2, "big")
    assert parse_publish(0x34, head + b"\x00x") is None  # QoS 2
    assert parse_publish(0x32, head + b"\x02\x0b\x05x") is None  # subscription identifier
    assert parse_publish(0x32, head + b"\x05\x03\x00\x09ab") is None  # string too long
    assert parse_publish(0x32, b"\x00\x00" + (1).to_bytes(2, "big") + b"\x00x") is None
    assert parse_publish(0x32, b"\x00\x02\xff\xfe" + (1).to_bytes(2, "big") + b"\x00x") is None
    assert parse_publish(0x32, head) is None  # no property length


@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
)
def test_frame_finds_every_packet_wherever_the_stream_is_cut(
    bodies: list[bytes], cuts: list[int]
) -> None:
    """Chunks as a socket may return them: every packet comes out whole, in order, once."""
    stream = b"".join(outgoing.packet(0x30 | (i % 16), b) for i, b in enumerate(bodies))
    bounds = sorted({min(c, len(stream)) for c in cuts} | {len(stream)})
    buf, pos, start, found = b"", 0, 0, []
    for bound in bounds:
        buf, pos = buf[pos:] + stream[start:bound], 0
        start = bound
        while (framed := frame(buf, pos)) is not None:
            first, body_start, pos = framed
            found.append((first, buf[body_start:pos]))
    assert found == [(0x30 | (i % 16), b) for i, b in enumerate(bodies)]
    assert pos == len(buf)


def test_frame_of_a_large_packet_waits_for_all_of_it() -> None:
    packet = outgoing.packet(0x32, bytes(200_000))
    assert packet[:4] == b"\x32\xc0\x9a\x0c"  # 200,000 as a variable byte integer
    assert frame(packet[:1], 0) is None
    assert frame(packet[:3], 0) is None
    assert frame(packet[:-1], 0) is None
    assert frame(packet, 0) == (0x32, 4, len(packet))


def test_frame_refuses_a_remaining_length_of_five_bytes() -> None:
    with pytest.raises(packets.MalformedPacketError, match="longer than four bytes"):
        frame(b"\x30\xff\xff\xff\xff\x01", 0)


def test_pubacks_are_one_packet_per_id_in_order() -> None:
    assert pubacks([1, 0x1234, 65535]) == b"\x40\x02\x00\x01\x40\x02\x12\x34\x40\x02\xff\xff"
    assert pubacks([]) == b""


def test_publish_round_trips_through_paho_and_our_parser() -> None:
    from paho.mqtt import _packet
    from paho.mqtt.enums import MQTTProtocolVersion

    props = outgoing.publish_properties("application/msgpack", [("ts", "1700000000000000")])
    for qos, mid in ((0, 0), (1, 65535)):
        data = outgoing.publish(
            topic=b"p/plant1/dev", payload=b"\x01\x02", qos=qos, mid=mid, properties=props
        )
        framed = frame(data, 0)
        assert framed is not None
        first, start, end = framed
        assert end == len(data)
        body = data[start:end]
        assert parse_publish(first, body) == Publish(
            "p/plant1/dev", b"\x01\x02", "application/msgpack", 1_700_000_000_000_000, mid, qos
        )
        theirs = _packet.decode_publish(first, body, MQTTProtocolVersion.MQTTv5)
        assert (theirs.topic, theirs.qos, theirs.mid, bytes(theirs.payload)) == (
            b"p/plant1/dev",
            qos,
            mid,
            b"\x01\x02",
        )


def test_connect_packet_bytes() -> None:
    data = outgoing.connect(client_id="sim-1", username="dev", password="pw", keepalive=60)
    assert data == (
        b"\x10\x1b"  # CONNECT, remaining length 27
        b"\x00\x04MQTT\x05"  # protocol name and level 5
        b"\xc2\x00\x3c\x00"  # user name, password, clean start; keepalive 60; no properties
        b"\x00\x05sim-1\x00\x03dev\x00\x02pw"
    )
    assert outgoing.connect(client_id="a", username=None, password=None, keepalive=5) == (
        b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x05\x00\x00\x01a"
    )


def test_connect_with_a_will_message() -> None:
    data = outgoing.connect(
        client_id="n1",
        username="dev",
        password=None,
        keepalive=60,
        will_topic="spBv1.0/G/NDEATH/e",
        will_payload=b"\x12\x00",
        will_qos=1,
    )
    assert data == (
        b"\x10\x2d"  # CONNECT, remaining length 45
        b"\x00\x04MQTT\x05"  # protocol name and level 5
        b"\x8e\x00\x3c\x00"  # user name, will QoS 1, will, clean start; keepalive 60; no props
        b"\x00\x02n1"  # client id
        b"\x00"  # will properties: none
        b"\x00\x12spBv1.0/G/NDEATH/e"  # will topic
        b"\x00\x02\x12\x00"  # will payload
        b"\x00\x03dev"  # user name
    )
    assert (
        outgoing.connect(
            client_id="a",
            username=None,
            password=None,
            keepalive=5,
            will_topic="w",
            will_payload=b"",
            will_qos=2,
            will_retain=True,
        )
        == b"\x10\x14\x00\x04MQTT\x05\x36\x00\x05\x00\x00\x01a\x00\x00\x01w\x00\x00"
    )
    with pytest.raises(ValueError, match="will QoS 3"):
        outgoing.connect(client_id="a", username=None, password=None, keepalive=5, will_qos=3)


def test_disconnect_with_the_will_message() -> None:
    assert outgoing.disconnect(0x04) == b"\xe0\x01\x04"


def test_connack_reason_and_properties() -> None:
    props = (
        b"\x21\x00\x14"  # receive maximum 20
        b"\x13\x00\x1e"  # server keep alive 30
        b"\x12\x00\x03abc"  # assigned client identifier
        b"\x26\x00\x01k\x00\x01v"  # a user property (skipped)
        b"\x1f\x00\x04nope"  # reason string
    )
    body = b"\x00\x87" + bytes([len(props)]) + props
    assert packets.connack(body) == (0x87, {0x21: 20, 0x13: 30, 0x12: "abc", 0x1F: "nope"})
    assert packets.connack(b"\x01\x00\x00") == (0, {})
    with pytest.raises(ValueError, match="unknown CONNACK property 0x7f"):
        packets.connack(b"\x00\x00\x02\x7f\x00")


def test_connect_with_a_session_and_limits() -> None:
    data = outgoing.connect(
        client_id="i",
        username=None,
        password=None,
        keepalive=30,
        clean_start=False,
        session_expiry_s=3600,
        receive_maximum=1000,
        maximum_packet_size=1_183_744,
    )
    assert data == (
        b"\x10\x1b\x00\x04MQTT\x05\x00\x00\x1e"  # no flags: clean start off; keepalive 30
        b"\x0d\x11\x00\x00\x0e\x10\x21\x03\xe8\x27\x00\x12\x10\x00"  # expiry, receive max, size
        b"\x00\x01i"
    )


def test_subscribe_unsubscribe_and_their_answers() -> None:
    assert outgoing.subscribe(mid=7, topic_filter="a/#", options=0x11) == (
        b"\x82\x09\x00\x07\x00\x00\x03a/#\x11"
    )
    assert outgoing.subscribe_many(mid=9, filters=[("a/#", 0x11), ("b", 0x21)]) == (
        b"\x82\x0d\x00\x09\x00\x00\x03a/#\x11\x00\x01b\x21"
    )
    assert outgoing.unsubscribe(mid=8, topic_filters=["a/#", "b"]) == (
        b"\xa2\x0b\x00\x08\x00\x00\x03a/#\x00\x01b"
    )
    assert packets.acks(b"\x00\x07\x00\x01") == (7, [1], None)
    assert packets.acks(b"\x00\x08\x07\x1f\x00\x04nope\x87\x11") == (8, [0x87, 0x11], "nope")
    with pytest.raises(ValueError, match="shorter"):
        packets.acks(b"\x00\x01")


def test_disconnect_with_reason_and_properties() -> None:
    assert outgoing.disconnect() == b"\xe0\x00"
    assert outgoing.disconnect(0x81) == b"\xe0\x01\x81"
    data = outgoing.disconnect(0x04, reason_string="bye", session_expiry_s=0)
    assert data == b"\xe0\x0d\x04\x0b\x11\x00\x00\x00\x00\x1f\x00\x03bye"
    framed = frame(data, 0)
    assert framed is not None
    assert packets.parse_disconnect(data[framed[1] :]) == (0x04, "bye")
    assert packets.parse_disconnect(b"") == (0, None)
    assert packets.parse_disconnect(b"\x8b") == (0x8B, None)


@pytest.mark.parametrize(
    "props",
    [
        {"ContentType": "application/json", "SubscriptionIdentifier": 5},
        {"ResponseTopic": "r/t", "CorrelationData": b"\x00\x01", "UserProperty": [("ts", "9")]},
        {"PayloadFormatIndicator": 1, "MessageExpiryInterval": 60},
    ],
)
def test_full_parser_takes_what_the_fast_one_leaves(props: dict[str, object]) -> None:
    from paho.mqtt import _packet
    from paho.mqtt.enums import MQTTProtocolVersion

    topic = b"telemetry/a/b"
    body = len(topic).to_bytes(2, "big") + topic + (99).to_bytes(2, "big")
    body += _props(props) + b"payload"
    theirs = _packet.decode_publish(0x32, body, MQTTProtocolVersion.MQTTv5)
    assert packets.parse_publish_full(0x32, body) == Publish(
        topic=theirs.topic.decode(),
        payload=bytes(theirs.payload),
        content_type=getattr(theirs.properties, "ContentType", None),
        published_us=9 if props.get("UserProperty") else None,
        mid=theirs.mid,
        qos=theirs.qos,
    )


def test_full_parser_names_what_is_wrong() -> None:
    head = b"\x00\x01t\x00\x01"
    with pytest.raises(ValueError, match="QoS 2"):
        packets.parse_publish_full(0x34, head + b"\x00x")
    with pytest.raises(ValueError, match="topic alias"):
        packets.parse_publish_full(0x32, head + b"\x03\x23\x00\x01x")
    with pytest.raises(ValueError, match="unknown property 0x7f"):
        packets.parse_publish_full(0x32, head + b"\x02\x7f\x00x")
    with pytest.raises(ValueError, match="without a topic"):
        packets.parse_publish_full(0x32, b"\x00\x00\x00\x01\x00x")
    with pytest.raises(ValueError, match="malformed PUBLISH"):
        packets.parse_publish_full(0x32, b"\x00\x02\xff\xfe\x00\x01\x00x")
