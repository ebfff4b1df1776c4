"""Sparkplug B payloads: a numba decoder of the protobuf wire format into per-metric columns.

The decoder reads untrusted bytes: every read is bounds-checked, varints may have up to 10
bytes, unknown fields are skipped by their wire type, and a broken payload yields an error
code and byte offset (never an exception from inside the kernel). Metrics land in one int64
matrix, one row per metric, with no Python object per metric; names stay as byte ranges of
the payload until somebody asks for them (births do, aliased data does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ingest.errors import PayloadError
from ingest.kernels import kernel

__all__ = [
    "COLUMNS",
    "F_ALIAS",
    "F_DATATYPE",
    "F_HISTORICAL",
    "F_NULL",
    "F_TIMESTAMP",
    "F_TRANSIENT",
    "Decoded",
    "decode_payload",
    "metric_path",
]

# Columns of the metric matrix.
C_NAME_START: Final = 0  # byte offset of the name in the payload, -1 without a name
C_NAME_LEN: Final = 1
C_ALIAS: Final = 2  # uint64 bits
C_TIMESTAMP: Final = 3  # ms since the epoch (uint64 bits)
C_DATATYPE: Final = 4
C_FLAGS: Final = 5
C_RAW: Final = 6  # the value's bits: varint, or the float/double's IEEE bits
C_FIELD: Final = 7  # the value's field number (10-19), 0 without a value
C_QUALITY: Final = 8  # the Quality property, -1 without one
C_PARENT: Final = 9  # row of the template metric this one is a member of, -1 at the top
COLUMNS: Final = 10

F_ALIAS: Final = 1
F_TIMESTAMP: Final = 2
F_DATATYPE: Final = 4
F_NULL: Final = 8
F_HISTORICAL: Final = 16
F_TRANSIENT: Final = 32

# Error codes returned by the kernel.
_E_TRUNCATED_VARINT: Final = 1
_E_LONG_VARINT: Final = 2
_E_PAST_END: Final = 3
_E_WIRE_TYPE: Final = 4
_E_BAD_WIRE_TYPE: Final = 5
_E_FIELD_ZERO: Final = 6
_E_NESTING: Final = 7
_E_TOO_MANY: Final = 8

_WHAT: Final = {
    _E_TRUNCATED_VARINT: "varint runs past the end",
    _E_LONG_VARINT: "varint longer than 10 bytes",
    _E_PAST_END: "length runs past the end of its message",
    _E_WIRE_TYPE: "wrong wire type",
    _E_BAD_WIRE_TYPE: "unsupported wire type (groups or 6/7)",
    _E_FIELD_ZERO: "field number 0",
}

_METRIC_FIELDS: Final = (
    "name",
    "alias",
    "timestamp",
    "datatype",
    "is_historical",
    "is_transient",
    "is_null",
    "metadata",
    "properties",
    "int_value",
    "long_value",
    "float_value",
    "double_value",
    "boolean_value",
    "string_value",
    "bytes_value",
    "dataset_value",
    "template_value",
    "extension_value",
)
# Message kinds, for error reasons.
_K_PAYLOAD: Final = 0
_K_METRIC: Final = 1
_K_TEMPLATE: Final = 2
_K_PROPSET: Final = 3
_K_PROPVALUE: Final = 4
_FIELDS: Final = (
    {1: "timestamp", 2: "metrics", 3: "seq", 4: "uuid", 5: "body"},
    dict(enumerate(_METRIC_FIELDS, 1)),
    {1: "version", 2: "metrics", 3: "parameters", 4: "template_ref", 5: "is_definition"},
    {1: "keys", 2: "values"},
    {1: "type", 2: "is_null", 3: "int_value", 4: "long_value"},
)
_PREFIX: Final = ("", "", "", "properties.", "properties.values.")
_WIRE_NAMES: Final = (
    "varint",
    "fixed64",
    "length-delimited",
    "group start",
    "group end",
    "fixed32",
    "wire type 6",
    "wire type 7",
)

# Expected wire types of the fields the decoder reads (-1: not read, skipped if valid).
_PAYLOAD_WT: Final = np.full(6, -1, np.int64)
_PAYLOAD_WT[[1, 2, 3]] = [0, 2, 0]
_METRIC_WT: Final = np.full(20, -1, np.int64)
_METRIC_WT[1:20] = [2, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0, 5, 1, 0, 2, 2, 2, 2, 2]
_TEMPLATE_WT: Final = np.full(6, -1, np.int64)
_TEMPLATE_WT[2] = 2
_PROPSET_WT: Final = np.full(3, -1, np.int64)
_PROPSET_WT[[1, 2]] = [2, 2]
_PROPVALUE_WT: Final = np.full(12, -1, np.int64)
_PROPVALUE_WT[[3, 4]] = [0, 0]
_QUALITY_KEY: Final = np.frombuffer(b"Quality", np.uint8)


@kernel
def _varint(buf: npt.NDArray[np.uint8], pos: Any, end: Any) -> Any:
    """(value as int64 bits, next position); next position is -code on error."""
    if pos < end and buf[pos] < 0x80:  # one byte: keys, small aliases, booleans
        return np.int64(buf[pos]), pos + 1
    result = np.int64(0)
    shift = 0
    for _ in range(10):
        if pos >= end:
            return np.int64(0), -_E_TRUNCATED_VARINT
        b = buf[pos] & 0xFF  # an int64 for numba
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    return np.int64(0), -_E_LONG_VARINT


@kernel
def _field(buf: npt.NDArray[np.uint8], pos: Any, end: Any, expect: npt.NDArray[np.int64]) -> Any:
    """Read one field at `pos`: (field number, wire type, varint or fixed bits as int64, start
    of a length-delimited body, next position); next position is -code on error. A field the
    decoder reads must have its expected wire type; others are skipped if well-formed."""
    zero = np.int64(0)
    key, pos = _varint(buf, pos, end)
    if pos < 0:
        return 0, 0, zero, 0, pos
    wire = key & 7
    num = (key >> 3) & 0x1FFFFFFFFFFFFFFF  # the shift of a negative key must not sign-extend
    if num == 0:
        return 0, wire, zero, 0, -_E_FIELD_ZERO
    if num > 0x3FFFFFFF:
        num = 0x3FFFFFFF  # beyond every field we read: skipped like any unknown field
    if num < len(expect) and expect[num] >= 0 and expect[num] != wire:
        return num, wire, zero, 0, -_E_WIRE_TYPE
    if wire == 0:
        value, pos = _varint(buf, pos, end)
        return num, wire, value, 0, pos
    if wire == 1 or wire == 5:
        size = 8 if wire == 1 else 4
        if end - pos < size:
            return num, wire, zero, 0, -_E_PAST_END
        bits = zero
        for i in range(size):
            bits |= (buf[pos + i] & 0xFF) << (8 * i)
        return num, wire, bits, 0, pos + size
    if wire == 2:
        length, pos = _varint(buf, pos, end)
        if pos < 0:
            return num, wire, zero, 0, pos
        if length < 0 or length > end - pos:
            return num, wire, zero, 0, -_E_PAST_END
        return num, wire, length, pos, pos + length
    return num, wire, zero, 0, -_E_BAD_WIRE_TYPE


@kernel
def _quality(buf: npt.NDArray[np.uint8], start: Any, end: Any) -> Any:
    """The `Quality` property of a PropertySet: (value or -1, error position, error code,
    field, wire type, message kind)."""
    want = -1
    index = 0
    pos = start
    klen = len(_QUALITY_KEY)
    while pos < end:
        at = pos
        num, wire, length, body, pos = _field(buf, pos, end, _PROPSET_WT)
        if pos < 0:
            return -1, at, -pos, num, wire, _K_PROPSET
        if num == 1:
            if want < 0 and np.int64(length) == klen:
                same = True
                for i in range(klen):
                    if buf[body + i] != _QUALITY_KEY[i]:
                        same = False
                        break
                if same:
                    want = index
            index += 1
    if want < 0:
        return -1, 0, 0, 0, 0, 0
    index = 0
    pos = start
    while pos < end:
        num, _, length, body, pos = _field(buf, pos, end, _PROPSET_WT)
        if num == 2:
            if index == want:
                value: Any = -1
                inner = body
                stop = body + np.int64(length)
                while inner < stop:
                    at = inner
                    vnum, wire, bits, _, inner = _field(buf, inner, stop, _PROPVALUE_WT)
                    if inner < 0:
                        return -1, at, -inner, vnum, wire, _K_PROPVALUE
                    if vnum == 3 or vnum == 4:
                        value = bits & 0x7FFFFFFF
                return value, 0, 0, 0, 0, 0
            index += 1
    return -1, 0, 0, 0, 0, 0


@kernel
def _grow(rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    bigger = np.empty((2 * rows.shape[0], rows.shape[1]), np.int64)
    bigger[: rows.shape[0]] = rows
    return bigger


@kernel
def _decode(
    buf: npt.NDArray[np.uint8], max_rows: int, max_depth: int
) -> tuple[npt.NDArray[np.int64], int, npt.NDArray[np.int64]]:
    """(metric rows, row count, head); head = [timestamp, has timestamp, seq, has seq,
    error code, error position, error row]. Templates' member metrics follow their parents,
    each message of metrics read from a work list rather than by recursion."""
    head = np.zeros(10, np.int64)
    metric_wt = _METRIC_WT.copy()
    head[6] = -1
    rows = np.empty((16, COLUMNS), np.int64)
    n = 0
    # work list: (start, end, parent row, depth); the payload itself is the first entry
    work = np.empty((4, 4), np.int64)
    work[0, 0], work[0, 1], work[0, 2], work[0, 3] = 0, len(buf), -1, 0
    todo = 1
    done = 0
    while done < todo:
        start, end, parent, depth = work[done, 0], work[done, 1], work[done, 2], work[done, 3]
        done += 1
        expect = _PAYLOAD_WT if parent < 0 else _TEMPLATE_WT
        pos = start
        while pos < end:
            at = pos
            # one field, read inline: a helper returning tuples costs several times more
            code = 0
            bits = 0
            body = 0
            key = 0
            shift = 0
            while True:
                if pos >= end:
                    code = _E_TRUNCATED_VARINT
                    break
                if shift > 63:
                    code = _E_LONG_VARINT
                    break
                b = buf[pos] & 0xFF  # an int64 for numba
                pos += 1
                key |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            wire = key & 7
            num = min((key >> 3) & 0x1FFFFFFFFFFFFFFF, 0x3FFFFFFF)
            if code == 0 and num == 0:
                code = _E_FIELD_ZERO
            elif code == 0 and num < len(expect) and expect[num] >= 0 and expect[num] != wire:
                code = _E_WIRE_TYPE
            elif code == 0 and wire == 0:
                bits = 0
                shift = 0
                while True:
                    if pos >= end:
                        code = _E_TRUNCATED_VARINT
                        break
                    if shift > 63:
                        code = _E_LONG_VARINT
                        break
                    b = buf[pos] & 0xFF  # an int64 for numba
                    pos += 1
                    bits |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
            elif code == 0 and (wire == 1 or wire == 5):
                size = 8 if wire == 1 else 4
                if end - pos < size:
                    code = _E_PAST_END
                else:
                    for i in range(size):
                        bits |= (buf[pos + i] & 0xFF) << (8 * i)
                    pos += size
            elif code == 0 and wire == 2:
                bits = 0
                shift = 0
                while True:
                    if pos >= end:
                        code = _E_TRUNCATED_VARINT
                        break
                    if shift > 63:
                        code = _E_LONG_VARINT
                        break
                    b = buf[pos] & 0xFF  # an int64 for numba
                    pos += 1
                    bits |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                if code == 0 and (bits < 0 or bits > end - pos):
                    code = _E_PAST_END
                body = pos
                pos += bits
            elif code == 0:
                code = _E_BAD_WIRE_TYPE
            if code:
                head[4], head[5], head[6] = code, at, parent
                head[7], head[8] = num, wire
                head[9] = _K_PAYLOAD if parent < 0 else _K_TEMPLATE
                return rows, n, head
            if parent < 0 and num == 1:
                head[0], head[1] = np.int64(bits), 1
            elif parent < 0 and num == 3:
                head[2], head[3] = np.int64(bits), 1
            elif num == 2:
                if n >= max_rows:
                    head[4], head[5], head[6] = _E_TOO_MANY, at, n
                    return rows, n, head
                if n == rows.shape[0]:
                    rows = _grow(rows)
                rows[n, C_NAME_START] = -1
                rows[n, C_NAME_LEN] = 0
                rows[n, C_ALIAS] = 0
                rows[n, C_TIMESTAMP] = 0
                rows[n, C_DATATYPE] = 0
                rows[n, C_FLAGS] = 0
                rows[n, C_RAW] = 0
                rows[n, C_FIELD] = 0
                rows[n, C_QUALITY] = -1
                rows[n, C_PARENT] = parent
                mpos = body
                mend = body + np.int64(bits)
                while mpos < mend:
                    mat = mpos
                    # one field, read inline: a helper returning tuples costs several times more
                    code = 0
                    fbits = 0
                    fbody = 0
                    key = 0
                    shift = 0
                    while True:
                        if mpos >= mend:
                            code = _E_TRUNCATED_VARINT
                            break
                        if shift > 63:
                            code = _E_LONG_VARINT
                            break
                        b = buf[mpos] & 0xFF  # an int64 for numba
                        mpos += 1
                        key |= (b & 0x7F) << shift
                        if b < 0x80:
                            break
                        shift += 7
                    fwire = key & 7
                    fnum = min((key >> 3) & 0x1FFFFFFFFFFFFFFF, 0x3FFFFFFF)
                    if code == 0 and fnum == 0:
                        code = _E_FIELD_ZERO
                    elif (
                        code == 0
                        and fnum < len(metric_wt)
                        and metric_wt[fnum] >= 0
                        and metric_wt[fnum] != fwire
                    ):
                        code = _E_WIRE_TYPE
                    elif code == 0 and fwire == 0:
                        fbits = 0
                        shift = 0
                        while True:
                            if mpos >= mend:
                                code = _E_TRUNCATED_VARINT
                                break
                            if shift > 63:
                                code = _E_LONG_VARINT
                                break
                            b = buf[mpos] & 0xFF  # an int64 for numba
                            mpos += 1
                            fbits |= (b & 0x7F) << shift
                            if b < 0x80:
                                break
                            shift += 7
                    elif code == 0 and (fwire == 1 or fwire == 5):
                        size = 8 if fwire == 1 else 4
                        if mend - mpos < size:
                            code = _E_PAST_END
                        else:
                            for i in range(size):
                                fbits |= (buf[mpos + i] & 0xFF) << (8 * i)
                            mpos += size
                    elif code == 0 and fwire == 2:
                        fbits = 0
                        shift = 0
                        while True:
                            if mpos >= mend:
                                code = _E_TRUNCATED_VARINT
                                break
                            if shift > 63:
                                code = _E_LONG_VARINT
                                break
                            b = buf[mpos] & 0xFF  # an int64 for numba
                            mpos += 1
                            fbits |= (b & 0x7F) << shift
                            if b < 0x80:
                                break
                            shift += 7
                        if code == 0 and (fbits < 0 or fbits > mend - mpos):
                            code = _E_PAST_END
                        fbody = mpos
                        mpos += fbits
                    elif code == 0:
                        code = _E_BAD_WIRE_TYPE
                    if code:
                        head[4], head[5], head[6] = code, mat, n
                        head[7], head[8], head[9] = fnum, fwire, _K_METRIC
                        return rows, n, head
                    if fnum == 1:
                        rows[n, C_NAME_START] = fbody
                        rows[n, C_NAME_LEN] = np.int64(fbits)
                    elif fnum == 2:
                        rows[n, C_ALIAS] = np.int64(fbits)
                        rows[n, C_FLAGS] |= F_ALIAS
                    elif fnum == 3:
                        rows[n, C_TIMESTAMP] = np.int64(fbits)
                        rows[n, C_FLAGS] |= F_TIMESTAMP
                    elif fnum == 4:
                        rows[n, C_DATATYPE] = fbits & 0xFFFFFFFF
                        rows[n, C_FLAGS] |= F_DATATYPE
                    elif fnum == 5 or fnum == 6 or fnum == 7:
                        flag = F_HISTORICAL if fnum == 5 else (F_TRANSIENT if fnum == 6 else F_NULL)
                        if fbits != 0:
                            rows[n, C_FLAGS] |= flag
                        else:
                            rows[n, C_FLAGS] &= ~flag
                    elif fnum == 9:
                        quality, qat, qcode, qnum, qwire, qkind = _quality(
                            buf, fbody, fbody + np.int64(fbits)
                        )
                        if qcode:
                            head[4], head[5], head[6] = qcode, qat, n
                            head[7], head[8], head[9] = qnum, qwire, qkind
                            return rows, n, head
                        rows[n, C_QUALITY] = quality
                    elif 10 <= fnum <= 19:
                        rows[n, C_FIELD] = fnum
                        rows[n, C_RAW] = np.int64(fbits)
                        if fnum == 18:
                            if depth >= max_depth:
                                head[4], head[5], head[6] = _E_NESTING, mat, n
                                return rows, n, head
                            if todo == work.shape[0]:
                                work = _grow(work)
                            work[todo, 0], work[todo, 1] = fbody, fbody + np.int64(fbits)
                            work[todo, 2], work[todo, 3] = n, depth + 1
                            todo += 1
                n += 1
    return rows, n, head


@dataclass(frozen=True, slots=True)
class Decoded:
    """One Sparkplug payload as columns: `rows` has one row per metric (see the C_* columns);
    template members follow their template metric and name it in C_PARENT."""

    payload: bytes
    timestamp: int | None  # ms since the epoch
    seq: int | None
    rows: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def name(self, row: int) -> str | None:
        """The metric's own name (a template member's without its instance), or None."""
        start = int(self.rows[row, C_NAME_START])
        if start < 0:
            return None
        raw = self.payload[start : start + int(self.rows[row, C_NAME_LEN])]
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise PayloadError(f"{metric_path(self.rows, row)}.name: is not UTF-8") from None

    def full_name(self, row: int) -> str | None:
        """The sensor name: a template member's is `instance/member` (nested ones joined too)."""
        own = self.name(row)
        parent = int(self.rows[row, C_PARENT])
        if own is None or parent < 0:
            return own
        above = self.full_name(parent)
        return None if above is None else f"{above}/{own}"


def metric_path(rows: npt.NDArray[np.int64], row: int) -> str:
    """`metrics[3]`, or `metrics[1].template.metrics[0]` for a member, for error reasons."""
    parent = int(rows[row, C_PARENT])
    index = int(np.count_nonzero(rows[:row, C_PARENT] == parent))
    prefix = "" if parent < 0 else metric_path(rows, parent) + ".template."
    return f"{prefix}metrics[{index}]"


def _error(
    rows: npt.NDArray[np.int64], head: npt.NDArray[np.int64], *, max_metrics: int, max_depth: int
) -> PayloadError:
    code, at, row, field, wire, kind = (int(x) for x in head[4:10])
    if code == _E_TOO_MANY:
        return PayloadError(f"metrics: more than {max_metrics} metrics")
    where = metric_path(rows, row) if row >= 0 else ""
    if code == _E_NESTING:
        return PayloadError(f"{where}: templates nested deeper than {max_depth} levels")
    if kind == _K_TEMPLATE:
        where += ".template"
    name = _FIELDS[kind].get(field)
    if code != _E_FIELD_ZERO and field:
        where += ("." if where else "") + _PREFIX[kind] + (name or f"field {field}")
    what = _WHAT[code]
    if code == _E_WIRE_TYPE:
        expected = {
            _K_PAYLOAD: _PAYLOAD_WT,
            _K_METRIC: _METRIC_WT,
            _K_TEMPLATE: _TEMPLATE_WT,
            _K_PROPSET: _PROPSET_WT,
            _K_PROPVALUE: _PROPVALUE_WT,
        }[kind][field]
        what = f"wire type {_WIRE_NAMES[wire]} where {_WIRE_NAMES[expected]} is expected"
    return PayloadError(f"{where or 'payload'}: {what} at byte {at}")


def decode_payload(payload: bytes, *, max_metrics: int, max_depth: int = 8) -> Decoded:
    """Decode a Sparkplug B Payload into columns. Pure; never awaits; releases no GIL state.

    Raises PayloadError naming the metric, the problem and the byte offset for a malformed
    payload, more than `max_metrics` metrics (template members included) or templates nested
    deeper than `max_depth`.
    """
    buf = np.frombuffer(payload, np.uint8)
    rows, n, head = _decode(buf, max_metrics, max_depth)
    code = int(head[4])
    if code:
        raise _error(rows[: n + 1], head, max_metrics=max_metrics, max_depth=max_depth)
    return Decoded(
        payload=payload,
        timestamp=int(head[0]) % 2**64 if head[1] else None,
        seq=int(head[2]) % 2**64 if head[3] else None,
        rows=rows[:n],
    )
