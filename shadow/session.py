# cython: annotation_typing=False
"""The state of one client/server conversation, derived from both directions of its stream.

How it works
------------
The proxy shows :class:`SessionState` every message it forwards, in order within each
direction: :meth:`~SessionState.frontend_message` for client-to-server traffic (including
the untyped startup packet, as tag 0), :meth:`~SessionState.backend_message` for
server-to-client traffic. **It must call them before it forwards the bytes.** Then the
session has always seen at least what each peer has seen, and a reply can never arrive for
a request the session has not been shown -- whatever the interleaving of the two pumps.

The state has two parts.

*Phase* (:class:`Phase`) says where the conversation is: startup, authentication,
initialization (AuthenticationOk received, first ReadyForQuery not yet), normal operation,
one of the three COPY sub-protocols, or closed. ``_FRONTEND`` and ``_BACKEND`` at the end of
this module are the transition tables: for each phase, which message types are legal and
what they do. A known message type that is not legal in the current phase raises
:class:`RemoteProtocolError` naming the phase and the message; a type byte the protocol
does not define is passed over (the proxy forwards it, the server decides).

*Pending* is a FIFO of what the client sent that the server has not finished answering,
in stream order. A server handles messages strictly one after another, so the head of the
FIFO is always the request the next reply belongs to; the client may pipeline any number
of requests behind it. ``_REPLIES`` says, for the head's reply state, what each backend
message does: nothing more (a DataRow), advance the state (ParameterDescription of a
Describe), complete the request (ParseComplete), start a COPY, or fail it. The pairing:

====================  =========================================================
Query                 any of T D C I N, a COPY; completed by ReadyForQuery
Parse / Bind / Close  ParseComplete / BindComplete / CloseComplete
Describe statement    ParameterDescription, then RowDescription or NoData
Describe portal       RowDescription or NoData
Execute               DataRow*, then CommandComplete, EmptyQueryResponse,
                      PortalSuspended, or a COPY
Sync                  ReadyForQuery
FunctionCall          FunctionCallResponse, then ReadyForQuery
Flush                 nothing (not queued)
====================  =========================================================

NoticeResponse, NotificationResponse and ParameterStatus may come at any time after
authentication and never touch the FIFO.

Errors. An ErrorResponse fails the head. For Query, Sync and FunctionCall the server then
sends ReadyForQuery, which completes them. For an extended-protocol message (Parse, Bind,
Describe, Execute, Close) the server discards every message up to the next Sync: those
entries are dropped, and if the client has not sent that Sync yet, what it sends before it
is dropped on arrival. The Sync's ReadyForQuery then completes the Sync. A FATAL or PANIC
error closes the session.

COPY. CopyInResponse puts the session in COPY_IN with the Query/Execute that started it at
the head; what the client sends after that request is the server's copy input. CopyDone,
CopyFail and Terminate are queued as markers; CopyData is not queued at all, since it
never decides where the copy input ends. The server ignores Sync and Flush during
copy-in (libpq pipelines a Sync behind an Execute that turns out to be a COPY and sends
another after CopyDone), so when the COPY ends the session removes the copy input from the
FIFO: through the CopyDone on success; on error through the first CopyDone, CopyFail or
non-copy message (which the server consumed and rejected). Copy markers that reach the
head outside a COPY are dropped, as the server ignores them. COPY_OUT ends with the
server's CopyDone; COPY_BOTH becomes COPY_IN once the server has sent its CopyDone.

Idle. :meth:`SessionState.is_idle` is true only at a ReadyForQuery boundary: normal phase,
transaction status idle, nothing pending, and the last request completed by ReadyForQuery
(a pipeline of Parse/Bind/Execute without Sync leaves the FIFO empty but the server mid-
transaction).

Prepared statements. Named statements are recorded at ParseComplete and forgotten at the
CloseComplete of a Close 'S', at "DEALLOCATE ALL" and "DISCARD ALL", and (best effort, by
looking at the SQL of the request being answered) at "DEALLOCATE name". Portals are recorded
at BindComplete and forgotten at CloseComplete, at a simple Query (the unnamed portal), and
when ReadyForQuery reports the transaction over. Statements made with SQL PREPARE are not
tracked.

Bodies. Frontend bodies are decoded only as far as names and SQL; a malformed one is queued
without them (the server answers it with an ErrorResponse, so the FIFO stays in step).
Backend bodies are inspected only for ReadyForQuery, ErrorResponse, ParameterStatus,
BackendKeyData and Authentication, and the first bytes of CommandComplete; DataRow and
CopyData are never decoded. Client CopyData and server DataRow change no state, so a caller
may skip showing them (it then loses only the check that a DataRow was legal where it came).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from shadow.errors import RemoteProtocolError
from shadow.framing import STREAM_HEAD
from shadow.messages import (
    AuthenticationOk,
    BackendKeyData,
    Body,
    CancelRequest,
    ErrorResponse,
    GSSENCRequest,
    ParameterStatus,
    SSLRequest,
    StartupMessage,
    decode_backend,
    decode_startup,
)

__all__ = ["Phase", "TxStatus", "PendingRequest", "SessionState"]


class TxStatus(enum.Enum):
    """Transaction status as reported by the last ReadyForQuery."""

    IDLE = "I"
    IN_TRANSACTION = "T"
    FAILED = "E"


class Phase(enum.Enum):
    STARTUP = "startup"  #: before the StartupMessage (SSL/GSS negotiation happens here)
    AUTHENTICATING = "authenticating"  #: StartupMessage sent, until AuthenticationOk
    INITIALIZING = "initializing"  #: AuthenticationOk received, until the first ReadyForQuery
    READY = "ready"  #: normal operation; requests may be pending
    COPY_IN = "copy in"  #: the server is reading copy data from the client
    COPY_OUT = "copy out"  #: the server is sending copy data
    COPY_BOTH = "copy both"  #: both directions carry copy data (replication)
    CLOSED = "closed"  #: Terminate processed, FATAL error, or a CancelRequest connection


@dataclass(slots=True, init=False)
class PendingRequest:
    """An entry of :attr:`SessionState.pending`.

    ``kind`` is the frontend type byte as a one-letter string: ``'Q'`` Query, ``'P'``
    Parse, ``'B'`` Bind, ``'D'`` Describe, ``'E'`` Execute, ``'C'`` Close, ``'S'`` Sync,
    ``'F'`` FunctionCall. Behind the head there may also be markers that get no reply of
    their own: ``'c'`` CopyDone, ``'f'`` CopyFail, ``'X'`` Terminate. The head
    (``pending[0]``) is never a marker.

    ``statement`` / ``portal`` name what the request acts on (Parse: statement; Bind: both;
    Execute: portal; Describe and Close: exactly one of them, by their kind). ``sql`` is the
    text of a Query or Parse. All three are None when the message was malformed.

    Read-only by convention: not ``frozen``, because a frozen dataclass costs three times
    as much to create, and one is created per request on the relay's hot path (which is
    also why ``__init__`` is written out: it is compiled with the module, the generated one
    would not be).
    """

    kind: str
    statement: str | None
    portal: str | None
    sql: str | None = field(repr=False)
    #: a named Parse's body as sent (to re-create the statement elsewhere)
    body: bytes | None = field(repr=False)

    def __init__(self, kind: str, statement: str | None = None, portal: str | None = None,
                 sql: str | None = None, body: bytes | None = None) -> None:  # fmt: skip
        self.kind = kind
        self.statement = statement
        self.portal = portal
        self.sql = sql
        self.body = body


# Type bytes, as plain ints for cheap comparison.
_Q, _P, _B, _D, _E, _C, _S, _F, _H, _X = (ord(c) for c in "QPBDECSFHX")
_d, _c, _f, _p = (ord(c) for c in "dcfp")
_R, _K, _Z, _T, _I, _G, _W, _V = (ord(c) for c in "RKZTIGWV")
_N, _A, _n, _t, _s, _v = (ord(c) for c in "NAntsv")
_1, _2, _3 = (ord(c) for c in "123")

_FRONTEND_NAMES = {
    0: "startup packet",
    _Q: "Query",
    _P: "Parse",
    _B: "Bind",
    _D: "Describe",
    _E: "Execute",
    _C: "Close",
    _S: "Sync",
    _F: "FunctionCall",
    _H: "Flush",
    _X: "Terminate",
    _d: "CopyData",
    _c: "CopyDone",
    _f: "CopyFail",
    _p: "PasswordMessage",
}
_BACKEND_NAMES = {
    _R: "Authentication",
    _K: "BackendKeyData",
    _1: "ParseComplete",
    _2: "BindComplete",
    _3: "CloseComplete",
    _C: "CommandComplete",
    _d: "CopyData",
    _c: "CopyDone",
    _G: "CopyInResponse",
    _H: "CopyOutResponse",
    _W: "CopyBothResponse",
    _D: "DataRow",
    _I: "EmptyQueryResponse",
    _E: "ErrorResponse",
    _V: "FunctionCallResponse",
    _v: "NegotiateProtocolVersion",
    _n: "NoData",
    _N: "NoticeResponse",
    _A: "NotificationResponse",
    _t: "ParameterDescription",
    _S: "ParameterStatus",
    _s: "PortalSuspended",
    _Z: "ReadyForQuery",
    _T: "RowDescription",
}


def _name(tag: int, names: dict[int, str]) -> str:
    if tag == 0 and 0 in names:
        return names[0]
    shown = repr(chr(tag)) if 32 <= tag < 127 else f"0x{tag:02x}"
    return f"{names[tag]} ({shown})" if tag in names else f"message type {shown}"


class _Act(enum.Enum):
    """What a backend message does to the request at the head of the FIFO."""

    STAY = "stay"  # more replies to come
    DONE = "done"  # the request is completed
    READY = "ready"  # ReadyForQuery: completes Query/Sync/FunctionCall, sets tx status
    FAIL_SIMPLE = "fail, ReadyForQuery follows"
    FAIL_EXTENDED = "fail, server skips to Sync"
    COPY_IN = "copy in"
    COPY_OUT = "copy out"
    COPY_BOTH = "copy both"


_STAY, _DONE, _READY = _Act.STAY, _Act.DONE, _Act.READY
_FAIL_SIMPLE, _FAIL_EXT = _Act.FAIL_SIMPLE, _Act.FAIL_EXTENDED

# Reply states of the head request. A value that is a str is the next reply state.
_QUERY = "Query"
_AWAIT_READY = "ReadyForQuery after an error"
_DESCRIBE_STMT = "Describe statement"
_DESCRIBE_STMT_2 = "Describe statement, after ParameterDescription"
_DESCRIBE_PORTAL = "Describe portal"
_FUNCTION_CALL = "FunctionCall"
_FUNCTION_CALL_2 = "FunctionCall, after FunctionCallResponse"
_MALFORMED = "malformed extended-protocol message"

_REPLIES: dict[str, dict[int, _Act | str]] = {
    _QUERY: {
        _T: _STAY,
        _D: _STAY,
        _C: _STAY,
        _I: _STAY,
        _G: _Act.COPY_IN,
        _H: _Act.COPY_OUT,
        _W: _Act.COPY_BOTH,
        _E: _FAIL_SIMPLE,
        _Z: _READY,
    },
    _AWAIT_READY: {_Z: _READY},
    "Parse": {_1: _DONE, _E: _FAIL_EXT},
    "Bind": {_2: _DONE, _E: _FAIL_EXT},
    _DESCRIBE_STMT: {_t: _DESCRIBE_STMT_2, _E: _FAIL_EXT},
    _DESCRIBE_STMT_2: {_T: _DONE, _n: _DONE, _E: _FAIL_EXT},
    _DESCRIBE_PORTAL: {_T: _DONE, _n: _DONE, _E: _FAIL_EXT},
    "Execute": {
        _D: _STAY,
        _C: _DONE,
        _I: _DONE,
        _s: _DONE,
        _G: _Act.COPY_IN,
        _H: _Act.COPY_OUT,
        _W: _Act.COPY_BOTH,
        _E: _FAIL_EXT,
    },
    "Close": {_3: _DONE, _E: _FAIL_EXT},
    "Sync": {_Z: _READY, _E: _FAIL_SIMPLE},
    _FUNCTION_CALL: {_V: _FUNCTION_CALL_2, _E: _FAIL_SIMPLE},
    _FUNCTION_CALL_2: {_Z: _READY},
    _MALFORMED: {_E: _FAIL_EXT},
}


def _first_state(req: PendingRequest) -> str:
    """The reply state a request starts in when it reaches the head of the FIFO."""
    kind = req.kind
    if kind == "Q":
        return _QUERY
    if kind == "S":
        return "Sync"
    if kind == "E":
        return "Execute" if req.portal is not None else _MALFORMED
    if kind == "F":
        return _FUNCTION_CALL
    if kind == "P":
        return "Parse" if req.statement is not None else _MALFORMED
    if kind == "B":
        return "Bind" if req.portal is not None else _MALFORMED
    if kind == "D":
        if req.statement is not None:
            return _DESCRIBE_STMT
        return _DESCRIBE_PORTAL if req.portal is not None else _MALFORMED
    if kind == "C":
        return "Close" if req.statement is not None or req.portal is not None else _MALFORMED
    raise AssertionError(f"marker {kind!r} at the head of the FIFO")  # pragma: no cover


_MARKERS = frozenset("cfX")
_COPY_DONE = PendingRequest("c")
_COPY_FAIL = PendingRequest("f")
_TERMINATE = PendingRequest("X")
_SYNC = PendingRequest("S")
_FUNCTION = PendingRequest("F")

_TX_BY_BYTE = {ord(s.value): s for s in TxStatus}
_FATAL_SEVERITIES = frozenset({"FATAL", "PANIC"})
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_DEALLOCATE_RE = re.compile(
    r'\bDEALLOCATE\s+(?:PREPARE\s+)?("(?:[^"]|"")+"|[^\s;"]+)', re.IGNORECASE
)

Handler = Callable[["SessionState", int, Body], None]


class SessionState:
    """Sans-IO shadow of one session. See the module docstring for how it works.

    Public attributes (read them; only the session writes them):

    * ``phase`` -- :class:`Phase`; ``tx_status`` -- :class:`TxStatus` of the last
      ReadyForQuery;
    * ``startup_parameters`` -- the client's StartupMessage parameters; ``parameters`` --
      the latest value of every ParameterStatus;
    * ``backend_pid``, ``backend_secret`` -- from BackendKeyData (``secret`` is ``bytes``
      only for protocol 3.2's long keys);
    * ``prepared_statements`` -- named statement -> query text;
      ``portals`` -- portal -> query text of its statement (None if unknown);
    * ``pending`` -- the FIFO of :class:`PendingRequest` awaiting replies.
    """

    __slots__ = (
        "phase",
        "tx_status",
        "startup_parameters",
        "parameters",
        "backend_pid",
        "backend_secret",
        "prepared_statements",
        "parse_messages",
        "portals",
        "pending",
        "_expect",
        "_synced",
        "_skip_until_sync",
        "_client_terminated",
        "_unnamed_sql",
        "_frontend_table",
        "_backend_table",
    )

    def __init__(self) -> None:
        self.tx_status = TxStatus.IDLE
        self.startup_parameters: dict[str, str] = {}
        self.parameters: dict[str, str] = {}
        self.backend_pid: int | None = None
        self.backend_secret: int | bytes | None = None
        self.prepared_statements: dict[str, str] = {}
        #: named statement -> the body of the Parse that created it (for a session move)
        self.parse_messages: dict[str, bytes] = {}
        self.portals: dict[str, str | None] = {}
        self.pending: deque[PendingRequest] = deque()
        # reply state of pending[0] (meaningful only while pending is non-empty)
        self._expect = _QUERY
        # the last request was completed by ReadyForQuery (a sync point)
        self._synced = False
        # the server is discarding messages until the client's next Sync, which the client
        # has not sent yet
        self._skip_until_sync = False
        self._client_terminated = False
        self._unnamed_sql: str | None = None
        self._set_phase(Phase.STARTUP)

    @classmethod
    def joined(cls) -> SessionState:
        """A session seen from a ReadyForQuery 'I' on (its start-up happened before the
        observer joined: host B's copy of a mirrored session, whose mirror starts after
        the login)."""
        s = cls()
        s._set_phase(Phase.READY)
        s._synced = True
        return s

    # ------------------------------------------------------------------------ public API

    def frontend_message(self, tag: int, body: bytes | bytearray | memoryview) -> None:
        """Account for one message the client sent (tag 0 = untyped startup packet).

        Raises :class:`RemoteProtocolError` if the message is illegal in the current phase
        (the text names both), if it follows a Terminate, or if a startup packet is
        malformed (with the SQLSTATE :func:`~shadow.messages.decode_startup` chose).
        """
        if self._client_terminated:
            raise RemoteProtocolError(f"client sent {_name(tag, _FRONTEND_NAMES)} after Terminate")
        handler = self._frontend_table.get(tag)
        if handler is not None:
            handler(self, tag, body)
        elif self.phase is Phase.CLOSED:
            pass  # the server has gone; the client may not know it yet
        elif tag in _FRONTEND_NAMES or self.phase is Phase.STARTUP:
            raise self._illegal("client", _name(tag, _FRONTEND_NAMES))
        # else: a type the protocol does not define; the server will judge it

    def frontend_streamed(self, tag: int, head: bytes | bytearray | memoryview) -> None:
        """Account for a client message too long to be held whole (shadow/framing.py
        streams it), from the first bytes of its body: a Query or Parse is queued without
        its text, a Parse keeps its name (the statement then cannot be re-created
        elsewhere: :attr:`statements_not_kept`), a Bind its names."""
        handler = None if self._client_terminated else self._frontend_table.get(tag)
        if handler is SessionState._f_parse:
            head = bytes(head)
            i = head.find(0)
            try:
                name = _text(head, 0, i) if i >= 0 else None
            except ValueError:
                name = None
            self._append(PendingRequest("P", statement=name))
        elif handler is SessionState._f_query:
            self._append(PendingRequest("Q"))
        else:  # Bind, FunctionCall, CopyData, or not legal here: the head says enough
            self.frontend_message(tag, head)

    @property
    def statements_not_kept(self) -> list[str]:
        """Prepared statements whose Parse was streamed: no copy to re-create them from."""
        return sorted(self.prepared_statements.keys() - self.parse_messages.keys())

    def backend_message(self, tag: int, body: bytes | bytearray | memoryview) -> None:
        """Account for one message the server sent.

        Raises :class:`RemoteProtocolError` if the message is illegal in the current phase
        or does not answer the request at the head of :attr:`pending` (the text names the
        phase, the message and the request), or if a body the session reads is malformed.
        """
        handler = self._backend_table.get(tag)
        if handler is not None:
            handler(self, tag, body)
        elif tag in _BACKEND_NAMES:
            raise self._illegal("server", _name(tag, _BACKEND_NAMES))

    # The relay's hot path: a whole batch of messages in one call. The requests and replies
    # of normal operation are handled inline; everything else goes through
    # frontend_message / backend_message, so the tables stay the one definition of what is
    # legal (tests/unit/test_session.py checks both ways give the same state).

    def frontend_frames(self, buf: bytes | bytearray, frames: list, lo: int = 0, hi: int | None = None) -> None:
        """Account for ``frames[lo:hi]`` of ``buf`` (the ``(tag, body_start, body_end)``
        triples of :class:`~shadow.framing.Framer`) in order, as :meth:`frontend_message`
        would one by one; CopyData is skipped and a streamed message is followed from its
        head (:meth:`frontend_streamed`). Raises as they do, at the message concerned."""
        pending = self.pending
        for tag, start, end in frames if lo == 0 and hi is None else frames[lo:hi]:
            if tag == _d:
                continue
            if tag > 0xFF:
                if tag & STREAM_HEAD:
                    self.frontend_streamed(tag & 0xFF, buf[start:end])
                continue
            if self._frontend_table is not _REQUESTS or self._skip_until_sync or self._client_terminated:
                self.frontend_message(tag, buf[start:end])
                continue
            if tag == _S:
                req = _SYNC
            elif tag == _B:
                req = _bind_request(buf, start, end)
            elif tag == _E:
                req = _execute_request(buf, start, end)
            elif tag == _P:
                req = _parse_request(buf, start, end)
            elif tag == _Q:
                req = _query_request(buf, start, end)
            elif tag == _D:
                req = _describe_or_close_request("D", buf, start, end)
            else:
                self.frontend_message(tag, buf[start:end])
                continue
            if not pending:
                self._expect = _first_state(req)
            pending.append(req)

    def backend_frames(self, buf: bytes | bytearray, frames: list, lo: int = 0, hi: int | None = None) -> None:
        """Account for ``frames[lo:hi]`` of ``buf`` in order, as :meth:`backend_message`
        would one by one; DataRows and the parts of a streamed message are skipped (they
        decide nothing). Raises as it does, at the message concerned."""
        pending = self.pending
        for tag, start, end in frames if lo == 0 and hi is None else frames[lo:hi]:
            if tag == _D or tag > 0xFF:
                continue
            if pending and self._backend_table is _READY_BACKEND:
                act = _REPLIES[self._expect].get(tag)
                if act is _STAY:
                    if tag != _C or start == end or buf[start] != 68:  # not DEALLOCATE/DISCARD
                        continue
                elif act is _READY:
                    status = _TX_BY_BYTE.get(buf[start]) if end - start == 1 else None
                    if status is not None:
                        self._ready(status)
                        continue
                elif act is _DONE:
                    if tag != _C or start == end or buf[start] != 68:
                        self._done()
                        continue
            self.backend_message(tag, buf[start:end])

    def is_idle(self) -> bool:
        """True at a ReadyForQuery boundary: phase READY, transaction idle, nothing pending
        and the last request completed by ReadyForQuery (not a Sync-less pipeline)."""
        return (
            self.phase is Phase.READY
            and self.tx_status is TxStatus.IDLE
            and not self.pending
            and self._synced
        )

    @property
    def current_request(self) -> PendingRequest | None:
        """The request the next reply belongs to, or None."""
        return self.pending[0] if self.pending else None

    def request_sql(self, req: PendingRequest) -> str | None:
        """The SQL a request runs or prepares, as far as the session knows: the text of a
        Query or Parse, the statement's text for Bind, the portal's for Execute."""
        if req.sql is not None:
            return req.sql
        if req.kind == "B" and req.statement is not None:
            return self._statement_sql(req.statement)
        if req.kind == "E" and req.portal is not None:
            return self.portals.get(req.portal)
        return None

    # --------------------------------------------------------------------------- helpers

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self._frontend_table = _FRONTEND[phase]
        self._backend_table = _BACKEND[phase]

    def _illegal(self, who: str, what: str, problem: str = "") -> RemoteProtocolError:
        text = f"{who} sent {what} in phase {self.phase.name}"
        if problem:
            text += f", {problem}"
        return RemoteProtocolError(text)

    def _unexpected_reply(self, tag: int) -> RemoteProtocolError:
        what = _name(tag, _BACKEND_NAMES)
        if not self.pending:
            return self._illegal("server", what, "with no request pending")
        head = self.pending[0]
        expected = ", ".join(_BACKEND_NAMES.get(t, chr(t)) for t in _REPLIES[self._expect])
        return self._illegal(
            "server",
            what,
            f"but the request being answered is {_FRONTEND_NAMES[ord(head.kind)]}"
            f" (in state {self._expect!r}, expecting {expected})",
        )

    def _statement_sql(self, name: str) -> str | None:
        return self._unnamed_sql if name == "" else self.prepared_statements.get(name)

    def _append(self, req: PendingRequest) -> None:
        """Queue what the client sent, as the server will see it."""
        if self._skip_until_sync:
            if req.kind != "S" and req.kind != "X":
                return  # the server discards it
            self._skip_until_sync = False
        pending = self.pending
        if not pending:
            if req.kind in _MARKERS:
                # Nothing in progress: the server ignores stray copy messages, and a
                # Terminate ends the session.
                if req.kind == "X":
                    self._set_phase(Phase.CLOSED)
                return
            self._expect = _first_state(req)
        pending.append(req)

    def _pop(self, *, synced: bool) -> None:
        """Complete the head request and move to the next one."""
        pending = self.pending
        pending.popleft()
        self._synced = synced
        self._settle()

    def _settle(self) -> None:
        """Drop markers that reached the head (the server ignores copy messages outside a
        COPY); a Terminate at the head closes the session."""
        pending = self.pending
        while pending:
            kind = pending[0].kind
            if kind not in _MARKERS:
                self._expect = _first_state(pending[0])
                return
            if kind == "X":
                pending.clear()
                self._set_phase(Phase.CLOSED)
                return
            pending.popleft()

    def _fail_extended(self) -> None:
        """An extended-protocol message failed: the server skips to the next Sync."""
        pending = self.pending
        pending.popleft()
        self._synced = False
        while pending:
            kind = pending[0].kind
            if kind == "S" or kind == "X":
                self._settle()
                return
            pending.popleft()
        self._skip_until_sync = True

    def _consume_copy_input(self, tag: int, *, success: bool) -> None:
        """Remove from the FIFO what the server read as copy input, i.e. the entries behind
        the head up to the end of the copy stream (Syncs in it were ignored)."""
        pending = self.pending
        head = pending.popleft()
        try:
            while pending:
                kind = pending[0].kind
                if kind == "S":  # ignored by the server during copy-in
                    pending.popleft()
                    continue
                if success and kind != "c":
                    raise self._illegal(
                        "server",
                        _name(tag, _BACKEND_NAMES),
                        f"ending the COPY successfully, but the client sent"
                        f" {_FRONTEND_NAMES[ord(kind)]} instead of CopyDone",
                    )
                pending.popleft()  # CopyDone, CopyFail, or the message that broke the COPY
                return
            if success:
                raise self._illegal(
                    "server",
                    _name(tag, _BACKEND_NAMES),
                    "ending the COPY before the client sent CopyDone",
                )
        finally:
            pending.appendleft(head)

    def _check_command_tag(self, body: bytes | bytearray | memoryview) -> None:
        """Forget prepared statements that a DEALLOCATE or DISCARD ALL just dropped."""
        first = bytes(body[:15])
        if first.startswith(b"DEALLOCATE"):
            if first == b"DEALLOCATE ALL\0":
                self.prepared_statements.clear()
                self.parse_messages.clear()
            elif first == b"DEALLOCATE\0" and self.pending:
                sql = self.request_sql(self.pending[0])
                if sql:
                    for name in _deallocated_names(sql):
                        self.prepared_statements.pop(name, None)
                        self.parse_messages.pop(name, None)
        elif first == b"DISCARD ALL\0":
            self.prepared_statements.clear()
            self.parse_messages.clear()
            self.portals.clear()
            self._unnamed_sql = None

    def _complete(self, head: PendingRequest) -> None:
        """Side effects of a request the server completed successfully."""
        kind = head.kind
        if kind == "P":
            if head.statement:
                self.prepared_statements[head.statement] = head.sql or ""
                if head.body is not None:
                    self.parse_messages[head.statement] = head.body
                else:  # streamed (frontend_streamed): its text was not kept
                    self.parse_messages.pop(head.statement, None)
            else:
                self._unnamed_sql = head.sql
        elif kind == "B":
            self.portals[head.portal or ""] = self._statement_sql(head.statement or "")
        elif kind == "C":
            if head.statement is not None:
                if head.statement:
                    self.prepared_statements.pop(head.statement, None)
                    self.parse_messages.pop(head.statement, None)
                else:
                    self._unnamed_sql = None
            else:
                self.portals.pop(head.portal or "", None)

    # ------------------------------------------------------------------ frontend handlers

    def _f_startup(self, tag: int, body: Body) -> None:
        msg = decode_startup(body)
        if isinstance(msg, StartupMessage):
            self.startup_parameters = dict(msg.parameters)
            self._set_phase(Phase.AUTHENTICATING)
        elif isinstance(msg, CancelRequest):
            self._set_phase(Phase.CLOSED)
        else:
            assert isinstance(msg, (SSLRequest, GSSENCRequest))  # stay in STARTUP

    def _f_ignore(self, tag: int, body: Body) -> None:
        pass

    def _f_query(self, tag: int, body: Body) -> None:
        b = bytes(body)
        self._append(_query_request(b, 0, len(b)))

    # Parse, Bind, Describe, Close and Execute are on the hot path of every extended-protocol
    # request: the session needs only their names (and Parse's text), so they are cut at
    # their NUL terminators instead of being fully decoded (the builders at the end of the
    # module, shared with frontend_frames). A body that does not cut cleanly is still
    # queued, without details: the server judges it.

    def _f_parse(self, tag: int, body: Body) -> None:
        b = bytes(body)
        self._append(_parse_request(b, 0, len(b)))

    def _f_bind(self, tag: int, body: Body) -> None:
        b = bytes(body)
        self._append(_bind_request(b, 0, len(b)))

    def _f_describe_or_close(self, tag: int, body: Body) -> None:
        b = bytes(body)
        self._append(_describe_or_close_request("D" if tag == _D else "C", b, 0, len(b)))

    def _f_execute(self, tag: int, body: Body) -> None:
        b = bytes(body)
        self._append(_execute_request(b, 0, len(b)))

    def _f_sync(self, tag: int, body: Body) -> None:
        self._append(_SYNC)

    def _f_function_call(self, tag: int, body: Body) -> None:
        self._append(_FUNCTION)

    def _f_copy_done(self, tag: int, body: Body) -> None:
        self._append(_COPY_DONE)

    def _f_copy_fail(self, tag: int, body: Body) -> None:
        self._append(_COPY_FAIL)

    def _f_terminate(self, tag: int, body: Body) -> None:
        self._client_terminated = True
        self._append(_TERMINATE)

    # ------------------------------------------------------------------- backend handlers

    def _b_ignore(self, tag: int, body: Body) -> None:
        pass

    def _b_parameter_status(self, tag: int, body: Body) -> None:
        msg = cast(ParameterStatus, decode_backend(tag, body))
        self.parameters[msg.name] = msg.value

    def _b_fatal(self, tag: int, body: Body) -> None:
        """An ErrorResponse before normal operation always ends the connection."""
        decode_backend(tag, body)  # validates
        self._set_phase(Phase.CLOSED)

    def _b_authentication(self, tag: int, body: Body) -> None:
        if isinstance(decode_backend(tag, body), AuthenticationOk):
            self._set_phase(Phase.INITIALIZING)

    def _b_backend_key_data(self, tag: int, body: Body) -> None:
        msg = cast(BackendKeyData, decode_backend(tag, body))
        self.backend_pid = msg.pid
        self.backend_secret = msg.secret

    def _b_first_ready(self, tag: int, body: Body) -> None:
        self.tx_status = self._tx_status(body)
        self._synced = True
        self._set_phase(Phase.READY)  # requests pipelined during startup stay queued

    def _tx_status(self, body: Body) -> TxStatus:
        if len(body) == 1:
            status = _TX_BY_BYTE.get(body[0])
            if status is not None:
                return status
        decode_backend(_Z, body)  # raises the precise error
        raise AssertionError("unreachable")  # pragma: no cover

    def _b_reply(self, tag: int, body: Body) -> None:
        """A message answering the head request (normal phase)."""
        if not self.pending:
            raise self._unexpected_reply(tag)
        act = _REPLIES[self._expect].get(tag)
        if act is _STAY:
            if tag == _C and body[:1] == b"D":  # DEALLOCATE or DISCARD
                self._check_command_tag(body)
        elif act is _READY:
            self._ready(self._tx_status(body))
        elif act is _DONE:
            if tag == _C and body[:1] == b"D":
                self._check_command_tag(body)
            self._done()
        elif act is _Act.COPY_IN:
            self._set_phase(Phase.COPY_IN)
        elif act is _Act.COPY_OUT:
            self._set_phase(Phase.COPY_OUT)
        elif act is _Act.COPY_BOTH:
            self._set_phase(Phase.COPY_BOTH)
        elif isinstance(act, str):
            self._expect = act
        else:  # None: not a reply to this request
            raise self._unexpected_reply(tag)

    def _ready(self, status: TxStatus) -> None:
        """ReadyForQuery completes the head (a Query, Sync or FunctionCall)."""
        self.tx_status = status
        pending = self.pending
        head = pending.popleft()
        if head.kind == "Q":
            # a simple Query drops the unnamed statement and portal
            self._unnamed_sql = None
            if self.portals:
                self.portals.pop("", None)
        if status is TxStatus.IDLE and self.portals:
            self.portals.clear()  # transaction over: every portal is gone
        self._synced = True
        if pending:
            self._settle()

    def _done(self) -> None:
        """The head request completed (not by ReadyForQuery)."""
        pending = self.pending
        head = pending.popleft()
        if head.kind != "E":  # an Execute's completion changes nothing the session keeps
            self._complete(head)
        self._synced = False
        if pending:
            self._settle()

    def _b_error(self, tag: int, body: Body) -> None:
        """ErrorResponse in normal operation."""
        if cast(ErrorResponse, decode_backend(tag, body)).severity in _FATAL_SEVERITIES:
            self._set_phase(Phase.CLOSED)
            return
        if not self.pending:
            raise self._unexpected_reply(tag)
        act = _REPLIES[self._expect].get(tag)
        if act is _FAIL_EXT:
            self._fail_extended()
        elif act is _FAIL_SIMPLE:
            self._expect = _AWAIT_READY
        else:
            raise self._unexpected_reply(tag)

    def _b_copy_input_done(self, tag: int, body: Body) -> None:
        """In COPY_IN (or COPY_BOTH) the server speaks again only when the COPY is over."""
        self._consume_copy_input(tag, success=True)
        self._set_phase(Phase.READY)
        self.backend_message(tag, body)

    def _b_copy_input_error(self, tag: int, body: Body) -> None:
        if cast(ErrorResponse, decode_backend(tag, body)).severity in _FATAL_SEVERITIES:
            self._set_phase(Phase.CLOSED)
            return
        self._consume_copy_input(tag, success=False)
        self._set_phase(Phase.READY)
        self._b_error(tag, body)

    def _b_copy_out_done(self, tag: int, body: Body) -> None:
        self._set_phase(Phase.READY)

    def _b_copy_out_error(self, tag: int, body: Body) -> None:
        self._set_phase(Phase.READY)
        self._b_error(tag, body)

    def _b_copy_both_server_done(self, tag: int, body: Body) -> None:
        self._set_phase(Phase.COPY_IN)  # only the client's copy stream is left


# ------------------------------------------------------------------ request builders
#
# What the session keeps of a request, cut from ``buf[start:end]`` (its body) at the NUL
# terminators; ``buf`` is bytes or bytearray (``find`` with bounds). A body that does not
# cut cleanly, or a name that is not UTF-8, gives a request without details.


def _query_request(buf: bytes | bytearray, start: int, end: int) -> PendingRequest:
    """A Query: one NUL-terminated UTF-8 string (what ``decode_frontend`` checks, without
    building the message record)."""
    if end == start or buf.find(0, start, end) != end - 1:
        return PendingRequest("Q")
    try:
        return PendingRequest("Q", None, None, _text(buf, start, end - 1))
    except ValueError:
        return PendingRequest("Q")


def _parse_request(buf: bytes | bytearray, start: int, end: int) -> PendingRequest:
    """A Parse: statement name and text; a named one keeps its body (to re-create it
    elsewhere)."""
    i = buf.find(0, start, end)
    j = buf.find(0, i + 1, end) if i >= 0 else -1
    if j < 0:
        return PendingRequest("P")
    try:
        name = _text(buf, start, i)
        sql = _text(buf, i + 1, j)
    except ValueError:
        return PendingRequest("P")
    return PendingRequest("P", name, None, sql, bytes(buf[start:end]) if name else None)


def _bind_request(buf: bytes | bytearray, start: int, end: int) -> PendingRequest:
    """A Bind: portal and statement names."""
    i = buf.find(0, start, end)
    j = buf.find(0, i + 1, end) if i >= 0 else -1
    if j < 0:
        return PendingRequest("B")
    try:
        return PendingRequest("B", _text(buf, i + 1, j), _text(buf, start, i))
    except ValueError:
        return PendingRequest("B")


def _describe_or_close_request(kind: str, buf: bytes | bytearray, start: int, end: int) -> PendingRequest:
    """A Describe or Close (``kind``): 'S' or 'P', then one name."""
    if end - start < 2 or buf[end - 1] != 0 or buf.find(0, start + 1, end) != end - 1:
        return PendingRequest(kind)
    try:
        name = _text(buf, start + 1, end - 1)
    except ValueError:
        return PendingRequest(kind)
    which = buf[start]
    if which == _S:
        return PendingRequest(kind, statement=name)
    if which == _P:
        return PendingRequest(kind, portal=name)
    return PendingRequest(kind)


def _execute_request(buf: bytes | bytearray, start: int, end: int) -> PendingRequest:
    """An Execute: portal name, then the int32 row limit."""
    i = buf.find(0, start, end)
    if i < 0 or end != i + 5:
        return PendingRequest("E")
    try:
        return PendingRequest("E", portal=_text(buf, start, i))
    except ValueError:
        return PendingRequest("E")


def _text(body: bytes | bytearray, start: int, end: int) -> str:
    """``body[start:end]`` as text; the empty name (the common case) without decoding.
    Raises ValueError (UnicodeDecodeError) for invalid UTF-8."""
    return "" if start == end else body[start:end].decode()


def _deallocated_names(sql: str) -> list[str]:
    """Statement names a ``DEALLOCATE name`` in ``sql`` drops (best effort: a regex)."""
    names = []
    for token in _DEALLOCATE_RE.findall(sql):
        if token.startswith('"'):
            names.append(token[1:-1].replace('""', '"'))
        elif token.upper() != "ALL":
            names.append(token.translate(_ASCII_LOWER))
    return names


# ------------------------------------------------------------------------ transition tables
#
# For each phase, the message types that are legal and their handlers. A handler may move
# the session to another phase; which ones it can reach is noted beside it.

_S_ = SessionState

_REQUESTS: dict[int, Handler] = {
    _Q: _S_._f_query,
    _P: _S_._f_parse,
    _B: _S_._f_bind,
    _D: _S_._f_describe_or_close,
    _E: _S_._f_execute,
    _C: _S_._f_describe_or_close,
    _S: _S_._f_sync,
    _F: _S_._f_function_call,
    _H: _S_._f_ignore,
    _d: _S_._f_ignore,  # decides nothing (see _consume_copy_input): callers may skip it
    _c: _S_._f_copy_done,
    _f: _S_._f_copy_fail,
    _X: _S_._f_terminate,  # -> CLOSED once everything before it is answered
}

_FRONTEND: dict[Phase, dict[int, Handler]] = {
    # StartupMessage -> AUTHENTICATING; SSLRequest/GSSENCRequest stay; CancelRequest -> CLOSED
    Phase.STARTUP: {0: _S_._f_startup},
    # requests may be pipelined behind the authentication exchange
    Phase.AUTHENTICATING: {_p: _S_._f_ignore, **_REQUESTS},
    Phase.INITIALIZING: _REQUESTS,
    Phase.READY: _REQUESTS,
    # the client cannot know when a COPY starts, so everything stays legal
    Phase.COPY_IN: _REQUESTS,
    Phase.COPY_OUT: _REQUESTS,
    Phase.COPY_BOTH: _REQUESTS,
    Phase.CLOSED: {},
}

_ASYNC: dict[int, Handler] = {
    _N: _S_._b_ignore,
    _A: _S_._b_ignore,
    _S: _S_._b_parameter_status,
}

# CopyData and CopyDone last: they are not replies in COPY_IN
_REPLY_TAGS = (_1, _2, _3, _C, _D, _G, _H, _W, _I, _V, _n, _t, _s, _T, _Z, _d, _c)

_BACKEND: dict[Phase, dict[int, Handler]] = {
    Phase.STARTUP: {_E: _S_._b_fatal},  # -> CLOSED
    Phase.AUTHENTICATING: {
        _R: _S_._b_authentication,  # AuthenticationOk -> INITIALIZING
        _v: _S_._b_ignore,
        _N: _S_._b_ignore,
        _E: _S_._b_fatal,  # -> CLOSED
    },
    Phase.INITIALIZING: {
        _K: _S_._b_backend_key_data,
        _S: _S_._b_parameter_status,
        _N: _S_._b_ignore,
        _Z: _S_._b_first_ready,  # -> READY
        _E: _S_._b_fatal,  # -> CLOSED
    },
    Phase.READY: {
        # replies are checked against the head request by _REPLIES; a COPY response
        # -> COPY_IN / COPY_OUT / COPY_BOTH
        **dict.fromkeys(_REPLY_TAGS, _S_._b_reply),
        _E: _S_._b_error,  # FATAL -> CLOSED
        **_ASYNC,
    },
    Phase.COPY_IN: {
        # whatever the server says next (it sends no copy data here) ends the COPY -> READY
        **dict.fromkeys(_REPLY_TAGS[:-2], _S_._b_copy_input_done),
        _E: _S_._b_copy_input_error,  # -> READY (FATAL -> CLOSED)
        **_ASYNC,
    },
    Phase.COPY_OUT: {
        _d: _S_._b_ignore,
        _c: _S_._b_copy_out_done,  # -> READY
        _E: _S_._b_copy_out_error,  # -> READY (FATAL -> CLOSED)
        **_ASYNC,
    },
    Phase.COPY_BOTH: {
        **dict.fromkeys(_REPLY_TAGS, _S_._b_copy_input_done),  # -> READY
        _d: _S_._b_ignore,
        _c: _S_._b_copy_both_server_done,  # -> COPY_IN
        _E: _S_._b_copy_input_error,  # -> READY (FATAL -> CLOSED)
        **_ASYNC,
    },
    # after Terminate or a FATAL error: notices, notifications and a last error may still
    # be in flight
    Phase.CLOSED: {**_ASYNC, _E: _S_._b_ignore},
}
_READY_BACKEND = _BACKEND[Phase.READY]
del _S_
