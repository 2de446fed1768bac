"""Host takeover: the VIP and every client's TCP connection move to this host (seed 004
[0030], [0039]-[0043], [0052]-[0054], [0085]-[0086]).

How it works
------------
Both connection managers of a pair with ``[host]`` run a :class:`HostRole`. Only the holder
of the etcd leader key (:mod:`connmgr.host.leader`) holds the VIP and serves.

**While not leading** (host B, the secondary): the import process keeps a replica of every
mirrored session (:mod:`replay.session_replica`), and a capture task follows every client
connection's TCP state from the copies of host A's frames (:mod:`replay.tcp_state`),
forgetting the bytes the mirror carries.

**Elected** (host A's lease expired: its host died, or it was cut off and stepped down),
host B takes over, each phase in :class:`TakeoverPhase` (an enum with a transition table,
like the database failover's):

1. PROMOTING -- the fencing check, then host B's database stands alone: its subscriptions
   stopped, its sequences set past their columns (:func:`~connmgr.failover.controller.point_of_failure`).
2. REBUILDING -- per session: the client bytes host A acknowledged but never mirrored and
   the server bytes it sent beyond the mirror are taken from the frames into the replica;
   then the socket is rebuilt in repair mode (:func:`~connmgr.host.privileged.rebuild`,
   with IP_TRANSPARENT: it owns the VIP's 4-tuple before the VIP is here, so no client
   segment ever meets a closed port and a reset; host A's unacknowledged bytes go out
   again from here). A connection host B cannot continue faithfully (its handshake was
   before the capture, a copied frame was lost) is left alone and counted: once the VIP
   is here, this host's kernel answers its client's next segment with a reset.
3. ANNOUNCING -- fencing check, the VIP added, fencing check, gratuitous ARP (again after
   100 ms and 1 s), every socket out of repair mode (its window probe makes the client
   answer at once), the pair's primary role started here (the mirror link to the
   secondary that will follow this host: connmgr/host/rejoin.py), the listener on the
   VIP opened for new clients.
4. RESUMING -- every session continues on host B's database (:mod:`connmgr.host.resume`).
5. SERVING.

A fencing check that fails stops the takeover (FAILED): the VIP is removed again if it
was added, the rebuilt sockets are dropped without a sound, and host B waits to be elected
again.

**Stepping down** (the lease could not be renewed in time): the VIP is removed at once,
every client socket is dropped silently (in repair mode: no FIN, no RST, so the host
that takes over can continue them), and the listener closes.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from connmgr.config import HostSection
from connmgr.host import privileged
from connmgr.host.etcd import EtcdError
from connmgr.host.leader import Leader
from connmgr.pair.import_process import ImportProcess
from replay.session_replica import SessionReplica
from replay.tcp_state import NotRecoverable, RepairState, TcpTracker

log = logging.getLogger("connmgr.host")

__all__ = ["HostRole", "Rebuilt", "TakeoverPhase"]


class TakeoverPhase(enum.Enum):
    STANDBY = "standby"
    PROMOTING = "promoting"
    REBUILDING = "rebuilding"
    ANNOUNCING = "announcing"
    RESUMING = "resuming"
    SERVING = "serving"
    FAILED = "failed"


class TakeoverEvent(enum.Enum):
    ELECTED = "elected"
    PROMOTED = "database promoted"
    REBUILT = "sockets rebuilt"
    ANNOUNCED = "address announced"
    RESUMED = "sessions resumed"
    LOST = "fencing lost or a step failed"
    STEPPED_DOWN = "stepped down"


_TRANSITIONS: dict[tuple[TakeoverPhase, TakeoverEvent], TakeoverPhase] = {
    (TakeoverPhase.STANDBY, TakeoverEvent.ELECTED): TakeoverPhase.PROMOTING,
    (TakeoverPhase.PROMOTING, TakeoverEvent.PROMOTED): TakeoverPhase.REBUILDING,
    (TakeoverPhase.REBUILDING, TakeoverEvent.REBUILT): TakeoverPhase.ANNOUNCING,
    (TakeoverPhase.ANNOUNCING, TakeoverEvent.ANNOUNCED): TakeoverPhase.RESUMING,
    (TakeoverPhase.RESUMING, TakeoverEvent.RESUMED): TakeoverPhase.SERVING,
    **{(p, TakeoverEvent.LOST): TakeoverPhase.FAILED
       for p in (TakeoverPhase.PROMOTING, TakeoverPhase.REBUILDING, TakeoverPhase.ANNOUNCING)},  # fmt: skip
    (TakeoverPhase.FAILED, TakeoverEvent.ELECTED): TakeoverPhase.PROMOTING,
    **{(p, TakeoverEvent.STEPPED_DOWN): TakeoverPhase.STANDBY
       for p in (TakeoverPhase.RESUMING, TakeoverPhase.SERVING, TakeoverPhase.FAILED)},  # fmt: skip
}


class FencingLost(Exception):
    """Internal: the leader key is not ours any more; the takeover stops."""


@dataclass(slots=True)
class Rebuilt:
    """One connection rebuilt on this host, ready to resume."""

    replica: SessionReplica
    state: RepairState
    sock: socket.socket = field(repr=False)
    #: client bytes the relay takes first: the start of a message not complete yet, and
    #: requests sent while the session was idle that no reply answered (``forwarded``)
    initial: bytes = b""
    #: the requests in ``initial`` the mirror never carried: host A may have run them
    #: (a write there may have committed; connmgr/host/resume.py checks the marker)
    forwarded: bytes = b""
    #: the first bytes of the client's and the server's stream as the frames showed them
    #: (the start-up and the authentication: a SCRAM client's key is recovered from them)
    heads: tuple[bytes, bytes] = (b"", b"")
    #: a TLS session: its keys were in host A's connmgr, so it is only closed cleanly
    #: (the bytes host A sent completed, then a FIN: the client reads an end, not a reset)
    close_only: bool = False


class HostRole:
    """See the module docstring. ``imports`` is the secondary role's import process (None
    on a connmgr that starts as the primary); ``promote()`` makes this host's database
    stand alone; ``lead()`` starts the pair's primary role on this connmgr (its mirror
    link to the secondary that will follow it; connmgr/host/rejoin.py); ``followed()``
    says whether a primary's mirror link has said hello to this secondary;
    ``serve(sock)`` starts accepting clients on a bound listening socket;
    ``resume(rebuilt)`` starts continuing the sessions (in the caller's nursery: each
    one's errors are its own);
    ``connections()`` gives the client sockets served now (dropped silently on a step-down)."""

    def __init__(self, config: HostSection, leader: Leader, *, imports: ImportProcess | None,
                 promote: Callable[[], Awaitable[None]], serve: Callable[[socket.socket], None],
                 lead: Callable[[], Awaitable[None]] | None = None,
                 followed: Callable[[], bool] = lambda: False,
                 resume: Callable[[list[Rebuilt]], None],
                 connections: Callable[[], list[socket.socket]]) -> None:  # fmt: skip
        self.config = config
        self.leader = leader
        self.imports = imports
        self.promote = promote
        self.lead = lead
        self.followed = followed
        self.serve = serve
        self.resume = resume
        self.connections = connections
        address, _, prefix = config.vip.partition("/")
        self.vip, self.prefixlen = address, int(prefix)
        self.tracker = TcpTracker({(self.vip, config.port)})
        if imports is not None:
            imports.on_mirrored = self.tracker.trim
        self.phase = TakeoverPhase.STANDBY
        #: (time.monotonic(), what happened), for the lab's timeline
        self.timeline: list[tuple[float, str]] = []
        self.not_recoverable: list[str] = []
        self.sessions_rebuilt = 0
        self.listener: socket.socket | None = None
        self._elected = trio.Event()
        self._token: int | None = None
        self._capture: socket.socket | None = None
        #: the gratuitous ARP frame, made at the start (privileged.warm_up)
        self._arp_frame: bytes | None = None
        #: copied frames the capture's buffer dropped, and when the last was
        self.frames_dropped = 0
        #: TLS connections closed at a takeover (not continued: see Rebuilt.close_only)
        self.tls_closed = 0
        self.last_drop: float | None = None
        leader.on_elected = self._on_elected
        leader.on_step_down = self._on_step_down
        # the secondary campaigns only as a successor: once it has seen another connmgr
        # hold the key and is following a primary's mirror (a secondary started first must
        # not take the VIP from a primary still starting); the primary only once the
        # primary record names it (a host that comes back after a takeover must not lead
        # on the database it left behind)
        leader.campaign = False
        #: why this connmgr does not campaign, when the primary record names another
        self.barred: str | None = None

    # ------------------------------------------------------------------ running

    def note(self, text: str) -> None:
        self.timeline.append((time.monotonic(), text))
        log.warning("host takeover: %s", text)

    def _fire(self, event: TakeoverEvent) -> None:
        nxt = _TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise RuntimeError(f"host takeover: {event.value!r} is not allowed in phase {self.phase.value!r}")
        self.phase = nxt

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Follow the frames (when standing by as the secondary), keep the lease, and take
        over each time this connmgr is elected; until cancelled."""
        try:
            self._arp_frame = await trio.to_thread.run_sync(privileged.warm_up, self.config.interface, self.vip)
        except OSError as e:
            log.error("host takeover: %s; a takeover will fail until this is fixed", e)
        async with trio.open_nursery() as nursery:
            if self.imports is not None:
                self._capture = privileged.open_capture(self.config.capture or self.config.interface)
                nursery.start_soon(self._follow_frames, self._capture)
            await nursery.start(self.leader.run)
            if self.imports is not None:
                nursery.start_soon(self._become_successor)
            else:
                nursery.start_soon(self._claim_primary)
            task_status.started()
            while True:
                await self._elected.wait()
                self._elected = trio.Event()
                token = self._token
                try:
                    await self._take_over(token, nursery)
                except FencingLost as e:
                    self.note(f"takeover stopped: {e}")
                except Exception as e:  # noqa: BLE001 - a failed takeover must not end the connmgr
                    log.exception("host takeover failed")
                    self.note(f"takeover failed: {e!r}")

    async def _become_successor(self) -> None:
        leader, imports = self.leader, self.imports
        while not (leader.holder is not None and leader.holder.value != leader.name
                   and (imports.records > 0 or self.followed())):  # fmt: skip
            await trio.sleep(0.1)
        leader.campaign = True
        self.note(f"following {leader.holder.value}: this connmgr takes over if its lease expires")

    async def _claim_primary(self, recheck: float = 5.0) -> None:
        """The primary's connmgr campaigns once the primary record names it (claimed if
        none is recorded yet). Another name there means a takeover happened while this
        host was away: it stays off the key until it is re-seeded as the secondary."""
        leader = self.leader
        while True:
            try:
                recorded = await leader.claim_primary()
            except EtcdError as e:
                log.warning("host takeover: cannot read the primary record yet (%s); not campaigning until etcd"
                            " answers", e)  # fmt: skip
                await trio.sleep(1.0)
                continue
            if recorded == leader.name:
                self.barred = None
                leader.campaign = True
                self.note(f"the primary record names this connmgr ({leader.name}): campaigning for the leader key")
                return
            if self.barred is None:
                self.barred = (f"{recorded} took over as the primary while this host was away (etcd {leader.primary_key}"
                               f" = {recorded!r}): this host's database was left behind, so this connmgr does not"
                               " lead; re-seed its database as the new secondary (connmgr reseed, on the new primary's"
                               " connmgr) and start this connmgr as the secondary")  # fmt: skip
                log.error("host takeover: %s", self.barred)
                self.note(f"not campaigning: {recorded} is the primary now")
            await trio.sleep(recheck)

    def _on_elected(self, token: int) -> None:
        self.note(f"leader key won (fencing token {token})")
        self._token = token
        self._elected.set()

    def _on_step_down(self, reason: str) -> None:
        """Stop serving at once: no VIP, no listener, every client socket dropped silently."""
        self.note(f"stepping down: {reason}")
        try:
            privileged.remove_address(self.config.interface, self.vip, self.prefixlen)
        except OSError as e:
            log.error("could not remove the VIP %s after stepping down: %s", self.vip, e)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        dropped = 0
        for sock in self.connections():
            try:
                privileged.silent_close(sock)
                dropped += 1
            except OSError:
                pass
        self.note(f"VIP removed, {dropped} client connection(s) dropped without a sound")
        if self.phase in (TakeoverPhase.RESUMING, TakeoverPhase.SERVING, TakeoverPhase.FAILED):
            self._fire(TakeoverEvent.STEPPED_DOWN)

    async def _follow_frames(self, sock: socket.socket) -> None:
        tracker = self.tracker
        checked = time.monotonic()
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                self._drain(sock, tracker)
                if time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    self._count_drops(sock)
        finally:
            sock.close()

    def _count_drops(self, sock: socket.socket) -> None:
        """The kernel's count of copied frames the capture's full buffer dropped: a session
        whose frames were lost may have requests host A ran that nobody here has seen (the
        marker check in the resume catches a commit among them)."""
        _packets, drops = privileged.capture_drops(sock)
        if drops:
            self.frames_dropped += drops
            self.last_drop = time.monotonic()
            log.warning("host takeover: the capture dropped %d copied frame(s) (%d in all): this connmgr could"
                        " not keep up with the frames; connections whose frames were lost may not be continued",
                        drops, self.frames_dropped)  # fmt: skip

    @staticmethod
    def _drain(sock: socket.socket, tracker: TcpTracker) -> None:
        for _ in range(10_000):
            try:
                frame = sock.recv(65536)
            except BlockingIOError:
                return
            tracker.on_frame(frame, time.monotonic())

    @staticmethod
    async def _close_cleanly(socks: list[socket.socket], linger: float = 5.0) -> None:
        """End connections this host cannot continue with a FIN, reading what the clients
        still send (closing with unread bytes would reset them), for ``linger`` at most."""
        for s in socks:
            with contextlib.suppress(OSError):
                s.setblocking(False)
                s.shutdown(socket.SHUT_WR)
        with trio.move_on_after(linger):
            pending = list(socks)
            while pending:
                for s in list(pending):
                    try:
                        if not s.recv(65536):
                            pending.remove(s)
                    except BlockingIOError:
                        pass
                    except OSError:
                        pending.remove(s)
                await trio.sleep(0.05)
        for s in socks:
            s.close()

    async def _fence(self, before: str) -> None:
        if not await self.leader.check():
            raise FencingLost(f"the leader key is not ours any more (before {before})")

    # ------------------------------------------------------------------ taking over

    async def _take_over(self, token: int | None, nursery: trio.Nursery) -> None:
        self._fire(TakeoverEvent.ELECTED)
        rebuilt: list[Rebuilt] = []
        added = False
        try:
            await self._fence("promoting the database")
            if self.imports is not None:
                # from now on this host's database is the primary's: a host A that comes back
                # must find that recorded before it could lead on its own
                if not await self.leader.record_primary(token):
                    raise FencingLost("the primary record could not be written under the leader key")
                self.note(f"primary record: {self.leader.name}")
                await self.promote()
                self.note("this host's database stands alone")
            else:
                # the primary's connmgr, elected again (after a step-down, say): only if no
                # takeover happened meanwhile -- its database may have been left behind
                try:
                    recorded = await self.leader.claim_primary()
                except EtcdError as e:
                    raise FencingLost(f"the primary record could not be read: {e}") from None
                if recorded != self.leader.name:
                    self.leader.campaign = False
                    self.barred = (f"{recorded} took over as the primary meanwhile (etcd {self.leader.primary_key}):"
                                   " this host's database was left behind; re-seed it as the new secondary")  # fmt: skip
                    log.error("host takeover: %s", self.barred)
                    await self.leader.resign("the primary record names another connmgr")
                    raise FencingLost(self.barred)
            self._fire(TakeoverEvent.PROMOTED)
            if self.imports is not None:
                rebuilt = self._rebuild_all()
            self._fire(TakeoverEvent.REBUILT)
            await self._fence("adding the VIP")
            added = privileged.add_address(self.config.interface, self.vip, self.prefixlen)
            self.note(f"VIP {self.vip} added" if added else f"VIP {self.vip} was here already")
            self.listener = self._listen()  # bound while the rebuilt sockets still allow it
            await self._fence("announcing the VIP")
            privileged.gratuitous_arp(self.config.interface, self.vip, frame=self._arp_frame)
            for r in rebuilt:
                privileged.leave_repair(r.sock)
            self.note(f"gratuitous ARP sent, {len(rebuilt)} connection(s) live again")
            closing = [r for r in rebuilt if r.close_only]
            if closing:
                rebuilt = [r for r in rebuilt if not r.close_only]
                self.tls_closed += len(closing)
                self.note(f"{len(closing)} TLS connection(s) closed: their keys were in host A's connmgr")
                nursery.start_soon(self._close_cleanly, [r.sock for r in closing])
            nursery.start_soon(self._announce_again)
            if self.imports is not None and self.lead is not None:
                try:  # before any new client: new sessions are mirrored from their start
                    await self.lead()
                except Exception as e:  # noqa: BLE001 - the clients are live here: serve them unmirrored
                    log.exception("host takeover: the pair's primary role did not start")
                    self.note(f"the pair's primary role did not start ({e!r}): serving without a secondary")
            self.serve(self.listener)
            self._fire(TakeoverEvent.ANNOUNCED)
        except BaseException:
            self._fire(TakeoverEvent.LOST)
            for r in rebuilt:  # nothing on the wire: the next leader may continue them
                with contextlib.suppress(OSError):
                    privileged.silent_close(r.sock)
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            if added:
                privileged.remove_address(self.config.interface, self.vip, self.prefixlen)
            raise
        if rebuilt:
            self.resume(rebuilt)
        self._fire(TakeoverEvent.RESUMED)
        self.note(f"serving as the primary (fencing token {token})")

    def _rebuild_all(self) -> list[Rebuilt]:
        """Every mirrored session's connection, rebuilt in repair mode (nothing sent)."""
        imports = self.imports
        if self._capture is not None:  # every frame copied until now
            self._drain(self._capture, self.tracker)
            self._count_drops(self._capture)
            if self.frames_dropped:
                self.note(f"the capture dropped {self.frames_dropped} copied frame(s) in all, the last"
                          f" {time.monotonic() - self.last_drop:.1f}s ago")  # fmt: skip
        out = []
        for replica in list((imports.replicas or {}).values()):
            try:
                out.append(self._rebuild(replica))
            except (NotRecoverable, OSError) as e:
                self.not_recoverable.append(f"session {replica.session_id} ({replica.params.get('peer')}): {e}")
                log.error("host takeover: session %d (%s) cannot be continued: %s", replica.session_id,
                          replica.params.get("peer"), e)  # fmt: skip
        self.sessions_rebuilt += len(out)
        self.note(f"{len(out)} connection(s) rebuilt in repair mode, {len(self.not_recoverable)} cannot be")
        return out

    def _rebuild(self, replica: SessionReplica) -> Rebuilt:
        imports = self.imports
        if replica.tls:  # rebuilt only to be closed cleanly, from the frames alone
            conn = self.tracker.connection(replica.peer) if replica.peer is not None else None
            if conn is None:
                raise NotRecoverable("a TLS session none of whose frames was seen")
            rs = conn.repair_state(conn.acked_by_server, time.monotonic())
            return Rebuilt(replica, rs, privileged.rebuild(rs), close_only=True)
        if replica.peer is None or replica.local is None or replica.client_raw_end is None \
                or replica.server_raw_end is None:  # fmt: skip
            raise NotRecoverable("the mirror did not say its addresses and where its streams start")
        conn = self.tracker.connection(replica.peer)
        if conn is None:
            raise NotRecoverable("no copied frame of it was seen (its handshake came before the capture)")
        sid = replica.session_id
        c_from = replica.client_raw_end
        c_end = conn.client_seen_end(c_from)
        client_extra = conn.client_data(c_from, c_end) if c_end > c_from else b""
        s_from = replica.server_raw_end
        server_extra = b""
        if conn.s.high > s_from:  # sent to the client but not mirrored yet
            server_extra = conn.server_data(s_from, conn.s.high)
            if server_extra is None:
                raise NotRecoverable(f"server bytes {s_from}..{conn.s.high} were sent but neither mirrored nor seen")
        forwarded = b""
        if replica.session.is_idle() and not server_extra and replica.server_end == replica.server_raw_end:
            # idle, and nothing answered what it sent since: those requests go on as new
            forwarded = client_extra
        else:  # acknowledged (or sent after the death) but never mirrored: as if mirrored
            if client_extra:
                imports.recovered(sid, "c", c_from, client_extra)
            if server_extra:
                imports.recovered(sid, "b", s_from, server_extra)
        # the client bytes recovered above now count as mirrored (and the tracker has let
        # them go): the socket continues after them, whatever the client sends again
        rs = conn.repair_state(replica.client_raw_end, time.monotonic(), mirrored=replica.tail,
                               mirrored_from=replica.tail_start)  # fmt: skip
        if rs.client_end != c_end:
            raise NotRecoverable(f"the client stream would continue at {rs.client_end}, not after the {c_end}"
                                 " bytes host B holds")  # fmt: skip
        log.info("session %d (%s): client bytes mirrored to %d, seen to %d (acknowledged by host A to %d); server"
                 " bytes mirrored to %d, seen to %d (by the client to %d), %d resent; %s%s", sid,
                 replica.params.get("peer"), c_from, c_end, conn.acked_by_server, s_from, conn.s.high,
                 conn.acked_by_client, len(rs.unsent), "idle" if replica.session.is_idle() else "busy",
                 f", forwarded {_kinds(forwarded)}" if forwarded else
                 f", recovered {_kinds(client_extra)}" if client_extra else "")  # fmt: skip
        sock = privileged.rebuild(rs)
        return Rebuilt(replica, rs, sock, imports.pending_client_bytes(sid) + forwarded, forwarded,
                       (conn.head("c"), conn.head("b")))  # fmt: skip

    def _listen(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.vip, self.config.port))
        s.listen(4096)
        s.setblocking(False)
        return s

    async def _announce_again(self) -> None:
        for delay in (0.1, 0.9):
            await trio.sleep(delay)
            if not self.leader.may_serve():
                return
            try:
                privileged.gratuitous_arp(self.config.interface, self.vip, frame=self._arp_frame)
            except OSError as e:
                log.warning("gratuitous ARP again: %s", e)


def _kinds(data: bytes) -> str:
    """The message types at the start of ``data`` (never their text: it may hold literals)."""
    out, i = [], 0
    while len(data) - i >= 5:
        out.append(chr(data[i]))
        i += 1 + int.from_bytes(data[i + 1:i + 5], "big")
    return "".join(out) + ("+" if i < len(data) else "")
