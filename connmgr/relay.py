"""The relay: two pumps that forward a client's session to its backend and back.

How it works
------------
Each pump reads a chunk, lets the :class:`~shadow.framing.Framer` cut it at message
boundaries, shows each message's type and body to the session shadow (skipping the bulk
types, DataRow and CopyData, whose bodies no decision needs), and forwards the *original
bytes* of every complete message in one ``send_all``. Nothing is re-encoded; a partial
message waits in the framer until it is complete, so anything connmgr itself injects into
a stream lands on a message boundary.

Per chunk the cost is one ``recv``, one ``send`` and a short Python loop over the frames;
counters are plain attributes of the connection (:class:`~connmgr.metrics.ConnStats`).
Request latency is measured from the forwarding of a Query/Sync/FunctionCall to the
ReadyForQuery that answers it, using a FIFO of start times.

The two pumps live in one nursery. The first to finish -- client EOF or Terminate, backend
EOF, a protocol violation, an idle timeout, :meth:`Relay.stop` -- records why and cancels
the other; :meth:`Relay.run` then raises the recorded :class:`~connmgr.errors.ClientError`
(if any) so the caller reports it to this client alone.

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

from shadow.errors import RemoteProtocolError
from shadow.framing import Framer
from shadow.session import TxStatus

from .errors import BackendUnavailable, ClientError

if TYPE_CHECKING:
    from .backend import BackendSession
    from .client import ClientConnection

log = logging.getLogger("connmgr.relay")

_Q, _S, _F, _X, _D, _Z, _E, _d, _A = (ord(c) for c in "QSFXDZEdA")
_PID = Struct("!i")
_RECV = 64 * 1024


class Relay:
    """Both directions of one client session. See the module docstring."""

    def __init__(self, conn: ClientConnection, backend: BackendSession) -> None:
        self.conn = conn
        self.backend = backend
        self.tracking = True
        self._error: ClientError | None = None
        self._nursery: trio.Nursery | None = None
        self._starts: deque[float] = deque()
        self._idle_scope: trio.CancelScope | None = None
        cfg = conn.app.config.server
        self._idle = cfg.client_idle_timeout
        self._idle_in_tx = cfg.idle_in_transaction_timeout

    def stop(self, error: ClientError | None) -> None:
        """End the relay; ``run`` raises ``error`` afterwards (None: close quietly)."""
        if self._error is None:
            self._error = error
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self, initial: bytes) -> None:
        """Relay until either side ends. Raises the ClientError that ended it, if any."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._guard, self._client_to_backend, initial)
            nursery.start_soon(self._guard, self._backend_to_client)
        if self._error is not None:
            raise self._error

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

    def _untrack(self, direction: str, exc: RemoteProtocolError) -> None:
        self.tracking = False
        log.warning(
            "client %d: session shadow lost track (%s): %s; relaying untracked",
            self.conn.id, direction, exc.message,
        )

    # ------------------------------------------------------------------ client -> backend

    def _idle_deadline(self) -> float:
        s = self.conn.session
        if s.pending:
            return float("inf")
        timeout = self._idle if s.tx_status is TxStatus.IDLE else self._idle_in_tx
        return trio.current_time() + timeout if timeout else float("inf")

    async def _client_to_backend(self, initial: bytes) -> None:
        conn = self.conn
        stats = conn.stats
        framer = conn_framer = _client_framer(conn)
        send = self.backend.stream.send_all
        recv = conn.stream.receive_some
        starts = self._starts
        shadow = conn.session.frontend_message
        timed = bool(self._idle or self._idle_in_tx)
        clock = time.perf_counter

        if initial:  # messages the client pipelined behind its authentication
            framer = Framer(max_message_size=conn_framer.max_message_size)
        data = initial
        while True:
            if not data:
                if timed:
                    with trio.CancelScope(deadline=self._idle_deadline()) as scope:
                        self._idle_scope = scope
                        data = await recv(_RECV)
                    self._idle_scope = None
                    if scope.cancelled_caught:
                        raise _idle_error(conn.session.tx_status)
                else:
                    data = await recv(_RECV)
                if not data:
                    conn_framer.feed_eof()
                    return
            buf, frames = framer.feed(data)
            framer = conn_framer
            data = b""
            if not frames:
                continue
            terminate = False
            now = clock()
            for tag, start, end in frames:
                if tag == _d:
                    continue
                if tag == _Q or tag == _S or tag == _F:
                    starts.append(now)
                elif tag == _X:
                    terminate = True
                if self.tracking:
                    try:
                        shadow(tag, buf[start:end])
                    except RemoteProtocolError as e:
                        self._untrack("client", e)
            stats.messages_from_client += len(frames)
            stats.bytes_from_client += len(buf)
            try:
                await send(buf)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _lost(self.backend) from None
            if terminate:
                return

    # ------------------------------------------------------------------ backend -> client

    async def _backend_to_client(self) -> None:
        conn = self.conn
        stats = conn.stats
        latency = stats.latency
        framer = self.backend.framer
        recv = self.backend.stream.receive_some
        send = conn.stream.send_all
        starts = self._starts
        shadow = conn.session.backend_message
        timed = bool(self._idle or self._idle_in_tx)
        clock = time.perf_counter
        last_tag = 0

        data = self.backend.leftover
        while True:
            if not data:
                try:
                    data = await recv(_RECV)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    if last_tag == _E:
                        return  # the server said why (e.g. FATAL on terminate)
                    raise _lost(self.backend)
            buf, frames = framer.feed(data)
            data = b""
            if not frames:
                continue
            ready = notified = False
            for tag, start, end in frames:
                if tag == _D:
                    continue
                if tag == _A:
                    notified = True
                elif tag == _Z:
                    ready = True
                    if starts:
                        latency.observe(clock() - starts.popleft())
                        stats.requests += 1
                if self.tracking:
                    try:
                        shadow(tag, buf[start:end])
                    except RemoteProtocolError as e:
                        self._untrack("server", e)
            last_tag = frames[-1][0]
            if notified:
                buf = self._virtualise_notification_pids(buf, frames)
            stats.messages_to_client += len(frames)
            stats.bytes_to_client += len(buf)
            await send(buf)
            if ready and timed and self._idle_scope is not None:
                self._idle_scope.deadline = self._idle_deadline()


    def _virtualise_notification_pids(self, buf: bytes, frames: list) -> bytes:
        """NotificationResponse carries the sender's backend pid; clients of connmgr know
        sessions by their virtual pids (BackendKeyData), which also survive a move to
        another server. Rewrite the pid of every notification sent by a session of this
        connmgr, so ``notify.pid == conn.info.backend_pid`` means what it means direct."""
        virtual = self.conn.app.virtual_pids
        out = bytearray(buf)
        for tag, start, _end in frames:
            if tag == _A and _end - start >= 4:
                (pid,) = _PID.unpack_from(buf, start)
                vpid = virtual.get((self.backend.server.address, pid))
                if vpid is not None:
                    _PID.pack_into(out, start, vpid)
        return bytes(out)


def _client_framer(conn: ClientConnection) -> Framer:
    return conn.reader_framer


def _lost(backend: BackendSession) -> BackendUnavailable:
    return BackendUnavailable(
        f'lost connection to server "{backend.server.name}" at {backend.server.address}',
        detail="The server closed the connection unexpectedly.",
    )


def _idle_error(tx: TxStatus) -> ClientError:
    if tx is TxStatus.IDLE:
        return ClientError("terminating connection due to idle-session timeout", sqlstate="57P05")
    return ClientError("terminating connection due to idle-in-transaction timeout", sqlstate="25P03")
