"""Masked values on the wire: a column's value replaced by what its mask shows, in the
column's type and format, so the client's driver still parses it. No I/O.

A value is masked by the type the server says the column has (RowDescription's type OID)
and the format it is sent in (text or binary). What each mask shows, by type:

============  ======================  =======================  ====================  ========
type          full                    last N                   hash (keyed HMAC)     constant
============  ======================  =======================  ====================  ========
text-like     ``****``                ``*****6789``            32 hex digits         value
integers      0                       the last N digits        a number from it      value
numeric,      0                       (full)                   (full)                value
float                                                                                (text)
bool          false                   (full)                   (full)                value
date, time,   1970-01-01, 00:00:00,   (full)                   (full)                value
timestamps    1970-01-01 00:00:00                                                    (text)
uuid          all zeros               (full)                   a uuid from it        value
bytea         empty                   (full)                   (full)                value
json, jsonb   ``"****"``              (full)                   (full)                value
============  ======================  =======================  ====================  ========

A type not in the table (an array, a record, an enum, an extension's type) is masked to
NULL, which every driver reads in every type; so is a value whose mask this table has no
form for in binary format. ``null`` is NULL always; a NULL stays NULL under every mask.
Text-like: text, varchar, bpchar, name and unknown (binary format is the text's bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import uuid

from shadow.policy.rules import ColumnMask

__all__ = ["FULL", "mask_data_row", "mask_value"]

#: the mask of a value computed from a masked column (not the column itself)
FULL = ColumnMask(None, "*", "*", "full", "(an expression over a masked column)")

_TEXT = frozenset({19, 25, 705, 1042, 1043})
_INTS = {21: struct.Struct("!h"), 23: struct.Struct("!i"), 20: struct.Struct("!q"), 26: struct.Struct("!I")}
_INT_RANGE = {21: 1 << 15, 23: 1 << 31, 20: 1 << 63, 26: 1 << 32}
#: type OID -> (full mask in text format, in binary format)
_ZERO = {
    16: (b"f", b"\0"), 17: (b"\\x", b""), 21: (b"0", b"\0" * 2), 23: (b"0", b"\0" * 4), 20: (b"0", b"\0" * 8),
    26: (b"0", b"\0" * 4), 700: (b"0", b"\0" * 4), 701: (b"0", b"\0" * 8), 1700: (b"0", b"\0" * 8),
    1082: (b"1970-01-01", struct.pack("!i", -10957)), 1083: (b"00:00:00", b"\0" * 8),
    1114: (b"1970-01-01 00:00:00", struct.pack("!q", -946684800000000)),
    1184: (b"1970-01-01 00:00:00+00", struct.pack("!q", -946684800000000)),
    1186: (b"00:00:00", b"\0" * 16), 2950: (b"00000000-0000-0000-0000-000000000000", b"\0" * 16),
    114: (b'"****"', b'"****"'), 3802: (b'"****"', b'\x01"****"'),
}  # fmt: skip
_STARS = b"****"
_LEN = struct.Struct("!i")
_H = struct.Struct("!h")


def mask_value(mask: ColumnMask, value: bytes | None, oid: int, binary: bool) -> bytes | None:
    """What a client of a class with ``mask`` sees instead of ``value`` (None: NULL), a
    value of type ``oid`` in text (``binary`` False) or binary format."""
    if value is None or mask.mask == "null":
        return None
    kind = mask.mask
    if oid in _TEXT:
        if kind == "last":
            text = value.decode("utf-8", "surrogateescape")
            keep = mask.keep if len(text) > mask.keep else 0
            return ("*" * (len(text) - keep) + text[len(text) - keep:]).encode("utf-8", "surrogateescape")
        if kind == "hash":
            return hmac.new(mask.key, value, hashlib.sha256).hexdigest()[:32].encode()
        if kind == "constant":
            return mask.value.encode()
        return _STARS
    if kind == "constant":
        if not binary:
            return mask.value.encode()
        if oid in _INTS:
            try:
                return _INTS[oid].pack(int(mask.value))
            except (ValueError, struct.error):
                return None
        return None
    if oid in _INTS and kind in ("last", "hash"):
        number = _read_int(value, oid, binary)
        if number is None:
            return None
        if kind == "last":
            digits = str(abs(number))
            number = int(digits[-mask.keep:]) if mask.keep and len(digits) > mask.keep else 0
        else:
            digest = hmac.new(mask.key, str(number).encode(), hashlib.sha256).digest()
            number = int.from_bytes(digest[:8], "big") % _INT_RANGE[oid]
        return _INTS[oid].pack(number) if binary else str(number).encode()
    if oid == 2950 and kind == "hash":
        canonical = value if not binary else str(uuid.UUID(bytes=value)).encode() if len(value) == 16 else None
        if canonical is None:
            return None
        digest = hmac.new(mask.key, canonical.lower(), hashlib.sha256).digest()[:16]
        return digest if binary else str(uuid.UUID(bytes=digest)).encode()
    zero = _ZERO.get(oid)
    return None if zero is None else zero[binary]


def _read_int(value: bytes, oid: int, binary: bool) -> int | None:
    try:
        return _INTS[oid].unpack(value)[0] if binary else int(value)
    except (ValueError, struct.error):
        return None


def mask_data_row(buf, start: int, end: int, columns: dict[int, tuple[ColumnMask, int, bool]]) -> bytes:
    """A DataRow message (body ``buf[start:end]``) with the values of ``columns`` (index ->
    (mask, type OID, binary)) masked; a row that cannot be read comes back with every
    value NULL (never a value unmasked)."""
    count = 0
    try:
        (count,) = _H.unpack_from(buf, start)
        pos = start + 2
        out = [b""]
        for i in range(count):
            (length,) = _LEN.unpack_from(buf, pos)
            pos += 4
            value = None if length < 0 else bytes(buf[pos:pos + length])
            if length > 0:
                pos += length
            if pos > end:
                raise ValueError("a value runs past the row's end")
            how = columns.get(i)
            if how is not None:
                value = mask_value(how[0], value, how[1], how[2])
            out.append(_LEN.pack(-1) if value is None else _LEN.pack(len(value)) + value)
    except (struct.error, ValueError):
        count = max(count, 0)
        out = [b""] + [_LEN.pack(-1)] * count
    body = _H.pack(count) + b"".join(out)
    return b"D" + _LEN.pack(len(body) + 4) + body
