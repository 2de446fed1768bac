"""The policy at run time (the decisions themselves are shadow/policy/, free of I/O): the
class of each client at its login, the guard of its session, the catalog of each
database that restricted sessions use, and the refusals counted by class.

The catalog (views, SQL functions; shadow/policy/catalog.py) of a database is read when
its first restricted client logs in -- that login fails (08006) if it cannot be read:
without it a view over a refused table would pass -- and again every
``[policy] catalog_refresh`` seconds while connmgr runs, with connmgr's own session ([redo]
credentials). A refresh that fails keeps the catalog it had, with a warning; one that finds
it unchanged keeps the same object, so the decisions cached for it stay (they are keyed on
it). With masks, the columns of every table and view are read too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import trio

from connmgr.errors import ClientError
from connmgr.pg.backend import BackendSession
from connmgr.pg.wire import PeerClosed
from shadow import messages
from shadow.policy.catalog import CATALOG_SQL, COLUMNS_SQL, Catalog
from shadow.policy.decision import Refusal
from shadow.policy.guard import Guard
from shadow.policy.rules import Policy

log = logging.getLogger("connmgr.policy")

__all__ = ["PolicyRuntime"]


class PolicyRuntime:
    """``open_session(database, purpose)`` opens connmgr's own session on the primary."""

    def __init__(self, policy: Policy, open_session: Callable[[str, str], Awaitable[BackendSession]], *,
                 refresh: float, timeout: float) -> None:  # fmt: skip
        self.policy = policy
        self.open_session = open_session
        self.refresh = refresh
        self.timeout = timeout
        #: database -> its catalog as last read
        self.catalogs: dict[str, Catalog] = {}
        self._loading: dict[str, trio.Event] = {}
        #: database -> the rows its catalog was made of
        self._read_rows: dict[str, tuple] = {}
        #: statements refused, by class (connmgr_policy_refusals_total)
        self.refusals: Counter[str] = Counter()
        #: rows sent with values masked, by class (connmgr_policy_masked_rows_total)
        self.masked_rows: Counter[str] = Counter()
        #: statements a rewrite changed, by class (connmgr_policy_rewrites_total)
        self.rewrites: Counter[str] = Counter()
        self.catalog_reads = 0
        self.catalog_failures = 0
        #: some class masks columns (the catalog's columns are read too)
        self.masks = any(cls.masks for cls in policy.classes)

    async def guard_for(self, conn) -> Guard | None:
        """The guard of a session that just logged in (``conn``: its user, database,
        application_name and peer); None if no class takes it."""
        host = conn.peer.rsplit(":", 1)[0].strip("[]") if conn.peer not in ("?", "") else None
        cls = self.policy.classify(conn.user, conn.database, conn.application_name, host)
        if cls is None:
            return None
        database = conn.database
        if cls.restricts_objects and database not in self.catalogs:
            await self._first_read(database)

        def refused(refusal: Refusal) -> None:
            self.refusals[cls.name] += 1
            log.warning("client %d user=%s db=%s class %s: refused %s (%s), statement %s: %s", conn.id, conn.user,
                        database, cls.name, refusal.what, refusal.rule, refusal.statement.digest,
                        refusal.statement.shape[:200])  # fmt: skip

        def masked(rows: int) -> None:
            self.masked_rows[cls.name] += rows

        def rewritten(count: int) -> None:
            self.rewrites[cls.name] += count

        catalogs = self.catalogs
        return Guard(cls, refused, lambda: catalogs.get(database), on_masked=masked, on_rewrite=rewritten)

    async def _first_read(self, database: str) -> None:
        loading = self._loading.get(database)
        if loading is not None:  # another login reads it now
            await loading.wait()
        else:
            self._loading[database] = loading = trio.Event()
            try:
                await self._read(database)
            except (ClientError, OSError, PeerClosed, trio.TooSlowError) as e:
                raise ClientError(f"connmgr cannot read the catalog of database {database!r} that its policy needs:"
                                  f" {e}", sqlstate="08006") from None  # fmt: skip
            finally:
                del self._loading[database]
                loading.set()
        if database not in self.catalogs:
            raise ClientError(f"connmgr cannot read the catalog of database {database!r} that its policy needs",
                              sqlstate="08006")  # fmt: skip

    async def _read(self, database: str) -> None:
        with trio.fail_after(self.timeout):
            session = await self.open_session(database, "connmgr policy catalog")
            try:
                rows = await session.query_rows(messages.query(CATALOG_SQL))
                columns = await session.query_rows(messages.query(COLUMNS_SQL)) if self.masks else ()
            finally:
                session.close()
        key = (tuple(map(tuple, rows)), tuple(map(tuple, columns)))
        if self._read_rows.get(database) != key:  # (unchanged: the same object, so every decision cached stays)
            self._read_rows[database] = key
            self.catalogs[database] = Catalog.from_rows(rows, columns)
        self.catalog_reads += 1

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Read every catalog in use again, every ``refresh`` seconds."""
        task_status.started()
        warned: dict[str, float] = {}
        while True:
            await trio.sleep(self.refresh)
            for database in list(self.catalogs):
                try:
                    await self._read(database)
                    warned.pop(database, None)
                except (ClientError, OSError, PeerClosed, trio.TooSlowError) as e:
                    self.catalog_failures += 1
                    if time.monotonic() - warned.get(database, 0.0) > 60:
                        warned[database] = time.monotonic()
                        log.warning("policy: cannot read the catalog of %r again (%s); the one read before stays",
                                    database, e)  # fmt: skip
