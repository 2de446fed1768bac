"""The admin console: database ``connmgr`` on connmgr's own listener, in the spirit of
PgBouncer's ``pgbouncer`` database.

``psql -h HOST -p PORT -U USER connmgr`` then ``SHOW HELP;``. Commands (case-insensitive,
trailing semicolon optional): ``SHOW CLIENTS``, ``SHOW SERVERS``, ``SHOW STATS``,
``SHOW CONFIG``, ``SHOW VERSION``, ``SHOW HELP``, and -- only for users listed in
``[server] admin_users`` -- ``SHUTDOWN`` (graceful, like SIGTERM), ``SWITCHOVER`` (a
planned move of every session to the secondary database, see connmgr/failover/controller.py; it
answers when done, with the timeline as rows, or with an error saying why not), ``RESEED``
and ``PAIR CHECK`` (``connmgr pair check`` of the pair as it is now, one row per finding).

Both the simple and the extended protocol work (psycopg uses the latter); results are text
columns. Unknown commands get ERROR 42601 and the session continues.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from connmgr import __version__
from connmgr.config import Config
from connmgr.errors import ClientError
from connmgr.failover.controller import Failover, FailoverError

if TYPE_CHECKING:
    from connmgr.host.rejoin import Rejoin
from connmgr.metrics import Metrics
from connmgr.pg.backend import Route
from connmgr.pg.wire import MessageReader
from connmgr.proxy.client import ClientConnection, ClientState
from connmgr.proxy.policy import PolicyRuntime
from connmgr.proxy.registry import Registry
from connmgr.workers import WORKER_COLUMNS
from connmgr.workers.control import ControlError
from shadow import messages as m
from shadow.messages import FrontendTag
from shadow.policy.maintenance import DEFAULT_BY
from shadow.policy.rules import PolicyError

Result = tuple[list[str], list[list[object]], str]  # columns, rows, command tag

#: how long PAIR CHECK may ask the two servers
PAIR_CHECK_TIMEOUT = 30.0
#: how long a worker's console waits for every worker's SHOW answer (through the supervisor)
FLEET_TIMEOUT = 10.0

_PARAMS = {
    "server_version": "15.0 (connmgr)",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "application_name": "",
    "TimeZone": "UTC",
}


_NOOPS = {"BEGIN": "BEGIN", "START": "START TRANSACTION", "COMMIT": "COMMIT", "END": "COMMIT",
          "ROLLBACK": "ROLLBACK", "ABORT": "ROLLBACK", "SET": "SET", "RESET": "RESET", "DISCARD": "DISCARD ALL"}


class AdminError(Exception):
    """An admin console command failed: the client gets an ErrorResponse with
    ``sqlstate`` (42601 syntax_error unless the command says otherwise: 42501 not an
    admin user, 55000 not possible now, 08006 a server that cannot be asked)."""

    def __init__(self, message: str, sqlstate: str = "42601") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@dataclass(frozen=True, slots=True)
class AdminContext:
    """What the console uses of the running connmgr (built by :mod:`connmgr.app`)."""

    config: Config
    metrics: Metrics
    registry: Registry
    route: Route
    #: SHUTDOWN: begin a graceful shutdown
    shutdown: Callable[[], None]
    #: SWITCHOVER, RESEED and PAIR CHECK act on it (primary with [failover])
    failover: Failover | None = None
    #: RESEED after a host takeover (a host pair's secondary: connmgr/host/rejoin.py)
    rejoin: Rejoin | None = None
    #: with [server] workers > 1: SHOW subject -> every worker's answer, as
    #: [[worker, columns, rows], ...] (connmgr/workers/); None: this process is all
    fleet: Callable[[str], Awaitable[list]] | None = None
    #: MAINTENANCE BEGIN/END, SHOW MAINTENANCE (connmgr/proxy/policy.py)
    policy: PolicyRuntime | None = None


class AdminConsole:
    def __init__(self, ctx: AdminContext, conn: ClientConnection, reader: MessageReader) -> None:
        self.ctx = ctx
        self.conn = conn
        self.reader = reader
        self.is_admin = conn.user in ctx.config.server.admin_users
        self._statement = ""
        self._result: Result | None = None
        self._failed = False

    async def run(self) -> None:
        conn = self.conn
        conn.key = self.ctx.registry.register_key(conn)
        out = [m.authentication_ok()]
        out += [m.parameter_status(k, v) for k, v in _PARAMS.items()]
        out += [m.backend_key_data(*conn.key), m.ready_for_query("I")]
        await conn.stream.send_all(b"".join(out))
        while True:
            tag, body = await self.reader.read()
            if tag == FrontendTag.TERMINATE:
                return
            reply = await self.handle(tag, body)
            if reply:
                await conn.stream.send_all(reply)

    async def handle(self, tag: int, body: bytes) -> bytes:
        """Answer one message; returns the bytes to send (may be empty)."""
        if tag == FrontendTag.SYNC:
            self._failed = False
            return m.ready_for_query("I")
        if self._failed and tag in (FrontendTag.PARSE, FrontendTag.BIND, FrontendTag.DESCRIBE, FrontendTag.EXECUTE, FrontendTag.CLOSE):
            return b""
        msg = m.decode_frontend(tag, body)
        try:
            if isinstance(msg, m.Query):
                return await self._simple(msg.sql)
            if isinstance(msg, m.Parse):
                self._statement = msg.query
                return m.ParseComplete().encode()
            if isinstance(msg, m.Bind):
                self._result = await self.execute(self._statement)
                return m.BindComplete().encode()
            if isinstance(msg, m.Describe):
                if msg.kind == "S":
                    return m.ParameterDescription(()).encode() + self._describe(await self.execute(self._statement, describe=True))
                return self._describe(self._result)
            if isinstance(msg, m.Execute):
                return self._rows(self._result)
            if isinstance(msg, m.Close):
                return m.CloseComplete().encode()
            if isinstance(msg, m.Flush):
                return b""
        except AdminError as e:
            self._failed = True
            return m.error_response(e.sqlstate, str(e), severity="ERROR")
        raise ClientError(f"admin console does not support message type {chr(tag)!r}", sqlstate="0A000")

    async def _simple(self, sql: str) -> bytes:
        if not sql.strip(" ;\n\t"):
            return m.empty_query_response() + m.ready_for_query("I")
        try:
            result = await self.execute(sql)
        except AdminError as e:
            return m.error_response(e.sqlstate, str(e), severity="ERROR") + m.ready_for_query("I")
        return self._describe(result) + self._rows(result) + m.ready_for_query("I")

    @staticmethod
    def _describe(result: Result | None) -> bytes:
        if result is None or not result[0]:
            return m.NoData().encode()
        return m.row_description(result[0])

    @staticmethod
    def _rows(result: Result | None) -> bytes:
        if result is None:
            return m.command_complete("SELECT 0")
        _cols, rows, tag = result
        out = [m.data_row([None if v is None else str(v) for v in row]) for row in rows]
        out.append(m.command_complete(tag))
        return b"".join(out)

    # ------------------------------------------------------------------ commands

    async def execute(self, sql: str, describe: bool = False) -> Result:
        """Run one command (``describe``: only say what it would return)."""
        words = sql.strip().rstrip(";").split()
        if not words:
            raise AdminError("empty command")
        cmd = " ".join(w.upper() for w in words)
        if words[0].upper() in _NOOPS:  # drivers wrap statements in these; nothing to do
            return [], [], _NOOPS[words[0].upper()]
        if cmd == "SHUTDOWN":
            if not self.is_admin:
                raise AdminError("SHUTDOWN is for users listed in [server] admin_users", "42501")
            self.ctx.shutdown()
            return [], [], "SHUTDOWN"
        if words[0].upper() == "SWITCHOVER" and len(words) <= 2:
            return await self._switchover(words[1] if len(words) == 2 else None, describe)
        if words[0].upper() == "RESEED" and len(words) == 1:
            return await self._reseed(describe)
        if cmd == "PAIR CHECK":
            return await self._pair_check(describe)
        if words[0].upper() == "MAINTENANCE":
            return self._maintenance(words[1:], describe)
        if words[0].upper() != "SHOW" or len(words) != 2:
            raise AdminError(f"unknown command {sql.strip()!r}; try SHOW HELP")
        what = words[1].upper()
        if what == "HELP":
            cols, rows = self._show_help()
        elif what in FLEET_SHOWS and self.ctx.fleet is not None:
            try:
                with trio.fail_after(FLEET_TIMEOUT):
                    answers = await self.ctx.fleet(what)
            except (ControlError, trio.TooSlowError) as e:
                raise AdminError(f"SHOW {what}: the supervisor did not answer: {e or 'timed out'}", "08006") from None
            cols, rows = merge_fleet(what, answers)
        elif what in _SHOWS:
            cols, rows = _SHOWS[what](self.ctx)
        else:
            raise AdminError(f"unknown SHOW subject {words[1]!r}; try SHOW HELP")
        return cols, rows, "SHOW"

    def _show_help(self):
        return ["command", "description"], [
            ["SHOW CLIENTS", "one row per client connection"],
            ["SHOW SERVERS", "one row per backend session"],
            ["SHOW STATS", "totals: clients, bytes, messages, requests, latency"],
            ["SHOW CONFIG", "the configuration in effect (secrets hidden)"],
            ["SHOW VERSION", "connmgr version"],
            ["SHOW WORKERS", "one row per worker process ([server] workers)"],
            ["SHUTDOWN", "graceful shutdown (admin_users only)"],
            ["SWITCHOVER [drain_seconds]", "move every session to the secondary database, planned (admin_users only)"],
            ["RESEED", "after a move: make the old primary the secondary of the new one (admin_users only)"],
            ["PAIR CHECK", "does the pair keep its guarantee right now: settings, tables, sequences (admin_users only)"],
            ["MAINTENANCE BEGIN object [BY application_name]", "statements on the object wait until END or"
             " [policy] maintenance_wait, then 55P03; the job's sessions (application_name, default"
             " connmgr-maintenance*) go on (admin_users only)"],
            ["MAINTENANCE END object", "the statements held on it go on (admin_users only)"],
            ["SHOW MAINTENANCE", "the objects under maintenance"],
            ["SHOW POLICY", "the policy version in use, the store's cycle, the clock offset to it"],
        ]

    def _maintenance(self, words: list[str], describe: bool) -> Result:
        columns = ["object", "by", "since"]
        usage = "MAINTENANCE BEGIN object [BY application_name] | MAINTENANCE END object"
        if not self.is_admin:
            raise AdminError("MAINTENANCE is for users listed in [server] admin_users", "42501")
        if self.ctx.policy is None:
            raise AdminError("MAINTENANCE: this connmgr has no policy runtime", "55000")
        if self.ctx.fleet is not None:
            raise AdminError("MAINTENANCE: not yet with [server] workers > 1 (each worker holds its own sessions)",
                             "0A000")  # fmt: skip
        action = words[0].upper() if words else ""
        if action == "BEGIN" and len(words) in (2, 4) and (len(words) == 2 or words[2].upper() == "BY"):
            if describe:
                return columns, [], "MAINTENANCE"
            try:
                entry = self.ctx.policy.begin(words[1], words[3] if len(words) == 4 else DEFAULT_BY)
            except PolicyError as e:
                raise AdminError(f"MAINTENANCE BEGIN: {e}") from None
            return columns, [[entry.text, entry.by, _when(entry.since)]], "MAINTENANCE BEGIN"
        if action == "END" and len(words) == 2:
            if describe:
                return columns, [], "MAINTENANCE"
            entry = self.ctx.policy.end(words[1])
            if entry is None:
                raise AdminError(f"MAINTENANCE END: {words[1]!r} is not under maintenance (SHOW MAINTENANCE)", "42704")
            return columns, [[entry.text, entry.by, _when(entry.since)]], "MAINTENANCE END"
        raise AdminError(f"usage: {usage}")

    def _failover_for(self, command: str):
        """The failover a command acts on, if this user may run it here."""
        if not self.is_admin:
            raise AdminError(f"{command} is for users listed in [server] admin_users", "42501")
        if self.ctx.failover is None:
            raise AdminError(f"{command} needs [failover] secondary on the primary connmgr", "55000")
        return self.ctx.failover

    async def _switchover(self, drain: str | None, describe: bool) -> Result:
        columns = ["ms", "event"]
        failover = self._failover_for("SWITCHOVER")
        try:
            timeout = failover.config.drain_timeout if drain is None else float(drain)
        except ValueError:
            raise AdminError(f"SWITCHOVER [drain_seconds]: not a number: {drain!r}") from None
        if not timeout > 0:
            raise AdminError("SWITCHOVER [drain_seconds]: must be > 0")
        if describe:
            return columns, [], "SWITCHOVER"
        try:
            await failover.switchover(timeout)
        except FailoverError as e:
            raise AdminError(f"switchover not done: {e}", "55000") from None
        rows = [[f"{at * 1e3:.1f}", what] for at, what in failover.timeline]
        return columns, rows, "SWITCHOVER"

    async def _reseed(self, describe: bool) -> Result:
        columns = ["ms", "event"]
        if self.ctx.failover is None and self.ctx.rejoin is not None:
            return await self._rejoin(columns, describe)
        failover = self._failover_for("RESEED")
        if describe:
            return columns, [], "RESEED"
        start = len(failover.timeline)
        try:
            await failover.reseed()
        except FailoverError as e:
            raise AdminError(f"reseed not done: {e}", "55000") from None
        rows = [[f"{at * 1e3:.1f}", what] for at, what in failover.timeline[start:]]
        return columns, rows, "RESEED"

    async def _rejoin(self, columns: list[str], describe: bool) -> Result:
        """RESEED on a connmgr that took over from another host: its database left behind
        becomes the secondary (connmgr/host/rejoin.py)."""
        from connmgr.host.rejoin import RejoinError

        if not self.is_admin:
            raise AdminError("RESEED is for users listed in [server] admin_users", "42501")
        if describe:
            return columns, [], "RESEED"
        rejoin = self.ctx.rejoin
        try:
            await rejoin.reseed()
        except RejoinError as e:
            raise AdminError(f"reseed not done: {e}", "55000") from None
        return columns, [[f"{at * 1e3:.1f}", what] for at, what in rejoin.timeline], "RESEED"

    async def _pair_check(self, describe: bool) -> Result:
        """``connmgr pair check`` from here: the primary the sessions are on now (as
        ``[redo]``'s user) and the secondary ([failover]'s user), for every database the
        secondary subscribes in; one row per finding."""
        from psycopg.conninfo import make_conninfo

        from connmgr.pair.check import check_running_pair

        columns = ["level", "what", "detail", "fix"]
        failover = self._failover_for("PAIR CHECK")
        if describe:
            return columns, [], "PAIR CHECK"
        cfg = self.ctx.config
        primary, secondary = self.ctx.route.server, failover.server
        dsns = (make_conninfo(host=primary.host, port=primary.port, user=cfg.redo.user, password=cfg.redo.password,
                              dbname=cfg.redo.dbname, connect_timeout=5),
                make_conninfo(host=secondary.host, port=secondary.port, user=cfg.failover.user,
                              password=cfg.failover.password, dbname=cfg.failover.dbname, connect_timeout=5))  # fmt: skip
        with trio.move_on_after(PAIR_CHECK_TIMEOUT) as scope:
            try:
                findings = await trio.to_thread.run_sync(check_running_pair, *dsns, abandon_on_cancel=True)
            except Exception as e:  # noqa: BLE001 - psycopg's errors: a server that cannot be asked
                raise AdminError(f"pair check could not ask a server: {str(e).strip()}", "08006") from None
        if scope.cancelled_caught:
            raise AdminError(f"pair check did not finish within {PAIR_CHECK_TIMEOUT:.0f} s", "57014")
        return columns, [[f.level, f.what, f.detail, f.fix] for f in findings], "PAIR CHECK"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _show_maintenance(ctx: AdminContext):
    entries = ctx.policy.maintenance.entries.values() if ctx.policy is not None else ()
    return ["object", "by", "since", "seconds"], [
        [e.text, e.by, _when(e.since), f"{time.time() - e.since:.1f}"] for e in entries]


def _show_policy(ctx: AdminContext):
    runtime = ctx.policy
    if runtime is None:
        return ["setting", "value"], [["in use", "none"]]
    if runtime.sync is None:
        return ["setting", "value"], [["in use", runtime.active.label], ["store", "none ([policy] store)"]]
    return ["setting", "value"], [list(row) for row in runtime.sync.describe()]


def _show_version(ctx: AdminContext):
    return ["version"], [[f"connmgr {__version__}"]]

def _show_clients(ctx: AdminContext):
    now = time.time()
    rows = []
    for c in list(ctx.registry):
        rows.append([
            c.id, c.user, c.database, c.peer, c.application_name, c.state,
            c.session.tx_status.value if c.state is ClientState.ACTIVE else "",
            len(c.session.pending), "yes" if c.tls else "no", f"{now - c.connected_at:.1f}",
            c.stats.bytes_from_client, c.stats.bytes_to_client, c.stats.requests,
            c.key[0] if c.key else None,
        ])
    return [
        "id", "user", "database", "address", "application_name", "state", "tx", "pending",
        "tls", "connected_s", "bytes_in", "bytes_out", "requests", "virtual_pid",
    ], rows

def _show_servers(ctx: AdminContext):
    rows = []
    for c in list(ctx.registry):
        b = c.backend
        if b is None:
            continue
        rows.append([c.id, b.server.name, b.server.address, b.pid, c.user, c.database, c.session.tx_status.value])
    return ["client_id", "server", "address", "backend_pid", "user", "database", "tx"], rows

def _show_stats(ctx: AdminContext):
    t = ctx.metrics.totals(c.stats for c in list(ctx.registry))
    mt = ctx.metrics
    lat = t.latency
    avg_us = (lat.total / lat.count * 1e6) if lat.count else 0
    return [
        "clients_active", "clients_accepted", "clients_rejected", "auth_failures", "backend_connects",
        "backend_connect_errors", "cancels", "requests", "bytes_in", "bytes_out", "messages_in",
        "messages_out", "avg_latency_us", "p99_latency_us_le", "uptime_s",
    ], [[
        len(ctx.registry), mt.clients_accepted, sum(mt.clients_rejected.values()), mt.auth_failures,
        mt.backend_connects, mt.backend_connect_errors, mt.cancels, t.requests,
        t.bytes_from_client, t.bytes_to_client, t.messages_from_client, t.messages_to_client,
        f"{avg_us:.0f}", f"{lat.quantile(0.99) * 1e6:.0f}", f"{time.time() - mt.started:.0f}",
    ]]

def _show_config(ctx: AdminContext):
    rows = []
    cfg = ctx.config
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if "password" in f.name or f.name == "mock_key":
                value = "********" if value else ""
            rows.append([section.name, f.name, str(value)])
    return ["section", "key", "value"], rows


def _show_workers(ctx: AdminContext):
    """One process serves everything (with workers, the supervisor answers instead)."""
    return WORKER_COLUMNS, [[0, os.getpid(), len(ctx.registry), f"{time.time() - ctx.metrics.started:.0f}", 0]]

_SHOWS = {"VERSION": _show_version, "CLIENTS": _show_clients, "SERVERS": _show_servers, "STATS": _show_stats,
          "CONFIG": _show_config, "WORKERS": _show_workers, "MAINTENANCE": _show_maintenance,
          "POLICY": _show_policy}  # fmt: skip

#: the SHOW subjects that, with workers, are answered for all of them
FLEET_SHOWS = ("CLIENTS", "SERVERS", "STATS", "WORKERS")


def local_show(ctx: AdminContext, what: str) -> tuple[list[str], list[list[str | None]]]:
    """This process's answer to ``SHOW what`` (one of :data:`FLEET_SHOWS`), as text: what
    a worker sends the supervisor. KeyError for another subject."""
    cols, rows = _SHOWS[what](ctx)
    return cols, [[None if v is None else str(v) for v in row] for row in rows]


def merge_fleet(what: str, answers: list) -> tuple[list[str], list[list]]:
    """Every worker's answer to ``SHOW what`` as one table: CLIENTS and SERVERS with a
    ``worker`` column first; STATS one row per worker under a row ``all`` (counts added,
    the average latency weighted by requests, the p99 bound and uptime the largest);
    WORKERS as the supervisor gave it."""
    answers = sorted(answers, key=lambda a: a[0])
    if what == "WORKERS":
        (_index, cols, rows), = answers
        return cols, rows
    cols = ["worker", *answers[0][1]] if answers else ["worker"]
    rows = [[str(index), *row] for index, _cols, part in answers for row in part]
    if what != "STATS" or not rows:
        return cols, rows
    total: list[str | None] = ["all"]
    for i, name in enumerate(cols[1:], start=1):
        values = [float(r[i] or 0) for r in rows]
        if name == "avg_latency_us":
            weights = [float(r[cols.index("requests")] or 0) for r in rows]
            value = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights) if sum(weights) else 0.0
        elif name in ("p99_latency_us_le", "uptime_s"):
            value = max(values)
        else:
            value = sum(values)
        total.append(f"{value:.0f}")
    return cols, [total, *rows]
