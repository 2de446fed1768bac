"""The running connection manager: listeners, the registry of clients, cancel keys, the
metrics endpoint and signal handling, all owned by one nursery.

:func:`serve` is the whole program behind ``connmgr serve``. Shutdown is graceful: SIGTERM
(or :meth:`App.shutdown`) closes the listeners, lets every client finish its transaction,
closes idle sessions with 57P01 and, after ``shutdown_timeout``, closes the rest. SIGINT
(or a second SIGTERM) closes everything at once.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import signal
import ssl
import sys
import time

import trio

from connmgr import config as config_mod
from connmgr.config import Config, parse_hostport
from connmgr.errors import AdminShutdown, ClientError
from connmgr.failover.controller import Failover
from connmgr.failover.fleet import Member
from connmgr.metrics import Metrics
from connmgr.ops.admin import AdminConsole, AdminContext, local_show
from connmgr.ops.prometheus import Exported, render, serve_metrics
from connmgr.pair.import_process import ImportProcess
from connmgr.pair.mirror import MirrorLink
from connmgr.pair.secondary import Secondary
from connmgr.pair.syncrep_watch import SyncRepWatch
from connmgr.pg.backend import BackendServer, Route, open_own_session
from connmgr.pg.redo_monitor import RedoMonitor
from connmgr.pg.transport import FastSocketStream
from connmgr.pg.wire import PeerClosed
from connmgr.proxy.client import ClientConnection, ClientContext, ClientState
from connmgr.proxy.client_auth import SecretStore
from connmgr.proxy.engine import RelayEngine
from connmgr.proxy.policy import PolicyRuntime
from connmgr.proxy.policy_sync import PolicySync, default_member
from connmgr.proxy.registry import Registry
from connmgr.proxy.relay import RelayContext
from connmgr.workers.link import WorkerLink, open_link
from connmgr.workers.sockets import open_shared_listeners
from connmgr.workers.supervisor import Supervisor, worker_share
from replay import markers
from shadow import messages
from shadow.compiled import hot_path
from shadow.policy.rules import Policy, load_policy

log = logging.getLogger("connmgr")


class App:
    """The composition root: builds every part of a connmgr from its :class:`Config`,
    hands each one what it uses, and runs them in one nursery (:meth:`serve`)."""

    def __init__(self, config: Config, worker: WorkerLink | None = None) -> None:
        self.config = config
        p = config.primary
        self.metrics = Metrics()
        #: with [server] workers > 1: this process is one worker (connmgr/workers/)
        self.worker = worker
        if worker is not None:
            self.registry = Registry(self.metrics, worker.index, worker.count, forward=worker.forward_cancel)
        else:
            self.registry = Registry(self.metrics)
        #: where new sessions log in: the primary (a failover moves it)
        self.route = Route(BackendServer(p.name, p.host, p.port, p.connect_timeout, p.tls, p.tls_ca_file))
        self.secrets = SecretStore(config, self.route.server)
        self.accepting = True
        self.listen_addresses: list[tuple[str, int]] = []
        self.metrics_address: tuple[str, int] | None = None
        #: this connmgr instance's number: names its sessions' marker rows (replay/markers.py);
        #: a worker's carries its index, so two workers started in the same microsecond differ
        self.origin = time.time_ns() // 1000
        if worker is not None:
            self.origin = self.origin << 6 | worker.index
        #: database -> (markers usable, when checked); see markers_enabled
        self._marker_dbs: dict[str, tuple[bool, float]] = {}
        # the primary role of a pair: mirror link, redo monitor, SyncRep watch (on a host
        # pair's secondary with [mirror] peer: built now, run once it has taken over)
        self.mirror: MirrorLink | None = None
        self.redo: RedoMonitor | None = None
        self.syncrep: SyncRepWatch | None = None
        if config.mirror.peer:
            host, port = parse_hostport(config.mirror.peer, what="[mirror] peer")
            self.redo = redo = RedoMonitor(interval=config.redo.interval, idle_interval=config.redo.idle_interval)
            self.route.on_move(lambda _server: redo.retarget())
            self.mirror = MirrorLink(
                host, port, node="primary" if worker is None else f"primary worker {worker.index}",
                max_buffer_bytes=config.mirror.max_buffer_bytes,
                heartbeat_interval=config.mirror.heartbeat_interval, peer_timeout=config.mirror.peer_timeout,
                lsn=lambda: redo.lsn,
                two_phase=config.mirror.mode == "two-phase", two_phase_timeout=config.mirror.two_phase_timeout,
            )  # fmt: skip
            self.mirror.eager = bool(config.host.vip)
            sender = self.mirror.sender
            redo.activity = lambda: sender.latest_version  # idle: sample slowly,
            self.mirror.on_activity = redo.wake  # until records flow again
            self.syncrep = SyncRepWatch(lambda: self._open_redo_session(None, "connmgr syncrep watch"))
        # the secondary role: mirror listener, import process, poster, DDL, sequences
        self.secondary = Secondary(config, self.route.server) if config.mirror.listen else None
        self._secondary_scope = trio.CancelScope()
        #: a host pair's secondary: re-seeds the database its takeover left behind (RESEED)
        self.rejoin = None
        if config.host.vip and self.secondary is not None:
            from connmgr.host.rejoin import Rejoin

            self.rejoin = Rejoin(config)
        #: primary role with [failover]: moves live sessions to the secondary database
        self.failover: Failover | None = None
        #: with workers: this worker's link to the failover the supervisor decides (connmgr/failover/fleet.py)
        self.member: Member | None = None
        if config.failover.secondary:
            mirror = self.mirror
            if worker is not None:
                self.member = Member(worker.channel.call, worker.notify_soon, worker.flag)
            self.failover = Failover(
                config.failover, self.route, self.registry, origin=self.origin, redo=self.redo,
                open_primary=lambda purpose: self._open_redo_session(None, purpose),
                markers_enabled=self.markers_enabled,
                on_rearm=mirror.topology if mirror is not None else None, coordinator=self.member,
            )  # fmt: skip
            if worker is not None:
                self.failover.adopt(worker.failover_state)
        #: [policy] file: who may do what (shadow/policy/, connmgr/proxy/policy.py); and the
        #: objects under maintenance (always: MAINTENANCE BEGIN on the admin console)
        policy = load_policy(config.policy.file) if config.policy.file else Policy(())
        self.policy = PolicyRuntime(policy, lambda db, purpose: self._open_redo_session(db, purpose),
                                    refresh=config.policy.catalog_refresh, timeout=p.connect_timeout + 10,
                                    maintenance_wait=config.policy.maintenance_wait)  # fmt: skip
        if config.policy.file:
            log.info("policy %s: %d client class(es)", config.policy.file, len(policy.classes))
        #: [policy] store: versions pushed to the primary database, activated at one instant
        self.policy_sync: PolicySync | None = None
        if config.policy.store == "database":
            self.policy.required = config.policy.store_required
            store_session = self._open_redo_session
            if self.secondary is not None and config.poster.host:  # (the secondary role: on the primary, as its poster)
                store_session = self.secondary.open_store_session
            self.policy_sync = PolicySync(
                self.policy, lambda db, purpose: store_session(db, purpose),
                database=config.policy.store_database or config.redo.dbname,
                member=(config.policy.member or default_member()) + (f"/{worker.index}" if worker is not None else ""),
                poll=config.policy.store_poll, timeout=p.connect_timeout + 10,
                maintenance_poll=config.policy.maintenance_poll)  # fmt: skip
            self.policy.sync = self.policy_sync
            self.policy.ready = trio.Event()  # (set by the first cycle)
        self.engine: RelayEngine | None = None
        if config.server.relay == "engine":
            self.engine = RelayEngine(self.mirror.flush_soon if self.mirror is not None else None)
        relay = RelayContext(
            self.metrics, self.origin, self.registry.virtual_pids, mirror=self.mirror, engine=self.engine,
            failover=self.failover, idle_timeout=config.server.client_idle_timeout,
            idle_in_transaction_timeout=config.server.idle_in_transaction_timeout,
            max_buffered_message=config.server.max_buffered_message,
        )  # fmt: skip
        self.admin = admin = AdminContext(
            config, self.metrics, self.registry, self.route,
            worker.request_shutdown if worker is not None else self.shutdown, self.failover, rejoin=self.rejoin,
            fleet=worker.fleet if worker is not None else None, policy=self.policy,
        )  # fmt: skip
        self.client_context = ClientContext(
            config, self.metrics, self.registry, self.route, self.secrets, relay, failover=self.failover,
            client_ssl_context=_client_ssl_context(config), accepting=lambda: self.accepting,
            markers_enabled=self.markers_enabled,
            console=lambda conn, reader: AdminConsole(admin, conn, reader).run(),
            guard_for=self.policy.guard_for if self.policy is not None else None,
        )  # fmt: skip
        #: what the metrics endpoint reports on
        self.exported = Exported(self.metrics, self.registry, lambda: self.accepting, mirror=self.mirror,
                                 redo=self.redo, syncrep=self.syncrep, secondary=self.secondary,
                                 failover=self.failover, engine=self.engine,
                                 policy_refusals=self.policy.refusals, policy_masked_rows=self.policy.masked_rows,
                                 policy_rewrites=self.policy.rewrites, policy_sync=self.policy_sync)  # fmt: skip
        self._shutdown = trio.Event()
        self._drain_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        #: with [host]: the leader lease, the VIP and (on the secondary) the host takeover
        self.host = None
        self.resumer = None
        if config.host.vip:
            self.host = self._host_role()

    def _host_role(self):
        """The host role (connmgr/host/takeover.py), built only with [host]: its modules
        need the [net] extra."""
        import socket as _socket

        from connmgr.failover.controller import point_of_failure
        from connmgr.host.etcd import Etcd
        from connmgr.host.leader import Leader
        from connmgr.host.takeover import HostRole

        h = self.config.host
        leader = Leader(Etcd(list(h.etcd), attempt_timeout=h.etcd_timeout), h.key, h.name or _socket.gethostname(),
                        ttl=h.lease_ttl, margin=h.lease_margin, renew_interval=h.renew_interval)  # fmt: skip
        secondary = self.secondary

        async def promote() -> None:
            with trio.fail_after(self.config.failover.max_wait):
                stopped = await point_of_failure(lambda db: secondary._open_ddl_session(db, "connmgr host takeover"),
                                                 self.config.poster.dbname, self.config.failover.sequence_lead,
                                                 lambda text: self.host.note(text))  # fmt: skip
            if stopped:  # (a takeover run again after a failed one finds them stopped already)
                self.rejoin.subscriptions = stopped

        def connections() -> list:
            return [c.stream.raw_socket for c in self.registry if type(c.stream) is FastSocketStream]

        return HostRole(h, leader, imports=secondary.imports if secondary is not None else None, promote=promote,
                        lead=self._lead, serve=self._serve_listener,
                        resume=lambda r: self.resumer(r), connections=connections,
                        followed=lambda: secondary is not None and secondary.followed)  # fmt: skip

    async def _lead(self) -> None:
        """A host pair's secondary took over: its secondary role ends (the primary it
        followed is gone) and, with ``[mirror] peer``, its primary role starts -- the redo
        monitor on this host's database, then the mirror link, which connects once the
        host left behind is back as the secondary (connmgr/host/rejoin.py). Sessions
        opened from now on are mirrored; the moved ones are not."""
        self._secondary_scope.cancel()
        if self.mirror is None or self.mirror.running:
            return
        self._nursery.start_soon(self.redo.run, self._open_redo_session)
        with trio.move_on_after(self.config.primary.connect_timeout):  # mirrored records carry its WAL position
            while not self.redo.lsn:
                await trio.sleep(0.005)
        await self._nursery.start(self.syncrep.run)
        # two-phase only once a secondary acknowledges: until then every commit would wait
        # two_phase_timeout for nobody (MirrorLink.check_two_phase restores it)
        self.mirror.two_phase = False
        await self._nursery.start(self.mirror.run)
        self.host.note(f"primary role: mirroring to {self.mirror.host}:{self.mirror.port} (the secondary connects"
                       " there once re-seeded)")  # fmt: skip

    async def _committed_seqs(self, database: str, origin: int) -> dict[int, int]:
        """Host takeover: {session: the last transaction of it that committed on this host's
        database (its marker row)} for every session of host A's connmgr ``origin``."""
        session = await self.secondary._open_ddl_session(database, "connmgr host takeover markers")
        try:
            rows = await session.query_rows(messages.query(
                f"SELECT session, seq FROM connmgr.markers WHERE origin = {int(origin)}"))
        finally:
            session.close()
        return {int(sid): int(seq) for sid, seq in rows}

    def _serve_listener(self, sock) -> None:
        """Accept clients on ``sock`` (the VIP's listener the host role opened)."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self.listen_addresses.append(sock.getsockname()[:2])
        self.accepting = True
        self._nursery.start_soon(self._accept_loop, listener, self._nursery)

    # ------------------------------------------------------------------ views (tests, tools)

    @property
    def server(self) -> BackendServer:
        """The primary new sessions go to now."""
        return self.route.server

    @property
    def clients(self) -> dict[int, ClientConnection]:
        return self.registry.clients

    @property
    def keys(self) -> dict[tuple[int, int], ClientConnection]:
        return self.registry.keys

    @property
    def active_clients(self) -> int:
        return len(self.registry)

    @property
    def imports(self) -> ImportProcess | None:
        return self.secondary.imports if self.secondary is not None else None

    @property
    def mirror_consumers(self) -> list:
        return self.secondary.consumers if self.secondary is not None else []

    @property
    def mirror_listen_address(self) -> tuple[str, int] | None:
        return self.secondary.listen_address if self.secondary is not None else None

    # ------------------------------------------------------------------ serving

    async def handle(self, stream: FastSocketStream) -> None:
        conn = ClientConnection(self.client_context, stream, stream.peer())
        self.registry.add(conn)
        self.metrics.clients_accepted += 1
        try:
            await conn.run()
        except Exception:  # noqa: BLE001 - run() reports its own errors; a bug left in it costs this client only
            log.exception("client %d: internal error after its connection ended; the others go on", conn.id)
            self.registry.forget(conn)

    async def markers_enabled(self, database: str) -> bool:
        """Whether sessions on ``database`` get purge markers and DDL capture: mirroring
        is on, ``[mirror] markers`` too, and the database has ``connmgr.mark`` (checked
        once per database with the [redo] credentials; a negative answer is checked again
        after a minute). Without it, a marker would fail inside the client's transaction,
        so it is never injected; the gap is logged and counted."""
        if self.mirror is None or not self.mirror.running or not self.config.mirror.markers:
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

    async def _open_redo_session(self, database: str | None = None, purpose: str = "connmgr redo monitor"):
        """On the primary (where new sessions go now) with the [redo] credentials."""
        r = self.config.redo
        return await open_own_session(self.route.server, r.user, r.password, database or r.dbname, purpose)

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._shutdown.set()

    def _raise_fd_limit(self) -> None:
        """Each client costs two descriptors (client and backend socket): raise the soft
        limit to the hard one and say so if max_clients still cannot fit."""
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        except (ValueError, OSError):
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
            if self.worker is not None:  # the supervisor reserved it: shared with the other workers
                listeners.extend(open_shared_listeners(host, port))
            else:
                listeners.extend(await trio.open_tcp_listeners(port, host=host, backlog=4096))
        self.listen_addresses = [ln.socket.getsockname()[:2] for ln in listeners]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.engine is not None:
                await nursery.start(self.engine.run)
            if self.mirror is not None and self.rejoin is None:  # (a host pair's secondary: see _lead)
                await nursery.start(self.redo.run, self._open_redo_session)
                await nursery.start(self.syncrep.run)
                await nursery.start(self.mirror.run)
            if self.failover is not None:
                await nursery.start(self.failover.run)
            if self.policy is not None:
                await nursery.start(self.policy.run)
            if self.policy_sync is not None:  # (logins wait for its first cycle: runtime.ready)
                nursery.start_soon(self.policy_sync.run)
            if self.secondary is not None:
                await nursery.start(self._run_secondary)
            if self.host is not None:
                from connmgr.host.resume import SessionResumer

                self.resumer = SessionResumer(self.client_context, self.route.server, nursery, self._committed_seqs)
                await nursery.start(self.host.run)
            for ln in listeners:
                nursery.start_soon(self._accept_loop, ln, nursery)
            if cfg.metrics.listen:
                host, port = parse_hostport(cfg.metrics.listen, allow_zero=True)
                self.metrics_address = await nursery.start(serve_metrics, self._render_metrics, host, port)
            if handle_signals:
                nursery.start_soon(self._signals)
            for host, port in self.listen_addresses:
                log.info("listening on %s:%d, backend %s (hot path: %s)", host, port, self.server.address, hot_path())
            if self.worker is not None:
                inline = self.member.inline_handlers() if self.member is not None else {}
                await nursery.start(self.worker.run, self._control_handlers(), self.shutdown, inline)
                await self.worker.ready(self.listen_addresses)
            task_status.started(self.listen_addresses)
            await self._shutdown.wait()
            self.accepting = False
            for ln in listeners:
                await ln.aclose()
            await self._drain()
            nursery.cancel_scope.cancel()

    def _control_handlers(self) -> dict:
        """What a worker answers its supervisor (connmgr/workers/link.py)."""

        async def cancel(frame: dict) -> None:
            await self.registry.cancel(int(frame["pid"]), int(frame["secret"]))

        async def show(frame: dict) -> dict:
            columns, rows = local_show(self.admin, frame["what"])
            return {"columns": columns, "rows": rows}

        async def metrics(_frame: dict) -> dict:
            return {"text": render(self.exported)}

        async def shutdown(frame: dict) -> None:
            if frame.get("fast"):
                self.fast_shutdown()
            self.shutdown()

        handlers = {"cancel": cancel, "show": show, "metrics": metrics, "shutdown": shutdown}
        if self.member is not None:
            handlers.update(self.member.handlers())
        return handlers

    async def _render_metrics(self) -> str:
        return render(self.exported)

    async def _run_secondary(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._secondary_scope:
            await self.secondary.run(task_status=task_status)

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
    return dataclasses.replace(config, server=dataclasses.replace(config.server, shutdown_timeout=0.0))


def _client_ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.mode == "disable":
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return ctx


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run a connection manager with ``config`` until SIGTERM/SIGINT: this process serves
    the clients, or with ``[server] workers`` > 1 supervises that many worker processes."""
    if config.server.workers > 1:
        await Supervisor(config).serve(task_status=task_status)
        return
    app = App(config)
    await app.serve(task_status=task_status)


async def serve_worker(fd: int) -> None:
    """``connmgr _worker FD``: one worker of a supervisor, its control channel on ``fd``
    (connmgr/workers/)."""
    link, spec = await open_link(fd)
    logging.basicConfig(level=spec.get("log_level", logging.INFO), force=True, stream=sys.stderr,
                        format=f"%(asctime)s %(name)s[worker {link.index}] %(levelname)s %(message)s")  # fmt: skip
    config = worker_share(config_mod.load(None, **spec["config"]))
    log.info("worker %d of %d: up to %d clients (its share of max_clients)", link.index, link.count,
             config.server.max_clients)  # fmt: skip
    app = App(config, worker=link)
    await app.serve()
