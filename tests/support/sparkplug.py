"""Sparkplug B payloads from the official schema (tests/data/sparkplug_b.proto), compiled at
test time: an encoder and decoder independent of ours. protoc (grpcio-tools) turns the .proto
into a descriptor set, and the protobuf package (upb) builds message classes from it.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc
from hypothesis import strategies as st

PROTO = Path(__file__).resolve().parent.parent / "data" / "sparkplug_b.proto"
T = 1_767_225_600_000  # ms, 2026-01-01T00:00:00Z


@functools.cache
def payload_class() -> Any:
    """The generated `org.eclipse.tahu.protobuf.Payload` message class."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sparkplug_b.pb"
        status = protoc.main(
            ["protoc", f"--proto_path={PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name]
        )
        assert status == 0, f"protoc failed on {PROTO}"
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload")
    )


def new_payload() -> Any:
    return payload_class()()


def payload(ts: int | None, seq: int | None, metrics: list[dict[str, Any]]) -> bytes:
    """A Payload from dicts of Metric fields; `quality` adds the Quality property, `members`
    makes a template instance of the given member dicts."""
    p = new_payload()
    if ts is not None:
        p.timestamp = ts
    if seq is not None:
        p.seq = seq
    for spec in metrics:
        _metric(p.metrics.add(), spec)
    return bytes(p.SerializeToString())


def _metric(m: Any, spec: dict[str, Any]) -> None:
    for key, value in spec.items():
        if key == "quality":
            m.properties.keys.append("Quality")
            prop = m.properties.values.add()
            prop.type = 3
            prop.int_value = value
        elif key == "members":
            m.template_value.template_ref = "Motor"
            for member in value:
                _metric(m.template_value.metrics.add(), member)
        else:
            setattr(m, key, value)


# ------------------------------------------------------------------------------ generated metrics

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


def _value_strategy() -> st.SearchStrategy[tuple[str, Any] | None]:
    return st.one_of(
        st.none(),
        st.tuples(st.just("int_value"), U32),
        st.tuples(st.just("long_value"), U64),
        st.tuples(st.just("float_value"), st.floats(width=32, allow_nan=False)),
        st.tuples(st.just("double_value"), st.floats(allow_nan=False)),
        st.tuples(st.just("boolean_value"), st.booleans()),
        st.tuples(st.just("string_value"), st.text(max_size=8)),
        st.tuples(st.just("bytes_value"), st.binary(max_size=8)),
    )


METRIC = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(min_size=1, max_size=12),
        "alias": U64,
        "timestamp": U64,
        "datatype": st.integers(0, 34),
        "is_historical": st.booleans(),
        "is_transient": st.booleans(),
        "is_null": st.booleans(),
        "quality": st.sampled_from([0, 192, 500, 600]),
        "value": _value_strategy(),
    },
)
"""A metric's fields, any of them missing, as `fill_metric` takes them."""


def fill_metric(metric: Any, spec: dict[str, Any]) -> None:
    """Set a upb Metric's fields from a `METRIC` dict (`quality` with a unit property first)."""
    for key in ("name", "alias", "timestamp", "datatype", "is_historical", "is_transient"):
        if key in spec:
            setattr(metric, key, spec[key])
    if "is_null" in spec:
        metric.is_null = spec["is_null"]
    if "quality" in spec:
        metric.properties.keys.extend(["engUnit", "Quality"])
        unit = metric.properties.values.add()
        unit.type = 12
        unit.string_value = "degC"
        quality = metric.properties.values.add()
        quality.type = 3
        quality.int_value = spec["quality"]
    if spec.get("value") is not None:
        field, value = spec["value"]
        setattr(metric, field, value)


def valid_payload() -> bytes:
    """A valid payload with names, aliases, qualities and a template instance."""
    p = new_payload()
    p.timestamp = 1_767_225_600_000
    p.seq = 7
    for i in range(3):
        m = p.metrics.add()
        m.name = f"m{i}"
        m.alias = i
        m.datatype = 10
        m.double_value = i / 3
        fill_metric(m, {"quality": 192})
    t = p.metrics.add()
    t.name = "inst"
    t.template_value.metrics.add().name = "member"
    return bytes(p.SerializeToString())
