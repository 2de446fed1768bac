"""Benchmark connmgr against Postgres direct, PgBouncer and a naive trio byte relay.

Usage (from the repository root; as root the servers drop to the ``postgres`` OS user)::

    python labs/bench_proxy.py                          # all targets, 10 s per run, 2 rounds
    python labs/bench_proxy.py --seconds 5 --rounds 1 --targets direct,pgbouncer,relay
    python labs/bench_proxy.py --pgbouncer-mode transaction --json bench.json
    python labs/bench_proxy.py --targets direct,connmgr --profile      # + a py-spy profile
    python labs/bench_proxy.py --targets direct,connmgr,connmgr-base --baseline /tmp/base
                                   # two commits side by side (git worktree add /tmp/base <commit>)

What it does
------------
1. Creates a throw-away cluster in a temp dir (trust auth, fsync/synchronous_commit off) and
   fills it with ``pgbench -i -s SCALE``.
2. Starts the targets, each listening on its own 127.0.0.1 port in front of that cluster:

   ``direct``     Postgres itself, over TCP (the reference every ratio is taken against);
   ``connmgr``    ``python -m connmgr serve --listen ... --primary ...``;
   ``pgbouncer``  PgBouncer (if installed), session pooling unless ``--pgbouncer-mode``;
   ``relay``      labs/naive_relay.py: trio, two pumps, parses nothing.

   A target that cannot start (connmgr not written yet, pgbouncer not installed, ...) is
   skipped with a note; the others still run.
3. Runs the workloads, each for ``--seconds``:

   ``select-simple``    pgbench -S -M simple   -c 8 -j 2   (one round trip per transaction)
   ``select-extended``  pgbench -S -M extended -c 8 -j 2   (Parse/Bind/Execute/Sync)
   ``tpcb``             pgbench (TPC-B like)   -c 8 -j 2   (7 statements, writes)
   ``latency-1c``       pgbench -S -M simple   -c 1 -j 1   (pure per-query latency)

   Rounds are interleaved: every round runs every workload against every target, in an
   order rotated from round to round and workload to workload, so slow drifts of the
   machine (thermal, other load, checkpoints) hit all targets alike.
4. Prints one row per workload and target with the median over rounds of

   ``tps``        pgbench's "tps = ... (without initial connection time)": transactions per
                  second once connected. Higher is better.
   ``lat ms``     pgbench's "latency average": mean time per transaction seen by a client.
                  With 8 clients on 2 cores it is mostly queueing (≈ clients / tps); the
                  ``latency-1c`` row is the real per-round-trip cost.
   ``× direct``   tps divided by direct's tps for the same workload: 1.00 means the proxy
                  costs nothing, 0.50 means it halves the throughput.
   ``spread``     (max - min) / median of tps over rounds: how noisy the figure is. Ratios
                  that differ by less than the spread mean nothing.

   A target whose pgbench runs all fail shows FAILED with pgbench's first error line.

Everything (client, proxies, server) shares the machine's cores, so a proxy's CPU use comes
straight out of the server's: the figures measure the whole stack on this box, not the
proxy in isolation. ``--json FILE`` writes every single run too. ``--profile [FILE]`` runs
one extra select-simple pass against connmgr with py-spy attached (pyinstrument as the
fallback) and writes a speedscope profile (open it at https://www.speedscope.app); that pass
is not counted in the table.

All processes and the cluster are removed on exit, including on errors and Ctrl-C/SIGTERM;
``--keep`` keeps the temp dir (data directory, logs, pgbouncer.ini) for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connmgr.embedded.clusters import Cluster, ClusterError, free_port, temp_base_dir  # noqa: E402

HOST = "127.0.0.1"
DB = "postgres"
USER = "postgres"
ALL_TARGETS = ("direct", "connmgr", "connmgr-tasks", "connmgr-base", "pgbouncer", "relay")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0

CLUSTER_SETTINGS: dict[str, str | int] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": 300,
    "shared_buffers": "256MB",
    "wal_level": "minimal",
    "max_wal_senders": 0,
    "checkpoint_timeout": "30min",
    "max_wal_size": "4GB",
}


class TargetUnavailable(Exception):
    """A target could not be started; the message says why (shown as a skip note)."""


# ------------------------------------------------------------------------- processes


def log(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def server_os_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run pgbouncer as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("CONNMGR_PG_OS_USER") or "postgres"
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise TargetUnavailable(f"running as root and OS user {name!r} does not exist") from None


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT):
    """Signal the process group of ``proc`` (started with start_new_session) and reap it;
    escalate to SIGKILL after ``timeout``. Safe to call on an exited process."""
    for s in (sig, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, s)
        try:
            proc.wait(timeout=timeout)
            # The leader is gone; make sure no child of it lingers in the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=timeout)


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def first_error_line(text: str) -> str:
    """The most telling line of a failed command's output."""
    lines = [ln.strip(" |") for ln in text.splitlines() if ln.strip(" |")]
    if any(ln.startswith("Traceback") for ln in lines):  # a Python crash: its last exception
        raised = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", ln)]
        if raised:
            return raised[-1]
    for ln in lines:
        if re.search(r"error|fatal|could not|abort|fail|refused|timed out|panic", ln, re.I):
            return ln
    return lines[-1] if lines else "(no output)"


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """Something pgbench can connect to. The base class is Postgres itself."""

    name: str
    port: int
    skip_reason: str | None = None

    def start(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass

    def describe_death(self) -> str:
        return ""


@dataclass
class ProcessTarget(Target):
    """A proxy run as a subprocess in its own process group, output in ``log_path``.

    Ready once ``ready_marker`` (if any) appears in its output and the port accepts TCP.
    """

    argv: list[str] = field(default_factory=list)
    log_path: Path = Path("/dev/null")
    ready_marker: str | None = "listening on"
    run_as: pwd.struct_passwd | None = None
    cwd: Path = REPO
    #: where its Python code comes from (a baseline checkout for ``connmgr-base``)
    pythonpath: Path = REPO
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(
                p for p in (str(self.pythonpath), os.environ.get("PYTHONPATH", "")) if p
            ),
        )
        kw: dict = {}
        if self.run_as is not None:
            kw.update(user=self.run_as.pw_uid, group=self.run_as.pw_gid, extra_groups=[])
            env.update(HOME=self.run_as.pw_dir, USER=self.run_as.pw_name)
        with open(self.log_path, "ab") as out:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.cwd,
                    env=env,
                    start_new_session=True,
                    **kw,
                )
            except OSError as e:
                raise TargetUnavailable(f"could not run {self.argv[0]}: {e}") from e
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = first_error_line(tail(self.log_path, 20))
                self.proc = None
                raise TargetUnavailable(f"exited at startup ({why}); log: {self.log_path}")
            marked = self.ready_marker is None or self.ready_marker in tail(self.log_path, 50)
            if marked and port_open(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise TargetUnavailable(f"not ready within {READY_TIMEOUT:g}s; log: {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None

    def describe_death(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        return (
            f"{self.name} exited with code {self.proc.returncode}: "
            f"{first_error_line(tail(self.log_path, 20))}"
        )


def connmgr_argv(port: int, pg_port: int, extra: list[str], wrapper: list[str] | None = None):
    """Command line of connmgr; ``wrapper`` replaces ``python -m`` (e.g. with pyinstrument)."""
    launcher = wrapper or [sys.executable, "-m"]
    return [
        *launcher,
        "connmgr",
        "serve",
        "--listen",
        f"{HOST}:{port}",
        "--primary",
        f"{HOST}:{pg_port}",
        *extra,
    ]


def make_connmgr(base: Path, pg_port: int, extra: list[str], name: str = "connmgr",
                 root: Path | None = None) -> ProcessTarget:  # fmt: skip
    """connmgr as a subprocess; ``connmgr-tasks`` is the same with ``--relay tasks`` (two trio
    tasks per session instead of the epoll relay engine); ``connmgr-base`` runs the code of
    another checkout (``--baseline DIR``), to compare two commits in one interleaved run."""
    port = free_port(HOST)
    if name == "connmgr-tasks":
        extra = [*extra, "--relay", "tasks"]
    if name == "connmgr-base" and root is None:
        target = ProcessTarget(name, port)
        target.skip_reason = "connmgr-base needs --baseline DIR (e.g. git worktree add DIR <commit>)"
        return target
    root = root or REPO
    target = ProcessTarget(
        name, port, argv=connmgr_argv(port, pg_port, extra), log_path=base / f"{name}.log",
        cwd=root, pythonpath=root,
    )  # fmt: skip
    return target


def make_relay(base: Path, pg_port: int) -> ProcessTarget:
    port = free_port(HOST)
    argv = [
        sys.executable,
        str(REPO / "labs" / "naive_relay.py"),
        "--listen",
        f"{HOST}:{port}",
        "--target",
        f"{HOST}:{pg_port}",
    ]
    return ProcessTarget("relay", port, argv=argv, log_path=base / "relay.log")


def write_pgbouncer_config(directory: Path, port: int, pg_port: int, mode: str) -> Path:
    """Write pgbouncer.ini and userlist.txt into ``directory``; return the ini path."""
    (directory / "userlist.txt").write_text(f'"{USER}" ""\n')
    ini = directory / "pgbouncer.ini"
    ini.write_text(f"""\
[databases]
* = host={HOST} port={pg_port}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "userlist.txt"}
pool_mode = {mode}
max_client_conn = 1000
default_pool_size = 100
max_db_connections = 0
admin_users = {USER}
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
""")
    return ini


def make_pgbouncer(base: Path, pg_port: int, mode: str) -> ProcessTarget:
    port = free_port(HOST)
    target = ProcessTarget("pgbouncer", port, log_path=base / "pgbouncer.log", ready_marker=None)
    exe = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)),
        None,
    )
    if exe is None:
        target.skip_reason = "pgbouncer is not installed (apt-get install -y pgbouncer)"
        return target
    directory = base / "pgbouncer"
    directory.mkdir()
    try:
        # PgBouncer refuses to run as root, so it runs as the server's OS user.
        target.run_as = server_os_user()
    except TargetUnavailable as e:
        target.skip_reason = str(e)
        return target
    if target.run_as is not None:
        os.chown(directory, target.run_as.pw_uid, target.run_as.pw_gid)
    ini = write_pgbouncer_config(directory, port, pg_port, mode)
    target.argv, target.cwd = [exe, str(ini)], directory
    return target


# -------------------------------------------------------------------------- pgbench


@dataclass(frozen=True)
class Workload:
    name: str
    args: tuple[str, ...]


def workloads(clients: int, jobs: int) -> list[Workload]:
    c, j = ("-c", str(clients)), ("-j", str(jobs))
    return [
        Workload("select-simple", ("-S", "-M", "simple", *c, *j)),
        Workload("select-extended", ("-S", "-M", "extended", *c, *j)),
        Workload("tpcb", ("-M", "simple", *c, *j)),
        Workload("latency-1c", ("-S", "-M", "simple", "-c", "1", "-j", "1")),
    ]


@dataclass
class Run:
    """One pgbench run: one workload against one target in one round."""

    round: int
    workload: str
    target: str
    ok: bool = False
    tps: float | None = None
    latency_ms: float | None = None
    connect_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    error: str | None = None
    wall_s: float | None = None


def parse_pgbench(out: str) -> dict:
    """Pull the figures out of pgbench's report (PostgreSQL 13+ and older wordings)."""
    patterns = {
        "tps": r"^tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)",
        "latency_ms": r"^latency average = ([\d.]+) ms",
        "connect_ms": r"^initial connection time = ([\d.]+) ms",
        "transactions": r"^number of transactions actually processed: (\d+)",
        "failed_transactions": r"^number of failed transactions: (\d+)",
    }
    found = {}
    for key, pat in patterns.items():
        m = re.search(pat, out, re.M)
        if m:
            found[key] = int(m[1]) if key.endswith("transactions") else float(m[1])
    return found


def pgbench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def run_pgbench(pgbench: str, port: int, args: list[str], timeout: float,
                env: dict[str, str] | None = None, db: str = DB) -> tuple[int, str, str]:  # fmt: skip
    """Run pgbench in its own process group; kill the group on timeout or interrupt.
    Returns (exit code, stdout, stderr); -1 on timeout."""
    cmd = [pgbench, "-h", HOST, "-p", str(port), "-U", USER, *args, db]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=env if env is not None else pgbench_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGINT)
        out, err = proc.communicate()
        return -1, out, err + f"\npgbench timed out after {timeout:g}s"
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM): leave nothing behind
            kill_group(proc, signal.SIGINT)
    return proc.returncode, out, err


def bench_once(pgbench: str, target: Target, wl: Workload, seconds: int, rnd: int) -> Run:
    """Run ``wl`` against ``target`` once; never raises for a failing proxy."""
    run = Run(rnd, wl.name, target.name)
    if not target.alive():
        why = target.describe_death() or f"{target.name} is not running"
        log(f"  {why}; restarting it")
        try:
            target.start()
        except TargetUnavailable as e:
            run.error = f"{why}; restart failed: {e}"
            return run
    t0 = time.monotonic()
    rc, out, err = run_pgbench(
        pgbench, target.port, ["-T", str(seconds), *wl.args], timeout=seconds + 120
    )
    run.wall_s = round(time.monotonic() - t0, 2)
    figures = parse_pgbench(out)
    for key, value in figures.items():
        setattr(run, key, value)
    if rc == 0 and run.tps is not None:
        run.ok = True
    else:
        run.error = first_error_line(err + "\n" + out)
        if rc not in (0, -1):
            run.error = f"(exit {rc}) {run.error}"
        if death := target.describe_death():
            run.error += f"; {death}"
    return run


def describe_run(run: Run) -> str:
    if not run.ok:
        return f"FAILED: {run.error}"
    text = f"{run.tps:,.0f} tps, {run.latency_ms:.3f} ms"
    if run.failed_transactions:
        text += f", {run.failed_transactions} failed transactions"
    return text


# ------------------------------------------------------------------------- reporting


@dataclass
class Row:
    workload: str
    target: str
    tps: float | None
    latency_ms: float | None
    ratio: float | None
    spread: float | None
    runs: int
    failures: int
    note: str = ""


def summarize(runs: list[Run], wl_names: list[str], target_names: list[str]) -> list[Row]:
    """Median over rounds per (workload, target), plus the ratio to direct."""
    rows = []
    for wl in wl_names:
        direct = [r.tps for r in runs if r.workload == wl and r.target == "direct" and r.ok]
        direct_tps = statistics.median(direct) if direct else None
        for name in target_names:
            mine = [r for r in runs if r.workload == wl and r.target == name]
            if not mine:
                continue
            good = [r for r in mine if r.ok]
            failed = [r for r in mine if not r.ok]
            row = Row(wl, name, None, None, None, None, len(mine), len(failed))
            if good:
                tps = [r.tps for r in good]
                row.tps = statistics.median(tps)
                row.latency_ms = statistics.median(r.latency_ms for r in good)
                if len(tps) > 1 and row.tps:
                    row.spread = (max(tps) - min(tps)) / row.tps
                if direct_tps:
                    row.ratio = row.tps / direct_tps
            if failed:
                prefix = "" if not good else f"{len(failed)}/{len(mine)} runs failed: "
                row.note = prefix + (failed[0].error or "")
            elif any(r.failed_transactions for r in good):
                row.note = "some transactions failed"
            rows.append(row)
    return rows


def row_cells(row: Row) -> list[str]:
    if row.tps is None:
        return [row.workload, row.target, "FAILED", "-", "-", "-", row.note]
    return [
        row.workload,
        row.target,
        f"{row.tps:,.0f}",
        f"{row.latency_ms:.3f}",
        f"{row.ratio:.2f}×" if row.ratio is not None else "-",
        f"{row.spread * 100:.1f}%" if row.spread is not None else "-",
        row.note,
    ]


HEADERS = ["workload", "target", "tps", "lat ms", "× direct", "spread", "note"]
RIGHT_ALIGNED = {2, 3, 4, 5}


def print_table(rows: list[Row], title: str) -> None:
    """Print with rich when it is installed, else as plain aligned text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print_plain_table(rows, title)
        return
    table = Table(title=title)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="right" if i in RIGHT_ALIGNED else "left", overflow="fold")
    previous = None
    for row in rows:
        if previous is not None and row.workload != previous:
            table.add_section()
        previous = row.workload
        style = "red" if row.tps is None else None
        table.add_row(*row_cells(row), style=style)
    Console().print(table)


def print_plain_table(rows: list[Row], title: str) -> None:
    cells = [row_cells(r) for r in rows]
    # The note column can be long: leave it unpadded at the end.
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS[:-1])]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if i in RIGHT_ALIGNED else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=False))
        ]
        return "  ".join(parts + [values[-1]]).rstrip()

    print(title)
    print(line(HEADERS))
    print(line(["-" * w for w in widths] + ["----"]))
    previous = None
    for row, c in zip(rows, cells, strict=True):
        if previous is not None and row.workload != previous:
            print()
        previous = row.workload
        print(line(c))


# ------------------------------------------------------------------------ benchmark


class Bench:
    """Owns the temp dir, cluster and target processes; ``cleanup`` removes them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base: Path | None = None
        self.cluster: Cluster | None = None
        self.pgbench = ""
        self.targets: list[Target] = []
        self.skipped: dict[str, str] = {}
        self.runs: list[Run] = []
        self.workloads = [w for w in workloads(args.clients, args.jobs) if w.name in args.workloads]
        self.environment: dict = {}
        self.profile_path: str | None = None

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        self.base = temp_base_dir("connmgr-bench-")
        log(f"temp dir {self.base}")
        self.cluster = Cluster.create(
            self.base, "bench", host_auth="trust", settings=CLUSTER_SETTINGS
        )
        self.cluster.start()
        self.pgbench = self._find_pgbench()
        log(f"initializing pgbench, scale {self.args.scale} ...")
        rc, out, err = run_pgbench(
            self.pgbench, self.cluster.port, ["-i", "-q", "-s", str(self.args.scale)], timeout=3600
        )
        if rc != 0:
            raise ClusterError(f"pgbench -i failed: {first_error_line(err + out)}")
        self._record_environment()
        self._start_targets()

    def _find_pgbench(self) -> str:
        own = self.cluster.bindir / "pgbench"
        exe = str(own) if os.access(own, os.X_OK) else shutil.which("pgbench")
        if not exe:
            raise SystemExit("pgbench not found (next to the server binaries or on PATH)")
        return exe

    def _record_environment(self) -> None:
        self.environment = {
            "postgres": self.cluster.psql("SELECT version()"),
            "python": sys.version.split()[0],
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
        }
        if exe := shutil.which("pgbouncer"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run([exe, "--version"], capture_output=True, text=True)
                self.environment["pgbouncer"] = out.stdout.split("\n", 1)[0]

    def _start_targets(self) -> None:
        pg_port = self.cluster.port
        makers = {
            "direct": lambda: Target("direct", pg_port),
            "connmgr": lambda: make_connmgr(
                self.base, pg_port, shlex.split(self.args.connmgr_args)
            ),
            "connmgr-tasks": lambda: make_connmgr(
                self.base, pg_port, shlex.split(self.args.connmgr_args), "connmgr-tasks"
            ),
            "connmgr-base": lambda: make_connmgr(
                self.base, pg_port, shlex.split(self.args.connmgr_args), "connmgr-base",
                Path(self.args.baseline).resolve() if self.args.baseline else None,
            ),
            "pgbouncer": lambda: make_pgbouncer(self.base, pg_port, self.args.pgbouncer_mode),
            "relay": lambda: make_relay(self.base, pg_port),
        }
        for name in self.args.targets:
            target = makers[name]()
            if target.skip_reason is None:
                try:
                    target.start()
                except TargetUnavailable as e:
                    target.skip_reason = str(e)
            if target.skip_reason is not None:
                self.skipped[name] = target.skip_reason
                log(f"{name}: SKIPPED - {target.skip_reason}")
                continue
            log(f"{name}: ready on {HOST}:{target.port}")
            self.targets.append(target)

    # ------------------------------------------------------------ runs

    def run_rounds(self) -> None:
        n_runs = self.args.rounds * len(self.workloads) * len(self.targets)
        log(
            f"{n_runs} runs of {self.args.seconds}s each "
            f"(≈{n_runs * (self.args.seconds + 1.5) / 60:.1f} min)"
        )
        for rnd in range(self.args.rounds):
            for i, wl in enumerate(self.workloads):
                k = (rnd + i) % len(self.targets)
                for target in self.targets[k:] + self.targets[:k]:
                    run = bench_once(self.pgbench, target, wl, self.args.seconds, rnd + 1)
                    self.runs.append(run)
                    log(
                        f"round {rnd + 1}/{self.args.rounds}: {wl.name} via {target.name}"
                        f" ... {describe_run(run)}"
                    )

    def profile(self) -> None:
        """One extra select-simple run against connmgr with a profiler; not in the table."""
        connmgr = next((t for t in self.targets if t.name == "connmgr"), None)
        if connmgr is None:
            log("--profile: connmgr is not among the running targets; no profile taken")
            return
        out = Path(self.args.profile).resolve()
        wl = next(
            w for w in workloads(self.args.clients, self.args.jobs) if w.name == "select-simple"
        )
        ok = bool(shutil.which("py-spy")) and self._profile_py_spy(connmgr, wl, out)
        if not ok and importlib.util.find_spec("pyinstrument") is not None:
            ok = self._profile_pyinstrument(connmgr, wl, out)
        if ok:
            self.profile_path = str(out)
            log(f"profile written to {out} (open it at https://www.speedscope.app)")
        else:
            log("--profile: neither py-spy nor pyinstrument produced a profile")

    def _profile_py_spy(self, connmgr: ProcessTarget, wl: Workload, out: Path) -> bool:
        if not connmgr.alive():
            with contextlib.suppress(TargetUnavailable):
                connmgr.start()
        if not connmgr.alive():
            return False
        spy_log = self.base / "py-spy.log"
        with open(spy_log, "wb") as f:
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(connmgr.proc.pid),
                    "--subprocesses",
                    "--format",
                    "speedscope",
                    "-o",
                    str(out),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            time.sleep(1.0)  # let it attach
            if spy.poll() is not None:
                log(f"py-spy could not attach: {first_error_line(tail(spy_log, 20))}")
                return False
            run = bench_once(self.pgbench, connmgr, wl, self.args.seconds, 0)
            log(f"profile: {wl.name} via connmgr under py-spy ... {describe_run(run)}")
        finally:
            kill_group(spy, signal.SIGINT, timeout=30)  # SIGINT: py-spy writes the file
        return out.exists() and out.stat().st_size > 0

    def _profile_pyinstrument(self, connmgr: ProcessTarget, wl: Workload, out: Path) -> bool:
        """Restart connmgr under pyinstrument for one run; stop it with SIGINT to save."""
        connmgr.stop()
        wrapper = [sys.executable, "-m", "pyinstrument", "-r", "speedscope", "-o", str(out), "-m"]
        profiled = ProcessTarget(
            "connmgr",
            connmgr.port,
            log_path=self.base / "pyinstrument.log",
            argv=connmgr_argv(
                connmgr.port, self.cluster.port, shlex.split(self.args.connmgr_args), wrapper
            ),
        )
        try:
            profiled.start()
            run = bench_once(self.pgbench, profiled, wl, self.args.seconds, 0)
            log(f"profile: {wl.name} via connmgr under pyinstrument ... {describe_run(run)}")
        except TargetUnavailable as e:
            log(f"pyinstrument: connmgr did not start: {e}")
        finally:
            if profiled.proc is not None:
                kill_group(profiled.proc, signal.SIGINT, timeout=30)
                profiled.proc = None
        return out.exists() and out.stat().st_size > 0

    # ------------------------------------------------------------ output

    def report(self) -> None:
        if not self.runs:
            log("no runs completed")
        else:
            rows = summarize(
                self.runs, [w.name for w in self.workloads], [t.name for t in self.targets]
            )
            rounds = len({r.round for r in self.runs})
            title = (
                f"pgbench, {self.args.seconds}s per run, median of {rounds} round(s), "
                f"scale {self.args.scale}, pgbouncer {self.args.pgbouncer_mode} mode"
            )
            print()
            print_table(rows, title)
        for name, why in self.skipped.items():
            print(f"{name}: skipped - {why}")
        if self.args.json:
            self.write_json(Path(self.args.json))

    def write_json(self, path: Path) -> None:
        rows = summarize(
            self.runs, [w.name for w in self.workloads], [t.name for t in self.targets]
        )
        data = {
            "config": dict(vars(self.args)),
            "environment": self.environment,
            "workloads": {w.name: list(w.args) for w in self.workloads},
            "skipped": self.skipped,
            "runs": [asdict(r) for r in self.runs],
            "summary": [asdict(r) for r in rows],
            "profile": self.profile_path,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        log(f"raw figures written to {path}")

    # ------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Stop every process we started and remove the cluster; each step on its own."""
        for target in self.targets:
            try:
                target.stop()
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log(f"could not stop {target.name}: {e}")
        if self.cluster is not None:
            try:
                if self.args.keep:
                    self.cluster.stop("fast")
                else:
                    self.cluster.destroy()
            except ClusterError as e:
                log(f"cluster cleanup: {e}")
        if self.base is not None:
            if self.args.keep:
                log(f"kept {self.base}")
            else:
                shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    wl_names = [w.name for w in workloads(8, 2)]
    p = argparse.ArgumentParser(
        description="Benchmark connmgr against direct Postgres, PgBouncer and a naive relay.",
        epilog="See the module docstring (labs/bench_proxy.py) for what the figures mean.",
    )
    p.add_argument("--seconds", type=int, default=10, help="duration of each run (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument(
        "--clients",
        type=int,
        default=8,
        help="pgbench -c for the multi-client workloads (default 8)",
    )
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j for them (default 2)")
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    p.add_argument(
        "--workloads",
        default=",".join(wl_names),
        help=f"comma-separated subset of {','.join(wl_names)}",
    )
    p.add_argument("--pgbouncer-mode", choices=("session", "transaction"), default="session")
    p.add_argument("--connmgr-args", default="", help="extra arguments for connmgr serve")
    p.add_argument("--baseline", metavar="DIR",
                   help="a checkout of another commit, run as target connmgr-base beside connmgr")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs)")
    p.add_argument(
        "--profile",
        nargs="?",
        metavar="FILE",
        const=f"connmgr-profile-{time.strftime('%Y%m%d-%H%M%S')}.speedscope.json",
        help="profile connmgr during an extra select-simple run (speedscope file; "
        "default ./connmgr-profile-<time>.speedscope.json)",
    )
    args = p.parse_args(argv)
    args.targets = split_choices(p, "--targets", args.targets, ALL_TARGETS)
    args.workloads = split_choices(p, "--workloads", args.workloads, wl_names)
    if args.seconds < 1 or args.rounds < 1:
        p.error("--seconds and --rounds must be at least 1")
    return args


def split_choices(p: argparse.ArgumentParser, opt: str, text: str, allowed) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        p.error(f"{opt}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(chosen))


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    bench = Bench(args)
    status = 0
    try:
        bench.setup()
        if not bench.targets:
            log("no target could be started")
            return 1
        bench.run_rounds()
        if args.profile:
            bench.profile()
        bench.report()
    except KeyboardInterrupt:
        log("interrupted; partial results follow")
        status = 130
        with contextlib.suppress(Exception):
            bench.report()
    except ClusterError as e:
        log(f"cluster error: {e}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
