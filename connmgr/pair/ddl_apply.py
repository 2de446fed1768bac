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
SQL). After a CREATE, ALTER or SELECT INTO, every subscription of that database is refreshed
(``ALTER SUBSCRIPTION ... REFRESH PUBLICATION``): a new table joins replication and its
rows are copied from the primary (a table the transaction created is emptied first, so
rows a ``CREATE TABLE AS`` made here are not there twice). A transaction that created
tables is guarded instead (below), and its tables need no copy.

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
``connmgr.ddl_guards`` row and a ``connmgr.guard`` message (:func:`replay.markers.guard_sql`)
with the rows it left in its new tables, and on the secondary a replica trigger holds the
apply worker *inside* that transaction until the row's id is in ``connmgr.ddl_done``.
Meanwhile, here:

1. the CREATE is replayed (an apply worker that reached the transaction's own rows of the
   table before that stops with "target relation does not exist" and is restarted after
   ``wal_retrieve_retry_interval``; once the table exists it skips them: it does not follow
   the table yet);
2. the rows the creating transaction left in the table are written (``connmgr.ddl_fill``,
   as the copy would have, ahead of the commit instead of a second after it);
3. this waits until the apply worker is in the guard (its ``application_name``): it has
   passed every change of the transaction before the guard row, so a fence cannot hold it
   before a change it skipped and that the ready table would then apply a second time;
4. a second session takes ``SHARE`` locks on the tables the replay created (the *fence*:
   it conflicts with the apply worker's ``ROW EXCLUSIVE``, not with the refresh's
   ``ACCESS SHARE``; the worker does not keep the lock of a table whose change it skipped);
5. ``connmgr.ddl_done`` gets the id: the apply worker commits the creating transaction, the
   primary's commit returns, and the table becomes visible there;
6. ``REFRESH PUBLICATION WITH (copy_data = false)`` until each new table is ``r`` (no copy:
   the table holds the creating transaction's rows and every later row of it is still
   ahead of the apply worker; the first change of it waits for the fence);
7. the fence is lifted.

No commit that wrote the table is confirmed by the standby before the table is ready, so
none is acknowledged before; and nothing needs copying, so the table is ready in
milliseconds instead of after a table synchronization worker's copy. Only a creating
transaction whose rows exceed ``connmgr.guard_rows_max_bytes`` (8 MiB) takes the old path:
a refresh with a copy, and commits are unprotected until the copy is done (``connmgr pair
check`` shows such tables while they are copied).

If this connmgr stops between steps 5 and 7 and the record comes again, the guard is
already released: the tables it filled that are still outside the subscription are
emptied and the subscription refreshed with a copy.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from connmgr.errors import ClientError
from connmgr.pg.backend import BackendSession
from connmgr.pg.wire import PeerClosed
from replay.markers import DdlStatement, Guard
from shadow import messages
from shadow.sqltext import leading_words, quote_ident, quote_literal

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
#: a guarded transaction's DDL waits this long for a lock before it looks whether the apply
#: worker, held in the guard, is the one holding it (then that worker is cancelled)
GUARD_LOCK_TIMEOUT = "100ms"
#: how long to wait for the apply worker to reach a guard (its trigger gives up after 10 s
#: and the worker retries after wal_retrieve_retry_interval)
GUARD_WAIT = 15.0

#: the first words of DDL after which the subscriptions are refreshed (SELECT: ... INTO)
_MAY_ADD_TABLES = ([b"CREATE"], [b"ALTER"], [b"SELECT"], [b"WITH"])

_SUBSCRIPTIONS = (
    "SELECT subname FROM pg_catalog.pg_subscription"
    " WHERE subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())"
)


def replay_sql(stmt: DdlStatement, lock_timeout: bool = False) -> str:
    """The Query that replays ``stmt`` as it ran on the primary (``lock_timeout``: giving
    up a lock wait after :data:`GUARD_LOCK_TIMEOUT`, 55P03)."""
    return (
        "BEGIN;"
        + (f"SET LOCAL lock_timeout = '{GUARD_LOCK_TIMEOUT}';" if lock_timeout else "")
        + f"SET LOCAL ROLE {quote_ident(stmt.role)};"
        f"SELECT pg_catalog.set_config('search_path', {quote_literal(stmt.search_path)}, true);"
        f"{stmt.sql}\n;"
        "COMMIT"
    )


class DdlApplier:
    """Replays captured DDL on the secondary. ``open_session(database)`` returns an
    authenticated :class:`~connmgr.pg.backend.BackendSession` on the secondary database
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
        #: rows the creating transactions wrote into their new tables, written here
        self.rows_filled = 0
        #: apply workers cancelled in a guard because they held a lock its DDL needed
        self.guard_cancels = 0
        self._refresh_pending: set[str] = set()

    async def apply_transaction(self, database: str, stmts: list[DdlStatement], guard: Guard | None) -> None:
        """See :meth:`_apply_transaction`; a session that broke is dropped (reopened next time)."""
        try:
            await self._apply_transaction(database, stmts, guard)
        except (PeerClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self._forget(database)
            raise

    async def _apply_transaction(self, database: str, stmts: list[DdlStatement], guard: Guard | None) -> None:
        """Replay the DDL of one committed transaction, in order. ``guard``: its
        ``connmgr.guard`` message (it created tables): the tables it made here get the rows
        it left in them, are fenced and made ready without a copy, and the guard is
        released whatever happens, so the apply worker never waits for a statement that
        failed here. Connection failures raise (the caller retries the record: it is not
        confirmed)."""
        if not stmts and guard is None:  # a record with other messages only: nothing to do here
            return
        session = await self._session(database)
        if guard is not None and await session.query_rows(messages.query(
                f"SELECT 1 FROM connmgr.ddl_done WHERE id = {quote_literal(guard.id)}")):  # fmt: skip
            # the record comes again (this connmgr stopped after releasing the guard): the
            # fence is gone, rows of the new tables may have been skipped; refresh with a copy
            log.warning("DDL of guard %s comes again after its guard was released: its tables are"
                        " refreshed with a copy", guard.id)  # fmt: skip
            await self._unfill(session, guard)
            guard = None
        before = await self._unsubscribed(session)
        changed = False
        for stmt in stmts:
            ran = await self.apply(database, stmt, guard=None if guard is None else guard.id)
            changed |= ran and leading_words(stmt.sql.encode("utf-8", "replace"), 1)[:1] in _MAY_ADD_TABLES
        created = {oid: name for oid, name in (await self._unsubscribed(session)).items() if oid not in before}
        if guard is None:  # no table to guard: a refresh with a copy (an ALTER may publish one)
            if changed or database in self._refresh_pending:
                await self._refresh(database, session)
            return
        # the tables the guard covers (published on the primary), as this replay made them
        if guard.tables:
            names = ", ".join(quote_literal(t) for t in guard.tables)
            covered = {row[0] for row in await session.query_rows(messages.query(
                f"SELECT pg_catalog.to_regclass(n)::oid FROM pg_catalog.unnest(ARRAY[{names}]::text[]) n"))}
            created = {oid: name for oid, name in created.items() if oid in covered}
        else:
            created = {}
        if guard.copy:  # rows over the cap: copied after the commit, unprotected until then
            if created:  # what a CREATE TABLE AS made here would be there twice
                await self._empty(session, created)
            await self._release_guard(session, guard.id)
            await self._refresh(database, session, created)
            return
        if guard.filled:
            await self._fill(database, session, guard)
        await self._wait_in_guard(session, guard)
        if created:
            await self._fenced_refresh(database, session, guard.id, created)
        else:
            await self._release_guard(session, guard.id)

    async def apply(self, database: str, stmt: DdlStatement, guard: str | None = None) -> bool:
        """Replay one statement; True if it ran. Connection failures raise (the caller
        retries the record: it is not confirmed); a failing statement is logged.

        ``guard``: the transaction's guard. Its apply worker may wait in the guard while it
        holds locks of rows the transaction wrote before (``INSERT INTO x; CREATE INDEX ON
        x``, a new table that ``REFERENCES x``): the statement would wait for the worker,
        which waits for this. So the statement waits at most :data:`GUARD_LOCK_TIMEOUT` for
        a lock; if the worker in the guard is what holds it up, the worker is cancelled (it
        is restarted and applies the transaction again, after the statement), and the
        statement runs again."""
        session = await self._session(database)
        while True:
            try:
                await session.query_rows(messages.query(replay_sql(stmt, lock_timeout=guard is not None)))
                break
            except (PeerClosed, OSError):  # PeerClosed first: it is a ClientError too
                self._forget(database)
                raise
            except ClientError as e:
                await self._rollback(database, session)
                if guard is not None and e.sqlstate == "55P03":
                    await self._free_from_guard(session, guard)
                    continue
                self.errors += 1
                log.error("DDL replay on the secondary failed (%s %s), the databases may differ: %.200s",
                          e.sqlstate, e.message, stmt.sql)  # fmt: skip
                return False
        self.applied += 1
        log.info("DDL replayed on the secondary as %s: %.200s", stmt.role, stmt.sql)
        return True

    async def _free_from_guard(self, session: BackendSession, guard: str) -> None:
        """Cancel the apply worker waiting in ``guard`` (if it is there), and wait until it
        has let go of its transaction's locks."""
        in_guard = ("SELECT pid FROM pg_catalog.pg_stat_activity"
                    f" WHERE application_name = {quote_literal('connmgr guard ' + guard)}")
        cancelled = await session.query_rows(messages.query(
            f"SELECT pid, pg_catalog.pg_cancel_backend(pid) FROM ({in_guard}) w"))
        if not cancelled:
            return  # something else holds the lock: wait again
        self.guard_cancels += 1
        log.info("the apply worker %s held a lock the DDL of guard %s needs while it waited in the"
                 " guard: cancelled, it applies the transaction again after the DDL",
                 cancelled[0][0].decode(), guard)  # fmt: skip
        with trio.move_on_after(5):
            while await session.query_rows(messages.query(in_guard)):
                await trio.sleep(0.002)

    async def _unsubscribed(self, session: BackendSession) -> dict[bytes, str]:
        return {row[0]: row[1].decode() for row in await session.query_rows(messages.query(_UNSUBSCRIBED))}

    async def _fill(self, database: str, session: BackendSession, guard: Guard) -> None:
        """Write the rows the creating transaction left in its new tables (the apply worker
        skips them: it does not follow the tables yet)."""
        try:
            filled = await session.query_rows(messages.query(guard.fill_sql()))
        except (PeerClosed, OSError):
            raise
        except ClientError as e:
            self.errors += 1
            log.error("writing the rows of the new table(s) %s on the secondary failed (%s %s): they are"
                      " missing there until the table is copied again", ", ".join(guard.filled),
                      e.sqlstate, e.message)  # fmt: skip
            await self._rollback(database, session)
            return
        self.rows_filled += sum(int(n) for _, n in filled if n is not None)
        log.info("rows of the creating transaction written on the secondary: %s",
                 ", ".join(f"{name.decode()} {int(n)}" for name, n in filled if name is not None and n is not None))

    async def _wait_in_guard(self, session: BackendSession, guard: Guard) -> None:
        """Until the apply worker waits in the guard (its trigger sets application_name):
        then it has skipped every change of the new tables before the guard row, and the
        fence can no longer come between it and them (it would hold the worker before a
        skipped change that the ready table then applies: twice, after the fill)."""
        here = messages.query("SELECT 1 FROM pg_catalog.pg_stat_activity"
                              f" WHERE application_name = {quote_literal('connmgr guard ' + guard.id)}")
        with trio.move_on_after(GUARD_WAIT) as scope:
            while not await session.query_rows(here):
                await trio.sleep(0.002)
        if scope.cancelled_caught:
            log.warning("the apply worker did not reach guard %s within %.0f s; the new tables are fenced"
                        " anyway", guard.id, GUARD_WAIT)  # fmt: skip

    async def _unfill(self, session: BackendSession, guard: Guard) -> None:
        """A guard seen again after its release: empty the filled tables that are still
        outside the subscription, so the copy does not bring their rows twice."""
        for name in guard.filled:
            await session.query_rows(messages.query(
                "DO $connmgr$ BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid ="
                f" pg_catalog.to_regclass({quote_literal(name)}) AND NOT EXISTS (SELECT 1 FROM"
                " pg_catalog.pg_subscription_rel r WHERE r.srrelid = c.oid)) THEN"
                f" EXECUTE 'TRUNCATE ' || {quote_literal(name)}; END IF; END $connmgr$"))

    async def _empty(self, session: BackendSession, created: dict[bytes, str]) -> None:
        """Empty new tables before their copy brings the primary's rows."""
        try:
            await session.query_rows(messages.query(f"TRUNCATE {', '.join(created.values())}"))
        except ClientError as e:
            if isinstance(e, PeerClosed):
                raise
            self.errors += 1
            log.error("emptying the new table(s) %s before their copy failed (%s %s): rows the replay"
                      " made may be there twice", ", ".join(created.values()), e.sqlstate, e.message)  # fmt: skip

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

    async def _refresh(self, database: str, session: BackendSession, created: dict[bytes, str] | None = None) -> None:
        """Refresh every subscription of ``database``. While the primary already has a
        table whose CREATE has not been replayed here yet, Postgres refuses (42P01): the
        refresh is retried after the next replayed DDL, which will be that CREATE.

        ``created`` (oid -> name): tables this transaction made. The primary lists them only
        once the transaction is visible there, a moment after the standby confirmed it, so
        the refresh is repeated until they are in the subscription (at most
        :data:`FENCE_TIMEOUT`)."""
        listed = None
        if created:
            oids = ",".join(oid.decode() for oid in created)
            listed = messages.query(f"SELECT count(*) FROM pg_catalog.pg_subscription_rel WHERE srrelid IN ({oids})")
        with trio.move_on_after(FENCE_TIMEOUT) as scope:
            while True:
                try:
                    subs = [row[0].decode() for row in await session.query_rows(messages.query(_SUBSCRIPTIONS))
                            if row[0]]  # fmt: skip
                    for sub in subs:  # REFRESH cannot run in a transaction block: one Query each
                        await session.query_rows(messages.query(
                            f"ALTER SUBSCRIPTION {quote_ident(sub)} REFRESH PUBLICATION"))
                        self.refreshes += 1
                    self._refresh_pending.discard(database)
                except ClientError as e:
                    if isinstance(e, PeerClosed):
                        raise
                    if e.sqlstate == "42P01":
                        self.refreshes_deferred += 1
                        self._refresh_pending.add(database)
                        log.info("subscription refresh of %r deferred until the next DDL: %s", database, e.message)
                        return
                    self.errors += 1
                    log.error("refreshing the subscriptions of %r after DDL failed: %s %s",
                              database, e.sqlstate, e.message)  # fmt: skip
                    return
                if listed is None or not subs or (await session.query_rows(listed))[0][0] == str(len(created)).encode():
                    return
                await trio.sleep(0.02)
        if scope.cancelled_caught:
            self.errors += 1
            log.error("the new table(s) %s did not join the subscriptions of %r within %.0f s; their rows are"
                      " not replicated until a refresh", ", ".join(created.values()), database, FENCE_TIMEOUT)  # fmt: skip

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
