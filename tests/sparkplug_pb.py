"""The official Sparkplug B schema (tests/data/sparkplug_b.proto) compiled at test time.

An encoder and decoder independent of ours: protoc (grpcio-tools) turns the .proto into a
descriptor set, and the protobuf package (upb) builds message classes from it.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

PROTO = Path(__file__).resolve().parent / "data" / "sparkplug_b.proto"


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
