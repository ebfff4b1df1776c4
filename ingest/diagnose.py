"""Why a payload the wire-format decoders refused is invalid, in the product's own words.

The decode stage's fast path is msgspec's typed decoders. When they refuse a payload, this module
works out the reason itself: it checks the syntax (MessagePack by its own scanner, JSON with the
standard library), then walks the plain values against the same wire Structs, described by
`msgspec.inspect`. No reason is taken from another library's message text, so the wording is
ours and stays stable across releases.

A reason is `<field>: <what is wrong>`. The field part holds only names of the schema, indices
and `[...]`, so it can serve as a bounded metrics label; anything the sender chose is quoted
after the colon.
"""

from __future__ import annotations

import json as stdjson
import math
from datetime import datetime
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from ingest.errors import PayloadError

__all__ = ["diagnose", "excerpt"]

_MAX_DEPTH: Final = 32  # far deeper than any wire shape; only the error path enforces it
_NUMBER_MAX: Final = 24  # characters of a number echoed in a reason
_I64_MIN: Final = -(2**63)
_U64_MAX: Final = 2**64 - 1


def excerpt(text: str, limit: int = 64) -> str:
    """A quoted, one-line excerpt of untrusted text: escaped like repr, about `limit` chars."""
    out: list[str] = []
    size = 0
    for char in text:
        if char.isprintable() and char not in "'\\":
            piece = char
        else:
            piece = "\\" + char if char in "'\\" else repr(char)[1:-1]
        size += len(piece)
        if size > limit:
            return "'" + "".join(out) + "'..."
        out.append(piece)
    return "'" + "".join(out) + "'"


def diagnose(payload: bytes, schema: Any, *, json: bool) -> PayloadError:
    """The reason `payload` does not decode as `schema` (a wire Struct type, or a union of
    them), for a payload the typed decoder refused.

    Pure; never awaits. Returns (does not raise) the PayloadError.
    """
    try:
        value = _json_values(payload) if json else _msgpack_values(payload)
        problem = _version(value) or _Walk(json=json).check(value, mi.type_info(schema), "")
    except PayloadError as exc:
        return exc
    if problem is not None:
        return PayloadError(problem)
    # The decoder refused what these checks accept: say so rather than guess.
    return PayloadError("payload: does not match wire format version 1")


# --------------------------------------------------------------------------------------------
# Syntax
# --------------------------------------------------------------------------------------------


def _not_utf8(what: str, data: bytes, at: int, exc: UnicodeDecodeError) -> PayloadError:
    offset = at + exc.start
    return PayloadError(
        f"payload: {what} is not UTF-8 (byte 0x{data[offset]:02x} at offset {offset})"
    )


class _ConstantError(Exception):
    """NaN, Infinity or -Infinity in JSON text (Python's json module accepts them)."""


def _reject_constant(name: str) -> Any:
    raise _ConstantError(name)


_JSON: Final = stdjson.JSONDecoder(parse_constant=_reject_constant)


def _json_values(payload: bytes) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8("JSON text", payload, 0, exc) from None
    start = len(text) - len(text.lstrip(" \t\r\n"))

    def at_byte(index: int) -> int:
        return len(text[:index].encode("utf-8"))

    try:
        value, end = _JSON.raw_decode(text, start)
    except stdjson.JSONDecodeError as exc:
        if not text[exc.pos :].strip(" \t\r\n"):
            raise PayloadError(f"payload: truncated at byte {len(payload)}") from None
        raise PayloadError(f"payload: JSON is malformed at byte {at_byte(exc.pos)}") from None
    except _ConstantError as exc:
        raise PayloadError(f"payload: JSON is malformed: {exc} is not a JSON number") from None
    except RecursionError:
        raise PayloadError("payload: nested too deeply") from None
    except ValueError:  # an integer literal longer than Python converts
        raise PayloadError("payload: JSON is malformed: a number has too many digits") from None
    rest = text[end:]
    if rest.strip(" \t\r\n"):
        at = end + len(rest) - len(rest.lstrip(" \t\r\n"))
        raise PayloadError(f"payload: trailing data after the JSON value at byte {at_byte(at)}")
    return value


# MessagePack type bytes: fixed-size values (the bytes that follow), length-prefixed ones
# (size of the length, and whether they are strings or carry an extension type byte), and
# containers (size of the count, entries per count).
_FIXED: Final = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8}
_FIXED.update({0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})
_FIXED.update({0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17})  # fixext: type byte + data
_BIN: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_EXT: Final = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_STR: Final = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_CONTAINER: Final = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def _msgpack_problem(data: bytes) -> str | None:
    """The first syntax error of one MessagePack value filling `data`, or None."""
    end = len(data)
    pos = 0
    pending = [1]  # values still to read at each open nesting level
    in_map = [False]  # whether that level is a map (its even-numbered values are keys)
    while pending:
        if not pending[-1]:
            pending.pop()
            in_map.pop()
            continue
        key = in_map[-1] and pending[-1] % 2 == 0
        pending[-1] -= 1
        if pos >= end:
            return f"payload: truncated at byte {end}"
        code = data[pos]
        at = pos
        pos += 1
        count = -1
        size = -1
        if code <= 0x7F or code >= 0xE0:
            continue
        is_map = code <= 0x8F or code in (0xDE, 0xDF)
        if key and is_map:  # valid MessagePack, but no key a decoder can hold
            return f"payload: the map key at byte {at} is a map"
        if code <= 0x8F:
            count = 2 * (code & 0x0F)
        elif code <= 0x9F:
            count = code & 0x0F
        elif code <= 0xBF:
            size = code & 0x1F
        elif code in _FIXED or code in _EXT:
            if code in _EXT:
                width = _EXT[code]
                if pos + width > end:
                    return f"payload: truncated at byte {end}"
                data_size = int.from_bytes(data[pos : pos + width], "big")
                pos += width
            else:
                data_size = _FIXED[code] - 1
            if code >= 0xD4 or code in _EXT:  # an extension: its type byte, then its data
                if pos >= end:
                    return f"payload: truncated at byte {end}"
                problem = _extension_problem(data[pos], data_size, at, key=key)
                if problem is not None:
                    return problem
                pos += 1 + data_size
            else:
                pos += _FIXED[code]
        elif code in _BIN or code in _STR:
            width = _BIN.get(code) or _STR[code]
            if pos + width > end:
                return f"payload: truncated at byte {end}"
            size = int.from_bytes(data[pos : pos + width], "big")
            pos += width
        elif code in _CONTAINER:
            width, per = _CONTAINER[code]
            if pos + width > end:
                return f"payload: truncated at byte {end}"
            count = per * int.from_bytes(data[pos : pos + width], "big")
            pos += width
        else:  # 0xC1, the one code MessagePack never uses
            return f"payload: MessagePack is malformed: byte {at} is 0x{code:02x}, which is no type"
        if count >= 0:
            if len(pending) > _MAX_DEPTH:
                return f"payload: nested deeper than {_MAX_DEPTH} levels"
            pending.append(count)
            in_map.append(is_map)
        elif size >= 0:
            if (code <= 0xBF or code in _STR) and pos + size <= end:
                try:
                    data[pos : pos + size].decode("utf-8")
                except UnicodeDecodeError as exc:
                    return _not_utf8("a string", data, pos, exc).reason
            pos += size
        if pos > end:
            return f"payload: truncated at byte {end}"
    if pos < end:
        return f"payload: trailing data after the MessagePack value at byte {pos}"
    return None


def _extension_problem(kind: int, size: int, at: int, *, key: bool) -> str | None:
    """What a decoder cannot hold of the extension at byte `at` (type byte `kind`), or None."""
    if kind == 0xFF:  # type -1, a timestamp
        if size not in (4, 8, 12):
            return f"payload: the timestamp at byte {at} has {size} bytes; 4, 8 or 12 are valid"
        return None
    if key:
        return f"payload: the map key at byte {at} is an extension value"
    return None


def _msgpack_values(payload: bytes) -> Any:
    problem = _msgpack_problem(payload)
    if problem is not None:
        raise PayloadError(problem)
    try:
        return msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, TypeError, ValueError, RecursionError):
        # The scanner passed what the plain decoder still refuses: say so rather than guess.
        raise PayloadError("payload: MessagePack holds a value with no plain form") from None


# --------------------------------------------------------------------------------------------
# Values against the schema
# --------------------------------------------------------------------------------------------


def _version(value: Any) -> str | None:
    """A future format version is named as such, whatever else differs in its shape."""
    if isinstance(value, dict):
        v = value.get("v")
        if type(v) is int and v != 1:
            return f"v: unsupported format version {v}"
    return None


def _field(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _number(value: int) -> str:
    text = str(value)
    return text if len(text) <= _NUMBER_MAX else f"a {len(text)}-digit number"


class _Walk:
    """Checks plain decoded values (dict, list, str, ...) against msgspec.inspect types."""

    def __init__(self, *, json: bool) -> None:
        self.json = json

    def kind(self, value: Any) -> str:
        """What a plain value is, as a reason names it."""
        if value is None:
            return "null" if self.json else "nil"
        if isinstance(value, bool):
            return "a boolean"
        if isinstance(value, int):
            return "an integer"
        if isinstance(value, float):
            return "a number"
        if isinstance(value, str):
            return "a string"
        if isinstance(value, bytes):
            return "bin"
        if isinstance(value, list | tuple):
            return "an array"
        if isinstance(value, dict):
            return "an object" if self.json else "a map"
        if isinstance(value, datetime):
            return "a timestamp"
        return "an extension value"

    def expected(self, t: mi.Type) -> str:
        if isinstance(t, mi.UnionType):
            names = [self.expected(x) for x in t.types]
            return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        if isinstance(t, mi.IntType):
            return "an integer"
        if isinstance(t, mi.FloatType):
            return "a number"
        if isinstance(t, mi.StrType):
            return "a string"
        if isinstance(t, mi.BytesType | mi.MemoryViewType):
            return "bin"
        if isinstance(t, mi.ListType):
            return "an array"
        if isinstance(t, mi.DateTimeType):
            return "an RFC 3339 time"
        return "an object" if self.json else "a map"  # StructType, DictType

    @staticmethod
    def accepts(t: mi.Type, value: Any) -> bool:
        """Whether `value` is of `t`'s kind (its contents are checked separately)."""
        if isinstance(value, bool):
            return False  # never an integer or a number on the wire
        if isinstance(t, mi.IntType):
            return isinstance(value, int)
        if isinstance(t, mi.FloatType):
            return isinstance(value, int | float)
        if isinstance(t, mi.StrType | mi.DateTimeType):
            return isinstance(value, str)
        if isinstance(t, mi.BytesType | mi.MemoryViewType):
            return isinstance(value, bytes)
        if isinstance(t, mi.ListType):
            return isinstance(value, list | tuple)
        return isinstance(value, dict)  # StructType, DictType

    def check(self, value: Any, t: mi.Type, path: str) -> str | None:
        """The first problem of `value` as a `t` at `path`, or None."""
        where = path or "payload"
        options = t.types if isinstance(t, mi.UnionType) else (t,)
        match = next((x for x in options if self.accepts(x, value)), None)
        if match is None:
            return f"{where}: expected {self.expected(t)}, got {self.kind(value)}"
        if isinstance(match, mi.IntType):
            return _int_problem(where, value, match)
        if isinstance(match, mi.FloatType):
            if isinstance(value, float) and not math.isfinite(value) and self.json:
                return f"{where}: number out of range"
            return None
        if isinstance(match, mi.DateTimeType):
            try:
                moment = msgspec.json.decode(msgspec.json.encode(value), type=datetime)
            except msgspec.ValidationError:
                moment = None
            if moment is None:
                return f"{where}: {excerpt(value)} is not an RFC 3339 time"
            if moment.tzinfo is None:
                return f"{where}: {excerpt(value)} has no timezone; add Z or an offset"
            return None
        if isinstance(match, mi.ListType):
            for i, item in enumerate(value):
                problem = self.check(item, match.item_type, f"{path}[{i}]")
                if problem is not None:
                    return problem
            return None
        if isinstance(match, mi.DictType):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"{where}: key: expected a string, got {self.kind(key)}"
                problem = self.check(item, match.value_type, f"{path}[...]")
                if problem is not None:
                    return problem
            return None
        if isinstance(match, mi.StructType):
            return self.struct(value, match, path)
        return None  # str, bin: their contents are the decode stage's own checks

    def struct(self, value: dict[Any, Any], t: mi.StructType, path: str) -> str | None:
        where = path or "payload"
        fields = {f.encode_name: f for f in t.fields}
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}: key: expected a string, got {self.kind(key)}"
            field = fields.get(key)
            if field is None:
                note = ""
                if path.startswith("[") and key in ("v", "t0", "seq", "ch"):
                    note = " (a JSON array holds only single-sample objects)"
                return f"{where}: unknown field {excerpt(key)}{note}"
            problem = self.check(item, field.type, _field(path, key))
            if problem is not None:
                return problem
        for field in t.fields:
            if field.required and field.encode_name not in value:
                return f"{_field(path, field.encode_name)}: missing required field"
        return None


def _int_problem(where: str, value: int, t: mi.IntType) -> str | None:
    low = _I64_MIN if t.ge is None else t.ge
    if t.gt is not None:
        low = t.gt + 1
    high = _U64_MAX if t.le is None else t.le
    if t.lt is not None:
        high = t.lt - 1
    if value < low:
        return f"{where}: {_number(value)} is below the minimum {low}"
    if value > high:
        return f"{where}: {_number(value)} is above the maximum {high}"
    return None
