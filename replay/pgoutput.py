"""Logical replication stream codec (pgoutput) and the poster-queue transaction assembler.

Sans-IO: bytes in, records out. :mod:`connmgr.pg.replication` does the talking to Postgres.

How it works
------------
After ``START_REPLICATION SLOT s LOGICAL ...`` the walsender answers CopyBothResponse and
from then on both sides exchange CopyData messages. Their payloads are the *replication*
messages (Postgres docs, "Streaming Replication Protocol"):

* ``'w'`` XLogData -- ``wal_start``, ``wal_end``, ``send_time`` and one pgoutput message.
  For a logical slot ``wal_start`` is the LSN the output plugin was writing for: the
  change's own record for a change, the commit record's *end* for a Commit, the message
  record for a logical decoding message. (The walsender puts the same value in ``wal_end``.)
* ``'k'`` primary keepalive -- the walsender's current send position and whether it wants
  a reply now (it asks before ``wal_sender_timeout`` would cut us off).
* ``'r'`` standby status update, sent by us -- written / flushed / applied positions. For a
  logical slot, *flushed* becomes the slot's ``confirmed_flush_lsn``: "every transaction
  committing before this LSN has been processed; do not send it again".

:func:`decode_replication` splits a CopyData payload into :class:`XLogData` or
:class:`PrimaryKeepalive`; :func:`decode_pgoutput` decodes the pgoutput message inside
XLogData (docs, "Logical Replication Message Formats"; protocol version 1, and version 2's
streaming messages: inside a stream block -- StreamStart .. StreamStop -- Relation, Type,
Insert, Update, Delete, Truncate and Message carry the xid of the (sub)transaction first).
Both decoders are strict and bounded: every read is checked against the body, the body
must be consumed exactly, and any fault is a :class:`PgoutputError` (a ``ValueError`` and a
:class:`~shadow.errors.RemoteProtocolError`, SQLSTATE 08P01) naming the message and the
field. An unknown message type decodes to :class:`UnknownMessage` rather than failing.

:class:`TransactionAssembler` turns the XLogData sequence into poster records:

====================  ===========================================================  =========
state                 accepts                                                      emits
====================  ===========================================================  =========
IDLE                  Begin (-> IN_TX), StreamStart (-> IN_STREAM), StreamCommit,  records
                      StreamAbort, non-transactional Message, Relation, Type
IN_TX                 Origin, Relation, Type, Insert, Update, Delete, Truncate,
                      Message (either kind), Commit (-> IDLE)                      record
IN_STREAM             Relation, Type, Insert, Update, Delete, Truncate, Message,
                      StreamStop (-> IDLE)
====================  ===========================================================  =========

Anything else is a :class:`PgoutputError` naming the state and the message. Streamed
transactions (proto 2, ``streaming 'on'``) are built up across stream blocks, keyed by the
top-level xid of their StreamStart, and emitted at StreamCommit; a StreamAbort of the whole
transaction discards it, one of a subtransaction rewinds the builder to where that
subtransaction's first change was (the walsender sends the abort as soon as it is decoded,
so everything streamed after that point belongs to the aborted subtransaction or its
children -- the same rule Postgres's own apply worker uses).

The assembler reads of a change only what the poster queue needs -- its type, xid and
relation oid -- and never copies row data: a transaction's record costs the same whatever
its rows hold. Memory per transaction is bounded: at most ``max_change_lsns`` change LSNs
and ``max_messages`` transactional messages of at most ``max_message_bytes`` in total are
kept; beyond that ``n_changes`` still counts and the record says ``truncated=True``. (A
streamed transaction also remembers one small checkpoint per subtransaction that made
changes, as Postgres's apply worker does.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from itertools import islice
from struct import Struct
from typing import ClassVar, Literal

from replay.markers import MARKER_PREFIX, MARKER_TABLE, marker_content
from shadow.errors import RemoteProtocolError
from shadow.messages import CopyData, Reader

__all__ = [
    "PG_EPOCH_UNIX_SECONDS",
    "PgoutputError",
    # replication protocol
    "XLogData",
    "PrimaryKeepalive",
    "decode_replication",
    "standby_status_update",
    "pg_timestamp_from_unix",
    "unix_from_pg_timestamp",
    # pgoutput
    "UNCHANGED",
    "Unchanged",
    "Binary",
    "ColumnValue",
    "TupleData",
    "Column",
    "Begin",
    "Commit",
    "Origin",
    "Relation",
    "Type",
    "Insert",
    "Update",
    "Delete",
    "Truncate",
    "Message",
    "StreamStart",
    "StreamStop",
    "StreamCommit",
    "StreamAbort",
    "UnknownMessage",
    "PgoutputMessage",
    "decode_pgoutput",
    # assembler
    "PosterRecord",
    "NonTransactionalMessage",
    "TransactionAssembler",
]


class PgoutputError(RemoteProtocolError, ValueError):
    """The replication stream holds something that is not the protocol (08P01), or a
    message that is illegal where it appears."""


# ----------------------------------------------------------------------- wire primitives

_U64 = Struct("!Q")
_I64 = Struct("!q")
_STATUS = Struct("!cQQQqB")
_XLOG_HEADER = Struct("!QQq")


class _Reader(Reader):
    """:class:`shadow.messages.Reader` plus 64-bit fields, raising :class:`PgoutputError`."""

    __slots__ = ()

    def error(self, problem: str) -> PgoutputError:
        return PgoutputError(f"malformed {self._what}: {problem}")

    def read_uint64(self, field: str) -> int:
        return _U64.unpack_from(self._buf, self._advance(8, field))[0]

    def read_int64(self, field: str) -> int:
        return _I64.unpack_from(self._buf, self._advance(8, field))[0]


# ------------------------------------------------------------------ replication protocol

#: 2000-01-01 00:00:00 UTC, the zero of Postgres timestamps, in Unix seconds.
PG_EPOCH_UNIX_SECONDS = 946_684_800
_PG_EPOCH_US = PG_EPOCH_UNIX_SECONDS * 1_000_000


def pg_timestamp_from_unix(seconds: float) -> int:
    """Return Unix time ``seconds`` as a Postgres TimestampTz: microseconds since
    2000-01-01 UTC."""
    return round(seconds * 1_000_000) - _PG_EPOCH_US


def unix_from_pg_timestamp(us: int) -> float:
    """Return a Postgres TimestampTz (microseconds since 2000-01-01) as Unix seconds."""
    return (us + _PG_EPOCH_US) / 1_000_000


@dataclass(frozen=True, slots=True)
class XLogData:
    """``'w'``: one pgoutput message and the WAL position it was written for."""

    wal_start: int
    wal_end: int
    send_time_us: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """``'k'``: the walsender's position; ``reply_requested`` asks for a status update now."""

    wal_end: int
    send_time_us: int
    reply_requested: bool


def decode_replication(body: bytes | bytearray | memoryview) -> XLogData | PrimaryKeepalive:
    """Decode the payload of a CopyData the walsender sent (the bytes after the CopyData
    length word). Returns :class:`XLogData` or :class:`PrimaryKeepalive`; raises
    :class:`PgoutputError` if it is empty, of another type, or malformed."""
    if not body:
        raise PgoutputError("malformed replication message: empty CopyData")
    kind = body[0]
    if kind == 0x77:  # 'w'
        if len(body) < _XLOG_HEADER.size + 1:  # let the Reader say which field is cut
            r = _Reader(body, "XLogData message")
            r.read_byte("type")
            r.read_uint64("WAL start")
            r.read_uint64("WAL end")
            r.read_int64("send time")
        start, end, sent = _XLOG_HEADER.unpack_from(body, 1)
        return XLogData(start, end, sent, bytes(body[_XLOG_HEADER.size + 1 :]))
    if kind == 0x6B:  # 'k'
        r = _Reader(body, "primary keepalive message")
        r.read_byte("type")
        end = r.read_uint64("WAL end")
        sent = r.read_int64("send time")
        reply = r.read_byte("reply-requested flag")
        if reply > 1:
            raise r.error(f"reply-requested flag is {reply}, not 0 or 1")
        r.finish()
        return PrimaryKeepalive(end, sent, bool(reply))
    raise PgoutputError(f"unexpected replication message type {_show(kind)} (expected 'w' or 'k')")


def standby_status_update(
    written: int, flushed: int, applied: int, now_us: int, reply_requested: bool = False
) -> bytes:
    """Return the complete CopyData message (``'d'``, length, ``'r'`` payload) reporting
    our positions; ``now_us`` is a Postgres timestamp (:func:`pg_timestamp_from_unix`).
    For a logical slot ``flushed`` becomes its ``confirmed_flush_lsn``; 0 means "unknown"
    and changes nothing. Raises ``ValueError`` for a position outside [0, 2**64)."""
    for name, lsn in (("written", written), ("flushed", flushed), ("applied", applied)):
        if not 0 <= lsn < 1 << 64:
            raise ValueError(f"{name} position {lsn!r} is not an LSN")
    payload = _STATUS.pack(b"r", written, flushed, applied, now_us, 1 if reply_requested else 0)
    return CopyData(payload).encode()


# ------------------------------------------------------------------------ pgoutput values


class Unchanged:
    """A TOASTed column value the update did not change and pgoutput did not send (``'u'``).
    Use the singleton :data:`UNCHANGED`."""

    __slots__ = ()
    _instance: ClassVar[Unchanged | None] = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED = Unchanged()


@dataclass(frozen=True, slots=True)
class Binary:
    """A column value in binary format (``'b'``, only with the ``binary 'true'`` option)."""

    data: bytes


#: ``None`` (SQL NULL, ``'n'``), :data:`UNCHANGED` (``'u'``), ``bytes`` (the text
#: representation, ``'t'``) or :class:`Binary` (``'b'``).
ColumnValue = None | Unchanged | bytes | Binary
TupleData = tuple[ColumnValue, ...]


@dataclass(frozen=True, slots=True)
class Column:
    """A column of a :class:`Relation`; ``flags`` bit 1 = part of the replica identity key."""

    flags: int
    name: str
    type_oid: int
    type_mod: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


# ---------------------------------------------------------------------- pgoutput messages
# ``xid`` on the change-like messages is the (sub)transaction id carried inside a stream
# block (protocol 2); outside one it is None.


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # the LSN of the commit record
    commit_time_us: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int  # the end of the commit record: what to confirm once processed
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int  # the commit LSN on the origin server
    name: str


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str  # "" means pg_catalog
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]
    xid: int | None = None

    @property
    def qualified_name(self) -> str:
        """``namespace.name`` (``pg_catalog`` for the empty namespace), unquoted."""
        return f"{self.namespace or 'pg_catalog'}.{self.name}"


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: TupleData
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Update:
    """``old`` is the old key (``old_kind == 'K'``), the whole old row (``'O'``, replica
    identity full) or None (the key did not change)."""

    relation_oid: int
    new: TupleData
    old: TupleData | None = None
    old_kind: Literal["K", "O"] | None = None
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old: TupleData
    old_kind: Literal["K", "O"]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Truncate:
    """``options`` bit 1 = CASCADE, bit 2 = RESTART IDENTITY."""

    options: int
    relation_oids: tuple[int, ...]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """A logical decoding message (``pg_logical_emit_message``)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """``subxid == xid`` aborts the whole streamed transaction. Protocol 4 adds the abort
    LSN and time (None before)."""

    xid: int
    subxid: int
    abort_lsn: int | None = None
    abort_time_us: int | None = None


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A pgoutput message type this codec does not know (two-phase messages of protocol 3,
    anything newer): kept, not rejected."""

    tag: int
    body: bytes


PgoutputMessage = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
    | StreamStart | StreamStop | StreamCommit | StreamAbort | UnknownMessage
)  # fmt: skip


_NAMES = {
    ord("B"): "Begin", ord("C"): "Commit", ord("O"): "Origin", ord("R"): "Relation",
    ord("Y"): "Type", ord("I"): "Insert", ord("U"): "Update", ord("D"): "Delete",
    ord("T"): "Truncate", ord("M"): "Message", ord("S"): "Stream Start",
    ord("E"): "Stream Stop", ord("c"): "Stream Commit", ord("A"): "Stream Abort",
}  # fmt: skip
# messages that carry an xid first when they appear inside a stream block
_XID_IN_STREAM = frozenset(b"RYIUDTM")


def _show(b: int) -> str:
    return repr(chr(b)) if 32 <= b < 127 else f"0x{b:02x}"


def _read_tuple(r: _Reader, what: str) -> TupleData:
    n = r.read_int16(f"column count of {what}")
    if n < 0:
        raise r.error(f"column count of {what} is {n}")
    values: list[ColumnValue] = []
    for i in range(1, n + 1):
        kind = r.read_byte(f"kind of column {i} of {what}")
        if kind == 0x6E:  # 'n'
            values.append(None)
        elif kind == 0x75:  # 'u'
            values.append(UNCHANGED)
        elif kind == 0x74 or kind == 0x62:  # 't', 'b'
            length = r.read_int32(f"length of column {i} of {what}")
            if length < 0:
                raise r.error(f"length of column {i} of {what} is {length}")
            data = r.read_bytes(length, f"value of column {i} of {what}")
            values.append(data if kind == 0x74 else Binary(data))
        else:
            raise r.error(f"column {i} of {what} has kind {_show(kind)} (not 'n', 'u', 't' or 'b')")
    return tuple(values)


def _read_bool(r: _Reader, field: str) -> bool:
    v = r.read_byte(field)
    if v > 1:
        raise r.error(f"{field} is {v}, not 0 or 1")
    return bool(v)


def _dec_begin(r: _Reader, xid: int | None) -> Begin:
    return Begin(r.read_uint64("final LSN"), r.read_int64("commit time"), r.read_uint32("xid"))


def _dec_commit(r: _Reader, xid: int | None) -> Commit:
    return Commit(
        r.read_byte("flags"), r.read_uint64("commit LSN"), r.read_uint64("end LSN"),
        r.read_int64("commit time"),
    )  # fmt: skip


def _dec_origin(r: _Reader, xid: int | None) -> Origin:
    return Origin(r.read_uint64("origin LSN"), r.read_cstring("origin name"))


def _dec_relation(r: _Reader, xid: int | None) -> Relation:
    oid = r.read_uint32("relation oid")
    namespace = r.read_cstring("namespace")
    name = r.read_cstring("relation name")
    ident = r.read_byte("replica identity")
    if ident not in b"dnfi":
        raise r.error(f"replica identity is {_show(ident)} (not 'd', 'n', 'f' or 'i')")
    n = r.read_int16("column count")
    if n < 0:
        raise r.error(f"column count is {n}")
    columns = []
    for i in range(1, n + 1):
        columns.append(Column(
            r.read_byte(f"flags of column {i}"), r.read_cstring(f"name of column {i}"),
            r.read_uint32(f"type oid of column {i}"), r.read_int32(f"type modifier of column {i}"),
        ))  # fmt: skip
    return Relation(oid, namespace, name, chr(ident), tuple(columns), xid)


def _dec_type(r: _Reader, xid: int | None) -> Type:
    return Type(r.read_uint32("type oid"), r.read_cstring("namespace"), r.read_cstring("type name"), xid)


def _dec_insert(r: _Reader, xid: int | None) -> Insert:
    oid = r.read_uint32("relation oid")
    return Insert(oid, _insert_tuple(r), xid)


def _insert_tuple(r: _Reader) -> TupleData:
    """An Insert's new tuple, the reader past the relation oid."""
    marker = r.read_byte("new tuple marker")
    if marker != 0x4E:  # 'N'
        raise r.error(f"new tuple marker is {_show(marker)}, not 'N'")
    return _read_tuple(r, "the new tuple")


def _dec_update(r: _Reader, xid: int | None) -> Update:
    oid = r.read_uint32("relation oid")
    new, old, old_kind = _update_tuples(r)
    return Update(oid, new, old, old_kind, xid)


def _update_tuples(r: _Reader) -> tuple[TupleData, TupleData | None, Literal["K", "O"] | None]:
    """An Update's (new tuple, old tuple or key, "K"/"O"/None), the reader past the
    relation oid."""
    marker = r.read_byte("tuple marker")
    old: TupleData | None = None
    old_kind: Literal["K", "O"] | None = None
    if marker == 0x4B or marker == 0x4F:  # 'K', 'O'
        old_kind = "K" if marker == 0x4B else "O"
        old = _read_tuple(r, "the old tuple")
        marker = r.read_byte("new tuple marker")
        if marker != 0x4E:
            raise r.error(f"new tuple marker is {_show(marker)}, not 'N'")
    elif marker != 0x4E:
        raise r.error(f"tuple marker is {_show(marker)} (not 'K', 'O' or 'N')")
    return _read_tuple(r, "the new tuple"), old, old_kind


def _dec_delete(r: _Reader, xid: int | None) -> Delete:
    oid = r.read_uint32("relation oid")
    marker = r.read_byte("old tuple marker")
    if marker != 0x4B and marker != 0x4F:
        raise r.error(f"old tuple marker is {_show(marker)} (not 'K' or 'O')")
    return Delete(oid, _read_tuple(r, "the old tuple"), "K" if marker == 0x4B else "O", xid)


def _dec_truncate(r: _Reader, xid: int | None) -> Truncate:
    n = r.read_int32("relation count")
    if n < 0:
        raise r.error(f"relation count is {n}")
    options = r.read_byte("options")
    if n * 4 != r.remaining:
        raise r.error(f"relation count is {n} but {r.remaining} bytes of oids follow")
    return Truncate(options, tuple(r.read_uint32("relation oid") for _ in range(n)), xid)


def _dec_message(r: _Reader, xid: int | None) -> Message:
    flags = r.read_byte("flags")
    if flags > 1:
        raise r.error(f"flags are {flags}, not 0 or 1")
    lsn = r.read_uint64("message LSN")
    prefix = r.read_cstring("prefix")
    length = r.read_int32("content length")
    if length < 0:
        raise r.error(f"content length is {length}")
    return Message(bool(flags), lsn, prefix, r.read_bytes(length, "content"), xid)


def _dec_stream_start(r: _Reader, xid: int | None) -> StreamStart:
    return StreamStart(r.read_uint32("xid"), _read_bool(r, "first-segment flag"))


def _dec_stream_stop(r: _Reader, xid: int | None) -> StreamStop:
    return _STREAM_STOP


def _dec_stream_commit(r: _Reader, xid: int | None) -> StreamCommit:
    return StreamCommit(
        r.read_uint32("xid"), r.read_byte("flags"), r.read_uint64("commit LSN"),
        r.read_uint64("end LSN"), r.read_int64("commit time"),
    )  # fmt: skip


def _dec_stream_abort(r: _Reader, xid: int | None) -> StreamAbort:
    top, sub = r.read_uint32("xid"), r.read_uint32("subtransaction xid")
    if r.remaining == 0:
        return StreamAbort(top, sub)
    return StreamAbort(top, sub, r.read_uint64("abort LSN"), r.read_int64("abort time"))


_STREAM_STOP = StreamStop()
_DECODERS = {
    ord("B"): _dec_begin, ord("C"): _dec_commit, ord("O"): _dec_origin,
    ord("R"): _dec_relation, ord("Y"): _dec_type, ord("I"): _dec_insert,
    ord("U"): _dec_update, ord("D"): _dec_delete, ord("T"): _dec_truncate,
    ord("M"): _dec_message, ord("S"): _dec_stream_start, ord("E"): _dec_stream_stop,
    ord("c"): _dec_stream_commit, ord("A"): _dec_stream_abort,
}  # fmt: skip


def decode_pgoutput(data: bytes | bytearray | memoryview, *, in_stream: bool = False) -> PgoutputMessage:
    """Decode one pgoutput message (the ``data`` of an :class:`XLogData`).

    ``in_stream``: the message arrived between StreamStart and StreamStop, so the
    change-like messages carry an xid first. Returns the message record, or
    :class:`UnknownMessage` for a type this codec does not know. Raises
    :class:`PgoutputError` if the message is empty, truncated, has trailing bytes or an
    illegal value.
    """
    if not data:
        raise PgoutputError("malformed pgoutput message: empty")
    tag = data[0]
    decoder = _DECODERS.get(tag)
    if decoder is None:
        return UnknownMessage(tag, bytes(data[1:]))
    r = _Reader(data, f"pgoutput {_NAMES[tag]} message")
    r.read_byte("type")
    xid = r.read_uint32("xid") if in_stream and tag in _XID_IN_STREAM else None
    msg = decoder(r, xid)
    r.finish()
    return msg


# -------------------------------------------------------------------------- the assembler


@dataclass(frozen=True, slots=True)
class PosterRecord:
    """One committed transaction as the poster queue sees it.

    ``first_lsn`` is the ``wal_start`` of its Begin (or first StreamStart), ``commit_lsn``
    the commit record, ``end_lsn`` its end (what to :meth:`confirm
    <connmgr.pg.replication.ReplicationStream.confirm>` once processed). ``change_lsns`` are the
    ``wal_start`` of each Insert/Update/Delete/Truncate, at most the assembler's cap;
    ``n_changes`` counts them all. ``relations`` are the ``namespace.name`` of every table
    changed, in order of first change. ``messages`` are the ``(prefix, content)`` of the
    transactional logical decoding messages. ``truncated`` says some change LSNs or
    messages were not kept (the transaction exceeded a cap). ``origin`` names the
    replication origin the transaction came from, if any; ``streamed`` that it arrived in
    stream blocks (protocol 2).
    """

    xid: int
    first_lsn: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int
    change_lsns: tuple[int, ...]
    n_changes: int
    relations: tuple[str, ...]
    messages: tuple[tuple[str, bytes], ...]
    origin: str | None = None
    truncated: bool = False
    streamed: bool = False

    @property
    def confirm_lsn(self) -> int:
        """The position to confirm after processing: ``end_lsn``."""
        return self.end_lsn


@dataclass(frozen=True, slots=True)
class NonTransactionalMessage:
    """A logical decoding message emitted outside transaction semantics
    (``pg_logical_emit_message(false, ...)``): it arrives when written, committed or not."""

    lsn: int
    prefix: str
    content: bytes

    @property
    def confirm_lsn(self) -> int:
        """``lsn + 1``: the message's record starts at ``lsn``, and the walsender resends
        every message whose record starts at or after the confirmed position."""
        return self.lsn + 1


class _State(enum.Enum):
    IDLE = "IDLE"
    IN_TX = "IN_TX"
    IN_STREAM = "IN_STREAM"


class _Builder:
    """A transaction being assembled (mutable, private)."""

    __slots__ = (
        "xid", "first_lsn", "commit_lsn", "commit_time_us", "origin", "n_changes",
        "change_lsns", "relations", "messages", "message_bytes", "truncated", "subxacts",
    )  # fmt: skip

    def __init__(self, xid: int, first_lsn: int, commit_lsn: int = 0, commit_time_us: int = 0) -> None:
        self.xid = xid
        self.first_lsn = first_lsn
        self.commit_lsn = commit_lsn
        self.commit_time_us = commit_time_us
        self.origin: str | None = None
        self.n_changes = 0
        self.change_lsns: list[int] = []
        self.relations: dict[str, None] = {}  # an ordered set
        self.messages: list[tuple[str, bytes]] = []
        self.message_bytes = 0
        self.truncated = False
        # streamed only: subxid -> counters at its first change (see _checkpoint)
        self.subxacts: dict[int, tuple[int, int, int, int, int, bool]] = {}

    def checkpoint(self) -> tuple[int, int, int, int, int, bool]:
        return (self.n_changes, len(self.change_lsns), len(self.relations), len(self.messages),
                self.message_bytes, self.truncated)  # fmt: skip

    def rewind(self, cp: tuple[int, int, int, int, int, bool]) -> None:
        self.n_changes, n_lsns, n_rels, n_msgs, self.message_bytes, self.truncated = cp
        del self.change_lsns[n_lsns:]
        if len(self.relations) > n_rels:
            self.relations = dict.fromkeys(islice(self.relations, n_rels))
        del self.messages[n_msgs:]

    def record(self, commit_lsn: int, end_lsn: int, commit_time_us: int, streamed: bool) -> PosterRecord:
        return PosterRecord(
            xid=self.xid, first_lsn=self.first_lsn, commit_lsn=commit_lsn, end_lsn=end_lsn,
            commit_time_us=commit_time_us, change_lsns=tuple(self.change_lsns),
            n_changes=self.n_changes, relations=tuple(self.relations),
            messages=tuple(self.messages), origin=self.origin, truncated=self.truncated,
            streamed=streamed,
        )  # fmt: skip


# which message classes each state accepts (besides Relation/Type, accepted everywhere,
# and non-transactional Message, likewise: it is self-contained)
_ACCEPTS: dict[_State, tuple[type, ...]] = {
    _State.IDLE: (Begin, StreamStart, StreamCommit, StreamAbort),
    _State.IN_TX: (Origin, Insert, Update, Delete, Truncate, Message, Commit),
    _State.IN_STREAM: (Insert, Update, Delete, Truncate, Message, StreamStop),
}


class TransactionAssembler:
    """Groups the pgoutput messages of a replication stream into :class:`PosterRecord`
    (one per committed transaction) and :class:`NonTransactionalMessage`. See the module
    docstring for the state table and the memory bounds."""

    __slots__ = (
        "max_change_lsns", "max_messages", "max_message_bytes", "relations", "types",
        "_state", "_tx", "_streams", "_stream_xid", "_confirmed_lsn",
    )  # fmt: skip

    def __init__(
        self,
        *,
        max_change_lsns: int = 10_000,
        max_messages: int = 10_000,
        max_message_bytes: int = 16 << 20,
    ) -> None:
        self.max_change_lsns = max_change_lsns
        self.max_messages = max_messages
        self.max_message_bytes = max_message_bytes
        #: the relation cache: oid -> the latest Relation message for it
        self.relations: dict[int, Relation] = {}
        #: oid -> the latest Type message for it
        self.types: dict[int, Type] = {}
        self._state = _State.IDLE
        self._tx: _Builder | None = None
        self._streams: dict[int, _Builder] = {}  # streamed transactions not yet ended
        self._stream_xid = 0
        self._confirmed_lsn = 0

    @property
    def confirmed_lsn(self) -> int:
        """``confirm_lsn`` of the last record emitted (0 before the first): everything
        before it has been handed out, so it may be reported as flushed once processed."""
        return self._confirmed_lsn

    @property
    def in_transaction(self) -> bool:
        """True while a transaction or stream block is open, or a streamed transaction
        awaits its StreamCommit/StreamAbort."""
        return self._state is not _State.IDLE or bool(self._streams)

    @property
    def state(self) -> str:
        return self._state.value

    def feed(self, xlog: XLogData) -> list[PosterRecord | NonTransactionalMessage]:
        """Take the next XLogData of the stream; return the records it completes (zero
        or one). Raises :class:`PgoutputError` on a malformed message or one that is
        illegal in the current state (the assembler is then unusable: reconnect)."""
        data = xlog.data
        if not data:
            raise PgoutputError("malformed pgoutput message: empty XLogData")
        tag = data[0]
        state = self._state
        if tag in b"IUDT":  # the hot path: read no more than needed
            self._change(tag, data, xlog.wal_start, state)
            return []
        msg = decode_pgoutput(data, in_stream=state is _State.IN_STREAM)
        if isinstance(msg, Relation):
            self.relations[msg.oid] = msg
            return []
        if isinstance(msg, Type):
            self.types[msg.oid] = msg
            return []
        if isinstance(msg, Message) and not msg.transactional:
            out = NonTransactionalMessage(msg.lsn, msg.prefix, msg.content)
            self._confirmed_lsn = max(self._confirmed_lsn, out.confirm_lsn)
            return [out]
        if not isinstance(msg, _ACCEPTS[state]):
            raise self._illegal(msg)

        if isinstance(msg, Begin):
            self._tx = _Builder(msg.xid, xlog.wal_start, msg.final_lsn, msg.commit_time_us)
            self._state = _State.IN_TX
            return []
        if isinstance(msg, Commit):
            tx = self._tx
            assert tx is not None
            if msg.commit_lsn != tx.commit_lsn:
                raise PgoutputError(
                    f"Commit of transaction {tx.xid} at LSN {msg.commit_lsn:#x}, but its"
                    f" Begin announced {tx.commit_lsn:#x}"
                )
            self._tx = None
            self._state = _State.IDLE
            return [self._emit(tx.record(msg.commit_lsn, msg.end_lsn, msg.commit_time_us, False))]
        if isinstance(msg, Message):  # transactional
            self._add_message(self._current(msg.xid), msg.prefix, msg.content)
            return []
        if isinstance(msg, Origin):
            assert self._tx is not None
            self._tx.origin = msg.name
            return []
        if isinstance(msg, StreamStart):
            if msg.xid not in self._streams:
                self._streams[msg.xid] = _Builder(msg.xid, xlog.wal_start)
            self._stream_xid = msg.xid
            self._state = _State.IN_STREAM
            return []
        if isinstance(msg, StreamStop):
            self._state = _State.IDLE
            return []
        if isinstance(msg, StreamCommit):
            tx = self._streams.pop(msg.xid, None)
            if tx is None:
                raise PgoutputError(f"Stream Commit of transaction {msg.xid}, which never streamed")
            return [self._emit(tx.record(msg.commit_lsn, msg.end_lsn, msg.commit_time_us, True))]
        if isinstance(msg, StreamAbort):
            tx = self._streams.get(msg.xid)
            if tx is None:
                return []  # nothing of it was kept; nothing to undo
            if msg.subxid == msg.xid:
                del self._streams[msg.xid]
            elif msg.subxid in tx.subxacts:
                # rewind to the subtransaction's first change; later subtransactions'
                # checkpoints go too (they were its children: see the module docstring)
                subs = list(tx.subxacts)
                tx.rewind(tx.subxacts[msg.subxid])
                for sub in subs[subs.index(msg.subxid) :]:
                    del tx.subxacts[sub]
            return []
        raise self._illegal(msg)  # pragma: no cover - _ACCEPTS covers every class above

    # ------------------------------------------------------------------- internals

    def _illegal(self, msg: object) -> PgoutputError:
        name = type(msg).__name__
        if isinstance(msg, UnknownMessage):
            name = f"message of unknown type {_show(msg.tag)}"
        return PgoutputError(f"unexpected pgoutput {name} in state {self._state.value}")

    def _emit(self, out: PosterRecord) -> PosterRecord:
        self._confirmed_lsn = max(self._confirmed_lsn, out.confirm_lsn)
        return out

    def _current(self, xid: int | None) -> _Builder:
        """The builder a change belongs to; in a stream block, note the subtransaction's
        first change."""
        if self._state is _State.IN_TX:
            assert self._tx is not None
            return self._tx
        tx = self._streams[self._stream_xid]
        if xid is not None and xid != tx.xid and xid not in tx.subxacts:
            tx.subxacts[xid] = tx.checkpoint()
        return tx

    def _change(self, tag: int, data: bytes, wal_start: int, state: _State) -> None:
        what = _NAMES[tag]
        if state is _State.IDLE:
            raise PgoutputError(f"unexpected pgoutput {what} in state IDLE")
        r = _Reader(data, f"pgoutput {what} message")
        r.read_byte("type")
        xid = r.read_uint32("xid") if state is _State.IN_STREAM else None
        if tag == 0x54:  # 'T': Truncate touches several relations; it is short, decode it
            oids = _dec_truncate(r, xid).relation_oids
        else:
            oids = (r.read_uint32("relation oid"),)
        tx = self._current(xid)
        for oid in oids:
            rel = self.relations.get(oid)
            if rel is None:
                raise PgoutputError(f"{what} for relation {oid}, which no Relation message described")
            name = rel.qualified_name
            tx.relations[name] = None
            if name == MARKER_TABLE and (tag == 0x49 or tag == 0x55):
                self._marker_row(tx, rel, r, tag)
        tx.n_changes += 1
        if len(tx.change_lsns) < self.max_change_lsns:
            tx.change_lsns.append(wal_start)
        else:
            tx.truncated = True

    def _marker_row(self, tx: _Builder, rel: Relation, r: _Reader, tag: int) -> None:
        """A purge marker is a row of ``connmgr.markers`` (see :mod:`replay.markers`):
        report it as the message ``("connmgr", b"origin:session:seq")``. ``r``: the
        change's reader, past the relation oid (one per commit: read once, no message
        object)."""
        new = _insert_tuple(r) if tag == 0x49 else _update_tuples(r)[0]
        r.finish()
        names = [c.name for c in rel.columns]
        try:
            row = dict(zip(names, new, strict=True))
            values = [int(row[k]) for k in ("origin", "session", "seq")]  # type: ignore[arg-type]
        except (KeyError, ValueError, TypeError):
            raise PgoutputError(f"malformed row of {MARKER_TABLE}: columns {names}") from None
        self._add_message(tx, MARKER_PREFIX, marker_content(*values))

    def _add_message(self, tx: _Builder, prefix: str, content: bytes) -> None:
        if len(tx.messages) >= self.max_messages or tx.message_bytes + len(content) > self.max_message_bytes:
            tx.truncated = True
            return
        tx.messages.append((prefix, content))
        tx.message_bytes += len(content)
