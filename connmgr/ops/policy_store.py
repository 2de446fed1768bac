"""``connmgr policy push|status`` and ``connmgr maintenance begin|end --store``: the
policy store (shadow/policy/activation.py) from the command line, with psycopg on the
primary database.

``push FILE`` validates the file as every connmgr will (``--no-check`` skips it: the keys a
mask hashes with may live only on the connmgr hosts), creates the store if it is not
there, and adds the file as the newest version: the connmgrs stage it at their next
cycle, approve it at the one after, and all activate it one interval later. ``status``
prints the sync row, every member and the staging results.
"""

from __future__ import annotations

import time

from shadow.policy.activation import (
    INTERVAL_MAX,
    INTERVAL_MIN,
    MEMBER_LIVES,
    STORE_DDL,
    SYNC_COLUMNS,
    in_effect,
    parse_sync,
)
from shadow.policy.rules import PolicyError, load_policy

__all__ = ["maintenance", "push", "status"]


def _connect(conninfo: str):
    import psycopg

    return psycopg.connect(conninfo, autocommit=True, application_name="connmgr policy")


def push(conninfo: str, path: str, *, interval: float | None = None, note: str = "", check: bool = True,
         secondary: str = "") -> str:  # fmt: skip
    """Add the policy in ``path`` to the store as its newest version; the line to print.
    ``secondary``: the pair's secondary database (its subscription carries the store: the
    tables are made there too, and the subscriptions refreshed to follow them). Raises
    PolicyError (the file), psycopg.Error (the database)."""
    if interval is not None and not INTERVAL_MIN <= interval <= INTERVAL_MAX:  # (nan too)
        raise PolicyError(f"--interval: seconds between two activations, {INTERVAL_MIN:g} to {INTERVAL_MAX:g};"
                          f" got {interval!r}")  # fmt: skip
    if check:
        load_policy(path)
    with open(path, encoding="utf-8") as f:
        body = f.read()
    if secondary:
        _tables_on_secondary(secondary)
    with _connect(conninfo) as c:
        if c.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
            raise PolicyError(f"{_where(conninfo)} is a standby: push to the primary database")
        if _exists(c) and c.execute("SELECT EXISTS (SELECT FROM pg_subscription_rel r JOIN pg_subscription s ON"
                                    " s.oid = r.srsubid WHERE s.subenabled AND r.srrelid ="
                                    " 'connmgr.policy_sync'::regclass)").fetchone()[0]:  # fmt: skip
            raise PolicyError(f"the store in {_where(conninfo)} is a subscriber's copy (the pair's secondary):"
                              " push to the primary database, whose rows it receives")  # fmt: skip
        if not secondary and not _exists(c) and c.execute("SELECT EXISTS (SELECT FROM pg_publication WHERE"
                                                          " puballtables)").fetchone()[0]:  # fmt: skip
            raise PolicyError(f"the database of {_where(conninfo)} publishes all its tables (a pair's): give --secondary"
                              " CONNINFO of the secondary database, so the store's tables are made there first --"
                              " without them its subscription would stop at the first row (and with it every"
                              " synchronous commit)")  # fmt: skip
        with c.transaction():
            c.execute(STORE_DDL)
            c.execute("INSERT INTO connmgr.policy_sync (activation, \"interval\") VALUES"
                      " (extract(epoch FROM clock_timestamp()), %s) ON CONFLICT DO NOTHING", (interval or 30.0,))  # fmt: skip
            (every,) = c.execute('SELECT "interval" FROM connmgr.policy_sync FOR UPDATE').fetchone()
            if interval is not None and interval != every:
                c.execute("UPDATE connmgr.policy_sync SET \"interval\" = %s", (interval,))
                every = interval
            (version,) = c.execute("INSERT INTO connmgr.policy_versions (version, body, note) SELECT"
                                   " coalesce(max(version), 0) + 1, %s, %s FROM connmgr.policy_versions"
                                   " RETURNING version", (body, note)).fetchone()  # fmt: skip
    if secondary:
        _subscribe_on_secondary(secondary)
    return (f"policy version {version} pushed ({path}): staged by every connmgr at its next cycle, active everywhere"
            f" in {2 * every:g}-{3 * every:g} s unless a connmgr cannot stage it (connmgr policy status)")


def _exists(c) -> bool:
    return c.execute("SELECT to_regclass('connmgr.policy_sync') IS NOT NULL").fetchone()[0]


def _where(conninfo: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(conninfo)
    return f"{d.get('host', 'localhost')}:{d.get('port', 5432)}/{d.get('dbname', '')}"


def _tables_on_secondary(conninfo: str) -> None:
    """The store's tables on the pair's secondary database, before the primary has them:
    a subscription that receives a row of a table its database lacks stops."""
    with _connect(conninfo) as s:
        if not _exists(s):
            s.execute(STORE_DDL)


def _subscribe_on_secondary(conninfo: str) -> None:
    """The secondary database's subscriptions told of the store's tables (their rows
    copied, then followed), once."""
    from psycopg import sql

    with _connect(conninfo) as s:
        if s.execute("SELECT EXISTS (SELECT FROM pg_subscription_rel WHERE srrelid ="
                     " 'connmgr.policy_sync'::regclass)").fetchone()[0]:  # fmt: skip
            return
        subscriptions = [name for (name,) in s.execute(
            "SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database()) AND subenabled")]  # fmt: skip
        for name in subscriptions:
            s.execute(sql.SQL("ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = true)").format(
                sql.Identifier(name)))


def status(conninfo: str) -> str:
    """The store as a report (sync row, members, staging of the versions in play)."""
    with _connect(conninfo) as c:
        if not _exists(c):
            return "no policy store here (nothing was pushed: connmgr policy push FILE)"
        now = float(c.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])
        row = c.execute(f"SELECT {SYNC_COLUMNS} FROM connmgr.policy_sync").fetchone()
        if row is None:
            return "the policy store has no sync row (push a version to create it)"
        sync = parse_sync(tuple(None if v is None else str(v).encode() for v in row))
        lines = [f"in effect: version {in_effect(sync, now)}",
                 f"next:      {sync.next} (activation in {sync.activation - now:.1f} s)" if sync.next is not None else
                 f"next:      none (next cycle in {sync.activation - now:.1f} s)",
                 f"staged:    {sync.staged}", f"interval:  {sync.interval:g} s"]  # fmt: skip
        if sync.failed is not None:
            lines.append(f"refused:   version {sync.failed}: {sync.failure}")
        lines.append("members:")
        for member, seen, active in c.execute("SELECT member, seen, active FROM connmgr.policy_members ORDER BY member"):
            live = "live" if seen >= now - MEMBER_LIVES * sync.interval else "gone"
            lines.append(f"  {member}: {live}, seen {now - seen:.1f} s ago, using version {active}")
        versions = [v for v in (sync.staged, sync.failed) if v is not None]
        for version in versions:
            for member, ok, error in c.execute("SELECT member, ok, error FROM connmgr.policy_staging"
                                               " WHERE version = %s ORDER BY member", (version,)):  # fmt: skip
                lines.append(f"  version {version} on {member}: {'staged' if ok else 'FAILED: ' + error}")
        lines.append("versions:")
        for version, pushed, by, note in c.execute("SELECT version, pushed_at, pushed_by, note FROM"
                                                   " connmgr.policy_versions ORDER BY version DESC LIMIT 5"):  # fmt: skip
            lines.append(f"  {version}: {pushed:%Y-%m-%d %H:%M:%S} by {by}{' -- ' + note if note else ''}")
    return "\n".join(lines)


def maintenance(conninfo: str, action: str, obj: str, *, by: str = "", wait: float = 30.0) -> tuple[bool, str]:
    """``obj`` under maintenance fleet-wide (``action`` "begin") or no longer ("end"):
    written to the store, then waited for until every live connmgr holds (or no longer
    holds) statements on it. (held everywhere in time, the report to print). Raises
    PolicyError (the object, or no store), psycopg.Error (the database)."""
    from shadow.policy.maintenance import DEFAULT_BY
    from shadow.policy.rules import ObjectPattern

    text = ObjectPattern.parse(obj, "maintenance").text.strip()
    with _connect(conninfo) as c:
        if not _exists(c):
            raise PolicyError(f"no policy store in {_where(conninfo)}: create it with connmgr policy push (an empty"
                              " file is a policy of no classes)")  # fmt: skip
        if action == "begin":
            c.execute("INSERT INTO connmgr.policy_maintenance (object, by, since) VALUES (%s, %s,"
                      " extract(epoch FROM clock_timestamp())) ON CONFLICT (object) DO UPDATE SET by = excluded.by",
                      (text, by or DEFAULT_BY))  # fmt: skip
        else:
            c.execute("DELETE FROM connmgr.policy_maintenance WHERE lower(object) = lower(%s)", (text,))
        key = text.lower()
        deadline = time.monotonic() + wait
        while True:
            now, every = c.execute("SELECT extract(epoch FROM clock_timestamp()), \"interval\" FROM"
                                   " connmgr.policy_sync").fetchone()  # fmt: skip
            members = c.execute("SELECT member, maintenance FROM connmgr.policy_members WHERE seen >= %s"
                                " ORDER BY member", (float(now) - MEMBER_LIVES * every,)).fetchall()  # fmt: skip
            holding = [m for m, held in members if key in (o.lower() for o in held.split("\n"))]
            late = [m for m, _held in members if (m in holding) != (action == "begin")]
            if not late or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    what = "under maintenance" if action == "begin" else "no longer under maintenance"
    if late:
        return False, (f"{text}: {what} in the store, but after {wait:g} s not yet on {len(late)} of {len(members)}"
                       f" connmgr(s): {', '.join(late)}")  # fmt: skip
    verb = "held" if action == "begin" else "let go"
    return True, f"{text}: {what} -- statements on it {verb} by every connmgr ({len(members)}: " + ", ".join(
        m for m, _ in members) + ")"


def conninfo_of(config) -> str:
    """The store's connection string from a connmgr configuration ([primary], [redo],
    [policy] store_database)."""
    from psycopg.conninfo import make_conninfo

    r = config.redo
    return make_conninfo(host=config.primary.host, port=config.primary.port, user=r.user,
                         password=r.password or None, dbname=config.policy.store_database or r.dbname)  # fmt: skip

