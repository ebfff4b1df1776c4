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


@kernel
def _varint(buf: npt.NDArray[np.uint8], pos: Any, end: Any) -> Any:
    """(value as int64 bits, next position); next position is -code on error."""
    if pos < end and buf[pos] < 0x80:  # one byte: keys, small aliases, booleans
        return np.int64(buf[pos]), pos + 1
    result = np.int64(0)
    shift = 0
    for _ in range(10):
        if pos >= end:
            return np.int64(0), -E_TRUNCATED_VARINT
        b = buf[pos] & 0xFF  # an int64 for numba
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    return np.int64(0), -E_LONG_VARINT


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
        return 0, wire, zero, 0, -E_FIELD_ZERO
    if num > 0x3FFFFFFF:
        num = 0x3FFFFFFF  # beyond every field we read: skipped like any unknown field
    if num < len(expect) and expect[num] >= 0 and expect[num] != wire:
        return num, wire, zero, 0, -E_WIRE_TYPE
    if wire == 0:
        value, pos = _varint(buf, pos, end)
        return num, wire, value, 0, pos
    if wire == 1 or wire == 5:
        size = 8 if wire == 1 else 4
        if end - pos < size:
            return num, wire, zero, 0, -E_PAST_END
        bits = zero
        for i in range(size):
            bits |= (buf[pos + i] & 0xFF) << (8 * i)
        return num, wire, bits, 0, pos + size
    if wire == 2:
        length, pos = _varint(buf, pos, end)
        if pos < 0:
            return num, wire, zero, 0, pos
        if length < 0 or length > end - pos:
            return num, wire, zero, 0, -E_PAST_END
        return num, wire, length, pos, pos + length
    return num, wire, zero, 0, -E_BAD_WIRE_TYPE


@kernel
def _quality(buf: npt.NDArray[np.uint8], start: Any, end: Any) -> Any:
    """The `Quality` property of a PropertySet: (value or -1, error position, error code,
    field, wire type, message kind)."""
    want = -1
    index = 0
    pos = start
    klen = len(QUALITY_KEY)
    while pos < end:
        at = pos
        num, wire, length, body, pos = _field(buf, pos, end, PROPSET_WT)
        if pos < 0:
            return -1, at, -pos, num, wire, K_PROPSET
        if num == 1:
            if want < 0 and np.int64(length) == klen:
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
    while pos < end:
        num, _, length, body, pos = _field(buf, pos, end, PROPSET_WT)
        if num == 2:
            if index == want:
                value: Any = -1
                inner = body
                stop = body + np.int64(length)
                while inner < stop:
                    at = inner
                    vnum, wire, bits, _, inner = _field(buf, inner, stop, PROPVALUE_WT)
                    if inner < 0:
                        return -1, at, -inner, vnum, wire, K_PROPVALUE
                    if vnum == 3 or vnum == 4:
                        value = bits & 0x7FFFFFFF
                return value, 0, 0, 0, 0, 0
            index += 1
    return -1, 0, 0, 0, 0, 0


@kernel
def decode(
    buf: npt.NDArray[np.uint8],
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
    the caller's: an array reassigned inside the loop costs a third of the time.)"""
    head = np.zeros(10, np.int64)
    metric_wt = METRIC_WT.copy()
    head[6] = -1
    n = 0
    work[0, 0], work[0, 1], work[0, 2], work[0, 3] = 0, len(buf), -1, 0
    todo = 1
    done = 0
    while done < todo:
        start, end, parent, depth = work[done, 0], work[done, 1], work[done, 2], work[done, 3]
        done += 1
        expect = PAYLOAD_WT if parent < 0 else TEMPLATE_WT
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
            num = min((key >> 3) & 0x1FFFFFFFFFFFFFFF, 0x3FFFFFFF)
            if code == 0 and num == 0:
                code = E_FIELD_ZERO
            elif code == 0 and num < len(expect) and expect[num] >= 0 and expect[num] != wire:
                code = E_WIRE_TYPE
            elif code == 0 and wire == 0:
                bits = 0
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
                    bits |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
            elif code == 0 and (wire == 1 or wire == 5):
                size = 8 if wire == 1 else 4
                if end - pos < size:
                    code = E_PAST_END
                else:
                    for i in range(size):
                        bits |= (buf[pos + i] & 0xFF) << (8 * i)
                    pos += size
            elif code == 0 and wire == 2:
                bits = 0
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
                    bits |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                if code == 0 and (bits < 0 or bits > end - pos):
                    code = E_PAST_END
                body = pos
                pos += bits
            elif code == 0:
                code = E_BAD_WIRE_TYPE
            if code:
                head[4], head[5], head[6] = code, at, parent
                head[7], head[8] = num, wire
                head[9] = K_PAYLOAD if parent < 0 else K_TEMPLATE
                return n, head
            if parent < 0 and num == 1:
                head[0], head[1] = np.int64(bits), 1
            elif parent < 0 and num == 3:
                head[2], head[3] = np.int64(bits), 1
            elif num == 2:
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
                            code = E_TRUNCATED_VARINT
                            break
                        if shift > 63:
                            code = E_LONG_VARINT
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
                        code = E_FIELD_ZERO
                    elif (
                        code == 0
                        and fnum < len(metric_wt)
                        and metric_wt[fnum] >= 0
                        and metric_wt[fnum] != fwire
                    ):
                        code = E_WIRE_TYPE
                    elif code == 0 and fwire == 0:
                        fbits = 0
                        shift = 0
                        while True:
                            if mpos >= mend:
                                code = E_TRUNCATED_VARINT
                                break
                            if shift > 63:
                                code = E_LONG_VARINT
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
                            code = E_PAST_END
                        else:
                            for i in range(size):
                                fbits |= (buf[mpos + i] & 0xFF) << (8 * i)
                            mpos += size
                    elif code == 0 and fwire == 2:
                        fbits = 0
                        shift = 0
                        while True:
                            if mpos >= mend:
                                code = E_TRUNCATED_VARINT
                                break
                            if shift > 63:
                                code = E_LONG_VARINT
                                break
                            b = buf[mpos] & 0xFF  # an int64 for numba
                            mpos += 1
                            fbits |= (b & 0x7F) << shift
                            if b < 0x80:
                                break
                            shift += 7
                        if code == 0 and (fbits < 0 or fbits > mend - mpos):
                            code = E_PAST_END
                        fbody = mpos
                        mpos += fbits
                    elif code == 0:
                        code = E_BAD_WIRE_TYPE
                    if code:
                        head[4], head[5], head[6] = code, mat, n
                        head[7], head[8], head[9] = fnum, fwire, K_METRIC
                        return n, head
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
                            return n, head
                        rows[n, C_QUALITY] = quality
                    elif 10 <= fnum <= 19:
                        rows[n, C_FIELD] = fnum
                        rows[n, C_RAW] = np.int64(fbits)
                        if fnum == 18:
                            if depth >= max_depth:
                                head[4], head[5], head[6] = E_NESTING, mat, n
                                return n, head
                            if todo == work.shape[0]:
                                head[4] = E_FULL
                                return n, head
                            work[todo, 0], work[todo, 1] = fbody, fbody + np.int64(fbits)
                            work[todo, 2], work[todo, 3] = n, depth + 1
                            todo += 1
                n += 1
    return n, head
