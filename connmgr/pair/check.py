"""``connmgr pair check``: does a pair keep its guarantee right now?

Read-only checks of the two databases of a pair (libpq connection strings, a superuser or
a role that reads the catalogs on both), each a :class:`Finding` that names the setting
and the fix. ``fail`` findings break the guarantee (an acknowledged commit could be lost
at a failover, or a write would hang); ``warn`` findings are weaker than they should be or
leave something to connmgr's overrides.

What is checked, and why:

* ``wal_level = logical`` on both (the subscription needs it on the primary; a re-seed
  turns the pair around and needs it on the secondary).
* ``synchronous_standby_names`` on the primary names *every* subscription of the pair
  and waits for all of them (``FIRST n`` or ``ANY n`` with n = their number); each is
  connected and shown ``sync``/``quorum`` in ``pg_stat_replication``.
* every subscription is enabled and has ``synchronous_commit = on`` (or
  ``remote_apply``): its apply worker confirms only what it committed and flushed.
* the primary's own ``synchronous_commit``: weaker values are overridden by connmgr for
  the sessions it carries (warn: writers that bypass connmgr are not protected).
* connmgr's schema is current on both sides (``connmgr prepare-db``), and the primary has
  the ``connmgr_poster`` publication the secondary connmgr's poster slot decodes.
* every table the primary publishes is ready (``r``) in the secondary's subscription: a
  table being copied, or not subscribed at all, has its changes skipped by the apply
  worker while the standby still confirms commits.
* every sequence of the secondary is ahead of the primary's (the smallest margin shown).
* the secondary's ``wal_retrieve_retry_interval`` (how soon a failed apply worker retries).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from replay import markers

__all__ = ["Finding", "check_pair", "format_findings", "parse_standby_names"]


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  #: "ok", "warn" or "fail"
    what: str
    detail: str = ""
    fix: str = ""


_STANDBY = re.compile(r"^\s*(?:(FIRST|ANY)\s+)?(?:(\d+)\s*)?\((.*)\)\s*$", re.IGNORECASE | re.DOTALL)


def parse_standby_names(value: str) -> tuple[str, int, list[str]]:
    """``synchronous_standby_names`` as (method, number, names): ``FIRST 2 (a, b)``,
    ``ANY 1 (a, b)``, or the old list form ``a, b`` (= ``FIRST 1``). Names are unquoted."""
    m = _STANDBY.match(value)
    if m is not None and (m.group(1) or m.group(2)):
        method, num, body = (m.group(1) or "FIRST").upper(), int(m.group(2) or 1), m.group(3)
    else:
        method, num, body = "FIRST", 1, value
    names = []
    for part in re.findall(r'"(?:[^"]|"")*"|[^,\s]+', body):
        names.append(part[1:-1].replace('""', '"') if part.startswith('"') else part.lower())
    return method, num, [n for n in names if n]


def _one(conn: psycopg.Connection, sql: str, *params):
    return conn.execute(sql, params or None).fetchone()[0]


def check_pair(primary_dsn: str, secondary_dsn: str, databases: Sequence[str]) -> list[Finding]:
    """Every finding for the pair whose databases ``databases`` are reached by the two
    connection strings (``dbname`` replaced per database). Raises psycopg.Error if a
    server cannot be reached."""
    out: list[Finding] = []
    subs: list[tuple[str, str, bool, str]] = []  # (name, database, enabled, synchronous_commit)
    for db in databases:
        with psycopg.connect(primary_dsn, dbname=db, autocommit=True) as p, \
                psycopg.connect(secondary_dsn, dbname=db, autocommit=True) as s:  # fmt: skip
            if db == databases[0]:
                _server_checks(p, s, out)
            for side, conn in (("primary", p), ("secondary", s)):
                if not _one(conn, markers.CHECK_SQL):
                    out.append(Finding("fail", f"{db}: connmgr's schema on the {side} is missing or old",
                                       "", f"connmgr prepare-db '{conn.info.dsn}'"))  # fmt: skip
            if not _one(p, "SELECT count(*) FROM pg_catalog.pg_publication WHERE pubname = %s",
                        markers.POSTER_PUBLICATION):  # fmt: skip
                out.append(Finding("fail", f"{db}: no publication {markers.POSTER_PUBLICATION} on the primary",
                                   "the secondary connmgr's poster slot decodes it", "connmgr prepare-db"))  # fmt: skip
            rows = s.execute(
                "SELECT subname, subenabled, subsynccommit, subpublications FROM pg_catalog.pg_subscription"
                " WHERE subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())"
            ).fetchall()  # fmt: skip
            if not rows:
                out.append(Finding("fail", f"{db}: the secondary has no subscription",
                                   "", "CREATE SUBSCRIPTION ... WITH (synchronous_commit = on), or connmgr pair setup"))  # fmt: skip
            for name, enabled, sync, pubs in rows:
                subs.append((name, db, enabled, sync))
                _table_checks(p, s, db, name, list(pubs), out)
            _sequence_checks(p, s, db, out)
    with psycopg.connect(primary_dsn, dbname=databases[0], autocommit=True) as p:
        _standby_checks(p, subs, out)
    for name, db, enabled, sync in subs:
        if not enabled:
            out.append(Finding("fail", f"{db}: subscription {name} is disabled", "", f"ALTER SUBSCRIPTION {name} ENABLE"))
        if sync not in ("on", "remote_apply"):
            out.append(Finding("fail", f"{db}: subscription {name} has synchronous_commit = {sync}",
                               "its apply worker confirms commits it has not flushed",
                               f"ALTER SUBSCRIPTION {name} SET (synchronous_commit = on)"))  # fmt: skip
    if not any(f.level != "ok" for f in out):
        out.append(Finding("ok", "every check passed", f"{len(subs)} subscription(s), {len(databases)} database(s)"))
    return out


def check_running_pair(primary_dsn: str, secondary_dsn: str) -> list[Finding]:
    """:func:`check_pair` for every database the secondary subscribes in (the admin
    console's PAIR CHECK: it knows the two servers, not the databases)."""
    with psycopg.connect(secondary_dsn, autocommit=True) as s:
        databases = [row[0] for row in s.execute(
            "SELECT DISTINCT d.datname FROM pg_catalog.pg_subscription s"
            " JOIN pg_catalog.pg_database d ON d.oid = s.subdbid ORDER BY 1")]  # fmt: skip
    if not databases:
        return [Finding("fail", "the secondary has no subscription in any database", "",
                        "connmgr pair setup, or CREATE SUBSCRIPTION ... WITH (synchronous_commit = on)")]  # fmt: skip
    return check_pair(primary_dsn, secondary_dsn, databases)


def _server_checks(p: psycopg.Connection, s: psycopg.Connection, out: list[Finding]) -> None:
    for side, conn in (("primary", p), ("secondary", s)):
        level = _one(conn, "SELECT current_setting('wal_level')")
        if level != "logical":
            out.append(Finding("fail", f"wal_level = {level} on the {side}", "logical replication needs logical",
                               "ALTER SYSTEM SET wal_level = logical, then restart"))  # fmt: skip
    sync = _one(p, "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'synchronous_commit'")
    if sync not in ("on", "remote_apply"):
        out.append(Finding("warn", f"synchronous_commit = {sync} on the primary",
                           "connmgr runs the sessions it carries with on; writers that bypass connmgr are not protected",
                           "ALTER SYSTEM SET synchronous_commit = on; SELECT pg_reload_conf()"))  # fmt: skip
    retry = _one(s, "SELECT setting::int FROM pg_catalog.pg_settings WHERE name = 'wal_retrieve_retry_interval'")
    if retry > 1000:
        out.append(Finding("warn", f"wal_retrieve_retry_interval = {retry}ms on the secondary",
                           "an apply worker that failed waits this long before it retries (every write waits too)",
                           "ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'; SELECT pg_reload_conf()"))  # fmt: skip


def _standby_checks(p: psycopg.Connection, subs: list, out: list[Finding]) -> None:
    value = _one(p, "SELECT current_setting('synchronous_standby_names')")
    names = sorted({name for name, *_ in subs})
    fix = f"ALTER SYSTEM SET synchronous_standby_names = 'FIRST {len(names)} ({', '.join(names)})'; SELECT pg_reload_conf()"
    if not value.strip():
        out.append(Finding("fail", "synchronous_standby_names is empty on the primary",
                           "no commit waits for the secondary", fix))  # fmt: skip
        return
    _method, num, listed = parse_standby_names(value)
    missing = [n for n in names if n not in listed]
    if missing or num < len(listed):  # with fewer, another standby may confirm in ours' place
        out.append(Finding("fail", f"synchronous_standby_names = {value!r} on the primary",
                           f"every subscription must be waited for (missing: {', '.join(missing) or 'none'};"
                           f" waits for {num} of {len(listed)} listed)", fix))  # fmt: skip
    states = dict(p.execute("SELECT application_name, sync_state FROM pg_catalog.pg_stat_replication").fetchall())
    for n in names:
        if states.get(n) not in ("sync", "quorum"):
            out.append(Finding("fail", f"subscription {n} is {states.get(n) or 'not connected'} on the primary",
                               "pg_stat_replication must show it sync", "look at the secondary's server log"))  # fmt: skip


def _table_checks(p: psycopg.Connection, s: psycopg.Connection, db: str, sub: str, pubs: list[str],
                  out: list[Finding]) -> None:  # fmt: skip
    published = {f"{r[0]}.{r[1]}" for r in p.execute(
        "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables WHERE pubname = ANY(%s)", (pubs,))}  # fmt: skip
    state = dict(s.execute(
        "SELECT n.nspname || '.' || c.relname, r.srsubstate FROM pg_catalog.pg_subscription_rel r"
        " JOIN pg_catalog.pg_subscription u ON u.oid = r.srsubid AND u.subname = %s"
        " JOIN pg_catalog.pg_class c ON c.oid = r.srrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
        (sub,)).fetchall())  # fmt: skip
    not_ready = sorted(f"{t} ({state.get(t, 'not subscribed')})" for t in published if state.get(t) != "r")
    if not_ready:
        out.append(Finding("fail", f"{db}: {len(not_ready)} table(s) not ready in subscription {sub}",
                           ", ".join(not_ready[:10]) + (" ..." if len(not_ready) > 10 else ""),
                           f"wait for the copy, or ALTER SUBSCRIPTION {sub} REFRESH PUBLICATION"))  # fmt: skip
    else:
        out.append(Finding("ok", f"{db}: all {len(published)} published table(s) ready in {sub}"))


def _sequence_checks(p: psycopg.Connection, s: psycopg.Connection, db: str, out: list[Finding]) -> None:
    read = "SELECT schemaname || '.' || sequencename, last_value, increment_by, start_value FROM pg_catalog.pg_sequences"
    theirs = {r[0]: (r[1] if r[1] is not None else r[3] - r[2]) for r in s.execute(read)}
    margins = []
    for name, last, inc, start in p.execute(read):
        handed = last if last is not None else start - inc
        if name not in theirs:
            margins.append((-(10**18), name))
            continue
        margins.append(((theirs[name] - handed) // inc, name))
    if not margins:
        return
    margin, name = min(margins)
    if margin <= 0:
        out.append(Finding("fail", f"{db}: sequence {name} of the secondary is not ahead of the primary's",
                           f"margin {margin} increments" if margin > -(10**18) else "missing on the secondary",
                           "run the secondary connmgr ([poster] sequence_interval > 0), or raise sequence_lead"))  # fmt: skip
    else:
        out.append(Finding("ok", f"{db}: {len(margins)} sequence(s) ahead", f"smallest margin {margin} ({name})"))


def format_findings(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[f.level]
        lines.append(f"{mark}  {f.what}" + (f": {f.detail}" if f.detail else ""))
        if f.fix and f.level != "ok":
            lines.append(f"      fix: {f.fix}")
    return "\n".join(lines)
