# cython: annotation_typing=False
"""The secondary connmgr's import process (seed 004 Fig. 2): mirrored records in, import
queue maintained, commits from the poster queue purged.

:class:`ImportProcess` is the consumer of the mirror listener: each delivered record is
turned into calls on the :class:`~replay.import_queue.ImportQueue` -- a Data record's
payload (whole protocol messages) is cut into one
:class:`~replay.import_queue.MirroredMessage` per message, each with its own byte offset
and the record's LSN tag. :meth:`ImportProcess.follow_poster` reads the connmgr-owned
logical slot on the primary (:mod:`connmgr.pg.replication`) and purges every committed transaction
whose marker it carries, confirming each record once applied.

A :class:`~replay.mirror_protocol.Resync` (the primary dropped history) closes every
session's queue: their pasts are unknown, so none of them is replayable until it is seen
whole again (a later issue re-admits sessions at their next idle point).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from connmgr.config import STREAMED_FROM_CLIENT, STREAMED_FROM_SERVER
from connmgr.errors import ClientError
from connmgr.pair.ddl_apply import DdlApplier
from connmgr.pg.reconnect import Outage
from connmgr.pg.replication import ReplicationError
from replay.import_queue import ImportQueue, MirroredMessage, SessionNotReplayable, sql_text
from replay.markers import DDL_PREFIX, GUARD_PREFIX, parse_ddl_message, parse_guard_message
from replay.mirror_protocol import (
    Data,
    Marker,
    Resync,
    SessionClosed,
    SessionOpened,
    Topology,
    Unmarked,
)
from replay.pgoutput import unix_from_pg_timestamp
from replay.session_recorder import SessionRecorder
from replay.session_replica import SessionReplica
from shadow.errors import RemoteProtocolError
from shadow.framing import STREAM_HEAD, Framer

log = logging.getLogger("connmgr.import")

_Q, _P, _D = ord("Q"), ord("P"), ord("D")


class ImportProcess:
    def __init__(self, queue: ImportQueue | None = None, *, ddl: DdlApplier | None = None,
                 database: str = "postgres", max_buffered_message: int = 0,
                 replicas: bool = False, max_replay_bytes: int = 8 << 20) -> None:  # fmt: skip
        self.queue = queue or ImportQueue()
        #: with host takeover: per session, host B's copy of what host A's relay knew
        #: (replay/session_replica.py); None when not kept
        self.replicas: dict[int, SessionReplica] | None = {} if replicas else None
        self.max_replay_bytes = max_replay_bytes
        #: longer messages are not kept ([server] max_buffered_message; 0: all are)
        self.max_buffered_message = max_buffered_message
        #: (session, direction) -> the framer of that stream (a message may span records);
        #: None once its framing is lost (after a Resync a record may start mid-message)
        self._framers: dict[tuple[int, str], Framer | None] = {}
        #: after a Resync: sessions opened since (the others' streams may go on mid-message)
        self._framing_lost = False
        self._opened_since: set[int] = set()
        #: per session: what it carries beyond its open transaction (settings, SQL
        #: prepared statements, LISTEN, advisory locks) and whether it can move at all;
        #: followed here, off the client's path, from the mirrored SQL and the verdicts
        self.session_state: dict[int, SessionRecorder] = {}
        self.queue.on_transaction_end = self._transaction_ended
        #: replays captured DDL (connmgr/pair/ddl_apply.py) on the secondary, if configured
        self.ddl = ddl
        #: the database the poster slot decodes (where its DDL is replayed)
        self.database = database
        self.bad_ddl_messages = 0
        #: mirrored sessions of a database this connmgr does not follow ([poster] dbname)
        self.foreign_sessions = 0
        self._foreign_databases: set[str] = set()
        self.import_errors = 0
        self.records = 0
        self.purged = 0
        self.not_replayable: set[int] = set()
        #: with replicas: called with (client address, direction, end offset) as the mirror
        #: carries a session's bytes (the host takeover's frame tracker then forgets them)
        self.on_mirrored: Callable[[tuple[str, int], str, int], None] | None = None
        #: called with a Topology record (the pair turned around; set by the App)
        self.on_topology: Callable[[Topology], None] | None = None
        self._poster_outage = Outage(log, "poster queue", retrying="reopening every 1 s")
        self.on_purge: list[Callable[[list], None]] = []
        self.poster_connected = False
        self.poster_errors = 0
        #: replication lag as the poster reader sees it: the end of the last record it
        #: processed, the server's WAL end, and how long after its commit that record
        #: was processed (seconds; a commit's way through WAL, decoding and the network)
        self.poster_lsn = 0
        self.poster_wal_end = 0
        self.poster_delay = 0.0

    # ------------------------------------------------------------------ mirror side

    def on_records(self, records: list) -> None:
        """Mirror consumer: apply delivered records in order."""
        q = self.queue
        for r in records:
            self.records += 1
            try:
                if isinstance(r, Data):
                    if r.direction == "h":
                        self._held(r)
                    else:
                        self._data(r)
                elif isinstance(r, Marker):
                    q.on_marker_sent(r.session_id, r.seq)
                    if self.replicas is not None and r.session_id in self.replicas:
                        self.replicas[r.session_id].marker(r.seq)
                elif isinstance(r, Unmarked):
                    if self.replicas is not None and r.session_id in self.replicas:
                        self.replicas[r.session_id].unmarked_requests(r.count)
                elif isinstance(r, SessionOpened):
                    self._forget_framers(r.session_id, opened=True)
                    q.on_session_opened(r.session_id)
                    rec = self.session_state[r.session_id] = SessionRecorder()
                    params = dict(r.params)
                    self._check_database(params.get("database"))
                    if self.replicas is not None:
                        self.replicas[r.session_id] = SessionReplica(r.session_id, params, rec,
                                                                     max_replay_bytes=self.max_replay_bytes)  # fmt: skip
                elif isinstance(r, SessionClosed):
                    self._forget_framers(r.session_id)
                    q.on_session_closed(r.session_id)
                    self.session_state.pop(r.session_id, None)
                    if self.replicas is not None:
                        self.replicas.pop(r.session_id, None)
                elif isinstance(r, Resync):
                    self._resync()
                elif isinstance(r, Topology) and self.on_topology is not None:
                    self.on_topology(r)
            except SessionNotReplayable as e:
                self.not_replayable.add(e.session_id)
                log.warning("session %d is not replayable: %s", e.session_id, e)
            except Exception:  # a bug here must cost one session, not the mirror listener
                sid = getattr(r, "session_id", None)
                log.exception("import of mirror record %r failed", type(r).__name__)
                if sid is not None:
                    self.not_replayable.add(sid)
                    self.queue.on_session_closed(sid)
                    self.session_state.pop(sid, None)
                    replica = self.replicas.get(sid) if self.replicas is not None else None
                    if replica is not None:
                        replica.lose("its mirror could not be imported (logged)")
                self.import_errors += 1

    def _framer(self, r: Data) -> Framer | None:
        key = (r.session_id, r.direction)
        framer = self._framers.get(key, False)
        if framer is False and self._framing_lost and r.session_id not in self._opened_since:
            framer = self._framers[key] = None
        if framer is False:
            framer = self._framers[key] = Framer()
            if self.max_buffered_message:
                framer.stream(self.max_buffered_message, STREAMED_FROM_CLIENT if r.direction == "c"
                              else STREAMED_FROM_SERVER)  # fmt: skip
        return framer

    def _forget_framers(self, sid: int, opened: bool = False) -> None:
        if self._framing_lost:
            if opened:
                self._opened_since.add(sid)
            else:
                self._opened_since.discard(sid)
        self._framers.pop((sid, "c"), None)
        self._framers.pop((sid, "b"), None)

    def _held(self, r: Data) -> None:
        replica = self.replicas.get(r.session_id) if self.replicas is not None else None
        if replica is not None:
            replica.held(r.payload)

    def pending_client_bytes(self, session_id: int) -> bytes:
        """The start of a client message not complete yet (taken: the relay that goes on
        with the session frames it from here)."""
        framer = self._framers.get((session_id, "c"))
        return framer.take_pending() if framer else b""

    def recovered(self, session_id: int, direction: str, offset: int, payload: bytes) -> None:
        """Bytes of a session's stream that host A's kernel acknowledged or sent but the
        mirror never carried (recovered from the copied frames at a host takeover): taken
        as if mirrored, so the queue and the replica see the whole stream."""
        self.on_records([Data(0, session_id, direction, 0, offset, payload)])

    def _data(self, r: Data) -> None:
        replica = self.replicas.get(r.session_id) if self.replicas is not None else None
        if replica is not None:
            if r.direction == "c":
                replica.client_raw(r.offset, len(r.payload))
                replica.client_version = max(replica.client_version, r.version)
            else:
                replica.server_raw(r.offset, r.payload)
            if self.on_mirrored is not None and replica.peer is not None and not replica.tls:
                self.on_mirrored(replica.peer, r.direction, r.offset + len(r.payload))
        framer = self._framer(r)
        if framer is None:
            if replica is not None:
                replica.lose("its framing was lost with the mirror's history (Resync)")
            return  # its framing was lost: nothing of it is kept until it closes
        offset = r.offset - framer.pending_bytes  # where the bytes held from earlier records began
        try:
            buf, frames = framer.feed(r.payload)
        except RemoteProtocolError as e:
            self._framers[(r.session_id, r.direction)] = None
            self.queue.on_message_too_large(r.session_id, f"its mirrored stream cannot be framed: {e.message}")
            if replica is not None:
                replica.lose(f"its mirrored stream cannot be framed: {e.message}")
            return
        if replica is not None and frames:
            if r.direction == "c":
                replica.client_batch(offset, buf, frames)
            else:
                replica.server_batch(offset, buf, frames)
        q = self.queue
        sid, version, direction, lsn = r.session_id, r.version, r.direction, r.lsn
        client = direction == "c"
        if not client:
            frames = _rows_as_one(frames)
        for tag, start, end in frames:
            if tag > 0xFF:  # a part of a streamed message: not kept, and the session with it
                if tag & STREAM_HEAD:
                    offset += 5
                    rec = self.session_state.get(sid) if client else None
                    if rec is not None:
                        rec.on_streamed(tag & 0xFF, bytes(buf[start:end]))
                    q.on_message_too_large(sid, f"a {chr(tag & 0xFF)!r} message over [server]"
                                                f" max_buffered_message ({self.max_buffered_message} bytes)")
                    if replica is not None:
                        replica.lose("a message over [server] max_buffered_message was relayed without being kept")
                offset += end - start
                continue
            raw = buf[start - 5:end]
            msg = MirroredMessage(sid, version, direction, lsn, offset, tag, raw)
            offset += len(raw)
            if client:
                q.on_client_message(msg)
                if tag == _Q or tag == _P:
                    self._sql(sid, tag, raw)
            else:
                txs = q.on_backend_message(msg)
                if txs:
                    self._purged(txs)

    def _sql(self, sid: int, tag: int, raw: bytes) -> None:
        rec = self.session_state.get(sid)
        if rec is None:
            return
        sql = sql_text(tag, raw)
        if sql:
            rec.on_sql(bytes(sql))

    def _transaction_ended(self, sid: int, committed: bool) -> None:
        rec = self.session_state.get(sid)
        if rec is not None:
            rec.end_transaction(committed)

    @property
    def sessions_not_movable(self) -> int:
        return sum(1 for rec in self.session_state.values() if not rec.movable)

    def _resync(self) -> None:
        # the sessions open now may go on mid-message: their framing is lost until they close
        self._framers.clear()
        self._framing_lost = True
        self._opened_since.clear()
        self.session_state.clear()  # their SQL is not followed any more either
        for replica in (self.replicas or {}).values():
            replica.lose("the mirror's history was lost (Resync)")
        for sid in list(self.queue.depths()):
            self.not_replayable.add(sid)
            self.queue.on_session_closed(sid)

    # ------------------------------------------------------------------ poster side

    @property
    def replication_lag_bytes(self) -> int:
        """WAL the server has sent beyond the last record processed (0 when caught up)."""
        return max(0, self.poster_wal_end - self.poster_lsn) if self.poster_lsn else 0

    def on_poster_record(self, rec) -> None:
        self._purged(self.queue.on_poster_record(rec))

    def _purged(self, txs: list) -> None:
        if txs:
            self.purged += len(txs)
            for cb in self.on_purge:
                cb(txs)

    def _check_database(self, database: str | None) -> None:
        """A mirrored session of another database than the poster's: its commits are
        never purged here (the poster slot decodes one database) and its DDL is not
        replayed. Counted, and logged once per database with the fix."""
        if not database or database == self.database:
            return
        self.foreign_sessions += 1
        if database not in self._foreign_databases:
            self._foreign_databases.add(database)
            log.error("sessions of database %r are mirrored to this connmgr, but its poster slot follows"
                      " database %r ([poster] dbname): their transactions are never purged, their DDL is"
                      " not replayed and their new tables are never fenced (a CREATE TABLE waits for"
                      " ever); set [poster] dbname = %r, one secondary connmgr per database",
                      database, self.database, database)  # fmt: skip

    async def _replay_ddl(self, rec) -> None:
        """Replay the DDL a committed transaction carried, in order, before the record is
        confirmed (a lost connection raises: the record comes again)."""
        stmts = []
        guard = None
        for prefix, content in rec.messages:
            if prefix == GUARD_PREFIX:
                try:
                    guard = parse_guard_message(content)
                except ValueError as e:
                    self.bad_ddl_messages += 1
                    log.error("transaction %d carries a malformed guard message (its apply worker waits"
                              " in the guard until it gives up): %s", rec.xid, e)  # fmt: skip
                continue
            if prefix != DDL_PREFIX:
                continue
            try:
                stmts.append(parse_ddl_message(content))
            except ValueError as e:
                self.bad_ddl_messages += 1
                log.error("transaction %d carries a malformed DDL message: %s", rec.xid, e)
        await self.ddl.apply_transaction(self.database, stmts, guard)

    def restart_poster(self) -> None:
        """Drop the poster stream now and open it again at once (``open_stream`` names
        another server after the pair turned around)."""
        self._poster_outage.restart()

    async def follow_poster(self, open_stream, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Purge from the poster queue until cancelled. ``open_stream()`` returns an
        opened :class:`~connmgr.pg.replication.ReplicationStream`. A lost stream is reopened (1 s
        back-off); meanwhile committed transactions wait in the queue, nothing is lost
        (the slot keeps the WAL until confirmed). The first failure of an outage is a
        WARNING, the recovery INFO; the failures between are counted (poster_errors).
        Started at once."""
        task_status.started()
        outage = self._poster_outage
        while True:
            restarted = False
            try:
                with outage.attempt() as scope:
                    stream = await open_stream()
                    outage.success()
                    self.poster_connected = True
                    try:
                        async for rec in stream:
                            if hasattr(rec, "xid"):
                                self.poster_delay = max(0.0, time.time() - unix_from_pg_timestamp(rec.commit_time_us))
                                if self.ddl is not None and rec.messages:
                                    await self._replay_ddl(rec)
                                self.on_poster_record(rec)
                            stream.confirm(rec.confirm_lsn)
                            self.poster_lsn = rec.confirm_lsn
                            self.poster_wal_end = stream.latest_wal_end
                    finally:
                        self.poster_connected = False
                        with trio.CancelScope(shield=True):
                            await stream.aclose()
                restarted = scope.cancelled_caught
            except (ReplicationError, OSError, ClientError, trio.BrokenResourceError) as e:  # PeerClosed is a ClientError
                self.poster_errors += 1
                outage.failure(e)
            if restarted:
                continue
            await outage.back_off()  # restart_poster() ends it too


def _rows_as_one(frames: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Each run of adjacent DataRows as one frame: the queue only holds and counts them (a
    result's rows decide nothing), and one at a time they cost it a message object and its
    accounting each -- most of a host takeover's rebuild, which feeds the megabytes of a
    large result the mirror had not carried yet (profiled: 411 of 419 samples)."""
    out: list[tuple[int, int, int]] = []
    for frame in frames:
        if frame[0] == _D and out:
            last = out[-1]
            if last[0] == _D and last[2] + 5 == frame[1]:
                out[-1] = (_D, last[1], frame[2])
                continue
        out.append(frame)
    return out
