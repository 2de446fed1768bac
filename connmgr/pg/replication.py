"""The replication stream reader: a logical replication connection decoded into poster records.

    async with await open_replication_stream(
        server, credentials, user="postgres", database="app",
        slot="connmgr_poster", publication="connmgr_all",
    ) as stream:
        async for item in stream:           # PosterRecord | NonTransactionalMessage
            poster_queue.put(item)
            stream.confirm(item.confirm_lsn)

How it works
------------
:func:`open_replication_stream` opens a session with ``replication=database`` (a walsender
that also takes simple SQL queries), makes sure the logical slot exists (``SELECT`` from
``pg_replication_slots``, then ``CREATE_REPLICATION_SLOT ... LOGICAL pgoutput``) and sends
``START_REPLICATION SLOT ... LOGICAL`` with the pgoutput options (publication, ``messages
'true'`` so ``pg_logical_emit_message`` markers come through). The server answers
CopyBothResponse; from then on it sends CopyData (XLogData, keepalives) and we send
standby status updates. The codec and the grouping into transactions are sans-IO, in
:mod:`replay.pgoutput`; this module only moves bytes and keeps time.

What is reported as flushed (the slot's ``confirmed_flush_lsn``) is only what the caller
has :meth:`~ReplicationStream.confirm`-ed: a position the slot has confirmed is never sent
again, so confirming a record before it is safely stored would lose it. One exception,
which is what keeps an idle slot from holding WAL forever: when a keepalive arrives while
nothing is in flight (no transaction half-received, every record handed out confirmed),
its position is confirmed too -- everything before it has been received and processed.
(A transaction still open on the primary commits after that position, so it will be sent
whenever it commits, also after a reconnect.)

Status updates go out when the walsender asks for one (at once), when the confirmed
position has moved and the caller is waiting for the next record (``eager_status``, the
default: so a synchronous primary, waiting for our flush report before it acknowledges a
commit, is not kept waiting; connmgr's poster slot is never a synchronous standby and
turns it off, saving a send per record), and every ``status_interval`` seconds. The stream does its work inside
``__anext__``: keep iterating, and keep the work per record short (hand it to a queue), or
the walsender's ``wal_sender_timeout`` (60 s by default) ends the connection. Cancelling a
wait for the next record (``move_on_after``) is safe over plain TCP: only the wait for data
is cancellable, never a read that has taken bytes. Over TLS a read cancelled midway ends
the stream (the next call raises).

Errors: :class:`ReplicationError`, naming the slot and carrying a SQLSTATE -- the server's
own for its ErrorResponse (e.g. 55006 slot in use, 42704 no such publication), 08006 for a
lost connection, 08P01 for protocol garbage. A stream that raised is finished: open a new
one, which resumes from the slot's confirmed position.

The publication must exist on the primary before the stream starts decoding; create it
with :func:`create_publication_sql` over any ordinary connection (e.g. psycopg).
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Mapping

import trio

from connmgr.errors import ClientError
from connmgr.pg.backend import BackendServer, BackendSession, Credentials, open_backend
from replay.lsn import format_lsn
from replay.pgoutput import (
    NonTransactionalMessage,
    PosterRecord,
    PrimaryKeepalive,
    TransactionAssembler,
    XLogData,
    decode_replication,
    pg_timestamp_from_unix,
    standby_status_update,
)
from shadow import messages as m
from shadow.errors import ProtocolError
from shadow.framing import DEFAULT_MAX_MESSAGE_SIZE, Framer
from shadow.messages import BackendTag
from shadow.sqltext import quote_ident

__all__ = [
    "ReplicationError",
    "ReplicationStream",
    "create_publication_sql",
    "drop_publication_sql",
    "drop_slot_sql",
    "open_replication_stream",
    "quote_ident",
]

log = logging.getLogger("connmgr.replication")

# ReplicationSlotValidateName: lower-case letters, digits and underscores, at most 63
_SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")


class ReplicationError(Exception):
    """The replication stream failed; the message names the slot. ``sqlstate`` is the
    server's for its own errors, 08006 for a lost connection, 08P01 for garbage."""

    sqlstate = "XX000"

    def __init__(self, message: str, *, sqlstate: str | None = None, slot: str = "") -> None:
        super().__init__(message)
        if sqlstate is not None:
            self.sqlstate = sqlstate
        self.slot = slot

    @property
    def message(self) -> str:
        return str(self.args[0])


# -------------------------------------------------------------------------- SQL helpers


def _quote_literal(text: str) -> str:
    """A string literal as the replication command grammar reads it (plain quotes only:
    it has no E'' strings, unlike :func:`shadow.sqltext.quote_literal`)."""
    if "\0" in text:
        raise ValueError("a string literal cannot hold NUL")
    return "'" + text.replace("'", "''") + "'"


def create_publication_sql(name: str) -> str:
    """Return ``CREATE PUBLICATION "name" FOR ALL TABLES`` -- what the stream needs on the
    primary, run once by a superuser over an ordinary connection."""
    return f"CREATE PUBLICATION {quote_ident(name)} FOR ALL TABLES"


def drop_publication_sql(name: str) -> str:
    """Return ``DROP PUBLICATION IF EXISTS "name"``."""
    return f"DROP PUBLICATION IF EXISTS {quote_ident(name)}"


def drop_slot_sql(slot: str) -> str:
    """Return the SQL that drops replication slot ``slot`` if it exists and is not in use
    (an abandoned slot makes the primary keep WAL forever)."""
    _check_slot(slot)
    return (
        "SELECT pg_catalog.pg_drop_replication_slot(slot_name)"
        f" FROM pg_catalog.pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"
    )


def _check_slot(slot: str) -> None:
    if not isinstance(slot, str) or not _SLOT_RE.fullmatch(slot):
        raise ValueError(
            f"invalid replication slot name {slot!r}: use 1-63 lower-case letters, digits"
            " and underscores"
        )


# ------------------------------------------------------------------------- the wire


class _Wire:
    """Whole backend messages, one at a time, from a session's stream."""

    __slots__ = ("stream", "framer", "_ready")

    def __init__(self, session: BackendSession) -> None:
        self.stream = session.stream
        self.framer = session.framer
        self._ready: deque[tuple[int, bytes]] = deque()
        if session.leftover:  # complete messages read behind the handshake's ReadyForQuery
            buf, frames = Framer(max_message_size=self.framer.max_message_size).feed(session.leftover)
            self._take(buf, frames)

    def _take(self, buf: bytes, frames: list[tuple[int, int, int]]) -> None:
        for tag, start, end in frames:
            self._ready.append((tag, bytes(buf[start:end])))

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    def pop(self) -> tuple[int, bytes]:
        return self._ready.popleft()

    def absorb(self, data: bytes) -> None:
        """Frame ``data``; ``b""`` is EOF (raises ReplicationError)."""
        if not data:
            self.framer.feed_eof()
            raise _Closed
        self._take(*self.framer.feed(data))

    async def read(self) -> tuple[int, bytes]:
        while not self._ready:
            self.absorb(await self.stream.receive_some())
        return self._ready.popleft()


class _Closed(Exception):
    """Internal: EOF from the server (turned into ReplicationError by the caller)."""


# ---------------------------------------------------------------------- opening


async def open_replication_stream(
    server: BackendServer,
    credentials: Credentials,
    *,
    user: str,
    database: str,
    slot: str,
    publication: str,
    create_slot: bool = True,
    temporary: bool = False,
    start_lsn: int = 0,
    status_interval: float = 1.0,
    eager_status: bool = True,
    streaming: bool = False,
    assembler: TransactionAssembler | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    extra_params: Mapping[str, str] | None = None,
) -> ReplicationStream:
    """Open a logical replication stream of ``database`` through ``slot`` and return it,
    positioned at ``start_lsn`` (0: where the slot's confirmed position is).

    Creates the slot (pgoutput; ``temporary``: dropped when the connection closes) unless
    it exists or ``create_slot`` is False. ``streaming`` asks for protocol 2 with large
    in-progress transactions streamed (they still become one record at their commit).
    ``assembler`` sets the memory caps (see :class:`TransactionAssembler`);
    ``extra_params`` are added to the startup packet (e.g. ``options``). The publication
    must exist (:func:`create_publication_sql`).

    Raises ``ValueError`` for an invalid slot name and :class:`ReplicationError` if the
    server cannot be reached, refuses, or the slot exists for another plugin or database.
    """
    _check_slot(slot)
    pub_list = _quote_literal(quote_ident(publication))
    params = {"user": user, "database": database, "replication": "database",
              "application_name": slot, "client_encoding": "UTF8"}  # fmt: skip
    params.update(extra_params or {})
    try:
        session = await open_backend(server, params, credentials, max_message_size=max_message_size)
    except ClientError as e:
        raise ReplicationError(
            f'replication slot "{slot}": cannot open a replication connection to server'
            f' "{server.name}": {e.message}',
            sqlstate=e.sqlstate, slot=slot,
        ) from e
    stream = None
    try:
        wire = _Wire(session)
        rows = await _simple_query(
            wire, server, slot,
            "SELECT plugin, database FROM pg_catalog.pg_replication_slots"
            f" WHERE slot_name = '{slot}'",
        )  # fmt: skip
        if rows:
            plugin, slot_db = (v.decode() if v is not None else None for v in rows[0])
            if plugin != "pgoutput" or slot_db != database:
                raise ReplicationError(
                    f'replication slot "{slot}" exists for plugin {plugin!r} on database'
                    f" {slot_db!r}, not for pgoutput on {database!r}",
                    sqlstate="55000", slot=slot,
                )
        elif create_slot:
            kind = "TEMPORARY " if temporary else ""
            await _simple_query(
                wire, server, slot,
                f"CREATE_REPLICATION_SLOT {slot} {kind}LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            )  # fmt: skip
            log.info("created %sreplication slot %s on %s", kind.lower(), slot, server.name)
        else:
            raise ReplicationError(
                f'replication slot "{slot}" does not exist on server "{server.name}"',
                sqlstate="42704", slot=slot,
            )
        # asked here, not left to pgoutput: PostgreSQL 18 decodes past a missing publication
        # with a WARNING (the stream stays silent), 15 stops at the first change with an error
        if not await _simple_query(wire, server, slot,
                                   "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname ="
                                   f" {_quote_literal(publication)}"):  # fmt: skip
            raise ReplicationError(
                f'replication slot "{slot}" on server "{server.name}": publication "{publication}"'
                " does not exist", sqlstate="42704", slot=slot,
            )  # fmt: skip
        options = f"proto_version '{2 if streaming else 1}', publication_names {pub_list}, messages 'true'"
        if streaming:
            options += ", streaming 'on'"
        await session.stream.send_all(
            m.query(f"START_REPLICATION SLOT {slot} LOGICAL {format_lsn(start_lsn)} ({options})")
        )
        while True:
            tag, body = await wire.read()
            if tag == BackendTag.COPY_BOTH_RESPONSE:
                break
            if tag == BackendTag.ERROR_RESPONSE:
                raise _server_error(server, slot, body)
            if tag not in (BackendTag.NOTICE_RESPONSE, BackendTag.PARAMETER_STATUS):
                raise ReplicationError(
                    f'replication slot "{slot}": unexpected message {_show_tag(tag)} from'
                    f' server "{server.name}" in answer to START_REPLICATION',
                    sqlstate="08P01", slot=slot,
                )
        stream = ReplicationStream(
            session, wire, slot=slot, assembler=assembler or TransactionAssembler(),
            status_interval=status_interval, eager_status=eager_status,
        )  # fmt: skip
        return stream
    except _Closed:
        raise _lost(server, slot, "the server closed the connection") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        raise _lost(server, slot, str(e) or type(e).__name__) from e
    except ProtocolError as e:
        raise ReplicationError(
            f'replication slot "{slot}": protocol violation from server "{server.name}": {e}',
            sqlstate=e.sqlstate, slot=slot,
        ) from e
    finally:
        if stream is None:
            session.close()


async def _simple_query(wire: _Wire, server: BackendServer, slot: str, sql: str) -> list[tuple[bytes | None, ...]]:
    """Run ``sql`` with the simple protocol; return its rows. Raises ReplicationError on
    an ErrorResponse (after the ReadyForQuery that follows it)."""
    await wire.stream.send_all(m.query(sql))
    rows: list[tuple[bytes | None, ...]] = []
    error: ReplicationError | None = None
    while True:
        tag, body = await wire.read()
        if tag == BackendTag.DATA_ROW:
            rows.append(m.decode_backend(tag, body).values)
        elif tag == BackendTag.ERROR_RESPONSE:
            error = _server_error(server, slot, body)
        elif tag == BackendTag.READY_FOR_QUERY:
            if error is not None:
                raise error
            return rows


def _server_error(server: BackendServer, slot: str, body: bytes) -> ReplicationError:
    err = m.decode_backend(BackendTag.ERROR_RESPONSE, body)
    text = err.message or "(no message)"
    if err.detail:
        text += f" ({err.detail})"
    return ReplicationError(
        f'replication slot "{slot}" on server "{server.name}": {text}',
        sqlstate=err.sqlstate or "XX000", slot=slot,
    )


def _lost(server: BackendServer, slot: str, why: str) -> ReplicationError:
    return ReplicationError(
        f'replication slot "{slot}": connection to server "{server.name}" lost: {why}',
        sqlstate="08006", slot=slot,
    )


def _show_tag(tag: int) -> str:
    return repr(chr(tag)) if 32 <= tag < 127 else f"0x{tag:02x}"


# ------------------------------------------------------------------------ the stream


class ReplicationStream:
    """An async iterator of :class:`~replay.pgoutput.PosterRecord` and
    :class:`~replay.pgoutput.NonTransactionalMessage`, in commit order. Make it with
    :func:`open_replication_stream`; close it with :meth:`aclose` (or ``async with``).
    See the module docstring for what is confirmed and when status updates are sent."""

    def __init__(
        self,
        session: BackendSession,
        wire: _Wire,
        *,
        slot: str,
        assembler: TransactionAssembler,
        status_interval: float,
        eager_status: bool = True,
    ) -> None:
        self.slot = slot
        #: report a moved confirmed position before waiting for the next record (a slot
        #: that is a synchronous standby needs it; otherwise it costs a send per record)
        self.eager_status = eager_status
        self.server = session.server
        self.assembler = assembler
        self.status_interval = status_interval
        #: the walsender's position as the stream last heard it (keepalives and XLogData):
        #: WAL up to here has been decoded and everything for us before it sent
        self.latest_wal_end = 0
        #: how many standby status updates were sent
        self.status_updates = 0
        self._session = session
        self._wire = wire
        self._ready: deque[PosterRecord | NonTransactionalMessage] = deque()
        self._flush = 0  # what we report as flushed (the slot's confirmed_flush_lsn)
        self._sent_flush = 0  # ... as of the last status update
        self._handed_out = 0  # highest confirm_lsn handed to the caller
        self._last_status = trio.current_time()
        self._failure: ReplicationError | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    @property
    def confirmed_lsn(self) -> int:
        """The position reported (or to be reported) as flushed."""
        return self._flush

    def confirm(self, lsn: int) -> None:
        """Declare everything up to ``lsn`` processed (a record's ``confirm_lsn``, once it
        is stored); the next status update reports it as flushed. Positions only move
        forward. Raises ``ValueError`` for a position beyond what was handed out."""
        if lsn <= self._flush:
            return
        if lsn > self._handed_out:
            raise ValueError(
                f"cannot confirm {format_lsn(lsn)}: the stream has handed out records up to"
                f" {format_lsn(self._handed_out)} only"
            )
        self._flush = lsn

    async def send_status(self, reply_requested: bool = False) -> None:
        """Send a standby status update now (written = the latest position heard,
        flushed = applied = the confirmed position)."""
        self._check_usable()
        try:
            await self._session.stream.send_all(self._status_bytes(reply_requested))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise self._fail(_lost(self.server, self.slot, str(e) or type(e).__name__)) from e
        self._sent_flush = self._flush
        self._last_status = trio.current_time()
        self.status_updates += 1

    def __aiter__(self) -> ReplicationStream:
        return self

    async def __anext__(self) -> PosterRecord | NonTransactionalMessage:
        """Return the next record; raises ReplicationError (and StopAsyncIteration once
        the stream is closed)."""
        if self._closed:
            raise StopAsyncIteration
        self._check_usable()
        try:
            while True:
                while not self._ready and self._wire.has_ready:
                    await self._handle(*self._wire.pop())
                if self._ready:
                    break
                if (self.eager_status and self._flush > self._sent_flush) or self._status_due():
                    await self.send_status()
                if not await self._receive():
                    await self.send_status()  # status_interval passed in silence
            if self._status_due():  # a steady flow of records must not starve the updates
                await self.send_status()
        except _Closed:
            raise self._fail(_lost(self.server, self.slot, "the server closed the connection")) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise self._fail(_lost(self.server, self.slot, str(e) or type(e).__name__)) from e
        except ProtocolError as e:
            raise self._fail(ReplicationError(
                f'replication slot "{self.slot}": protocol violation from server'
                f' "{self.server.name}": {e}', sqlstate=e.sqlstate, slot=self.slot,
            )) from e  # fmt: skip
        item = self._ready.popleft()
        self._handed_out = max(self._handed_out, item.confirm_lsn)
        return item

    async def aclose(self) -> None:
        """Report the confirmed position one last time, say goodbye and close. A
        temporary slot is dropped by the server when the connection ends."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._failure is None:
                await self._session.stream.send_all(self._status_bytes() + m.terminate())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._session.close()

    async def __aenter__(self) -> ReplicationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --------------------------------------------------------------- internals

    def _status_bytes(self, reply_requested: bool = False) -> bytes:
        return standby_status_update(
            max(self.latest_wal_end, self._flush), self._flush, self._flush,
            pg_timestamp_from_unix(time.time()), reply_requested,
        )  # fmt: skip

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise trio.ClosedResourceError("the replication stream is closed")

    def _fail(self, error: ReplicationError) -> ReplicationError:
        self._failure = error
        return error

    def _status_due(self) -> bool:
        return trio.current_time() >= self._last_status + self.status_interval

    async def _receive(self) -> bool:
        """Read more bytes from the server into the wire. Returns False, having read
        nothing, if ``status_interval`` passed first (plain TCP only: over TLS it waits for
        the server, whose keepalives ask for replies in time)."""
        stream = self._session.stream
        sock = getattr(stream, "raw_socket", None)
        if sock is not None:
            # Plain TCP. Only the wait for readability can be cancelled (by the deadline
            # or the caller); the read itself, which cannot block now, is shielded:
            # cancelling it after it took bytes off the socket would lose them.
            with trio.move_on_at(self._last_status + self.status_interval) as scope:
                await trio.lowlevel.wait_readable(sock)
            if scope.cancelled_caught:
                return False
            with trio.CancelScope(shield=True):
                data = await stream.receive_some()
        else:
            try:
                data = await stream.receive_some()
            except trio.Cancelled:
                # TLS: bytes may have been lost, and the framing with them
                self._fail(ReplicationError(
                    f'replication slot "{self.slot}": a read was cancelled midway;'
                    " reopen the stream", sqlstate="08006", slot=self.slot,
                ))  # fmt: skip
                raise
        self._wire.absorb(data)
        return True

    async def _handle(self, tag: int, body: bytes) -> None:
        if tag == BackendTag.COPY_DATA:
            msg = decode_replication(body)
            if isinstance(msg, XLogData):
                if msg.wal_end > self.latest_wal_end:
                    self.latest_wal_end = msg.wal_end
                self._ready.extend(self.assembler.feed(msg))
                return
            assert isinstance(msg, PrimaryKeepalive)
            if msg.wal_end > self.latest_wal_end:
                self.latest_wal_end = msg.wal_end
            if (
                not self.assembler.in_transaction
                and not self._ready
                and self._flush >= self._handed_out
                and msg.wal_end > self._flush
            ):
                self._flush = msg.wal_end  # idle: nothing before it is unprocessed
            if msg.reply_requested:
                await self.send_status()
            return
        if tag == BackendTag.ERROR_RESPONSE:
            raise self._fail(_server_error(self.server, self.slot, body))
        if tag in (BackendTag.NOTICE_RESPONSE, BackendTag.PARAMETER_STATUS):
            return
        if tag == BackendTag.COPY_DONE:
            raise self._fail(ReplicationError(
                f'replication slot "{self.slot}": server "{self.server.name}" ended the'
                " replication stream", sqlstate="08006", slot=self.slot,
            ))  # fmt: skip
        raise self._fail(ReplicationError(
            f'replication slot "{self.slot}": unexpected message {_show_tag(tag)} from server'
            f' "{self.server.name}" during replication', sqlstate="08P01", slot=self.slot,
        ))  # fmt: skip
