"""The running connection manager: listeners, the registry of clients, cancel keys, the
metrics endpoint and signal handling, all owned by one nursery.

:func:`serve` is the whole program behind ``connmgr serve``. Shutdown is graceful: SIGTERM
(or :meth:`App.shutdown`) closes the listeners, lets every client finish its transaction,
closes idle sessions with 57P01 and, after ``shutdown_timeout``, closes the rest. SIGINT
(or a second SIGTERM) closes everything at once.
"""

from __future__ import annotations

import logging
import secrets
import signal
import ssl
import time

import trio

from connmgr.config import Config, parse_hostport
from connmgr.errors import AdminShutdown, ClientError
from connmgr.failover.controller import Failover
from connmgr.metrics import Metrics
from connmgr.pair.ddl_apply import DdlApplier
from connmgr.pair.import_process import ImportProcess
from connmgr.pair.mirror import MirrorLink, serve_mirror
from connmgr.pair.sequence_sync import SequenceSync
from connmgr.pair.syncrep_watch import SyncRepWatch
from connmgr.pg.backend import BackendServer, BackendSession, Credentials, open_backend, send_cancel
from connmgr.pg.redo_monitor import RedoMonitor
from connmgr.pg.wire import PeerClosed
from connmgr.proxy.client import ClientConnection, ClientState
from connmgr.proxy.client_auth import SecretStore
from connmgr.proxy.engine import RelayEngine
from connmgr.proxy.transport import FastSocketStream
from replay import markers
from shadow import messages
from shadow.sqltext import quote_literal

log = logging.getLogger("connmgr")


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        p = config.primary
        self.server = BackendServer(p.name, p.host, p.port, p.connect_timeout, p.tls, p.tls_ca_file)
        self.metrics = Metrics()
        self.secrets = SecretStore(config, self.server)
        self.clients: dict[int, ClientConnection] = {}
        self.keys: dict[tuple[int, int], ClientConnection] = {}
        #: (server address, real backend pid) -> virtual pid, for NotificationResponse
        self.virtual_pids: dict[tuple[str, int], int] = {}
        self.accepting = True
        self.listen_addresses: list[tuple[str, int]] = []
        self.client_ssl_context = _client_ssl_context(config)
        self.mirror: MirrorLink | None = None
        self.redo: RedoMonitor | None = None
        #: commits waiting for the synchronous standby too long (primary of a pair)
        self.syncrep = SyncRepWatch(lambda: self._open_redo_session(None, "connmgr syncrep watch"))
        #: this connmgr instance's number: names its sessions' marker rows (replay/markers.py)
        self.origin = time.time_ns() // 1000
        #: database -> (markers usable, when checked); see markers_enabled
        self._marker_dbs: dict[str, tuple[bool, float]] = {}
        if config.mirror.peer:
            host, port = parse_hostport(config.mirror.peer, what="[mirror] peer")
            self.redo = RedoMonitor(interval=config.redo.interval)
            redo = self.redo
            self.mirror = MirrorLink(
                host, port, max_buffer_bytes=config.mirror.max_buffer_bytes,
                heartbeat_interval=config.mirror.heartbeat_interval, lsn=lambda: redo.lsn,
                two_phase=config.mirror.mode == "two-phase", two_phase_timeout=config.mirror.two_phase_timeout,
            )
        #: secondary role: every mirrored record is handed to these callbacks, in order
        self.mirror_consumers: list = []
        self.imports: ImportProcess | None = None
        if config.mirror.listen:
            ddl = DdlApplier(self._open_ddl_session) if config.poster.host and config.poster.replay_ddl else None
            self.imports = ImportProcess(ddl=ddl, database=config.poster.dbname)
            self.mirror_consumers.append(self.imports.on_records)
            self.imports.on_topology = self._retarget
        #: secondary role: where the poster queue is read (the primary database) and where
        #: DDL and sequences are applied (the secondary one); a Topology record turns
        #: them around after a failover
        self.poster_address = (config.poster.host, config.poster.port)
        self.replica_server = self.server
        self.topology_changes = 0
        #: secondary role: keeps this database's sequences ahead of the primary's
        self.sequences: SequenceSync | None = None
        if config.mirror.listen and config.poster.host and config.poster.sequence_interval > 0:
            self.sequences = SequenceSync(self._open_poster_sql_session, self._open_local_admin_session,
                                          interval=config.poster.sequence_interval,
                                          lead=config.poster.sequence_lead)  # fmt: skip
        self.mirror_listen_address: tuple[str, int] | None = None
        #: primary role: moves live sessions to the secondary database when the primary dies
        self.failover: Failover | None = Failover(self) if config.failover.secondary else None
        self.engine: RelayEngine | None = None
        if config.server.relay == "engine":
            self.engine = RelayEngine(self.mirror.flush_soon if self.mirror is not None else None)
        self._next_pid = 10_000 + secrets.randbelow(50_000)
        self._shutdown = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._drain_scope: trio.CancelScope | None = None

    # ------------------------------------------------------------------ registry

    @property
    def active_clients(self) -> int:
        return len(self.clients)

    def register_key(self, conn: ClientConnection) -> tuple[int, int]:
        """A virtual (pid, secret) for ``conn``'s BackendKeyData, unique while it lives."""
        self._next_pid = self._next_pid + 1 if self._next_pid < 2**31 - 1 else 10_000
        key = (self._next_pid, secrets.randbits(32))
        self.keys[key] = conn
        if conn.backend is not None:
            self.virtual_pids[(conn.backend.server.address, conn.backend.pid)] = key[0]
        return key

    def forget(self, conn: ClientConnection) -> None:
        self.clients.pop(conn.id, None)
        if conn.key is not None:
            self.keys.pop(conn.key, None)
        if conn.backend is not None:
            self.virtual_pids.pop((conn.backend.server.address, conn.backend.pid), None)
        self.metrics.connection_closed(conn.stats)

    async def cancel(self, pid: int, secret: int | bytes) -> None:
        """Route a client's CancelRequest to the backend session its key belongs to."""
        conn = self.keys.get((pid, secret)) if isinstance(secret, int) else None
        if conn is None or conn.backend is None:
            log.info("cancel request for unknown key (pid %d) ignored", pid)
            return
        self.metrics.cancels += 1
        b = conn.backend
        await send_cancel(b.server, b.pid, b.secret)

    # ------------------------------------------------------------------ serving

    async def handle(self, stream: FastSocketStream) -> None:
        conn = ClientConnection(self, stream, stream.peer())
        self.clients[conn.id] = conn
        self.metrics.clients_accepted += 1
        await conn.run()

    async def markers_enabled(self, database: str) -> bool:
        """Whether sessions on ``database`` get purge markers and DDL capture: mirroring
        is on, ``[mirror] markers`` too, and the database has ``connmgr.mark`` (checked
        once per database with the [redo] credentials; a negative answer is checked again
        after a minute). Without it, a marker would fail inside the client's transaction,
        so it is never injected; the gap is logged and counted."""
        if self.mirror is None or not self.config.mirror.markers:
            return False
        if self.failover is not None and self.failover.failed_over:
            return False
        known = self._marker_dbs.get(database)
        now = time.monotonic()
        if known is not None and (known[0] or now - known[1] < 60):
            return known[0]
        ok = False
        try:
            with trio.fail_after(self.config.primary.connect_timeout):
                session = await self._open_redo_session(database, "connmgr marker check")
                try:
                    rows = await session.query_rows(messages.query(markers.CHECK_SQL))
                finally:
                    session.close()
            ok = rows == [(b"t",)]
            if not ok:
                log.warning("database %r has no connmgr marker function: its transactions are not"
                            " marked (interrupted commits cannot be resolved exactly) and DDL is not"
                            " captured; run `connmgr prepare-db` on both databases", database)  # fmt: skip
        except (ClientError, OSError, trio.TooSlowError, PeerClosed) as e:
            log.warning("cannot check database %r for the connmgr marker function: %s", database, e)
        self._marker_dbs[database] = (ok, now)
        self.metrics.marker_databases = {db: v for db, (v, _t) in self._marker_dbs.items()}
        return ok

    async def _own_session(self, server: BackendServer, user: str, password: str, database: str,
                           purpose: str) -> BackendSession:  # fmt: skip
        """A session of connmgr's own (not a client's), named ``purpose`` in pg_stat_activity."""
        params = {"user": user, "database": database, "application_name": purpose}
        return await open_backend(server, params, Credentials(password=password or None), max_message_size=1 << 20)

    async def _open_redo_session(self, database: str | None = None, purpose: str = "connmgr redo monitor"):
        """On the primary (this connmgr's database) with the [redo] credentials."""
        r = self.config.redo
        return await self._own_session(self.server, r.user, r.password, database or r.dbname, purpose)

    async def _open_ddl_session(self, database: str, purpose: str = "connmgr ddl replay"):
        """On *this* connmgr's database (the secondary) as [poster] ddl_user (default: the
        poster user)."""
        p = self.config.poster
        password = p.ddl_password if p.ddl_user else p.password
        return await self._own_session(self.replica_server, p.ddl_user or p.user, password, database, purpose)

    async def _open_local_admin_session(self):
        return await self._open_ddl_session(self.config.poster.dbname, "connmgr sequence sync")

    def _poster_server(self, what: str) -> BackendServer:
        host, port = self.poster_address
        return BackendServer(f"primary ({what})", host, port, self.config.primary.connect_timeout)

    async def _open_poster_sql_session(self):
        """A plain SQL session on the primary database with the [poster] credentials."""
        p = self.config.poster
        return await self._own_session(self._poster_server("sequences"), p.user, p.password, p.dbname,
                                       "connmgr sequence sync")  # fmt: skip

    async def _open_poster_stream(self):
        from connmgr.pg.replication import open_replication_stream

        p = self.config.poster
        return await open_replication_stream(
            self._poster_server("poster"), Credentials(password=p.password or None), user=p.user, database=p.dbname,
            slot=p.slot, publication=p.publication, temporary=p.temporary,
            eager_status=False,  # the poster slot is not a synchronous standby
        )

    def failed_over(self, server: BackendServer) -> None:
        """The secondary is the primary now: new sessions go there, unmirrored and
        unmarked (there is no pair any more until the old primary is re-seeded), and the
        redo monitor samples it."""
        self.server = server
        if self.redo is not None:
            self.redo.retarget()

    def _retarget(self, topology) -> None:
        """Secondary role: the pair turned around (mirror_protocol.Topology). The poster
        queue is read from the new primary, DDL and sequences go to the new secondary.
        A permanent poster slot left on the old primary is dropped (it would keep WAL
        there for ever)."""
        old = self.poster_address
        host, port = parse_hostport(topology.primary, what="topology primary")
        self.poster_address = (host, port)
        s_host, s_port = parse_hostport(topology.secondary, what="topology secondary")
        self.replica_server = BackendServer("secondary", s_host, s_port, self.config.primary.connect_timeout)
        self.topology_changes += 1
        log.warning("the pair turned around: the poster queue is read from %s:%d, sequences and DDL go to"
                    " %s:%d", host, port, s_host, s_port)  # fmt: skip
        if self.imports is not None:
            self.imports.restart_poster()
        if self.sequences is not None:
            self.sequences.close()
        if not self.config.poster.temporary and old != self.poster_address and self._nursery is not None:
            self._nursery.start_soon(self._drop_old_poster_slot, old)

    async def _drop_old_poster_slot(self, address: tuple[str, int]) -> None:
        p = self.config.poster
        server = BackendServer("old primary (poster slot)", *address, self.config.primary.connect_timeout)
        slot = quote_literal(p.slot)
        for _ in range(30):  # the old stream's walsender may take a moment to let go
            try:
                with trio.fail_after(10):
                    session = await self._own_session(server, p.user, p.password, p.dbname, "connmgr poster cleanup")
                    try:
                        rows = await session.query_rows(messages.query(
                            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots"
                            f" WHERE slot_name = {slot} AND NOT active"
                        ))  # fmt: skip
                        left = await session.query_rows(messages.query(
                            f"SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {slot}"))
                    finally:
                        session.close()
                if not left:
                    log.info("poster slot %s dropped on the old primary %s:%d (%d)", p.slot, *address, len(rows))
                    return
            except (ClientError, OSError, PeerClosed, trio.TooSlowError) as e:
                log.warning("cannot drop poster slot %s on the old primary %s:%d: %s", p.slot, *address, e)
                return
            await trio.sleep(1.0)
        log.warning("poster slot %s on the old primary %s:%d stays in use; drop it by hand", p.slot, *address)

    def _mirrored(self, records: list) -> None:
        for consumer in self.mirror_consumers:
            consumer(records)

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._shutdown.set()

    def _raise_fd_limit(self) -> None:
        """Each client costs two descriptors (client and backend socket): raise the soft
        limit to the hard one and say so if max_clients still cannot fit."""
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        except (ImportError, ValueError, OSError):
            return
        needed = 2 * self.config.server.max_clients + 64
        if soft != resource.RLIM_INFINITY and soft < needed:
            log.warning(
                "open-file limit %d is below the %d that max_clients=%d needs; clients beyond"
                " the limit will be refused (raise ulimit -n)", soft, needed, self.config.server.max_clients,
            )

    async def serve(self, *, handle_signals: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until shut down. ``task_status.started`` gets the bound listen addresses.
        ``handle_signals`` installs the SIGTERM/SIGINT handlers (main thread only)."""
        cfg = self.config
        self._raise_fd_limit()
        listeners = []
        for addr in cfg.server.listen:
            host, port = parse_hostport(addr, allow_zero=True)
            listeners.extend(await trio.open_tcp_listeners(port, host=host, backlog=4096))
        self.listen_addresses = [ln.socket.getsockname()[:2] for ln in listeners]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.engine is not None:
                await nursery.start(self.engine.run)
            if self.redo is not None:
                await nursery.start(self.redo.run, self._open_redo_session)
                if self.mirror is not None:
                    await nursery.start(self.syncrep.run)
            if self.mirror is not None:
                await nursery.start(self.mirror.run)
            if self.failover is not None:
                await nursery.start(self.failover.run)
            if cfg.mirror.listen:
                host, port = parse_hostport(cfg.mirror.listen, allow_zero=True)
                self.mirror_listen_address = await nursery.start(serve_mirror, host, port, self._mirrored)
                if cfg.poster.host:
                    await nursery.start(self.imports.follow_poster, self._open_poster_stream)
                    if self.sequences is not None:
                        await nursery.start(self.sequences.run)
            for ln in listeners:
                nursery.start_soon(self._accept_loop, ln, nursery)
            if cfg.metrics.listen:
                from connmgr.ops.prometheus import serve_metrics

                await nursery.start(serve_metrics, self)
            if handle_signals:
                nursery.start_soon(self._signals)
            for host, port in self.listen_addresses:
                log.info("listening on %s:%d, backend %s", host, port, self.server.address)
            task_status.started(self.listen_addresses)
            await self._shutdown.wait()
            self.accepting = False
            for ln in listeners:
                await ln.aclose()
            await self._drain()
            nursery.cancel_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        sock = listener.socket
        while True:
            try:
                client, _addr = await sock.accept()
            except (trio.ClosedResourceError, OSError) as e:
                if not self.accepting:
                    return
                if isinstance(e, OSError) and e.errno in (24, 23, 105, 12):  # EMFILE ENFILE ENOBUFS ENOMEM
                    log.error("accept failed: %s; pausing 100 ms", e)
                    await trio.sleep(0.1)
                    continue
                if isinstance(e, trio.ClosedResourceError):
                    return
                continue
            nursery.start_soon(self.handle, FastSocketStream.from_trio(client))

    async def _drain(self) -> None:
        timeout = self.config.server.shutdown_timeout
        log.info("shutting down: waiting up to %gs for %d clients", timeout, len(self.clients))
        with trio.move_on_after(timeout) as self._drain_scope:
            while self.clients:
                for conn in list(self.clients.values()):
                    if conn.state is not ClientState.ACTIVE or conn.session.is_idle():
                        conn.close_with(AdminShutdown("terminating connection due to administrator command"))
                await trio.sleep(0.05)
        for conn in list(self.clients.values()):
            conn.close_with(AdminShutdown("terminating connection due to administrator command"))
        with trio.move_on_after(2):
            while self.clients:
                await trio.sleep(0.01)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGINT or self._shutdown.is_set():
                    self.fast_shutdown()
                self.shutdown()

    def fast_shutdown(self) -> None:
        """Close every client now, including during a graceful drain already under way."""
        log.info("fast shutdown")
        self.config = _no_wait(self.config)
        if self._drain_scope is not None:
            self._drain_scope.cancel()


def _no_wait(config: Config) -> Config:
    import dataclasses

    return dataclasses.replace(config, server=dataclasses.replace(config.server, shutdown_timeout=0.0))


def _client_ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.mode == "disable":
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return ctx


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run a connection manager with ``config`` until SIGTERM/SIGINT."""
    app = App(config)
    await app.serve(task_status=task_status)
