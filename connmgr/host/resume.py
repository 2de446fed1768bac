"""Continuing one session on this host after a host takeover (issue 14, step 5).

The client's socket is rebuilt (connmgr/host/takeover.py); its session state is host B's
replica of it (replay/session_replica.py). This module logs in to host B's database with
the client's start-up parameters, restores what the session carries beyond a transaction
(prepared statements, settings, LISTEN: the same restore as the database failover's,
connmgr/failover/session_move.py) and relays on.

A session idle between transactions is restored and goes on; requests it sent that the
mirror never carried go on as new ones (after a marker check: host A may have run them).
A session with an open transaction or requests in flight is moved exactly as the
database failover moves one (``session_move._move``: interrupted commits resolved by
the marker rows, the open transaction replayed and compared with what the client
received, 40001 on a difference), from host B's replica instead of host A's journal,
in the same order (connmgr/failover/replay_order.py: commits in flight first, in the
order they were sent, then the open transactions, every client going on only when all
are back). A session that cannot move ends with a clean FATAL 08006 naming why; one whose
reply stream was cut inside a message is closed without an ErrorResponse (one would garble
the message the client is reading).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import trio

from connmgr.auth.scram import ScramVerifier, recover_client_key
from connmgr.auth.users import UserSecret
from connmgr.errors import BackendUnavailable, ClientError
from connmgr.failover.replay_order import ReplayOrder
from connmgr.failover.session_move import NotMovable, _move, _restore
from connmgr.host.takeover import Rebuilt
from connmgr.pg.backend import BackendServer, open_backend
from connmgr.pg.transport import FastSocketStream
from connmgr.pg.wire import PeerClosed
from connmgr.proxy.client import ClientConnection, ClientContext, ClientState
from connmgr.proxy.client_auth import _credentials
from connmgr.proxy.relay import Carry
from replay.import_queue import sql_text
from replay.injection import InjectMode
from replay.startup_exchange import sasl_exchange, whole_messages
from shadow.session import Phase, TxStatus
from shadow.sqltext import may_write, statement_count

log = logging.getLogger("connmgr.host")

__all__ = ["CONNMGR_PARAMS", "SessionResumer"]

_F, _Q, _P, _B, _E = (ord(c) for c in "FQPBE")

#: SessionOpened parameters that are connmgr's, not the client's start-up parameters
CONNMGR_PARAMS = frozenset({"virtual_pid", "cancel_secret", "peer", "local", "origin", "markers", "client_offset",
                            "server_offset", "tls"})


class NotResumable(ClientError):
    """The session cannot continue on this host: SQLSTATE 08006 to its client."""

    sqlstate = "08006"

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message, hint="Reconnect: new sessions go to the new primary.")
        self.kind = kind


class SessionResumer:
    """Continues rebuilt sessions (``__call__`` schedules one in ``nursery``)."""

    def __init__(self, ctx: ClientContext, server: BackendServer, nursery: trio.Nursery,
                 committed_seqs: Callable[[str, int], Awaitable[dict[int, int]]]) -> None:  # fmt: skip
        self.ctx = ctx
        self.server = server
        self.nursery = nursery
        #: (database, origin) -> {session: the last transaction of that session of host A
        #: that committed here (its marker row)}, read once per takeover: the database has
        #: reached the point of failure and host A writes nothing any more
        self.committed_seqs = committed_seqs
        self._seqs: dict[tuple[str, int], dict[int, int]] = {}
        self._seqs_lock = trio.Lock()
        self.resumed = 0
        self.failed: dict[str, int] = {}
        self.stalls: list[float] = []

    async def committed_seq(self, database: str, origin: int, session_id: int) -> int:
        """The last transaction of host A's session ``session_id`` that committed here, 0
        if none (one query per database for all the sessions of a takeover)."""
        async with self._seqs_lock:
            seqs = self._seqs.get((database, origin))
            if seqs is None:
                seqs = self._seqs[(database, origin)] = await self.committed_seqs(database, origin)
        return seqs.get(session_id, 0)

    def __call__(self, rebuilt: list[Rebuilt]) -> None:
        """Continue every session of one takeover, in the replay order."""
        self._seqs = {}
        moves = HostMoves(self, {})
        committers = sorted((r for r in rebuilt if _committing(r.replica)), key=lambda r: r.replica.client_version)
        others = [r for r in rebuilt if not _committing(r.replica)]
        moves.order.arrange([r.replica.session_id for r in committers], [r.replica.session_id for r in others])
        for r in rebuilt:
            self.nursery.start_soon(self._resume, r, moves)

    async def _resume(self, r: Rebuilt, moves: HostMoves) -> None:
        replica = r.replica
        started = time.monotonic()
        stream = FastSocketStream(r.sock)
        r.sock.setblocking(False)
        pairs = tuple((k, v) for k, v in replica.params.items() if k not in CONNMGR_PARAMS)
        peer = f"{replica.peer[0]}:{replica.peer[1]}"
        secret = await self.ctx.secrets.lookup(replica.user) if self.ctx.secrets is not None else None
        keys = _scram_keys(secret, replica.user, r.heads) if not self.ctx.config.primary.password else None
        conn = ClientConnection.resumed(
            self.ctx, stream, peer, user=replica.user, database=replica.database, startup_pairs=pairs,
            session=replica.session, key=replica.key, creds=_credentials(self.ctx.config, secret, keys),
        )  # fmt: skip
        self.ctx.registry.add(conn)
        backend = None
        carry = None
        sid = replica.session_id
        moves.sessions[conn.id] = replica
        order = moves.order
        committer = order.is_committer(sid)
        try:
            self._check(r)
            if self.ctx.guard_for is not None:  # the policy holds here too: the class, masks and names in flight
                conn.guard = await self.ctx.guard_for(conn)
                if conn.guard is not None:
                    conn.guard.resume(replica.session)
            if secret is not None and secret.kind == "scram" and keys is None and not self.ctx.config.primary.password:
                raise NotResumable("the session logged in with SCRAM and this host could not recover its key from"
                                   " the copied frames of its start (encrypted, not seen, or another verifier"
                                   " than host A's), so it cannot log it in again", "credentials")  # fmt: skip
            with trio.fail_after(self.ctx.config.failover.max_wait):
                await self._check_unseen(r)
            if _in_transaction(replica) and not self.ctx.config.host.move_transactions:
                raise NotResumable("the host of this session failed while it had a transaction open or a request in"
                                   " flight, which this connmgr does not move ([host] move_transactions = false):"
                                   " the transaction did not commit unless its commit had been acknowledged",
                                   "open transaction")  # fmt: skip
            if _in_transaction(replica):  # moved as the database failover moves a session
                log.info("session %d: moving its transaction %d: %s, pending %s, tx %s, %d request bytes, %d reply"
                         " bytes, unmarked %d, held %d", sid, replica.transactions + 1,
                         _summary(replica.journal.requests), [q.kind for q in replica.session.pending],
                         replica.session.tx_status.name, len(replica.journal.requests), len(replica.journal.replies),
                         replica.unmarked, len(replica.stash))  # fmt: skip
                relay = _ReplicaRelay(replica)
                conn.journal, conn.recorder = replica.journal, replica.recorder
                try:
                    if committer:
                        await order.committer_turn(sid)
                    else:
                        await order.commits_settled()
                    with trio.fail_after(self.ctx.config.failover.max_wait):
                        backend = await _move(conn, relay, moves, committer)
                finally:
                    if committer:
                        order.commit_settled(sid)
                    else:
                        order.prefix_replayed(sid)
                    conn.journal = conn.recorder = None
                carry = Carry(pending_abort=relay.pending_abort, inject_mode=relay.carry_inject)
            else:
                with trio.fail_after(self.ctx.config.failover.max_wait):
                    if r.forwarded:
                        await self._check_forwarded(r)
                    backend = await open_backend(self.server, pairs, conn.creds,
                                                 max_message_size=conn.max_message_size)  # fmt: skip
                    conn.recorder = replica.recorder
                    await _restore(conn, backend, b"")
                    conn.recorder = None
                order.prefix_replayed(sid)
            await order.replays_done()  # the client goes on when every session is back
        except (NotResumable, NotMovable, BackendUnavailable, ClientError, PeerClosed, OSError,
                trio.TooSlowError) as e:  # fmt: skip
            # (whatever failed, the others must not wait for this one: a committer's turn
            # ends, the others' prefix is done; both are idempotent)
            if committer:
                order.commit_settled(sid)
            else:
                order.prefix_replayed(sid)
            kind = getattr(e, "kind", "restore failed")
            self.failed[kind] = self.failed.get(kind, 0) + 1
            log.warning("session %d (%s) not resumed: %s", replica.session_id, peer, e)
            if backend is not None:
                backend.close()
            await self._end(conn, r, e if isinstance(e, ClientError) else
                            NotResumable(f"the session could not be restored on the new primary: {e}", kind))  # fmt: skip
            return
        self.resumed += 1
        self.stalls.append(time.monotonic() - started)
        log.info("session %d (%s) continues here as client %d%s", replica.session_id, peer, conn.id,
                 " (its open transaction moved)" if carry is not None else "")  # fmt: skip
        await conn.run_resumed(backend, r.initial, carry)

    @staticmethod
    def _check(r: Rebuilt) -> None:
        replica = r.replica
        if replica.problem is not None:
            raise NotResumable(f"session not movable: {replica.problem}", "session state")
        if replica.recorder.not_movable:
            raise NotResumable("session not movable: " + "; ".join(replica.recorder.not_movable), "session state")
        if replica.session.statements_not_kept:
            raise NotResumable("session not movable: prepared statements not kept: "
                               + ", ".join(replica.session.statements_not_kept), "session state")  # fmt: skip
        if replica.server_end != replica.server_raw_end:
            raise NotResumable("the client was in the middle of a reply", "mid-message")

    async def _check_unseen(self, r: Rebuilt) -> None:
        """A commit host A ran that this host never saw: neither the mirror nor the copied
        frames carried its request (a frame the capture dropped, not yet acknowledged by
        host A's kernel, so the client sends it again to this host). Replaying the
        transaction, or running the request again, would apply it twice; its marker row
        tells. Without markers (``connmgr prepare-db``) a moved transaction cannot be
        checked so, and is not moved."""
        replica = r.replica
        if not replica.markers:
            if _in_transaction(replica) and self.ctx.config.host.move_transactions:
                raise NotResumable("session not movable: the database has no connmgr markers to tell whether a"
                                   " commit this host never saw ran on the failed host (run connmgr prepare-db)",
                                   "no markers")  # fmt: skip
            return
        n = replica.transactions + 1
        seq = await self.committed_seq(replica.database, replica.origin, replica.session_id)
        if seq > n or (seq == n and not replica.session.pending and not r.forwarded):
            raise NotResumable(f"session not movable: its transaction {seq} committed on the failed host, but"
                               f" this host saw it only up to transaction {n - 1} (its commit was neither mirrored"
                               " nor seen in the copied frames), so its reply is not known here",
                               "unseen commit")  # fmt: skip

    async def _check_forwarded(self, r: Rebuilt) -> None:
        """Requests the client sent while idle that the mirror never carried: host A may
        have run them before it died. Reads need nothing; a write that carried a marker
        committed exactly if its marker row is here, and then its reply is unknown; a
        write that could not carry one cannot be judged."""
        replica = r.replica
        writes = False
        statements = dict(replica.session.prepared_statements)  # name -> SQL ("" = unnamed)
        portals: dict[str, str | None] = dict(replica.session.portals)
        for tag, body in whole_messages(r.forwarded):
            if tag == _F:
                raise NotResumable("session not movable: a function call was in flight when its host failed; whether"
                                   " it committed cannot be known", "unmarked commit")  # fmt: skip
            sql: bytes | None = None
            if tag in (_Q, _P):
                raw = bytes([tag]) + (len(body) + 4).to_bytes(4, "big") + body
                sql = sql_text(tag, raw)
                if tag == _P:
                    name = body[:body.find(0)].decode("utf-8", "replace")
                    statements[name] = sql.decode("utf-8", "replace") if sql is not None else None
                    continue  # parsing writes nothing: its Execute may
            elif tag == _B:  # a prepared statement (psycopg prepares after 5 uses) bound to a portal
                portal, _, rest = body.partition(b"\0")
                name = rest[:rest.find(0)].decode("utf-8", "replace")
                portals[portal.decode("utf-8", "replace")] = statements.get(name)
                continue
            elif tag == _E:
                portal = body[:body.find(0)].decode("utf-8", "replace")
                text = portals.get(portal)
                sql = text.encode() if text is not None else None
                if sql is None:  # what it runs is not known here: it may write
                    writes = True
                    continue
            else:
                continue
            if sql is None:
                continue
            if may_write(bytes(sql)):
                writes = True
                if statement_count(bytes(sql)) != 1:
                    raise NotResumable("session not movable: a multi-statement write was in flight when its host"
                                       " failed; whether it committed cannot be known", "unmarked commit")  # fmt: skip
        if not writes:
            return
        if not replica.markers:
            raise NotResumable("session not movable: a write was in flight when its host failed and the database"
                               " has no connmgr markers to tell whether it committed", "no markers")  # fmt: skip
        n = replica.transactions + 1
        if await self.committed_seq(replica.database, replica.origin, replica.session_id) >= n:
            raise NotResumable("session not movable: a write in flight when its host failed had committed, and"
                               " its reply is not known here", "reply unknown")  # fmt: skip

    async def _end(self, conn: ClientConnection, r: Rebuilt, error: ClientError) -> None:
        """End the session: a FATAL ErrorResponse if the client is at a message boundary."""
        try:
            if r.replica.server_end == r.replica.server_raw_end:
                with trio.move_on_after(1):
                    await conn.stream.send_all(error.to_message())
                    # closing with the client's unread request in the socket would reset
                    # the connection and the error with it: end our side, read theirs out
                    await conn.stream.send_eof()
                    while await conn.stream.receive_some(65536):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            conn.state = ClientState.CLOSING
            conn._close_streams()
            self.ctx.registry.forget(conn)


def _scram_keys(secret: UserSecret | None, user: str, heads: tuple[bytes, bytes]) -> tuple[bytes, bytes] | None:
    """SCRAM pass-through on this host: the (ClientKey, ServerKey) the client proved to
    host A's connmgr, recovered from the copied frames of its start and this host's
    verifier of the user (no secret travels on the mirror). None if not SCRAM or not
    recoverable."""
    if secret is None or secret.kind != "scram":
        return None
    exchange = sasl_exchange(*heads)
    if exchange is None:
        return None
    verifier = ScramVerifier.parse(secret.value)
    key = recover_client_key(user, verifier, exchange.mechanism, exchange.client_first, exchange.server_first,
                             exchange.client_final)  # fmt: skip
    return (key, verifier.server_key) if key is not None else None



class _NotStreaming:
    streaming = False


class _ReplicaRelay:
    """What the database failover's move reads of a session's relay, taken from host B's
    replica of it (``session_move._move``)."""

    def __init__(self, replica) -> None:
        self.tracking = replica.tracking
        self.client_framer = _NotStreaming()
        self.backend = SimpleNamespace(framer=_NotStreaming())
        self.transactions = replica.transactions
        self.markers = replica.markers
        self.injector = _ReplicaInjector(replica)
        self.carry_inject = InjectMode.NONE
        self.pending_abort: bytes | None = None


class _ReplicaInjector:
    """The injector's state a move reads. ``stash``: the replies host A held back for an
    autocommit write until its commit (mirror direction ``h``), delivered if that write
    committed; they still carry its marker's replies, which the next relay strips in the
    injection mode the write had (``mode``: a simple Query's write carries its marker in
    the same statement list, an extended one after its own messages)."""

    def __init__(self, replica) -> None:
        self.unmarked = replica.unmarked
        self.marker_seq = replica.marker_seq
        self.stash = bytes(replica.stash) or None
        pending = replica.session.pending
        self.mode = InjectMode.NONE
        if self.stash and pending:
            last = next((r for r in pending if r.kind in ("Q", "S")), None)
            self.mode = InjectMode.NAMED if last is not None and last.kind == "Q" else InjectMode.EXT_TAIL


class HostMoves:
    """What the database failover's move reads of the failover, for one host takeover:
    this host's database, the marker rows of host A's sessions, the counters and the
    replay order."""

    def __init__(self, resumer: SessionResumer, sessions: dict) -> None:
        self.resumer = resumer
        self.server = resumer.server
        self.config = resumer.ctx.config.failover
        #: this host's client id -> the replica it continues
        self.sessions = sessions
        self.order = ReplayOrder(self.note, max_wait=self.config.max_wait)
        self.commits_acknowledged = 0
        self.transactions_replayed = 0
        self.replies_compared = 0
        self.transactions_rolled_back: Counter[str] = Counter()

    def note(self, text: str) -> None:
        log.warning("host takeover: %s", text)

    async def committed_seq(self, database: str, conn_id: int) -> int:
        replica = self.sessions[conn_id]
        return await self.resumer.committed_seq(database, replica.origin, replica.session_id)

    def commit_settled(self, conn_id: int) -> None:
        self.order.commit_settled(self.sessions[conn_id].session_id)

    async def replays_done(self) -> None:
        await self.order.replays_done()

    async def prefixes_replayed(self, conn_id: int) -> None:
        await self.order.prefixes_replayed(self.sessions[conn_id].session_id)


def _committing(replica) -> bool:
    """A commit in flight: requests pending and the marker of the open transaction sent
    (as the database failover judges it). A session waiting for a statement inside its
    transaction is not one: ordered among the committers, its statement could wait for a
    lock held by a transaction replayed behind it (found by the campaign: five seconds
    lost until the order gave up)."""
    session = replica.session
    return bool(session.pending) and replica.marker_seq == replica.transactions + 1 \
        and session.phase is not Phase.COPY_IN  # fmt: skip


def _in_transaction(replica) -> bool:
    """Anything to resolve or replay: requests in flight, or a transaction open (even
    one idle in its block: its statements ran only on host A's database)."""
    session = replica.session
    return bool(session.pending) or session.tx_status is not TxStatus.IDLE or bool(replica.journal.requests)


def _summary(requests: bytes | bytearray) -> str:
    """The kinds of the messages in ``requests`` (SQL never logged: it may hold literals)."""
    return "".join(chr(t) for t, _b in whole_messages(bytes(requests)))
