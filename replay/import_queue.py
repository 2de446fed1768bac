# cython: annotation_typing=False
"""The import queue of the secondary connection manager (seed 004, Fig. 4 and 8).

How it works
------------
For every client session the primary connmgr mirrors each message it forwards, in both
directions, as a :class:`MirroredMessage` tagged with an LSN: the primary's WAL insert
position as the redo monitor last published it when the message passed -- a *lower bound*
of the real position, monotonic per session. The queue keeps, per session, the messages of
the transactions whose fate the secondary does not know yet, so that a failover can replay
them; everything else leaves as soon as it is settled, so the queue's size is bounded by
what is in flight, never by history.

**Calling order.** :meth:`ImportQueue.on_client_message` and
:meth:`ImportQueue.on_backend_message` must be called in the order the messages passed the
primary (one mirror stream per session keeps that order): a reply is never shown before the
request it answers. :meth:`ImportQueue.on_marker_sent` belongs to the same stream and comes
before the ack of the transaction it names. :meth:`ImportQueue.on_poster_record` comes from
the replication stream, in commit order, with no ordering at all relative to the mirror.

**Transactions and their numbers.** A transaction is what lies between two ReadyForQuery
'I' in the *server's* processing order: it starts with the first request the server
handles after a ReadyForQuery 'I' and ends at the next ReadyForQuery 'I' ('T' and 'E' in
between mean it is still open; an autocommit statement is a transaction of its own).
Sequence number *n* of a session is the transaction closed by its *n*-th ReadyForQuery 'I'
after the one that ends session start-up; the primary numbers its markers the same way.

The client may pipeline, so "after a ReadyForQuery 'I'" cannot be read off the client
stream. The queue cuts the client stream into *units*: the messages up to and including a
request the server answers with exactly one ReadyForQuery (Query, Sync, FunctionCall).
Units wait in a FIFO; the head is the unit the server is answering, and every backend
message belongs to it. A unit joins a transaction only when it reaches the head: then the
server has answered everything before it, so whether it continues the current transaction
(the last ReadyForQuery said 'T'/'E') or starts the next one (it said 'I') is known. Units
behind the head are :meth:`ImportQueue.pipelined_requests`; they belong to no transaction
yet.

COPY FROM STDIN bends the unit rule, and the queue follows the server: from a
CopyInResponse (or CopyBothResponse) until the client's CopyDone or CopyFail, client
CopyData, CopyDone, CopyFail, Sync and Flush belong to the head unit and a Sync there ends
nothing (the server ignores Sync and Flush in copy-in, so the Sync libpq pipelines behind
an Execute that turns out to be a COPY is taken back). An ErrorResponse ends copy-in. Copy
messages outside copy-in that find no unfinished unit are ignored, as the server ignores
them (the tail of a failed COPY).

Messages before the first ReadyForQuery of a session (start-up) are kept apart
(:meth:`ImportQueue.setup_messages`), except password messages and Authentication, which
are not kept at all. Start-up also ends at the first client request (a start-up whose
ReadyForQuery the mirror did not carry). A session the queue first hears of through a
message other than the start-up packet, a password or Authentication/BackendKeyData is
taken to have joined at a ReadyForQuery boundary.

**Outcome.** Each transaction has an :class:`Outcome`, advanced only through the table
``_TRANSITIONS`` at the end of this module by the events of :class:`Event`; an illegal
event raises :class:`IllegalTransition` naming both, which the queue turns into a
:class:`SessionDesync` for that session alone. COMMIT_SENT is a client-side estimate (the
unit starts with COMMIT/END, or the transaction is not in a block and this unit does not
open one); the ack is authoritative. At the ReadyForQuery 'I' that closes a transaction the
queue reads the closing unit's replies: the last CommandComplete among COMMIT, ROLLBACK and
PREPARE TRANSACTION decides (COMMIT of a failed block answers ROLLBACK); without one, an
ErrorResponse means rolled back and its absence committed (autocommit, implicit
transaction).

**Leaving the queue.** ROLLED_BACK, READ_ONLY (committed, no marker) and PREPARED leave at
their ack. A committed transaction with a marker leaves when *both* its ack and its poster
record have arrived, in either order: a record that arrives first is attached (``xid``,
``commit_lsn``) and the transaction stays until the ack, because until then the client is
still waiting for an answer a failover would have to give it. A record that names a
transaction the session has not started yet is an *early record*, kept in a bounded,
insertion-ordered dict and attached when the transaction starts; when the dict is full the
oldest entry is evicted and counted (that transaction then waits for its record until its
session closes: it cannot be replayed twice, because its ack says committed). Records with
no ``connmgr`` marker are counted as ``unmatched_commits``; records naming a transaction
that has already left, or a closed session, as ``stale_markers``.

**Matching is exact.** A record's marker names ``<session_id>:<seq>``. WAL ranges are
computed only as a metric (``range_check=True``): ``range_ambiguous`` counts records whose
commit LSN lies in the ``[first_lsn, ack_lsn or +inf]`` range of two or more held
transactions, ``range_misses`` marked records whose commit LSN lies outside their own
transaction's range (possible because the tags are lower bounds). Both show why the seed's
range rule needs the marker; the check costs O(held transactions) per record, so it is off
by default.

**Bounds.** ``max_sessions``, ``max_messages_per_session``, ``max_bytes_per_session`` and
``max_total_bytes`` (requests, replies, pipelined and start-up messages that are held).
When a message would exceed one of them the queue drops everything it holds for that
session, remembers the session as not replayable and raises :class:`QueueOverflow`; the
global byte bound blames the session whose message crossed it. The same happens with
:class:`SessionDesync` when a session's mirror stops making sense (a ReadyForQuery with no
request pending, an illegal outcome transition). Both are :class:`SessionNotReplayable`
carrying SQLSTATE 40001: at failover that session's client gets a retryable error instead
of a replay. Later messages of the session are ignored until
:meth:`ImportQueue.on_session_closed`. Other sessions are never affected.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from replay.markers import MARKER_PREFIX
from shadow.sqltext import leading_words

__all__ = [
    "MARKER_PREFIX",
    "MirroredMessage",
    "Outcome",
    "Event",
    "next_outcome",
    "Transaction",
    "PosterRecordLike",
    "ImportQueueStats",
    "ImportQueue",
    "ImportQueueError",
    "IllegalTransition",
    "SessionNotReplayable",
    "QueueOverflow",
    "SessionDesync",
    "sql_text",
]


SERIALIZATION_FAILURE = "40001"


# ------------------------------------------------------------------------------ records


@dataclass(slots=True, init=False)
class MirroredMessage:
    """One protocol message as the primary forwarded it.

    ``direction`` is ``"c"`` (client to server) or ``"b"`` (backend to client); ``lsn`` the
    published WAL insert position when it passed (a lower bound); ``offset`` its byte
    offset in its direction's TCP stream; ``tag`` its type byte (0 for the untyped start-up
    packet); ``raw`` the complete message as sent (type byte, length, body).

    Read-only by convention, not ``frozen``: the secondary makes one per mirrored message,
    and a frozen dataclass's generated ``__init__`` cost 28% of its instructions per select
    (labs/cpu_per_tx.py --callgrind); this one is compiled with the module.
    """

    session_id: int
    version: int
    direction: Literal["c", "b"]
    lsn: int
    offset: int
    tag: int
    raw: bytes = field(repr=False)

    def __init__(self, session_id: int, version: int, direction: Literal["c", "b"], lsn: int, offset: int,
                 tag: int, raw: bytes) -> None:  # fmt: skip
        self.session_id = session_id
        self.version = version
        self.direction = direction
        self.lsn = lsn
        self.offset = offset
        self.tag = tag
        self.raw = raw


class Outcome(enum.Enum):
    """What the secondary knows about how a transaction ends."""

    OPEN = "open"
    #: the client sent a request that ends the transaction if it succeeds; no ack yet
    COMMIT_SENT = "commit sent"
    #: the ack says committed and a marker was sent: waiting for its poster record
    COMMITTED_ACK = "committed (ack)"
    ROLLED_BACK = "rolled back"
    #: the ack says committed and no marker was sent: it wrote nothing to replay
    READ_ONLY = "read only"
    #: PREPARE TRANSACTION: now the server's, not the session's; it cannot move
    PREPARED = "prepared"

    # the transition table is looked up per message: Enum's own __hash__ is Python code;
    # members are singletons compared by identity, so the identity hash is the same contract
    __hash__ = object.__hash__


class Event(enum.Enum):
    """What can happen to a transaction (the columns of ``_TRANSITIONS``)."""

    REQUEST = "request sent"
    COMMIT_REQUEST = "commit request sent"
    STILL_OPEN = "ReadyForQuery T/E"
    ACK_COMMIT = "ack: committed, marked"
    ACK_READ_ONLY = "ack: committed, no marker"
    ACK_ROLLBACK = "ack: rolled back"
    ACK_PREPARED = "ack: prepared"
    MARKER = "marker sent"
    RECORD = "poster record"

    __hash__ = object.__hash__  # as Outcome's


@dataclass(slots=True, eq=False, init=False)
class Transaction:
    """One transaction of one session, as long as the queue holds it.

    ``requests`` are its client messages and ``responses`` the server's replies (including
    the ReadyForQuery messages), both in stream order: the replay re-sends the first and
    compares against the second. ``first_lsn`` is the tag of its first request, ``ack_lsn``
    that of the ReadyForQuery 'I' that closed it. ``xid`` and ``commit_lsn`` come from its
    poster record. ``in_block`` is true once it is known to be an explicit transaction block.
    """

    session_id: int
    seq: int
    first_lsn: int
    requests: list[MirroredMessage] = field(repr=False)
    responses: list[MirroredMessage] = field(repr=False)
    ack_lsn: int | None
    outcome: Outcome
    marked: bool
    xid: int | None
    commit_lsn: int | None
    in_block: bool
    nbytes: int

    def __init__(self, session_id: int, seq: int, first_lsn: int, requests: list[MirroredMessage] | None = None,
                 responses: list[MirroredMessage] | None = None, ack_lsn: int | None = None,
                 outcome: Outcome = Outcome.OPEN, marked: bool = False, xid: int | None = None,
                 commit_lsn: int | None = None, in_block: bool = False, nbytes: int = 0) -> None:  # fmt: skip
        # written out (compiled with the module): one is made per transaction
        self.session_id = session_id
        self.seq = seq
        self.first_lsn = first_lsn
        self.requests = [] if requests is None else requests
        self.responses = [] if responses is None else responses
        self.ack_lsn = ack_lsn
        self.outcome = outcome
        self.marked = marked
        self.xid = xid
        self.commit_lsn = commit_lsn
        self.in_block = in_block
        self.nbytes = nbytes

    @property
    def nmessages(self) -> int:
        return len(self.requests) + len(self.responses)


class PosterRecordLike(Protocol):
    """What the queue reads from a decoded commit of the replication stream."""

    @property
    def xid(self) -> int: ...
    @property
    def commit_lsn(self) -> int: ...
    @property
    def messages(self) -> Iterable[tuple[str, bytes | str]]: ...


@dataclass(slots=True)
class ImportQueueStats:
    """Counters since the queue was made. Sizes (sessions, transactions, messages, bytes)
    are properties of :class:`ImportQueue`; depth per session is
    :meth:`ImportQueue.depths`."""

    #: committed transactions purged by their poster record (before or after the ack)
    purged: int = 0
    read_only_purges: int = 0
    rollback_purges: int = 0
    prepared_purges: int = 0
    #: held transactions dropped by on_session_closed
    dropped_at_close: int = 0
    #: commit records without a connmgr marker
    unmatched_commits: int = 0
    #: records whose commit LSN lay in the ranges of two or more held transactions
    range_ambiguous: int = 0
    #: marked records whose commit LSN lay outside their own transaction's range
    range_misses: int = 0
    #: records naming a transaction that had left, or a closed or dropped session
    stale_markers: int = 0
    #: a record for a transaction that already had one
    duplicate_records: int = 0
    #: records kept because their transaction had not started; and those evicted unused
    early_records: int = 0
    early_evicted: int = 0
    #: markers whose content was not "[<origin>:]<session>:<seq>"
    bad_markers: int = 0
    #: markers of another origin (a different primary connmgr instance)
    foreign_markers: int = 0
    #: marker notices for a transaction that had already left (or an unknown session)
    late_marker_notices: int = 0
    #: a record said committed and the ack said otherwise
    verdict_conflicts: int = 0
    overflows: int = 0
    desyncs: int = 0
    #: messages not kept: Terminate, passwords, stray copy data, idle notifications,
    #: anything for a session that is not replayable
    ignored_messages: int = 0


# ------------------------------------------------------------------------------- errors


class ImportQueueError(Exception):
    """Base class of the import queue's errors. Internal: a session the queue cannot
    follow is marked not replayable (counted and logged); no client sees these."""


class IllegalTransition(ImportQueueError):
    """An event that the outcome table does not allow in the transaction's state
    (internal, as every ImportQueueError)."""

    def __init__(self, state: Outcome, event: Event) -> None:
        super().__init__(f"event {event.value!r} is illegal in state {state.value!r}")
        self.state = state
        self.event = event


class SessionNotReplayable(ImportQueueError):
    """The queue has dropped what it held for ``session_id`` and will not replay it; at
    failover its client must get ``sqlstate`` (40001, retryable)."""

    sqlstate = SERIALIZATION_FAILURE

    def __init__(self, session_id: int, reason: str) -> None:
        super().__init__(f"session {session_id} cannot be replayed: {reason}")
        self.session_id = session_id
        self.reason = reason


class QueueOverflow(SessionNotReplayable):
    """A bound of the queue would have been exceeded by this session's message."""


class SessionDesync(SessionNotReplayable):
    """The session's mirror no longer makes sense (see the module docstring)."""


# ------------------------------------------------------------------------ the state table

_O, _E = Outcome, Event
_ACKS = {
    _E.ACK_COMMIT: _O.COMMITTED_ACK,
    _E.ACK_READ_ONLY: _O.READ_ONLY,
    _E.ACK_ROLLBACK: _O.ROLLED_BACK,
    _E.ACK_PREPARED: _O.PREPARED,
}
_TRANSITIONS: dict[Outcome, dict[Event, Outcome]] = {
    _O.OPEN: {
        _E.REQUEST: _O.OPEN,
        _E.COMMIT_REQUEST: _O.COMMIT_SENT,
        _E.STILL_OPEN: _O.OPEN,
        _E.MARKER: _O.OPEN,
        _E.RECORD: _O.OPEN,  # record before the ack (even before the COMMIT is mirrored)
        **_ACKS,  # the commit estimate can miss ("INSERT ...; COMMIT" in one Query)
    },
    _O.COMMIT_SENT: {
        # the same unit again, after a swallowed Sync (COPY)
        _E.COMMIT_REQUEST: _O.COMMIT_SENT,
        _E.STILL_OPEN: _O.OPEN,  # it did not end the block ("BEGIN; ..." in one Query)
        _E.MARKER: _O.COMMIT_SENT,
        _E.RECORD: _O.COMMIT_SENT,
        **_ACKS,
    },
    _O.COMMITTED_ACK: {_E.MARKER: _O.COMMITTED_ACK, _E.RECORD: _O.COMMITTED_ACK},
    # the others leave the queue at their ack: nothing may happen to them any more
    _O.ROLLED_BACK: {},
    _O.READ_ONLY: {},
    _O.PREPARED: {},
}
del _O, _E


def next_outcome(state: Outcome, event: Event) -> Outcome:
    """Return the outcome that ``event`` leads to from ``state``; raise
    :class:`IllegalTransition` (naming both) if the table does not allow it."""
    try:
        return _TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None


# ---------------------------------------------------------------------- wire inspection

_Q, _P, _S, _F, _H, _X = (ord(c) for c in "QPSFHX")
_d, _c, _f = (ord(c) for c in "dcf")
_R, _Z, _CC, _ERR, _G, _W = (ord(c) for c in "RZCEGW")
_p = ord("p")
_STARTUP_REPLIES = frozenset(map(ord, "RKv"))  # only start-up has them
_TERMINATORS = frozenset((_Q, _S, _F))
_COPY_MESSAGES = frozenset((_d, _c, _f))
_IN_COPY = frozenset((_d, _c, _f, _S, _H))
_END_TAGS = {b"COMMIT": "COMMIT", b"ROLLBACK": "ROLLBACK", b"PREPARE TRANSACTION": "PREPARE"}
_SQL_PEEK = 256


def sql_text(tag: int, raw: bytes, limit: int | None = None) -> bytes | None:
    """The SQL of a whole Query or Parse message ``raw`` (type byte, length, body), at
    most ``limit`` bytes of it; None if the message is not one or is malformed."""
    if tag == _Q:
        start = 5
    elif tag == _P:  # statement name, then the query
        start = raw.find(0, 5) + 1
        if start == 0:
            return None
    else:
        return None
    end = raw.find(0, start) if limit is None else raw.find(0, start, start + limit)
    if end < 0:
        return None if limit is None else raw[start : start + limit]
    return raw[start:end]


def _sql_of(msg: MirroredMessage) -> bytes | None:
    """The start of the SQL of a Query or Parse (at most ``_SQL_PEEK`` bytes)."""
    return sql_text(msg.tag, msg.raw, _SQL_PEEK)


def _classify(sql: bytes) -> tuple[bool, bool]:
    """(opens a block, asks to commit) for one statement's leading words (the second only
    for a COMMIT: most statements cost one word)."""
    words = leading_words(sql, 1)
    if not words:
        return False, False
    first = words[0]
    if first == b"BEGIN" or first == b"START":
        return True, False
    if first == b"COMMIT" or first == b"END":
        words = leading_words(sql, 2)
        return False, not (len(words) > 1 and words[1] == b"PREPARED")
    return False, False


# ------------------------------------------------------------------------ session state


class _Phase(enum.Enum):
    SETUP = "setup"  # before the first ReadyForQuery
    READY = "ready"


class _Unit:
    """Client messages up to one request answered by one ReadyForQuery."""

    __slots__ = (
        "txn",
        "buffer",
        "nbytes",
        "terminated",
        "terminator",
        "begins",
        "commits",
        "end_tag",
        "error",
    )

    def __init__(self) -> None:
        self.txn: Transaction | None = None  # set when the unit reaches the head
        self.buffer: list[MirroredMessage] = []  # its messages until then
        self.nbytes = 0
        self.terminated = False
        self.terminator = 0
        self.begins = False  # a statement of it opens a block
        self.commits = False  # a statement of it asks to commit
        self.end_tag: str | None = None  # last COMMIT/ROLLBACK/PREPARE tag among its replies
        self.error = False  # an ErrorResponse among its replies


class _Session:
    __slots__ = (
        "id",
        "phase",
        "held",
        "units",
        "current",
        "next_seq",
        "copy_unit",
        "early_marks",
        "setup",
        "messages",
        "nbytes",
    )

    def __init__(self, session_id: int, phase: _Phase) -> None:
        self.id = session_id
        self.phase = phase
        self.held: dict[int, Transaction] = {}  # seq -> transaction, in seq order
        self.units: deque[_Unit] = deque()  # units awaiting their ReadyForQuery
        self.current: Transaction | None = None  # the server's open transaction
        self.next_seq = 1
        self.copy_unit: _Unit | None = None  # the unit in copy-in, client side
        self.early_marks: set[int] = set()  # marker notices for seqs not started yet
        self.setup: list[MirroredMessage] = []
        self.messages = 0  # everything held for the session
        self.nbytes = 0


_MAX_EARLY_MARKS = 64


# -------------------------------------------------------------------------------- queue


class ImportQueue:
    """Per-session transactions of the mirror stream, purged by poster records. See the
    module docstring for how it works and what happens at its bounds."""

    def __init__(
        self,
        *,
        max_sessions: int = 10_000,
        max_messages_per_session: int = 100_000,
        max_bytes_per_session: int = 64 << 20,
        max_total_bytes: int = 1 << 30,
        max_early_records: int = 4096,
        max_closed_remembered: int = 4096,
        range_check: bool = False,
        origin: int | None = None,
    ) -> None:
        #: the primary connmgr instance whose markers count (None: any); others are
        #: counted as ``foreign_markers``
        self.origin = origin
        self.max_sessions = max_sessions
        self.max_messages_per_session = max_messages_per_session
        self.max_bytes_per_session = max_bytes_per_session
        self.max_total_bytes = max_total_bytes
        self.max_early_records = max_early_records
        self.max_closed_remembered = max_closed_remembered
        self.range_check = range_check
        self.stats = ImportQueueStats()
        #: called with (session id, committed) at every ReadyForQuery 'I' that ends a
        #: transaction (committed: its verdict is not a rollback); e.g. to follow the
        #: session's settings (replay/session_recorder.py)
        self.on_transaction_end: Callable[[int, bool], None] | None = None
        self._sessions: dict[int, _Session] = {}
        self._not_replayable: set[int] = set()
        self._closed: dict[int, None] = {}  # recently closed sessions, oldest first
        self._early: dict[tuple[int, int], PosterRecordLike] = {}
        self._early_per_session: dict[int, int] = {}
        self._messages = 0
        self._bytes = 0

    # ------------------------------------------------------------------------- sizes

    @property
    def sessions(self) -> int:
        """Sessions with state in the queue."""
        return len(self._sessions)

    @property
    def transactions(self) -> int:
        """Transactions held, all sessions."""
        return sum(len(s.held) for s in self._sessions.values())

    @property
    def messages(self) -> int:
        """Messages held (transactions, pipelined units, start-up)."""
        return self._messages

    @property
    def bytes(self) -> int:
        """Bytes of the messages held."""
        return self._bytes

    @property
    def early_records(self) -> int:
        """Poster records waiting for their transaction to start."""
        return len(self._early)

    def depth(self, session_id: int) -> int:
        """Transactions held for one session (0 if unknown)."""
        s = self._sessions.get(session_id)
        return len(s.held) if s is not None else 0

    def depths(self) -> dict[int, int]:
        """Transactions held per session."""
        return {sid: len(s.held) for sid, s in self._sessions.items()}

    def is_replayable(self, session_id: int) -> bool:
        """False once the queue has given up on the session (until it is closed)."""
        return session_id not in self._not_replayable

    # ------------------------------------------------------------------------ queries

    def open_transactions(self, session_id: int | None = None) -> list[Transaction]:
        """The transactions held -- of one session, or of all -- in sequence order per
        session: open ones, and committed ones waiting for their poster record."""
        if session_id is not None:
            s = self._sessions.get(session_id)
            return list(s.held.values()) if s is not None else []
        return [t for s in self._sessions.values() for t in s.held.values()]

    def pipelined_requests(self, session_id: int) -> list[MirroredMessage]:
        """Client messages sent behind the unit the server is answering, in order; they
        join a transaction when the server reaches them."""
        s = self._sessions.get(session_id)
        if s is None:
            return []
        return [m for u in s.units if u.txn is None for m in u.buffer]

    def setup_messages(self, session_id: int) -> list[MirroredMessage]:
        """The start-up packet and the server's start-up messages (not Authentication)."""
        s = self._sessions.get(session_id)
        return list(s.setup) if s is not None else []

    # ------------------------------------------------------------------- mirror input

    def on_client_message(self, msg: MirroredMessage) -> None:
        """Account for a client message. Raises :class:`QueueOverflow` or
        :class:`SessionDesync` (the session is then dropped and not replayable)."""
        s = self._session(msg.session_id, setup=msg.tag == 0 or msg.tag == _p)
        if s is None:
            return
        try:
            self._client(s, msg)
        except IllegalTransition as exc:
            raise self._desync(s, str(exc)) from exc

    def on_backend_message(self, msg: MirroredMessage) -> list[Transaction]:
        """Account for a server message. Returns the transactions that left the queue
        because of it (at most one: the one its ReadyForQuery 'I' settled). Raises
        :class:`QueueOverflow` or :class:`SessionDesync`."""
        s = self._session(msg.session_id, setup=msg.tag in _STARTUP_REPLIES)
        if s is None:
            return []
        try:
            return self._backend(s, msg)
        except IllegalTransition as exc:
            raise self._desync(s, str(exc)) from exc

    def on_message_too_large(self, session_id: int, what: str) -> None:
        """A message of the session is too long to be kept (the mirror streams it): the
        session is dropped and not replayable until it closes. Raises
        :class:`QueueOverflow` naming ``what``."""
        s = self._sessions.get(session_id)
        if s is None:
            if session_id not in self._not_replayable:
                self._not_replayable.add(session_id)
                self.stats.overflows += 1
                raise QueueOverflow(session_id, what)
            return
        raise self._overflow(s, what)

    def on_session_opened(self, session_id: int) -> None:
        """The client connected: the session starts in start-up, which its first
        ReadyForQuery (or, if that was not mirrored, its first request) ends. Without this
        call a session is created by its first message, in start-up only if that message
        is the start-up packet, a password or Authentication/BackendKeyData. Raises
        :class:`QueueOverflow` beyond ``max_sessions``."""
        self._session(session_id, setup=True)

    def on_marker_sent(self, session_id: int, seq: int) -> None:
        """The primary embedded a marker in transaction ``seq`` of the session. Raises
        :class:`SessionDesync` if notices run too far ahead of the transactions."""
        s = self._sessions.get(session_id)
        if s is None:
            self.stats.late_marker_notices += 1
            return
        txn = s.held.get(seq)
        if txn is not None:
            try:
                txn.outcome = next_outcome(txn.outcome, Event.MARKER)
            except IllegalTransition as exc:  # pragma: no cover - every held state allows it
                raise self._desync(s, str(exc)) from exc
            txn.marked = True
        elif seq >= s.next_seq:
            s.early_marks.add(seq)
            if len(s.early_marks) > _MAX_EARLY_MARKS:
                raise self._desync(s, f"more than {_MAX_EARLY_MARKS} marker notices ahead")
        else:
            self.stats.late_marker_notices += 1

    def on_session_closed(self, session_id: int) -> list[Transaction]:
        """Forget the session. Returns the transactions it still held (dropped: a closed
        session is never replayed). The session becomes replayable again if it was not."""
        self._not_replayable.discard(session_id)
        self._forget_early(session_id)
        self._closed[session_id] = None
        if len(self._closed) > self.max_closed_remembered:
            del self._closed[next(iter(self._closed))]
        s = self._sessions.pop(session_id, None)
        if s is None:
            return []
        dropped = list(s.held.values())
        self._messages -= s.messages
        self._bytes -= s.nbytes
        self.stats.dropped_at_close += len(dropped)
        return dropped

    # ----------------------------------------------------------------- poster input

    def on_poster_record(self, rec: PosterRecordLike) -> list[Transaction]:
        """Match a decoded commit by its ``connmgr`` markers. Returns the transactions it
        purged (committed and acknowledged); a record that arrives before the ack is
        attached and its transaction leaves at the ack (see
        :meth:`on_backend_message`); if that ack then says rolled back, the transaction
        still leaves and ``verdict_conflicts`` counts it. Raises nothing for records that
        do not fit (they are counted: ``stale_markers``, ``duplicate_records``,
        ``bad_markers``, ``unmatched_commits``)."""
        markers = list(self._markers(rec))
        if self.range_check:
            self._measure_ranges(rec, markers)
        if not markers:
            self.stats.unmatched_commits += 1
            return []
        purged: list[Transaction] = []
        for sid, seq in markers:
            s = self._sessions.get(sid)
            if s is None:
                if sid in self._closed or sid in self._not_replayable:
                    self.stats.stale_markers += 1
                else:  # the session's mirror has not started yet
                    self._keep_early(sid, seq, rec)
                continue
            txn = s.held.get(seq)
            if txn is None:
                if seq >= s.next_seq:
                    self._keep_early(sid, seq, rec)
                else:
                    self.stats.stale_markers += 1
                continue
            if txn.xid is not None:
                self.stats.duplicate_records += 1
                continue
            try:
                self._attach(txn, rec)
            except IllegalTransition as exc:  # pragma: no cover - every held state allows it
                raise self._desync(s, str(exc)) from exc
            if txn.outcome is Outcome.COMMITTED_ACK:
                self._leave(s, txn)
                self.stats.purged += 1
                purged.append(txn)
        return purged

    # ------------------------------------------------------------------ internals

    def _session(self, session_id: int, *, setup: bool) -> _Session | None:
        s = self._sessions.get(session_id)
        if s is not None:
            return s
        if session_id in self._not_replayable:
            self.stats.ignored_messages += 1
            return None
        if len(self._sessions) >= self.max_sessions:
            self._not_replayable.add(session_id)
            self._forget_early(session_id)
            self.stats.overflows += 1
            raise QueueOverflow(session_id, f"more than {self.max_sessions} sessions")
        self._closed.pop(session_id, None)
        s = self._sessions[session_id] = _Session(
            session_id, _Phase.SETUP if setup else _Phase.READY
        )
        return s

    def _account(self, s: _Session, msg: MirroredMessage) -> int:
        n = len(msg.raw)
        if s.messages >= self.max_messages_per_session:
            raise self._overflow(s, f"more than {self.max_messages_per_session} messages held")
        if s.nbytes + n > self.max_bytes_per_session:
            raise self._overflow(s, f"more than {self.max_bytes_per_session} bytes held")
        if self._bytes + n > self.max_total_bytes:
            raise self._overflow(s, f"the import queue holds {self.max_total_bytes} bytes in all")
        s.messages += 1
        s.nbytes += n
        self._messages += 1
        self._bytes += n
        return n

    def _drop(self, s: _Session) -> None:
        del self._sessions[s.id]
        self._messages -= s.messages
        self._bytes -= s.nbytes
        self._not_replayable.add(s.id)
        self._forget_early(s.id)

    def _overflow(self, s: _Session, reason: str) -> QueueOverflow:
        self._drop(s)
        self.stats.overflows += 1
        return QueueOverflow(s.id, reason)

    def _desync(self, s: _Session, reason: str) -> SessionDesync:
        if s.id in self._sessions:
            self._drop(s)
        self.stats.desyncs += 1
        return SessionDesync(s.id, reason)

    def _leave(self, s: _Session, txn: Transaction) -> None:
        del s.held[txn.seq]
        n = txn.nmessages
        s.messages -= n
        s.nbytes -= txn.nbytes
        self._messages -= n
        self._bytes -= txn.nbytes

    # client side

    def _client(self, s: _Session, msg: MirroredMessage) -> None:
        tag = msg.tag
        if s.phase is _Phase.SETUP:
            if tag == 0:
                self._account(s, msg)
                s.setup.append(msg)
                return
            if tag == _p:  # passwords and SASL exchanges: never kept
                self.stats.ignored_messages += 1
                return
            # a request: start-up is over though its ReadyForQuery was not mirrored
            s.phase = _Phase.READY
        if tag == _X:
            self.stats.ignored_messages += 1
            return
        unit = s.copy_unit
        if unit is not None:
            if tag in _IN_COPY:
                self._add(s, unit, msg)
                if tag == _c or tag == _f:
                    s.copy_unit = None
                return
            s.copy_unit = None  # the server will fail the COPY on this message
        last = s.units[-1] if s.units and not s.units[-1].terminated else None
        if tag in _COPY_MESSAGES and last is None:
            self.stats.ignored_messages += 1  # the server ignores it
            return
        if last is None:
            last = _Unit()
            s.units.append(last)
        self._add(s, last, msg)
        if tag == _Q or tag == _P:
            sql = _sql_of(msg)
            if sql is not None:
                begins, commits = _classify(sql)
                last.begins |= begins
                last.commits |= commits
        if last.txn is None and len(s.units) == 1:
            self._assign(s, last)
        if tag in _TERMINATORS:
            last.terminated = True
            last.terminator = tag
            if last.txn is not None:
                self._sent(last)

    def _add(self, s: _Session, unit: _Unit, msg: MirroredMessage) -> None:
        n = self._account(s, msg)
        txn = unit.txn
        if txn is None:
            unit.buffer.append(msg)
            unit.nbytes += n
        else:
            txn.requests.append(msg)
            txn.nbytes += n

    def _assign(self, s: _Session, unit: _Unit) -> None:
        """The unit reached the head: it joins the server's current transaction or
        starts the next one."""
        txn = s.current
        if txn is None:
            txn = Transaction(s.id, s.next_seq, first_lsn=unit.buffer[0].lsn)
            s.next_seq += 1
            s.held[txn.seq] = s.current = txn
            if txn.seq in s.early_marks:
                s.early_marks.discard(txn.seq)
                txn.outcome = next_outcome(txn.outcome, Event.MARKER)
                txn.marked = True
            rec = self._early.pop((s.id, txn.seq), None)
            if rec is not None:
                self._early_per_session[s.id] -= 1
                self._attach(txn, rec)
        txn.requests.extend(unit.buffer)
        txn.nbytes += unit.nbytes
        unit.buffer = []
        unit.nbytes = 0
        unit.txn = txn
        if unit.terminated:
            self._sent(unit)

    def _sent(self, unit: _Unit) -> None:
        """A unit of the transaction is complete on the client side."""
        txn = unit.txn
        assert txn is not None
        if unit.commits:
            event = Event.COMMIT_REQUEST
        elif unit.begins:
            txn.in_block = True
            event = Event.REQUEST
        elif not txn.in_block:
            event = Event.COMMIT_REQUEST  # autocommit: it ends when it succeeds
        else:
            event = Event.REQUEST
        txn.outcome = next_outcome(txn.outcome, event)

    # server side

    def _backend(self, s: _Session, msg: MirroredMessage) -> list[Transaction]:
        tag = msg.tag
        if s.phase is _Phase.SETUP:
            if tag == _Z:
                s.phase = _Phase.READY
            elif tag != _R:
                self._account(s, msg)
                s.setup.append(msg)
            else:
                self.stats.ignored_messages += 1
            return []
        if not s.units:
            if tag == _Z:
                raise self._desync(s, "ReadyForQuery with no request pending")
            self.stats.ignored_messages += 1  # a notification or notice while idle
            return []
        unit = s.units[0]
        txn = unit.txn
        assert txn is not None  # the head always has its transaction
        n = self._account(s, msg)
        txn.responses.append(msg)
        txn.nbytes += n
        if tag == _Z:
            return self._ready(s, unit, txn, msg)
        if tag == _CC:
            end = _END_TAGS.get(msg.raw[5:-1])
            if end is not None:
                unit.end_tag = end
        elif tag == _ERR:
            unit.error = True
            if s.copy_unit is unit:
                s.copy_unit = None  # the server left copy-in
        elif tag == _G or tag == _W:
            s.copy_unit = unit
            if unit.terminated and unit.terminator == _S:
                unit.terminated = False  # that Sync is swallowed by copy-in
        return []

    def _ready(
        self, s: _Session, unit: _Unit, txn: Transaction, msg: MirroredMessage
    ) -> list[Transaction]:
        if not unit.terminated:
            raise self._desync(s, "ReadyForQuery before the request it answers was complete")
        raw = msg.raw
        status = raw[5] if len(raw) == 6 else -1
        s.units.popleft()
        if s.copy_unit is unit:
            s.copy_unit = None
        left: list[Transaction] = []
        if status == 0x54 or status == 0x45:  # 'T', 'E'
            txn.in_block = True
            txn.outcome = next_outcome(txn.outcome, Event.STILL_OPEN)
        elif status == 0x49:  # 'I'
            verdict = unit.end_tag or ("ROLLBACK" if unit.error else "COMMIT")
            if self.on_transaction_end is not None:
                self.on_transaction_end(s.id, verdict != "ROLLBACK")
            if verdict == "COMMIT":
                event = Event.ACK_COMMIT if txn.marked else Event.ACK_READ_ONLY
            elif verdict == "ROLLBACK":
                event = Event.ACK_ROLLBACK
            else:
                event = Event.ACK_PREPARED
            txn.outcome = next_outcome(txn.outcome, event)
            txn.ack_lsn = msg.lsn
            s.current = None
            outcome = txn.outcome
            if outcome is not Outcome.COMMITTED_ACK and txn.xid is not None:
                self.stats.verdict_conflicts += 1
            if outcome is Outcome.COMMITTED_ACK:
                if txn.xid is not None:  # its record came first
                    self._leave(s, txn)
                    self.stats.purged += 1
                    left.append(txn)
            else:
                self._leave(s, txn)
                left.append(txn)
                if outcome is Outcome.READ_ONLY:
                    self.stats.read_only_purges += 1
                elif outcome is Outcome.ROLLED_BACK:
                    self.stats.rollback_purges += 1
                else:
                    self.stats.prepared_purges += 1
        else:
            raise self._desync(s, "malformed ReadyForQuery")
        if s.units:
            self._assign(s, s.units[0])
        return left

    # poster side

    def _markers(self, rec: PosterRecordLike) -> Iterator[tuple[int, int]]:
        seen: set[tuple[int, int]] = set()
        for prefix, content in rec.messages:
            if prefix != MARKER_PREFIX:
                continue
            parsed = _parse_marker(content)
            if parsed is None:
                self.stats.bad_markers += 1
                continue
            origin, sid, seq = parsed
            if origin is not None and self.origin is not None and origin != self.origin:
                self.stats.foreign_markers += 1  # another primary connmgr's sessions
                continue
            key = (sid, seq)
            if key not in seen:
                seen.add(key)
                yield key

    def _attach(self, txn: Transaction, rec: PosterRecordLike) -> None:
        txn.outcome = next_outcome(txn.outcome, Event.RECORD)
        txn.xid = rec.xid
        txn.commit_lsn = rec.commit_lsn
        txn.marked = True

    def _keep_early(self, sid: int, seq: int, rec: PosterRecordLike) -> None:
        key = (sid, seq)
        if key in self._early:
            self.stats.duplicate_records += 1
            return
        self._early[key] = rec
        self._early_per_session[sid] = self._early_per_session.get(sid, 0) + 1
        self.stats.early_records += 1
        if len(self._early) > self.max_early_records:
            old_sid, _ = old = next(iter(self._early))
            del self._early[old]
            self._early_per_session[old_sid] -= 1
            self.stats.early_evicted += 1

    def _forget_early(self, sid: int) -> None:
        if self._early_per_session.pop(sid, 0):
            for key in [k for k in self._early if k[0] == sid]:
                del self._early[key]

    def _measure_ranges(self, rec: PosterRecordLike, markers: list[tuple[int, int]]) -> None:
        lsn = rec.commit_lsn
        hits = 0
        for s in self._sessions.values():
            for t in s.held.values():
                if t.first_lsn <= lsn and (t.ack_lsn is None or lsn <= t.ack_lsn):
                    hits += 1
        if hits >= 2:
            self.stats.range_ambiguous += 1
        for sid, seq in markers:
            s = self._sessions.get(sid)
            t = s.held.get(seq) if s is not None else None
            if t is not None and not (
                t.first_lsn <= lsn and (t.ack_lsn is None or lsn <= t.ack_lsn)
            ):
                self.stats.range_misses += 1


def _parse_marker(content: bytes | str) -> tuple[int | None, int, int] | None:
    """``b"<origin>:<session_id>:<seq>"`` (a marker row) or ``b"<session_id>:<seq>"``
    -> (origin or None, session_id, seq); None if malformed."""
    if isinstance(content, str):
        content = content.encode("ascii", "replace")
    parts = bytes(content).split(b":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        return None
    if len(parts) == 2:
        return None, int(parts[0]), int(parts[1])
    return int(parts[0]), int(parts[1]), int(parts[2])
