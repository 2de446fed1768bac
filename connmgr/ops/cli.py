"""``connmgr`` command line: ``serve`` runs the proxy, ``demo`` shows it working,
``prepare-db`` installs what purge markers need in a database, ``switchover`` moves every
session of a running primary connmgr to the secondary database (planned)."""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from connmgr import config as config_mod
from connmgr.errors import ConfigError


def _serve_overrides(args: argparse.Namespace) -> dict[str, dict]:
    server: dict = {}
    primary: dict = {}
    if args.listen:
        server["listen"] = args.listen
    if args.max_clients is not None:
        server["max_clients"] = args.max_clients
    if args.relay:
        server["relay"] = args.relay
    if args.workers is not None:
        server["workers"] = args.workers
    if args.primary:
        host, port = config_mod.parse_hostport(args.primary, default_port=5432, what="--primary")
        primary.update(host=host, port=port)
    out: dict[str, dict] = {"server": server, "primary": primary}
    if args.users_file:
        out["auth"] = {"users_file": args.users_file}
    if args.auth_type:
        out.setdefault("auth", {})["type"] = args.auth_type
    if args.metrics_listen:
        out["metrics"] = {"listen": args.metrics_listen}
    if args.policy:
        out["policy"] = {"file": args.policy}
    return {k: v for k, v in out.items() if v}


def cmd_serve(args: argparse.Namespace) -> int:
    from connmgr.app import serve

    try:
        cfg = config_mod.load(args.config, **_serve_overrides(args))
    except ConfigError as e:
        print(f"connmgr: configuration error: {e}", file=sys.stderr)
        return 2
    return _run_server("connmgr", serve, cfg)


def cmd_worker(args: argparse.Namespace) -> int:
    """``connmgr _worker FD``: started by a supervisor ([server] workers), not by hand."""
    from connmgr.app import serve_worker

    return _run_server("connmgr worker", serve_worker, args.fd)


def _run_server(name: str, main, *args) -> int:
    """``trio.run(main, *args)``, its start-up failures as one line and an exit code."""
    from connmgr.workers.supervisor import WorkerStartError

    try:
        trio.run(main, *args)
    except ConfigError as e:  # (a worker loads its configuration inside the run)
        print(f"{name}: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{name}: cannot listen: {e}", file=sys.stderr)
        return 1
    except WorkerStartError as e:
        print(f"{name}: {e}; its log lines above say why", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util

    from connmgr.embedded.demo import run_demo
    from connmgr.embedded.timeline_image import INSTALL_HINT

    if args.picture and importlib.util.find_spec("matplotlib") is None:
        print(f"connmgr demo: --picture needs matplotlib: {INSTALL_HINT}", file=sys.stderr)
        return 2
    return run_demo(json_output=args.json, clients=args.clients, seconds=args.seconds, mode=args.mode,
                    picture=args.picture)  # fmt: skip


def cmd_prepare_db(args: argparse.Namespace) -> int:
    from replay import markers

    if args.print:
        print(markers.SCHEMA_SQL.strip())
        return 0
    import psycopg

    for dsn in args.conninfo:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(markers.SCHEMA_SQL)
                ok = conn.execute(markers.CHECK_SQL).fetchone()[0]
                where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
        except psycopg.Error as e:
            print(f"connmgr prepare-db: {dsn!r}: {e}".rstrip(), file=sys.stderr)
            return 1
        print(f"{where}: connmgr.markers and connmgr.mark() {'ready' if ok else 'MISSING'}")
        if not ok:
            return 1
    return 0


def _console_rows(args: argparse.Namespace, name: str, sql: str) -> list | None:
    """The rows of ``sql`` on the admin console of the connmgr at ``args.connmgr``; None
    (the error printed) if it failed."""
    import psycopg

    host, port = config_mod.parse_hostport(args.connmgr, default_port=6432, what="connmgr address")
    try:
        with psycopg.connect(host=host, port=port, user=args.user, dbname="connmgr", autocommit=True,
                             connect_timeout=10) as conn:  # fmt: skip
            return conn.execute(sql).fetchall()
    except psycopg.Error as e:
        code = getattr(e, "sqlstate", None) or "connect"
        print(f"connmgr {name}: {code}: {str(e).strip()}", file=sys.stderr)
        return None


def _admin_command(args: argparse.Namespace, name: str, sql: str) -> int:
    """Run ``sql`` on the admin console of the primary connmgr; print its timeline."""
    rows = _console_rows(args, name, sql)
    if rows is None:
        return 1
    for ms, event in rows:
        print(f"{float(ms):9.1f} ms  {event}")
    return 0


def cmd_switchover(args: argparse.Namespace) -> int:
    """SWITCHOVER on the admin console of the primary connmgr; prints its timeline."""
    return _admin_command(args, "switchover", "SWITCHOVER" if args.drain is None else f"SWITCHOVER {args.drain:g}")


def cmd_reseed(args: argparse.Namespace) -> int:
    """RESEED on the admin console of the primary connmgr; prints its timeline."""
    return _admin_command(args, "reseed", "RESEED")


def cmd_maintenance(args: argparse.Namespace) -> int:
    """MAINTENANCE BEGIN|END on a connmgr's admin console; prints the entry."""
    if not args.object.strip() or any(c.isspace() for c in args.object.strip()):
        print(f"connmgr maintenance: {args.object!r} is not an object (schema.table, table, function:name)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.store:
        return _maintenance_in_store(args)
    sql = f"MAINTENANCE {args.action.upper()} {args.object.strip()}"
    if args.action == "begin" and args.by:
        sql += f" BY {args.by}"
    rows = _console_rows(args, "maintenance", sql)
    if rows is None:
        return 1
    for obj, by, since in rows:
        verb = "under maintenance since" if args.action == "begin" else "no longer under maintenance (since"
        print(f"{obj}: {verb} {since}{')' if args.action == 'end' else ''}; the job's sessions: {by}")
    return 0


def _maintenance_in_store(args: argparse.Namespace) -> int:
    import psycopg

    from connmgr.ops import policy_store
    from shadow.policy.rules import PolicyError

    try:
        ok, report = policy_store.maintenance(args.store, args.action, args.object, by=args.by, wait=args.wait)
    except PolicyError as e:
        print(f"connmgr maintenance: {e}", file=sys.stderr)
        return 2
    except psycopg.Error as e:
        print(f"connmgr maintenance: the store's database: {e}", file=sys.stderr)
        return 1
    print(report, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_policy(args: argparse.Namespace) -> int:
    """``policy push FILE`` / ``policy status``: the policy store in the primary database."""
    import psycopg

    from connmgr.ops import policy_store
    from shadow.policy.rules import PolicyError

    conninfo = args.conninfo
    if args.config:
        try:
            conninfo = policy_store.conninfo_of(config_mod.load(args.config))
        except ConfigError as e:
            print(f"connmgr policy: {e}", file=sys.stderr)
            return 2
    name = f"connmgr policy {args.policy_command}"
    try:
        if args.policy_command == "push":
            print(policy_store.push(conninfo, args.file, interval=args.interval, note=args.note, check=args.check,
                                    secondary=args.secondary))  # fmt: skip
        else:
            print(policy_store.status(conninfo))
    except PolicyError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as e:
        print(f"{name}: cannot read {getattr(args, 'file', '')}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    except psycopg.Error as e:
        print(f"{name}: the store's database: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_pair_check(args: argparse.Namespace) -> int:
    """Check that a pair keeps its guarantee now; exit 1 on any failed check."""
    import psycopg

    from connmgr.pair.check import check_pair, format_findings

    try:
        findings = check_pair(args.primary, args.secondary, args.databases.split(","))
    except psycopg.Error as e:
        print(f"connmgr pair check: {str(e).strip()}", file=sys.stderr)
        return 2
    print(format_findings(findings))
    return 1 if any(f.level == "fail" for f in findings) else 0


def cmd_pair_setup(args: argparse.Namespace) -> int:
    """Set up a pair of running databases, write the two TOML files, then check it."""
    from pathlib import Path

    import psycopg

    from connmgr.pair.check import format_findings
    from connmgr.pair.setup import SetupError, setup_pair

    try:
        findings = setup_pair(args.primary, args.secondary, args.databases.split(","), Path(args.out),
                              listen=args.listen, mirror=args.mirror)  # fmt: skip
    except (SetupError, psycopg.Error) as e:
        print(f"connmgr pair setup: {str(e).strip()}", file=sys.stderr)
        return 1
    print(format_findings(findings))
    return 1 if any(f.level == "fail" for f in findings) else 0


def _admin_subcommand(sub, name: str, func, **text: str) -> argparse.ArgumentParser:
    """A command run on the primary connmgr's admin console (connmgr address, admin user)."""
    a = sub.add_parser(name, **text)
    a.add_argument("connmgr", nargs="?", default="127.0.0.1:6432", help="HOST:PORT of the primary connmgr")
    a.add_argument("-U", "--user", default="postgres", help="admin user (default postgres)")
    a.set_defaults(func=func)
    return a


def _pair_subcommand(sub, name: str, func, **text: str) -> argparse.ArgumentParser:
    """A ``connmgr pair`` command on the two databases (connection strings, databases)."""
    a = sub.add_parser(name, **text)
    a.add_argument("primary", help="libpq connection string of the primary (a superuser)")
    a.add_argument("secondary", help="libpq connection string of the secondary (a superuser)")
    a.add_argument("--databases", default="postgres", help="comma-separated databases of the pair")
    a.set_defaults(func=func)
    return a


def _version() -> str:
    """``connmgr 0.1.0 (hot path: compiled)``: the version, and whether the relay's hot
    modules run compiled (see shadow/compiled.py)."""
    from connmgr import __version__
    from shadow.compiled import hot_path

    return f"connmgr {__version__} (hot path: {hot_path()})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="connmgr", description=__doc__)
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{serve,demo,prepare-db,pair,switchover,reseed,maintenance,policy}")  # (not _worker)

    s = sub.add_parser("serve", help="run the connection manager")
    s.add_argument("-c", "--config", help="TOML configuration file")
    s.add_argument("--listen", action="append", metavar="HOST:PORT", help="listen address (repeatable; default 127.0.0.1:6432)")
    s.add_argument("--primary", metavar="HOST:PORT", help="the Postgres server behind connmgr (default 127.0.0.1:5432)")
    s.add_argument("--users-file", help="userlist.txt with client secrets (enables scram-sha-256)")
    s.add_argument("--auth-type", choices=config_mod.AUTH_TYPES, help="client authentication method")
    s.add_argument("--max-clients", type=int, help="most client connections at once")
    s.add_argument("--relay", choices=config_mod.RELAY_MODES, help="relay carrier (default engine)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics here")
    s.add_argument("--workers", type=int, help="processes serving clients on the same port (default 1)")
    s.add_argument("--policy", metavar="FILE", help="the access policy of client classes ([policy] file)")
    s.set_defaults(func=cmd_serve)

    wk = sub.add_parser("_worker")  # a worker of `serve` with [server] workers > 1 (connmgr/workers/)
    wk.add_argument("fd", type=int, help="the control socket the supervisor passed")
    wk.set_defaults(func=cmd_worker)

    d = sub.add_parser("demo", help="create local clusters, run a workload through connmgr, report")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.add_argument("--clients", type=int, default=8, help="concurrent workload clients")
    d.add_argument("--seconds", type=float, default=5.0, help="workload duration")
    d.add_argument("--mode", choices=config_mod.MIRROR_MODES, default="two-phase",
                   help="mirror mode of the pair (default two-phase)")
    d.add_argument("--picture", metavar="PNG", help="draw the failover as an image (needs the plot extra)")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser(
        "prepare-db",
        help="install the marker table and function in databases (both sides of a pair)",
        description="Run as a superuser on every database of the primary AND the secondary,"
        " before the subscription is created: the subscriber must know connmgr.markers"
        " before the first marker row arrives.",
    )
    m.add_argument("conninfo", nargs="*", help="libpq connection strings, one per database")
    m.add_argument("--print", action="store_true", help="print the SQL instead of running it")
    m.set_defaults(func=cmd_prepare_db)

    pr = sub.add_parser("pair", help="set up or check a pair of databases")
    psub = pr.add_subparsers(dest="pair_command", required=True)
    _pair_subcommand(
        psub, "check", cmd_pair_check, help="does the pair keep its guarantee now? (exit 1 if not)",
        description="Read-only checks of both databases: wal_level, synchronous_standby_names naming every"
        " subscription, synchronous subscriptions, connmgr's schema, every published table ready on the"
        " secondary, sequences ahead. Each failure names the setting and the fix.",
    )  # fmt: skip
    ps = _pair_subcommand(
        psub, "setup", cmd_pair_setup, help="make two running databases a synchronous pair and write both connmgr configs",
        description="wal_level, connmgr prepare-db on both, the schema onto an empty secondary (pg_dump"
        " --schema-only), publication and synchronous subscription per database, every table copied,"
        " synchronous_standby_names naming every subscription, wal_retrieve_retry_interval; then two TOML"
        " files and `pair check`. Idempotent: run it again after fixing what it reported.",
    )  # fmt: skip
    ps.add_argument("--out", default=".", help="directory for connmgr-primary.toml and connmgr-secondary.toml")
    ps.add_argument("--listen", default="0.0.0.0:6432", help="client listen address of the primary connmgr")
    ps.add_argument("--mirror", default="", help="HOST:PORT of the secondary connmgr's mirror listener"
                    " (default: the secondary's host, port 6433)")  # fmt: skip

    mt = sub.add_parser(
        "maintenance", help="hold the statements on an object while it is maintained",
        description="Runs MAINTENANCE BEGIN|END on the connmgr admin console (a user in [server] admin_users)."
        " From BEGIN on, a statement that touches the object (a table, view or function: schema.table, table,"
        " function:name; globs) waits, its connection kept, until END or [policy] maintenance_wait (then"
        " 55P03 naming the object); other objects and clients are not affected; a transaction begun before"
        " goes on; the maintenance job's own sessions (application_name matching --by) never wait.",
    )  # fmt: skip
    mt.add_argument("action", choices=["begin", "end"])
    mt.add_argument("object", help="schema.table, table, schema.*, function:name")
    mt.add_argument("connmgr", nargs="?", default="127.0.0.1:6432", help="HOST:PORT of the connmgr")
    mt.add_argument("-U", "--user", default="postgres", help="admin user (default postgres)")
    mt.add_argument("--by", default="", help="application_name (a glob) of the maintenance job's sessions"
                    " (default connmgr-maintenance*)")  # fmt: skip
    mt.add_argument("--store", default="", metavar="CONNINFO", help="through the policy store (libpq connection"
                    " string of its database): every connmgr of the fleet holds the statements (workers and the"
                    " pair's two too); returns once every live one does")  # fmt: skip
    mt.add_argument("--wait", type=float, default=30.0, help="with --store: seconds to wait for every connmgr")
    mt.set_defaults(func=cmd_maintenance)

    po = sub.add_parser(
        "policy", help="push a policy version to the store every connmgr activates it from, or show the store",
        description="The policy store is a set of tables in the primary database ([policy] store, replicated"
        " with it). A version pushed is staged (fetched, validated, compiled) by every connmgr at its next"
        " cycle and activated by all at one instant one cycle after every one staged it; a version one"
        " connmgr cannot stage is refused everywhere (status says why).",
    )  # fmt: skip
    posub = po.add_subparsers(dest="policy_command", required=True)
    for name, text in (("push", "add FILE as the newest version"), ("status", "the store: versions, members, staging")):
        one = posub.add_parser(name, help=text)
        if name == "push":
            one.add_argument("file", help="the policy (TOML, as [policy] file)")
            one.add_argument("--interval", type=float, help="seconds between two activations (default 30 when"
                             " the store is created; given: changed)")  # fmt: skip
            one.add_argument("--note", default="", help="a note kept with the version")
            one.add_argument("--no-check", dest="check", action="store_false",
                             help="do not validate the file here (the mask keys may be only on the connmgr hosts)")
            one.add_argument("--secondary", default="", metavar="CONNINFO", help="the pair's secondary database:"
                             " the store's tables are made there too and its subscriptions refreshed, so the"
                             " store survives a failover (needed once)")  # fmt: skip
        one.add_argument("conninfo", nargs="?", default="", help="libpq connection string of the store's database"
                         " (default: the PG* environment)")  # fmt: skip
        one.add_argument("-c", "--config", help="a connmgr configuration: its [primary], [redo] and [policy]"
                         " store_database name the store")  # fmt: skip
        one.set_defaults(func=cmd_policy)
    w = _admin_subcommand(
        sub, "switchover", cmd_switchover,
        help="move every session of a primary connmgr to the secondary database (planned)",
        description="Runs SWITCHOVER on the connmgr admin console (a user in [server] admin_users;"
        " the password from PGPASSWORD or ~/.pgpass). Client input pauses at request boundaries,"
        " requests in flight finish, and every session moves; open transactions are replayed.",
    )
    w.add_argument("--drain", type=float, help="seconds to wait for requests in flight ([failover] drain_timeout)")
    _admin_subcommand(
        sub, "reseed", cmd_reseed,
        help="after a move: make the old primary database the secondary of the new one",
        description="Runs RESEED on the connmgr admin console (for [failover] failback = 'manual'; the"
        " other policies do it on their own once the old primary answers). After a switchover nothing"
        " is copied; after a crash the old primary's replicated tables are emptied and copied afresh.",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # serve logs its lifecycle at INFO; the demo keeps its own output clean unless -v
    default = logging.WARNING if args.command == "demo" else logging.INFO
    level = default - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "pyroute2", "asyncio"):  # every etcd request, netlink message
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
