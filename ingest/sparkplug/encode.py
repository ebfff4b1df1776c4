"""A small Sparkplug B Payload encoder for the simulator: the fields an edge node sends."""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["Metric", "encode_payload"]

# Datatype -> value field: Int8-32 and UInt8-16 in int_value, Int64/UInt32/UInt64/DateTime in
# long_value, as the Sparkplug reference implementation encodes them.
_INT_FIELD = {1: 10, 2: 10, 3: 10, 5: 10, 6: 10, 4: 11, 7: 11, 8: 11, 13: 11}


@dataclass(frozen=True, slots=True)
class Metric:
    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None  # ms
    datatype: int | None = None  # in births; data may leave it out
    value: float | int | bool | str | None = None
    kind: int = 10  # datatype the value is encoded as, when `datatype` is left out


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers: two's complement in 10 bytes
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _metric(m: Metric) -> bytes:
    out = bytearray()
    if m.name is not None:
        out += _bytes(1, m.name.encode())
    if m.alias is not None:
        out += _key(2, 0) + _varint(m.alias)
    if m.timestamp is not None:
        out += _key(3, 0) + _varint(m.timestamp)
    if m.datatype is not None:
        out += _key(4, 0) + _varint(m.datatype)
    datatype = m.datatype if m.datatype is not None else m.kind
    value = m.value
    if value is None:
        out += _key(7, 0) + _varint(1)  # is_null
    elif datatype == 11:
        out += _key(14, 0) + _varint(int(bool(value)))
    elif datatype == 9:
        out += _key(12, 5) + struct.pack("<f", float(value))
    elif datatype == 10:
        out += _key(13, 1) + struct.pack("<d", float(value))
    elif datatype in _INT_FIELD:
        number = int(value)
        if _INT_FIELD[datatype] == 10:
            number &= 0xFFFFFFFF  # uint32 on the wire: sign-extended to 32 bits
        out += _key(_INT_FIELD[datatype], 0) + _varint(number)
    else:
        out += _bytes(15, str(value).encode())
    return bytes(out)


def encode_payload(*, timestamp: int | None, seq: int | None, metrics: list[Metric]) -> bytes:
    """The Payload message: timestamp (ms), metrics, seq; fields in number order."""
    out = bytearray()
    if timestamp is not None:
        out += _key(1, 0) + _varint(timestamp)
    for m in metrics:
        out += _bytes(2, _metric(m))
    if seq is not None:
        out += _key(3, 0) + _varint(seq)
    return bytes(out)
