"""Hostile input: garbage, floods of bad payloads and hostile names never cost a valid reading.

End to end, a stream in which every tenth message is malformed, truncated, wrongly typed,
oversized or carries hostile names (quotes, SQL fragments, control characters, 64 KB strings)
goes through `ingest run`: every valid reading lands exactly once, every bad payload becomes a
dead letter holding its raw bytes and a short one-line reason. Below that, the decoder's size
limits are checked to act before it allocates, and a property test puts hostile text in every
place a name can travel.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import asyncpg
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import Batch, DecodeLimits, decode_batch, parse_topic
from ingest.errors import PayloadError
from tests.support.cluster import Database
from tests.support.ingester import Ingester, acked_at_least, ingester_env
from tests.support.mqtt import publish, purge_session
from tests.support.streams import T0, f8, new_prefix, new_site

mp = msgspec.msgpack.encode
MAX_PAYLOAD = 262_144
MAX_READINGS = 5_000
NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
SQL = "'; DROP TABLE telemetry.readings; --"

Message = tuple[str, bytes, str | None]  # topic, payload, content type
Key = tuple[int, str, str, float | str, int]  # a stored reading, NaN as the string "NaN"


def key(t: int, device: str, sensor: str, value: float, quality: int) -> Key:
    return (t, device, sensor, "NaN" if math.isnan(value) else value, quality)


def ch(name: str = "x", **fields: Any) -> dict[str, Any]:
    return {"s": name, "dt": 1000, "v": [1.0, 2.0], **fields}


def batch(*channels: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"v": 1, "t0": T0, "ch": list(channels), **fields}


def valid_stream(prefix: str, site: str, n: int) -> tuple[list[Message], set[Key]]:
    """`n` valid messages over every encoding, some with hostile-looking but legal content."""
    rng = np.random.default_rng(11)
    devices = [f"{site}/press-shop/line-{i}/press-{i:02d}" for i in range(4)]
    devices.append(f"{site}/../--")  # dots and dashes are legal characters
    messages: list[Message] = []
    rows: set[Key] = set()
    for m in range(n):
        device = devices[m % len(devices)]
        topic = f"{prefix}/{device}"
        t0 = T0 + m * 1_000_000
        kind = m % 4
        if kind == 0:  # MessagePack, float64 bin values, regular sampling, extreme values
            values = rng.normal(0, 1e3, 8)
            if m % 8 == 0:
                values[:6] = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308]
            payload = mp(batch({"s": "a--b", "dt": 1000, "v": f8(values)}, t0=t0, seq=2**63 - 1))
            rows |= {key(t0 + i * 1000, device, "a--b", float(v), 0) for i, v in enumerate(values)}
            messages.append((topic, payload, "application/msgpack"))
        elif kind == 1:  # MessagePack arrays, offsets, quality 255, a hostile-looking legal unit
            temps = [float(v) for v in np.round(rng.normal(20, 2, 5), 3)]
            offsets = [0, 1, 2, 3, 4]
            payload = mp(
                batch(
                    {"s": "temp:1", "t": offsets, "v": temps, "q": 255, "u": "'); DROP --"}, t0=t0
                )
            )
            rows |= {
                key(t0 + o, device, "temp:1", v, 255) for o, v in zip(offsets, temps, strict=True)
            }
            messages.append((topic, payload, None))
        elif kind == 2:  # JSON batch
            flows = [float(v) for v in np.round(rng.normal(5, 1, 3), 4)]
            doc = {"v": 1, "t0": t0, "ch": [{"s": "flow", "dt": 250_000, "v": flows}]}
            rows |= {key(t0 + i * 250_000, device, "flow", v, 0) for i, v in enumerate(flows)}
            messages.append((topic, msgspec.json.encode(doc), "application/json"))
        else:  # JSON single sample
            value = float(np.round(rng.normal(230, 3), 2))
            payload = msgspec.json.encode({"ts": t0, "values": {"volt.L1": value}})
            rows.add(key(t0, device, "volt.L1", value, 0))
            messages.append((topic, payload, None))
    # The first instant the wire format accepts.
    payload = mp({"v": 1, "t0": 946_684_800_000_000, "ch": [{"s": "epoch", "v": [0.5]}]})
    messages.append((f"{prefix}/{devices[0]}", payload, None))
    rows.add(key(946_684_800_000_000, devices[0], "epoch", 0.5, 0))
    return messages, rows


def bad_stream(prefix: str, site: str) -> list[tuple[str, bytes, str | None, str | None]]:
    """(topic, payload, content type, exact reason or None for 'any one-line reason')."""
    dev = f"{prefix}/{site}/line/dev-bad"
    good = mp(batch(ch()))
    outside = "has a character outside A-Z a-z 0-9 _ . : -"
    return [
        # malformed
        (dev, b"\xc1\x00garbage", None, "payload: MessagePack is malformed: byte 0 is 0xc1, which is no type"),
        (dev, b'{"v": 1,, }', None, "payload: JSON is malformed at byte 8"),
        (dev, bytes(np.random.default_rng(3).integers(0, 256, 200, dtype=np.uint8)), None, None),
        (dev, b"", None, "payload: is empty"),
        (dev, b"  \n\t ", None, "payload: holds only whitespace"),
        # truncated
        (dev, good[: len(good) // 2], None, f"payload: truncated at byte {len(good) // 2}"),
        (dev, b'{"v": 1, "t0": 1767225600000000, "ch": [{"s": "x", "dt": 1000, "v": [1.0,', None, "payload: truncated at byte 73"),
        (dev, b"\x83\xa1v\x01\xa2t0\x05\xa2ch\xdd\xff\xff\xff\xff", None, "payload: truncated at byte 16"),
        # wrongly typed
        (dev, mp({"v": 1, "t0": "soon", "ch": [ch()]}), None, "t0: expected an integer, got a string"),
        (dev, mp({"v": 1, "t0": T0, "ch": {"s": "x"}}), None, "ch: expected an array, got a map"),
        (dev, mp(batch(ch(v=[1.0, "hot"]))), None, "ch[0].v[1]: expected a number, got a string"),
        (dev, mp(batch(ch(q=0.5))), None, "ch[0].q: expected an integer, bin or an array, got a number"),
        (dev, mp(batch(ch(dt=-5))), None, "ch[0].dt: -5 is below the minimum 1"),
        (dev, mp(batch(ch(), seq=-1)), None, "seq: -1 is below the minimum 0"),
        (dev, b'{"ts": 1767225600000000, "values": {"a": "hot"}}', None, "values[...]: expected a number, got a string"),
        (dev, mp({"v": 2, "t0": T0, "ch": [ch()]}), None, "v: unsupported format version 2"),
        # oversized: checked before decoding
        (dev, bytes(300_000), None, f"payload: 300000 bytes exceeds the {MAX_PAYLOAD}-byte limit"),
        (dev, mp(batch({"s": "x", "dt": 1, "v": f8(np.zeros(MAX_READINGS + 1))})), None, f"ch: {MAX_READINGS + 1} readings exceed the {MAX_READINGS}-reading limit"),
        # hostile names in the payload
        (dev, mp(batch(ch(SQL))), None, f"ch[0].s: '\\'; DROP TABLE telemetry.readings; --' {outside}"),
        (dev, mp(batch(ch('Robert"); DELETE FROM telemetry.sensors;--'))), None, f"ch[0].s: 'Robert\"); DELETE FROM telemetry.sensors;--' {outside}"),
        (dev, mp(batch(ch("\x00nul\x00"))), None, f"ch[0].s: '\\x00nul\\x00' {outside}"),
        (dev, mp(batch(ch("\r\nX-Injected: 1\x1b[31m"))), None, f"ch[0].s: '\\r\\nX-Injected: 1\\x1b[31m' {outside}"),
        (dev, mp(batch(ch("A" * 65536))), None, "ch[0].s: has 65536 characters, over the 64-character limit"),
        (dev, mp(batch(ch("'" * 65536))), None, "ch[0].s: has 65536 characters, over the 64-character limit"),
        (dev, mp(batch(ch("\u202etxt\u2028"))), None, f"ch[0].s: '\\u202etxt\\u2028' {outside}"),
        (dev, mp(batch(ch(u="degC\x00; DROP"))), None, "ch[0].u: 'degC\\x00; DROP' has a non-printable character"),
        (dev, mp(batch(ch(u="x" * 65536))), None, "ch[0].u: has 65536 characters, over the 32-character limit"),
        (dev, b'{"ts": 1767225600000000, "values": {"\'; DROP TABLE x;--": 1.0}}', None, f"values: sensor name '\\'; DROP TABLE x;--' {outside}"),
        (dev, mp({**batch(ch()), "'; DROP TABLE x; --\n": 1}), None, "payload: unknown field '\\'; DROP TABLE x; --\\n'"),
        # hostile content types (the broker refuses control characters in them)
        (dev, good, f"application/json{SQL}", f"content-type: 'application/json\\{SQL}' is not application/msgpack or application/json"),
        (dev, good, "x" * 60_000, "content-type: '" + "x" * 64 + "'... is not application/msgpack or application/json"),
        # hostile topics (the broker refuses NUL and control characters in them)
        (f"{prefix}/{site}/line/{SQL}", good, None, f"topic: level 3 after the prefix '\\{SQL}' {outside}"),
        (f'{prefix}/{site}/"dev"', good, None, f"topic: level 2 after the prefix '\"dev\"' {outside}"),
        (f"{prefix}/{site}/" + "d" * 60_000, good, None, "topic: level 2 after the prefix has 60000 characters, over the 64-character limit"),
        (f"{prefix}/{site}/line\u2028x/dev", good, None, f"topic: level 2 after the prefix 'line\\u2028x' {outside}"),
        (f"{prefix}/{site}//dev", good, None, "topic: level 2 after the prefix is empty"),
        (f"{prefix}/{site}/dev name", good, None, f"topic: level 2 after the prefix 'dev name' {outside}"),
        (f"{prefix}/", good, None, "topic: no device id after the prefix"),
    ]  # fmt: skip


async def stored_keys(db: Database, site: str) -> list[Key]:
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT (extract(epoch FROM ts) * 1000000)::bigint AS t, device, sensor, value, quality"
            "  FROM telemetry.readings_v WHERE device LIKE $1 || '/%'",
            site,
        )
    finally:
        await conn.close()
    return [key(r["t"], r["device"], r["sensor"], r["value"], r["quality"]) for r in rows]


async def test_hostile_stream_every_valid_reading_lands_every_bad_one_is_a_dead_letter(
    database: Database, mqtt_url: str
) -> None:
    site, prefix = new_site(), new_prefix()
    bad = bad_stream(prefix, site)
    good, expected = valid_stream(prefix, site, 9 * len(bad))
    stream: list[Message] = []
    for n, (topic, payload, ctype, _) in enumerate(bad):  # one bad message in ten
        stream += [*good[9 * n : 9 * n + 9], (topic, payload, ctype)]
    stream += good[9 * len(bad) :]
    env = ingester_env(
        database,
        mqtt_url,
        prefix,
        INGEST_LIMITS_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD),
        INGEST_LIMITS_MAX_BATCH_READINGS=str(MAX_READINGS),
    )
    ingester = await Ingester(env).start()
    try:
        await publish(mqtt_url, stream)
        await acked_at_least(ingester, len(stream))
        rows = await stored_keys(database, site)
        assert len(rows) == len(expected), "a reading is missing or stored twice"
        assert set(rows) == expected
        assert await ingester.metric("ingest_dead_letters_total") == len(bad)
        conn = await asyncpg.connect(database.analyst_url)
        try:
            letters = await conn.fetch(
                "SELECT topic, payload, reason, content_type FROM telemetry.dead_letters"
                " WHERE starts_with(topic, $1 || '/')",
                prefix,
            )
            units = await conn.fetch(
                "SELECT DISTINCT unit FROM telemetry.sensors_v WHERE device LIKE $1 || '/%'"
                " AND sensor = 'temp:1'",
                site,
            )
        finally:
            await conn.close()
    finally:
        assert await ingester.stop() == 0, ingester.log.decode()
        await asyncio.to_thread(purge_session, mqtt_url, env["INGEST_MQTT_CLIENT_ID"])
    assert [u["unit"] for u in units] == ["'); DROP --"]  # stored as sent, a value like any other
    assert len(letters) == len(bad)
    unmatched = [(r["topic"], bytes(r["payload"]), r["content_type"], r["reason"]) for r in letters]
    for topic, payload, ctype, reason in bad:
        found = [d for d in unmatched if d[:3] == (topic, payload, ctype)]
        assert len(found) == 1, f"no dead letter for {topic[:100]!r} {payload[:40]!r}"
        stored_reason = found[0][3]
        assert stored_reason.isprintable(), stored_reason  # one line: no CR, LF, NUL, ...
        assert len(stored_reason) <= 400, stored_reason
        if reason is not None:
            assert stored_reason == reason
        unmatched.remove(found[0])
    assert b"Traceback" not in ingester.log


# ------------------------------------------------------------------------------------------
# Limits act before the decoder allocates
# ------------------------------------------------------------------------------------------

NOW_US = time.time_ns() // 1000


def peak_allocation(payload: bytes, limits: DecodeLimits) -> tuple[int, str]:
    """Peak bytes traced by tracemalloc (numpy's buffers included) while decoding `payload`."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(PayloadError) as info:
            decode_batch(payload, content_type=None, limits=limits, now_us=NOW_US)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, info.value.reason


def test_payload_size_limit_rejects_before_decoding() -> None:
    payload = mp(batch({"s": "x", "dt": 1, "v": f8(np.zeros(1_000_000))}))  # 8 MB, well formed
    peak, reason = peak_allocation(payload, DecodeLimits())
    assert reason == f"payload: {len(payload)} bytes exceeds the 1048576-byte limit"
    assert peak < 16_384, peak


def test_readings_limit_rejects_before_building_arrays() -> None:
    # 1,000,001 float64 readings in one bin value: 8 MB that decode without a copy (msgspec
    # hands out a view), counted before any array is built.
    payload = mp(batch({"s": "x", "dt": 1, "v": f8(np.zeros(1_000_001))}))
    limits = DecodeLimits(max_payload_bytes=16 * 1024 * 1024)
    peak, reason = peak_allocation(payload, limits)
    assert reason == "ch: 1000001 readings exceed the 1000000-reading limit"
    assert peak < len(payload) // 16, peak


def test_claimed_lengths_do_not_allocate() -> None:
    # Headers claiming 4 GiB (array32, bin32, str32, map32) in payloads of a few bytes.
    for payload in (
        b"\x83\xa1v\x01\xa2t0\x05\xa2ch\xdd\xff\xff\xff\xff",
        b"\x81\xa2ch\x91\x82\xa1s\xa1a\xa1v\xc6\xff\xff\xff\xff",
        b"\x81\xa2ch\x91\x81\xa1s\xdb\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
    ):
        peak, reason = peak_allocation(payload, DecodeLimits())
        assert reason == f"payload: truncated at byte {len(payload)}", payload
        assert peak < 16_384, (payload, peak)


# ------------------------------------------------------------------------------------------
# Property: hostile text anywhere a name travels gives a valid name or a short clean reason
# ------------------------------------------------------------------------------------------

HOSTILE_PIECES = [
    SQL,
    "' OR '1'='1",
    '"; DELETE FROM telemetry.sensors; --',
    "$1",
    "%s",
    "%(x)s",
    "{0}",
    "E'\\x00'",
    "\\",
    "\x00",
    "\r\n",
    "\t",
    "\x1b[2J",
    "\u2028",
    "\u202e",
    "\ufeff",
    "\ud7ff",
    "é",
    "😀",
    "../",
    " ",
    "-",
    ".",
    ":",
    "a",
]
hostile_text = st.one_of(
    st.lists(st.sampled_from(HOSTILE_PIECES), max_size=12).map("".join),
    st.text(max_size=80),
    st.builds(
        lambda piece, n: piece * n,
        st.sampled_from(["'", "A", "\x00", "é", "\u2028"]),
        st.integers(60, 70_000),
    ),
)
FUZZ = settings(
    max_examples=150,
    deadline=None,  # no timed assertions
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PREFIX = "plant/telemetry"


def placements(text: str) -> Iterator[tuple[bytes, str | None]]:
    """Payloads (and content types) with `text` in each place a name or a label travels."""
    yield mp(batch(ch(text))), None
    yield mp(batch(ch(u=text))), None
    yield mp(batch(ch(), **{text: 1})), None
    yield mp(batch({**ch(), text: 1})), None
    yield msgspec.json.encode({"ts": T0, "values": {text: 1.0}}), None
    yield msgspec.json.encode([{"ts": T0, "values": {"a": 1.0, text: 2.0}}]), None
    yield mp(batch(ch())), text


def check_clean(reason: str) -> None:
    assert reason.isprintable(), reason
    assert len(reason) <= 400, reason


def check_batch(result: Batch) -> None:
    for channel in result.channels:
        assert NAME.fullmatch(channel.name), channel.name
        if channel.unit is not None:
            assert channel.unit.isprintable(), channel.unit
            assert 1 <= len(channel.unit) <= 32, channel.unit


@FUZZ
@given(text=hostile_text)
def test_hostile_text_in_any_name_is_refused_with_a_clean_reason(text: str) -> None:
    limits = DecodeLimits()
    for payload, content_type in placements(text):
        try:
            result = decode_batch(payload, content_type=content_type, limits=limits, now_us=NOW_US)
        except PayloadError as exc:
            check_clean(exc.reason)
        else:
            check_batch(result)  # accepted only if every name follows the rules
    for topic in (f"{PREFIX}/{text}", f"{PREFIX}/site/{text}/dev", f"{PREFIX}/{text}/{text}"):
        try:
            levels = parse_topic(topic, prefix=PREFIX)
        except PayloadError as exc:
            check_clean(exc.reason)
        else:
            assert all(NAME.fullmatch(level) for level in levels), levels


@FUZZ
@given(depth=st.integers(1, 200_000), json=st.booleans(), key=st.sampled_from(["ch", "v", "x"]))
def test_deep_nesting_is_refused_without_recursion(depth: int, json: bool, key: str) -> None:
    if json:
        payload = b'{"' + key.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        payload = b"\x81\xa1" + key.encode() + b"\x91" * depth + b"\x01"
    with pytest.raises(PayloadError) as info:
        decode_batch(payload, content_type=None, limits=DecodeLimits(), now_us=NOW_US)
    check_clean(info.value.reason)
