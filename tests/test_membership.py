"""Membership changes lose nothing: a member leaving its share group, and `ingest drain`."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env, share_group
from tests.support.mqtt import Publisher, purge_session, session_present
from tests.support.process import wait_until
from tests.support.rows import stored
from tests.support.streams import stream


@pytest.fixture
def site() -> str:
    return f"site-{uuid.uuid4().hex[:8]}"


async def acked(*members: Ingester) -> float:
    return sum([await m.metric("ingest_messages_acknowledged_total") for m in members])


async def test_sigterm_leaves_the_share_group_and_ends_the_session(
    database: Database, mqtt_url: str, prefix: str, site: str
) -> None:
    a, b = await share_group(database, mqtt_url, prefix, members=2)
    a_id = a.env["INGEST_MQTT_CLIENT_ID"]
    messages, expected = stream(site, devices=6, messages=40, per_message=20)
    first, second = messages[:120], messages[120:]
    try:
        with Publisher(mqtt_url) as pub:
            for device, payload in first:
                pub.publish(f"{prefix}/{device}", payload)

            async def first_half_acked() -> bool:
                return await acked(a, b) >= len(first)

            await wait_until(first_half_acked, timeout=60)
            assert await a.stop() == 0, a.log.decode()
            assert f"session of {a_id!r} ended".encode() in a.log, a.log.decode()
            # The broker no longer holds a session for the member that left, so nothing of
            # what follows is routed to it: the remaining member takes it all.
            assert not await asyncio.to_thread(session_present, mqtt_url, a_id)
            assert await filters_of(database, a_id) == []  # nor any filter recorded for it
            assert len(await filters_of(database, b.env["INGEST_MQTT_CLIENT_ID"])) == 2
            for device, payload in second:
                pub.publish(f"{prefix}/{device}", payload)

        async def all_stored() -> bool:
            return len(await stored(database, site)) >= len(expected)

        await wait_until(all_stored, timeout=60)
        rows = await stored(database, site)
        assert len(rows) == len(expected)
        assert set(rows) == expected
    finally:
        assert await b.stop() == 0, b.log.decode()


async def test_without_leave_on_stop_the_session_stays(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    env = ingester_env(
        database, mqtt_url, prefix, INGEST_MQTT_SHARE_GROUP=group, INGEST_MQTT_LEAVE_ON_STOP="false"
    )
    a = await Ingester(env).start()
    assert await a.stop() == 0, a.log.decode()
    assert b"ended" not in a.log
    assert await asyncio.to_thread(session_present, mqtt_url, env["INGEST_MQTT_CLIENT_ID"])


async def test_drain_ingests_an_orphaned_session_and_ends_it(
    database: Database, mqtt_url: str, prefix: str, site: str
) -> None:
    a, b = await share_group(database, mqtt_url, prefix, members=2)
    a_id = a.env["INGEST_MQTT_CLIENT_ID"]
    messages, expected = stream(site, devices=6, messages=30, per_message=20)
    try:
        await a.kill()  # crashed, and will not come back
        with Publisher(mqtt_url) as pub:
            for device, payload in messages:
                pub.publish(f"{prefix}/{device}", payload)

        async def settled() -> bool:
            return await b.metric("ingest_messages_acknowledged_total") >= 1

        await wait_until(settled, timeout=60)
        await asyncio.sleep(2)  # B has taken its share; the rest waits in A's session
        before = await stored(database, site)
        assert len(before) < len(expected), "the broker routed nothing to the crashed member"

        drain = Ingester(
            {**a.env, "INGEST_MQTT_CLIENT_ID": "unused"}, command=("drain", "--client-id", a_id)
        )
        await drain.spawn()
        assert await drain.wait_exit(timeout=120) == 0, drain.log.decode()
        assert f"session of {a_id!r} ended".encode() in drain.log, drain.log.decode()
        rows = await stored(database, site)
        assert len(rows) == len(expected)
        assert set(rows) == expected
        assert not await asyncio.to_thread(session_present, mqtt_url, a_id)
    finally:
        assert await b.stop() == 0, b.log.decode()
        await asyncio.to_thread(purge_session, mqtt_url, a_id)


async def test_drain_of_a_client_id_without_a_session_ends_at_once(
    database: Database, mqtt_url: str, prefix: str
) -> None:
    client_id = f"gone-{uuid.uuid4().hex[:8]}"
    drain = Ingester(
        ingester_env(database, mqtt_url, prefix), command=("drain", "--client-id", client_id)
    )
    await drain.spawn()
    assert await drain.wait_exit(timeout=120) == 0, drain.log.decode()
    assert b"nothing to drain" in drain.log
    assert not await asyncio.to_thread(session_present, mqtt_url, client_id)


async def test_a_filter_no_longer_configured_is_unsubscribed(
    database: Database, mqtt_url: str, prefix: str, site: str
) -> None:
    """A persistent session keeps its subscriptions: after a change of topic prefix, the
    ingester unsubscribes from the old filter, so nothing published under it reaches it, and
    forgets it once the broker confirmed."""
    old_prefix, new_prefix = f"{prefix}/old", f"{prefix}/new"
    env = ingester_env(database, mqtt_url, old_prefix)
    client_id = env["INGEST_MQTT_CLIENT_ID"]
    first = Ingester(env)
    await first.start()
    assert await first.stop() == 0, first.log.decode()  # no share group: the session is kept
    assert await filters_of(database, client_id) == [SPARKPLUG, f"{old_prefix}/#"]

    second = await Ingester({**env, "INGEST_MQTT_TOPIC_PREFIX": new_prefix}).start()
    try:
        line = f"MQTT unsubscribed from [{f'{old_prefix}/#'!r}]: no longer configured"
        assert line.encode() in second.log, second.log.decode()

        async def forgotten() -> bool:
            return await filters_of(database, client_id) == [SPARKPLUG, f"{new_prefix}/#"]

        await wait_until(forgotten, timeout=30)
        messages, _ = stream(site, devices=1, messages=2, per_message=3)
        (_, old_payload), (_, new_payload) = messages
        with Publisher(mqtt_url) as pub:
            # Published first: were the old filter still in the session, it would arrive first.
            pub.publish(f"{old_prefix}/{site}/dev-old", old_payload)
            pub.publish(f"{new_prefix}/{site}/dev-new", new_payload)
        await acked_at_least(second, 1)
        assert await second.metric("ingest_messages_acknowledged_total") == 1
        assert await second.metric("ingest_dead_letters_total") == 0
        assert {row[1] for row in await stored(database, site)} == {f"{site}/dev-new"}
    finally:
        assert await second.stop() == 0, second.log.decode()
        await asyncio.to_thread(purge_session, mqtt_url, client_id)


SPARKPLUG = "spBv1.0/#"  # subscribed by default beside the prefix


async def filters_of(db: Database, client_id: str) -> list[str]:
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT topic_filter FROM telemetry.mqtt_subscriptions WHERE client_id = $1 ORDER BY 1",
            client_id,
        )
    finally:
        await conn.close()
    return [r["topic_filter"] for r in rows]
