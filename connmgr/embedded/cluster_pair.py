"""An embedded primary/secondary pair of PostgreSQL clusters kept in sync by logical
replication (for ``connmgr demo``, tests and labs).

Layout
------
:meth:`ClusterPair.create` makes two :class:`~connmgr.embedded.clusters.Cluster` s, ``primary`` and
``secondary``, under one base directory, starts them, and in each listed database:

* on the primary: ``CREATE PUBLICATION <publication> FOR ALL TABLES``;
* on the secondary: ``CREATE SUBSCRIPTION <subscription>_<db> CONNECTION '<primary>'
  PUBLICATION <publication> WITH (copy_data = true, synchronous_commit = 'on')``.

A replication slot is global to the primary cluster, so each database's subscription has a
name (and therefore a slot name) of its own: ``connmgr_sub_app``, ``connmgr_sub_other``...

Synchronous mode
----------------
A subscription's apply worker connects to the primary with ``application_name`` = the
subscription name, so the primary can name it in ``synchronous_standby_names``. With
``synchronous=True`` the primary gets ``FIRST n ("connmgr_sub_a", "connmgr_sub_b", ...)``
with n = the number of databases: *every* subscription is a synchronous standby. (``FIRST
1`` would not do with several databases: a commit in database b would be released by a's
apply worker, which reports positions past b's transaction without applying it. ``ANY n``
would work too, but ``pg_stat_replication.sync_state`` then shows ``quorum``, not ``sync``.)

A logical subscriber reports an LSN as *flushed* only once the remote transaction ending
there has been applied and committed (and, with the subscription's ``synchronous_commit =
'on'``, flushed) on the secondary. So when a commit returns on the primary, its rows are
already visible on the secondary; ``tests/integration/test_cluster_pair.py`` checks this on every commit of a
run. The price: a write commit on the primary -- in *any* database of the primary, since
the subscribers' walsenders read all of its WAL -- waits for the secondary. **While the
secondary (or its apply worker) is down, every write commit on the primary hangs**, for as
long as it is down; read-only transactions (no xid) are unaffected. Cancelling the waiting
backend (``pg_cancel_backend``, ``statement_timeout``) ends the wait with a WARNING, but the
transaction has already committed locally. :meth:`ClusterPair.set_synchronous` turns the
mode off (which also releases every waiting commit) and back on: connmgr's policy for a
lost secondary builds on that.

Two gaps logical replication leaves, and what this module does about them:

* **DDL** is not replicated. :meth:`ClusterPair.sync_schema` runs it on both sides (the
  secondary first, so the apply worker never meets a table it does not have) and then
  ``ALTER SUBSCRIPTION ... REFRESH PUBLICATION`` so new tables are copied and followed; it
  waits until every table of the subscription is in state ``r`` (ready): until then the
  apply worker skips the table's changes (the copy carries them), and the "visible on
  commit" property does not hold for it.
* **Sequences** are not replicated in PostgreSQL 15. :meth:`ClusterPair.sync_sequences`
  sets each of the secondary's sequences *ahead* of the primary's (``last_value + margin``
  increments), so that after a switch the secondary never hands out a key the primary
  already used. Gaps in the key space are the accepted cost (Postgres itself skips up to
  32 values after a crash). It is a one-shot call here; keeping them ahead continuously
  (e.g. on every poster-queue batch) is left to the replication system.

Everything here blocks; call it from trio through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from connmgr.embedded.clusters import Cluster, ClusterError
from replay import markers

__all__ = ["ClusterPair", "PairError"]

#: Settings both clusters get (before the caller's ``settings``). A subscriber retries a
#: failed apply worker after ``wal_retrieve_retry_interval`` (default 5 s); a shorter one
#: shortens the time the primary's commits hang after the secondary comes back.
PAIR_SETTINGS: dict[str, str | int] = {
    "wal_retrieve_retry_interval": "200ms",
}

_NAMEDATALEN = 63


class PairError(ClusterError):
    """A pair operation failed or timed out; the message says which, and why (internal
    to the embedded harness, as ClusterError)."""


def _qualified(name: str) -> sql.Composable:
    """``schema.table`` or ``table`` as a quoted identifier (no quoting inside the parts)."""
    return sql.Identifier(*name.split(".", 1))


@dataclass
class ClusterPair:
    """A started primary and secondary cluster replicating ``databases`` logically.

    Make one with :meth:`create`; ``with ClusterPair.create(...) as pair:`` destroys it at
    the end. Fields are informational.
    """

    primary: Cluster
    secondary: Cluster
    publication: str = "connmgr"
    subscription: str = "connmgr_sub"
    synchronous: bool = True
    databases: tuple[str, ...] = ("app",)
    _destroyed: bool = field(default=False, init=False, repr=False)

    # ---------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        base_dir: Path,
        *,
        synchronous: bool = True,
        databases: Sequence[str] = ("app",),
        password: str | None = "postgres",
        host_auth: str = "scram-sha-256",
        settings: dict[str, str | int] | None = None,
        roles: dict[str, str | None] | None = None,
        publication: str = "connmgr",
        subscription: str = "connmgr_sub",
        bindir: Path | None = None,
        timeout: float = 10,
        places: dict[str, tuple[str, str, int]] | None = None,
        hba_extra: list[str] | None = None,
    ) -> ClusterPair:
        """Create and start clusters ``base_dir/primary`` and ``base_dir/secondary`` and
        set up replication of ``databases``; return the pair.

        Both clusters get the superuser ``postgres`` with ``password``, the ``roles``
        (name -> password or None; plain LOGIN roles), and the databases, owned by the
        superuser, with CREATE on schema public granted to PUBLIC. With ``synchronous``
        it waits up to ``timeout`` s for every subscription to show ``sync_state = 'sync'``
        on the primary. ``places`` puts a cluster (``"primary"``, ``"secondary"``) in a
        network namespace: name -> (namespace, address, port); the subscription then
        reaches the primary over TCP there. Raises :class:`ClusterError` (and leaves
        nothing running) on failure.
        """
        databases = tuple(databases)
        if not databases:
            raise PairError("a cluster pair needs at least one database")
        if len(set(databases)) != len(databases):
            raise PairError(f"duplicate database names in {databases}")
        for db in databases:
            if len(f"{subscription}_{db}".encode()) > _NAMEDATALEN:
                raise PairError(f"subscription name {subscription}_{db!r} is too long")
        base_dir = Path(base_dir)
        if not base_dir.exists():
            base_dir.mkdir(parents=True)
            base_dir.chmod(0o755)  # the server OS user must get through it when we are root
        merged = {**PAIR_SETTINGS, **(settings or {})}
        made: list[Cluster] = []
        pair: ClusterPair | None = None
        try:
            for name in ("primary", "secondary"):
                netns, host, port = (places or {}).get(name, (None, "127.0.0.1", None))
                cluster = Cluster.create(base_dir, name, password=password, host_auth=host_auth, settings=merged,
                                         bindir=bindir, netns=netns, host=host, port=port,
                                         hba_extra=hba_extra)  # fmt: skip
                made.append(cluster)
                cluster.start()
            primary, secondary = made
            pair = cls(primary, secondary, publication, subscription, synchronous=False,
                       databases=databases)  # fmt: skip
            for cluster in made:
                for role, role_password in (roles or {}).items():
                    cluster.create_role(role, role_password)
                for db in databases:
                    if db != "postgres":
                        cluster.create_database(db)
                    cluster.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname=db)
                    # purge markers: on both sides before the subscription (replay/markers.py)
                    cluster.psql(markers.SCHEMA_SQL, dbname=db)
            for db in databases:
                pair._execute(primary, db, sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(
                    sql.Identifier(publication)))  # fmt: skip
                pair._execute(secondary, db, sql.SQL(
                    "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {}"
                    " WITH (copy_data = true, synchronous_commit = 'on')"
                ).format(
                    sql.Identifier(pair.subscription_name(db)),
                    # No application_name in it: it would replace the subscription name
                    # the walsender is known by in synchronous_standby_names.
                    # connect_timeout: a DROP SUBSCRIPTION with the primary unreachable (a
                    # partition in the lab) gives up on its slot instead of waiting minutes
                    sql.Literal(primary.network_conninfo(db) + " connect_timeout=5"),
                    sql.Identifier(publication),
                ))  # fmt: skip
            pair.wait_tables_ready(timeout=timeout)
            if synchronous:
                pair.set_synchronous(True, timeout=timeout)
            return pair
        except BaseException:
            if pair is not None:
                pair.destroy()
            else:
                for cluster in made:
                    cluster.destroy()
            raise

    # ---------------------------------------------------------------- helpers

    def subscription_name(self, database: str) -> str:
        """The subscription (= slot = walsender application_name) of ``database``."""
        return f"{self.subscription}_{database}"

    @property
    def subscription_names(self) -> list[str]:
        return [self.subscription_name(db) for db in self.databases]

    def _execute(self, cluster: Cluster, database: str, query: Any,
                 params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:  # fmt: skip
        """Run one statement in autocommit on ``cluster``; return its rows (if any)."""
        try:
            with cluster.connect(database) as conn:
                cur = conn.execute(query, params)
                return cur.fetchall() if cur.description is not None else []
        except psycopg.Error as e:
            text = query.as_string(None) if isinstance(query, sql.Composable) else str(query)
            raise PairError(f"on cluster {cluster.name!r} (db {database}): {text}: {e}") from e

    def _wait(self, what: str, check, timeout: float, interval: float = 0.02) -> float:
        """Poll ``check()`` (returns (done, status)) until done; return the seconds taken."""
        start = time.monotonic()
        status: Any = None
        while True:
            done, status = check()
            if done:
                return time.monotonic() - start
            if time.monotonic() - start >= timeout:
                raise PairError(f"timed out after {timeout:g}s waiting for {what}: {status}")
            time.sleep(interval)

    # ---------------------------------------------------------------- replication state

    def replication_status(self) -> list[dict[str, Any]]:
        """The primary's ``pg_stat_replication`` rows of our subscriptions (application
        name, state, sync_state, sent/write/flush/replay LSNs as text)."""
        rows = self._execute(
            self.primary, "postgres",
            "SELECT application_name, state, sync_state, sent_lsn::text, write_lsn::text,"
            " flush_lsn::text, replay_lsn::text FROM pg_stat_replication"
            " WHERE application_name = ANY(%s) ORDER BY application_name",
            [self.subscription_names],
        )  # fmt: skip
        keys = ("application_name", "state", "sync_state", "sent_lsn", "write_lsn",
                "flush_lsn", "replay_lsn")  # fmt: skip
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def set_synchronous(self, on: bool, *, timeout: float = 10) -> None:
        """Make every subscription a synchronous standby of the primary (``on``) or none.

        ``on``: ``ALTER SYSTEM SET synchronous_standby_names = 'FIRST n ("sub", ...)'``,
        reload, and wait up to ``timeout`` s until each subscription's walsender shows
        ``sync_state = 'sync'``. Off: ``ALTER SYSTEM RESET`` and reload; the checkpointer
        then releases every commit waiting for the secondary.
        """
        if on:
            names = ", ".join('"' + n.replace('"', '""') + '"' for n in self.subscription_names)
            value = f"FIRST {len(self.subscription_names)} ({names})"
            query = sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
                sql.Literal(value))  # fmt: skip
        else:
            query = sql.SQL("ALTER SYSTEM RESET synchronous_standby_names")
        self._execute(self.primary, "postgres", query)
        self._execute(self.primary, "postgres", "SELECT pg_reload_conf()")
        self.synchronous = on
        if on:
            self.wait_sync(timeout=timeout)

    def wait_sync(self, timeout: float = 10) -> float:
        """Wait until every subscription is streaming with ``sync_state = 'sync'`` (only
        meaningful in synchronous mode); return the seconds it took."""
        want = set(self.subscription_names)

        def check():
            rows = self.replication_status()
            ok = {r["application_name"] for r in rows
                  if r["state"] == "streaming" and r["sync_state"] == "sync"}  # fmt: skip
            return want <= ok, rows

        return self._wait("the subscriptions to be synchronous standbys", check, timeout)

    def wait_tables_ready(self, database: str | None = None, timeout: float = 10) -> float:
        """Wait until every table of the subscription(s) is in state ``r`` (ready, i.e.
        copied and followed by the apply worker); return the seconds it took."""
        dbs = self.databases if database is None else (database,)

        def check():
            pending = []
            for db in dbs:
                pending += self._execute(
                    self.secondary, db,
                    "SELECT %s, sr.srrelid::regclass::text, sr.srsubstate"
                    " FROM pg_subscription_rel sr JOIN pg_subscription s ON s.oid = sr.srsubid"
                    " WHERE s.subname = %s AND sr.srsubstate <> 'r'",
                    [db, self.subscription_name(db)],
                )  # fmt: skip
            return not pending, pending

        return self._wait("subscription tables to be ready", check, timeout)

    def wait_caught_up(self, timeout: float = 10) -> float:
        """Wait until every subscription has confirmed (flushed, i.e. applied) the
        primary's ``pg_current_wal_lsn()`` as of the call; return the seconds it took."""
        start = time.monotonic()
        (target,) = self._execute(self.primary, "postgres",
                                  "SELECT pg_current_wal_lsn()::text")[0]  # fmt: skip
        want = set(self.subscription_names)

        def check():
            rows = self._execute(
                self.primary, "postgres",
                "SELECT application_name, flush_lsn::text, flush_lsn >= %s::pg_lsn"
                " FROM pg_stat_replication WHERE application_name = ANY(%s)",
                [target, self.subscription_names],
            )  # fmt: skip
            done = {name for name, _, ok in rows if ok}
            return want <= done, {"target": target, "flush": {n: f for n, f, _ in rows}}

        self._wait("the secondary to catch up", check, timeout)
        return time.monotonic() - start

    # ---------------------------------------------------------------- schema and data

    def sync_schema(self, database: str, ddl: str, *, timeout: float = 10) -> None:
        """Run ``ddl`` (one or more statements, as one implicit transaction) on the
        secondary, then on the primary, then refresh the subscription so new tables are
        copied and followed; wait until they are ready.

        The secondary goes first: a change for a table the subscriber lacks stops its
        apply worker, while one for a table it has but has not subscribed yet is skipped
        (the copy after the refresh carries it). If the DDL fails on the primary after
        succeeding on the secondary, :class:`PairError` says so; the schemas then differ.
        """
        self._check_database(database)
        self._execute(self.secondary, database, ddl)
        try:
            self._execute(self.primary, database, ddl)
        except PairError as e:
            raise PairError(f"{e} (the DDL was already applied on the secondary)") from e
        self._execute(self.secondary, database, sql.SQL(
            "ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = true)").format(
            sql.Identifier(self.subscription_name(database))))  # fmt: skip
        self.wait_tables_ready(database, timeout=timeout)

    def table_digest(self, cluster: Cluster, database: str, table: str) -> str:
        """md5 of the table's rows as text, in text order (md5 of '' for an empty table)."""
        query = sql.SQL(
            "SELECT coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), md5('')) FROM {} t"
        ).format(_qualified(table))
        return self._execute(cluster, database, query)[0][0]

    def sequence_values(self, cluster: Cluster, database: str) -> dict[str, int | None]:
        """``schema.sequence`` -> ``last_value`` of every sequence in ``database``
        (from ``pg_sequences``); None for a sequence whose nextval was never called."""
        rows = self._execute(cluster, database,
                             "SELECT schemaname || '.' || sequencename, last_value"
                             " FROM pg_sequences ORDER BY 1")  # fmt: skip
        return dict(rows)

    def sync_sequences(self, database: str, *, margin: int = 1000) -> dict[str, int]:
        """Set each sequence of the secondary ``margin`` increments ahead of the primary's.

        PostgreSQL 15 logical replication does not carry sequences, so after a switch the
        secondary's sequences would hand out keys the primary already used. Here each
        secondary sequence goes to ``primary last_value + margin * increment`` (clamped to
        its bounds; never moved backwards), ``is_called`` true, so its next value is
        beyond anything the primary had handed out when this ran, plus room for ``margin``
        more. Sequences the primary never used are left alone. One-shot: calling it
        often enough (or at switch time) is the caller's business. Returns the values set.
        Raises :class:`PairError` if the secondary lacks one of the primary's sequences.
        """
        self._check_database(database)
        query = ("SELECT schemaname || '.' || sequencename, last_value, increment_by,"
                 " min_value, max_value FROM pg_sequences")  # fmt: skip
        primary = {r[0]: r[1:] for r in self._execute(self.primary, database, query)}
        secondary = {r[0]: r[1:] for r in self._execute(self.secondary, database, query)}
        missing = sorted(set(primary) - set(secondary))
        if missing:
            raise PairError(f"sequences missing on the secondary (db {database}): {missing}")
        updates: dict[str, int] = {}
        for name, (last, inc, _, _) in sorted(primary.items()):
            if last is None:
                continue
            cur, _, lo, hi = secondary[name]
            target = min(max(last + margin * inc, lo), hi)
            if cur is not None and (cur >= target if inc > 0 else cur <= target):
                continue  # already far enough ahead
            updates[name] = target
        if updates:
            with self.secondary.connect(database) as conn, conn.transaction():
                for name, value in updates.items():
                    conn.execute("SELECT setval(%s::regclass, %s, true)",
                                 [_qualified(name).as_string(conn), value])  # fmt: skip
        return updates

    def _check_database(self, database: str) -> None:
        if database not in self.databases:
            raise PairError(f"database {database!r} is not replicated by this pair "
                            f"({', '.join(self.databases)})")  # fmt: skip

    # ---------------------------------------------------------------- teardown

    def drop_subscriptions(self) -> None:
        """Leave synchronous mode, drop the subscriptions (and so their slots on the
        primary), and drop any of their slots left on the primary. Best effort: a
        cluster that is down is skipped (destroying it takes its slots with it)."""
        if self.primary.is_running():
            with contextlib.suppress(ClusterError):
                self.set_synchronous(False)
        if self.secondary.is_running():
            for db in self.databases:
                sub = sql.Identifier(self.subscription_name(db))
                try:
                    if not self.primary.is_running():  # the drop would wait to reach its slot
                        raise ClusterError("the primary is down")
                    self._execute(
                        self.secondary, db, sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(sub)
                    )
                except ClusterError:
                    # The primary is unreachable: detach the slot, then drop.
                    with contextlib.suppress(ClusterError):
                        for stmt in ("ALTER SUBSCRIPTION {} DISABLE",
                                     "ALTER SUBSCRIPTION {} SET (slot_name = NONE)",
                                     "DROP SUBSCRIPTION IF EXISTS {}"):  # fmt: skip
                            self._execute(self.secondary, db, sql.SQL(stmt).format(sub))
        if self.primary.is_running():

            def leftover_slots():
                rows = self._execute(self.primary, "postgres",
                                     "SELECT slot_name, active FROM pg_replication_slots"
                                     " WHERE slot_name = ANY(%s)",
                                     [self.subscription_names])  # fmt: skip
                for slot, active in rows:
                    if not active:
                        with contextlib.suppress(ClusterError):
                            self._execute(
                                self.primary,
                                "postgres",
                                "SELECT pg_drop_replication_slot(%s)",
                                [slot],
                            )
                return not rows, rows

            with contextlib.suppress(ClusterError):
                self._wait("the subscriptions' slots to go", leftover_slots, 5, 0.1)

    def destroy(self) -> None:
        """Drop the subscriptions first (so the primary's slots go with them), then
        destroy both clusters. Idempotent."""
        if self._destroyed:
            return
        try:
            self.drop_subscriptions()
        finally:
            try:
                self.secondary.destroy()
            finally:
                self.primary.destroy()
                self._destroyed = True

    def __enter__(self) -> ClusterPair:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()
