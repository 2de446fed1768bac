# cython: annotation_typing=False
"""The relay engine: every plain-TCP session pumped by one task over one epoll set.

Why
---
A trio task switch costs about 8 us of Python per wakeup; a proxy that gives each
direction of each session its own task pays two per request and reply, which is most of its
CPU (measured: 16 us of the 32 us user time per pgbench select went to switching). The
engine trades those for one wakeup per *batch* of ready sockets: it keeps its own
level-triggered ``select.epoll`` holding both sockets of every attached session, waits for
that epoll's own descriptor to become readable through trio, then pumps every ready socket
synchronously -- ``recv``, frame, process, ``send`` -- and goes back to trio. The
processors (:class:`~connmgr.proxy.relay.Upstream`, :class:`~connmgr.proxy.relay.Downstream`) are the
same as on the trio-pump path, so behaviour does not depend on the carrier.

Structure stays with trio: the engine is one task in the application's nursery, and each
session's own task still owns the session -- it attaches a :class:`Link`, waits for it to
end, and detaches it in ``finally`` (cancellation included). A link that ends records its
reason on the :class:`~connmgr.proxy.relay.Relay` (:meth:`Relay.stop`), which wakes that task.

Flow control: when a ``send`` cannot take everything, the rest is kept on the direction and
its source stops being read (its EPOLLIN interest is dropped) until the destination drains
(EPOLLOUT). So a slow reader holds back exactly one chunk, never an unbounded queue.

Two-phase: when the downstream processor marks a batch as holding a commit's
acknowledgement (``Relay.hold_version``), the batch is parked like an unsent rest, but
without waiting for writability, until the mirror link releases it (the secondary
acknowledged that version, or two-phase degraded); meanwhile the backend is not read.

Fairness: one ``recv`` per ready socket per batch, and a trio checkpoint between batches,
so a bulk transfer cannot starve other sessions or other tasks.

Failover freeze: while the primary is suspect (``Relay.freezing``), what a backend sends
is read but not processed -- it goes to ``relay.frozen`` (up to ``_FROZEN_LIMIT``, then the
backend is not read) -- until the decision: :meth:`Link.thaw` pumps it as usual; a failover
ends the link with BackendLost (:meth:`Link.lose`) and the session moves.

Isolation: an unexpected exception while pumping one session ends that session with
XX000 and is logged; the engine and every other session go on.
"""

from __future__ import annotations

import logging
import select
import socket
from functools import partial

import trio

from connmgr.errors import ClientError
from connmgr.proxy.idle_wait import open_idle_wait
from connmgr.proxy.relay import Relay, lost
from shadow.errors import RemoteProtocolError
from shadow.framing import Framer

log = logging.getLogger("connmgr.engine")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_RECV = 64 * 1024
_BATCH = 512
_BATCHES_PER_WAKEUP = 4
#: server bytes a link keeps unprocessed while the primary is suspect
_FROZEN_LIMIT = 8 << 20


class _Direction:
    """One direction of one session: where from, where to, and what is still unsent."""

    __slots__ = ("src", "dst", "src_fd", "dst_fd", "framer", "process", "pending", "upstream", "held", "waiting")

    def __init__(self, src: socket.socket, dst: socket.socket, framer: Framer, process, upstream: bool) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.framer = framer
        self.process = process
        self.pending: memoryview | None = None
        self.upstream = upstream
        #: two-phase: ``pending`` holds a commit's acknowledgement until the mirror releases it
        self.held = False
        #: client to server: a batch held while what it touches is under maintenance
        #: (buf, frames), not read further until it goes on (shadow/policy/maintenance.py)
        self.waiting = None


class Link:
    """The engine's handle on one session (client socket + backend socket)."""

    __slots__ = ("engine", "relay", "up", "down", "client_fd", "backend_fd", "_flags", "attached")

    def __init__(self, engine: RelayEngine, relay: Relay, client: socket.socket, backend: socket.socket) -> None:
        self.engine = engine
        self.relay = relay
        self.up = _Direction(client, backend, relay.client_framer, relay.upstream.process, True)
        self.down = _Direction(backend, client, relay.backend.framer, relay.downstream.process, False)
        self.client_fd = client.fileno()
        self.backend_fd = backend.fileno()
        self._flags = {self.client_fd: _IN, self.backend_fd: _IN}
        self.attached = False

    # ------------------------------------------------------------------ lifecycle

    def detach(self) -> None:
        """Leave the engine (idempotent; safe from any task of this trio run)."""
        if self.attached:
            self.attached = False
            self.engine._forget(self)

    def take_unsent(self) -> bytes:
        """What was processed for the client but not yet sent (b"" if nothing), taken."""
        pending, self.down.pending = self.down.pending, None
        return b"" if pending is None else bytes(pending)

    def _end(self, error: ClientError | None) -> None:
        self.detach()
        self.relay.unsent = self.relay.unsent or self.take_unsent()
        self.relay.stop(error)

    # ------------------------------------------------------------------ pumping

    def refresh_interest(self) -> None:
        """The relay's input pause changed (switchover): recompute what to wait for."""
        if self.attached:
            self._interest()

    def on_event(self, fd: int, events: int) -> None:
        if events & _OUT:
            d = self.down if fd == self.client_fd else self.up
            if d.pending is not None:
                self._flush(d)
                if not self.attached:
                    return
        if events & ~_OUT:  # readable, or hung up / error: recv tells which
            d = self.up if fd == self.client_fd else self.down
            if d.pending is None:
                self._pump(d, None)

    def _pump(self, d: _Direction, data: bytes | None) -> None:
        if data is None:
            if d.upstream and self.relay.pause_requested and self.relay.upstream.at_boundary():
                return self._interest()  # a switchover: leave the next request in the socket
            try:
                data = d.src.recv(_RECV)
            except BlockingIOError:
                return
            except OSError as e:
                return self._end(self._src_failed(d, e))
            if not data:
                return self._end(self._eof(d))
        if not d.upstream and self.relay.freezer is not None and self.relay.freezing():
            return self._freeze(data)
        closing = None
        try:
            try:
                buf, frames = d.framer.feed(data)
            except RemoteProtocolError as e:
                if not d.upstream:
                    raise
                # the client's stream cannot be cut any more: what came before is relayed
                # and answered, then the client gets the error (Relay.input_ended)
                buf, frames = e.before
                closing = ClientError(e.message, sqlstate=e.sqlstate)
            if frames:
                guard = self.relay.guard
                if d.upstream and closing is None and guard is not None and guard.maintenance is not None:
                    session = self.relay.upstream.session
                    entries = guard.must_wait(buf, frames, not session.is_idle())
                    if entries:  # on hold: the client is not read until it goes on
                        d.waiting = (buf, frames)
                        self._interest()
                        guard.hold(entries, partial(self._unhold, d))
                        return
                buf = d.process(buf, frames)
            elif closing is None:
                return
        except ClientError as e:
            return self._end(e)
        except RemoteProtocolError as e:
            return self._end(ClientError(e.message, sqlstate=e.sqlstate))
        self._forward(d, buf, frames, closing)

    def _unhold(self, d: _Direction) -> None:
        """What a held batch waited for is over (or its limit came): on it goes."""
        if d.waiting is None:
            return
        (buf, frames), d.waiting = d.waiting, None
        if not self.attached:
            return
        try:
            buf = d.process(buf, frames)
        except ClientError as e:
            return self._end(e)
        except RemoteProtocolError as e:
            return self._end(ClientError(e.message, sqlstate=e.sqlstate))
        self._forward(d, buf, frames, None)
        if self.attached:
            self._interest()

    def _forward(self, d: _Direction, buf, frames: list, closing: ClientError | None) -> None:
        relay = self.relay
        if closing is not None:
            if frames:
                self._send(d, buf)
            return self._input_ended(closing)
        if relay.lost is not None and not d.upstream:
            if buf:
                self._send(d, buf)
            return self._end(relay.lost)
        if relay.hold_version and not d.upstream:
            version, relay.hold_version = relay.hold_version, 0
            d.pending = memoryview(buf)
            d.held = True
            self._interest()
            relay.mirror.hold(version, partial(self._release, d))
            return
        self._send(d, buf)
        if not self.attached:
            return
        if d.upstream:
            if relay.upstream.terminated:
                self._input_ended(None)
        elif relay.input_done and d.pending is None:
            relay.answered()

    def _input_ended(self, closing: ClientError | None) -> None:
        """Terminate or a malformed message: the client is read no more; the server's
        replies to what came before still go to it (see Relay.input_ended)."""
        if not self.attached:
            return
        self.relay.input_ended(closing)
        if self.attached:
            self._interest()

    def _freeze(self, data: bytes) -> None:
        relay = self.relay
        relay.frozen += data
        relay.freezer.hold(relay, self)
        if len(relay.frozen) >= _FROZEN_LIMIT and self._flags[self.backend_fd] & _IN:
            self._flags[self.backend_fd] &= ~_IN
            self.engine._modify(self.backend_fd, self._flags[self.backend_fd])

    def thaw(self) -> None:
        """The primary is alive after all: pump what was held, read the backend again."""
        relay = self.relay
        data, relay.frozen = bytes(relay.frozen), bytearray()
        if not self.attached:
            return
        if data:
            self._pump(self.down, data)
        if self.attached:
            self._interest()

    def lose(self, error: ClientError) -> None:
        """The primary is gone: end with ``error`` (a BackendLost) so the session moves."""
        if self.attached:
            self._end(error)

    def _send(self, d: _Direction, buf: bytes) -> None:
        try:
            n = d.dst.send(buf)
        except BlockingIOError:
            n = 0
        except OSError as e:
            return self._end(self._dst_failed(d, e))
        if n < len(buf):
            d.pending = memoryview(buf)[n:]
            self._interest()

    def _release(self, d: _Direction) -> None:
        """The mirror acknowledged (or two-phase degraded): send the held reply."""
        if not d.held:
            return
        d.held = False
        if self.attached and d.pending is not None:
            self._flush(d)
            if self.attached:
                self._interest()

    def _flush(self, d: _Direction) -> None:
        view = d.pending
        try:
            n = d.dst.send(view)
        except BlockingIOError:
            return
        except OSError as e:
            return self._end(self._dst_failed(d, e))
        d.pending = view[n:] if n < len(view) else None
        if d.pending is None:
            if not d.upstream and self.relay.input_done and self.relay.answered():
                return
            self._interest()

    def _interest(self) -> None:
        """Recompute what to wait for on both sockets: read a source only while its
        direction has nothing pending; wait for writability where something is."""
        up, down = self.up, self.down
        relay = self.relay
        read_client = up.pending is None and up.waiting is None and not relay.input_done \
            and not (relay.pause_requested and relay.upstream.at_boundary())  # fmt: skip
        want = {
            self.client_fd: (_IN if read_client else 0) | (_OUT if down.pending is not None and not down.held else 0),
            self.backend_fd: (_IN if down.pending is None and len(self.relay.frozen) < _FROZEN_LIMIT else 0)
            | (_OUT if up.pending is not None else 0),
        }
        for fd, flags in want.items():
            if self._flags[fd] != flags:
                self._flags[fd] = flags
                self.engine._modify(fd, flags)

    # ------------------------------------------------------------------ endings

    def _eof(self, d: _Direction) -> ClientError | None:
        if d.upstream:
            try:
                d.framer.feed_eof()
            except RemoteProtocolError as e:
                return ClientError(e.message, sqlstate=e.sqlstate)
            return None
        return self.relay.downstream.eof_error()

    def _src_failed(self, d: _Direction, e: OSError) -> ClientError | None:
        return None if d.upstream else self.relay.downstream.eof_error()

    def _dst_failed(self, d: _Direction, e: OSError) -> ClientError | None:
        return lost(self.relay.backend, self.relay.conn.journal is not None) if d.upstream else None


class RelayEngine:
    """See the module docstring. One per application; :meth:`run` is its task."""

    def __init__(self, after_batch=None) -> None:
        #: called after every batch (the mirror link flushes its outbox there)
        self.after_batch = after_batch
        self._epoll = select.epoll()
        self._links: dict[int, Link] = {}
        self.batches = 0
        self.events = 0
        #: connmgr/proxy/idle_wait.py, while run() runs (None: waits through trio)
        self.idle_wait = None

    @property
    def sessions(self) -> int:
        return len(self._links) // 2

    def attach(self, relay: Relay, client: socket.socket, backend: socket.socket, initial: bytes) -> Link:
        """Start pumping ``relay``'s session. ``initial`` holds complete client messages
        read during the handshake; the backend's leftover bytes come from the relay."""
        link = Link(self, relay, client, backend)
        self._links[link.client_fd] = link
        self._links[link.backend_fd] = link
        self._epoll.register(link.client_fd, _IN)
        self._epoll.register(link.backend_fd, _IN)
        link.attached = True
        try:
            if initial:
                framer = Framer(max_message_size=relay.client_framer.max_message_size, frontend=True)
                buf, frames = framer.feed(initial)
                link._send(link.up, relay.upstream.process(buf, frames))
            if link.attached and relay.backend.leftover:
                link._pump(link.down, relay.backend.leftover)
        except Exception:
            link.detach()
            raise
        return link

    def _forget(self, link: Link) -> None:
        for fd in (link.client_fd, link.backend_fd):
            if self._links.get(fd) is link:
                del self._links[fd]
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass  # already closed

    def _modify(self, fd: int, flags: int) -> None:
        try:
            self._epoll.modify(fd, flags)
        except OSError as e:
            link = self._links.get(fd)
            if link is not None:
                log.warning("epoll modify failed for fd %d: %s", fd, e)
                link._end(None)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Pump until cancelled. While trio has nothing else to run, the engine waits in
        its place (connmgr/proxy/idle_wait.py) instead of going through its scheduler."""
        epoll = self._epoll
        poll = epoll.poll
        links = self._links
        idle, why = open_idle_wait(epoll.fileno())
        self.idle_wait = idle
        if idle is None:
            log.info("relay engine: waits through trio's scheduler (%s)", why)
        task_status.started()
        try:
            while True:
                # Waiting for the epoll descriptor is also the checkpoint between rounds.
                await trio.lowlevel.wait_readable(epoll.fileno())
                if idle is not None:
                    idle.step()
                rounds = 0
                while True:
                    events = poll(0, _BATCH)
                    if not events:
                        break
                    self.batches += 1
                    self.events += len(events)
                    for fd, ev in events:
                        link = links.get(fd)
                        if link is None:
                            continue
                        try:
                            link.on_event(fd, ev)
                        except Exception:  # a bug must cost only this session
                            log.exception("client %d: relay engine failed", link.relay.conn.id)
                            link._end(ClientError("internal error in the relay engine", sqlstate="XX000"))
                    if self.after_batch is not None:
                        self.after_batch()
                    # Drained and trio has nothing to do: wait here, in its place.
                    if len(events) < _BATCH and idle is not None and idle.wait():
                        rounds = 0
                        continue
                    # Otherwise, under load the next batch is usually ready by the time one
                    # is done: take a few before going back to trio (bounded, for fairness).
                    rounds += 1
                    if rounds >= _BATCHES_PER_WAKEUP:
                        break
        finally:
            if idle is not None:
                idle.close()
            epoll.close()
