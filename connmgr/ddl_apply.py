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

A new table: fenced before its first row
-----------------------------------------
The subscriber's apply worker *skips* the changes of a table that exists locally but is
not yet in ``pg_subscription_rel`` (or is still being copied), while it goes on confirming
the positions to the primary: a synchronous standby that acknowledges commits it did not
apply. So a table created through connmgr must be subscribed, ready (``r``), before the
apply worker may reach any change of it. The refresh cannot come first: the primary lists
the table only once the creating transaction is visible there, i.e. after the standby
confirmed it. So the creating transaction carries, with its marker at the commit, a
``connmgr.ddl_guards`` row and a ``connmgr.guard`` message (:func:`replay.markers.guard_sql`;
only if every table it created is still empty then), and on the secondary a replica
trigger holds the apply worker *inside* that transaction until the row's id is in
``connmgr.ddl_done``. Meanwhile, here:

1. the CREATE is replayed (the apply worker cannot see the table: it waits in the guard);
2. a second session takes ``SHARE`` locks on the tables the replay created (the *fence*:
   it conflicts with the apply worker's ``ROW EXCLUSIVE``, not with the refresh's
   ``ACCESS SHARE``);
3. ``connmgr.ddl_done`` gets the id: the apply worker commits the creating transaction, the
   primary's commit returns, and the table becomes visible there;
4. ``REFRESH PUBLICATION WITH (copy_data = false)`` until each new table is ``r`` (no copy:
   the table was empty at its creation and every row of it is still ahead of the apply
   worker; the first change of it waits for the fence);
5. the fence is lifted.

No commit that wrote the table is confirmed by the standby before the table is ready, so
none is acknowledged before; and nothing needs copying, so the table is ready in
milliseconds instead of after a table synchronization worker's copy. A table that has rows
in its creating transaction (``CREATE TABLE AS``, an INSERT in the same block) takes the
old path: a refresh with a copy, and commits are unprotected until the copy is done
(``connmgr pair check`` shows such tables while they are copied).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from replay.markers import DdlStatement
from shadow import messages
from shadow.sqltext import leading_words, quote_ident, quote_literal

from .backend import BackendSession
from .errors import ClientError
from .wire import PeerClosed

log = logging.getLogger("connmgr.ddl")

#: the published kind of table (ordinary, permanent, not a catalog) that no subscription
#: of this database follows yet: oid and qualified name
_UNSUBSCRIBED = (
    "SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname <> 'information_schema'"
    " AND n.nspname !~ '^pg_'"
    " AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_subscription_rel r WHERE r.srrelid = c.oid)"
)
#: how long the fenced refresh may take before the fence is lifted anyway (logged)
FENCE_TIMEOUT = 30.0

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
        #: new tables made ready behind a fence (no copy)
        self.fenced = 0
        self._refresh_pending: set[str] = set()

    async def apply_transaction(self, database: str, stmts: list[DdlStatement], guard: str | None) -> None:
        """See :meth:`_apply_transaction`; a session that broke is dropped (reopened next time)."""
        try:
            await self._apply_transaction(database, stmts, guard)
        except (PeerClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self._forget(database)
            raise

    async def _apply_transaction(self, database: str, stmts: list[DdlStatement], guard: str | None) -> None:
        """Replay the DDL of one committed transaction, in order. ``guard``: the id of its
        ``connmgr.ddl_guards`` row (it created tables, empty at its commit): the tables it
        made here are fenced and made ready without a copy, and the guard is released
        whatever happens, so the apply worker never waits for a statement that failed here.
        Connection failures raise (the caller retries the record: it is not confirmed)."""
        session = await self._session(database)
        if guard is not None and await session.query_rows(messages.query(
                f"SELECT 1 FROM connmgr.ddl_done WHERE id = {quote_literal(guard)}")):  # fmt: skip
            # the record comes again (this connmgr stopped after releasing the guard): the
            # fence is gone, rows of the new tables may have been skipped; refresh with a copy
            log.warning("DDL of guard %s comes again after its guard was released: its tables are"
                        " refreshed with a copy", guard)  # fmt: skip
            guard = None
        if guard is None:  # no new empty table: each statement as before, refreshed with a copy
            for stmt in stmts:
                await self.apply(database, stmt)
            return
        before = await self._unsubscribed(session)
        for stmt in stmts:
            await self.apply(database, stmt, refresh=False)
        created = {oid: name for oid, name in (await self._unsubscribed(session)).items() if oid not in before}
        if created:
            await self._fenced_refresh(database, session, guard, created)
        else:
            await self._release_guard(session, guard)

    async def apply(self, database: str, stmt: DdlStatement, refresh: bool = True) -> bool:
        """Replay one statement; True if it ran. Connection failures raise (the caller
        retries the record: it is not confirmed); a failing statement is logged. After a
        CREATE or ALTER (``refresh``) the subscriptions are refreshed, with a copy."""
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
        if refresh and ((words and words[0] in (b"CREATE", b"ALTER")) or database in self._refresh_pending):
            await self._refresh(database, session)
        return True

    async def _unsubscribed(self, session: BackendSession) -> dict[bytes, str]:
        return {row[0]: row[1].decode() for row in await session.query_rows(messages.query(_UNSUBSCRIBED))}

    async def _release_guard(self, session: BackendSession, guard: str) -> None:
        await session.query_rows(messages.query(
            f"INSERT INTO connmgr.ddl_done (id) VALUES ({quote_literal(guard)}) ON CONFLICT DO NOTHING"))

    async def _fenced_refresh(self, database: str, session: BackendSession, guard: str,
                              created: dict[bytes, str]) -> None:  # fmt: skip
        """Steps 2-5 of the module docstring for the tables ``created`` (oid -> name)."""
        fence = await self.open_session(database)
        try:
            await fence.query_rows(messages.query(
                f"BEGIN; LOCK TABLE {', '.join(created.values())} IN SHARE MODE"))
            await self._release_guard(session, guard)
            subs = [row[0].decode() for row in await session.query_rows(messages.query(_SUBSCRIPTIONS)) if row[0]]
            oids = ",".join(oid.decode() for oid in created)
            ready = f"SELECT count(*) FROM pg_catalog.pg_subscription_rel WHERE srrelid IN ({oids}) AND srsubstate = 'r'"
            with trio.move_on_after(FENCE_TIMEOUT) as scope:
                while True:
                    try:
                        for sub in subs:
                            await session.query_rows(messages.query(
                                f"ALTER SUBSCRIPTION {quote_ident(sub)} REFRESH PUBLICATION WITH (copy_data = false)"))
                            self.refreshes += 1
                    except ClientError as e:
                        if isinstance(e, PeerClosed):
                            raise
                        log.warning("refreshing the subscriptions of %r for %s failed, retrying: %s %s",
                                    database, ", ".join(created.values()), e.sqlstate, e.message)  # fmt: skip
                    if subs and (await session.query_rows(messages.query(ready)))[0][0] == str(len(created)).encode():
                        break
                    await trio.sleep(0.005)
            if scope.cancelled_caught:
                self.errors += 1
                log.error("the new table(s) %s did not become ready in the subscriptions of %r within %.0f s;"
                          " the fence is lifted, their rows may be skipped until a refresh with copy_data",
                          ", ".join(created.values()), database, FENCE_TIMEOUT)  # fmt: skip
            else:
                self.fenced += len(created)
                self._refresh_pending.discard(database)
        finally:
            with trio.move_on_after(5):
                try:
                    await fence.query_rows(messages.query("ROLLBACK"))  # the fence is lifted
                except Exception:  # noqa: BLE001 - closing the connection ends the transaction as well
                    pass
            fence.close()

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
