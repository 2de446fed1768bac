"""The secondary connmgr's part of the pair: it receives the primary's mirror stream,
imports it (:mod:`connmgr.pair.import_process`), reads the poster queue from the primary
database to purge what committed there, replays captured DDL (:mod:`connmgr.pair.ddl_apply`)
and keeps its own database's sequences ahead (:mod:`connmgr.pair.sequence_sync`).

Where things are read and written turns around after a failover: a mirrored Topology
record (:meth:`Secondary.retarget`) sends the poster queue to the new primary, DDL and
sequences to the new secondary, and drops a permanent poster slot left on the old primary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio

from connmgr.config import Config, parse_hostport
from connmgr.errors import ClientError
from connmgr.pair.ddl_apply import DdlApplier
from connmgr.pair.import_process import ImportProcess
from connmgr.pair.mirror import serve_mirror
from connmgr.pair.sequence_sync import SequenceSync
from connmgr.pg.backend import BackendServer, BackendSession, Credentials, open_own_session
from connmgr.pg.replication import open_replication_stream
from connmgr.pg.wire import PeerClosed
from replay.mirror_protocol import MirrorReceiver, Topology
from shadow import messages
from shadow.sqltext import quote_literal

log = logging.getLogger("connmgr")

__all__ = ["Secondary"]


class Secondary:
    """See the module docstring. ``server`` is this connmgr's own database (the
    secondary of the pair)."""

    def __init__(self, config: Config, server: BackendServer) -> None:
        self.config = config
        p = config.poster
        #: every mirrored record is handed to these callbacks, in order
        self.consumers: list[Callable[[list], None]] = []
        ddl = DdlApplier(self._open_ddl_session) if p.host and p.replay_ddl else None
        # with host takeover, host B keeps its own copy of every session (session_replica.py)
        self.imports = ImportProcess(ddl=ddl, database=p.dbname,
                                     max_buffered_message=config.server.max_buffered_message,
                                     replicas=bool(config.host.vip),
                                     max_replay_bytes=config.failover.max_replay_bytes)  # fmt: skip
        self.consumers.append(self.imports.on_records)
        self.imports.on_topology = self.retarget
        #: where the poster queue is read (the primary database) and where DDL and
        #: sequences are applied (this connmgr's database); retarget() turns them around
        self.poster_address = (p.host, p.port)
        self.replica_server = server
        self.topology_changes = 0
        #: keeps this database's sequences ahead of the primary's
        self.sequences: SequenceSync | None = None
        if p.host and p.sequence_interval > 0:
            self.sequences = SequenceSync(self._open_poster_sql_session, self._open_local_admin_session,
                                          interval=p.sequence_interval, lead=p.sequence_lead)  # fmt: skip
        #: the mirror's receiving ends, one per primary (a connmgr, or each of its workers),
        #: by the name in its Hello
        self.receivers: dict[str, MirrorReceiver] = {}
        #: where the mirror listener is bound, once running
        self.listen_address: tuple[str, int] | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen for the mirror, follow the poster queue, sync sequences, until
        cancelled. ``task_status.started`` gets the mirror listener's (host, port)."""
        host, port = parse_hostport(self.config.mirror.listen, allow_zero=True)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.listen_address = await nursery.start(partial(serve_mirror, receivers=self.receivers), host, port,
                                                      self._mirrored)  # fmt: skip
            if self.config.poster.host:
                await nursery.start(self.imports.follow_poster, self._open_poster_stream)
                if self.sequences is not None:
                    await nursery.start(self.sequences.run)
            task_status.started(self.listen_address)

    @property
    def followed(self) -> bool:
        """A primary has said Hello."""
        return any(r.epoch is not None for r in self.receivers.values())

    def _mirrored(self, records: list) -> None:
        for consumer in self.consumers:
            consumer(records)

    # ------------------------------------------------------------------ sessions

    def _poster_server(self, what: str) -> BackendServer:
        host, port = self.poster_address
        return BackendServer(f"primary ({what})", host, port, self.config.primary.connect_timeout)

    async def _open_ddl_session(self, database: str, purpose: str = "connmgr ddl replay") -> BackendSession:
        """On this connmgr's database as [poster] ddl_user (default: the poster user)."""
        p = self.config.poster
        password = p.ddl_password if p.ddl_user else p.password
        return await open_own_session(self.replica_server, p.ddl_user or p.user, password, database, purpose)

    async def _open_local_admin_session(self) -> BackendSession:
        return await self._open_ddl_session(self.config.poster.dbname, "connmgr sequence sync")

    async def open_store_session(self, database: str, purpose: str) -> BackendSession:
        """On the primary database with the [poster] credentials: the policy store is read
        where the primary connmgr reads it (connmgr/proxy/policy_sync.py)."""
        p = self.config.poster
        return await open_own_session(self._poster_server("policy store"), p.user, p.password, database, purpose)

    async def _open_poster_sql_session(self) -> BackendSession:
        """A plain SQL session on the primary database with the [poster] credentials."""
        p = self.config.poster
        return await open_own_session(self._poster_server("sequences"), p.user, p.password, p.dbname,
                                      "connmgr sequence sync")  # fmt: skip

    async def _open_poster_stream(self):
        p = self.config.poster
        return await open_replication_stream(
            self._poster_server("poster"), Credentials(password=p.password or None), user=p.user, database=p.dbname,
            slot=p.slot, publication=p.publication, temporary=p.temporary,
            eager_status=False,  # the poster slot is not a synchronous standby
        )

    # ------------------------------------------------------------------ turning around

    def retarget(self, topology: Topology) -> None:
        """The pair turned around (a mirrored Topology record). The poster queue is read
        from the new primary, DDL and sequences go to the new secondary. A permanent
        poster slot left on the old primary is dropped (it would keep WAL there for ever).
        The same topology again changes nothing."""
        old = self.poster_address
        host, port = parse_hostport(topology.primary, what="topology primary")
        s_host, s_port = parse_hostport(topology.secondary, what="topology secondary")
        if (host, port) == old and (s_host, s_port) == (self.replica_server.host, self.replica_server.port):
            return  # told already (with [server] workers, each worker's mirror says it)
        self.poster_address = (host, port)
        self.replica_server = BackendServer("secondary", s_host, s_port, self.config.primary.connect_timeout)
        self.topology_changes += 1
        log.warning("the pair turned around: the poster queue is read from %s:%d, sequences and DDL go to"
                    " %s:%d", host, port, s_host, s_port)  # fmt: skip
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
                    session = await open_own_session(server, p.user, p.password, p.dbname, "connmgr poster cleanup")
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
