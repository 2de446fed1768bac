"""Continuing one session on this host after a host takeover (issue 14, step 5).

The client's socket is rebuilt (connmgr/host/takeover.py); its session state is host B's
replica of it (replay/session_replica.py). This module logs in to host B's database with
the client's start-up parameters, restores what the session carries beyond a transaction
(prepared statements, settings, LISTEN: the same restore as the database failover's,
connmgr/failover/session_move.py) and relays on.

What moves today: a session idle between transactions (nothing in flight, no open
transaction) whose replies the client has as whole messages -- the state of most pooled
and idle connections. A session with an open transaction or a request in flight is ended
with a clean FATAL 08006 naming the reason (the replay of open transactions from host B's
memory is the next step of issue 14), as is a session whose replica says it cannot move.
Connections whose reply stream was cut inside a message are closed without an
ErrorResponse (one would garble the message the client is reading).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from connmgr.errors import BackendUnavailable, ClientError
from connmgr.failover.session_move import _restore
from connmgr.host.takeover import Rebuilt
from connmgr.pg.backend import BackendServer, open_backend
from connmgr.pg.transport import FastSocketStream
from connmgr.pg.wire import PeerClosed
from connmgr.proxy.client import ClientConnection, ClientContext, ClientState
from connmgr.proxy.client_auth import _credentials
from replay.import_queue import sql_text
from shadow.sqltext import may_write, statement_count

log = logging.getLogger("connmgr.host")

__all__ = ["CONNMGR_PARAMS", "SessionResumer"]

_F, _Q, _P = ord("F"), ord("Q"), ord("P")

#: SessionOpened parameters that are connmgr's, not the client's start-up parameters
CONNMGR_PARAMS = frozenset({"virtual_pid", "cancel_secret", "peer", "local", "origin", "markers"})


class NotResumable(ClientError):
    """The session cannot continue on this host: SQLSTATE 08006 to its client."""

    sqlstate = "08006"

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message, hint="Reconnect: new sessions go to the new primary.")
        self.kind = kind


class SessionResumer:
    """Continues rebuilt sessions (``__call__`` schedules one in ``nursery``)."""

    def __init__(self, ctx: ClientContext, server: BackendServer, nursery: trio.Nursery,
                 committed_seq: Callable[[str, int, int], Awaitable[int]]) -> None:  # fmt: skip
        self.ctx = ctx
        self.server = server
        self.nursery = nursery
        #: (database, origin, session) -> the last transaction of that session of host A
        #: that committed here (its marker row), 0 if none
        self.committed_seq = committed_seq
        self.resumed = 0
        self.failed: dict[str, int] = {}
        self.stalls: list[float] = []

    def __call__(self, rebuilt: Rebuilt) -> None:
        self.nursery.start_soon(self._resume, rebuilt)

    async def _resume(self, r: Rebuilt) -> None:
        replica = r.replica
        started = time.monotonic()
        stream = FastSocketStream(r.sock)
        r.sock.setblocking(False)
        pairs = tuple((k, v) for k, v in replica.params.items() if k not in CONNMGR_PARAMS)
        peer = f"{replica.peer[0]}:{replica.peer[1]}"
        secret = await self.ctx.secrets.lookup(replica.user) if self.ctx.secrets is not None else None
        conn = ClientConnection.resumed(
            self.ctx, stream, peer, user=replica.user, database=replica.database, startup_pairs=pairs,
            session=replica.session, key=replica.key, creds=_credentials(self.ctx.config, secret, None),
        )  # fmt: skip
        self.ctx.registry.add(conn)
        backend = None
        try:
            self._check(r)
            with trio.fail_after(self.ctx.config.failover.max_wait):
                if r.forwarded:
                    await self._check_forwarded(r)
                backend = await open_backend(self.server, pairs, conn.creds,
                                             max_message_size=conn.max_message_size)  # fmt: skip
                conn.recorder = replica.recorder
                await _restore(conn, backend, b"")
                conn.recorder = None
        except (NotResumable, BackendUnavailable, ClientError, PeerClosed, OSError, trio.TooSlowError) as e:
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
        log.info("session %d (%s) continues here as client %d", replica.session_id, peer, conn.id)
        await conn.run_resumed(backend, r.initial)

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
        if not replica.session.is_idle():
            raise NotResumable("the host of this session failed while it had a transaction open or a request in"
                               " flight; a host takeover continues only sessions idle between transactions so far,"
                               " so the transaction is lost (it did not commit unless its commit was acknowledged)",
                               "open transaction")  # fmt: skip
        if replica.server_end != replica.server_raw_end:
            raise NotResumable("the client was in the middle of a reply", "mid-message")

    async def _check_forwarded(self, r: Rebuilt) -> None:
        """Requests the client sent while idle that the mirror never carried: host A may
        have run them before it died. Reads need nothing; a write that carried a marker
        committed exactly if its marker row is here, and then its reply is unknown; a
        write that could not carry one cannot be judged."""
        replica = r.replica
        writes = False
        for tag, body in _whole_messages(r.forwarded):
            if tag == _F:
                raise NotResumable("session not movable: a function call was in flight when its host failed; whether"
                                   " it committed cannot be known", "unmarked commit")  # fmt: skip
            sql = sql_text(tag, bytes([tag]) + (len(body) + 4).to_bytes(4, "big") + body) if tag in (_Q, _P) else None
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
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            conn.state = ClientState.CLOSING
            conn._close_streams()
            self.ctx.registry.forget(conn)


def _whole_messages(data: bytes) -> list[tuple[int, bytes]]:
    """The whole typed messages at the start of ``data`` (a partial one at the end is left)."""
    out = []
    i, n = 0, len(data)
    while n - i >= 5:
        length = int.from_bytes(data[i + 1:i + 5], "big")
        if length < 4 or i + 1 + length > n:
            break
        out.append((data[i], data[i + 5:i + 1 + length]))
        i += 1 + length
    return out
