"""End to end: a separate publisher, the real broker, `ingest run`, and the real database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import numpy as np
import pytest

from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env, share_group
from tests.support.mqtt import Publisher
from tests.support.process import wait_until
from tests.support.rows import dead_letters, stored
from tests.support.streams import T0, Row, f8, stream


@pytest.fixture
def site() -> str:
    """A site name no other test uses, so device paths (and readings) never collide."""
    return f"site-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def ingester(database: Database, mqtt_url: str, prefix: str) -> AsyncIterator[Ingester]:
    proc = await Ingester(ingester_env(database, mqtt_url, prefix)).start()
    yield proc
    assert await proc.stop() == 0, proc.log.decode()


def sample_messages(site: str) -> tuple[list[tuple[str, bytes, str | None]], list[Row]]:
    """(device path, payload, content type) of each encoding, and the rows they must produce."""
    press = f"{site}/press-shop/line2/press-07"
    robot = f"{site}/assembly/cell-3/robot-1"
    meter = f"{site}/energy-meter-2"
    mp = msgspec.msgpack.encode
    messages = [
        # MessagePack, regular sampling, float64 bin values, a unit.
        (
            press,
            mp(
                {
                    "v": 1,
                    "t0": T0,
                    "seq": 1,
                    "ch": [
                        {
                            "s": "spindle.temp",
                            "dt": 1_000_000,
                            "v": f8([71.2, 71.4, 71.9]),
                            "u": "degC",
                        },
                    ],
                }
            ),
            "application/msgpack",
        ),
        # MessagePack, explicit offsets, arrays of numbers, per-reading quality.
        (
            press,
            mp(
                {
                    "v": 1,
                    "t0": T0,
                    "ch": [
                        {
                            "s": "vib.rms",
                            "t": [0, 250_000, 500_000],
                            "v": [0.12, 0.13, 0.11],
                            "q": [0, 0, 3],
                        },
                    ],
                }
            ),
            None,
        ),
        # MessagePack, float32 bin values, int64 bin offsets, uint8 bin quality.
        (
            robot,
            mp(
                {
                    "v": 1,
                    "t0": T0 + 5,
                    "ch": [
                        {
                            "s": "axis1.torque",
                            "vt": "f4",
                            "v": np.asarray([1.5, -2.25], "<f4").tobytes(),
                            "t": np.asarray([0, 10], "<i8").tobytes(),
                            "q": bytes([1, 2]),
                        },
                        {"s": "axis2.torque", "v": [9.0], "q": 7},
                    ],
                }
            ),
            "application/msgpack",
        ),
        # JSON batch with an RFC 3339 base time.
        (
            robot,
            b'{"v": 1, "t0": "2026-01-01T00:00:01.5Z", "ch": [{"s": "gripper.force", "dt": 500000,'
            b' "v": [10, 11.5], "q": [0, 1], "u": "N"}]}',
            "application/json",
        ),
        # JSON single sample, sniffed by its first byte.
        (
            meter,
            b'{"ts": "2026-01-01T00:00:00.250Z", "values": {"power.kw": 13.4, "pf": 0.97}}',
            None,
        ),
        # JSON array of single samples, one of them with integer microseconds.
        (
            meter,
            b'[{"ts": 1767225601000000, "values": {"power.kw": 13.5}},'
            b' {"ts": "2026-01-01T00:00:02+00:00", "values": {"power.kw": 13.6}}]',
            "application/json; charset=utf-8",
        ),
    ]
    rows: list[Row] = [
        (T0, press, "spindle.temp", 71.2, 0),
        (T0 + 1_000_000, press, "spindle.temp", 71.4, 0),
        (T0 + 2_000_000, press, "spindle.temp", 71.9, 0),
        (T0, press, "vib.rms", 0.12, 0),
        (T0 + 250_000, press, "vib.rms", 0.13, 0),
        (T0 + 500_000, press, "vib.rms", 0.11, 3),
        (T0 + 5, robot, "axis1.torque", 1.5, 1),
        (T0 + 15, robot, "axis1.torque", -2.25, 2),
        (T0 + 5, robot, "axis2.torque", 9.0, 7),
        (T0 + 1_500_000, robot, "gripper.force", 10.0, 0),
        (T0 + 2_000_000, robot, "gripper.force", 11.5, 1),
        (T0 + 250_000, meter, "pf", 0.97, 0),
        (T0 + 250_000, meter, "power.kw", 13.4, 0),
        (T0 + 1_000_000, meter, "power.kw", 13.5, 0),
        (T0 + 2_000_000, meter, "power.kw", 13.6, 0),
    ]
    return messages, sorted(rows, key=lambda r: (r[1], r[2], r[0]))


async def test_every_encoding_lands_exactly_and_redelivery_changes_nothing(
    database: Database, mqtt_url: str, prefix: str, site: str, ingester: Ingester
) -> None:
    messages, expected = sample_messages(site)
    with Publisher(mqtt_url) as pub:
        for device, payload, ctype in messages:
            pub.publish(f"{prefix}/{device}", payload, content_type=ctype)
    await acked_at_least(ingester, len(messages))
    assert await stored(database, site) == expected
    assert await dead_letters(database, prefix) == []

    with Publisher(mqtt_url) as pub:  # the same batches again: a device retry or a redelivery
        for device, payload, ctype in messages:
            pub.publish(f"{prefix}/{device}", payload, content_type=ctype)
    await acked_at_least(ingester, 2 * len(messages))
    assert await stored(database, site) == expected
    assert await ingester.metric("ingest_readings_written_total") == len(expected)
    assert await ingester.metric("ingest_readings_duplicate_total") == len(expected)

    conn = await asyncpg.connect(database.analyst_url)
    try:
        units = await conn.fetch(
            "SELECT device, sensor, unit, asset FROM telemetry.sensors_v WHERE device LIKE $1 || '/%'"
            " ORDER BY 1, 2",
            site,
        )
        assets = await conn.fetch(
            "SELECT path, depth, (SELECT path FROM telemetry.assets p WHERE p.id = a.parent_id) AS parent"
            "  FROM telemetry.assets a WHERE path LIKE $1 || '%' ORDER BY path",
            site,
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in units] == [
        (f"{site}/assembly/cell-3/robot-1", "axis1.torque", None, f"{site}/assembly/cell-3"),
        (f"{site}/assembly/cell-3/robot-1", "axis2.torque", None, f"{site}/assembly/cell-3"),
        (f"{site}/assembly/cell-3/robot-1", "gripper.force", "N", f"{site}/assembly/cell-3"),
        (f"{site}/energy-meter-2", "pf", None, site),
        (f"{site}/energy-meter-2", "power.kw", None, site),
        (f"{site}/press-shop/line2/press-07", "spindle.temp", "degC", f"{site}/press-shop/line2"),
        (f"{site}/press-shop/line2/press-07", "vib.rms", None, f"{site}/press-shop/line2"),
    ]
    assert [tuple(r) for r in assets] == [
        (site, 1, None),
        (f"{site}/assembly", 2, site),
        (f"{site}/assembly/cell-3", 3, f"{site}/assembly"),
        (f"{site}/press-shop", 2, site),
        (f"{site}/press-shop/line2", 3, f"{site}/press-shop"),
    ]


async def test_same_sensor_and_time_in_one_batch_later_wins(
    database: Database, mqtt_url: str, prefix: str, site: str, ingester: Ingester
) -> None:
    device = f"{site}/line1/dev-1"
    payload = msgspec.msgpack.encode(
        {
            "v": 1,
            "t0": T0,
            "ch": [
                {"s": "temp", "t": [0, 1, 0], "v": [1.0, 2.0, 3.0]},
                {"s": "temp", "t": [1], "v": [4.0]},
            ],
        }
    )
    with Publisher(mqtt_url) as pub:
        pub.publish(f"{prefix}/{device}", payload)
    await acked_at_least(ingester, 1)
    assert await stored(database, site) == [
        (T0, device, "temp", 3.0, 0),
        (T0 + 1, device, "temp", 4.0, 0),
    ]


# Each rule of the wire format, as (topic levels after the prefix, payload, content type, reason);
# a reason ending in "…" is a prefix (the rest names the ingester's clock).
def bad_messages(site: str) -> list[tuple[str, bytes, str | None, str]]:
    mp = msgspec.msgpack.encode
    dev = f"{site}/line/dev-bad"
    good_ch = {"s": "x", "dt": 1000, "v": [1.0, 2.0]}
    return [
        (
            dev,
            b"\xc1\x00garbage",
            "application/msgpack",
            "payload: MessagePack is malformed: byte 0 is 0xc1, which is no type",
        ),
        (
            dev,
            b'{"v": 1, "t0": ',
            None,
            "payload: truncated at byte 15",
        ),
        (dev, mp({"v": 2, "t0": T0, "ch": [good_ch]}), None, "v: unsupported format version 2"),
        (dev, mp({"v": 1, "ch": [good_ch]}), None, "t0: missing required field"),
        (dev, mp({"v": 1, "t0": T0}), None, "ch: missing required field"),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": []}),
            None,
            "ch: is empty; at least one channel is required",
        ),
        (
            dev,
            mp({"v": 1, "t0": "soon", "ch": [good_ch]}),
            None,
            "t0: expected an integer, got a string",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 1000, "v": b"\x00" * 12}]}),
            None,
            "ch[0].v: length 12 is not a multiple of 8",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "t": [0, 1, 2], "v": [1.0, 2.0]}]}),
            None,
            "ch[0].t: 3 offsets for 2 values",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "v": [1.0, 2.0]}]}),
            None,
            "ch[0].dt: one of dt or t is required for 2 values",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 0, "v": [1.0, 2.0]}]}),
            None,
            "ch[0].dt: 0 is below the minimum 1",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 1, "v": [1.0], "q": [300]}]}),
            None,
            "ch[0].q[0]: 300 is above the maximum 255",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 1, "v": [True]}]}),
            None,
            "ch[0].v[0]: expected a number, got a boolean",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "a b", "dt": 1, "v": [1.0]}]}),
            None,
            "ch[0].s: 'a b' has a character outside A-Z a-z 0-9 _ . : -",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 1, "v": [1.0], "vt": "f2"}]}),
            None,
            'ch[0].vt: \'f2\' is not "f8" or "f4"',
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 1, "v": [1.0], "extra": 1}]}),
            None,
            "ch[0]: unknown field 'extra'",
        ),
        (
            dev,
            mp({"v": 1, "t0": 946_684_799_999_999, "ch": [good_ch]}),
            None,
            "t0: 1999-12-31T23:59:59.999999Z is before the accepted window (starts 2000-01-01T00:00:00Z)",
        ),
        (
            dev,
            mp({"v": 1, "t0": 4_102_444_800_000_000, "ch": [good_ch]}),
            None,
            "t0: 2100-01-01T00:00:00Z is after the accepted window (ends …",
        ),
        (
            dev,
            b"\x00" * (1_048_576 + 1),
            None,
            "payload: 1048577 bytes exceeds the 1048576-byte limit",
        ),
        (
            dev,
            b'{"ts": "yesterday", "values": {"a": 1}}',
            None,
            "ts: 'yesterday' is not an RFC 3339 time",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 1, "v": [1.0, 2.0], "q": [0]}]}),
            None,
            "ch[0].q: 1 quality values for 2 values",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "t": [0, 10**17], "v": [1.0, 2.0]}]}),
            None,
            "ch[0].t: 5194-11-16T09:46:40Z is after the accepted window (ends …",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "t": [0, 1], "dt": 5, "v": [1.0, 2.0]}]}),
            None,
            "ch[0].t: not allowed together with dt",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 5, "v": []}]}),
            None,
            "ch[0].v: is empty; at least one value is required",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 5, "v": b"\0" * 8 * 1001}]}),
            None,
            "ch: 1001 readings exceed the 1000-reading limit",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x", "dt": 5, "v": [1.0], "u": "x" * 40}]}),
            None,
            "ch[0].u: has 40 characters, over the 32-character limit",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [{"s": "x" * 65, "dt": 5, "v": [1.0]}]}),
            None,
            "ch[0].s: has 65 characters, over the 64-character limit",
        ),
        (
            dev,
            b'{"v": 1, "t0": 1767225600000000, "ch": [{"s": "x", "dt": 5, "v": [1.0, null]}]}',
            None,
            "ch[0].v[1]: expected a number, got null",
        ),
        (
            dev,
            mp({"v": 1, "t0": T0, "ch": [good_ch]}),
            "text/csv",
            "content-type: 'text/csv' is not application/msgpack or application/json",
        ),
        (
            f"{site}/line/bad device",
            mp({"v": 1, "t0": T0, "ch": [good_ch]}),
            None,
            "topic: level 3 after the prefix 'bad device' has a character outside A-Z a-z 0-9 _ . : -",
        ),
    ]


async def test_every_rejection_is_a_dead_letter_and_valid_messages_all_land(
    database: Database, mqtt_url: str, prefix: str, site: str
) -> None:
    # A small readings limit, so that a batch over it still fits the payload size limit.
    env = ingester_env(database, mqtt_url, prefix, INGEST_LIMITS_MAX_BATCH_READINGS="1000")
    ingester = await Ingester(env).start()
    try:
        await _rejections(database, mqtt_url, prefix, site, ingester)
    finally:
        assert await ingester.stop() == 0, ingester.log.decode()


async def _rejections(
    database: Database, mqtt_url: str, prefix: str, site: str, ingester: Ingester
) -> None:
    good, expected = sample_messages(site)
    bad = bad_messages(site)
    with Publisher(mqtt_url) as pub:
        for i, (device, payload, ctype, _) in enumerate(bad):
            pub.publish(f"{prefix}/{device}", payload, content_type=ctype)
            g_device, g_payload, g_ctype = good[i % len(good)]
            if i < len(good):
                pub.publish(f"{prefix}/{g_device}", g_payload, content_type=g_ctype)
    await acked_at_least(ingester, len(bad) + len(good))
    assert await stored(database, site) == expected
    letters = await dead_letters(database, prefix)
    assert len(letters) == len(bad)
    unmatched = list(letters)
    for device, payload, ctype, reason in bad:
        match = [
            letter
            for letter in unmatched
            if letter[0] == f"{prefix}/{device}"
            and letter[1] == payload
            and letter[3] == ctype
            and (letter[2].startswith(reason[:-1]) if reason.endswith("…") else letter[2] == reason)
        ]
        assert match, (
            f"no dead letter with reason {reason!r}; got {sorted(r for _, _, r, _ in unmatched)}"
        )
        unmatched.remove(match[0])
    assert await ingester.metric("ingest_dead_letters_total") == len(bad)


async def test_kill_9_mid_stream_loses_nothing_and_doubles_nothing(
    database: Database, mqtt_url: str, prefix: str, site: str
) -> None:
    env = ingester_env(database, mqtt_url, prefix, INGEST_MQTT_RECEIVE_MAXIMUM="50")
    messages, expected = stream(site, devices=4, messages=150, per_message=200)
    first = await Ingester(env).start()
    pub = Publisher(mqtt_url)
    try:
        for i, (device, payload) in enumerate(messages):
            pub.publish(f"{prefix}/{device}", payload)
            if i == len(messages) // 3:
                pub.wait()
                await acked_at_least(first, 20)
                await first.kill()  # in the middle of the stream, with messages in flight
        pub.wait()
    finally:
        pub.close()
    second = await Ingester(env).start()  # same client id: the persistent session resumes
    try:

        async def all_there() -> bool:
            return len(await stored(database, site)) >= len(expected)

        await wait_until(all_there, timeout=90)
        rows = await stored(database, site)
        assert len(rows) == len(expected)
        assert set(rows) == expected
    finally:
        assert await second.stop() == 0, second.log.decode()


async def test_two_ingesters_on_one_share_group_split_the_stream(
    database: Database, mqtt_url: str, prefix: str, site: str
) -> None:
    a, b = await share_group(database, mqtt_url, prefix, members=2)
    messages, expected = stream(site, devices=8, messages=40, per_message=50)
    try:
        with Publisher(mqtt_url) as pub:
            for device, payload in messages:
                pub.publish(f"{prefix}/{device}", payload)

        async def all_acked() -> bool:
            got = await a.metric("ingest_messages_acknowledged_total") + await b.metric(
                "ingest_messages_acknowledged_total"
            )
            return got >= len(messages)

        await wait_until(all_acked, timeout=60)
        rows = await stored(database, site)
        assert len(rows) == len(expected)
        assert set(rows) == expected
        took_a = await a.metric("ingest_messages_acknowledged_total")
        took_b = await b.metric("ingest_messages_acknowledged_total")
        assert took_a > 0
        assert took_b > 0
        assert took_a + took_b == len(messages)
    finally:
        codes = await asyncio.gather(a.stop(), b.stop())
        assert list(codes) == [0, 0], (a.log.decode(), b.log.decode())
