"""COPY for the policy: what a COPY statement reads or writes and in which format
(:func:`parse_copy`), and the rows of a COPY TO STDOUT with masked values replaced, in the
text, CSV and binary formats (:class:`CopyMasker`). No I/O.

The server sends each row of a COPY TO as one CopyData message (the binary format's
header and trailer in the first and last). A row is split into its fields by the format's
rules (text: the delimiter, backslash escapes; CSV: the delimiter, quotes, the escape
character; binary: each field's length), the masked fields are replaced -- in text by the
masked value escaped or quoted again, in binary by the value's bytes -- and the others
are kept byte for byte. A row that cannot be split has every field masked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import sqlglot

from shadow.policy.masking import mask_value
from shadow.policy.rules import ColumnMask

__all__ = ["CopyFormat", "CopyMasker", "CopyStatement", "parse_copy"]

_T = sqlglot.TokenType
_SIGNATURE = b"PGCOPY\n\xff\r\n\0"
_H = struct.Struct("!h")
_I = struct.Struct("!i")


@dataclass(frozen=True, slots=True)
class CopyFormat:
    kind: str = "text"  # text | csv | binary
    delimiter: str = "\t"
    null: str = "\\N"
    quote: str = '"'
    escape: str = '"'
    header: bool = False


@dataclass(frozen=True, slots=True)
class CopyStatement:
    """``table`` (schema or None, name) with ``columns`` (None: all), or ``query`` (its
    text); ``to`` True for COPY TO (``stdout``: to the client), False for COPY FROM."""

    table: tuple[str | None, str] | None
    columns: tuple[str, ...] | None
    query: str | None
    to: bool
    stdout: bool
    format: CopyFormat


def parse_copy(sql: str, tokens: list) -> CopyStatement | None:
    """The COPY statement of ``tokens`` (of ``sql``); None if it cannot be read."""
    i = 1
    table = columns = query = None
    if i < len(tokens) and tokens[i].token_type == _T.L_PAREN:
        depth, j = 0, i
        while j < len(tokens):
            depth += {_T.L_PAREN: 1, _T.R_PAREN: -1}.get(tokens[j].token_type, 0)
            if depth == 0:
                break
            j += 1
        if j >= len(tokens) or j == i + 1:
            return None
        query = sql[tokens[i + 1].start:tokens[j - 1].end + 1]
        i = j + 1
    else:
        parts = []
        while i < len(tokens) and tokens[i].token_type != _T.L_PAREN and not _is_word(tokens[i], "TO", "FROM"):
            if tokens[i].token_type != _T.DOT:
                parts.append(_ident(tokens[i]))
            i += 1
        if not 1 <= len(parts) <= 2:
            return None
        table = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
        if i < len(tokens) and tokens[i].token_type == _T.L_PAREN:
            names = []
            i += 1
            while i < len(tokens) and tokens[i].token_type != _T.R_PAREN:
                if tokens[i].token_type != _T.COMMA:
                    names.append(_ident(tokens[i]))
                i += 1
            columns = tuple(names)
            i += 1
    if i >= len(tokens) or not _is_word(tokens[i], "TO", "FROM"):
        return None
    to = tokens[i].text.upper() == "TO"
    i += 1
    if i >= len(tokens):
        return None
    target = tokens[i].text.upper()
    stdout = target in ("STDOUT", "STDIN") and tokens[i].token_type != _T.STRING
    i += 1 if target != "PROGRAM" else 2
    return CopyStatement(table, columns, query, to, stdout, _options(tokens[i:]))


def _is_word(token, *words: str) -> bool:
    return token.token_type != _T.IDENTIFIER and token.token_type != _T.STRING and token.text.upper() in words


def _ident(token) -> str:
    return token.text if token.token_type == _T.IDENTIFIER else token.text.lower()


def _options(tokens: list) -> CopyFormat:
    """The format of COPY's options, new (``WITH (FORMAT csv, ...)``) or old (``CSV HEADER``)."""
    words = [(t.text if t.token_type == _T.STRING else t.text.upper(), t.token_type == _T.STRING) for t in tokens
             if t.token_type not in (_T.L_PAREN, _T.R_PAREN, _T.COMMA, _T.WITH, _T.ALIAS)]  # fmt: skip
    found: dict[str, str | None] = {}
    i = 0
    while i < len(words):
        word, _quoted = words[i]
        value = None
        if i + 1 < len(words) and (words[i + 1][1] or word == "FORMAT" or words[i + 1][0] in ("TRUE", "FALSE", "ON",
                                                                                           "OFF", "0", "1", "MATCH")):
            value = words[i + 1][0]
            i += 1
        found[word] = value
        i += 1
    kind = "text"
    if "BINARY" in found or (found.get("FORMAT") or "").upper() == "BINARY":
        kind = "binary"
    elif "CSV" in found or (found.get("FORMAT") or "").upper() == "CSV":
        kind = "csv"
    quote = found.get("QUOTE") or '"'
    header = "HEADER" in found and (found["HEADER"] or "TRUE").upper() not in ("FALSE", "OFF", "0")
    return CopyFormat(kind=kind, delimiter=found.get("DELIMITER") or (",", "\t")[kind == "text"],
                      null=found["NULL"] if found.get("NULL") is not None else ("", "\\N")[kind == "text"],
                      quote=quote, escape=found.get("ESCAPE") or quote, header=header)  # fmt: skip


class CopyMasker:
    """The CopyData rows of one COPY TO STDOUT, masked: ``columns`` index -> (mask, type OID)."""

    __slots__ = ("format", "columns", "first", "count")

    def __init__(self, fmt: CopyFormat, columns: dict[int, tuple[ColumnMask, int]], count: int) -> None:
        self.format = fmt
        self.columns = columns
        self.count = count
        self.first = True

    def row(self, data: bytes) -> bytes:
        """One CopyData message's data, masked."""
        first, self.first = self.first, False
        kind = self.format.kind
        if kind == "binary":
            return self._binary(data, first)
        if first and self.format.header:
            return data  # the column names
        try:
            if kind == "csv":
                return self._csv(data)
            return self._text(data)
        except (ValueError, UnicodeError):
            return self._all_null(data)

    def _all_null(self, data: bytes) -> bytes:
        if self.format.kind == "binary":
            return _H.pack(self.count) + _I.pack(-1) * self.count
        null = self.format.null.encode()
        return self.format.delimiter.encode().join([null] * self.count) + b"\n"

    # text format: fields split at the delimiter, backslash escapes

    def _text(self, data: bytes) -> bytes:
        text = data.decode("utf-8", "surrogateescape")
        end = "\n" if text.endswith("\n") else ""
        body = text[:-1] if end else text
        if body.endswith("\r"):
            body, end = body[:-1], "\r" + end
        delimiter = self.format.delimiter
        fields, field, i = [], [], 0
        while i < len(body):
            ch = body[i]
            if ch == "\\" and i + 1 < len(body):
                field.append(body[i:i + 2])
                i += 2
                continue
            if ch == delimiter:
                fields.append("".join(field))
                field = []
            else:
                field.append(ch)
            i += 1
        fields.append("".join(field))
        if len(fields) != self.count:
            raise ValueError("a row with another number of fields")
        for index, (mask, oid) in self.columns.items():
            raw = fields[index]
            if raw == self.format.null:
                continue
            value = mask_value(mask, _unescape(raw).encode("utf-8", "surrogateescape"), oid, False)
            fields[index] = self.format.null if value is None else _escape(value.decode("utf-8", "surrogateescape"),
                                                                            delimiter)  # fmt: skip
        return (delimiter.join(fields) + end).encode("utf-8", "surrogateescape")

    # CSV: fields split at the delimiter outside quotes

    def _csv(self, data: bytes) -> bytes:
        text = data.decode("utf-8", "surrogateescape")
        fmt = self.format
        end = "\r\n" if text.endswith("\r\n") else "\n" if text.endswith("\n") else ""
        body = text[:len(text) - len(end)]
        fields: list[tuple[str, bool]] = []  # (value, quoted)
        i, value, quoted, inside = 0, [], False, False
        while i < len(body):
            ch = body[i]
            if inside:
                if ch == fmt.escape and i + 1 < len(body) and body[i + 1] in (fmt.quote, fmt.escape) and \
                        (fmt.escape != fmt.quote or body[i + 1] == fmt.quote):  # fmt: skip
                    value.append(body[i + 1])
                    i += 2
                    continue
                if ch == fmt.quote:
                    inside = False
                else:
                    value.append(ch)
            elif ch == fmt.quote:
                inside = quoted = True
            elif ch == fmt.delimiter:
                fields.append(("".join(value), quoted))
                value, quoted = [], False
            else:
                value.append(ch)
            i += 1
        if inside:
            raise ValueError("a quote left open")
        fields.append(("".join(value), quoted))
        if len(fields) != self.count:
            raise ValueError("a row with another number of fields")
        out = []
        for index, (value, was_quoted) in enumerate(fields):
            how = self.columns.get(index)
            if how is None:
                out.append(_csv_field(value, fmt) if was_quoted else value)
                continue
            if value == fmt.null and not was_quoted:
                out.append(value)
                continue
            masked = mask_value(how[0], value.encode("utf-8", "surrogateescape"), how[1], False)
            out.append(fmt.null if masked is None else _csv_field(masked.decode("utf-8", "surrogateescape"), fmt))
        return (fmt.delimiter.join(out) + end).encode("utf-8", "surrogateescape")

    # binary: a header first, then per row int16 count and (int32 length, bytes) per field

    def _binary(self, data: bytes, first: bool) -> bytes:
        pos = 0
        out = []
        if first and data.startswith(_SIGNATURE):
            try:
                (extension,) = _I.unpack_from(data, len(_SIGNATURE) + 4)
            except struct.error:
                return _SIGNATURE + b"\0" * 8
            pos = len(_SIGNATURE) + 8 + max(extension, 0)
            out.append(data[:pos])
        try:
            while pos < len(data):
                (count,) = _H.unpack_from(data, pos)
                pos += 2
                out.append(_H.pack(count))
                if count < 0:  # the trailer
                    continue
                for index in range(count):
                    (length,) = _I.unpack_from(data, pos)
                    pos += 4
                    value = None if length < 0 else data[pos:pos + length]
                    if length > 0:
                        pos += length
                    if pos > len(data):
                        raise ValueError("a field runs past the row")
                    how = self.columns.get(index)
                    if how is not None and value is not None:
                        value = mask_value(how[0], value, how[1], True)
                    out.append(_I.pack(-1) if value is None else _I.pack(len(value)) + value)
        except (struct.error, ValueError):
            head = out[0] if first and out and out[0].startswith(_SIGNATURE) else b""
            return head + self._all_null(data)
        return b"".join(out)


def _unescape(raw: str) -> str:
    if "\\" not in raw:
        return raw
    out, i = [], 0
    simple = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
    while i < len(raw):
        ch = raw[i]
        if ch != "\\" or i + 1 >= len(raw):
            out.append(ch)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in simple:
            out.append(simple[nxt])
            i += 2
        elif nxt == "x" and i + 2 < len(raw) and raw[i + 2] in "0123456789abcdefABCDEF":
            j = i + 2
            while j < len(raw) and j < i + 4 and raw[j] in "0123456789abcdefABCDEF":
                j += 1
            out.append(chr(int(raw[i + 2:j], 16)))
            i = j
        elif nxt in "01234567":
            j = i + 1
            while j < len(raw) and j < i + 4 and raw[j] in "01234567":
                j += 1
            out.append(chr(int(raw[i + 1:j], 8)))
            i = j
        else:
            out.append(nxt)
            i += 2
    return "".join(out)


_ESCAPES = {"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _escape(value: str, delimiter: str) -> str:
    """A value as Postgres writes it in COPY's text format (its control characters and the
    delimiter escaped with a backslash)."""
    return "".join(_ESCAPES.get(ch) or ("\\" + ch if ch == delimiter else ch) for ch in value)


def _csv_field(value: str, fmt: CopyFormat) -> str:
    escaped = value.replace(fmt.escape, fmt.escape * 2) if fmt.escape == fmt.quote else \
        value.replace(fmt.escape, fmt.escape * 2).replace(fmt.quote, fmt.escape + fmt.quote)  # fmt: skip
    return fmt.quote + escaped + fmt.quote
