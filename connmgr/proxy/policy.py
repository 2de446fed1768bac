"""The policy at run time (the decisions themselves are shadow/policy/, free of I/O): the
version in use (the ``[policy] file``, or one from the store, activated by
connmgr/proxy/policy_sync.py), the class of each client at its login, the guard of its
session (which follows the version in use between its transactions), the catalog of each
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
from shadow.policy.activation import Version
from shadow.policy.catalog import CATALOG_SQL, COLUMNS_SQL, UNREAD, Catalog
from shadow.policy.decision import Refusal
from shadow.policy.guard import UNRESTRICTED, Guard
from shadow.policy.maintenance import DEFAULT_BY, Entry, Maintenance
from shadow.policy.rules import Policy, PolicyError

log = logging.getLogger("connmgr.policy")

__all__ = ["PolicyRuntime"]


class PolicyRuntime:
    """``open_session(database, purpose)`` opens connmgr's own session on the primary."""

    def __init__(self, policy: Policy, open_session: Callable[[str, str], Awaitable[BackendSession]], *,
                 refresh: float, timeout: float, maintenance_wait: float = 30.0) -> None:  # fmt: skip
        #: the policy version in use (a new one comes from the store: connmgr/proxy/policy_sync.py);
        #: guards follow it at their sessions' next transaction
        self.active = Version(None, policy)
        #: databases sessions used (a version that restricts objects reads their catalogs
        #: when it is staged, not at its first statement)
        self.databases: set[str] = set()
        #: the objects under maintenance (shadow/policy/maintenance.py) and how long a
        #: statement on one waits; ``_changed`` is set (and replaced) at every change
        self.maintenance = Maintenance()
        self.maintenance_wait = maintenance_wait
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: the entries the store began (connmgr.policy_maintenance), by key; bad ones logged once
        self._stored: dict[str, Entry] = {}
        self._bad: set[str] = set()
        #: statements held (connmgr_maintenance_held_total), and failed at the limit
        self.held = 0
        self.held_expired = 0
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
        #: some class masks columns (the catalog's columns are read too; once a version
        #: staged has masks, from then on)
        self.masks = any(cls.masks for cls in policy.classes)
        #: some class restricts objects (in use or staged): every database's catalog is
        #: read at its first login, so a session that switches class finds it there
        self.restricting = any(cls.restricts_objects for cls in policy.classes)
        #: set once the store was read (or there is none): logins wait for it
        self.ready = trio.Event()
        self.ready.set()
        #: [policy] store_required: a login before the store was read fails (08006)
        self.required = False
        #: the store's cycle (connmgr/proxy/policy_sync.py), if there is a store
        self.sync = None

    @property
    def policy(self) -> Policy:
        return self.active.policy

    def activate(self, version: Version) -> None:
        """From now on ``version`` is in use: every session follows at its next transaction."""
        before, self.active = self.active, version
        self.masks = self.masks or any(cls.masks for cls in version.policy.classes)
        log.warning("policy %s active (was %s): %d client class(es)", version.label, before.label,
                    len(version.policy.classes))  # fmt: skip

    async def prepare(self, policy: Policy) -> None:
        """Before ``policy`` is activated: what it needs read (the columns, if it masks; the
        catalogs of the databases in use, if it restricts objects). Raises what the reads raise."""
        if any(cls.masks for cls in policy.classes) and not self.masks:
            self.masks = True
            self._read_rows.clear()  # (read again, with the columns)
            for database in list(self.catalogs):
                await self._read(database)
        if any(cls.restricts_objects for cls in policy.classes):
            self.restricting = True
            for database in [d for d in self.databases if d not in self.catalogs]:
                await self._first_read(database)

    async def guard_for(self, conn) -> Guard:
        """The guard of a session that just logged in (``conn``: its user, database,
        application_name and peer)."""
        if not self.ready.is_set():
            with trio.move_on_after(self.timeout):
                await self.ready.wait()
            if not self.ready.is_set() and self.required:
                raise ClientError("connmgr has not read its policy store yet ([policy] store_required)",
                                  sqlstate="08006")  # fmt: skip
        host = conn.peer.rsplit(":", 1)[0].strip("[]") if conn.peer not in ("?", "") else None
        version = self.active
        cls = version.policy.classify(conn.user, conn.database, conn.application_name, host) or UNRESTRICTED
        database = conn.database
        if cls.restricts_objects and database not in self.catalogs:
            await self._first_read(database)
        elif self.restricting and database not in self.catalogs:  # (for the version staged: its class may)
            try:
                await self._first_read(database)
            except ClientError as e:
                log.warning("policy: %s (read again at the next login)", e)
        catalogs = self.catalogs

        def catalog() -> Catalog | None:
            found = catalogs.get(database)
            # (not read: a class that came with a new version refuses what needs it)
            return found if found is not None or not self.restricting else UNREAD

        guard = Guard(cls, lambda refusal: None, catalog)

        def refused(refusal: Refusal) -> None:
            self.refusals[guard.cls.name] += 1
            log.warning("client %d user=%s db=%s class %s: refused %s (%s), statement %s: %s", conn.id, conn.user,
                        database, guard.cls.name, refusal.what, refusal.rule, refusal.statement.digest,
                        refusal.statement.shape[:200])  # fmt: skip

        def masked(rows: int) -> None:
            self.masked_rows[guard.cls.name] += rows

        def rewritten(count: int) -> None:
            self.rewrites[guard.cls.name] += count

        guard.on_refusal = refused
        guard.on_rewrite = rewritten
        guard.on_masked = masked
        if guard.results is not None:
            guard.results.on_masked = masked
        guard.source = self
        guard.version = version
        guard.client = (conn.user, database, conn.application_name, host)
        self.databases.add(database)
        return self._maintained(guard, conn)

    # ------------------------------------------------------------------ maintenance

    def _maintained(self, guard: Guard, conn) -> Guard:
        guard.maintenance = self.maintenance
        guard.application_name = conn.application_name
        guard.wait_out = lambda entries: self.wait_out(guard, entries)
        guard.hold = lambda entries, then: self._hold(guard, entries, then)
        return guard

    def begin(self, text: str, by: str = DEFAULT_BY) -> Entry:
        """``text`` is under maintenance from now (PolicyError for text that is not an object)."""
        entry = self.maintenance.begin(text, by, time.time())
        self._change()
        log.warning("maintenance begins on %s: statements on it wait (up to %g s); sessions of %r go on",
                    entry.text, self.maintenance_wait, entry.by)  # fmt: skip
        return entry

    def end(self, text: str) -> Entry | None:
        """``text`` is no longer under maintenance: the statements held on it go on."""
        entry = self.maintenance.end(text)
        if entry is not None:
            self._change()
            log.warning("maintenance ends on %s after %.1f s", entry.text, time.time() - entry.since)
        return entry

    def from_store(self, rows) -> tuple[str, ...]:
        """The objects under maintenance in the store (``rows``: (object, by) as text)
        applied here: begun if new, ended if gone (only what the store began); returns the
        store's objects this connmgr holds statements on now."""
        wanted = {}
        for obj, by in rows:
            wanted[obj.strip().lower()] = (obj, by or DEFAULT_BY)
        for key in [k for k in self._stored if k not in wanted]:
            entry = self._stored.pop(key)
            if self.maintenance.entries.get(key) is entry:
                self.end(entry.text)
        for key, (obj, by) in wanted.items():
            if key in self._stored and self._stored[key].by == by:
                continue
            try:
                self._stored[key] = self.begin(obj, by)
            except PolicyError as e:
                if key not in self._bad:
                    self._bad.add(key)
                    log.error("maintenance in the store: %s (ignored)", e)
        return tuple(sorted(e.text for e in self._stored.values()))

    def _change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_out(self, guard: Guard, entries: tuple[Entry, ...]) -> None:
        """Until ``entries`` have ended, or the limit (then the guard's next batch fails
        with 55P03 on what is still under maintenance)."""
        self.held += 1
        started = time.monotonic()
        with trio.move_on_after(self.maintenance_wait):
            while any(self.maintenance.entries.get(e.text.strip().lower()) is e for e in entries):
                await self._changed.wait()
            return
        self.held_expired += 1
        guard.expired = (entries, round(time.monotonic() - started, 1))

    def _hold(self, guard: Guard, entries: tuple[Entry, ...], then: Callable[[], None]) -> None:
        """The relay engine's wait: ``then()`` once :meth:`wait_out` is over."""

        async def waiting() -> None:
            try:
                await self.wait_out(guard, entries)
            finally:
                then()

        if self._nursery is None:  # (not running: nothing to wait with)
            then()
            return
        self._nursery.start_soon(waiting)

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
        """Read every catalog in use again, every ``refresh`` seconds; own the waits of
        the relay engine's held sessions."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._refresh()

    async def _refresh(self) -> None:
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
