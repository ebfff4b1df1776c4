"""Message shapes (ingest.shapes): every payload decodes exactly as `decode_batch` decodes it,
whether it matches its topic's shape, differs from it in any way, or is invalid."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest

from ingest.decode import Batch, DecodeLimits, decode_batch, parse_topic
from ingest.errors import PayloadError
from ingest.shapes import Shaped, Shapes
from tests.support.streams import T0

LIMITS = DecodeLimits()
NOW = T0 + 3_600_000_000
TOPIC = "telemetry/site/line/plc-1"
MSGPACK = "application/msgpack"


def payload(t0: int, seq: int | None, values: list[float], **channel: Any) -> bytes:
    body: dict[str, Any] = {"v": 1, "t0": t0}
    if seq is not None:
        body["seq"] = seq
    body["ch"] = [
        {
            "s": f"tag.{k}",
            "dt": 1_000_000,
            "v": np.array([v], "<f8").tobytes(),
            "u": "bar",
            **channel,
        }
        for k, v in enumerate(values)
    ]
    return msgspec.msgpack.encode(body)


def outcome(
    decode: Any, topic: str, data: bytes, content_type: str | None = MSGPACK
) -> tuple[Any, ...]:
    """What decoding gives: the levels and the batch's fields, or the error's reason."""
    try:
        levels, batch = decode(topic, data, content_type)
    except PayloadError as exc:
        return ("error", exc.reason)
    assert isinstance(batch, Batch)
    return (
        levels,
        batch.seq,
        batch.names,
        batch.units,
        batch.counts,
        batch.readings,
        batch.time.tolist(),
        batch.value.tobytes(),
        batch.quality.tolist(),
    )


def reference(topic: str, data: bytes, content_type: str | None) -> tuple[Any, Batch]:
    levels = parse_topic(topic, prefix="telemetry")
    return levels, decode_batch(data, content_type=content_type, limits=LIMITS, now_us=NOW)


def check(
    shapes: Shapes, data: bytes, topic: str = TOPIC, content_type: str | None = MSGPACK
) -> None:
    def by_shape(topic: str, data: bytes, content_type: str | None) -> Any:
        return shapes.decode(topic, data, content_type=content_type, limits=LIMITS, now_us=NOW)

    assert outcome(by_shape, topic, data, content_type) == outcome(
        reference, topic, data, content_type
    )


def test_payloads_of_one_shape_decode_as_decode_batch_does() -> None:
    shapes = Shapes(prefix="telemetry")
    rng = np.random.default_rng(5)
    # seq crosses every MessagePack integer width, t0 moves a second a round.
    for seq in [*range(0, 300), 65_535, 65_536, 2**32, 2**40]:
        check(
            shapes,
            payload(T0 + seq * 1_000_000 % 3_600_000_000, seq, rng.normal(0, 1e6, 20).tolist()),
        )
    check(shapes, payload(T0, None, [1.0, float("nan"), float("inf"), -0.0]))
    check(shapes, payload(T0 + 1, None, [2.0, 3.0, float("-inf"), 5e-324]))
    # All but the first of each seq width and of the last shape, and the topic's first.
    assert shapes.matched == 306 - 6


@pytest.mark.parametrize(
    "other",
    [
        payload(T0 + 5_000_000, 6, [1.0, 2.0, 3.5], u="mbar"),  # another unit, same length
        payload(T0 + 5_000_000, 6, [1.0, 2.0, 3.5], s="tag.9"),  # the same name three times
        payload(T0 + 5_000_000, 6, [1.0, 2.0, 3.5], dt=2_000_000),  # another width of dt
        payload(T0 + 5_000_000, 6, [1.0, 2.0, 3.5], vt="f8"),
        payload(T0 + 5_000_000, 6, [1.0, 2.0]),
        payload(T0 + 5_000_000, 6, [1.0, 2.0, 3.5], q=3),
        payload(T0 + 5_000_000, 6, [1.0, 2.0, 3.5], t=[0]),  # t and dt: an error
        payload(T0 + 5_000_000, 6, [1.0, 2.0, 3.5], vt="f4"),  # 8 bytes are two f4 values
        payload(10, 6, [1.0, 2.0, 3.5]),  # before the window
        payload(NOW + 2 * 86_400_000_000, 6, [1.0, 2.0, 3.5]),  # after it
        payload(T0 + 5_000_000, -1, [1.0, 2.0, 3.5]),  # seq must not be negative
        payload(T0 + 5_000_000, 2**64 - 1, [1.0, 2.0, 3.5]),
        payload(T0 + 5_000_000, 6, [1.0, 2.0, 3.5])[:-3],  # truncated
        msgspec.json.encode({"v": 1, "t0": T0, "ch": [{"s": "tag.0", "dt": 1, "v": [1.0]}]}),
    ],
)
def test_a_payload_unlike_its_topics_shape_decodes_as_decode_batch_does(other: bytes) -> None:
    shapes = Shapes(prefix="telemetry")
    for seq in range(3):
        check(shapes, payload(T0 + seq * 1_000_000, seq, [1.0, 2.0, 3.5]))
    check(shapes, other)
    check(shapes, other, content_type=None)
    check(shapes, payload(T0 + 9_000_000, 9, [4.0, 5.0, 6.5]))  # and after it


def test_a_shape_is_not_used_for_another_content_type_or_topic() -> None:
    shapes = Shapes(prefix="telemetry")
    data = payload(T0, 1, [1.0, 2.0])
    check(shapes, data)
    check(shapes, data, content_type="application/json")
    check(shapes, data, content_type="text/plain")
    check(shapes, data, topic="telemetry/site/line/plc-2")
    check(shapes, data, topic="elsewhere/plc-1")
    check(shapes, data, topic="telemetry/site/bad level/plc-1")


def test_a_flush_of_shaped_payloads_reads_as_decode_batch_does() -> None:
    """Many topics' payloads accepted, then read by one `settle`: those unlike their shape in
    bytes only `settle` looks at are decoded in full by `fallback` (or refused as
    `decode_batch` refuses them), the rest read from their bytes."""
    shapes = Shapes(prefix="telemetry")
    topics = [f"telemetry/site/line/plc-{i}" for i in range(40)]
    for seq in range(2):
        for topic in topics:
            check(shapes, payload(T0 + seq * 1_000_000, seq, [1.0, 2.0, 3.5]), topic=topic)
    rng = np.random.default_rng(7)
    data = [payload(T0 + 2_000_000, 2, rng.normal(0, 1e3, 3).tolist()) for _ in topics]
    # Each the length of its shape, other bytes differing: valid, or not (a space in a name).
    data[3] = payload(T0 + 2_000_000, 2, [1.0, 2.0, 3.5], u="kPa")
    data[17] = payload(T0 + 2_000_000, 2, [1.0, 2.0, 3.5], dt=2_000_000)
    data[25] = payload(T0 + 2_000_000, 2, [1.0, 2.0, 3.5], s="tag 9")
    accepted = [
        shapes.accept(topic, d, content_type=MSGPACK, limits=LIMITS, now_us=NOW)
        for topic, d in zip(topics, data, strict=True)
    ]
    shaped = [got for _, got in accepted]
    assert all(isinstance(got, Shaped) for got in shaped)
    settled = shapes.settle([got for got in shaped if isinstance(got, Shaped)])
    assert [i for i, ok in enumerate(settled.ok) if not ok] == [3, 17, 25]
    assert not settled.complete
    for i, (topic, d) in enumerate(zip(topics, data, strict=True)):
        got = shaped[i]
        assert isinstance(got, Shaped)

        def by_settle(
            topic: str, d: bytes, content_type: str | None, i: int = i, got: Shaped = got
        ) -> Any:
            batch = settled.batch(i)
            if batch is not None:
                return accepted[i][0], batch
            return shapes.fallback(topic, got, content_type=content_type, limits=LIMITS, now_us=NOW)

        assert outcome(by_settle, topic, d) == outcome(reference, topic, d)
    good = [i for i, ok in enumerate(settled.ok) if ok]
    times = np.concatenate([settled.time[settled.bounds[i] : settled.bounds[i + 1]] for i in good])
    assert times.tolist() == [T0 + 2_000_000] * 3 * len(good)
    assert settled.lengths.tolist() == [1] * 3 * len(topics)


def test_shapes_read_alike_however_many_and_after_their_topics_were_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hundreds of shapes of 1 to 30 channels (the arrays that hold them grow), read by one
    `settle`; then the topics are forgotten (past the cache's size) while payloads accepted
    by their shapes are still to be read: they read as before."""
    shapes = Shapes(prefix="telemetry")
    topics = [f"telemetry/site/line/plc-{i}" for i in range(300)]
    rng = np.random.default_rng(11)
    sizes = [1 + i % 30 for i in range(len(topics))]
    for seq in range(2):
        for topic, n in zip(topics, sizes, strict=True):
            check(shapes, payload(T0 + seq * 1_000_000, seq, [0.5] * n), topic=topic)
    data = [payload(T0 + 2_000_000, 2, rng.normal(0, 1e3, n).tolist()) for n in sizes]
    shaped = []
    for topic, d in zip(topics, data, strict=True):
        _, got = shapes.accept(topic, d, content_type=MSGPACK, limits=LIMITS, now_us=NOW)
        assert isinstance(got, Shaped)
        shaped.append(got)
    monkeypatch.setattr("ingest.shapes._MAX_TOPICS", 1)
    check(shapes, payload(T0, 0, [1.0]), topic="telemetry/site/line/other")  # forgets them
    for settled in (shapes.settle(shaped), shapes.settle(shaped[::-1])):
        assert settled.complete
        for i, got in enumerate(settled.shaped):
            batch = settled.batch(i)
            assert batch is not None
            want = decode_batch(got.payload, content_type=MSGPACK, limits=LIMITS, now_us=NOW)
            assert batch.value.tobytes() == want.value.tobytes()
            assert batch.time.tolist() == want.time.tolist()
            assert batch.counts == want.counts
        assert settled.lengths.tolist() == [1] * sum(sizes)


def _int_bytes(code: int, value: int) -> bytes:
    size = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}[code]
    return bytes((code,)) + (value % (1 << 8 * size)).to_bytes(size, "big")


@pytest.mark.parametrize("seq", [5, 200, 70_000, 2**33])  # a fixint, 2, 4 and 8 bytes
def test_t0_and_seq_of_every_integer_form_read_as_decode_batch_reads_them(seq: int) -> None:
    """Payloads of a shape's length whose t0 and seq bytes are MessagePack integers of every
    form and sign, or no integer at all, around the limits."""
    shapes = Shapes(prefix="telemetry")
    base = [payload(T0 + k * 1_000_000, seq, [1.0, 2.0]) for k in range(2)]
    for data in base:
        check(shapes, data)
    t0_at = base[0].index(_int_bytes(0xCF, T0))
    seq_form = msgspec.msgpack.encode(seq)
    seq_at = base[0].index(seq_form, t0_at + 9)
    rng = np.random.default_rng(seq)
    t0s = [T0, T0 + 1, 10, -5, NOW + 86_400_000_000 * 2, 2**63 + 7, -(2**62), 0]
    seqs = [seq, 0, -1, 2**63 - 1, 2**64 - 1, 3]
    for t0 in t0s:
        for code in (0xCF, 0xD3, 0xCB, 0xC0):
            for s in seqs:
                mutated = bytearray(base[1])
                mutated[t0_at : t0_at + 9] = _int_bytes(code, t0) if code >= 0xCF else bytes(9)
                first = seq_form[0] if len(seq_form) > 1 else 0xCC
                form = (
                    _int_bytes(first, s)[: len(seq_form)] if len(seq_form) > 1 else bytes([s % 256])
                )
                if rng.integers(0, 4) == 0:
                    form = bytes((first ^ 0x1C,)) + form[1:]  # another form of that size
                mutated[seq_at : seq_at + len(seq_form)] = form
                check(shapes, bytes(mutated))


def test_a_topic_changing_form_again_and_again_holds_no_more_than_its_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Payloads alternating between two forms (a shape learnt again at each change) decode
    exactly, and what is held for their shapes stays bounded, also with payloads in flight
    when it starts again."""
    monkeypatch.setattr("ingest.shapes._MIN_DEAD", 2_000)
    shapes = Shapes(prefix="telemetry")
    forms = [{}, {"u": "kPa"}]
    size = len(payload(T0, 1, [1.0, 2.0]))
    held = []
    for k in range(400):
        data = payload(T0 + k * 1_000_000, k % 100, [float(k), 2.0], **forms[k // 3 % 2])
        check(shapes, data)
        if k % 7 == 0:  # one accepted by its shape, read after more changes of form
            _, got = shapes.accept(TOPIC, data, content_type=MSGPACK, limits=LIMITS, now_us=NOW)
            check(shapes, payload(T0, 0, [1.0, 2.0], u="bar", s="x"))
            if isinstance(got, Shaped):
                settled = shapes.settle([got])
                want = decode_batch(data, content_type=MSGPACK, limits=LIMITS, now_us=NOW)
                batch = settled.batch(0)
                assert batch is not None
                assert batch.value.tobytes() == want.value.tobytes()
        held.append(shapes.held_bytes)
    assert max(held) <= 2 * 2_000 + 4 * size
