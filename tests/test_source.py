"""Tests of the MQTT source against a real Mosquitto broker (INGEST_MQTT_URL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest

from ingest.errors import ConfigError
from ingest.mqtt import MqttSource, Received, Settings
from tests.support.broker import PrivateBroker
from tests.support.mqtt import (
    TIMEOUT,
    Collector,
    Intruder,
    Outgoing,
    publish,
    purge_session,
    until,
    wait_connected,
)
from tests.support.net import free_port
from tests.support.process import service_dir
from tests.support.stack import ROOT

ClientIds = Callable[[str], str]


@pytest.fixture
async def client_ids(mqtt_url: str) -> AsyncIterator[ClientIds]:
    """Unique client ids; their broker sessions are ended after the test."""
    made: list[str] = []

    def make(role: str) -> str:
        made.append(f"test-source-{role}-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    for client_id in made:
        await asyncio.to_thread(purge_session, mqtt_url, client_id)


def settings(url: str, client_id: str, prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "url": url,
        "client_id": client_id,
        "topic_prefix": prefix,
        "session_expiry_s": 600,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
    }
    values.update(overrides)
    return msgspec.convert(values, Settings)


def outgoing(prefix: str, n: int, *, start: int = 0) -> list[Outgoing]:
    return [Outgoing(f"{prefix}/site/dev{i % 3}", b"m%03d" % i) for i in range(start, start + n)]


def payloads(messages: list[Received]) -> list[bytes]:
    return [m.payload for m in messages]


async def test_messages_arrive_with_topic_payload_and_content_type(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    sent = [
        Outgoing(f"{prefix}/plant1/line2/press-07", b"\x83\xa1v\x01", "application/msgpack", 17),
        Outgoing(f"{prefix}/plant1/press-08", b'{"v": 1}', "application/json"),
        Outgoing(f"{prefix}/press-09", b"", None, 1767225600000000),
    ]
    before = time.time_ns()
    async with (
        MqttSource(settings=settings(mqtt_url, client_ids("sub"), prefix)) as source,
        Collector(source) as collector,
    ):
        await wait_connected(source)
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        got = await collector.take(3)
        after = time.time_ns()
        assert [(m.topic, m.payload, m.content_type, m.published_us) for m in got] == [
            (f"{prefix}/plant1/line2/press-07", b"\x83\xa1v\x01", "application/msgpack", 17),
            (f"{prefix}/plant1/press-08", b'{"v": 1}', "application/json", None),
            (f"{prefix}/press-09", b"", None, 1767225600000000),
        ]
        assert all(before <= m.received_ns <= after for m in got)
        assert [m.token.qos for m in got] == [1, 1, 1]
        assert all(source.ack(m.token) for m in got)
        await collector.assert_idle()


_KILLED_CONSUMER = """
import asyncio, json, sys
from ingest.mqtt import MqttSource, Settings

async def main():
    url, client_id, prefix, n, k = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:6])
    settings = Settings(url=url, client_id=client_id, topic_prefix=prefix, session_expiry_s=600)
    async with MqttSource(settings=settings) as source:
        it = source.messages()
        first = asyncio.ensure_future(anext(it))
        while not source.connected:
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        got = [await first]
        while len(got) < n:
            got.append(await anext(it))
        for m in got[:k]:
            assert source.ack(m.token)
        assert await source.flush_acks()
        print("acked", json.dumps([m.payload.decode() for m in got]), flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def _read_line(proc: asyncio.subprocess.Process) -> bytes:
    assert proc.stdout is not None
    assert proc.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        line = await proc.stdout.readline()
    if not line:
        await proc.wait()
        pytest.fail(f"consumer exited: {(await proc.stderr.read()).decode()}")
    return line


async def test_kill_between_receipt_and_ack_loses_nothing(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    n, k = 20, 7
    client_id = client_ids("killed")
    sent = outgoing(prefix, n)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILLED_CONSUMER,
        mqtt_url,
        client_id,
        prefix,
        str(n),
        str(k),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert await _read_line(proc) == b"ready\n"
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        word, _, data = (await _read_line(proc)).partition(b" ")
        assert word == b"acked"
        assert json.loads(data) == [m.payload.decode() for m in sent]
    finally:
        proc.kill()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # Same client id: exactly the unacknowledged messages again, then the live ones.
    async with (
        MqttSource(settings=settings(mqtt_url, client_id, prefix)) as source,
        Collector(source) as collector,
    ):
        await wait_connected(source)
        await publish(mqtt_url, [Outgoing(f"{prefix}/x", b"second")], client_id=client_ids("pub"))
        got = await collector.take_until(b"second")
        assert payloads(got) == [m.payload for m in sent[k:]] + [b"second"]
        assert all(source.ack(m.token) for m in got)
        await collector.assert_idle()

    # Everything is acknowledged: a third start gets only what is published now.
    async with (
        MqttSource(settings=settings(mqtt_url, client_id, prefix)) as source,
        Collector(source) as collector,
    ):
        await wait_connected(source)
        await publish(mqtt_url, [Outgoing(f"{prefix}/x", b"third")], client_id=client_ids("pub"))
        assert payloads(await collector.take(1)) == [b"third"]
        await collector.assert_idle()


async def test_share_group_splits_messages(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    sent = outgoing(prefix, 40)
    async with (
        MqttSource(settings=settings(mqtt_url, client_ids("a"), prefix, share_group=group)) as a,
        MqttSource(settings=settings(mqtt_url, client_ids("b"), prefix, share_group=group)) as b,
        Collector(a) as got_a,
        Collector(b) as got_b,
    ):
        await wait_connected(a)
        await wait_connected(b)
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        received: dict[str, list[bytes]] = {"a": [], "b": []}
        async with asyncio.timeout(TIMEOUT):
            while len(received["a"]) + len(received["b"]) < len(sent):
                for name, source, collector in (("a", a, got_a), ("b", b, got_b)):
                    while not collector.queue.empty():
                        m = collector.queue.get_nowait()
                        assert source.ack(m.token)
                        received[name].append(m.payload)
                await asyncio.sleep(0.01)
        await got_a.assert_idle()
        await got_b.assert_idle()
    assert received["a"]
    assert received["b"]
    assert set(received["a"]).isdisjoint(received["b"])
    assert sorted(received["a"] + received["b"]) == [m.payload for m in sent]


async def test_receive_maximum_bounds_unacknowledged_messages(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    limit, total = 5, 50
    sent = outgoing(prefix, total)
    config = settings(mqtt_url, client_ids("sub"), prefix, receive_maximum=limit)
    async with MqttSource(settings=config) as source, Collector(source) as collector:
        await wait_connected(source)
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        first = await collector.take(limit)
        assert payloads(first) == [m.payload for m in sent[:limit]]
        await collector.assert_idle()

        # Each acknowledgement lets one more through; never more than `limit` unacknowledged.
        received, acked = list(first), 0
        while acked < total:
            assert source.ack(received[acked].token)
            acked += 1
            if len(received) < total:
                received += await collector.take(1)
            assert len(received) + collector.queue.qsize() - acked <= limit
        assert payloads(received) == [m.payload for m in sent]
        await collector.assert_idle()


async def test_queue_stays_bounded_when_the_broker_sends_too_much(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    # Mosquitto 2.0.11 lets every PUBACK release up to Receive Maximum more messages; the
    # source then stops reading the socket instead of queueing them.
    limit, total = 5, 60
    sent = outgoing(prefix, total)
    config = settings(mqtt_url, client_ids("sub"), prefix, receive_maximum=limit)
    async with MqttSource(settings=config) as source:
        it = source.messages()
        first = asyncio.ensure_future(anext(it))
        await wait_connected(source)
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        async with asyncio.timeout(TIMEOUT):
            got = [await first] + [await anext(it) for _ in range(limit - 1)]
        for m in got:
            assert source.ack(m.token)
        await until(lambda: source.queued >= limit)
        await asyncio.sleep(0.3)  # room for a broker that sends more than it may
        assert source.queued == limit
        async with asyncio.timeout(TIMEOUT):
            while len(got) < total:
                got.append(await anext(it))
                assert source.ack(got[-1].token)
                assert source.queued <= limit
        assert payloads(got) == [m.payload for m in sent]


async def test_resumes_a_session_whose_backlog_exceeds_the_queue_bound(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    # With a session present the broker sends its queued messages before the SUBACK; the
    # source must read on until the SUBACK even though its queue bound is already reached.
    limit, total = 5, 80
    sent = outgoing(prefix, total)
    config = settings(mqtt_url, client_ids("sub"), prefix, receive_maximum=limit)
    async with MqttSource(settings=config) as source:
        waiting = asyncio.ensure_future(anext(source.messages()))
        await wait_connected(source)
        waiting.cancel()
    await publish(mqtt_url, sent, client_id=client_ids("pub"))  # queued for the offline session
    async with MqttSource(settings=config) as source:
        it = source.messages()
        got: list[Received] = []
        async with asyncio.timeout(TIMEOUT):
            while len(got) < total:
                got.append(await anext(it))
                assert source.ack(got[-1].token)
        assert payloads(got) == [m.payload for m in sent]


async def test_acknowledgements_go_out_in_arrival_order(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    sent = outgoing(prefix, 6)
    config = settings(mqtt_url, client_ids("sub"), prefix, receive_maximum=3)
    async with MqttSource(settings=config) as source, Collector(source) as collector:
        await wait_connected(source)
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        m0, m1, m2 = await collector.take(3)
        assert source.ack(m2.token)  # held back: m0 and m1 are not acknowledged yet
        await collector.assert_idle()
        assert source.ack(m0.token)  # PUBACK for m0 only: one more message
        assert payloads(await collector.take(1)) == [b"m003"]
        await collector.assert_idle()
        assert source.ack(m1.token)  # PUBACKs for m1 and the held m2: two more
        assert payloads(await collector.take(2)) == [b"m004", b"m005"]
        assert not source.ack(m1.token)  # a token works once


async def test_acknowledgements_of_a_flush_go_out_together_in_arrival_order(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    sent = outgoing(prefix, 7)
    config = settings(mqtt_url, client_ids("sub"), prefix, receive_maximum=4)
    async with MqttSource(settings=config) as source, Collector(source) as collector:
        await wait_connected(source)
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        m0, m1, m2, m3 = await collector.take(4)
        assert source.ack_all([m3.token, m1.token]) == 2  # held back: m0 is not acknowledged
        await collector.assert_idle()
        assert source.ack_all([m0.token, m1.token]) == 1  # m1 again: a token works once
        assert payloads(await collector.take(2)) == [b"m004", b"m005"]  # m0 and m1 released
        await collector.assert_idle()
        assert source.ack_all([m2.token]) == 1  # m2 and the held m3
        assert payloads(await collector.take(1)) == [b"m006"]
        assert source.ack_all([]) == 0


async def test_reconnects_after_session_takeover(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    client_id = client_ids("sub")
    reconnects: list[int] = []
    config = settings(mqtt_url, client_id, prefix)
    source = MqttSource(settings=config, on_reconnect=lambda: reconnects.append(1))
    async with source, Collector(source) as collector:
        await wait_connected(source)
        await publish(mqtt_url, [Outgoing(f"{prefix}/d", b"before")], client_id=client_ids("pub"))
        (old,) = await collector.take(1)

        # A second client with the same id makes the broker drop the source; the source then
        # takes the session back (the intruder does not reconnect) and resubscribes.
        intruder = Intruder(mqtt_url, client_id)
        intruder.start()
        try:
            assert await asyncio.to_thread(intruder.connected.wait, TIMEOUT)
            assert await asyncio.to_thread(intruder.disconnected.wait, TIMEOUT)
        finally:
            intruder.stop()
        (again,) = await collector.take(1)
        assert again.payload == b"before"  # unacknowledged: redelivered on the new connection
        assert again.token.generation != old.token.generation
        assert not source.ack(old.token)  # the old connection's token is a no-op
        assert source.ack(again.token)
        assert source.connected
        assert source.reconnects == 1
        assert reconnects == [1]

        await publish(mqtt_url, [Outgoing(f"{prefix}/d", b"after")], client_id=client_ids("pub"))
        (after,) = await collector.take(1)
        assert after.payload == b"after"
        assert source.ack(after.token)
        await collector.assert_idle()


async def test_cancelled_next_loses_no_message(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    sent = outgoing(prefix, 30)
    async with MqttSource(settings=settings(mqtt_url, client_ids("sub"), prefix)) as source:
        it = source.messages()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # the first connection survives this cancellation
                await anext(it)
        await wait_connected(source)
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        got: list[Received] = []
        async with asyncio.timeout(TIMEOUT):
            while len(got) < len(sent):
                with contextlib.suppress(TimeoutError):
                    got.append(await asyncio.wait_for(anext(it), timeout=0.001))
        assert payloads(got) == [m.payload for m in sent]
        assert all(source.ack(m.token) for m in got)


async def test_waits_for_broker_then_resubscribes_after_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A private broker without persistence, so a restart also loses the session: the
    # subscription must be made again.
    with service_dir() as base:
        broker = PrivateBroker(base)
        url = broker.url()
        prefix = "private"
        caplog.set_level(logging.INFO, logger="ingest.source")
        source = MqttSource(settings=settings(url, "private-sub", prefix))
        async with source, Collector(source) as collector:
            await until(lambda: "retrying" in caplog.text)
            assert not source.connected
            await broker.start()
            try:
                await wait_connected(source)
                await publish(url, [Outgoing(f"{prefix}/a", b"one")], client_id="private-pub")
                (one,) = await collector.take(1)
                assert source.ack(one.token)

                await broker.stop()
                await until(lambda: not source.connected)
                await broker.start()
                await wait_connected(source)
                assert source.reconnects == 1
                await publish(url, [Outgoing(f"{prefix}/a", b"two")], client_id="private-pub")
                (two,) = await collector.take(1)
                assert two.payload == b"two"
                assert source.ack(two.token)
            finally:
                await broker.stop()
    assert "lost; reconnecting" in caplog.text
    assert "reconnected to mqtt://127.0.0.1" in caplog.text


async def test_refused_credentials_are_a_config_error() -> None:
    with service_dir() as base:
        broker = PrivateBroker(base, users={})  # anonymous access off, and nobody known
        await broker.start()
        try:
            config = settings(broker.url(user="nobody", password="wrong"), "refused-sub", "private")
            async with MqttSource(settings=config) as source:
                with pytest.raises(ConfigError, match=r"^mqtt\.url: mqtt://nobody:\*\*\*@"):
                    async with asyncio.timeout(TIMEOUT):
                        await anext(source.messages())
                assert not source.connected
        finally:
            await broker.stop()


async def test_iteration_ends_when_closed(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    async def drain(source: MqttSource) -> list[Received]:
        return [m async for m in source.messages()]

    source = MqttSource(settings=settings(mqtt_url, client_ids("sub"), prefix))
    async with source:
        task = asyncio.create_task(drain(source))
        await wait_connected(source)
    assert not source.connected
    async with asyncio.timeout(TIMEOUT):
        assert await task == []


async def test_iteration_ends_when_closed_while_connecting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = settings(f"mqtt://127.0.0.1:{free_port()}", "nobody", "private")
    async with MqttSource(settings=config) as source:
        task = asyncio.create_task(anext(source.messages(), None))
        await until(lambda: "retrying" in caplog.text)  # the connect task is running
    async with asyncio.timeout(TIMEOUT):
        assert await task is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://broker:1883", "must start with mqtt:// or mqtts://"),
        ("mqtt://", "host"),
        ("mqtt://broker:99999", "valid URL"),
        ("mqtt://broker:1883/topic", "nothing after it"),
        ("broker:1883", "must start with mqtt:// or mqtts://"),
    ],
)
def test_bad_url_is_a_config_error(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=rf"^mqtt\.url: .*{reason}"):
        Settings(url=url, client_id="x")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"client_id": "no spaces"}, "mqtt.client_id"),
        ({"topic_prefix": "a/#"}, "mqtt.topic_prefix"),
        ({"share_group": "a/b"}, "mqtt.share_group"),
        ({"receive_maximum": 0}, "mqtt.receive_maximum"),
        ({"receive_maximum": 65536}, "mqtt.receive_maximum"),
        ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "mqtt.reconnect_min_s"),
        ({"tls_ca_file": "/ca.pem"}, "mqtt.tls_ca_file"),
    ],
)
def test_bad_settings_name_their_key(overrides: dict[str, object], key: str) -> None:
    values: dict[str, object] = {"url": "mqtt://broker", "client_id": "x", **overrides}
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        Settings(**values)  # type: ignore[arg-type]


def test_repr_hides_the_password() -> None:
    config = Settings(url="mqtts://ingest:s%40cret@broker.example", client_id="x")
    assert (
        repr(config) == "Settings(url='mqtts://ingest:***@broker.example:8883', client_id='x', ...)"
    )


async def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    config = Settings(url="mqtts://broker", client_id="x", tls_ca_file=str(tmp_path / "no.pem"))
    with pytest.raises(ConfigError, match=r"^mqtt\.tls_ca_file: "):
        async with MqttSource(settings=config):
            pass


PAUSE_S = 180.0


@pytest.mark.slow
async def test_keepalive_across_a_three_minute_intake_pause(
    mqtt_url: str, prefix: str, client_ids: ClientIds
) -> None:
    # Three minutes without taking or acknowledging anything, with a 5 s keepalive, while the
    # source's queue is at its bound (Mosquitto 2.0.11 fills it after the first PUBACK): the
    # keepalive must go on, so the broker keeps the connection and delivers nothing twice.
    limit, total = 5, 12
    sent = outgoing(prefix, total)
    config = settings(mqtt_url, client_ids("sub"), prefix, receive_maximum=limit, keepalive_s=5)
    async with MqttSource(settings=config) as source:
        it = source.messages()
        first = asyncio.ensure_future(anext(it))
        await wait_connected(source)
        await publish(mqtt_url, sent, client_id=client_ids("pub"))
        async with asyncio.timeout(TIMEOUT):
            got = [await first] + [await anext(it) for _ in range(limit - 1)]
        assert source.ack(got[0].token)
        await until(lambda: source.queued >= 1)
        await asyncio.sleep(PAUSE_S)
        assert source.connected
        assert source.reconnects == 0
        for m in got[1:]:
            assert source.ack(m.token)
        async with asyncio.timeout(TIMEOUT):
            while len(got) < total:
                got.append(await anext(it))
                assert source.ack(got[-1].token)
        assert payloads(got) == [m.payload for m in sent]
        assert {m.token.generation for m in got} == {got[0].token.generation}
        assert await source.flush_acks()
        assert source.reconnects == 0
