# cython: annotation_typing=False
"""The mirror link: the primary connmgr's connection to the secondary, and the
secondary's listener (trio side of :mod:`replay.mirror_protocol`).

Primary side (:class:`MirrorLink`)
    The relay's processors call :meth:`MirrorLink.session_data` with each batch of complete
    messages they forward; the record is encoded at once into an outbox (and kept in the
    sender's delta buffer). :meth:`MirrorLink.flush_nowait` -- called by the relay engine
    after every batch and by the trio pumps after every send -- writes the outbox with one
    non-blocking ``send``; whatever the socket cannot take waits for the link task. So
    mirroring adds no task switch per message. The link task connects (and reconnects with
    back-off), says Hello, resends the delta the secondary asks for, handles Acks,
    DeltaRequests and heartbeats. While the link is down, records accumulate in the
    sender's bounded buffer; past its limit the oldest are dropped and the secondary will
    be told to Resync (the policy in :mod:`replay.mirror_protocol`).

Secondary side (:func:`serve_mirror`)
    Accepts each primary (by the name in its Hello: a connmgr, or each of its workers)
    once at a time, answers Hello, delivers records in order through a
    :class:`~replay.mirror_protocol.MirrorReceiver` to a consumer callback, acknowledges
    what it has after each delivery batch and asks for deltas on gaps.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable

import trio

from replay.mirror_protocol import (
    Ack,
    DeltaRequest,
    Heartbeat,
    Hello,
    HelloAck,
    MirrorDecoder,
    MirrorProtocolError,
    MirrorReceiver,
    MirrorSender,
    encode,
)

log = logging.getLogger("connmgr.mirror")

_FLUSH_BYTES = 64 * 1024


class MirrorLink:
    """The primary's end of the mirror stream. See the module docstring."""

    def __init__(self, host: str, port: int, *, node: str = "primary", max_buffer_bytes: int = 64 << 20,
                 heartbeat_interval: float = 0.1, lsn: Callable[[], int] = lambda: 0,
                 two_phase: bool = False, two_phase_timeout: float = 0.5, peer_timeout: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host, self.port = host, port
        #: the clock of the flush timer and the two-phase holds (trio.current_time in tests)
        self._clock = clock
        #: connection attempts that failed since the link was last up (logging)
        self._failed_attempts = 0
        #: a connected secondary silent this long is taken as gone (see _heartbeats)
        self.peer_timeout = peer_timeout
        self.peer_silent = 0
        self._last_heard = 0.0
        self._lost_reason = "mirror link lost"
        self.node = node
        self.sender = MirrorSender(int.from_bytes(os.urandom(8), "big"), max_buffer_bytes=max_buffer_bytes)
        self.heartbeat_interval = heartbeat_interval
        self.lsn = lsn
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        #: called when records start to flow again (the redo monitor wakes from its idle pause)
        self.on_activity = None
        self._last_flush = 0.0
        #: longest a mirrored record waits for a coalesced send (one-phase mode)
        self.flush_delay = 0.002
        #: send client batches and held replies at once (set with [host]; see session_data)
        self.eager = False
        self._sock: socket.socket | None = None
        self._wake = trio.Event()
        #: the link serves sessions: set by :meth:`run`; a host pair's secondary builds its
        #: link at the start and runs it only once it has taken over (connmgr/app.py)
        self.running = False
        self.connected = False
        self.connects = 0
        self.bytes_sent = 0
        self.delta_requests = 0
        #: two-phase configured, and active now (False while degraded to one-phase)
        self.two_phase_configured = two_phase
        self.two_phase = two_phase
        self.two_phase_timeout = two_phase_timeout
        #: held acknowledgements, oldest first: (version, since, release callback)
        self._holds: deque[tuple[int, float, Callable[[], None]]] = deque()
        self.holds_total = 0
        self.degradations = 0
        self._last_ack = 0.0

    # ------------------------------------------------------------------ hot path

    def session_opened(self, session_id: int, params: dict[str, str]) -> None:
        self._out(self.sender.session_opened(session_id, params))

    def session_data(self, session_id: int, direction: str, offset: int, payload: bytes) -> int:
        """Mirror one batch; returns its version. With ``eager`` (host takeover), the
        client's batches and held replies leave at once, ahead of the request they
        mirror on its way to the database: a commit then cannot complete (it waits for
        the secondary database, over the same wire) before host B knows the request and
        its results."""
        self._out(self.sender.data(session_id, direction, self.lsn(), offset, payload))
        if self.eager and direction != "b":
            self.flush_nowait()
        return self.sender.latest_version

    def session_marker(self, session_id: int, seq: int) -> None:
        self._out(self.sender.marker(session_id, seq))

    def session_unmarked(self, session_id: int, count: int) -> None:
        """The session's next client batch holds ``count`` requests that may commit unmarked."""
        self._out(self.sender.unmarked(session_id, count))

    def session_closed(self, session_id: int) -> None:
        self._out(self.sender.session_closed(session_id))
        self.flush_nowait()

    def topology(self, primary: str, secondary: str) -> None:
        """The pair turned around (see mirror_protocol.Topology)."""
        self._out(self.sender.topology(primary, secondary))
        self.flush_nowait()

    # ------------------------------------------------------------------ two-phase

    def hold(self, version: int, release: Callable[[], None]) -> None:
        """Two-phase: call ``release()`` once the secondary has acknowledged ``version``
        (the batch holding a commit's acknowledgement), or when two-phase degrades. The
        record goes out at once with an AckRequest, so the secondary answers at once."""
        if not self.two_phase or version <= self.sender.acked_version:
            release()
            return
        self._holds.append((version, self._clock(), release))
        self.holds_total += 1
        if self.connected:
            self._outbox.append(self.sender.ack_request(version))
            self.flush_nowait()

    @property
    def holds(self) -> int:
        return len(self._holds)

    def _acked(self, version: int) -> None:
        if version >= self.sender.acked_version:
            self._last_ack = self._clock()
        self.sender.on_ack(version)
        holds = self._holds
        while holds and holds[0][0] <= version:
            holds.popleft()[2]()

    def _release_all(self) -> None:
        holds, self._holds = self._holds, deque()
        for _v, _t, release in holds:
            release()

    def check_two_phase(self, now: float | None = None) -> None:
        """The written policy for a slow or absent secondary: a held acknowledgement older
        than ``two_phase_timeout`` degrades the link to one-phase (every held one is
        released, a WARNING, ``degradations`` counts); it returns to two-phase when the
        link is up, acknowledged within the last second and less than 256 versions behind."""
        if not self.two_phase_configured:
            return
        now = self._clock() if now is None else now
        if self.two_phase:
            if self._holds and now - self._holds[0][1] > self.two_phase_timeout:
                self.two_phase = False
                self.degradations += 1
                log.warning(
                    "mirror: the secondary at %s:%d acknowledged nothing for %.2fs (%s): two-phase"
                    " DEGRADED to one-phase; %d held commit acknowledgements released",
                    self.host, self.port, now - self._holds[0][1],
                    "link up" if self.connected else "link down", len(self._holds),
                )  # fmt: skip
                self._release_all()
        elif (self.connected and now - self._last_ack < 1.0
              and self.sender.latest_version - self.sender.acked_version < 256):  # fmt: skip
            self.two_phase = True
            log.warning("mirror: the secondary at %s:%d caught up: two-phase restored", self.host, self.port)

    async def _watch_two_phase(self) -> None:
        interval = min(0.05, self.two_phase_timeout / 4)
        while True:
            await trio.sleep(interval)
            self.check_two_phase()

    # ------------------------------------------------------------------ outbox

    def _out(self, wire: bytes) -> None:
        if self.connected:
            if not self._outbox:  # the link task waits for the first record, with no timer
                self._wake.set()
                if self.on_activity is not None:
                    self.on_activity()
            self._outbox.append(wire)
            self._outbox_bytes += len(wire)

    def flush_soon(self) -> None:
        """Called after every relay batch: send now if enough has gathered (or enough time
        passed), otherwise leave it to the link task's timer (``flush_delay``). Coalescing
        saves a ``send`` per batch; the records wait at most ``flush_delay``."""
        if self._outbox_bytes >= _FLUSH_BYTES or self._clock() - self._last_flush >= self.flush_delay:
            self.flush_nowait()

    def flush_nowait(self) -> None:
        """Send what the socket takes now; the link task sends the rest."""
        box = self._outbox
        self._outbox_bytes = 0
        self._last_flush = self._clock()
        if not box or self._sock is None:
            return
        data = b"".join(box) if len(box) > 1 else box[0]
        box.clear()
        try:
            n = self._sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop()
            return
        self.bytes_sent += n
        if n < len(data):
            box.append(data[n:])
            self._wake.set()

    def _drop(self) -> None:
        """The link broke: forget the outbox (the sender's buffer still has it all)."""
        self.connected = False
        self._outbox.clear()
        self._outbox_bytes = 0
        if self._sock is not None:
            sock, self._sock = self._sock, None
            try:  # wake the link task's waits on it before the descriptor goes
                trio.lowlevel.notify_closing(sock)
            except RuntimeError:
                pass  # not inside trio (shutdown): nobody is waiting
            sock.close()
        self._wake.set()

    # ------------------------------------------------------------------ link task

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up until cancelled. Started at once: the link connects in the
        background (watch :attr:`connected`); sessions are mirrored into the buffer
        meanwhile and resent when it is up."""
        self.running = True
        task_status.started()
        async with trio.open_nursery() as nursery:
            if self.two_phase_configured:
                nursery.start_soon(self._watch_two_phase)
            await self._keep_connected()

    async def _keep_connected(self) -> None:
        """Connect, and again after every loss: 50 ms doubling to 2 s. One WARNING per
        outage (its first failure), the attempts after it at DEBUG, and the recovery's INFO
        line counts them (see _session)."""
        backoff = 0.05
        while True:
            connects = self.connects
            try:
                await self._session()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, MirrorProtocolError,
                    ConnectionError) as e:
                if self.connects > connects:  # it was up: a new outage starts at the shortest wait
                    backoff = 0.05
                    self._failed_attempts = 0
                level = logging.WARNING if not self._failed_attempts else logging.DEBUG
                self._failed_attempts += 1
                log.log(level, "mirror link to %s:%d: %s; reconnecting in %.2fs", self.host, self.port, e, backoff)
            except Exception:  # a bug in the link must not take the sessions down with it
                log.exception("mirror link failed; reconnecting")
            finally:
                self._drop()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    @property
    def connected_once(self) -> bool:
        return self.connects > 0

    async def _session(self) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        sock = stream.socket
        decoder = MirrorDecoder()
        await stream.send_all(self.sender.hello(self.node))
        ack = None
        while ack is None:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("secondary closed the mirror link during hello")
            for rec in decoder.feed(data):
                if isinstance(rec, HelloAck):
                    ack = rec
        resend = self.sender.on_hello_ack(ack)
        if self._holds:  # ask again for what the held acknowledgements wait for
            resend += self.sender.ack_request(self._holds[-1][0])
        await stream.send_all(resend)
        self._acked(self.sender.acked_version)
        raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = raw
        self.connected = True
        self._last_heard = self._clock()
        self.connects += 1
        again = f" after {self._failed_attempts} failed attempt(s)" if self._failed_attempts else ""
        self._failed_attempts = 0
        log.info("mirror link up to %s:%d (resumed at version %d)%s", self.host, self.port, ack.next_version, again)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._quietly, self._reader, raw, decoder)
            nursery.start_soon(self._quietly, self._heartbeats)
            while self.connected:
                if self._outbox:
                    # whatever the relay left for coalescing goes out flush_delay after the
                    # last flush (the idle wait below may already have used up that time)
                    left = self._last_flush + self.flush_delay - self._clock()
                    if left > 0:
                        await trio.sleep(left)
                    if self._sock is not raw:  # dropped meanwhile (a failed send, the reader): closed
                        break
                    try:
                        await trio.lowlevel.wait_writable(raw)
                    except (trio.ClosedResourceError, OSError):
                        break
                    self.flush_nowait()
                else:  # (an idle link wakes for nothing: _out, a drop or a partial send wake it)
                    self._wake = trio.Event()
                    await self._wake.wait()
            nursery.cancel_scope.cancel()
        reason, self._lost_reason = self._lost_reason, "mirror link lost"
        raise ConnectionError(reason)

    async def _quietly(self, fn, *args) -> None:
        """Run a child of the link session; a closed or broken link just ends it."""
        try:
            await fn(*args)
        except (trio.ClosedResourceError, OSError, MirrorProtocolError) as e:
            log.info("mirror link: %s", e)
            self._drop()

    async def _reader(self, raw: socket.socket, decoder: MirrorDecoder) -> None:
        while True:
            await trio.lowlevel.wait_readable(raw)
            try:
                data = raw.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._drop()
                return
            self._last_heard = self._clock()
            for rec in decoder.feed(data):
                if isinstance(rec, Ack):
                    self._acked(rec.version)
                elif isinstance(rec, DeltaRequest):
                    self.delta_requests += 1
                    self._outbox.append(self.sender.delta(rec.from_version))
                    self.flush_nowait()

    async def _heartbeats(self) -> None:
        """A heartbeat every ``heartbeat_interval``; the secondary acknowledges each. One
        that has said nothing for ``peer_timeout`` (a hung process, a host whose TCP
        connection stays open) is dropped, and the link is made again."""
        while True:
            await trio.sleep(self.heartbeat_interval)
            silent = self._clock() - self._last_heard
            if silent > self.peer_timeout:
                self.peer_silent += 1
                self._lost_reason = f"the secondary has said nothing for {silent:.1f} s (peer_timeout)"
                self._drop()
                return
            self._outbox.append(self.sender.heartbeat(self.lsn(), int(time.time() * 1e6)))
            self.flush_nowait()


async def serve_mirror(
    host: str,
    port: int,
    deliver: Callable[[list], None],
    *,
    receivers: dict[str, MirrorReceiver] | None = None,
    ack_interval: float = 0.01,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """The secondary's listener: deliver every versioned record, in order, exactly once,
    to ``deliver(records)``. Acks are coalesced: at most one per ``ack_interval``, and
    one at every heartbeat (so the primary's buffer drains even when traffic stops).
    ``task_status.started`` gets the bound (host, port).

    Each primary -- a connmgr, or each worker of one with ``[server] workers`` -- is
    named by its Hello and has its own :class:`MirrorReceiver` in ``receivers`` (by
    name): its own versions, its own order. One connection per name at a time: a primary
    that reconnects waits until its old connection has ended."""
    receivers = {} if receivers is None else receivers
    locks: dict[str, trio.Lock] = {}
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[:2])

    async def handle(stream: trio.SocketStream) -> None:
        decoder = MirrorDecoder()
        last_ack = 0.0
        receiver: MirrorReceiver | None = None
        lock: trio.Lock | None = None
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                replies: list = []
                delivered: list = []
                heartbeat = False
                for rec in decoder.feed(data):
                    if isinstance(rec, Hello):
                        if lock is None:
                            lock = locks.setdefault(rec.node, trio.Lock())
                            await lock.acquire()  # (released below, by this task)
                            receiver = receivers.setdefault(rec.node, MirrorReceiver())
                        elif receivers.get(rec.node) is not receiver:
                            raise MirrorProtocolError(f"a second Hello names another primary ({rec.node!r})")
                        replies.append(receiver.on_hello(rec))
                        continue
                    if receiver is None:
                        raise MirrorProtocolError(f"{type(rec).__name__} before Hello")
                    heartbeat = heartbeat or isinstance(rec, Heartbeat)
                    out, back = receiver.on_record(rec)
                    delivered.extend(out)
                    replies.extend(back)
                if delivered:
                    deliver(delivered)
                if receiver is None:
                    continue
                now = trio.current_time()
                urgent = receiver.ack_wanted and receiver.acked >= receiver.ack_wanted
                if urgent:
                    receiver.ack_wanted = 0
                if (delivered and now - last_ack >= ack_interval) or heartbeat or urgent:
                    replies.append(Ack(receiver.acked))
                    last_ack = now
                if replies:
                    await stream.send_all(b"".join(encode(r) for r in replies))
        except (trio.BrokenResourceError, MirrorProtocolError) as e:
            log.info("mirror link from primary: %s", e)  # the primary logs its own side loudly
        finally:
            if lock is not None:
                lock.release()
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)
