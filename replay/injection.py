"""What connmgr puts into a client's request stream, and how their replies are told
apart and taken out again (sans-IO: batches of framed messages in, bytes and decisions out).

How it works
------------
A session of a pair carries two kinds of statement of connmgr's own (:mod:`replay.markers`):
the *marker* that records "transaction n of session s committed" in the transaction itself,
and the *capture* of a DDL statement. :class:`Injector` plans them into the client's
batches and strips their replies from the server's, so the client sees exactly what it would
see without connmgr.

Planning (client to server) looks at one complete message with nothing of the client's in
flight, and returns a :class:`Plan`: which bytes of the batch to replace and with what.

* ``InjectMode.CYCLE``: a whole Query of ours goes *before* the client's message -- a marker
  before a COMMIT in a block (simple Query, or the extended protocol's Parse/Bind of one), a
  capture before a DDL statement in a block. Its replies, up to and including its own
  ReadyForQuery, are swallowed.
* ``InjectMode.NAMED``: an autocommit Query of one writing (or DDL) statement is rewritten to
  carry the capture and the marker in its own implicit transaction. Their results are
  recognised by the column names ``connmgr.marker`` and ``connmgr.ddl``.
* ``InjectMode.EXT_TAIL``: an implicit transaction of the extended protocol that wrote gets a
  marker Parse/Bind/Execute/Close before its Sync; their replies come after the client's own
  requests are answered, while the shadow's next pending request is the Sync.

One injection is outstanding at a time (planning needs nothing in flight); it ends at the
server's next ReadyForQuery. The marker's DataRow says whether it wrote its row (the
transaction writes and will carry the marker if it commits): :attr:`Injector.marked` and
:attr:`Injector.confirmed` say so, for the caller's counters and the mirror. Errors and
asynchronous messages always reach the client: an error in a marker aborted the client's
transaction, and the client must know.

Holding (server to client): an autocommit write carrying a marker returns its results
before its commit (the marker's flush, see :mod:`replay.markers`). :meth:`Injector.hold`
keeps them until the ReadyForQuery after the commit, so a client never holds results of a
write whose commit is undecided; at a failover the move then either completes them (it
committed) or replays the write as new (it did not). Results beyond :data:`STASH_LIMIT`,
and results after which the client must act (COPY), are not held; nor are the parts of a
message too long to be held whole (streamed, see shadow/framing.py).

Unmarked commits: a request that may end an implicit transaction but cannot carry a marker
-- a multi-statement autocommit Query that writes, a Query or Parse too long to be held
whole, an implicit transaction whose statement text is unknown -- is counted in
:attr:`Injector.unmarked` until the server answers it. A failover that finds one in flight
cannot tell whether it committed, so the session cannot move (the client gets 08006, as
from a server that died mid-commit) rather than replay a write that may have committed.
"""

from __future__ import annotations

import enum
import logging
import re
from struct import Struct
from typing import NamedTuple, Protocol

from replay import markers
from shadow import messages
from shadow.errors import RemoteProtocolError
from shadow.framing import STREAM_HEAD
from shadow.session import PendingRequest, SessionState, TxStatus
from shadow.sqltext import (
    DdlKind,
    created_table,
    ddl_kind,
    first_word,
    is_commit,
    is_transaction_control,
    may_write,
    statement_count,
)

__all__ = ["STASH_LIMIT", "Counters", "InjectMode", "Injector", "Plan", "frames_of"]

log = logging.getLogger("connmgr.relay")

_D, _Z, _E, _A, _N, _S, _T, _CC, _P = (ord(c) for c in "DZEANSTCP")
_ROWS = Struct("!h")
_LEN = Struct("!i")
_MARKER_COLUMN = markers.MARKER_COLUMN.encode() + b"\0"
_DDL_COLUMN = markers.DDL_COLUMN.encode() + b"\0"
_FLUSH_NOTICE = b"\0M" + markers.FLUSH_NOTICE.encode() + b"\0"
_EXT_REPLIES = frozenset(map(ord, "12DC3"))
_MARKER_STATEMENT = "connmgr.marker"
#: most bytes of an autocommit write's results held until its commit is known
STASH_LIMIT = 1 << 20
#: replies after which the client must act before the server goes on (COPY)
_CLIENT_TURN = frozenset(b"GHW")
#: the kinds of pending request a ReadyForQuery answers
_SYNC_POINTS = frozenset("QSF")
#: the first words of transaction control that commit (PREPARE TRANSACTION: in two phases)
_COMMITS = frozenset({b"COMMIT", b"END", b"PREPARE"})
#: a word that may end a transaction block inside a multi-statement text (CASE ... END
#: matches too: counting a commit that is not one only costs a move)
_ENDS_BLOCK = re.compile(rb"\b(?:COMMIT|END|ROLLBACK|ABORT|PREPARE)\b", re.IGNORECASE)


class InjectMode(enum.IntEnum):
    """What is injected and not yet answered (see the module docstring)."""

    NONE = 0
    CYCLE = 1
    NAMED = 2
    EXT_TAIL = 3


class Plan(NamedTuple):
    """Replace ``batch[cut:resume]`` with ``insert``; its replies are told apart by ``mode``."""

    cut: int
    resume: int
    insert: bytes
    mode: InjectMode
    #: the plan captures a DDL statement
    ddl: bool = False


class Segment(NamedTuple):
    """The Sync segment being sent, as :meth:`Injector._segment` reads it."""

    #: sync points (Query, Sync, FunctionCall) of the client's in flight before it
    ahead: int
    #: a statement that may write rows, one that is DDL, one whose text is unknown
    writes: bool
    ddl: bool
    unknown: bool
    #: transaction control; and of that, a statement that commits (COMMIT, END, PREPARE)
    control: bool
    commits: bool


class Counters(Protocol):
    """Where the injector adds what it did across sessions (connmgr.metrics.Metrics)."""

    ddl_captured: int
    ddl_not_captured: int
    markers_written: int


class Injector:
    """The injection state of one session; see the module docstring. ``session`` is its
    shadow, ``origin`` and ``sid`` name its marker rows; ``mode`` is what a moved session
    still has to strip (its held replies carry a marker's)."""

    __slots__ = ("session", "origin", "sid", "counters", "mode", "swallowing", "swallow_marker", "marker_seq",
                 "marker_at", "marked", "confirmed", "new_tables", "stash", "injected", "injected_done", "unmarked",
                 "injected_errors", "markers_written", "ddl_captured", "ddl_not_captured")  # fmt: skip

    def __init__(self, session: SessionState, origin: int, sid: int, counters: Counters,
                 mode: InjectMode = InjectMode.NONE) -> None:  # fmt: skip
        self.session = session
        self.origin = origin
        self.sid = sid
        self.counters = counters
        self.mode = mode
        self.swallowing = False
        self.swallow_marker = False
        #: transaction number the outstanding marker names (0: none yet)
        self.marker_seq = 0
        #: when that marker was planned (a failover replays commits in flight in this order)
        self.marker_at = 0.0
        #: the marker wrote its row in the current transaction (its ack is held in two-phase)
        self.marked = False
        #: a marker's row was confirmed in the last :meth:`strip` (the caller tells the mirror)
        self.confirmed = False
        #: tables created by captured DDL in this transaction, for the marker's guard
        self.new_tables: list[str] = []
        #: server bytes held until an autocommit write's commit is known (:meth:`hold`);
        #: None while a too-large result is relayed as it comes
        self.stash: bytearray | None = bytearray()
        #: ReadyForQuery still to come until no request that may commit without a marker
        #: is in flight (module docstring); 0: none is
        self.unmarked = 0
        self.injected = 0
        self.injected_done = 0
        self.injected_errors = 0
        self.markers_written = 0
        self.ddl_captured = 0
        self.ddl_not_captured = 0

    # ------------------------------------------------------------------ planning

    def plan_query(self, buf: bytes, start: int, end: int, transactions: int, now: float) -> Plan | None:
        """A simple Query (body ``buf[start:end]``) with nothing in flight: in a block, a
        COMMIT gets a marker Query before it and a DDL statement a capture Query; in
        autocommit, a single writing or DDL statement is rewritten to carry them in its own
        implicit transaction. ``transactions``: how many the client has seen end."""
        s = self.session
        if s.pending:
            self.unplanned_query(buf, start, end)
            return None
        tx = s.tx_status
        if tx is TxStatus.IN_TRANSACTION:
            sql = bytes(buf[start:end - 1])
            if is_commit(sql):
                return Plan(start - 5, start - 5, self._marker_query(transactions, now), InjectMode.CYCLE)
            if _multi(sql) and _ENDS_BLOCK.search(sql):  # "INSERT ...; COMMIT": it commits unmarked
                self.unmarkable()
            kind = ddl_kind(sql)  # one scan: it stops at the first word unless DDL
            if kind == DdlKind.NONE:
                return None
            if kind == DdlKind.TRANSACTIONAL and statement_count(sql) == 1:
                self._captured()
                return Plan(start - 5, start - 5, messages.query(self._capture_sql(sql)), InjectMode.CYCLE, True)
            self._not_captured(sql, kind)
            return None
        if tx is not TxStatus.IDLE:
            return None
        sql = bytes(buf[start:end - 1])
        first = first_word(sql)
        kind = ddl_kind(sql, first)
        ddl = False
        if kind == DdlKind.NONE:
            writes = may_write(sql, first)
            if not writes and b";" not in sql:  # the hot read path: one C-speed test
                return None
            if _multi(sql):  # "SET ...; INSERT ...", "BEGIN; ...; COMMIT": no marker rides along
                self.unmarkable()
                return None
            if not writes:
                return None
            text = _text(sql) + "\n;" + self._marker_sql(transactions, now)
        elif kind == DdlKind.TRANSACTIONAL and statement_count(sql) == 1:
            self._captured()
            ddl = True
            # the capture goes after the statement (so error positions stay the client's);
            # it is in the same implicit transaction either way
            text = _text(sql) + "\n;" + self._capture_sql(sql) + ";" + self._marker_sql(transactions, now)
        else:
            if kind != DdlKind.NOT_REPLICATED or _multi(sql):
                self.unmarkable()  # its implicit transaction commits unmarked
            self._not_captured(sql, kind)
            return None
        return Plan(start - 5, end, messages.query(text), InjectMode.NAMED, ddl)

    def unplanned_query(self, buf: bytes, start: int, end: int) -> None:
        """A Query (body ``buf[start:end]``) sent while something is in flight before it,
        so nothing was planned for it: if it may commit a write, it does so unmarked."""
        sql = bytes(buf[start:end - 1])
        first = first_word(sql)
        if is_commit(sql) or may_write(sql, first) or ddl_kind(sql, first) != DdlKind.NONE or _multi(sql):
            self.unmarkable()

    def plan_sync(self, start: int, transactions: int, now: float) -> Plan | None:
        """An extended-protocol Sync (body at ``start``) that ends an implicit transaction
        (the segment began with nothing in flight, outside a block, and holds no
        transaction control): if it wrote, a marker Parse/Bind/Execute/Close goes before
        the Sync. A segment that may commit a write and gets no marker is counted
        (:attr:`unmarked`)."""
        s = self.session
        if not s.pending:
            return None
        seg = self._segment()
        if seg.ahead:  # pipelined: nothing is planned behind a request in flight
            if seg.writes or seg.ddl or seg.unknown or seg.commits:
                self.unmarkable()
            return None
        if s.tx_status is TxStatus.IN_TRANSACTION:
            if seg.commits:  # a COMMIT behind other requests of its segment: no marker went first
                self.unmarkable()
            return None
        if s.tx_status is not TxStatus.IDLE:
            return None
        if seg.control:  # BEGIN ... COMMIT in one segment
            if seg.commits or seg.writes or seg.ddl or seg.unknown:
                self.unmarkable()
            return None
        if seg.unknown or (seg.ddl and not seg.writes):
            self.unmarkable()
            return None
        if not seg.writes:
            return None
        marker = (
            messages.Parse(_MARKER_STATEMENT, self._marker_sql(transactions, now)).encode()
            + messages.Bind("", _MARKER_STATEMENT).encode()
            + messages.Execute("").encode()
            + messages.Close("S", _MARKER_STATEMENT).encode()
        )
        return Plan(start - 5, start - 5, marker, InjectMode.EXT_TAIL)

    def unplanned_sync(self) -> None:
        """A Sync sent while an injection is outstanding (or behind a request planned in
        the same batch): if a request of the client's is in flight before its segment and
        the segment may commit a write, it does so unmarked. With nothing of the client's
        in flight before it, the injection is this segment's own (a COMMIT's marker)."""
        seg = self._segment()
        if seg.ahead and (seg.writes or seg.ddl or seg.unknown or seg.commits):
            self.unmarkable()

    def _segment(self) -> Segment:
        """What the shadow knows of the Sync segment the client is sending: the requests
        pending after its last pending sync point."""
        s = self.session
        ahead = first_of_segment = 0
        for i, req in enumerate(s.pending):
            if req.kind in _SYNC_POINTS:
                ahead += 1
                first_of_segment = i + 1
        parsed: dict[str | None, str | None] = {}  # statements parsed and not yet answered
        writes = ddl = unknown = control = commits = False
        for i, req in enumerate(s.pending):
            kind = req.kind
            if kind == "P":
                sql = parsed[req.statement] = req.sql
            elif kind == "B":  # its statement may be parsed in flight, not yet answered
                sql = parsed[req.statement] if req.statement in parsed else s.request_sql(req)
            else:
                continue
            if i < first_of_segment:
                continue
            if sql is None:  # a statement connmgr does not know (streamed): it may write
                unknown = True
                continue
            text = sql.encode("utf-8", "replace")
            first = first_word(text)
            if is_transaction_control(b"", first):
                control = True
                commits = commits or first in _COMMITS
            elif may_write(b"", first):
                writes = True
            elif ddl_kind(text, first) != DdlKind.NONE:
                ddl = True
        return Segment(ahead, writes, ddl, unknown, control, commits)

    def plan_extended(self, tag: int, buf: bytes, start: int, end: int, transactions: int,
                      now: float) -> Plan | None:  # fmt: skip
        """A Parse of COMMIT/END, or a Bind of a prepared statement whose text is one
        (pgbench -M prepared, JDBC), in a block with nothing in flight: a marker Query goes
        before it."""
        s = self.session
        if s.pending or s.tx_status is not TxStatus.IN_TRANSACTION or end - start > 96:
            return None
        body = bytes(buf[start:end])
        try:
            first = body.index(0)
            second = body.index(0, first + 1)
        except ValueError:
            return None
        if tag == _P:
            commits = is_commit(body[first + 1:second])
        else:
            sql = s.request_sql(PendingRequest("B", statement=body[first + 1:second].decode("utf-8", "replace")))
            commits = sql is not None and is_commit(sql.encode("utf-8", "replace"))
        if not commits:
            return None
        return Plan(start - 5, start - 5, self._marker_query(transactions, now), InjectMode.CYCLE)

    def unmarkable(self) -> None:
        """The client's next request -- one the session's shadow has not been shown yet --
        may commit without a marker: count the ReadyForQuery messages until it is answered
        (the sync points still pending in the shadow, and its own; module docstring)."""
        ahead = sum(1 for req in self.session.pending if req.kind in _SYNC_POINTS)
        self.unmarked = max(self.unmarked, ahead + 1)

    def apply(self, buf: bytes, plan: Plan) -> bytes:
        """The batch with ``plan`` carried out; its replies are stripped from now on."""
        self.mode = plan.mode
        self.injected += 1
        return buf[:plan.cut] + plan.insert + buf[plan.resume:]

    def _marker_sql(self, transactions: int, now: float) -> str:
        self.marker_seq = transactions + 1
        self.marker_at = now
        guard = ""
        if self.new_tables:  # this transaction created tables: the guard goes with its marker
            guard, self.new_tables = markers.guard_sql(self.new_tables), []
        return markers.mark_sql(self.origin, self.sid, self.marker_seq, guard)

    def _marker_query(self, transactions: int, now: float) -> bytes:
        return messages.query(self._marker_sql(transactions, now))

    def _capture_sql(self, sql: bytes) -> str:
        """The capture statement of DDL ``sql``; a table it creates is remembered for the
        transaction's marker (its guard)."""
        table = created_table(sql)
        if table is not None:
            self.new_tables.append(table)
        return markers.ddl_capture_sql(_text(sql))

    def _captured(self) -> None:
        self.ddl_captured += 1
        self.counters.ddl_captured += 1

    def _not_captured(self, sql: bytes, kind: int) -> None:
        if kind == DdlKind.NOT_REPLICATED:
            return
        self.ddl_not_captured += 1
        self.counters.ddl_not_captured += 1
        why = ("Postgres runs it outside transaction blocks" if kind == DdlKind.OUTSIDE_BLOCK
               else "it shares its Query with other statements")  # fmt: skip
        log.warning("client %d: DDL not replicated to the secondary (%s): %.80s", self.sid, why, _text(sql))

    # ------------------------------------------------------------------ replies

    def strip(self, buf: bytes, frames: list, track: bool, held_back=None) -> tuple[bytes, list, RemoteProtocolError | None]:
        """Drop the replies to what was injected, feeding the shadow (if ``track``) the
        rest in order. ``held_back(buf, start, end)``, if given, is asked about each
        ErrorResponse: True stops here (the server is going away; the message and what
        follows are the caller's). Returns the kept bytes and frames, and the error of a
        reply the shadow could not follow (it is not fed any more)."""
        mode = self.mode
        pending = self.session.pending
        shadow = self.session.backend_message
        lost_track = None
        kept = []
        self.confirmed = False
        for tag, start, end in frames:
            drop = False
            if tag == _E and held_back is not None and held_back(buf, start, end):
                break  # the caller never sees it: the shadow stays as the client knows it
            if not self.mode:
                pass
            elif tag == _Z:
                self.mode = InjectMode.NONE
                self.swallowing = False
                self.injected_done += 1
                drop = mode == InjectMode.CYCLE
            elif tag == _E:
                self.injected_errors += 1
                self.swallowing = False
            elif tag == _N:
                drop = buf.find(_FLUSH_NOTICE, start, end) >= 0
            elif tag == _A or tag == _S:
                pass
            elif mode == InjectMode.CYCLE:
                drop = True
                if tag == _T:
                    self.swallowing = buf[start + 2:start + 2 + len(_MARKER_COLUMN)] == _MARKER_COLUMN
                elif tag == _D and self.swallowing:
                    self._confirm(buf, start)
            elif mode == InjectMode.NAMED:
                if tag == _T:
                    head = buf[start + 2:start + 2 + len(_MARKER_COLUMN)]
                    if head == _MARKER_COLUMN or head[:len(_DDL_COLUMN)] == _DDL_COLUMN:
                        drop = self.swallowing = True
                        self.swallow_marker = head == _MARKER_COLUMN
                elif self.swallowing:
                    drop = True
                    if tag == _D and self.swallow_marker:
                        self._confirm(buf, start)
                    elif tag == _CC:
                        self.swallowing = False
            elif tag in _EXT_REPLIES and pending and pending[0].kind == "S":
                drop = True
                if tag == _D:
                    self._confirm(buf, start)
            if drop:
                continue
            kept.append((tag, start, end))
            if track:
                try:
                    shadow(tag, buf[start:end])
                except RemoteProtocolError as e:
                    lost_track, track = e, False
        if len(kept) == len(frames):
            return buf, frames, lost_track
        out = bytearray()
        new_frames = []
        for tag, start, end in kept:
            header = 5 if tag <= 0xFF or tag & STREAM_HEAD else 0  # later parts of a streamed one have none
            base = len(out) + header
            out += buf[start - header:end]
            new_frames.append((tag, base, base + end - start))
        return bytes(out), new_frames, lost_track

    def _confirm(self, buf: bytes, start: int) -> None:
        """The marker's DataRow: a non-NULL value means it wrote its row."""
        if _ROWS.unpack_from(buf, start)[0] >= 1 and _LEN.unpack_from(buf, start + 2)[0] >= 0:
            self.marked = True
            self.confirmed = True
            self.markers_written += 1
            self.counters.markers_written += 1

    def hold(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        """Replies of an autocommit write that carries a marker (modes NAMED and EXT_TAIL):
        what to pass on now. Held until the batch that ends the transaction, which then
        comes out with everything held before it; see the module docstring."""
        ends = False
        stop = False
        for tag, _s, _e in frames:
            if tag == _Z:
                ends = True
            elif tag in _CLIENT_TURN or tag > 0xFF:  # the client must act, or a streamed message
                stop = True
        if stop:  # relayed as it comes; the next transaction is held again
            held, self.stash = self.stash, (bytearray() if ends else None)
            if held:
                return _join(held, buf, frames)
            return buf, frames
        if self.stash is None:
            if ends:
                self.stash = bytearray()
            return buf, frames
        if not ends and len(self.stash) + len(buf) <= STASH_LIMIT:
            self.stash += buf
            return b"", []
        if not self.stash:
            if not ends:
                self.stash = None  # too large: relayed as it comes
            return buf, frames
        held = self.stash
        self.stash = bytearray() if ends else None
        return _join(held, buf, frames)


def _join(held: bytearray, buf: bytes, frames: list) -> tuple[bytes, list]:
    shift = len(held)
    return bytes(held) + buf, [*frames_of(held), *((t, s + shift, e + shift) for t, s, e in frames)]


def frames_of(data: bytes | bytearray) -> list:
    """Frames (tag, body start, body end) of whole messages ``data``."""
    out = []
    i, n = 0, len(data)
    while i < n:
        length = int.from_bytes(data[i + 1:i + 5], "big")
        out.append((data[i], i + 5, i + 1 + length))
        i += 1 + length
    return out


def _multi(sql: bytes) -> bool:
    """More than one statement (the C-speed test first: most texts have no ``;``)."""
    return b";" in sql and statement_count(sql) != 1


def _text(sql: bytes) -> str:
    return sql.decode("utf-8", "replace")
