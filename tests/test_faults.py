"""Faults: kill -9, a PostgreSQL restart, a broker restart, a database that is down or stalled.

Each scenario publishes a stream with a plain paho client, runs `ingest run` as a child process
through the fault, and then compares everything published with everything stored: every
reading exactly once, nothing missing. Servers that a scenario restarts are private to it
(tests/support/); the shared stack is never restarted.
"""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.broker import PrivateBroker
from tests.support.cluster import Database, PrivateCluster, admin_dsn, private_cluster
from tests.support.ingester import Ingester, acked_at_least, ingester_env
from tests.support.mqtt import Publisher, publish, purge_session
from tests.support.net import SlowCloseProxy, http_get
from tests.support.process import service_dir, wait_until
from tests.support.rows import assert_exactly_once, ingest_waits_for_lock, md5, table_lock
from tests.support.rows import dead_letter_digests as dead_letters
from tests.support.streams import T0, Row, batch_payload, f8, new_prefix, new_site, stream

MiB = 1024 * 1024


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[PrivateCluster]:
    """One private PostgreSQL+TimescaleDB cluster for the tests that stop or restart it."""
    async with private_cluster() as private:
        yield private


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.netloc.rpartition(':')[0]}:{port}"))


def topics(prefix: str, messages: list[tuple[str, bytes]]) -> list[tuple[str, bytes, None]]:
    return [(f"{prefix}/{device}", payload, None) for device, payload in messages]


async def test_kill_9_three_times_mid_stream_loses_nothing_and_doubles_nothing(
    database: Database, mqtt_url: str
) -> None:
    site, prefix = new_site(), new_prefix()
    env = ingester_env(database, mqtt_url, prefix, INGEST_MQTT_RECEIVE_MAXIMUM="50")
    messages, expected = stream(site, devices=4, messages=150, per_message=200)
    chunks = [messages[:200], messages[200:400], messages[400:]]
    pub = Publisher(mqtt_url)
    try:
        # 1. In the middle of the stream, while flushes are being written and acknowledged.
        first = await Ingester(env).start()
        for device, payload in chunks[0]:
            pub.publish(f"{prefix}/{device}", payload)
        await acked_at_least(first, 20)
        await first.kill()

        # 2. Between receipt and commit, for certain: the flush's COPY is blocked on a lock.
        for device, payload in chunks[1]:
            pub.publish(f"{prefix}/{device}", payload)
        pub.wait()
        async with table_lock(database, "telemetry.readings") as holder:
            second = await Ingester(env).start()
            await wait_until(lambda: ingest_waits_for_lock(holder))
            assert await second.metric("ingest_inflight_messages") > 0
            await second.kill()

        # 3. Right after a restart, while the session's backlog is being redelivered.
        for device, payload in chunks[2]:
            pub.publish(f"{prefix}/{device}", payload)
        pub.wait()
        third = await Ingester(env).start()
        await acked_at_least(third, 1)
        await third.kill()
    finally:
        pub.close()

    last = await Ingester(env).start()  # same client id: the persistent session resumes
    try:
        await assert_exactly_once(database, site, expected, running=[last])
        assert await dead_letters(database, prefix) == []
    finally:
        assert await last.stop() == 0, last.log.decode()
        await asyncio.to_thread(purge_session, mqtt_url, env["INGEST_MQTT_CLIENT_ID"])


async def test_postgres_restart_mid_stream_is_retried_and_loses_nothing(
    cluster: PrivateCluster, mqtt_url: str
) -> None:
    await cluster.ensure_running()
    db = cluster.as_database()
    site, prefix = new_site(), new_prefix()
    env = ingester_env(db, mqtt_url, prefix, INGEST_MQTT_RECEIVE_MAXIMUM="50")
    messages, expected = stream(site, devices=4, messages=100, per_message=200)
    before, during, after = messages[:150], messages[150:300], messages[300:]
    ingester = await Ingester(env).start()
    try:
        await publish(mqtt_url, topics(prefix, before))
        await acked_at_least(ingester, 50)
        publishing = asyncio.create_task(publish(mqtt_url, topics(prefix, during)))
        await cluster.restart()  # -m fast: the ingester's session is terminated
        await publishing
        # Published after the restart: at least this flush meets the terminated connection.
        await publish(mqtt_url, topics(prefix, after))
        await assert_exactly_once(db, site, expected, running=[ingester])
        assert await ingester.metric("ingest_db_retries_total") > 0
        assert await dead_letters(db, prefix) == []
    finally:
        assert await ingester.stop() == 0, ingester.log.decode()
        await asyncio.to_thread(purge_session, mqtt_url, env["INGEST_MQTT_CLIENT_ID"])
    assert b"not written, retrying" in ingester.log


async def test_database_sessions_ended_while_idle_are_replaced(
    database: Database, mqtt_url: str
) -> None:
    # What a PostgreSQL restart or failover does to idle connections, made deterministic:
    # the server ends every session of the ingester (FATAL 57P01), and the proxy in between
    # passes that message on at once but the close only seconds later.
    site, prefix = new_site(), new_prefix()
    messages, expected = stream(site, devices=4, messages=20, per_message=100)
    first, second = messages[:40], messages[40:]
    async with SlowCloseProxy(
        target_port=urlsplit(database.ingest_url).port or 5432, hold_s=5
    ) as proxy:
        db = replace(database, ingest_url=with_port(database.ingest_url, proxy.port))
        env = ingester_env(db, mqtt_url, prefix)
        ingester = await Ingester(env).start()
        try:
            await publish(mqtt_url, topics(prefix, first))
            await acked_at_least(ingester, len(first))
            admin = await asyncpg.connect(admin_dsn(database.name))
            try:
                ended = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE usename = 'ingest' AND datname = $1",
                    database.name,
                )
            finally:
                await admin.close()
            assert ended >= 1
            await publish(mqtt_url, topics(prefix, second))
            await assert_exactly_once(database, site, expected, running=[ingester])
            assert await ingester.metric("ingest_db_retries_total") > 0
        finally:
            assert await ingester.stop() == 0, ingester.log.decode()
            await asyncio.to_thread(purge_session, mqtt_url, env["INGEST_MQTT_CLIENT_ID"])


async def test_database_unreachable_at_start_waits_then_serves(
    cluster: PrivateCluster, mqtt_url: str
) -> None:
    await cluster.ensure_running()
    db = cluster.as_database()
    site, prefix = new_site(), new_prefix()
    env = ingester_env(db, mqtt_url, prefix)
    messages, expected = stream(site, devices=2, messages=20, per_message=50)
    await cluster.stop()
    ingester = await Ingester(env).spawn()
    try:

        async def alive() -> bool:
            status, body = await http_get(ingester.port, "/healthz")
            return status == 200 and body == b"ok\n"

        await wait_until(alive)

        async def retrying_but_not_ready() -> bool:
            # Checked at every poll: the process stays up and says why it is not ready.
            assert ingester.alive, f"ingest run exited: {ingester.log.decode()}"
            status, body = await http_get(ingester.port, "/readyz")
            assert status == 503, body
            assert b"database: not connected" in body.splitlines(), body
            health, _ = await http_get(ingester.port, "/healthz")
            assert health == 200
            # Six attempts with 0.1 s doubling to 1 s between them: several seconds down.
            return ingester.log.count(b"database not reachable, retrying") >= 6

        await wait_until(retrying_but_not_ready, timeout=60)
        assert await ingester.metric("ingest_ready") == 0

        await cluster.start()
        await ingester.wait_ready()
        await publish(mqtt_url, topics(prefix, messages))
        await assert_exactly_once(db, site, expected, running=[ingester])
        assert await ingester.metric("ingest_ready") == 1
    finally:
        await cluster.ensure_running()
        assert await ingester.stop() == 0, ingester.log.decode()
        await asyncio.to_thread(purge_session, mqtt_url, env["INGEST_MQTT_CLIENT_ID"])
    assert b"Traceback" not in ingester.log, ingester.log.decode()


async def test_broker_restart_mid_stream_resumes_the_persistent_session(
    database: Database,
) -> None:
    site, prefix = new_site(), new_prefix()
    messages, expected = stream(site, devices=4, messages=100, per_message=100)
    before, after = messages[:250], messages[250:]
    with service_dir() as base:
        broker = PrivateBroker(base, persistence=True)
        await broker.start()
        url = broker.url()
        env = ingester_env(database, url, prefix, INGEST_MQTT_RECEIVE_MAXIMUM="20")
        ingester = await Ingester(env).start()
        try:
            # Hold the ingester's flushes so that, when the broker goes down, it has messages
            # in flight (received, unacknowledged) and the broker has the rest queued.
            async with table_lock(database, "telemetry.readings") as holder:
                await publish(url, topics(prefix, before))
                await wait_until(lambda: ingest_waits_for_lock(holder))
                assert await ingester.metric("ingest_inflight_messages") > 0
                await broker.stop()  # SIGTERM: the broker saves its sessions and queues
                await broker.start()
                await publish(url, topics(prefix, after))

                async def reconnected() -> bool:
                    return await ingester.metric("ingest_mqtt_reconnects_total") >= 1

                await wait_until(reconnected)
            await assert_exactly_once(database, site, expected, running=[ingester])
            assert await ingester.metric("ingest_mqtt_reconnects_total") >= 1
            assert await dead_letters(database, prefix) == []
        finally:
            assert await ingester.stop() == 0, ingester.log.decode()
            await broker.stop()
    log = ingester.log.decode()
    assert "lost; reconnecting" in log
    assert "(session present: True)" in log.split("lost; reconnecting", 1)[1], log
    assert "had no session" not in log


# The stall: how long the readings table stays locked, and the two ingesters' bounds.
STALL_S = 20.0
BYTES_BOUND = 2 * MiB  # the smallest flush.max_inflight_bytes the config accepts
READINGS_BOUND = 1_500  # with flush.max_readings 1000: the queue of flushes holds more
JUNK = 1_000_000  # bytes of a junk payload: under the 1 MiB payload limit, a dead letter
# RSS headroom over the ingester's warmed-up RSS. What the bounds let it hold while stalled:
# in-flight payloads (2 MiB + one 1 MB message), the source's queue (receive maximum 5 x 1 MB),
# their decoded columns (17 bytes per 8-byte reading) and the blocked flush's COPY buffer
# (40 bytes per reading): under 20 MiB (about 6 MiB measured). What the stream offers it: 49
# MiB of payloads, which an ingester that kept reading would hold, plus their decoded columns.
RSS_HEADROOM = 32 * MiB


T_WARM = T0 - 3_600_000_000  # a warm-up batch an hour before the streams
WARM_CH: dict[str, object] = {"s": "warm", "dt": 1000, "v": f8([1.0, 2.0])}


def warm_rows(site: str) -> set[Row]:
    device = f"{site}/warm/dev"
    return {(T_WARM, device, "warm", 1.0, 0), (T_WARM + 1000, device, "warm", 2.0, 0)}


def junk(n: int) -> bytes:
    """A distinct payload that is malformed MessagePack from its first byte."""
    return b"\xc1" + n.to_bytes(4, "big") + bytes(JUNK - 5)


async def test_stalled_database_keeps_memory_bounded_and_drops_nothing(
    database: Database,
) -> None:
    site_a, prefix_a = new_site(), new_prefix()
    site_b, prefix_b = new_site(), new_prefix()
    # A: capped by in-flight bytes (1 MB junk payloads, each a dead letter, and 64 KB batches).
    valid_a, expected_a = stream(site_a, devices=2, messages=24, per_message=8000)
    junk_a = [(f"{prefix_a}/{site_a}/line1/junk", junk(n), None) for n in range(48)]
    stream_a: list[tuple[str, bytes, None]] = []
    for n, (device, payload) in enumerate(valid_a):  # a batch with readings comes first
        stream_a += [(f"{prefix_a}/{device}", payload, None), *junk_a[n :: len(valid_a)]]
    # B: capped by in-flight readings (200 per message).
    valid_b, expected_b = stream(site_b, devices=2, messages=60, per_message=200)
    largest_a = max(len(payload) for _, payload, _ in stream_a)

    with service_dir() as base:
        broker = PrivateBroker(base)  # no persistence: the stall queues ~50 MB in it
        await broker.start()
        url = broker.url()
        a = Ingester(
            ingester_env(
                database,
                url,
                prefix_a,
                INGEST_FLUSH_MAX_INFLIGHT_BYTES=str(BYTES_BOUND),
                INGEST_MQTT_RECEIVE_MAXIMUM="5",
            )
        )
        b = Ingester(
            ingester_env(
                database,
                url,
                prefix_b,
                INGEST_FLUSH_MAX_READINGS="1000",
                INGEST_FLUSH_MAX_INFLIGHT_READINGS=str(READINGS_BOUND),
                INGEST_MQTT_RECEIVE_MAXIMUM="20",
            )
        )
        await a.start()
        await b.start()
        try:
            # Warm up (first sensors registered, first COPY), then take the baseline RSS.
            warm = [(f"{prefix_a}/{site_a}/warm/dev", batch_payload(T_WARM, [WARM_CH]), None)]
            warm += [(f"{prefix_b}/{site_b}/warm/dev", batch_payload(T_WARM, [WARM_CH]), None)]
            await publish(url, warm)
            await acked_at_least(a, 1)
            await acked_at_least(b, 1)
            baseline = {"a": a.rss(), "b": b.rss()}
            peak = {"a": 0, "b": 0}
            seen: dict[str, dict[str, float]] = {"a": {}, "b": {}}
            gauges = ("ingest_inflight_bytes", "ingest_inflight_readings")

            async with table_lock(database, "telemetry.readings") as holder:
                loop = asyncio.get_running_loop()
                end = loop.time() + STALL_S
                publishing = asyncio.create_task(publish(url, stream_a + topics(prefix_b, valid_b)))
                while loop.time() < end:  # sample the stalled ingesters
                    for name, ingester in (("a", a), ("b", b)):
                        assert ingester.alive, ingester.log.decode()
                        peak[name] = max(peak[name], ingester.rss())
                        for gauge in gauges:
                            value = await ingester.metric(gauge)
                            seen[name][gauge] = max(seen[name].get(gauge, 0.0), value)
                    await asyncio.sleep(0.2)
                async with asyncio.timeout(60):
                    await publishing  # the broker took everything while the database stalled
                assert await ingest_waits_for_lock(holder)
                # Nothing committed during the stall, and both reached their bound.
                assert await a.metric("ingest_messages_acknowledged_total") == 1
                assert await b.metric("ingest_messages_acknowledged_total") == 1
                assert seen["a"]["ingest_inflight_bytes"] >= BYTES_BOUND - largest_a
                assert seen["b"]["ingest_inflight_readings"] >= READINGS_BOUND - 200

            # The caps held: at most the bound plus the one message taken while under it.
            assert seen["a"]["ingest_inflight_bytes"] < BYTES_BOUND + largest_a, seen
            assert seen["b"]["ingest_inflight_readings"] < READINGS_BOUND + 200, seen
            for name in ("a", "b"):
                growth = peak[name] - baseline[name]
                assert growth < RSS_HEADROOM, (
                    f"ingester {name}: RSS grew by {growth / MiB:.0f} MiB while stalled "
                    f"({baseline[name] / MiB:.0f} -> {peak[name] / MiB:.0f} MiB)"
                )

            # Released: intake resumes and everything lands, once.
            await assert_exactly_once(
                database, site_a, expected_a | warm_rows(site_a), running=[a, b]
            )
            await assert_exactly_once(
                database, site_b, expected_b | warm_rows(site_b), running=[a, b]
            )

            async def all_junk_stored() -> bool:
                return len(await dead_letters(database, prefix_a)) >= len(junk_a)

            await wait_until(all_junk_stored, timeout=120)
            letters = await dead_letters(database, prefix_a)
            assert sorted((d.payload_len, d.payload_md5) for d in letters) == sorted(
                (len(p), md5(p)) for _, p, _ in junk_a
            )
            assert {d.reason for d in letters} == {
                "payload: MessagePack is malformed: byte 0 is 0xc1, which is no type"
            }
            assert await dead_letters(database, prefix_b) == []
        finally:
            codes = await asyncio.gather(a.stop(), b.stop())
            await broker.stop()
        assert list(codes) == [0, 0], (a.log.decode(), b.log.decode())


async def test_sigterm_while_the_database_is_down_ends_within_the_grace(
    cluster: PrivateCluster, mqtt_url: str
) -> None:
    """The writer is stuck retrying, a second flush waits in the queue and a third behind it:
    SIGTERM still ends the process once flush.shutdown_grace_s is over, acknowledging nothing
    that was not committed."""
    await cluster.ensure_running()
    db = cluster.as_database()
    site, prefix = new_site(), new_prefix()
    env = ingester_env(db, mqtt_url, prefix, INGEST_FLUSH_SHUTDOWN_GRACE_S="2")
    messages, expected = stream(site, devices=1, messages=6, per_message=10)
    ingester = await Ingester(env).start()
    try:
        await cluster.stop()
        for n in range(1, 4):  # one flush each: the writer is never idle again
            await publish(mqtt_url, topics(prefix, messages[n - 1 : n]))
            await wait_until(functools.partial(_received_at_least, ingester, n), timeout=30)
        assert ingester.proc is not None
        ingester.proc.send_signal(signal.SIGTERM)
        # Without a bound, shutdown waits for the database, which stays down for this long.
        code = await ingester.wait_exit(timeout=60)
        assert code == 0, ingester.log.decode()
        assert b"final flush not committed within 2s" in ingester.log, ingester.log.decode()
        assert b"Traceback" not in ingester.log, ingester.log.decode()
    finally:
        await cluster.ensure_running()
    # Nothing was acknowledged: a new ingester gets everything again from the session.
    last = await Ingester(env).start()
    try:
        await publish(mqtt_url, topics(prefix, messages[3:]))
        await assert_exactly_once(db, site, expected, running=[last])
    finally:
        assert await last.stop() == 0, last.log.decode()
        await asyncio.to_thread(purge_session, mqtt_url, env["INGEST_MQTT_CLIENT_ID"])


async def _received_at_least(ingester: Ingester, n: int) -> bool:
    return await ingester.metric("ingest_messages_received_total") >= n
