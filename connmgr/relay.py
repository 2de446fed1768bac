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

* the **relay engine** (:mod:`connmgr.engine`) for plain TCP on both sides: one task
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
from struct import Struct
from typing import TYPE_CHECKING

import trio

from shadow import messages
from shadow.errors import RemoteProtocolError
from shadow.framing import Framer
from shadow.session import PendingRequest, TxStatus

from .errors import BackendUnavailable, ClientError
from .transport import FastSocketStream

if TYPE_CHECKING:
    from .backend import BackendSession
    from .client import ClientConnection

log = logging.getLogger("connmgr.relay")

_Q, _S, _F, _X, _D, _Z, _E, _d, _A, _N, _I, _P, _B = (ord(c) for c in "QSFXDZEdANIPB")
_PID = Struct("!i")
RECV_SIZE = 64 * 1024


class Upstream:
    """Client to server: what each batch of complete messages means to the session."""

    __slots__ = ("relay", "shadow", "stats", "starts", "terminated", "mirror", "offset", "sid", "markers", "session")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.session = relay.conn.session
        self.shadow = relay.conn.session.frontend_message
        #: embed purge markers in committing transactions (see replay/__init__.py)
        self.markers = relay.conn.app.mirror is not None and relay.conn.app.config.mirror.markers
        self.stats = relay.conn.stats
        self.starts = relay.starts
        self.terminated = False
        self.mirror = relay.conn.app.mirror
        self.sid = relay.conn.id
        #: offset of the next byte in the client-to-server TCP stream (set by Relay.run)
        self.offset = 0

    def process(self, buf: bytes, frames: list) -> bytes:
        """Account for ``frames`` of ``buf``; returns the bytes to forward."""
        relay = self.relay
        now = time.perf_counter()
        relay.last_activity = now
        starts = self.starts
        inject_at = -1
        for tag, start, end in frames:
            if tag == _d:
                continue
            if tag == _Q or tag == _S or tag == _F:
                if tag == _Q and self.markers and inject_at < 0 and self._commits(buf, start, end):
                    inject_at = start - 5
                starts.append(now)
            elif (tag == _P or tag == _B) and self.markers and inject_at < 0 and self._extended_commits(tag, buf, start, end):
                inject_at = start - 5
            elif tag == _X:
                self.terminated = True
            if relay.tracking:
                try:
                    self.shadow(tag, buf[start:end])
                except RemoteProtocolError as e:
                    relay.untrack("client", e)
        stats = self.stats
        stats.messages_from_client += len(frames)
        stats.bytes_from_client += len(buf)
        if self.mirror is not None:
            self.mirror.session_data(self.sid, "c", self.offset, buf)
            self.offset += len(buf)
        if inject_at >= 0:
            seq = relay.transactions + 1
            relay.swallow += 1
            if self.mirror is not None:
                self.mirror.session_marker(self.sid, seq)
            return buf[:inject_at] + _marker_query(self.sid, seq) + buf[inject_at:]
        return buf

    def _commits(self, buf: bytes, start: int, end: int) -> bool:
        """A Query that COMMITs a transaction block with nothing else in flight: where the
        purge marker goes (just before it, in the same network write)."""
        s = self.session
        if s.pending or s.tx_status is not TxStatus.IN_TRANSACTION or end - start > 32:
            return False
        return _is_commit(buf[start:end - 1])


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
            return _is_commit(body[first + 1:second])
        sql = s.request_sql(PendingRequest("B", statement=body[first + 1:second].decode("utf-8", "replace")))
        return sql is not None and _is_commit(sql.encode("utf-8", "replace"))


_COMMIT_WORDS = frozenset({"commit", "end", "commit work", "commit transaction", "end work", "end transaction"})


def _is_commit(text: bytes) -> bool:
    """``COMMIT``, ``END`` and their WORK/TRANSACTION forms, any case, spacing, one ``;``."""
    words = text.decode("ascii", "replace").strip().rstrip(";").strip().lower().split()
    return " ".join(words) in _COMMIT_WORDS


def _marker_query(session_id: int, seq: int) -> bytes:
    """The purge marker: a transactional logical decoding message naming this transaction,
    emitted only if the transaction has an xid (so a read-only one stays read-only)."""
    return messages.query(
        "SELECT CASE WHEN pg_catalog.txid_current_if_assigned() IS NOT NULL THEN"
        f" pg_catalog.pg_logical_emit_message(true, 'connmgr', '{session_id}:{seq}') END"
    )


class Downstream:
    """Server to client: the same for the server's messages."""

    __slots__ = ("relay", "shadow", "stats", "starts", "latency", "last_tag", "mirror", "offset", "sid")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.shadow = relay.conn.session.backend_message
        self.stats = relay.conn.stats
        self.starts = relay.starts
        self.latency = self.stats.latency
        self.last_tag = 0
        self.mirror = relay.conn.app.mirror
        self.sid = relay.conn.id
        #: offset of the next byte in the server-to-client TCP stream (set by Relay.run)
        self.offset = 0

    def process(self, buf: bytes, frames: list) -> bytes:
        relay = self.relay
        if relay.swallow:
            buf, frames = self._strip_injected(buf, frames)
            if not frames:
                return b""
        notified = False
        for tag, start, end in frames:
            if tag == _D:
                continue
            if tag == _A:
                notified = True
            elif tag == _Z:
                if buf[start] == _I:
                    relay.transactions += 1
                starts = self.starts
                if starts:
                    now = time.perf_counter()
                    self.latency.observe(now - starts.popleft())
                    self.stats.requests += 1
                    relay.last_activity = now
            if relay.tracking:
                try:
                    self.shadow(tag, buf[start:end])
                except RemoteProtocolError as e:
                    relay.untrack("server", e)
        self.last_tag = frames[-1][0]
        if notified:
            buf = relay.virtualise_notification_pids(buf, frames)
        stats = self.stats
        stats.messages_to_client += len(frames)
        stats.bytes_to_client += len(buf)
        if self.mirror is not None:
            self.mirror.session_data(self.sid, "b", self.offset, buf)
            self.offset += len(buf)
        return buf

    def _strip_injected(self, buf: bytes, frames: list) -> tuple[bytes, list]:
        """Drop the replies to connmgr's own injected query (up to and including its
        ReadyForQuery); asynchronous messages in between still reach the client."""
        relay = self.relay
        kept = []
        for tag, start, end in frames:
            if relay.swallow and tag not in (_A, _N, _S):
                if tag == _Z:
                    relay.swallow -= 1
                    relay.injected_done += 1
                elif tag == _E:
                    relay.injected_errors += 1
                continue
            kept.append((tag, start, end))
        if len(kept) == len(frames):
            return buf, frames
        out = bytearray()
        new_frames = []
        for tag, start, end in kept:
            base = len(out) + 5
            out += buf[start - 5:end]
            new_frames.append((tag, base, base + end - start))
        return bytes(out), new_frames

    def eof_error(self) -> ClientError | None:
        """Why the server's EOF ends the session: None if it said so itself (FATAL)."""
        return None if self.last_tag == _E else lost(self.relay.backend)


class Relay:
    """One client session while it is relayed. See the module docstring."""

    def __init__(self, conn: ClientConnection, backend: BackendSession, client_framer: Framer) -> None:
        self.conn = conn
        self.backend = backend
        self.client_framer = client_framer
        self.tracking = True
        self.starts: deque[float] = deque()
        self.last_activity = time.perf_counter()
        #: replies of injected queries still to swallow (one ReadyForQuery cycle each)
        self.swallow = 0
        self.injected_done = 0
        self.injected_errors = 0
        #: transactions the client has seen end (ReadyForQuery 'I'): numbers the markers
        self.transactions = 0
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
        self._error = error
        self._done.set()
        if self._link is not None:
            self._link.detach()
        if self._pumps is not None:
            self._pumps.cancel()

    def untrack(self, direction: str, exc: RemoteProtocolError) -> None:
        self.tracking = False
        log.warning(
            "client %d: session shadow lost track (%s): %s; relaying untracked",
            self.conn.id, direction, exc.message,
        )

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
        mirror = self.conn.app.mirror
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
            buf, frames = Framer(max_message_size=framer.max_message_size).feed(initial)
            await _send_backend(send, process(buf, frames), self.backend)
        while not self.upstream.terminated:
            data = await recv(RECV_SIZE)
            if not data:
                framer.feed_eof()
                return
            buf, frames = framer.feed(data)
            if frames:
                await _send_backend(send, process(buf, frames), self.backend)
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
            buf, frames = framer.feed(data)
            data = b""
            if frames:
                await send(process(buf, frames))
                if self.downstream.mirror is not None:
                    self.downstream.mirror.flush_soon()


async def _send_backend(send, buf: bytes, backend: BackendSession) -> None:
    try:
        await send(buf)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise lost(backend) from None


def lost(backend: BackendSession) -> BackendUnavailable:
    return BackendUnavailable(
        f'lost connection to server "{backend.server.name}" at {backend.server.address}',
        detail="The server closed the connection unexpectedly.",
    )


def _idle_error(tx: TxStatus) -> ClientError:
    if tx is TxStatus.IDLE:
        return ClientError("terminating connection due to idle-session timeout", sqlstate="57P05")
    return ClientError("terminating connection due to idle-in-transaction timeout", sqlstate="25P03")
