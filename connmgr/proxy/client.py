"""One client connection, from accept to close.

``ClientConnection.run`` walks the phases in order, each bounded by a cancel scope:

1. startup -- read the untyped startup packet; answer SSLRequest ('S' + TLS handshake
   when ``[tls]`` is on, else 'N') and GSSENCRequest ('N'); route a CancelRequest to the
   backend its virtual key belongs to and close; otherwise a StartupMessage.
2. admission -- refuse with 57P01 while shutting down, 53300 over ``max_clients``;
   database ``connmgr`` goes to the admin console.
3. authentication -- :func:`~connmgr.proxy.client_auth.authenticate_client`.
4. backend -- :func:`~connmgr.pg.backend.open_backend` with the client's parameters and the
   credentials from step 3; its ErrorResponse, if any, reaches the client unchanged.
5. welcome -- AuthenticationOk, the backend's ParameterStatus messages, a *virtual*
   BackendKeyData (connmgr's key, so cancels come to us) and ReadyForQuery.
6. relay -- :class:`~connmgr.proxy.relay.Relay`, one pump per direction in one nursery.

Whatever fails is reported to this client alone as an ErrorResponse with the SQLSTATE the
error carries, and the connection is closed; nothing is shared with other clients except
the counters.
"""

from __future__ import annotations

import enum
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from connmgr.config import Config
from connmgr.errors import (
    AdminShutdown,
    BackendLost,
    BackendRejected,
    BackendUnavailable,
    ClientError,
    TooManyClients,
)
from connmgr.failover.controller import Failover
from connmgr.failover.session_move import move_session
from connmgr.metrics import ConnStats, Metrics
from connmgr.pg.backend import BackendSession, Route, open_backend
from connmgr.pg.transport import close_now
from connmgr.pg.wire import MessageReader, PeerClosed
from connmgr.proxy.client_auth import SecretStore, authenticate_client
from connmgr.proxy.registry import Registry
from connmgr.proxy.relay import Carry, Relay, RelayContext
from replay.journal import Journal
from replay.session_recorder import SessionRecorder
from shadow import messages as m
from shadow.errors import RemoteProtocolError
from shadow.framing import Framer
from shadow.session import SessionState
from shadow.sqltext import enforce_synchronous_commit

log = logging.getLogger("connmgr.client")

#: a backend FATAL during the login that means the server is going away (admin shutdown,
#: crash shutdown, cannot connect now): with failover, the login goes to the new primary
_DYING = frozenset({"57P01", "57P02", "57P03"})

ADMIN_DATABASE = "connmgr"


class ClientState(enum.StrEnum):
    """Where a client connection is in its life (the values are what SHOW CLIENTS prints)."""

    HANDSHAKE = "handshake"  #: startup, TLS, authentication, the backend login
    ADMIN = "admin"  #: in the admin console
    ACTIVE = "active"  #: relaying to a backend (and moving with failover)
    CLOSING = "closing"  #: ended, its streams closed


#: the states each state may go to
CLIENT_TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    ClientState.HANDSHAKE: frozenset({ClientState.ADMIN, ClientState.ACTIVE, ClientState.CLOSING}),
    ClientState.ADMIN: frozenset({ClientState.CLOSING}),
    ClientState.ACTIVE: frozenset({ClientState.CLOSING}),
    ClientState.CLOSING: frozenset(),
}

#: startup parameters connmgr does not pass to the backend
_NOT_FORWARDED = frozenset({"replication"})


@dataclass(frozen=True, slots=True)
class ClientContext:
    """What a client connection uses of the running connmgr, built once by the
    composition root (:mod:`connmgr.app`)."""

    config: Config
    metrics: Metrics
    registry: Registry
    #: where new sessions log in (the primary; a failover moves it)
    route: Route
    secrets: SecretStore
    #: what each session's relay uses
    relay: RelayContext
    #: with [failover]: decisions, and moving a session whose backend is lost
    failover: Failover | None = None
    client_ssl_context: ssl.SSLContext | None = None
    #: False once shutting down (new sessions get 57P01)
    accepting: Callable[[], bool] = lambda: True
    #: whether a session on this database gets markers and DDL capture
    markers_enabled: Callable[[str], Awaitable[bool]] | None = None
    #: runs the admin console for a client of database ``connmgr`` after its login
    console: Callable[[ClientConnection, MessageReader], Awaitable[None]] | None = None
    #: with [policy] file: the session's guard, given its login (None: unrestricted);
    #: see :meth:`connmgr.proxy.policy.PolicyRuntime.guard_for`
    guard_for: Callable[[ClientConnection], Awaitable[object]] | None = None


class ClientConnection:
    """State of one client connection; see the module docstring."""

    def __init__(self, ctx: ClientContext, stream: trio.abc.Stream, peer: str) -> None:
        self.ctx = ctx
        self.id = ctx.registry.new_id()
        self.stream = stream
        self.peer = peer
        self.stats = ConnStats()
        self.session = SessionState()
        self.user = ""
        self.database = ""
        self.application_name = ""
        #: the policy's guard of this session, set at login (shadow/policy/guard.py)
        self.guard = None
        self.tls = False
        self.connected_at = time.time()
        self._state = ClientState.HANDSHAKE
        self.backend: BackendSession | None = None
        self.relay: Relay | None = None
        self.key: tuple[int, int] | None = None
        #: what connmgr proves to a backend for this client (kept for a move)
        self.creds = None
        #: failover: the open transaction's bytes (replay/journal.py) and the session state
        #: beyond it (replay/session_recorder.py); None without [failover]
        self.journal: Journal | None = None
        self.recorder: SessionRecorder | None = None
        if ctx.failover is not None:
            self.journal = Journal(ctx.config.failover.max_replay_bytes)
            self.recorder = SessionRecorder()
        self.cancel_scope = trio.CancelScope()
        self._close_reason: ClientError | None = None
        self._tls_handshaking = False

    @classmethod
    def resumed(cls, ctx: ClientContext, stream: trio.abc.Stream, peer: str, *, user: str, database: str,
                startup_pairs: tuple[tuple[str, str], ...], session: SessionState,
                key: tuple[int, int] | None, creds) -> ClientConnection:  # fmt: skip
        """A client connection another connmgr accepted and logged in, continued here (a
        host takeover, connmgr/host/takeover.py): its start-up is over, ``session`` is
        the protocol state the client is in, ``key`` the cancel key it holds."""
        conn = cls(ctx, stream, peer)
        conn.user, conn.database = user, database
        conn.application_name = dict(startup_pairs).get("application_name", "")
        conn.startup_pairs = startup_pairs
        conn.startup_params = dict(startup_pairs)
        conn.session = session
        conn.creds = creds
        if key is not None:
            conn.key = key
            ctx.registry.keys[key] = conn
        return conn

    async def run_resumed(self, backend: BackendSession, initial: bytes = b"", carry: Carry | None = None) -> None:
        """Relay a :meth:`resumed` connection on ``backend`` (logged in and restored;
        ``backend.leftover`` are replies the client gets first) until it ends; errors are
        reported to this client alone, as in :meth:`run`."""
        self.backend = backend
        self.ctx.registry.rebind(self, None, backend)
        framer = Framer(max_message_size=self.ctx.config.server.max_message_size, frontend=True)
        try:
            with self.cancel_scope:
                self.state = ClientState.ACTIVE
                # not mirrored: the secondary that would continue it never saw its start
                # (its TCP handshake, its log-in); a second host failure cannot move it
                await self._relay(initial, framer, False, carry, mirrored=False)
            if self._close_reason is not None:
                await self._fail(self._close_reason)
        except ClientError as e:
            await self._fail(e)
        except RemoteProtocolError as e:
            await self._fail(ClientError(e.message, sqlstate=e.sqlstate))
        except (trio.BrokenResourceError, trio.ClosedResourceError, PeerClosed):
            pass
        except Exception:  # noqa: BLE001 - a bug met by one client costs that client alone
            log.exception("client %d %s (resumed): internal error; this connection is closed", self.id, self.peer)
            await self._fail(ClientError("internal error in connmgr (its log has the details)", sqlstate="XX000"))
        finally:
            self.state = ClientState.CLOSING
            self._close_streams()
            self.ctx.registry.forget(self)

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> ClientState:
        return self._state

    @state.setter
    def state(self, new: ClientState) -> None:
        if new is not self._state and new not in CLIENT_TRANSITIONS[self._state]:
            raise RuntimeError(f"client {self.id}: no transition from {self._state} to {new}")
        self._state = new

    @property
    def max_message_size(self) -> int:
        return self.ctx.config.server.max_message_size

    async def run(self) -> None:
        ctx = self.ctx
        cfg = ctx.config.server
        try:
            with self.cancel_scope:
                try:
                    with trio.fail_after(cfg.handshake_timeout):
                        reader = await self._startup()
                        if reader is None:
                            return
                        if self.database == ADMIN_DATABASE:
                            await self._admin_login(reader)
                        else:
                            await self._connect(reader)
                except trio.TooSlowError:
                    raise ClientError(
                        f"client did not complete the startup within {cfg.handshake_timeout:g}s"
                        " (handshake_timeout)",
                        sqlstate="08006",
                    ) from None
                if self.state is ClientState.ADMIN:
                    if ctx.console is not None:
                        await ctx.console(self, reader)
                    return
                markers_on = False
                mirror = ctx.relay.mirror
                if mirror is not None and mirror.running and ctx.markers_enabled is not None:
                    markers_on = await ctx.markers_enabled(self.database)
                if ctx.guard_for is not None:
                    self.guard = await ctx.guard_for(self)
                self.state = ClientState.ACTIVE
                await self._relay(reader.take_buffered(), reader.framer, markers_on)
            if self._close_reason is not None:  # close_with() cancelled us
                await self._fail(self._close_reason)
        except PeerClosed:
            log.debug("client %d %s closed during the handshake", self.id, self.peer)
        except ClientError as e:
            await self._fail(e)
        except RemoteProtocolError as e:
            await self._fail(ClientError(e.message, sqlstate=e.sqlstate))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # noqa: BLE001 - a bug met by one client costs that client alone
            log.exception("client %d %s user=%s db=%s: internal error; this connection is closed, the others"
                          " go on", self.id, self.peer, self.user, self.database)  # fmt: skip
            await self._fail(ClientError("internal error in connmgr (its log has the details)", sqlstate="XX000"))
        finally:
            self.state = ClientState.CLOSING
            self._close_streams()
            ctx.registry.forget(self)

    async def _relay(self, initial: bytes, framer: Framer, markers_on: bool, carry: Carry | None = None,
                     mirrored: bool = True) -> None:
        """Relay until the session ends (``initial``: client bytes read already, cut by
        ``framer``; ``carry``: what a move left for the relay); with failover, a lost
        backend moves the session to the secondary (connmgr/failover/session_move.py) and
        relaying goes on there."""
        carry = carry or Carry()
        failover = self.ctx.failover
        while True:
            mirrored = mirrored and (failover is None or not failover.failed_over)
            self.relay = Relay(self, self.backend, framer, self.ctx.relay, markers_on and mirrored,
                               mirrored=mirrored, carry=carry)  # fmt: skip
            try:
                await self.relay.run(initial)
                return
            except BackendLost as lost:
                if failover is None:
                    raise
                if self.relay.input_done:  # the client is leaving (Terminate) or thrown out: no move
                    if self.relay.closing is not None:
                        raise self.relay.closing from None
                    return
                old = self.backend
                self.backend = None
                old.close()
                self.ctx.registry.rebind(self, old, None)
                self.backend = await move_session(self, self.relay, lost, failover)
                self.ctx.registry.rebind(self, None, self.backend)
                carry = self.relay.carry_over()
                initial = b""
                markers_on = False

    async def _fail(self, error: ClientError) -> None:
        """Tell the client (best effort, briefly) and count it."""
        self.ctx.metrics.client_errors[error.sqlstate] += 1
        level = logging.INFO if error.sqlstate.startswith(("08", "57")) else logging.WARNING
        log.log(level, "client %d %s user=%s db=%s: %s %s", self.id, self.peer, self.user, self.database, error.sqlstate, error.message)
        if self._tls_handshaking:
            return  # the client expects TLS records; plaintext would only confuse it
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.send_all(error.to_message())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            except Exception:  # noqa: BLE001 - the report itself failed (a bug): the log has it
                log.exception("client %d: could not report %s to the client", self.id, error.sqlstate)

    def _close_streams(self) -> None:
        if self.backend is not None:
            self.backend.close()
        close_now(self.stream)

    def close_with(self, error: ClientError) -> None:
        """Ask this connection to end with ``error`` (used by shutdown and admin KILL)."""
        if self.relay is not None:
            self.relay.stop(error)
        else:
            self._close_reason = error
            self.cancel_scope.cancel()

    # ------------------------------------------------------------------ phases

    async def _startup(self) -> MessageReader | None:
        cfg = self.ctx.config
        reader = MessageReader(
            self.stream, Framer(typed=False, max_message_size=cfg.server.max_message_size, frontend=True), "client"
        )
        while True:
            try:
                tag, body = await reader.read()
            except PeerClosed:
                return None
            req = m.decode_startup(body)
            if isinstance(req, m.SSLRequest):
                if reader.has_buffered:
                    raise ClientError("received unencrypted data after SSL request", sqlstate="08P01")
                if cfg.tls.mode == "disable" or self.tls:
                    await self.stream.send_all(b"N")
                    continue
                await self.stream.send_all(b"S")
                tls_stream = trio.SSLStream(self.stream, self.ctx.client_ssl_context, server_side=True)
                self._tls_handshaking = True
                try:
                    await tls_stream.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError):
                    return None
                self._tls_handshaking = False
                self.stream = tls_stream
                self.tls = True
                reader = MessageReader(tls_stream, reader.framer, "client")
                continue
            if isinstance(req, m.GSSENCRequest):
                if reader.has_buffered:
                    raise ClientError("received unencrypted data after GSSAPI encryption request", sqlstate="08P01")
                await self.stream.send_all(b"N")
                continue
            if isinstance(req, m.CancelRequest):
                await self.ctx.registry.cancel(req.pid, req.secret)
                return None
            break
        assert isinstance(req, m.StartupMessage)
        self.session.frontend_message(0, body)
        params = req.parameters  # the last value of each name, as Postgres takes it
        self.user = params.get("user", "")
        self.database = params.get("database") or self.user
        self.application_name = params.get("application_name", "")
        overrides = {"database": self.database}
        if cfg.primary.user:
            overrides["user"] = cfg.primary.user
        if self.ctx.relay.mirror is not None:  # the pair's guarantee: the session starts synchronous
            options, asked = enforce_synchronous_commit(params.get("options", ""))
            overrides["options"] = options
            if asked is not None:
                self.ctx.metrics.synchronous_commit_overridden += 1
                log.info("client %d asked for synchronous_commit=%s in its startup options; the pair runs"
                         " it with on (a weaker value would lose acknowledged commits at a failover)",
                         self.id, asked)  # fmt: skip
        #: what the backend gets: the client's parameters in its order, repeats and bytes
        #: that are not UTF-8 included (Postgres decides on them), with connmgr's overrides
        self.startup_pairs = _forwarded(req.pairs, overrides)
        self.startup_params = dict(self.startup_pairs)
        self.unrecognized_options = tuple(k for k in params if k.startswith("_pq_."))
        self.protocol_minor = req.protocol_version & 0xFFFF
        reader.switch_to_typed()
        if self.protocol_minor > 0 or self.unrecognized_options:
            # Like Postgres: answer at once, before authentication. connmgr speaks 3.0 to
            # every backend (a session must be able to move to any server), so 3.0 it is.
            # (Postgres puts the full version code 3.0 = 0x00030000 in the "newest minor" field.)
            await self.stream.send_all(m.NegotiateProtocolVersion(3 << 16, self.unrecognized_options).encode())

        if cfg.tls.mode == "require" and not self.tls:
            raise ClientError(
                f'connection for user "{self.user}" rejected: connmgr requires TLS', sqlstate="28000"
            )
        if not self.ctx.accepting():
            raise AdminShutdown("the connection manager is shutting down")
        if len(self.ctx.registry) > cfg.server.max_clients:
            self.ctx.metrics.clients_rejected["max_clients"] += 1
            raise TooManyClients("sorry, too many clients already")
        return reader

    async def _connect(self, reader: MessageReader) -> None:
        ctx = self.ctx
        try:
            creds = self.creds = await authenticate_client(ctx.config, ctx.secrets, self.stream, reader, self.user)
        except ClientError as e:
            if e.sqlstate.startswith("28"):
                ctx.metrics.auth_failures += 1
            raise
        failover = ctx.failover
        if failover is not None and (failover.frozen is not None or failover.failed_over):
            await failover.new_session_ready()
        try:
            self.backend = await self._open_backend(creds)
        except BackendUnavailable:
            ctx.metrics.backend_connect_errors += 1
            raise
        ctx.metrics.backend_connects += 1
        await self._welcome(self.backend)

    async def _open_backend(self, creds) -> BackendSession:
        """The session's backend on the current primary. With failover configured, a login
        that the primary's death cuts short (it could not connect, or a FATAL 57P0x from
        a dying server) asks for the decision and, if the pair failed over, logs in on the
        new primary instead: the client only sees a slower start."""
        route, failover = self.ctx.route, self.ctx.failover
        server = route.server
        try:
            return await open_backend(server, self.startup_pairs, creds, max_message_size=self.max_message_size)
        except (BackendUnavailable, BackendRejected) as e:
            if failover is None or (isinstance(e, BackendRejected) and e.sqlstate not in _DYING):
                raise
            if not await failover.decide(f"client {self.id}: login failed: {e.message}") \
                    or route.server is server:  # fmt: skip
                raise
            await failover.new_session_ready()
            log.info("client %d: the primary died during its login; logging in on %s", self.id, route.server.address)
            return await open_backend(route.server, self.startup_pairs, creds, max_message_size=self.max_message_size)

    async def _welcome(self, backend: BackendSession) -> None:
        self.key = self.ctx.registry.register_key(self)
        out = [m.authentication_ok()]
        out.extend(backend.welcome)
        out.append(m.backend_key_data(*self.key))
        out.append(m.ready_for_query("I"))
        # Bring the shadow to the state the client now sees.
        s = self.session
        s.backend_message(ord("R"), b"\0\0\0\0")
        for raw in backend.welcome:
            s.backend_message(raw[0], raw[5:])
        s.backend_message(ord("K"), m.backend_key_data(*self.key)[5:])
        s.backend_message(ord("Z"), b"I")
        await self.stream.send_all(b"".join(out))

    async def _admin_login(self, reader: MessageReader) -> None:
        cfg = self.ctx.config
        await authenticate_client(cfg, self.ctx.secrets, self.stream, reader, self.user)
        admins = cfg.server.admin_users
        if admins and self.user not in admins:
            raise ClientError(f'user "{self.user}" is not allowed into the admin console', sqlstate="28000")
        self.state = ClientState.ADMIN


def _forwarded(pairs: tuple[tuple[str, str], ...], overrides: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """``pairs`` without what connmgr keeps to itself (``replication``, ``_pq_.`` options),
    each overridden name once, at its first position (or at the end)."""
    out = []
    overridden = set()
    for name, value in pairs:
        if name in _NOT_FORWARDED or name.startswith("_pq_."):
            continue
        if name in overrides:
            if name not in overridden:
                overridden.add(name)
                out.append((name, overrides[name]))
            continue
        out.append((name, value))
    out.extend((name, value) for name, value in overrides.items() if name not in overridden)
    return tuple(out)
