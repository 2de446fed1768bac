# cython: annotation_typing=False
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
import math
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from struct import Struct
from typing import Protocol

import trio

from connmgr.config import STREAMED_FROM_CLIENT, STREAMED_FROM_SERVER
from connmgr.errors import BackendLost, BackendUnavailable, ClientError
from connmgr.metrics import Metrics
from connmgr.pair.mirror import MirrorLink
from connmgr.pg.backend import BackendServer, BackendSession
from connmgr.pg.transport import FastSocketStream
from replay.injection import InjectMode, Injector
from shadow.errors import RemoteProtocolError
from shadow.framing import STREAM_HEAD, STREAM_LAST, Framer
from shadow.session import Phase, TxStatus
from shadow.sqltext import is_commit

log = logging.getLogger("connmgr.relay")

_Q, _S, _F, _X, _D, _Z, _E, _d, _A, _N, _I, _P, _B, _T, _CC = (ord(c) for c in "QSFXDZEdANIPBTC")
_c, _f = ord("c"), ord("f")
#: client messages that end a request (see Upstream.at_boundary); 0: nothing sent yet
_BOUNDARY = frozenset((0, ord("Q"), ord("S"), ord("F"), _c, _f))
_PID = Struct("!i")
RECV_SIZE = 64 * 1024
#: after a Terminate or a malformed message, how long the replies to what the client sent
#: before it may take to come back (then the relay ends anyway)
CLOSE_GRACE = 30.0
#: requests after which Postgres flushes its replies (they end with ReadyForQuery)
_FLUSHING = frozenset("QSF")


class Upstream:
    """Client to server: what each batch of complete messages means to the session."""

    __slots__ = ("relay", "stats", "starts", "terminated", "mirror", "offset", "sid", "markers", "session",
                 "injector", "journal", "recorder", "last_tag", "guard")  # fmt: skip

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.session = relay.conn.session
        #: embed purge markers and capture DDL (see replay/markers.py); decided per session
        #: by the client (the database must have the marker function)
        self.markers = relay.markers
        self.injector = relay.injector
        self.stats = relay.conn.stats
        self.starts = relay.starts
        self.terminated = False
        self.mirror = relay.mirror
        self.journal = relay.conn.journal
        self.recorder = relay.conn.recorder
        self.sid = relay.conn.id
        #: with a policy that restricts this client (shadow/policy/guard.py): refused
        #: statements are replaced before anything else sees the batch
        self.guard = relay.guard
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
        if self.guard is not None:  # (the server, the mirror and the journal see the replacement)
            buf, frames = self.guard.filter(buf, frames)
        relay = self.relay
        now = time.perf_counter()
        relay.last_activity = now
        starts = self.starts
        injector = self.injector
        unmarked = injector.unmarked
        plan = None
        syncs = None
        markers = self.markers
        shown = 0  # frames[:shown] were shown to the session's shadow
        for k, (tag, start, end) in enumerate(frames):
            if tag == _d:
                continue
            if tag > 0xFF:  # a part of a message too long to hold whole (shadow/framing.py)
                if tag & STREAM_HEAD:
                    self._streamed(tag & 0xFF, buf[start:end])
                elif tag & STREAM_LAST and (tag & 0xFF == _Q or tag & 0xFF == _F):
                    if syncs is None:  # its end is the sync point
                        syncs = [end]
                    else:
                        syncs.append(end)
                    starts.append(now)
                continue
            if markers and shown < k and (tag == _Q or tag == _S or tag == _F or tag == _P or tag == _B):
                # the injector plans from the shadow's state before this message
                if relay.tracking:
                    self._show(buf, frames, shown, k)
                shown = k
            if tag == _Q or tag == _S or tag == _F:
                if syncs is None:
                    syncs = [end]
                else:
                    syncs.append(end)
                if tag == _F and self.markers:
                    injector.unmarkable()  # a function call is never marked
                if tag == _Q and self.recorder is not None:
                    self.recorder.on_sql(buf[start:end - 1])
                if self.markers and plan is None and not injector.mode and relay.tracking:
                    if tag == _Q:
                        plan = injector.plan_query(buf, start, end, relay.transactions, now)
                    elif tag == _S:
                        plan = injector.plan_sync(start, relay.transactions, now)
                elif self.markers and relay.tracking:  # behind an injection or a planned request
                    if tag == _Q:
                        injector.unplanned_query(buf, start, end)
                    elif tag == _S:
                        injector.unplanned_sync()
                starts.append(now)
            elif tag == _P or tag == _B:
                if tag == _P and self.recorder is not None:
                    i = buf.find(0, start, end)
                    j = buf.find(0, i + 1, end)
                    if 0 <= i < j:
                        self.recorder.on_sql(buf[i + 1:j])
                if self.markers and plan is None and not injector.mode and relay.tracking:
                    plan = injector.plan_extended(tag, buf, start, end, relay.transactions, now)
            elif tag == _X:
                self.terminated = True
            elif tag == _c or tag == _f:  # CopyDone/CopyFail: the COPY's sync point ends here
                if syncs is None:
                    syncs = []
                syncs.append(-end)
        if relay.tracking:
            self._show(buf, frames, shown, len(frames))
        last = frames[-1][0]
        self.last_tag = last & 0xFF if last & STREAM_LAST else last
        stats = self.stats
        stats.messages_from_client += len(frames)
        stats.bytes_from_client += len(buf)
        if self.mirror is not None:
            if injector.unmarked > unmarked:  # before the batch: a secondary with the batch has the count
                self.mirror.session_unmarked(self.sid, injector.unmarked - unmarked)
            self.mirror.session_data(self.sid, "c", self.offset, buf)
            self.offset += len(buf)
        if self.journal is not None:
            self.journal.client(buf, syncs)
        if plan is not None:
            return injector.apply(buf, plan)
        return buf

    def _show(self, buf: bytes, frames: list, lo: int, hi: int) -> None:
        """Show ``frames[lo:hi]`` to the session's shadow (all at once: the hot path)."""
        try:
            self.session.frontend_frames(buf, frames, lo, hi)
        except RemoteProtocolError as e:
            self.relay.untrack("client", e)

    def _streamed(self, tag: int, head: bytes) -> None:
        """The head of a client message too long to hold whole: the recorder sees its
        first bytes (the shadow gets it with the batch); a Query or FunctionCall that may
        commit cannot carry a marker (see replay/injection.py)."""
        relay = self.relay
        log.debug("client %d: streaming a %r message longer than [server] max_buffered_message",
                  relay.conn.id, chr(tag))  # fmt: skip
        relay.ctx.metrics.messages_streamed += 1
        if self.recorder is not None:
            self.recorder.on_streamed(tag, head)
        if self.markers and (tag == _Q or tag == _F):
            self.injector.unmarkable()


class Downstream:
    """Server to client: the same for the server's messages."""

    __slots__ = ("relay", "session", "stats", "starts", "latency", "last_tag", "mirror", "offset", "sid",
                 "journal", "recorder", "injector", "results")  # fmt: skip

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.injector = relay.injector
        self.session = relay.conn.session
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
        #: a client whose class masks columns: its rows masked (shadow/policy/results.py)
        self.results = relay.guard.results if relay.guard is not None else None

    def process(self, buf: bytes, frames: list) -> bytes:
        relay = self.relay
        track = relay.tracking
        if relay.pending_abort is not None:
            buf, frames = self._deliver_abort(buf, frames)
        injector = self.injector
        if injector.mode:
            if injector.mode != InjectMode.CYCLE and self.journal is not None:
                held = buf
                buf, frames = injector.hold(buf, frames)
                if not frames:  # held until the commit: the secondary keeps a copy (host takeover)
                    if self.mirror is not None:
                        self.mirror.session_data(self.sid, "h", 0, held)
                    return b""
            buf, frames, lost_track = injector.strip(buf, frames, track,
                                                     relay.held_back if self.journal is not None else None)
            if lost_track is not None:
                relay.untrack("server", lost_track)
            if injector.confirmed and self.mirror is not None:
                self.mirror.session_marker(self.sid, injector.marker_seq)
            track = False  # strip() fed the shadow
            if not frames:
                return b""
        if self.results is not None:  # (what the client gets: the mirror and journal see it masked)
            buf, frames, _masked = self.results.filter(buf, frames)
        notified = False
        hold = False
        readies = None
        for frame in frames:
            tag, start, end = frame
            if tag == _D or tag > 0xFF:  # rows, and parts of a streamed row: nothing to decide
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
                if injector.unmarked:
                    injector.unmarked -= 1
                if buf[start] == _I:
                    relay.transactions += 1
                    if self.recorder is not None:
                        self.recorder.end_transaction(not relay.rolled_back)
                    relay.rolled_back = False
                    if injector.marked:
                        injector.marked = False
                        hold = True
                starts = self.starts
                if starts:
                    now = time.perf_counter()
                    self.latency.observe(now - starts.popleft())
                    self.stats.requests += 1
                    relay.last_activity = now
        if track:
            try:
                self.session.backend_frames(buf, frames)
            except RemoteProtocolError as e:
                relay.untrack("server", e)
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

    def eof_error(self) -> ClientError | None:
        """Why the server's EOF ends the session: None after the client's Terminate, or if
        the server said why itself (FATAL); with failover configured, a
        :class:`BackendLost` (the session may move)."""
        relay = self.relay
        if relay.upstream.terminated:
            return None
        if relay.lost is not None:
            return relay.lost
        if self.journal is not None:
            return BackendLost(lost(relay.backend).message, detail="The server closed the connection unexpectedly.")
        return None if self.last_tag == _E else lost(relay.backend)


class Freezer(Protocol):
    """What a relay uses of the failover (:class:`connmgr.failover.controller.Failover`):
    holding a suspect primary's replies and waiting for the decision."""

    frozen: BackendServer | None
    switching: bool
    #: with workers: the fleet's shared freeze flag (``is_set``), else None
    fleet_flag: object

    def freeze(self, server: BackendServer, why: str) -> None: ...

    def frozen_by_fleet(self) -> BackendServer | None: ...

    def hold(self, relay: Relay, link: object = None) -> None: ...

    def frozen_outcome(self) -> Awaitable[bool]: ...


class Engine(Protocol):
    """What a relay uses of the relay engine (:class:`connmgr.proxy.engine.RelayEngine`)."""

    def attach(self, relay: Relay, client: object, server: object, initial: bytes) -> object: ...


@dataclass(frozen=True, slots=True)
class RelayContext:
    """What a relay uses of the running connmgr, built once by the composition root
    (:mod:`connmgr.app`)."""

    metrics: Metrics
    #: this connmgr instance's number: names its sessions' marker rows (replay/markers.py)
    origin: int
    #: (server address, backend pid) -> virtual pid (:class:`connmgr.proxy.registry.Registry`)
    virtual_pids: dict[tuple[str, int], int]
    #: the mirror link of a primary connmgr in a pair
    mirror: MirrorLink | None = None
    #: the epoll carrier for plain TCP sessions (None: trio pumps for every session)
    engine: Engine | None = None
    #: with [failover]: holds replies while the primary is suspect
    failover: Freezer | None = None
    #: [server] client_idle_timeout and idle_in_transaction_timeout (0: off)
    idle_timeout: float = 0.0
    idle_in_transaction_timeout: float = 0.0
    #: [server] max_buffered_message: longer messages stream (0: every one is held whole)
    max_buffered_message: int = 0


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
    inject_mode: InjectMode = InjectMode.NONE
    #: client bytes read for a request the move paused (trio pumps)
    client_input: bytes = b""


class Relay:
    """One client session while it is relayed. See the module docstring."""

    def __init__(self, conn, backend: BackendSession, client_framer: Framer, ctx: RelayContext,
                 markers_on: bool = False, mirrored: bool = True, carry: Carry = Carry()) -> None:  # noqa: B008
        #: the client (:class:`connmgr.proxy.client.ClientConnection`: its id, peer, key,
        #: stream, startup_params, stats, session shadow, journal and recorder)
        self.conn = conn
        self.ctx = ctx
        #: the mirror link this session's traffic is copied to (None: not mirrored; also
        #: while the link does not run: a host pair's secondary before its takeover)
        self.mirror = ctx.mirror if mirrored and ctx.mirror is not None and ctx.mirror.running else None
        #: set when the server went away (held-back FATAL); the carrier ends the relay with it
        self.lost: BackendLost | None = None
        #: the current transaction saw an error or a ROLLBACK (for the session recorder)
        self.rolled_back = False
        #: injection state a move hands to the next relay (the held bytes it delivers
        #: still carry the marker's replies to swallow)
        self.carry_inject = InjectMode.NONE
        #: bytes for the client the carrier had not sent when the relay ended
        self.unsent = b""
        #: the failover that freezes this session's replies when the primary is suspect
        #: (None without [failover]); the server bytes read meanwhile, unprocessed
        self.freezer = ctx.failover if conn.journal is not None else None
        self.frozen = bytearray()
        #: a switchover asked to stop taking client input at the next request boundary
        #: (Upstream.at_boundary); client bytes the trio pumps read meanwhile wait in
        #: ``carry_input`` (the engine simply stops reading the socket)
        self.pause_requested = self.freezer is not None and self.freezer.switching
        self._resume = trio.Event()
        self._pump_waiting = False
        self.backend = backend
        self.client_framer = client_framer
        #: the client's policy class, if one restricts it (shadow/policy/guard.py)
        self.guard = conn.guard
        self.max_buffered_message = ctx.max_buffered_message
        self.tracking = True
        self.starts: deque[float] = deque()
        self.last_activity = time.perf_counter()
        #: embed purge markers and capture DDL (decided by the client: mirroring is on and
        #: the database has the marker function)
        self.markers = markers_on
        #: markers and DDL capture put into the client's stream, their replies taken out,
        #: an autocommit write's results held until its commit (replay/injection.py)
        self.injector = Injector(conn.session, ctx.origin, conn.id, ctx.metrics, carry.inject_mode)
        #: mirror version of the reply batch holding a commit's ack (two-phase), or 0
        self.hold_version = 0
        #: transactions the client has seen end (ReadyForQuery 'I'): numbers the markers
        self.transactions = carry.transactions
        #: an ErrorResponse body (40001) the client still has to get, after a move that
        #: rolled back the transaction it sat idle in (see Downstream._deliver_abort)
        self.pending_abort: bytes | None = carry.pending_abort
        #: client bytes read but not yet relayed (a switchover's pause, trio pumps)
        self.carry_input = carry.client_input
        self.upstream = Upstream(self)
        self.downstream = Downstream(self)
        self._fit_guard()
        if self.guard is not None:  # (its class changes with the policy version: shadow/policy/guard.py)
            self.guard.on_switch = self._fit_guard
            self.guard.statements = lambda: dict(self.upstream.session.prepared_statements)
        #: the client's input ended (Terminate, or a message that cannot be framed) while
        #: requests may be unanswered; see :meth:`input_ended`
        self.input_done = False
        self.closing: ClientError | None = None
        self._closing_since = 0.0
        self._error: ClientError | None = None
        #: the trio pump is sending to the client (answered() waits for it)
        self._sending = False
        self._done = trio.Event()
        #: set by stop() and input_ended(): _watch looks again
        self._wake = trio.Event()
        self._link = None
        self._pumps: trio.CancelScope | None = None
        self._idle = ctx.idle_timeout
        self._idle_in_tx = ctx.idle_in_transaction_timeout

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
        self._wake.set()
        if self._link is not None:
            self.unsent = self.unsent or self._link.take_unsent()
            self._link.detach()
        if self._pumps is not None:
            self._pumps.cancel()

    def input_ended(self, error: ClientError | None) -> None:
        """Nothing more is read from the client: it sent Terminate (``error`` None) or a
        message that cannot be framed (``error``). Postgres answers what came before in
        order, and so does connmgr: the relay ends once no request is pending (the client
        then gets ``error``, if any), at the server's EOF (Postgres closes after a
        Terminate), or after :data:`CLOSE_GRACE`, whichever comes first."""
        if self.input_done:
            return
        self.input_done = True
        self.closing = error
        self._closing_since = time.perf_counter()
        if not self.answered():
            self._wake.set()

    def answered(self) -> bool:
        """After :meth:`input_ended`: has everything Postgres will still answer been
        answered and sent? Then the relay ends. Postgres flushes at a ReadyForQuery, so only
        a pending Query, Sync or FunctionCall is waited for; after a malformed message in
        COPY IN nothing is (Postgres hangs up: its COPY waits for data that cannot come)."""
        if not self.input_done:
            return False
        s = self.conn.session
        if any(r.kind in _FLUSHING for r in s.pending) and not (self.closing is not None and s.phase is Phase.COPY_IN):
            return False
        if self._sending or (self._link is not None and self._link.down.pending is not None):
            return False  # bytes for the client are on their way: asked again once sent
        self.stop(self.closing)
        return True

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
        """Are this session's server replies to be held (see Failover.freeze)? With
        workers, also once another worker has set the fleet's freeze flag
        (connmgr/failover/fleet.py)."""
        freezer = self.freezer
        if freezer is None:
            return False
        frozen = freezer.frozen
        if frozen is None:
            flag = freezer.fleet_flag
            if flag is None or not flag.is_set:
                return False
            frozen = freezer.frozen_by_fleet()
        return frozen is not None and frozen is self.backend.server

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
        self.ctx.metrics.sessions_untracked += 1
        log.warning(
            "client %d: session shadow lost track (%s): %s; relaying untracked (no markers, no DDL"
            " capture, and it cannot move at a failover)", self.conn.id, direction, exc.message,
        )  # fmt: skip

    def virtualise_notification_pids(self, buf: bytes, frames: list) -> bytes:
        """NotificationResponse carries the sender's backend pid; clients of connmgr know
        sessions by their virtual pids (BackendKeyData), which also survive a move to
        another server. Rewrite the pid of every notification sent by a session of this
        connmgr, so ``notify.pid == conn.info.backend_pid`` means what it means direct."""
        virtual = self.ctx.virtual_pids
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
        engine = self.ctx.engine
        mirror = self.mirror
        if type(client) is FastSocketStream:
            # where the relayed bytes start in each direction of the client's TCP stream
            self.upstream.offset = client.received - len(initial) - self.client_framer.pending_bytes
            self.downstream.offset = client.sent
        if mirror is not None:
            c = self.conn
            mirror.session_opened(c.id, {
                **c.startup_params, "virtual_pid": str(c.key[0]) if c.key else "",
                "cancel_secret": str(c.key[1]) if c.key else "", "peer": c.peer, "local": _local_address(client),
                "origin": str(self.ctx.origin), "markers": "1" if self.markers else "0",
                "tls": "1" if c.tls else "0",
                # where the relayed bytes start in each direction (after the start-up)
                "client_offset": str(self.upstream.offset), "server_offset": str(self.downstream.offset),
            })  # fmt: skip
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
        if self.unsent and self.input_done:  # replies to what came before its end
            unsent, self.unsent = self.unsent, b""
            delivered = False
            with trio.move_on_after(1):
                try:
                    await client.send_all(unsent)
                    delivered = True
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            if not delivered:  # cut in the middle of a message: an error after it would garble
                self._error = None
        if self._error is not None:
            raise self._error

    async def _watch(self) -> None:
        """Wait for the end; meanwhile enforce the idle timeouts (if configured) and the
        grace after the client's input ended (:meth:`input_ended`)."""
        idle = self._idle or self._idle_in_tx
        while not self._done.is_set():
            wait = math.inf
            now = time.perf_counter()
            if idle:
                timeout = self._idle_timeout()
                if timeout is None:  # a request is running: look again soon
                    wait = max(0.05, min(t for t in (self._idle, self._idle_in_tx) if t) / 4)
                else:
                    wait = self.last_activity + timeout - now
                    if wait <= 0:
                        self.stop(_idle_error(self.conn.session.tx_status))
                        return
            if self.input_done:
                left = self._closing_since + CLOSE_GRACE - now
                if left <= 0:
                    self.stop(self.closing)
                    return
                wait = min(wait, left)
            with trio.move_on_after(wait):
                await self._wake.wait()
            if not self._done.is_set():
                self._wake = trio.Event()

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

    def _fit_guard(self) -> None:
        """Stream long messages only where the guard need not see them whole: a restricted
        client's (its statements are analysed) and a masked client's rows are held whole.
        Called again when the session's class changes (between its transactions)."""
        guard, over = self.guard, self.max_buffered_message
        if over:
            whole = guard is not None and not guard.unrestricted
            self.client_framer.stream(0 if whole else over, STREAMED_FROM_CLIENT)
            masked = guard is not None and guard.results is not None
            self.backend.framer.stream(0 if masked else over, STREAMED_FROM_SERVER)
        if guard is not None:
            self.downstream.results = guard.results

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
            try:
                buf, frames = framer.feed(data)
            except RemoteProtocolError as e:
                buf, frames = e.before
                if frames:
                    await _send_backend(send, process(buf, frames), self.backend, self.upstream.journal is not None)
                self.input_ended(ClientError(e.message, sqlstate=e.sqlstate))
                await trio.sleep_forever()  # the backend pump or the grace ends the relay
            if frames:
                guard = self.guard
                if guard is not None and guard.maintenance is not None:
                    session = self.upstream.session
                    entries = guard.must_wait(buf, frames, not session.is_idle())
                    if entries:  # what it touches is under maintenance: it waits (the others go on)
                        await guard.wait_out(entries)
                await _send_backend(send, process(buf, frames), self.backend, self.upstream.journal is not None)
                if self.upstream.mirror is not None:
                    self.upstream.mirror.flush_soon()
        self.input_ended(None)  # Terminate
        await trio.sleep_forever()

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
                self._sending = True
                try:
                    await send(out)
                finally:
                    self._sending = False
                if self.downstream.mirror is not None:
                    self.downstream.mirror.flush_soon()
                if self.input_done and self.answered():
                    return


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


_GONE_CODES = (b"\0C57P01\0", b"\0C57P02\0", b"\0C57P03\0")


def _local_address(stream) -> str:
    """host:port the client connected to (the VIP with host takeover), "" if unknown."""
    try:
        if isinstance(stream, trio.SSLStream):  # TLS: the address of the TCP stream under it
            stream = stream.transport_stream
        sock = stream.raw_socket if type(stream) is FastSocketStream else stream.socket
        host, port = sock.getsockname()[:2]
    except (AttributeError, OSError):
        return ""
    return f"{host}:{port}"


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
