"""Replaying captured DDL on the secondary database (seed 004 [0060]).

Logical replication carries rows, not schema. The primary connmgr captures each DDL
statement a client sends through it as a ``connmgr.ddl`` logical message inside the
statement's own transaction (:mod:`replay.markers`); the secondary connmgr's poster reader
finds it in the transaction's record, at the transaction's commit point in the stream, and
:class:`DdlApplier` replays it there, before the record is confirmed -- so a crash between
the two replays it again rather than losing it (a second run fails with "already exists",
which is logged and counted, never fatal).

Each statement runs in its own transaction on a connection of connmgr's own to the
secondary database, as the role that ran it on the primary (``SET LOCAL ROLE``) with the
``search_path`` it had there (``set_config``, so the captured value is a literal, never
SQL). After a CREATE, every subscription of that database is refreshed
(``ALTER SUBSCRIPTION ... REFRESH PUBLICATION``): a new table joins replication and its
rows are copied, including any the creating transaction itself inserted.

A statement that fails on the secondary does not stop the poster queue: the failure is
logged with the statement and counted (``errors``), because the rest of the stream must
still be purged; the divergence is what the operator has to look at.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from replay.markers import DdlStatement
from shadow import messages
from shadow.sqltext import leading_words, quote_ident, quote_literal

from .backend import BackendSession
from .errors import ClientError
from .wire import PeerClosed

log = logging.getLogger("connmgr.ddl")

_SUBSCRIPTIONS = (
    "SELECT subname FROM pg_catalog.pg_subscription"
    " WHERE subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())"
)


def replay_sql(stmt: DdlStatement) -> str:
    """The Query that replays ``stmt`` as it ran on the primary."""
    return (
        "BEGIN;"
        f"SET LOCAL ROLE {quote_ident(stmt.role)};"
        f"SELECT pg_catalog.set_config('search_path', {quote_literal(stmt.search_path)}, true);"
        f"{stmt.sql}\n;"
        "COMMIT"
    )


class DdlApplier:
    """Replays captured DDL on the secondary. ``open_session(database)`` returns an
    authenticated :class:`~connmgr.backend.BackendSession` on the secondary database
    (a role allowed to ``SET ROLE`` to every DDL author and to refresh subscriptions:
    in practice a superuser)."""

    def __init__(self, open_session: Callable[[str], Awaitable[BackendSession]]) -> None:
        self.open_session = open_session
        self._sessions: dict[str, BackendSession] = {}
        self.applied = 0
        self.errors = 0
        self.refreshes = 0
        self.refreshes_deferred = 0
        self._refresh_pending: set[str] = set()

    async def apply(self, database: str, stmt: DdlStatement) -> bool:
        """Replay one statement; True if it ran. Connection failures raise (the caller
        retries the record: it is not confirmed); a failing statement is logged."""
        session = await self._session(database)
        try:
            await session.query_rows(messages.query(replay_sql(stmt)))
        except (PeerClosed, OSError):  # PeerClosed first: it is a ClientError too
            self._forget(database)
            raise
        except ClientError as e:
            self.errors += 1
            log.error("DDL replay on the secondary failed (%s %s), the databases may differ: %.200s",
                      e.sqlstate, e.message, stmt.sql)  # fmt: skip
            await self._rollback(database, session)
            return False
        self.applied += 1
        log.info("DDL replayed on the secondary as %s: %.200s", stmt.role, stmt.sql)
        words = leading_words(stmt.sql.encode("utf-8", "replace"), 1)
        if (words and words[0] in (b"CREATE", b"ALTER")) or database in self._refresh_pending:
            await self._refresh(database, session)
        return True

    async def _refresh(self, database: str, session: BackendSession) -> None:
        """Refresh every subscription of ``database``. While the primary already has a
        table whose CREATE has not been replayed here yet, Postgres refuses (42P01): the
        refresh is retried after the next replayed DDL, which will be that CREATE."""
        try:
            subs = [row[0].decode() for row in await session.query_rows(messages.query(_SUBSCRIPTIONS)) if row[0]]
            for sub in subs:  # REFRESH cannot run in a transaction block: one Query each
                await session.query_rows(messages.query(f"ALTER SUBSCRIPTION {quote_ident(sub)} REFRESH PUBLICATION"))
                self.refreshes += 1
            self._refresh_pending.discard(database)
        except ClientError as e:
            if e.sqlstate == "42P01":
                self.refreshes_deferred += 1
                self._refresh_pending.add(database)
                log.info("subscription refresh of %r deferred until the next DDL: %s", database, e.message)
                return
            self.errors += 1
            log.error("refreshing the subscriptions of %r after DDL failed: %s %s", database, e.sqlstate, e.message)

    async def _rollback(self, database: str, session: BackendSession) -> None:
        try:
            await session.query_rows(messages.query("ROLLBACK"))
        except (ClientError, PeerClosed, OSError):
            self._forget(database)

    async def _session(self, database: str) -> BackendSession:
        session = self._sessions.get(database)
        if session is None:
            session = self._sessions[database] = await self.open_session(database)
        return session

    def _forget(self, database: str) -> None:
        session = self._sessions.pop(database, None)
        if session is not None:
            session.close()

    def close(self) -> None:
        for database in list(self._sessions):
            self._forget(database)
