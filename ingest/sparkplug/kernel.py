"""The numba kernel of the Sparkplug decoder: protobuf wire format into a metric matrix.

Reads untrusted bytes: every read is bounds-checked, varints may have up to 10 bytes, unknown
fields are skipped by their wire type, and a broken payload yields an error code, a byte offset
and what was being read (never an exception from inside the kernel). `wire` turns those into
PayloadErrors and gives the matrix its Python face.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ingest.jit import kernel

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

# Error codes the kernel returns.
E_TRUNCATED_VARINT: Final = 1
E_LONG_VARINT: Final = 2
E_PAST_END: Final = 3
E_WIRE_TYPE: Final = 4
E_BAD_WIRE_TYPE: Final = 5
E_FIELD_ZERO: Final = 6
E_NESTING: Final = 7
E_TOO_MANY: Final = 8
E_FULL: Final = 9  # not an error of the payload: the caller's arrays are too small


# Message kinds, for error reasons.
K_PAYLOAD: Final = 0
K_METRIC: Final = 1
K_TEMPLATE: Final = 2
K_PROPSET: Final = 3
K_PROPVALUE: Final = 4

# Expected wire types of the fields the decoder reads (-1: not read, skipped if valid).
PAYLOAD_WT: Final = np.full(6, -1, np.int64)
PAYLOAD_WT[[1, 2, 3]] = [0, 2, 0]
METRIC_WT: Final = np.full(20, -1, np.int64)
METRIC_WT[1:20] = [2, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0, 5, 1, 0, 2, 2, 2, 2, 2]
TEMPLATE_WT: Final = np.full(6, -1, np.int64)
TEMPLATE_WT[2] = 2
PROPSET_WT: Final = np.full(3, -1, np.int64)
PROPSET_WT[[1, 2]] = [2, 2]
PROPVALUE_WT: Final = np.full(12, -1, np.int64)
PROPVALUE_WT[[3, 4]] = [0, 0]
QUALITY_KEY: Final = np.frombuffer(b"Quality", np.uint8)
# The same for `decode`, by message kind: one array, so that no array changes in its loop.
_EXPECT: Final = np.full((3, 20), -1, np.int64)
_EXPECT[K_PAYLOAD, :6], _EXPECT[K_METRIC], _EXPECT[K_TEMPLATE, :6] = (
    PAYLOAD_WT,
    METRIC_WT,
    TEMPLATE_WT,
)


@kernel
def _varint(buf: bytes, pos: Any, end: Any) -> Any:
    """The varint at `pos`, of at most 10 bytes: (error code or 0, value as int64 bits, next
    position)."""
    value = np.int64(0)
    for i in range(10):
        if pos + i >= end:
            return E_TRUNCATED_VARINT, value, pos + i
        b = buf[pos + i] & 0xFF  # an int64 for numba
        value |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            return 0, value, pos + i + 1
    return E_LONG_VARINT, value, pos + 10


@kernel
def _field(buf: bytes, pos: Any, end: Any, expect: npt.NDArray[np.int64]) -> Any:
    """The field at `pos`, as `decode` reads one: (error code or 0, field number, wire type,
    value, body, next position). For the Quality property, read rarely: `decode` has the
    same steps written out, which in its loop is several times quicker than this call."""
    code, key, pos = _varint(buf, pos, end)
    wire = key & 7
    num = min((key >> 3) & 0x1FFFFFFFFFFFFFFF, 0x3FFFFFFF)
    bits = np.int64(0)
    body = pos
    if code:
        pass
    elif num == 0:
        code = E_FIELD_ZERO
    elif num < len(expect) and expect[num] >= 0 and expect[num] != wire:
        code = E_WIRE_TYPE
    elif wire == 0 or wire == 2:
        code, bits, pos = _varint(buf, pos, end)
        if code == 0 and wire == 2:
            if bits < 0 or bits > end - pos:
                code = E_PAST_END
            body = pos
            pos += bits
    elif wire == 1 or wire == 5:
        size = 8 if wire == 1 else 4
        if end - pos < size:
            code = E_PAST_END
        else:
            for i in range(size):
                bits |= (buf[pos + i] & 0xFF) << (8 * i)
            pos += size
    else:
        code = E_BAD_WIRE_TYPE
    return code, num, wire, bits, body, pos


@kernel
def _quality(buf: bytes, start: Any, end: Any) -> Any:
    """The `Quality` property of a PropertySet: (value or -1, error position, error code,
    field, wire type, message kind)."""
    want = -1
    index = 0
    pos = start
    klen = len(QUALITY_KEY)
    while pos < end:
        at = pos
        code, num, wire, length, body, pos = _field(buf, pos, end, PROPSET_WT)
        if code:
            return -1, at, code, num, wire, K_PROPSET
        if num == 1:
            if want < 0 and length == klen:
                same = True
                for i in range(klen):
                    if buf[body + i] != QUALITY_KEY[i]:
                        same = False
                        break
                if same:
                    want = index
            index += 1
    if want < 0:
        return -1, 0, 0, 0, 0, 0
    index = 0
    pos = start
    while pos < end:  # read whole above: no error on the way
        _, num, _, length, body, pos = _field(buf, pos, end, PROPSET_WT)
        if num == 2:
            if index == want:
                value: Any = -1
                inner = body
                stop = body + length
                while inner < stop:
                    at = inner
                    code, vnum, wire, bits, _, inner = _field(buf, inner, stop, PROPVALUE_WT)
                    if code:
                        return -1, at, code, vnum, wire, K_PROPVALUE
                    if vnum == 3 or vnum == 4:
                        value = bits & 0x7FFFFFFF
                return value, 0, 0, 0, 0, 0
            index += 1
    return -1, 0, 0, 0, 0, 0


@kernel
def decode(
    buf: bytes,
    max_rows: int,
    max_depth: int,
    rows: npt.NDArray[np.int64],
    work: npt.NDArray[np.int64],
) -> tuple[int, npt.NDArray[np.int64]]:
    """Fill `rows` (one per metric, COLUMNS wide) and return (row count, head); head =
    [timestamp, has timestamp, seq, has seq, error code, error position, error row, field,
    wire type, message kind]. Templates' member metrics follow their parents, each message of
    metrics read from `work` (start, end, parent row, depth) rather than by recursion. When
    `rows` or `work` is full the error is E_FULL: call again with bigger ones. (The arrays are
    the caller's: an array reassigned inside the loop costs a third of the time.)

    One loop reads every field, of the payload, a template or a metric (`kind`), written out
    once: a helper costs several
    times more, even one numba inlines (it takes a reference to `buf` at every call)."""
    head = np.zeros(10, np.int64)
    head[6] = -1
    n = 0
    work[0, 0], work[0, 1], work[0, 2], work[0, 3] = 0, len(buf), -1, 0
    todo = 1
    done = 0
    pos = end = outer = parent = depth = 0
    kind = K_PAYLOAD  # of the message being read; K_METRIC: a metric, in a message up to `outer`
    while True:
        if pos >= end:
            if kind == K_METRIC:  # the metric is read: back to the message it is in
                n += 1
                end = outer
                kind = K_PAYLOAD if parent < 0 else K_TEMPLATE
                continue
            if done == todo:
                return n, head
            pos, end, parent, depth = work[done, 0], work[done, 1], work[done, 2], work[done, 3]
            done += 1
            kind = K_PAYLOAD if parent < 0 else K_TEMPLATE
            continue
        at = pos
        # The field's key, then its varint or length, at most 10 bytes each.
        code = 0
        bits = 0
        body = 0
        key = 0
        shift = 0
        while True:
            if pos >= end:
                code = E_TRUNCATED_VARINT
                break
            if shift > 63:
                code = E_LONG_VARINT
                break
            b = buf[pos] & 0xFF  # an int64 for numba
            pos += 1
            key |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        wire = key & 7
        # the shift of a negative key must not sign-extend; a number beyond every field we
        # read is skipped like any unknown field
        num = min((key >> 3) & 0x1FFFFFFFFFFFFFFF, 0x3FFFFFFF)
        if code:
            pass
        elif num == 0:
            code = E_FIELD_ZERO
        elif num < 20 and _EXPECT[kind, num] != wire and _EXPECT[kind, num] >= 0:
            code = E_WIRE_TYPE
        elif wire == 0 or wire == 2:
            shift = 0
            while True:
                if pos >= end:
                    code = E_TRUNCATED_VARINT
                    break
                if shift > 63:
                    code = E_LONG_VARINT
                    break
                b = buf[pos] & 0xFF
                pos += 1
                bits |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            if code == 0 and wire == 2:
                if bits < 0 or bits > end - pos:
                    code = E_PAST_END
                body = pos
                pos += bits
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if end - pos < size:
                code = E_PAST_END
            else:
                for i in range(size):
                    bits |= (buf[pos + i] & 0xFF) << (8 * i)
                pos += size
        else:
            code = E_BAD_WIRE_TYPE
        if code:
            head[4], head[5], head[6] = code, at, n if kind == K_METRIC else parent
            head[7], head[8], head[9] = num, wire, kind
            return n, head
        if kind != K_METRIC:
            if parent < 0 and num == 1:
                head[0], head[1] = bits, 1
            elif parent < 0 and num == 3:
                head[2], head[3] = bits, 1
            elif num == 2:  # a metric: read its fields, then go on with this message
                if n >= max_rows:
                    head[4], head[5], head[6] = E_TOO_MANY, at, n
                    return n, head
                if n == rows.shape[0]:
                    head[4] = E_FULL
                    return n, head
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
                kind = K_METRIC
                outer = end
                end = pos
                pos = body
        elif num == 1:
            rows[n, C_NAME_START] = body
            rows[n, C_NAME_LEN] = bits
        elif num == 2:
            rows[n, C_ALIAS] = bits
            rows[n, C_FLAGS] |= F_ALIAS
        elif num == 3:
            rows[n, C_TIMESTAMP] = bits
            rows[n, C_FLAGS] |= F_TIMESTAMP
        elif num == 4:
            rows[n, C_DATATYPE] = bits & 0xFFFFFFFF
            rows[n, C_FLAGS] |= F_DATATYPE
        elif num == 5 or num == 6 or num == 7:
            flag = F_HISTORICAL if num == 5 else (F_TRANSIENT if num == 6 else F_NULL)
            if bits != 0:
                rows[n, C_FLAGS] |= flag
            else:
                rows[n, C_FLAGS] &= ~flag
        elif num == 9:
            quality, qat, qcode, qnum, qwire, qkind = _quality(buf, body, body + bits)
            if qcode:
                head[4], head[5], head[6] = qcode, qat, n
                head[7], head[8], head[9] = qnum, qwire, qkind
                return n, head
            rows[n, C_QUALITY] = quality
        elif 10 <= num <= 19:
            rows[n, C_FIELD] = num
            rows[n, C_RAW] = bits
            if num == 18:
                if depth >= max_depth:
                    head[4], head[5], head[6] = E_NESTING, at, n
                    return n, head
                if todo == work.shape[0]:
                    head[4] = E_FULL
                    return n, head
                work[todo, 0], work[todo, 1] = body, body + bits
                work[todo, 2], work[todo, 3] = n, depth + 1
                todo += 1
