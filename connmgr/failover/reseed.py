"""Fail-back: the old primary database becomes the secondary of the new one (re-seeding).

After a move (:mod:`connmgr.failover.controller`) the secondary database is the primary and the old
primary is out of the pair. Re-seeding puts it back in as the new secondary, with logical
replication running the other way -- the same shape the pair had, mirrored:

* **Each subscription keeps its name and changes sides.** The new primary's subscription
  (disabled at the point of failure) is dropped there, its slot on the old primary is
  dropped, and a subscription of that name is made on the old primary, to publications
  of the same names on the new primary (created ``FOR ALL TABLES`` if missing). Its slot
  on the new primary has that name too. Names never grow, however often the pair turns.
* **``synchronous_standby_names`` moves with them.** The old primary's value names those
  subscriptions, so it is what the new primary needs: it is set there (``ALTER SYSTEM``,
  reload) once the new subscriptions are ready. The old primary's is reset first: its
  new apply worker commits with ``synchronous_commit = on`` and would otherwise wait for
  standbys that are gone.

Two cases:

* **After a planned switchover** the old primary holds exactly what the new one held at
  the fence. The slots were made on the new primary at the point of failure, before
  anything was replayed or written there (:func:`prepare_slots`), so the subscriptions
  start there with ``copy_data = false``: nothing is copied, and nothing is missed.
* **After a crash** the old primary may hold commits the new one never received: they
  committed locally and were never acknowledged (their sessions were replayed, or got an
  error). Its replicated tables are emptied and copied afresh (``copy_data = true``). How
  many rows that discards is noted per table first (counted up to a million each).

Both databases must reach each other: the old primary connects to the new one at the
address connmgr uses, with the ``[failover]`` user and password (:func:`conninfo`).
Every step is idempotent, so a re-seed that failed half-way (the old primary died again,
a timeout) is simply run again. Sequences are not replicated: the caller brings the old
primary's ahead of the new one's (:mod:`connmgr.pair.sequence_sync`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from connmgr.pair.sequence_sync import SequenceSync
from connmgr.pg.backend import BackendSession
from shadow import messages
from shadow.sqltext import quote_ident, quote_literal

#: rows counted per table before it is emptied (beyond: "more than")
_COUNT_LIMIT = 1_000_000

#: (database, purpose) -> an open admin session (a superuser's) on one of the two servers
Opener = Callable[[str, str], Awaitable[BackendSession]]


class ReseedError(Exception):
    """The old primary could not be made the secondary (the message says why). Internal:
    reported as a :class:`~connmgr.failover.controller.FailoverError`."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subscription of the pair, as the new primary had it at the point of failure."""

    name: str
    database: str
    publications: tuple[str, ...]


def conninfo(host: str, port: int, user: str, password: str, database: str) -> str:
    """A libpq connection string (values quoted as libpq wants). No application_name:
    the walsender is known by the subscription's name in synchronous_standby_names."""

    def value(v: str) -> str:
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"

    parts = {"host": host, "port": str(port), "user": user, "dbname": database}
    if password:
        parts["password"] = password
    return " ".join(f"{k}={value(v)}" for k, v in parts.items())


async def _rows(session: BackendSession, sql: str) -> list[tuple[bytes | None, ...]]:
    return await session.query_rows(messages.query(sql))


def _names(values: list[str] | tuple[str, ...]) -> str:
    return "ARRAY[" + ", ".join(quote_literal(v) for v in values) + "]::text[]"


async def prepare_slots(open_new: Opener, subscriptions: list[Subscription]) -> list[str]:
    """At the point of failure of a planned switchover, before anything is written on the
    new primary: its publications (``FOR ALL TABLES`` where missing) and one logical slot
    per subscription, named like it. Returns the slots made (an existing one is kept)."""
    made = []
    for sub in subscriptions:
        session = await open_new(sub.database, "connmgr failback slots")
        try:
            await _ensure_publications(session, sub.publications)
            exists = await _rows(session, "SELECT 1 FROM pg_catalog.pg_replication_slots"
                                          f" WHERE slot_name = {quote_literal(sub.name)}")  # fmt: skip
            if not exists:
                await _rows(session, f"SELECT pg_catalog.pg_create_logical_replication_slot({quote_literal(sub.name)},"
                                     " 'pgoutput')")  # fmt: skip
                made.append(sub.name)
        finally:
            session.close()
    return made


async def _ensure_publications(session: BackendSession, publications: tuple[str, ...]) -> None:
    have = {r[0].decode() for r in await _rows(session, "SELECT pubname FROM pg_catalog.pg_publication") if r[0]}
    for pub in publications:
        if pub not in have:
            await _rows(session, f"CREATE PUBLICATION {quote_ident(pub)} FOR ALL TABLES")


async def reseed(open_old: Opener, open_new: Opener, subscriptions: list[Subscription], *,
                 connect: Callable[[str], str], copy: bool, sync_names: str | None,
                 timeout: float, note: Callable[[str], None]) -> str:  # fmt: skip
    """Make the old primary subscribe to the new one (see the module docstring).
    ``connect(database)`` is the conninfo the old primary uses to reach the new one;
    ``copy``: empty the old primary's replicated tables and copy them (after a crash);
    ``sync_names``: the old primary's synchronous_standby_names if the caller already
    knows it (a retry), else read there. Returns the synchronous_standby_names now set on
    the new primary. ``timeout`` bounds the copy and the wait for the standbys; raises
    :class:`ReseedError` (or what a session raises) if a step fails."""
    if not subscriptions:
        raise ReseedError("the new primary had no subscription to turn around")
    admin_db = subscriptions[0].database
    old = await open_old(admin_db, "connmgr reseed")
    try:
        if sync_names is None:
            ((value,),) = await _rows(old, "SELECT pg_catalog.current_setting('synchronous_standby_names')")
            sync_names = (value or b"").decode()
        # The new apply workers commit with synchronous_commit on: nothing may wait for
        # the standbys the old primary had (they were the other side of the pair).
        await _rows(old, "ALTER SYSTEM RESET synchronous_standby_names")
        await _rows(old, "SELECT pg_catalog.pg_reload_conf()")
    finally:
        old.close()
    if not copy:
        missing = await _missing_slots(open_new, subscriptions)
        if missing:
            note(f"slots {missing} are missing on the new primary: the old primary is copied afresh")
            copy = True
    for sub in subscriptions:
        await _turn_around(open_old, open_new, sub, connect(sub.database), copy, note)
    names = [s.name for s in subscriptions]
    await _wait_ready(open_old, subscriptions, timeout, note)
    new = await open_new(admin_db, "connmgr reseed")
    try:
        await _rows(new, f"ALTER SYSTEM SET synchronous_standby_names = {quote_literal(sync_names)}")
        await _rows(new, "SELECT pg_catalog.pg_reload_conf()")
        if sync_names:
            await _wait(new, "SELECT count(*) FROM pg_catalog.pg_stat_replication"
                             f" WHERE application_name = ANY({_names(names)}) AND sync_state IN ('sync', 'quorum')",
                        len(names), timeout, "the re-seeded subscriptions to become synchronous standbys")  # fmt: skip
    finally:
        new.close()
    if sync_names:
        await _sync_effective(open_new, admin_db, sync_names)
    return sync_names


async def reseed_and_sync(open_old: Opener, open_new: Opener, subscriptions: list[Subscription], *,
                          connect: Callable[[str], str], copy: bool, sync_names: str | None,
                          timeout: float, note: Callable[[str], None]) -> tuple[str, int]:  # fmt: skip
    """:func:`reseed`, then the old primary's sequences brought ahead of the new one's
    (one pass per database: sequences are not replicated). Returns the
    synchronous_standby_names now set on the new primary and how many sequences moved.
    The database failover's fail-back and a host takeover's rejoin both end a re-seed so."""
    sync_names = await reseed(open_old, open_new, subscriptions, connect=connect, copy=copy, sync_names=sync_names,
                              timeout=timeout, note=note)  # fmt: skip
    moved = 0
    for database in dict.fromkeys(sub.database for sub in subscriptions):
        sequences = SequenceSync(lambda db=database: open_new(db, "connmgr reseed sequences"),
                                 lambda db=database: open_old(db, "connmgr reseed sequences"))
        try:
            moved += await sequences.sync_once()
        finally:
            sequences.close()
    return sync_names, moved


async def _sync_effective(open_new: Opener, database: str, sync_names: str) -> None:
    """Commits wait for the standbys only once the checkpointer has read the new
    synchronous_standby_names (it keeps the flag commits look at); pg_stat_replication
    shows 'sync' from the querying backend's own reading, earlier. A session forked after
    the reload sees the new value only once the postmaster has signalled every child,
    the checkpointer too; a CHECKPOINT then runs only after the checkpointer's loop has
    taken the reload in. So from here on, every commit waits for the standbys."""
    session = await open_new(database, "connmgr reseed")
    try:
        ((value,),) = await _rows(session, "SELECT pg_catalog.current_setting('synchronous_standby_names')")
        if (value or b"").decode() != sync_names:
            raise ReseedError(f"the new primary did not take synchronous_standby_names = {sync_names!r}"
                              f" (it has {(value or b'').decode()!r}): is it set on its command line (-c),"
                              " which ALTER SYSTEM cannot override?")  # fmt: skip
        await _rows(session, "CHECKPOINT")
    finally:
        session.close()


async def _missing_slots(open_new: Opener, subscriptions: list[Subscription]) -> list[str]:
    session = await open_new(subscriptions[0].database, "connmgr reseed")
    try:
        have = {r[0].decode() for r in await _rows(session, "SELECT slot_name FROM pg_catalog.pg_replication_slots")
                if r[0]}  # fmt: skip
    finally:
        session.close()
    return [s.name for s in subscriptions if s.name not in have]


async def _turn_around(open_old: Opener, open_new: Opener, sub: Subscription, conn: str, copy: bool,
                       note: Callable[[str], None]) -> None:  # fmt: skip
    name = quote_literal(sub.name)
    new = await open_new(sub.database, "connmgr reseed")
    try:
        # the new primary's own subscription (disabled at the point of failure) goes;
        # its slot is on the old primary and is dropped there
        await _drop_subscription(new, sub.name)
        await _ensure_publications(new, sub.publications)
        tables = await _rows(new, "SELECT DISTINCT schemaname, tablename FROM pg_catalog.pg_publication_tables"
                                  f" WHERE pubname = ANY({_names(sub.publications)}) ORDER BY 1, 2")  # fmt: skip
    finally:
        new.close()
    old = await open_old(sub.database, "connmgr reseed")
    try:
        await _drop_slot(old, sub.name)
        await _drop_subscription(old, sub.name)  # left by a re-seed that failed half-way
        if copy and tables:
            qualified = [f"{quote_ident(s.decode())}.{quote_ident(t.decode())}" for s, t in tables]
            (exists,) = await _rows(old, "SELECT " + ", ".join(
                f"to_regclass({quote_literal(q)}) IS NOT NULL" for q in qualified))  # fmt: skip
            missing = [q for q, ok in zip(qualified, exists, strict=True) if ok != b"t"]
            if missing:
                raise ReseedError(f"{sub.database}: the old primary lacks table(s) {missing[:5]}: apply the"
                                  " schema there first")  # fmt: skip
            # what is emptied, counted (up to a bound, so a big table costs little); all of it
            # comes back with the copy except what only the old primary had
            (counts,) = await _rows(old, "SELECT " + ", ".join(
                f"(SELECT count(*) FROM (SELECT 1 FROM {q} LIMIT {_COUNT_LIMIT + 1}) x)" for q in qualified))
            discarded = ", ".join(f"{q} {'>' + str(_COUNT_LIMIT) if int(n) > _COUNT_LIMIT else int(n)}"
                                  for q, n in zip(qualified, counts, strict=True) if int(n))  # fmt: skip
            note(f"{sub.database}: emptying {len(qualified)} replicated table(s) of the old primary for the copy"
                 f" (rows: {discarded or 'none'})")  # fmt: skip
            await _rows(old, "TRUNCATE " + ", ".join(qualified))
        slot_opts = "create_slot = true" if copy else "create_slot = false"
        await _rows(old, f"CREATE SUBSCRIPTION {quote_ident(sub.name)} CONNECTION {quote_literal(conn)}"
                         f" PUBLICATION {', '.join(quote_ident(p) for p in sub.publications)}"
                         f" WITH (copy_data = {'true' if copy else 'false'}, {slot_opts},"
                         f" slot_name = {name}, synchronous_commit = 'on')")  # fmt: skip
        note(f"{sub.database}: subscription {sub.name} made on the old primary"
             f" ({'copying' if copy else 'no copy: it starts at the point of failure'})")  # fmt: skip
    finally:
        old.close()


async def _drop_subscription(session: BackendSession, name: str) -> None:
    """Drop subscription ``name`` here if it exists, leaving its slot (on the other
    server) alone: that one is dropped where it lives (:func:`_drop_slot`)."""
    if await _rows(session, f"SELECT 1 FROM pg_catalog.pg_subscription WHERE subname = {quote_literal(name)}"):
        for sql in ("DISABLE", "SET (slot_name = NONE)"):
            await _rows(session, f"ALTER SUBSCRIPTION {quote_ident(name)} {sql}")
        await _rows(session, f"DROP SUBSCRIPTION {quote_ident(name)}")


async def _drop_slot(session: BackendSession, slot: str) -> None:
    """Drop ``slot`` on this server if it exists (ending a walsender still on it)."""
    name = quote_literal(slot)
    deadline = time.monotonic() + 10
    while True:
        rows = await _rows(session, "SELECT active_pid FROM pg_catalog.pg_replication_slots"
                                    f" WHERE slot_name = {name}")  # fmt: skip
        if not rows:
            return
        if rows[0][0] is None:
            await _rows(session, f"SELECT pg_catalog.pg_drop_replication_slot({name})")
            return
        await _rows(session, f"SELECT pg_catalog.pg_terminate_backend({int(rows[0][0])})")
        if time.monotonic() > deadline:
            raise ReseedError(f"slot {slot} on the old primary stays in use")
        await trio.sleep(0.05)


async def _count(session: BackendSession, sql: str) -> int:
    ((n,),) = await _rows(session, sql)
    return int(n or 0)


async def _wait(session: BackendSession, count_sql: str, want: int, timeout: float, what: str,
                progress: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """Poll ``count_sql`` (one count) on ``session`` until it reaches ``want``."""
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    while True:
        have = await _count(session, count_sql)
        if have >= want:
            return
        now = time.monotonic()
        if now > deadline:
            raise ReseedError(f"timed out after {timeout:g}s waiting for {what} ({have} of {want})")
        if progress is not None and now - last_report >= 5:
            progress(have)
            last_report = now
        await trio.sleep(0.05)


async def _wait_ready(open_old: Opener, subscriptions: list[Subscription], timeout: float,
                      note: Callable[[str], None]) -> None:  # fmt: skip
    """Every table of the new subscriptions copied (state r) and every apply worker up."""
    for database in dict.fromkeys(s.database for s in subscriptions):
        names = [s.name for s in subscriptions if s.database == database]
        old = await open_old(database, "connmgr reseed")
        try:
            ((total,),) = await _rows(old, "SELECT count(*) FROM pg_catalog.pg_subscription_rel r JOIN"
                                           " pg_catalog.pg_subscription s ON s.oid = r.srsubid"
                                           f" WHERE s.subname = ANY({_names(names)})")  # fmt: skip
            tables = int(total)
            await _wait(old, "SELECT count(*) FROM pg_catalog.pg_subscription_rel r JOIN"
                             " pg_catalog.pg_subscription s ON s.oid = r.srsubid"
                             f" WHERE s.subname = ANY({_names(names)}) AND r.srsubstate = 'r'",
                        tables, timeout, f"the copy of {database} ({tables} tables)",
                        lambda n, db=database, t=tables: note(f"{db}: {n} of {t} table(s) copied"))  # fmt: skip
            await _wait(old, "SELECT count(*) FROM pg_catalog.pg_stat_subscription st JOIN"
                             " pg_catalog.pg_subscription s ON s.oid = st.subid"
                             f" WHERE s.subname = ANY({_names(names)}) AND st.relid IS NULL AND st.pid IS NOT NULL",
                        len(names), timeout, f"the apply workers of {database}")  # fmt: skip
        finally:
            old.close()
