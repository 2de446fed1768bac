"""The relay: a client's session forwarded to its backend and back.

How it works
------------
Each direction reads a chunk, lets the :class:`~shadow.framing.Framer` cut it at message
boundaries, hands the complete messages to a *processor* (:class:`Upstream` for client to
server, :class:`Downstream` for server to client) and forwards the *original bytes* in one
send. The processor shows each message's type and body to the session shadow (skipping the
bulk types, DataRow and CopyData, whose bodies no decision needs), counts, times requests
and -- for the one message that names a backend pid, NotificationResponse -- rewrites the
pid to the session's virtual one. A partial message waits in the framer until it is
complete, so anything connmgr injects into a stream lands on a message boundary.

Two carriers move the bytes, with the same processors:

* the **relay engine** (:mod:`connmgr.proxy.engine`) for plain TCP on both sides: one task
  multiplexes every such session over one epoll set and pumps whatever is ready without a
  task switch per message -- the hot path;
* **trio pumps**, one task per direction, when either side speaks TLS.

:class:`Relay` owns the session while it runs: it starts the carrier, watches the idle
timeouts, and returns when either side ends -- client EOF or Terminate, backend EOF, a
protocol violation, :meth:`Relay.stop` -- raising the recorded
:class:`~connmgr.errors.ClientError` (if any) so the caller reports it to this client alone.

The shadow must never be stricter than Postgres: if it rejects a message the server would
accept (or a reply it cannot pair), the session is marked *untracked*, logged once, and the
bytes keep flowing. Only framing errors (nonsense lengths) end the connection, because
after one of those the stream cannot be cut into messages any more.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from struct import Struct
from typing import TYPE_CHECKING

import trio

from connmgr.errors import BackendLost, BackendUnavailable, ClientError
from connmgr.proxy.transport import FastSocketStream
from replay import markers
from shadow import messages
from shadow.errors import RemoteProtocolError
from shadow.framing import Framer
from shadow.session import PendingRequest, Phase, TxStatus
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

if TYPE_CHECKING:
    from connmgr.pg.backend import BackendSession
    from connmgr.proxy.client import ClientConnection

log = logging.getLogger("connmgr.relay")

_Q, _S, _F, _X, _D, _Z, _E, _d, _A, _N, _I, _P, _B, _T, _CC = (ord(c) for c in "QSFXDZEdANIPBTC")
_c, _f = ord("c"), ord("f")
#: client messages that end a request (see Upstream.at_boundary); 0: nothing sent yet
_BOUNDARY = frozenset((0, ord("Q"), ord("S"), ord("F"), _c, _f))
_PID = Struct("!i")
_ROWS = Struct("!h")
RECV_SIZE = 64 * 1024


#: what connmgr injected into the client's stream and how its replies are told apart
#: (one injection is outstanding at a time: injecting needs nothing in flight)
_NONE = 0
_CYCLE = 1  #: a whole Query of ours before the client's: swallow its replies up to its Z
_NAMED = 2  #: statements of ours inside the client's Query: swallow results named ours
_EXT_TAIL = 3  #: Parse/Bind/Execute/Close of ours before the client's Sync: swallow their
#: replies once the client's own requests are answered

_MARKER_COLUMN = markers.MARKER_COLUMN.encode() + b"\0"
_DDL_COLUMN = markers.DDL_COLUMN.encode() + b"\0"
_FLUSH_NOTICE = b"\0M" + markers.FLUSH_NOTICE.encode() + b"\0"
_EXT_REPLIES = frozenset(map(ord, "12DC3"))
_MARKER_STATEMENT = "connmgr.marker"
#: most bytes of an autocommit write's results held until its commit is known
_STASH_LIMIT = 1 << 20
#: replies after which the client must act before the server goes on (COPY)
_CLIENT_TURN = frozenset(b"GHW")


class Upstream:
    """Client to server: what each batch of complete messages means to the session."""

    __slots__ = ("relay", "shadow", "stats", "starts", "terminated", "mirror", "offset", "sid", "markers", "session",
                 "origin", "journal", "recorder", "last_tag")  # fmt: skip

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.session = relay.conn.session
        self.shadow = relay.conn.session.frontend_message
        app = relay.conn.app
        #: embed purge markers and capture DDL (see replay/markers.py); decided per session
        #: by the client (the database must have the marker function)
        self.markers = relay.markers
        self.origin = app.origin
        self.stats = relay.conn.stats
        self.starts = relay.starts
        self.terminated = False
        self.mirror = relay.mirror
        self.journal = relay.conn.journal
        self.recorder = relay.conn.recorder
        self.sid = relay.conn.id
        #: offset of the next byte in the client-to-server TCP stream (set by Relay.run)
        self.offset = 0
        #: type of the last message relayed (0: none yet)
        self.last_tag = 0

    def at_boundary(self) -> bool:
        """Has the client finished its last request (a Query, Sync, FunctionCall,
        CopyDone or CopyFail was the last message, nothing partial is buffered, and no
        COPY waits for its data)? A switchover stops reading the client only there."""
        return (self.last_tag in _BOUNDARY and self.relay.client_framer.pending_bytes == 0
                and self.session.phase is not Phase.COPY_IN)  # fmt: skip

    def process(self, buf: bytes, frames: list) -> bytes:
        """Account for ``frames`` of ``buf``; returns the bytes to forward."""
        relay = self.relay
        now = time.perf_counter()
        relay.last_activity = now
        starts = self.starts
        plan = None
        syncs = None
        for tag, start, end in frames:
            if tag == _d:
                continue
            if tag == _Q or tag == _S or tag == _F:
                if syncs is None:
                    syncs = [end]
                else:
                    syncs.append(end)
                if tag == _Q and self.recorder is not None:
                    self.recorder.on_sql(buf[start:end - 1])
                if self.markers and plan is None and not relay.inject_mode and relay.tracking:
                    if tag == _Q:
                        plan = self._plan_query(buf, start, end)
                    elif tag == _S:
                        plan = self._plan_sync(start)
                starts.append(now)
            elif tag == _P or tag == _B:
                if tag == _P and self.recorder is not None:
                    i = buf.find(0, start, end)
                    j = buf.find(0, i + 1, end)
                    if 0 <= i < j:
                        self.recorder.on_sql(buf[i + 1:j])
                if self.markers and plan is None and not relay.inject_mode and relay.tracking \
                        and self._extended_commits(tag, buf, start, end):  # fmt: skip
                    plan = (start - 5, start - 5, self._marker_query(), _CYCLE)
            elif tag == _X:
                self.terminated = True
            elif tag == _c or tag == _f:  # CopyDone/CopyFail: the COPY's sync point ends here
                if syncs is None:
                    syncs = []
                syncs.append(-end)
            if relay.tracking:
                try:
                    self.shadow(tag, buf[start:end])
                except RemoteProtocolError as e:
                    relay.untrack("client", e)
        self.last_tag = frames[-1][0]
        stats = self.stats
        stats.messages_from_client += len(frames)
        stats.bytes_from_client += len(buf)
        if self.mirror is not None:
            self.mirror.session_data(self.sid, "c", self.offset, buf)
            self.offset += len(buf)
        if self.journal is not None:
            self.journal.client(buf, syncs)
        if plan is not None:
            cut, resume, insert, mode = plan
            relay.inject_mode = mode
            relay.injected += 1
            return buf[:cut] + insert + buf[resume:]
        return buf

    # ----------------------------------------------------------------- what to inject

    def _marker_sql(self) -> str:
        relay = self.relay
        relay.marker_seq = relay.transactions + 1
        relay.marker_at = time.perf_counter()
        guard = ""
        if relay.new_tables:  # this transaction created tables: the guard goes with its marker
            guard, relay.new_tables = markers.guard_sql(relay.new_tables), []
        return markers.mark_sql(self.origin, self.sid, relay.marker_seq, guard)

    def _capture_sql(self, sql: bytes) -> str:
        """The capture statement of DDL ``sql``; a table it creates is remembered for
        the transaction's marker (its guard)."""
        table = created_table(sql)
        if table is not None:
            self.relay.new_tables.append(table)
        return markers.ddl_capture_sql(_text(sql))

    def _marker_query(self) -> bytes:
        return messages.query(self._marker_sql())

    def _plan_query(self, buf: bytes, start: int, end: int):
        """A simple Query with nothing in flight: in a block, a COMMIT gets a marker Query
        before it and a DDL statement a capture Query; in autocommit, a single writing or
        DDL statement is rewritten to carry them in its own implicit transaction."""
        s = self.session
        if s.pending:
            return None
        tx = s.tx_status
        if tx is TxStatus.IN_TRANSACTION:
            sql = bytes(buf[start:end - 1])
            if is_commit(sql):
                return (start - 5, start - 5, self._marker_query(), _CYCLE)
            kind = ddl_kind(sql)  # one scan: it stops at the first word unless DDL
            if kind == DdlKind.NONE:
                return None
            if kind == DdlKind.TRANSACTIONAL and statement_count(sql) == 1:
                self.relay.ddl_captured += 1
                self.relay.conn.app.metrics.ddl_captured += 1
                return (start - 5, start - 5, messages.query(self._capture_sql(sql)), _CYCLE)
            self._not_captured(sql, kind)
            return None
        if tx is not TxStatus.IDLE:
            return None
        sql = bytes(buf[start:end - 1])
        first = first_word(sql)
        kind = ddl_kind(sql, first)
        if kind == DdlKind.NONE:
            if not may_write(sql, first) or statement_count(sql) != 1:
                return None
            text = _text(sql) + "\n;" + self._marker_sql()
        elif kind == DdlKind.TRANSACTIONAL and statement_count(sql) == 1:
            self.relay.ddl_captured += 1
            self.relay.conn.app.metrics.ddl_captured += 1
            # the capture goes after the statement (so error positions stay the client's);
            # it is in the same implicit transaction either way
            text = _text(sql) + "\n;" + self._capture_sql(sql) + ";" + self._marker_sql()
        else:
            self._not_captured(sql, kind)
            return None
        return (start - 5, end, messages.query(text), _NAMED)

    def _not_captured(self, sql: bytes, kind: int) -> None:
        if kind == DdlKind.NOT_REPLICATED:
            return
        self.relay.ddl_not_captured += 1
        self.relay.conn.app.metrics.ddl_not_captured += 1
        why = ("Postgres runs it outside transaction blocks" if kind == DdlKind.OUTSIDE_BLOCK
               else "it shares its Query with other statements")  # fmt: skip
        log.warning("client %d: DDL not replicated to the secondary (%s): %.80s",
                    self.sid, why, _text(sql))  # fmt: skip

    def _plan_sync(self, start: int):
        """An extended-protocol Sync that ends an implicit transaction (the segment began
        with nothing in flight, outside a block, and holds no transaction control): if
        it wrote, a marker Parse/Bind/Execute/Close goes before the Sync."""
        s = self.session
        if s.tx_status is not TxStatus.IDLE or not s.pending:
            return None
        writes = False
        parsed: dict[str | None, str | None] = {}  # statements parsed in this segment
        for req in s.pending:
            kind = req.kind
            if kind == "P" or kind == "B":
                if kind == "P":
                    sql = parsed[req.statement] = req.sql
                else:  # its statement may be parsed in this very segment, not yet answered
                    sql = parsed[req.statement] if req.statement in parsed else s.request_sql(req)
                if sql is None:
                    return None
                first = first_word(sql.encode("utf-8", "replace"))
                if is_transaction_control(b"", first):
                    return None
                writes = writes or may_write(b"", first)
            elif kind != "D" and kind != "E" and kind != "C":
                return None  # an earlier Sync or Query is still in flight
        if not writes:
            return None
        marker = (
            messages.Parse(_MARKER_STATEMENT, self._marker_sql()).encode()
            + messages.Bind("", _MARKER_STATEMENT).encode()
            + messages.Execute("").encode()
            + messages.Close("S", _MARKER_STATEMENT).encode()
        )
        return (start - 5, start - 5, marker, _EXT_TAIL)

    def _extended_commits(self, tag: int, buf: bytes, start: int, end: int) -> bool:
        """The extended-protocol form: a Parse of COMMIT/END, or a Bind of a prepared
        statement whose text is one (pgbench -M prepared, JDBC)."""
        s = self.session
        if s.pending or s.tx_status is not TxStatus.IN_TRANSACTION or end - start > 96:
            return False
        body = bytes(buf[start:end])
        try:
            first = body.index(0)
            second = body.index(0, first + 1)
        except ValueError:
            return False
        if tag == _P:
            return is_commit(body[first + 1:second])
        sql = s.request_sql(PendingRequest("B", statement=body[first + 1:second].decode("utf-8", "replace")))
        return sql is not None and is_commit(sql.encode("utf-8", "replace"))


def _text(sql: bytes) -> str:
    return sql.decode("utf-8", "replace")


class Downstream:
    """Server to client: the same for the server's messages."""

    __slots__ = ("relay", "shadow", "session", "stats", "starts", "latency", "last_tag", "mirror", "offset", "sid",
                 "journal", "recorder")  # fmt: skip

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.session = relay.conn.session
        self.shadow = relay.conn.session.backend_message
        self.stats = relay.conn.stats
        self.starts = relay.starts
        self.latency = self.stats.latency
        self.last_tag = 0
        self.mirror = relay.mirror
        self.journal = relay.conn.journal
        self.recorder = relay.conn.recorder
        self.sid = relay.conn.id
        #: offset of the next byte in the server-to-client TCP stream (set by Relay.run)
        self.offset = 0

    def process(self, buf: bytes, frames: list) -> bytes:
        relay = self.relay
        track = relay.tracking
        if relay.pending_abort is not None:
            buf, frames = self._deliver_abort(buf, frames)
        if relay.inject_mode:
            if relay.inject_mode != _CYCLE and self.journal is not None:
                buf, frames = self._hold_until_commit(buf, frames)
                if not frames:
                    return b""
            buf, frames = self._strip_injected(buf, frames)
            track = False  # _strip_injected fed the shadow
            if not frames:
                return b""
        notified = False
        hold = False
        readies = None
        for frame in frames:
            tag, start, end = frame
            if tag == _D:
                continue
            if tag == _A:
                notified = True
            elif tag == _E and self.journal is not None:
                if relay.held_back(buf, start, end):
                    buf = buf[:start - 5]
                    frames = frames[:frames.index(frame)]
                    if not frames:
                        return b""
                    break
                relay.rolled_back = True
            elif tag == _CC and self.recorder is not None and buf.startswith(b"ROLLBACK", start):
                relay.rolled_back = True
            elif tag == _Z:
                if readies is None:
                    readies = [(end, buf[start])]
                else:
                    readies.append((end, buf[start]))
                if buf[start] == _I:
                    relay.transactions += 1
                    if self.recorder is not None:
                        self.recorder.end_transaction(not relay.rolled_back)
                    relay.rolled_back = False
                    if relay.marked:
                        relay.marked = False
                        hold = True
                starts = self.starts
                if starts:
                    now = time.perf_counter()
                    self.latency.observe(now - starts.popleft())
                    self.stats.requests += 1
                    relay.last_activity = now
            if track:
                try:
                    self.shadow(tag, buf[start:end])
                except RemoteProtocolError as e:
                    relay.untrack("server", e)
                    track = False
        self.last_tag = frames[-1][0]
        if notified:
            buf = relay.virtualise_notification_pids(buf, frames)
        stats = self.stats
        stats.messages_to_client += len(frames)
        stats.bytes_to_client += len(buf)
        if self.journal is not None:
            self.journal.server(buf, readies)
        mirror = self.mirror
        if mirror is not None:
            version = mirror.session_data(self.sid, "b", self.offset, buf)
            self.offset += len(buf)
            if hold and mirror.two_phase:
                relay.hold_version = version
        return buf

    def _hold_until_commit(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        """An autocommit write carrying a marker: its results arrive before its commit (the
        marker's flush) and are held, unprocessed, until the ReadyForQuery that follows the
        commit. So a client never holds results of a write whose commit is undecided, and
        if the primary dies in between, the move either completes them (it committed) or
        replays the write as new (it did not) -- never a comparison that could differ
        (a serial key from RETURNING, say). Results beyond ``_STASH_LIMIT`` are not held."""
        relay = self.relay
        ends = False
        for tag, _s, _e in frames:
            if tag == _Z:
                ends = True
            elif tag in _CLIENT_TURN:  # the client must act before the commit: stop holding
                relay.stash, held = None, relay.stash
                if held:
                    return self._unstash(held, buf, frames)
                return buf, frames
        if relay.stash is None:
            if ends:
                relay.stash = bytearray()
            return buf, frames
        if not ends and len(relay.stash) + len(buf) <= _STASH_LIMIT:
            relay.stash += buf
            return b"", []
        if not relay.stash:
            if not ends:
                relay.stash = None  # too large: relayed as it comes
            return buf, frames
        held = relay.stash
        relay.stash = bytearray() if ends else None
        return self._unstash(held, buf, frames)

    def _unstash(self, held: bytearray, buf: bytes, frames: list) -> tuple[bytes, list]:
        shift = len(held)
        frames = [*_frames_of(held), *((t, s + shift, e + shift) for t, s, e in frames)]
        return bytes(held) + buf, frames

    def _deliver_abort(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        """The session moved while idle in a transaction that could not move: the backend
        was put in a failed block, and the client learns it here, on its next request --
        the first ErrorResponse (25P02) becomes connmgr's 40001, as does the ROLLBACK that
        answers a COMMIT. A ROLLBACK the client asked for needs no error."""
        relay = self.relay
        for i, (tag, start, end) in enumerate(frames):
            replace = False
            if tag == _E:
                replace = True
            elif tag == _CC and buf.startswith(b"ROLLBACK", start):
                req = self.session.current_request
                sql = self.session.request_sql(req) if req is not None else None
                replace = sql is not None and is_commit(sql.encode("utf-8", "replace"))
            elif tag == _Z:
                relay.pending_abort = None
                return buf, frames
            if replace:
                body = relay.pending_abort
                relay.pending_abort = None
                error = b"E" + _PID.pack(len(body) + 4) + body
                out = bytes(buf[:start - 5]) + error + bytes(buf[end:])
                shift = len(error) - (end - start + 5)
                rest = [(t, s + shift, e + shift) for t, s, e in frames[i + 1:]]
                return out, [*frames[:i], (_E, start, start + len(body)), *rest]
        return buf, frames

    def _strip_injected(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        """Drop the replies to what connmgr injected (see the ``_CYCLE``, ``_NAMED`` and
        ``_EXT_TAIL`` modes), feeding the shadow the rest in order. Asynchronous messages
        and errors always reach the client: an error in a marker aborted the client's
        transaction, and the client must know."""
        relay = self.relay
        mode = relay.inject_mode
        pending = self.session.pending
        kept = []
        for tag, start, end in frames:
            drop = False
            if tag == _E and self.journal is not None and relay.held_back(buf, start, end):
                break  # the main loop never sees it: the shadow stays as the client knows it
            if not relay.inject_mode:
                pass
            elif tag == _Z:
                relay.inject_mode = _NONE
                relay.swallowing = False
                relay.injected_done += 1
                drop = mode == _CYCLE
            elif tag == _E:
                relay.injected_errors += 1
                relay.swallowing = False
            elif tag == _N:
                drop = buf.find(_FLUSH_NOTICE, start, end) >= 0
            elif tag == _A or tag == _S:
                pass
            elif mode == _CYCLE:
                drop = True
                if tag == _T:
                    relay.swallowing = buf[start + 2:start + 2 + len(_MARKER_COLUMN)] == _MARKER_COLUMN
                elif tag == _D and relay.swallowing:
                    self._confirm(buf, start)
            elif mode == _NAMED:
                if tag == _T:
                    head = buf[start + 2:start + 2 + len(_MARKER_COLUMN)]
                    if head == _MARKER_COLUMN or head[:len(_DDL_COLUMN)] == _DDL_COLUMN:
                        drop = relay.swallowing = True
                        relay.swallow_marker = head == _MARKER_COLUMN
                elif relay.swallowing:
                    drop = True
                    if tag == _D and relay.swallow_marker:
                        self._confirm(buf, start)
                    elif tag == _CC:
                        relay.swallowing = False
            elif tag in _EXT_REPLIES and pending and pending[0].kind == "S":
                drop = True
                if tag == _D:
                    self._confirm(buf, start)
            if drop:
                continue
            kept.append((tag, start, end))
            if relay.tracking:
                try:
                    self.shadow(tag, buf[start:end])
                except RemoteProtocolError as e:
                    relay.untrack("server", e)
        if len(kept) == len(frames):
            return buf, frames
        out = bytearray()
        new_frames = []
        for tag, start, end in kept:
            base = len(out) + 5
            out += buf[start - 5:end]
            new_frames.append((tag, base, base + end - start))
        return bytes(out), new_frames

    def _confirm(self, buf: bytes, start: int) -> None:
        """The marker's DataRow: a non-NULL value means it wrote its row, i.e. the
        transaction writes and will carry the marker if it commits."""
        relay = self.relay
        if _ROWS.unpack_from(buf, start)[0] >= 1 and _PID.unpack_from(buf, start + 2)[0] >= 0:
            relay.marked = True
            relay.markers_written += 1
            relay.conn.app.metrics.markers_written += 1
            if self.mirror is not None:
                self.mirror.session_marker(self.sid, relay.marker_seq)

    def eof_error(self) -> ClientError | None:
        """Why the server's EOF ends the session: None if it said so itself (FATAL);
        with failover configured, a :class:`BackendLost` (the session may move)."""
        relay = self.relay
        if relay.lost is not None:
            return relay.lost
        if self.journal is not None:
            return BackendLost(lost(relay.backend).message, detail="The server closed the connection unexpectedly.")
        return None if self.last_tag == _E else lost(relay.backend)


@dataclass(frozen=True, slots=True)
class Carry:
    """What a session takes from the relay of one backend to the next (a failover or a
    switchover moved it): nothing else of a dead relay survives."""

    #: transactions the client has seen end: the next marker's number goes on from here
    transactions: int = 0
    #: an ErrorResponse body (40001) the client still has to get (the move rolled back the
    #: transaction it sat idle in)
    pending_abort: bytes | None = None
    #: injection state: the held bytes the next relay delivers still carry a marker's replies
    inject_mode: int = 0
    #: client bytes read for a request the move paused (trio pumps)
    client_input: bytes = b""


class Relay:
    """One client session while it is relayed. See the module docstring."""

    def __init__(self, conn: ClientConnection, backend: BackendSession, client_framer: Framer,
                 markers_on: bool = False, mirrored: bool = True, carry: Carry = Carry()) -> None:  # noqa: B008
        self.conn = conn
        #: the mirror link this session's traffic is copied to (None: not mirrored)
        self.mirror = conn.app.mirror if mirrored else None
        #: set when the server went away (held-back FATAL); the carrier ends the relay with it
        self.lost: BackendLost | None = None
        #: the current transaction saw an error or a ROLLBACK (for the session recorder)
        self.rolled_back = False
        #: server bytes held until an autocommit write's commit is known (see
        #: Downstream._hold_until_commit); None while a too-large result is relayed as it comes
        self.stash: bytearray | None = bytearray()
        #: injection state a move hands to the next relay (the held bytes it delivers
        #: still carry the marker's replies to swallow)
        self.carry_inject = _NONE
        #: bytes for the client the carrier had not sent when the relay ended
        self.unsent = b""
        #: the failover that freezes this session's replies when the primary is suspect
        #: (None without [failover]); the server bytes read meanwhile, unprocessed
        self.freezer = conn.app.failover if conn.journal is not None else None
        self.frozen = bytearray()
        #: a switchover asked to stop taking client input at the next request boundary
        #: (Upstream.at_boundary); client bytes the trio pumps read meanwhile wait in
        #: ``carry_input`` (the engine simply stops reading the socket)
        self.pause_requested = self.freezer is not None and self.freezer.switching
        self._resume = trio.Event()
        self._pump_waiting = False
        self.backend = backend
        self.client_framer = client_framer
        self.tracking = True
        self.starts: deque[float] = deque()
        self.last_activity = time.perf_counter()
        #: embed purge markers and capture DDL (decided by the client: mirroring is on and
        #: the database has the marker function)
        self.markers = markers_on
        self.swallowing = False
        self.swallow_marker = False
        #: transaction number the outstanding marker names; a marker wrote its row in the
        #: current transaction (its ack is held in two-phase mode)
        self.marker_seq = 0
        #: tables created by captured DDL in this transaction, for the guard (connmgr/pair/ddl_apply.py)
        self.new_tables: list[str] = []
        #: when that marker was sent (a failover replays commits in flight in this order)
        self.marker_at = 0.0
        self.marked = False
        #: mirror version of the reply batch holding a commit's ack (two-phase), or 0
        self.hold_version = 0
        self.injected = 0
        self.injected_done = 0
        self.injected_errors = 0
        self.markers_written = 0
        self.ddl_captured = 0
        self.ddl_not_captured = 0
        #: transactions the client has seen end (ReadyForQuery 'I'): numbers the markers
        self.transactions = carry.transactions
        #: an ErrorResponse body (40001) the client still has to get, after a move that
        #: rolled back the transaction it sat idle in (see Downstream._deliver_abort)
        self.pending_abort: bytes | None = carry.pending_abort
        #: what is injected and not yet answered (_NONE, _CYCLE, _NAMED, _EXT_TAIL)
        self.inject_mode = carry.inject_mode
        #: client bytes read but not yet relayed (a switchover's pause, trio pumps)
        self.carry_input = carry.client_input
        self.upstream = Upstream(self)
        self.downstream = Downstream(self)
        self._error: ClientError | None = None
        self._done = trio.Event()
        self._link = None
        self._pumps: trio.CancelScope | None = None
        cfg = conn.app.config.server
        self._idle = cfg.client_idle_timeout
        self._idle_in_tx = cfg.idle_in_transaction_timeout

    # ------------------------------------------------------------------ control

    def stop(self, error: ClientError | None) -> None:
        """End the relay; ``run`` raises ``error`` afterwards (None: close quietly).
        The first reason recorded wins."""
        if self._done.is_set():
            return
        if isinstance(error, BackendLost) and self.freezer is not None:
            self.freezer.freeze(self.backend.server, f"client {self.conn.id}: {error.message}")
        self._error = error
        self._done.set()
        if self._link is not None:
            self._link.detach()
        if self._pumps is not None:
            self._pumps.cancel()

    def held_back(self, buf: bytes, start: int, end: int) -> bool:
        """An ErrorResponse saying the server is going away (shutdown, crash, postmaster
        exit)? Then it is held back from the client -- the session may move instead (see
        connmgr/failover/controller.py) -- and recorded as :attr:`lost`."""
        if not _server_gone(buf, start, end):
            return False
        self.lost = BackendLost(f'server "{self.backend.server.name}" terminated the session',
                                raw=bytes(buf[start - 5:end]))  # fmt: skip
        if self.freezer is not None:
            self.freezer.freeze(self.backend.server, f"client {self.conn.id}: {self.lost.message}")
        return True

    def freezing(self) -> bool:
        """Are this session's server replies to be held (see Failover.freeze)?"""
        freezer = self.freezer
        return freezer is not None and freezer.frozen is not None and freezer.frozen is self.backend.server

    def pause_input(self) -> None:
        """Stop taking client requests at the next boundary (switchover)."""
        self.pause_requested = True
        if self._link is not None:
            self._link.refresh_interest()

    def resume_input(self) -> None:
        """Take client input again (the switchover was abandoned)."""
        self.pause_requested = False
        self._resume.set()
        self._resume = trio.Event()
        if self._link is not None:
            self._link.refresh_interest()

    def input_quiet(self) -> bool:
        """Paused at a boundary with nothing in flight: safe to move (switchover)."""
        if not (self.pause_requested and self.upstream.at_boundary() and not self.conn.session.pending):
            return False
        return self._link is not None or self._pump_waiting or not self.carry_input

    def switch(self, why: str) -> None:
        """The switchover moves this quiet session now."""
        error = BackendLost(f'server "{self.backend.server.name}" is being switched over: {why}')
        if self._link is not None:
            self._link.lose(error)
        else:  # the pumps wait for input or for the paused client: both safe to cancel
            self.stop(error)

    def lose(self, why: str) -> None:
        """The primary is gone (failover decided): end the relay with BackendLost so the
        session moves now, whatever its backend is doing."""
        if self._done.is_set():
            return
        if self._link is not None:
            self._link.lose(BackendLost(f'server "{self.backend.server.name}" is gone: {why}'))
        # The trio pumps (TLS) are not cancelled: that could cut a send to the client in
        # the middle of a message. They move at their backend's next bytes or EOF.

    def carry_over(self) -> Carry:
        """What the next relay of this session starts from (after a move)."""
        return Carry(self.transactions, self.pending_abort, self.carry_inject, self.carry_input)

    def untrack(self, direction: str, exc: RemoteProtocolError) -> None:
        """The shadow met a message it cannot follow (it is never stricter than Postgres,
        so the bytes keep flowing): from now on this session gets no markers and no DDL
        capture, and at a failover it cannot move (08006, reason "untracked"). Logged once
        per session, counted in ``connmgr_sessions_untracked_total``."""
        if not self.tracking:
            return
        self.tracking = False
        self.conn.app.metrics.sessions_untracked += 1
        log.warning(
            "client %d: session shadow lost track (%s): %s; relaying untracked (no markers, no DDL"
            " capture, and it cannot move at a failover)", self.conn.id, direction, exc.message,
        )  # fmt: skip

    def virtualise_notification_pids(self, buf: bytes, frames: list) -> bytes:
        """NotificationResponse carries the sender's backend pid; clients of connmgr know
        sessions by their virtual pids (BackendKeyData), which also survive a move to
        another server. Rewrite the pid of every notification sent by a session of this
        connmgr, so ``notify.pid == conn.info.backend_pid`` means what it means direct."""
        virtual = self.conn.app.virtual_pids
        address = self.backend.server.address
        out = bytearray(buf)
        for tag, start, end in frames:
            if tag == _A and end - start >= 4:
                (pid,) = _PID.unpack_from(buf, start)
                vpid = virtual.get((address, pid))
                if vpid is not None:
                    _PID.pack_into(out, start, vpid)
        return bytes(out)

    # ------------------------------------------------------------------ running

    async def run(self, initial: bytes) -> None:
        """Relay until either side ends. Raises the ClientError that ended it, if any."""
        client, server = self.conn.stream, self.backend.stream
        engine = self.conn.app.engine
        mirror = self.mirror
        if type(client) is FastSocketStream:
            # where the relayed bytes start in each direction of the client's TCP stream
            self.upstream.offset = client.received - len(initial) - self.client_framer.pending_bytes
            self.downstream.offset = client.sent
        if mirror is not None:
            c = self.conn
            mirror.session_opened(c.id, {**c.startup_params, "virtual_pid": str(c.key[0]) if c.key else "", "peer": c.peer})
        try:
            if engine is not None and type(client) is FastSocketStream and type(server) is FastSocketStream:
                self._link = engine.attach(self, client.raw_socket, server.raw_socket, initial)
                if self.carry_input and self._link.attached:
                    data, self.carry_input = self.carry_input, b""
                    self._link._pump(self._link.up, data)
                await self._watch()
            else:
                await self._run_pumps(initial)
        finally:
            if self._link is not None:
                self._link.detach()
            if mirror is not None:
                mirror.session_closed(self.conn.id)
        if self._error is not None:
            raise self._error

    async def _watch(self) -> None:
        """Wait for the end; enforce the idle timeouts meanwhile (if configured)."""
        if not (self._idle or self._idle_in_tx):
            await self._done.wait()
            return
        while not self._done.is_set():
            timeout = self._idle_timeout()
            if timeout is None:  # a request is running: look again soon
                wait = max(0.05, min(t for t in (self._idle, self._idle_in_tx) if t) / 4)
            else:
                wait = self.last_activity + timeout - time.perf_counter()
                if wait <= 0:
                    self.stop(_idle_error(self.conn.session.tx_status))
                    return
            with trio.move_on_after(wait):
                await self._done.wait()

    def _idle_timeout(self) -> float | None:
        s = self.conn.session
        if s.pending:
            return None
        timeout = self._idle if s.tx_status is TxStatus.IDLE else self._idle_in_tx
        return timeout or None

    # ------------------------------------------------------------------ trio pumps (TLS)

    async def _run_pumps(self, initial: bytes) -> None:
        async with trio.open_nursery() as nursery:
            self._pumps = nursery.cancel_scope
            nursery.start_soon(self._guard, self._client_to_backend, initial)
            nursery.start_soon(self._guard, self._backend_to_client)
            await self._watch()
            nursery.cancel_scope.cancel()

    async def _guard(self, pump, *args) -> None:
        try:
            await pump(*args)
        except ClientError as e:
            self.stop(e)
        except RemoteProtocolError as e:
            self.stop(ClientError(e.message, sqlstate=e.sqlstate))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.stop(None)
        else:
            self.stop(None)

    async def _client_to_backend(self, initial: bytes) -> None:
        framer = self.client_framer
        recv = self.conn.stream.receive_some
        send = self.backend.stream.send_all
        process = self.upstream.process
        if initial:  # complete messages the client pipelined behind its authentication
            buf, frames = Framer(max_message_size=framer.max_message_size, frontend=True).feed(initial)
            await _send_backend(send, process(buf, frames), self.backend, self.upstream.journal is not None)
        while not self.upstream.terminated:
            if self.carry_input:  # read by the relay before a switchover moved the session
                data, self.carry_input = self.carry_input, b""
            else:
                data = await recv(RECV_SIZE)
                if not data:
                    framer.feed_eof()
                    return
            if self.pause_requested and self.upstream.at_boundary():
                self.carry_input = data  # a new request: it waits (and may go to the secondary)
                self._pump_waiting = True
                await self._resume.wait()
                self._pump_waiting = False
                data, self.carry_input = self.carry_input, b""
            buf, frames = framer.feed(data)
            if frames:
                await _send_backend(send, process(buf, frames), self.backend, self.upstream.journal is not None)
                if self.upstream.mirror is not None:
                    self.upstream.mirror.flush_soon()

    async def _backend_to_client(self) -> None:
        framer = self.backend.framer
        recv = self.backend.stream.receive_some
        send = self.conn.stream.send_all
        process = self.downstream.process
        data = self.backend.leftover
        while True:
            if not data:
                try:
                    data = await recv(RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    error = self.downstream.eof_error()
                    if error is not None:
                        raise error
                    return
            if self.freezing():
                self.frozen += data
                self.freezer.hold(self)
                if await self.freezer.frozen_outcome():
                    raise BackendLost(f'server "{self.backend.server.name}" is gone')
                data, self.frozen = bytes(self.frozen), bytearray()
            buf, frames = framer.feed(data)
            data = b""
            if frames:
                out = process(buf, frames)
                if self.lost is not None:
                    if out:
                        await send(out)
                    raise self.lost
                if self.hold_version:
                    version, self.hold_version = self.hold_version, 0
                    released = trio.Event()
                    self.downstream.mirror.hold(version, released.set)
                    await released.wait()
                await send(out)
                if self.downstream.mirror is not None:
                    self.downstream.mirror.flush_soon()


async def _send_backend(send, buf: bytes, backend: BackendSession, failover: bool) -> None:
    try:
        await send(buf)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise lost(backend, failover) from None


def lost(backend: BackendSession, failover: bool = False) -> BackendUnavailable | BackendLost:
    """The error for a backend connection that broke (a BackendLost if the session may
    move to the secondary)."""
    what = f'lost connection to server "{backend.server.name}" at {backend.server.address}'
    detail = "The server closed the connection unexpectedly."
    return BackendLost(what, detail=detail) if failover else BackendUnavailable(what, detail=detail)


def _frames_of(data: bytes | bytearray) -> list:
    """Frames (tag, body start, body end) of whole messages ``data``."""
    out = []
    i, n = 0, len(data)
    while i < n:
        length = int.from_bytes(data[i + 1:i + 5], "big")
        out.append((data[i], i + 5, i + 1 + length))
        i += 1 + length
    return out


_GONE_CODES = (b"\0C57P01\0", b"\0C57P02\0", b"\0C57P03\0")


def _server_gone(buf: bytes, start: int, end: int) -> bool:
    """A FATAL ErrorResponse saying the server is going away (admin shutdown, crash of
    another backend, postmaster exit): not the session's own fault."""
    if buf.find(b"\0VFATAL\0", start, end) < 0 and buf.find(b"\0VPANIC\0", start, end) < 0:
        return False
    return any(buf.find(code, start, end) >= 0 for code in _GONE_CODES)


def _idle_error(tx: TxStatus) -> ClientError:
    if tx is TxStatus.IDLE:
        return ClientError("terminating connection due to idle-session timeout", sqlstate="57P05")
    return ClientError("terminating connection due to idle-in-transaction timeout", sqlstate="25P03")
