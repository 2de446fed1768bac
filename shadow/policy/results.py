"""A masked session's server-to-client stream: which statement each row belongs to, and the
rows with their masked values replaced. No I/O.

The guard (shadow/policy/guard.py) tells :class:`Results` what each client message it lets
through will be answered with (:meth:`Results.expect`), in order; the server answers in
that order, so each RowDescription and DataRow is matched to its statement:

* a Query: each statement's result in turn (CommandComplete ends one; an ErrorResponse ends
  the Query; ReadyForQuery ends it);
* Parse, Bind, Describe, Execute, Close, Sync: ParseComplete, BindComplete, the
  description (ParameterDescription, RowDescription or NoData), the rows up to
  CommandComplete/PortalSuspended/EmptyQueryResponse, CloseComplete, ReadyForQuery; an
  ErrorResponse makes the server skip to the Sync, and so does this.

A row's columns are masked by the server's description of them (type, format): from the
RowDescription of a Query's statement or of a Describe of the portal, else from the Bind's
result formats and the types the catalog gives. A description whose column count differs
from what the analysis expected has every column masked: never a value unmasked because
the statement was not the one analysed.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Callable

from shadow.policy.copying import CopyFormat, CopyMasker
from shadow.policy.decision import UNKNOWN, Shown
from shadow.policy.masking import FULL, mask_data_row

__all__ = ["Results"]

_D, _T, _C, _E, _Z, _I, _s, _n, _1, _2, _3, _t, _H_, _d, _c, _N = (ord(c) for c in "DTCEZIsn123tHdcN")
_H = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD_TAIL = struct.Struct("!ihihih")  # table oid, attnum, type oid, typlen, typmod, format


class _Item:
    """One client message (or Query) the server will answer."""

    __slots__ = ("tag", "shown", "index", "columns", "portal", "kind", "copy")

    def __init__(self, tag: int, shown=None, portal: _Portal | None = None, kind: int = 0) -> None:
        self.tag = tag
        #: a Query: the Shown of each statement (None: nothing masked); Execute: the portal's
        self.shown = shown
        self.index = 0
        #: the columns being masked now: index -> (mask, type OID, binary)
        self.columns: dict | None = None
        #: Describe (of a portal), Execute: the portal as it was when the client sent it (a
        #: pipeline binds the unnamed portal again before the server has answered)
        self.portal = portal
        self.kind = kind
        #: a COPY TO STDOUT under way whose rows are masked
        self.copy: CopyMasker | None = None


class _Portal:
    __slots__ = ("shown", "formats", "columns")

    def __init__(self, shown: Shown | None, formats: tuple[int, ...]) -> None:
        self.shown = shown
        self.formats = formats
        self.columns: dict | None = None


#: a portal whose rows show as they are
_AS_IS = _Portal(None, ())
_PARSED, _BOUND, _DESCRIBED, _CLOSED, _SYNCED = (_Item(ord(c)) for c in "PBDCS")
_EXECUTED = _Item(ord("E"), portal=_AS_IS)


def columns_of(shown: Shown | None, described: list[tuple[int, int]] | None, formats=()) -> dict | None:
    """index -> (mask, type OID, binary) of the columns to mask; None when none is.
    ``described``: (type OID, format) per column, from a RowDescription (None: not seen;
    then ``formats`` are the Bind's result formats and the types the analysis found)."""
    if shown is None:
        return None
    if described is not None:
        if shown is UNKNOWN or len(described) != len(shown.masks):
            return {i: (FULL, oid, fmt == 1) for i, (oid, fmt) in enumerate(described)}
        return {i: (m, described[i][0], described[i][1] == 1) for i, m in enumerate(shown.masks) if m is not None}
    if shown is UNKNOWN:
        return {i: (FULL, 0, False) for i in range(1600)}  # (every column a row can have: NULL)
    out = {}
    for i, mask in enumerate(shown.masks):
        if mask is not None:
            fmt = formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0
            out[i] = (mask, shown.oids[i] if i < len(shown.oids) else 0, fmt == 1)
    return out


def copy_masker(shown: Shown | None, buf, start: int, end: int) -> CopyMasker | None:
    """The masker of a COPY TO STDOUT whose CopyOutResponse is ``buf[start:end]``."""
    if shown is None:
        return None
    try:
        binary = buf[start] == 1
        (count,) = _H.unpack_from(buf, start + 1)
    except (IndexError, struct.error):
        binary, count = False, 0
    fmt = shown.copy
    if shown is UNKNOWN or fmt is None or len(shown.masks) != count or (fmt.kind == "binary") != binary:
        # not the COPY analysed: every field NULL (the format as the server says)
        fmt = fmt if fmt is not None and (fmt.kind == "binary") == binary else \
            CopyFormat(kind="binary" if binary else "text")  # fmt: skip
        return CopyMasker(fmt, {i: (FULL, 0) for i in range(count)}, count)
    return CopyMasker(fmt, {i: (m, shown.oids[i]) for i, m in enumerate(shown.masks) if m is not None}, count)


def read_description(buf, start: int, end: int) -> list[tuple[int, int]] | None:
    """(type OID, format) of each column of a RowDescription; None if it cannot be read."""
    try:
        (count,) = _H.unpack_from(buf, start)
        pos = start + 2
        out = []
        for _ in range(count):
            pos = buf.index(0, pos, end) + 1
            _table, _attnum, oid, _len, _mod, fmt = _FIELD_TAIL.unpack_from(buf, pos)
            pos += _FIELD_TAIL.size
            out.append((oid, fmt))
        return out
    except (struct.error, ValueError):
        return None


class Results:
    """The server's answers of one masked session (see the module docstring)."""

    __slots__ = ("items", "statements", "portals", "masked_rows", "on_masked")

    def __init__(self, on_masked: Callable[[int], None] | None = None) -> None:
        self.items: deque[_Item] = deque()
        #: prepared statement name -> what its rows show
        self.statements: dict[bytes, Shown | None] = {}
        self.portals: dict[bytes, _Portal] = {}
        #: rows with a value masked; ``on_masked(n)`` is told of each batch's
        self.masked_rows = 0
        self.on_masked = on_masked

    # -- what the guard lets through

    def query(self, shown: tuple | None) -> None:
        """A Query whose statements show ``shown`` (None: not known, every row masked)."""
        self.items.append(_Item(ord("Q"), shown))

    # (the items of requests with nothing to mask are shared: only a tag is read of them)

    def parse(self, name: bytes, shown: Shown | None) -> None:
        self.statements[name] = shown
        self.items.append(_PARSED)

    def bind(self, portal: bytes, statement: bytes, formats: tuple[int, ...] | None) -> None:
        """(``formats`` None: not known; every row of the portal masked.)"""
        shown = self.statements.get(statement, UNKNOWN) if formats is not None else UNKNOWN
        self.portals[portal] = _Portal(shown, formats or ()) if shown is not None else _AS_IS
        self.items.append(_BOUND)

    def describe(self, kind: int, name: bytes) -> None:
        portal = self.portals.get(name) if kind == ord("P") else None
        self.items.append(_Item(ord("D"), portal=portal, kind=kind) if portal is not None and portal is not _AS_IS
                          else _DESCRIBED)  # fmt: skip

    def execute(self, portal: bytes) -> None:
        found = self.portals.get(portal)
        if found is _AS_IS:
            self.items.append(_EXECUTED)
        else:
            self.items.append(_Item(ord("E"), portal=found or _Portal(UNKNOWN, (1,))))

    def close(self, kind: int, name: bytes) -> None:
        (self.portals if kind == ord("P") else self.statements).pop(name, None)
        self.items.append(_CLOSED)

    def sync(self) -> None:
        self.items.append(_SYNCED)

    # -- the server's answers

    def filter(self, buf: bytes, frames: list) -> tuple[bytes, list, bool]:
        """``frames`` of ``buf`` with masked rows replaced; (buf, frames, changed)."""
        out: list[bytes] | None = None
        done = 0
        items = self.items
        rows_before = self.masked_rows
        for tag, start, end in frames:
            item = items[0] if items else None
            if tag == _d:
                if item is None or item.copy is not None:
                    if out is None:
                        out = []
                    data = item.copy.row(bytes(buf[start:end])) if item is not None else b""
                    out.append(bytes(buf[done:start - 5]))
                    out.append(b"d" + _I32.pack(len(data) + 4) + data)
                    done = end
                    self.masked_rows += 1
                continue
            if tag == _D:
                columns = None
                if item is None:  # (a row of no request the guard saw: every value masked)
                    columns = columns_of(UNKNOWN, None)
                else:
                    if item.tag == ord("Q"):
                        columns = item.columns
                    elif item.tag == ord("E"):
                        portal = item.portal
                        if portal.columns is None:
                            portal.columns = columns_of(portal.shown, None, portal.formats)
                        columns = portal.columns
                if columns:
                    if out is None:
                        out = []
                    out.append(bytes(buf[done:start - 5]))
                    out.append(mask_data_row(buf, start, end, columns))
                    done = end
                    self.masked_rows += 1
                continue
            if (tag == _E or tag == _N) and _ROW_DETAIL.search(buf, start, end) is not None:
                if out is None:  # (a constraint's DETAIL shows the row, masked columns and all)
                    out = []
                body = _scrubbed(bytes(buf[start:end]))
                out.append(bytes(buf[done:start - 5]))
                out.append(bytes((tag,)) + _I32.pack(len(body) + 4) + body)
                done = end
            if item is None:
                continue
            if tag == _H_:
                if item.tag == ord("Q"):
                    shown = _statement_shown(item)
                elif item.tag == ord("E"):
                    shown = item.portal.shown
                else:
                    shown = None
                item.copy = copy_masker(shown, buf, start, end)
            elif tag == _c:
                item.copy = None
            elif tag == _T:
                described = read_description(buf, start, end)
                if item.tag == ord("Q"):
                    shown = _statement_shown(item)
                    item.columns = columns_of(shown, described) if described is not None else \
                        columns_of(UNKNOWN, None)  # fmt: skip
                elif item.tag == ord("D"):
                    if item.portal is not None:
                        portal = item.portal
                        portal.columns = columns_of(portal.shown, described, portal.formats) \
                            if described is not None else columns_of(UNKNOWN, None)  # fmt: skip
                    items.popleft()
            elif tag == _C:
                if item.tag == ord("Q"):
                    item.index += 1
                    item.columns = None
                elif item.tag == ord("E"):
                    items.popleft()
            elif tag == _E:
                if item.tag == ord("Q"):
                    item.index = len(item.shown) if item.shown else 1 << 30
                    item.columns = None
                else:
                    while items and items[0].tag not in (ord("S"), ord("Q")):
                        items.popleft()
            elif tag == _Z:
                while items:
                    if items.popleft().tag in (ord("S"), ord("Q")):
                        break
            elif tag == _1 or tag == _2 or tag == _3 or tag == _n or tag == _s or tag == _I:
                if item.tag != ord("Q"):
                    items.popleft()
        if out is None:
            return buf, frames, False
        if self.on_masked is not None:
            self.on_masked(self.masked_rows - rows_before)
        out.append(bytes(buf[done:]))
        buf, frames = _reframe(b"".join(out), len(frames))
        return buf, frames, True


#: a DETAIL that shows a row's or a key's values ("Failing row contains (...)", "Key (a)=(...)
#: already exists", ...)
_ROW_DETAIL = re.compile(rb"\0D(?:Failing row contains|Key \(|Key [^\0]*conflicts|Partition key of the failing row)")
_HIDDEN = b"DThe row's values are not shown: the client's class masks columns (connmgr policy)."


def _scrubbed(body: bytes) -> bytes:
    """An ErrorResponse/NoticeResponse body with its DETAIL field replaced."""
    fields = body.rstrip(b"\0").split(b"\0")
    return b"\0".join(_HIDDEN if f[:1] == b"D" else f for f in fields) + b"\0\0"


def _statement_shown(item: _Item) -> Shown | None:
    if item.shown is None:
        return UNKNOWN
    return item.shown[item.index] if item.index < len(item.shown) else None


def _reframe(buf: bytes, count: int) -> tuple[bytes, list]:
    frames = []
    pos = 0
    for _ in range(count):
        (length,) = _I32.unpack_from(buf, pos + 1)
        frames.append((buf[pos], pos + 5, pos + 1 + length))
        pos += 1 + length
    return buf, frames
