"""The MQTT connection (ingest.mqtt.connection) against streams and brokers that misbehave.

Framing is checked on the protocol object itself, fed by hand; flow control and keepalive
against a scripted broker on 127.0.0.1 (tests/support/fake_broker.py). The real broker's side
is in tests/test_source.py.
"""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import pytest

from ingest.mqtt import MqttSource, Received, Settings, outgoing, packets
from ingest.mqtt.connection import Connection
from ingest.mqtt.packets import Publish
from ingest.mqtt.received import maximum_packet_size
from tests.support.fake_broker import FakeBroker, Session, publish
from tests.support.mqtt import TIMEOUT, until


class _Transport:
    """What the connection needs of a transport, recording what it is asked to do."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.paused = False
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def _publish(message: Received) -> Publish:
    """What the connection made of a PUBLISH, as the parser gives it."""
    t = message.token
    return Publish(
        message.topic, message.payload, message.content_type, message.published_us, t.mid, t.qos
    )


async def _subscribed(**bounds: int) -> tuple[Connection, _Transport]:
    """A connection past CONNACK and SUBACK, fed by hand."""
    conn = Connection(
        generation=1,
        receive_maximum=bounds.get("receive_maximum", 100),
        max_queued_bytes=bounds.get("max_queued_bytes", 1 << 20),
        maximum_packet_size=1 << 20,
        keepalive_s=60,
        timeout_s=TIMEOUT,
    )
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(b"\x20\x03\x00\x00\x00")  # CONNACK: accepted, no properties
    await conn.start(b"")
    subscribing = asyncio.ensure_future(conn.subscribe([("t/#", 0x01)]))
    await asyncio.sleep(0)
    conn.data_received(b"\x90\x04\x00\x01\x00\x01")  # SUBACK for packet id 1: QoS 1
    assert await subscribing == ([1], None)
    conn.subscribed = True
    return conn, transport


def _stream() -> tuple[bytes, list[Publish]]:
    """PUBLISH packets of every shape a subscriber gets, and control packets between them."""
    props = outgoing.publish_properties("application/msgpack", [("ts", "1700000000000000")])
    subscription_id = b"\x02\x0b\x05"  # properties: a subscription identifier (full parser)
    head = b"\x00\x03t/c\x00\x07"
    parts = [
        outgoing.publish(topic=b"t/a", payload=b"\x01\x02", qos=1, mid=1, properties=props),
        b"\xd0\x00",  # PINGRESP
        outgoing.publish(topic=b"t/b", payload=b"x" * 300, qos=0, mid=0, properties=b"\x00"),
        outgoing.packet(0x32, head + subscription_id + b"sub-id"),
        outgoing.publish(topic=b"t/d", payload=b"", qos=1, mid=65535, properties=b"\x00"),
    ]
    expected = [
        Publish("t/a", b"\x01\x02", "application/msgpack", 1_700_000_000_000_000, 1, 1),
        Publish("t/b", b"x" * 300, None, None, 0, 0),
        Publish("t/c", b"sub-id", None, None, 7, 1),
        Publish("t/d", b"", None, None, 65535, 1),
    ]
    return b"".join(parts), expected


async def test_a_stream_cut_at_every_byte_gives_every_packet_once() -> None:
    stream, expected = _stream()
    for cut in range(len(stream) + 1):
        conn, transport = await _subscribed()
        written = bytes(transport.written)
        conn.data_received(stream[:cut])
        conn.data_received(stream[cut:])
        assert [_publish(m) for m in conn.inbox] == expected, f"cut at byte {cut}"
        assert not transport.closing
        assert bytes(transport.written) == written  # nothing to answer, no DISCONNECT
    conn, transport = await _subscribed()
    for i in range(len(stream)):
        conn.data_received(stream[i : i + 1])
    assert [_publish(m) for m in conn.inbox] == expected
    assert not transport.closing


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x30\xff\xff\xff\xff\x01", 0x81),  # a remaining length of five bytes
        (b"\x34\x07\x00\x01t\x00\x01\x00x", 0x82),  # QoS 2, never granted
        (b"\x32\x08\x00\x00\x00\x01\x03\x23\x00\x01", 0x82),  # a topic alias
        (b"\x50\x02\x00\x01", 0x82),  # PUBREC: no QoS 2 here
    ],
)
async def test_a_broken_stream_is_disconnected_with_a_reason(data: bytes, reason: int) -> None:
    conn, transport = await _subscribed()
    written = len(transport.written)
    conn.data_received(data)
    assert transport.closing
    assert bytes(transport.written[written:]) == bytes((0xE0, 1, reason))
    assert conn.error


async def test_reading_stops_at_the_inbox_bounds_and_resumes_as_it_drains() -> None:
    conn, transport = await _subscribed(receive_maximum=3, max_queued_bytes=250)
    stream = b"".join(publish("t/x", bytes([i]) * 100, mid=i + 1) for i in range(6))
    conn.data_received(stream)
    assert transport.paused
    assert len(conn.inbox) == 3  # 300 payload bytes: the byte bound stopped it
    got: list[object] = []
    while len(got) < 6:
        await conn.wait()
        got.append(conn.take().payload[0])
        assert len(conn.inbox) <= 3
    assert got == list(range(6))
    assert not transport.paused


async def test_reading_resumes_only_once_the_inbox_drained_to_half_its_bounds() -> None:
    conn, transport = await _subscribed(receive_maximum=10)
    stream = b"".join(publish("t/x", bytes([i]), mid=i + 1) for i in range(25))
    conn.data_received(stream)
    assert transport.paused
    assert len(conn.inbox) == 10
    got = [conn.take().payload[0] for _ in range(4)]
    assert transport.paused  # six left: more than half the bound
    got.append(conn.take().payload[0])
    assert len(conn.inbox) == 10  # five left: read on, up to the bound again
    assert transport.paused
    while len(got) < 25:
        await conn.wait()
        got.append(conn.take().payload[0])
        assert len(conn.inbox) <= 10
    assert got == list(range(25))
    assert not transport.paused


def _settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "url": url,
        "client_id": f"fake-{uuid.uuid4().hex[:8]}",
        "topic_prefix": "t",
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        **overrides,
    }
    return msgspec.convert(values, Settings)


async def test_a_broker_sending_more_than_receive_maximum() -> None:
    limit, total = 4, 20

    async def flood(session: Session) -> None:
        for i in range(total):  # all at once, whatever the Receive Maximum
            session.send(publish("t/d", b"m%02d" % i, mid=i + 1))

    async with FakeBroker(on_subscribed=flood) as broker:
        config = _settings(broker.url, receive_maximum=limit)
        async with MqttSource(settings=config, max_payload_bytes=5000) as source:
            it = source.messages()
            got: list[Received] = [await anext(it)]
            # The inbox filled up to its bound (`limit`) and one was taken: reading resumes only
            # once it has drained to half.
            await until(lambda: source.queued >= limit - 1)
            while len(got) < limit:
                got.append(await anext(it))
            # `limit` handed out and unacknowledged: no more until one is acknowledged.
            held = asyncio.ensure_future(anext(it))
            await asyncio.sleep(0.3)
            assert not held.done()
            assert source.queued <= limit
            for m in got:
                assert source.ack(m.token)
            got.append(await held)
            assert source.ack(got[-1].token)
            async with asyncio.timeout(TIMEOUT):
                while len(got) < total:
                    got.append(await anext(it))
                    assert source.ack(got[-1].token)
                    assert source.queued <= limit
            assert await source.flush_acks()
            assert source.reconnects == 0
        (session,) = broker.sessions
    assert [m.payload for m in got] == [b"m%02d" % i for i in range(total)]
    assert session.pubacks == list(range(1, total + 1))
    assert session.properties[0x21] == limit  # Receive Maximum
    assert session.properties[0x27] == maximum_packet_size(5000)  # Maximum Packet Size
    assert maximum_packet_size(5000) == 5000 + 2 * 65537 + 4096


def test_maximum_packet_size_follows_the_payload_limit_and_stays_in_range() -> None:
    assert maximum_packet_size(1_048_576) > 1_048_576 + 65535 + 2  # any topic fits
    assert maximum_packet_size(1 << 30) == packets.MAX_REMAINING_LENGTH


@pytest.mark.parametrize("answer_pings", [True, False])
async def test_keepalive_while_intake_is_paused(answer_pings: bool) -> None:
    """Intake paused (nothing taken, the inbox at its bound) for five keepalive periods.

    A broker that answers keeps the connection: the PINGREQs go out and the PINGRESPs are read.
    A broker that stops answering is noticed even then, and the connection is dropped.
    """
    limit, keepalive = 3, 1

    async def fill(session: Session) -> None:
        session.answer_pings = answer_pings
        for i in range(limit + 1):  # one handed out, `limit` to fill the inbox
            session.send(publish("t/d", b"m%d" % i, mid=i + 1))

    async with FakeBroker(on_subscribed=fill) as broker:
        config = _settings(broker.url, receive_maximum=limit, keepalive_s=keepalive)
        async with MqttSource(settings=config) as source:
            it = source.messages()
            first = await anext(it)
            await until(lambda: source.queued >= limit)
            if answer_pings:
                await asyncio.sleep(5 * keepalive)
                (session,) = broker.sessions
                assert session.pingreqs >= 3
                assert not session.timed_out
                assert source.connected
                assert source.ack(first.token)
                rest = [await anext(it) for _ in range(limit)]
                assert [m.payload for m in rest] == [b"m1", b"m2", b"m3"]
                assert all(source.ack(m.token) for m in rest)
                assert source.reconnects == 0
            else:
                await until(lambda: not source.connected, timeout_s=5 * keepalive + TIMEOUT)
                assert not source.ack(first.token)
