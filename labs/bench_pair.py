"""Benchmark the connmgr pair against Postgres direct, Postgres with a synchronous physical
standby, and PgBouncer.

Usage (from the repository root; as root the servers drop to the ``postgres`` OS user)::

    python labs/bench_pair.py                        # 3 rounds of 10 s, scale 10
    python labs/bench_pair.py --quick                # smoke run: 1 round of 3 s
    python labs/bench_pair.py --targets direct,pair-1phase --workloads tpcb --json pair.json

What it does
------------
1. Creates the clusters in a temp dir, every one with the same settings (``connmgr.embedded.clusters``
   defaults plus :data:`BENCH_SETTINGS`: fsync/full_page_writes off, synchronous_commit on,
   wal_level logical, shared_buffers 256MB, no checkpoint during a run; SCRAM over TCP) and
   a database ``bench`` filled with ``pgbench -i -s SCALE``:

   * ``direct``: one cluster, no replica (also behind PgBouncer);
   * ``srprimary`` + ``standby``: a physical streaming standby made with ``pg_basebackup
     -R`` (run as the server OS user), named in the primary's ``synchronous_standby_names``;
   * ``pair/primary`` + ``pair/secondary``: :class:`connmgr.embedded.cluster_pair.ClusterPair`, native
     logical replication in synchronous mode (the secondary gets the pgbench tables with
     ``pgbench -i -I dtp``, the data by ``ALTER SUBSCRIPTION ... REFRESH PUBLICATION``).

2. The targets (each on its own 127.0.0.1 port):

   ``direct``          the plain cluster; every ratio is taken against it;
   ``direct-syncrep``  the primary with the synchronous physical standby (a commit waits
                       for the standby's flush); checked to be ``sync`` before each run;
   ``pgbouncer``       PgBouncer (session pooling, SCRAM) in front of ``direct``'s cluster;
   ``pair-1phase``     the primary connmgr (``[mirror] peer``, redo monitor, purge markers)
                       in front of the pair's primary, mirroring every session to the
                       secondary connmgr (``[mirror] listen``, ``[poster]`` temporary slot on
                       the primary); ``[mirror] mode = "one-phase"``;
   ``pair-2phase``     the same with ``mode = "two-phase"`` (a COMMIT's reply is held until
                       the secondary connmgr acknowledged it). Skipped with a note when this
                       connmgr's configuration does not know ``[mirror] mode`` yet;
   ``direct-logical``  (opt-in, not in the default set) pgbench straight to the pair's
                       primary, no connmgr: what synchronous logical replication alone costs;
   ``pair-failover``   (opt-in) ``pair-2phase`` with ``[failover]`` configured (every
                       session keeps its replay journal and session recorder).

   The two connmgrs run as subprocesses (``python -m connmgr serve -c FILE``), started
   before and stopped after *each* run, so that their idle work (the redo monitor polls the
   primary every 5 ms, heartbeats) never steals CPU from another target's run. Both pair
   targets share one ClusterPair.
3. Workloads, ``-c 8 -j 2`` unless told otherwise: ``select`` = ``pgbench -S -M simple``,
   ``tpcb`` = the default tpcb-like script (simple protocol). Each run is a ``--warmup``
   run (``-n``, not counted) then a ``--seconds`` run. Rounds are interleaved: every round
   runs every workload against every target, in an order rotated from round to round and
   workload to workload, so slow drifts of the machine hit all targets alike.
4. During every ``tpcb`` run against a replicated target a thread samples the primary's
   ``pg_stat_replication`` every 100 ms (the standby's walsender; for the pair, the
   subscription's walsender, not connmgr's poster slot): ``write_lag``, ``replay_lag`` and
   ``pg_current_wal_lsn() - replay_lsn`` in bytes. The lag table gives p50/p99 over all
   samples of all rounds. For a logical subscriber "replay" means applied and committed.
5. Prints the median tps over rounds, pgbench's mean latency, the ratio to ``direct``'s
   median in the same run, and the spread ((max - min) / median over rounds), then the lag
   table. ``--json FILE`` writes everything, every single run included.

Everything shares the machine's cores (pgbench, connmgrs, every server), so the figures are
the whole stack on this box. Everything is removed on exit, also on Ctrl-C/SIGTERM; ``--keep``
keeps the temp dir (logs, configs, data directories).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "labs"))

import bench_proxy as bp  # noqa: E402
import psycopg  # noqa: E402
from bench_proxy import TargetUnavailable, first_error_line, kill_group, log, port_open, tail  # noqa: E402
from psycopg import sql  # noqa: E402

from connmgr import config as config_mod  # noqa: E402
from connmgr.embedded.cluster_pair import PAIR_SETTINGS, ClusterPair  # noqa: E402
from connmgr.embedded.clusters import (  # noqa: E402
    DEFAULT_SETTINGS,
    Cluster,
    ClusterError,
    _clean_env,
    _give_to_server_user,
    _run,
    _server_os_user,
    free_port,
    temp_base_dir,
)
from connmgr.errors import ConfigError  # noqa: E402
from connmgr.metrics import percentile as _percentile  # noqa: E402

HOST = "127.0.0.1"
USER = "postgres"
DB = "bench"
PASSWORD = "bench-password"
STANDBY_NAME = "bench_standby"
POSTER_SLOT = "connmgr_bench_poster"
DEFAULT_TARGETS = ("direct", "direct-syncrep", "pgbouncer", "pair-1phase", "pair-2phase")
#: ``direct-logical`` (opt-in): pgbench straight to the pair's primary, no connmgr -- the
#: cost of synchronous logical replication alone. ``pair-failover`` (opt-in): ``pair-2phase``
#: plus ``[failover]`` -- the per-message cost of the replay journal, the session recorder
#: and the freeze check.
ALL_TARGETS = (*DEFAULT_TARGETS, "direct-logical", "pair-failover")
ALL_WORKLOADS = ("select", "tpcb")
READY_TIMEOUT = 30.0
LAG_INTERVAL = 0.1

#: Every cluster (direct, syncrep primary and standby, pair primary and secondary) gets
#: connmgr.embedded.clusters.DEFAULT_SETTINGS, then these.
BENCH_SETTINGS: dict[str, str | int] = {
    **PAIR_SETTINGS,
    "shared_buffers": "256MB",
    "checkpoint_timeout": "30min",
    "max_wal_size": "4GB",
}
SETTINGS_NOTE = ", ".join(
    f"{k}={v}"
    for k, v in {**DEFAULT_SETTINGS, **BENCH_SETTINGS}.items()
    if k in ("fsync", "full_page_writes", "synchronous_commit", "wal_level", "shared_buffers",
             "checkpoint_timeout", "max_wal_size")
)  # fmt: skip


# --------------------------------------------------------------------------- helpers


def pgbench_env() -> dict[str, str]:
    env = _clean_env(PGCONNECT_TIMEOUT="10", PGPASSWORD=PASSWORD)
    return env


def run_pgbench(pgbench: str, port: int, args: list[str], timeout: float) -> tuple[int, str, str]:
    """pgbench against ``HOST:port``/``DB`` (bench_proxy's runner, with our password)."""
    return bp.run_pgbench(pgbench, port, args, timeout, env=pgbench_env(), db=DB)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string for what we write (paths, host:port)


def write_toml(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def mirror_mode_support() -> tuple[bool, str]:
    """Does this connmgr's config know ``[mirror] mode`` with one-phase and two-phase?
    Returns (supported, why not)."""
    for mode in ("one-phase", "two-phase"):
        try:
            config_mod.load(None, mirror={"peer": f"{HOST}:1", "mode": mode})
        except ConfigError as e:
            return False, f"connmgr.config.load refuses [mirror] mode = {mode!r}: {e}"
    return True, ""


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def percentile(values: list[float], q: float) -> float | None:
    """connmgr.metrics.percentile (nearest rank), None for no values (a column left empty)."""
    return _percentile(values, q) if values else None


class Proc:
    """A subprocess in its own process group, output in a fresh log file per start."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self.proc: subprocess.Popen | None = None
        self.ready = False

    def start(self, port: int, markers: list[str]) -> None:
        """Start; ready once every marker is in the log and ``port`` accepts TCP."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        )
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO, env=env, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = first_error_line(tail(self.log_path, 20))
                self.proc = None
                raise TargetUnavailable(f"{self.name} exited at startup ({why}); log {self.log_path}")
            text = self.log_path.read_text(errors="replace")
            if all(m in text for m in markers) and port_open(port):
                self.ready = True
                return
            time.sleep(0.05)
        self.stop()
        missing = [m for m in markers if m not in self.log_path.read_text(errors="replace")]
        raise TargetUnavailable(
            f"{self.name} not ready within {READY_TIMEOUT:g}s (log lacks {missing}); log {self.log_path}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_warnings(self, upto: int | None = None) -> list[str]:
        """WARNING/ERROR/CRITICAL lines of its log (connmgr's logging format), in the first
        ``upto`` bytes (e.g. up to the moment we began stopping it)."""
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read(upto if upto is not None else -1).decode(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if any(f" {lvl} " in ln for lvl in ("WARNING", "ERROR", "CRITICAL"))
                or ln.startswith("Traceback")]  # fmt: skip


# --------------------------------------------------------------------------- lag sampling


@dataclass
class LagSample:
    t: float
    write_lag_s: float | None
    flush_lag_s: float | None
    replay_lag_s: float | None
    lag_bytes: float | None
    sync_states: str


class LagSampler:
    """Samples ``pg_stat_replication`` of the named walsenders on ``cluster`` every 100 ms
    in a thread. With several walsenders a sample is the worst of them."""

    QUERY = (
        "SELECT extract(epoch FROM write_lag)::float8, extract(epoch FROM flush_lag)::float8,"
        " extract(epoch FROM replay_lag)::float8,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8, sync_state"
        " FROM pg_stat_replication WHERE application_name = ANY(%s)"
    )

    def __init__(self, cluster: Cluster, names: list[str]) -> None:
        self.cluster, self.names = cluster, names
        self.samples: list[LagSample] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lag-sampler", daemon=True)

    def start(self) -> LagSampler:
        self._thread.start()
        return self

    def stop(self) -> list[LagSample]:
        self._stop.set()
        self._thread.join(10)
        return self.samples

    def _main(self) -> None:
        try:
            with self.cluster.connect("postgres") as conn:
                t0 = time.monotonic()
                n = 0
                while not self._stop.is_set():
                    rows = conn.execute(self.QUERY, [self.names]).fetchall()
                    if rows:
                        def worst(i: int, rows=rows) -> float | None:
                            vals = [r[i] for r in rows if r[i] is not None]
                            return max(vals) if vals else None

                        self.samples.append(LagSample(
                            round(time.monotonic() - t0, 3), worst(0), worst(1), worst(2),
                            worst(3), ",".join(sorted(r[4] for r in rows)),
                        ))  # fmt: skip
                    n += 1
                    self._stop.wait(max(0.0, t0 + n * LAG_INTERVAL - time.monotonic()))
        except (psycopg.Error, ClusterError) as e:
            self.error = f"lag sampler: {e}"


def lag_stats(samples: list[LagSample]) -> dict:
    """p50/p99 of replay lag, write lag (seconds) and lag bytes; counts of non-null values."""
    out: dict = {"samples": len(samples)}
    for key in ("replay_lag_s", "write_lag_s", "lag_bytes"):
        vals = [getattr(s, key) for s in samples if getattr(s, key) is not None]
        out[key] = {"n": len(vals), "p50": percentile(vals, 0.5), "p99": percentile(vals, 0.99),
                    "max": max(vals) if vals else None}  # fmt: skip
    out["not_sync_samples"] = sum(1 for s in samples if any(x != "sync" for x in s.sync_states.split(",")))
    return out


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """Something pgbench connects to. ``prepare``/``release`` wrap every run."""

    name: str
    description: str
    port: int = 0
    lag_cluster: Cluster | None = None  # where replication lag is sampled (tpcb runs)
    lag_names: list[str] = field(default_factory=list)

    def prepare(self, tag: str) -> None:
        pass

    def release(self) -> list[str]:
        """Undo prepare; return notes worth reporting (e.g. warnings in a connmgr log)."""
        return []

    def proxy_pids(self) -> dict[str, int]:
        """Proxy processes whose CPU per transaction is reported."""
        return {}

    def stop(self) -> None:
        pass


@dataclass
class SyncRepTarget(Target):
    standby: Cluster | None = None

    def prepare(self, tag: str) -> None:
        wait_sync_state(self.lag_cluster, [STANDBY_NAME], timeout=15)

    def release(self) -> list[str]:
        wait_replayed(self.lag_cluster, [STANDBY_NAME], timeout=60)
        return []


@dataclass
class PgBouncerTarget(Target):
    proc: bp.ProcessTarget | None = None

    def prepare(self, tag: str) -> None:
        if not self.proc.alive():
            why = self.proc.describe_death() or "pgbouncer is not running"
            log(f"  {why}; restarting it")
            self.proc.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def proxy_pids(self) -> dict[str, int]:
        return {"pgbouncer": self.proc.proc.pid} if self.proc.alive() else {}


@dataclass
class PairTarget(Target):
    """The two connmgrs, started for each run in front of the shared ClusterPair."""

    pair: ClusterPair | None = None
    mode: str | None = None  # [mirror] mode; None: this connmgr has no such key
    failover: bool = False  # with [failover] (secondary = the pair's secondary)
    base: Path = Path("/nonexistent")
    users_file: Path = Path("/nonexistent")
    procs: list[Proc] = field(default_factory=list)

    def configs(self) -> tuple[Path, Path, int, int]:
        """Write both connmgr configs for one run; check them with connmgr's own loader
        (a ConfigError becomes TargetUnavailable). Returns (secondary, primary, port,
        secondary's client port)."""
        pair = self.pair
        mport, sport, self.port = free_port(HOST), free_port(HOST), free_port(HOST)
        common = {"shutdown_timeout": 5.0}
        secondary = write_toml(self.base / f"{self.name}-secondary.toml", {
            "server": {"listen": [f"{HOST}:{sport}"], **common},
            "primary": {"host": pair.secondary.host, "port": pair.secondary.port, "name": "secondary"},
            "auth": {"users_file": str(self.users_file)},
            "mirror": {"listen": f"{HOST}:{mport}"},
            "poster": {"host": pair.primary.host, "port": pair.primary.port, "user": USER,
                       "password": PASSWORD, "dbname": DB, "slot": POSTER_SLOT,
                       "temporary": True},
        })  # fmt: skip
        mirror: dict[str, object] = {"peer": f"{HOST}:{mport}"}
        if self.mode is not None:
            mirror["mode"] = self.mode
        primary = write_toml(self.base / f"{self.name}-primary.toml", {
            "server": {"listen": [f"{HOST}:{self.port}"], **common},
            "primary": {"host": pair.primary.host, "port": pair.primary.port},
            "auth": {"users_file": str(self.users_file)},
            "mirror": mirror,
            "redo": {"user": USER, "password": PASSWORD},
            **({"failover": {"secondary": f"{pair.secondary.host}:{pair.secondary.port}", "user": USER,
                             "password": PASSWORD}} if self.failover else {}),
        })  # fmt: skip
        for path in (secondary, primary):
            try:
                config_mod.load(path)
            except ConfigError as e:
                raise TargetUnavailable(f"configuration refused: {e}") from e
        return secondary, primary, sport, self.port

    def prepare(self, tag: str) -> None:
        self.pair.wait_sync(timeout=15)
        sec_cfg, pri_cfg, sport, port = self.configs()
        logs = self.base / "logs"
        logs.mkdir(exist_ok=True)
        serve = [sys.executable, "-m", "connmgr", "serve", "-c"]
        sec = Proc(f"{self.name} secondary connmgr", [*serve, str(sec_cfg)],
                   logs / f"{tag}-{self.name}-secondary.log")  # fmt: skip
        self.procs.append(sec)
        sec.start(sport, ["listening on", f"replication slot {POSTER_SLOT}"])
        pri = Proc(f"{self.name} primary connmgr", [*serve, str(pri_cfg)],
                   logs / f"{tag}-{self.name}-primary.log")  # fmt: skip
        self.procs.append(pri)
        pri.start(port, ["listening on", "mirror link up"])

    def release(self) -> list[str]:
        notes = []
        # What the connmgrs log while being stopped (the secondary sees the mirror link
        # break when the primary goes) is not about the run.
        sizes = [proc.log_size() for proc in self.procs]
        for proc, size in reversed(list(zip(self.procs, sizes, strict=True))):  # primary first
            died = proc.ready and not proc.alive()
            proc.stop()
            if died:
                notes.append(f"{proc.name} died during the run: {first_error_line(tail(proc.log_path, 20))}")
            warnings = proc.log_warnings(size)
            if warnings:
                notes.append(f"{proc.name}: {len(warnings)} warning(s), first: {warnings[0][-160:]}")
            ups = proc.log_path.read_text(errors="replace").count("mirror link up")
            if ups > 1:
                notes.append(f"{proc.name}: mirror link came up {ups} times")
        self.procs.clear()
        with contextlib.suppress(ClusterError):
            self.pair.wait_caught_up(timeout=60)
        return notes

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def proxy_pids(self) -> dict[str, int]:
        names = ("secondary connmgr", "primary connmgr")
        return {n: p.proc.pid for n, p in zip(names, self.procs, strict=False) if p.alive()}


def replication_rows(cluster: Cluster, names: list[str]) -> list[tuple]:
    with cluster.connect("postgres") as conn:
        return conn.execute(
            "SELECT application_name, state, sync_state FROM pg_stat_replication"
            " WHERE application_name = ANY(%s)", [names],
        ).fetchall()  # fmt: skip


def wait_sync_state(cluster: Cluster, names: list[str], timeout: float) -> None:
    """Wait until every named walsender is streaming with sync_state 'sync'."""
    deadline = time.monotonic() + timeout
    while True:
        rows = replication_rows(cluster, names)
        ok = {n for n, state, sync in rows if state == "streaming" and sync == "sync"}
        if set(names) <= ok:
            return
        if time.monotonic() >= deadline:
            raise TargetUnavailable(f"standby not synchronous after {timeout:g}s: {rows}")
        time.sleep(0.1)


def wait_replayed(cluster: Cluster, names: list[str], timeout: float) -> None:
    """Wait (best effort) until the named standbys replayed the primary's current LSN."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(psycopg.Error), cluster.connect("postgres") as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        while time.monotonic() < deadline:
            behind = conn.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = ANY(%s)"
                " AND (replay_lsn IS NULL OR replay_lsn < %s::pg_lsn)", [names, str(target)],
            ).fetchone()[0]  # fmt: skip
            if not behind:
                return
            time.sleep(0.05)


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Workload:
    name: str
    args: tuple[str, ...]


def workloads(clients: int, jobs: int) -> list[Workload]:
    c, j = ("-c", str(clients)), ("-j", str(jobs))
    return [
        Workload("select", ("-S", "-M", "simple", *c, *j)),
        Workload("tpcb", ("-M", "simple", *c, *j)),
    ]


@dataclass
class Run(bp.Run):
    """One measured pgbench run: bench_proxy's, plus notes and replication lag."""

    notes: list[str] = field(default_factory=list)
    lag: dict | None = None
    lag_samples: list[LagSample] = field(default_factory=list)
    #: CPU (user + system) of each proxy process during the measured run, µs per transaction
    cpu_us_per_tx: dict[str, float] = field(default_factory=dict)


def describe_run(run: Run) -> str:
    text = bp.describe_run(run)
    if run.lag and run.lag["replay_lag_s"]["n"]:
        r, b = run.lag["replay_lag_s"], run.lag["lag_bytes"]
        text += (f"; replay lag p50 {r['p50'] * 1e3:.2f} ms p99 {r['p99'] * 1e3:.2f} ms,"
                 f" {b['p50']:,.0f}/{b['p99']:,.0f} bytes")  # fmt: skip
    if run.cpu_us_per_tx:
        text += "; cpu/tx " + ", ".join(f"{n} {us:.0f} µs" for n, us in run.cpu_us_per_tx.items())
    for note in run.notes:
        text += f"; {note}"
    return text


# --------------------------------------------------------------------------- benchmark


class Bench:
    """Owns the temp dir, clusters, processes; ``cleanup`` removes them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base: Path | None = None
        self.clusters: list[Cluster] = []  # plain clusters, destroyed in reverse order
        self.pair: ClusterPair | None = None
        self.pgbench = ""
        self.targets: list[Target] = []
        self.skipped: dict[str, str] = {}
        self.runs: list[Run] = []
        self.workloads = [w for w in workloads(args.clients, args.jobs) if w.name in args.workloads]
        self.environment: dict = {}

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        self.base = temp_base_dir("connmgr-bench-pair-")
        log(f"temp dir {self.base}")
        wanted = set(self.args.targets)
        (self.base / "logs").mkdir()
        self.users_file = self.base / "userlist.txt"
        self.users_file.write_text(f'"{USER}" "{PASSWORD}"\n')
        self.users_file.chmod(0o644)  # pgbouncer (as the server OS user) reads it too

        direct = None
        if wanted & {"direct", "pgbouncer"}:
            direct = self._plain_cluster("direct")
        if "direct-syncrep" in wanted:
            self._setup_syncrep()
        if wanted & {"pair-1phase", "pair-2phase", "direct-logical", "pair-failover"}:
            self._setup_pair()
        self.pgbench = self.pgbench or "pgbench"
        for cluster in [*self.clusters, *([self.pair.primary, self.pair.secondary] if self.pair else [])]:
            cluster.psql("CHECKPOINT")
        self._record_environment()

        for name in self.args.targets:
            try:
                target = self._make_target(name, direct)
            except (TargetUnavailable, ClusterError, psycopg.Error) as e:
                self.skipped[name] = str(e)
                log(f"{name}: SKIPPED - {e}")
                continue
            log(f"{name}: ready ({target.description})")
            self.targets.append(target)

    def _find_pgbench(self, cluster: Cluster) -> None:
        if not self.pgbench:
            own = cluster.bindir / "pgbench"
            exe = str(own) if os.access(own, os.X_OK) else shutil.which("pgbench")
            if not exe:
                raise SystemExit("pgbench not found (next to the server binaries or on PATH)")
            self.pgbench = exe

    def _pgbench_init(self, cluster: Cluster, extra: list[str] | None = None) -> None:
        self._find_pgbench(cluster)
        args = ["-i", "-q", "-s", str(self.args.scale), *(extra or [])]
        rc, out, err = run_pgbench(self.pgbench, cluster.port, args, timeout=3600)
        if rc != 0:
            raise ClusterError(f"pgbench {' '.join(args)} on {cluster.name} failed: "
                               f"{first_error_line(err + out)}")  # fmt: skip

    def _plain_cluster(self, name: str) -> Cluster:
        t0 = time.monotonic()
        cluster = Cluster.create(self.base, name, password=PASSWORD, settings=BENCH_SETTINGS)
        self.clusters.append(cluster)
        cluster.start()
        cluster.create_database(DB)
        log(f"{name}: cluster on port {cluster.port}, pgbench -i -s {self.args.scale} ...")
        self._pgbench_init(cluster)
        log(f"{name}: ready in {time.monotonic() - t0:.1f}s")
        return cluster

    def _setup_syncrep(self) -> None:
        primary = self._plain_cluster("srprimary")
        t0 = time.monotonic()
        user = _server_os_user()
        root = self.base / "standby"
        root.mkdir(mode=0o700)
        _give_to_server_user(root, user)
        sock = root / "sock"
        sock.mkdir(mode=0o700)
        _give_to_server_user(sock, user)
        standby = Cluster(name="standby", datadir=root / "data", host=HOST, port=free_port(HOST),
                          bindir=primary.bindir, superuser=USER, password=PASSWORD,
                          log_path=root / "server.log", socket_dir=sock)  # fmt: skip
        self.clusters.append(standby)
        log("srprimary: pg_basebackup -R of a streaming standby ...")
        _run([primary.bindir / "pg_basebackup", "-h", primary.host, "-p", str(primary.port),
              "-U", USER, "-D", standby.datadir, "-R", "-X", "stream", "-c", "fast", "--no-sync",
              "-d", f"application_name={STANDBY_NAME}"],
             "pg_basebackup of srprimary", as_server=True, timeout=1800, cwd=root,
             env=_clean_env(PGPASSWORD=PASSWORD))  # fmt: skip
        # postgresql.conf came with the copy: the standby needs its own port and socket dir
        # (appending keeps the file's owner).
        with open(standby.datadir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write(f"\n# ---- standby (bench_pair) ----\nport = {standby.port}\n"
                    f"unix_socket_directories = '{sock}'\nhot_standby = on\n")  # fmt: skip
        auto = (standby.datadir / "postgresql.auto.conf").read_text()
        if f"application_name={STANDBY_NAME}" not in auto.replace("'", ""):
            raise ClusterError(f"pg_basebackup -R wrote no application_name: {auto!r}")
        standby.start()
        with primary.connect() as conn:
            conn.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(
                sql.Literal(f'"{STANDBY_NAME}"')))  # fmt: skip
            conn.execute("ALTER SYSTEM SET synchronous_commit = on")
            conn.execute("SELECT pg_reload_conf()")
        wait_sync_state(primary, [STANDBY_NAME], timeout=30)
        log(f"srprimary: standby port {standby.port} is 'sync' ({time.monotonic() - t0:.1f}s)")
        self.syncrep = (primary, standby)

    def _setup_pair(self) -> None:
        t0 = time.monotonic()
        log("pair: creating primary + secondary with synchronous logical replication ...")
        self.pair = pair = ClusterPair.create(self.base / "pair", databases=(DB,), password=PASSWORD,
                                              settings=BENCH_SETTINGS, timeout=60)  # fmt: skip
        self._find_pgbench(pair.primary)
        # DDL does not replicate: the secondary gets the tables and keys, no data, first
        # (so the apply worker meets no unknown table); then the primary is filled, and
        # the subscription refresh copies the tables.
        log(f"pair: pgbench -i -s {self.args.scale} (tables on the secondary, data on the primary) ...")
        self._pgbench_init(pair.secondary, ["-I", "dtp"])
        self._pgbench_init(pair.primary)
        with pair.secondary.connect(DB) as conn:
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = true)")
                         .format(sql.Identifier(pair.subscription_name(DB))))  # fmt: skip
        pair.wait_tables_ready(timeout=1800)
        with pair.secondary.connect(DB) as conn:
            conn.execute("VACUUM ANALYZE")
        pair.wait_sync(timeout=30)
        pair.wait_caught_up(timeout=60)
        n = pair.secondary.psql("SELECT count(*) FROM pgbench_accounts", dbname=DB)
        log(f"pair: ports {pair.primary.port}/{pair.secondary.port}, secondary has {n} accounts,"
            f" subscription 'sync' ({time.monotonic() - t0:.1f}s)")  # fmt: skip

    def _make_target(self, name: str, direct: Cluster | None) -> Target:
        if name == "direct":
            return Target(name, "Postgres, no replica", direct.port)
        if name == "direct-syncrep":
            primary, standby = self.syncrep
            return SyncRepTarget(
                name, "Postgres + physical streaming standby, synchronous_standby_names ="
                f" '{STANDBY_NAME}', synchronous_commit = on (commit waits for the standby's"
                " flush)", primary.port, primary, [STANDBY_NAME], standby=standby,
            )  # fmt: skip
        if name == "pgbouncer":
            return self._make_pgbouncer(direct)
        if name == "direct-logical":
            return Target(
                name, "the pair's primary Postgres straight, no connmgr: synchronous logical"
                " replication to the pair's secondary (commit waits until applied there)",
                self.pair.primary.port, self.pair.primary, self.pair.subscription_names,
            )  # fmt: skip
        # the pair
        supported, why = mirror_mode_support()
        self.environment["mirror_mode_supported"] = supported
        wanted_mode = "one-phase" if name == "pair-1phase" else "two-phase"
        failover = name == "pair-failover"
        if not supported and wanted_mode == "two-phase":
            raise TargetUnavailable(why)
        desc = (
            "primary connmgr (mirror peer, redo monitor, markers) -> pair primary; secondary"
            " connmgr (mirror listen, poster slot); synchronous logical replication (commit"
            " waits until applied on the secondary); "
        )
        desc += f'[mirror] mode = "{wanted_mode}"' if supported else (
            "no [mirror] mode key in this connmgr: its only (one-phase) behaviour")
        if failover:
            desc += "; [failover] secondary = the pair's secondary (replay journal, session recorder)"
        target = PairTarget(name, desc, 0, self.pair.primary, self.pair.subscription_names,
                            pair=self.pair, mode=wanted_mode if supported else None,
                            base=self.base, users_file=self.users_file, failover=failover)  # fmt: skip
        # Catch a refused configuration (or a connmgr that cannot start) now, not per run.
        try:
            target.prepare("check")
        finally:
            target.release()
        return target

    def _make_pgbouncer(self, direct: Cluster) -> Target:
        exe = shutil.which("pgbouncer") or next(
            (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)),
            None,
        )
        if exe is None:
            raise TargetUnavailable("pgbouncer is not installed (apt-get install -y pgbouncer)")
        directory = self.base / "pgbouncer"
        directory.mkdir()
        run_as = bp.server_os_user()  # PgBouncer refuses to run as root
        port = free_port(HOST)
        ini = directory / "pgbouncer.ini"
        ini.write_text(f"""\
[databases]
* = host={HOST} port={direct.port}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.users_file}
pool_mode = session
max_client_conn = 1000
default_pool_size = 100
max_db_connections = 0
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
""")
        if run_as is not None:
            for path in (directory, ini):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
        proc = bp.ProcessTarget("pgbouncer", port, argv=[exe, str(ini)], cwd=directory,
                                log_path=self.base / "logs" / "pgbouncer.log",
                                ready_marker=None, run_as=run_as)  # fmt: skip
        proc.start()
        self.environment["pgbouncer"] = first_error_line(
            subprocess.run([exe, "--version"], capture_output=True, text=True).stdout)
        return PgBouncerTarget("pgbouncer", "PgBouncer, session pooling, SCRAM, in front of"
                               " the direct cluster", port, proc=proc)  # fmt: skip

    def _record_environment(self) -> None:
        cluster = self.clusters[0] if self.clusters else self.pair.primary
        self.environment.update({
            "postgres": cluster.psql("SELECT version()"),
            "python": sys.version.split()[0],
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "cluster_settings": {**DEFAULT_SETTINGS, **BENCH_SETTINGS},
        })  # fmt: skip

    # ------------------------------------------------------------ runs

    def run_rounds(self) -> None:
        a = self.args
        n_runs = a.rounds * len(self.workloads) * len(self.targets)
        log(f"{n_runs} runs of {a.warmup}s warm-up + {a.seconds}s "
            f"(≈{n_runs * (a.seconds + a.warmup + 3) / 60:.1f} min)")  # fmt: skip
        for rnd in range(a.rounds):
            for i, wl in enumerate(self.workloads):
                k = (rnd + i) % len(self.targets)
                for target in self.targets[k:] + self.targets[:k]:
                    log(f"round {rnd + 1}/{a.rounds}: {wl.name} via {target.name} ...")
                    run = self.bench_once(target, wl, rnd + 1)
                    self.runs.append(run)
                    log(f"round {rnd + 1}/{a.rounds}: {wl.name} via {target.name}: {describe_run(run)}")

    def bench_once(self, target: Target, wl: Workload, rnd: int) -> Run:
        """Warm up, then measure ``wl`` against ``target``; never raises for a failing target."""
        run = Run(rnd, wl.name, target.name)
        a = self.args
        try:
            target.prepare(f"r{rnd}-{wl.name}")
        except (TargetUnavailable, ClusterError, psycopg.Error) as e:
            run.error = f"could not prepare: {e}"
            run.notes += target.release()
            return run
        sampler = None
        try:
            if a.warmup > 0:
                rc, out, err = run_pgbench(self.pgbench, target.port,
                                           ["-n", "-T", str(a.warmup), *wl.args], timeout=a.warmup + 120)  # fmt: skip
                if rc != 0:
                    run.error = f"warm-up failed: {first_error_line(err + chr(10) + out)}"
                    return run
            if wl.name == "tpcb" and target.lag_cluster is not None:
                sampler = LagSampler(target.lag_cluster, target.lag_names).start()
            pids = target.proxy_pids()
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.monotonic()
            rc, out, err = run_pgbench(self.pgbench, target.port, ["-T", str(a.seconds), *wl.args],
                                       timeout=a.seconds + 120)  # fmt: skip
            run.wall_s = round(time.monotonic() - t0, 2)
            cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            if sampler is not None:
                run.lag_samples = sampler.stop()
                run.lag = lag_stats(run.lag_samples)
                if sampler.error:
                    run.notes.append(sampler.error)
                sampler = None
            for key, value in bp.parse_pgbench(out).items():
                setattr(run, key, value)
            if rc == 0 and run.tps is not None:
                run.ok = True
                for name in pids:
                    if cpu0[name] is not None and cpu1[name] is not None and run.transactions:
                        run.cpu_us_per_tx[name] = round(1e6 * (cpu1[name] - cpu0[name]) / run.transactions, 1)
            else:
                run.error = first_error_line(err + "\n" + out)
                if rc not in (0, -1):
                    run.error = f"(exit {rc}) {run.error}"
        finally:
            if sampler is not None:
                sampler.stop()
            try:
                run.notes += target.release()
            except (ClusterError, psycopg.Error) as e:
                run.notes.append(f"release: {e}")
        return run

    # ------------------------------------------------------------ output

    def summary_rows(self) -> list[bp.Row]:
        rows = bp.summarize(self.runs, [w.name for w in self.workloads], [t.name for t in self.targets])
        for row in rows:
            notes = []
            for r in self.runs:
                if r.workload == row.workload and r.target == row.target:
                    notes += [n for n in r.notes if n not in notes]
            if notes:
                row.note = "; ".join(filter(None, [row.note, *notes]))
        return rows

    def cpu_summary(self) -> list[tuple[str, str, dict[str, float]]]:
        """(workload, target, {process: median µs per transaction}) for proxied targets."""
        out = []
        for wl in self.workloads:
            for target in self.targets:
                runs = [r for r in self.runs if r.workload == wl.name and r.target == target.name
                        and r.ok and r.cpu_us_per_tx]  # fmt: skip
                names = list(dict.fromkeys(n for r in runs for n in r.cpu_us_per_tx))
                if names:
                    out.append((wl.name, target.name, {
                        n: statistics.median(r.cpu_us_per_tx[n] for r in runs if n in r.cpu_us_per_tx)
                        for n in names}))  # fmt: skip
        return out

    def print_cpu(self) -> None:
        rows = self.cpu_summary()
        if not rows:
            return
        print()
        print("proxy CPU (user + system, /proc/PID/stat) per transaction during the run, median µs")
        w1 = max(len("workload"), *(len(r[0]) for r in rows))
        w2 = max(len("target"), *(len(r[1]) for r in rows))
        for wl, target, cpu in rows:
            parts = "  ".join(f"{name} {us:,.1f}" for name, us in cpu.items())
            total = f"  (total {sum(cpu.values()):,.1f})" if len(cpu) > 1 else ""
            print(f"{wl.ljust(w1)}  {target.ljust(w2)}  {parts}{total}")

    def lag_summary(self) -> dict[str, dict]:
        out = {}
        for target in self.targets:
            if target.lag_cluster is None:
                continue
            samples = [s for r in self.runs if r.target == target.name and r.workload == "tpcb"
                       for s in r.lag_samples]  # fmt: skip
            if samples:
                out[target.name] = lag_stats(samples)
        return out

    def report(self) -> None:
        a = self.args
        if not self.runs:
            log("no runs completed")
        else:
            rounds = len({r.round for r in self.runs})
            title = (f"pgbench -c {a.clients} -j {a.jobs}, {a.seconds}s per run after {a.warmup}s"
                     f" warm-up, median of {rounds} round(s), scale {a.scale}")  # fmt: skip
            print()
            bp.print_plain_table(self.summary_rows(), title)
            self.print_lag()
            self.print_cpu()
        print()
        print("targets:")
        width = max((len(t.name) for t in self.targets), default=0)
        for t in self.targets:
            print(f"  {t.name.ljust(width)}  {t.description}")
        print(f"every cluster: {SETTINGS_NOTE}; SCRAM over TCP")
        for name, why in self.skipped.items():
            print(f"{name}: skipped - {why}")
        if a.json:
            self.write_json(Path(a.json))

    def print_lag(self) -> None:
        lag = self.lag_summary()
        if not lag:
            return

        def ms(v):
            return "-" if v is None else f"{v * 1e3:.2f}"

        def nbytes(v):
            return "-" if v is None else f"{v:,.0f}"

        headers = ["target", "samples", "replay p50 ms", "replay p99 ms", "write p50 ms",
                   "write p99 ms", "bytes p50", "bytes p99", "not sync"]  # fmt: skip
        cells = [[name, str(s["samples"]), ms(s["replay_lag_s"]["p50"]), ms(s["replay_lag_s"]["p99"]),
                  ms(s["write_lag_s"]["p50"]), ms(s["write_lag_s"]["p99"]),
                  nbytes(s["lag_bytes"]["p50"]), nbytes(s["lag_bytes"]["p99"]),
                  str(s["not_sync_samples"])] for name, s in lag.items()]  # fmt: skip
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

        def line(vals):
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(vals, widths, strict=True)))  # fmt: skip

        print()
        print(f"replication lag during tpcb, sampled every {LAG_INTERVAL * 1e3:.0f} ms on the primary"
              " (pg_stat_replication replay_lag / write_lag; bytes = pg_current_wal_lsn() - replay_lsn)")
        print(line(headers))
        print(line(["-" * w for w in widths]))
        for c in cells:
            print(line(c))

    def write_json(self, path: Path) -> None:
        runs = []
        for r in self.runs:
            d = asdict(r)
            d.pop("lag_samples")
            runs.append(d)
        data = {
            "config": dict(vars(self.args)),
            "environment": self.environment,
            "workloads": {w.name: list(w.args) for w in self.workloads},
            "targets": {t.name: t.description for t in self.targets},
            "skipped": self.skipped,
            "runs": runs,
            "summary": [asdict(r) for r in self.summary_rows()],
            "lag_tpcb": self.lag_summary(),
            "proxy_cpu_us_per_tx": [{"workload": w, "target": t, "median": c}
                                    for w, t, c in self.cpu_summary()],  # fmt: skip
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        log(f"figures written to {path}")

    # ------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Stop every process we started and remove every cluster; each step on its own."""
        for target in self.targets:
            try:
                target.stop()
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log(f"could not stop {target.name}: {e}")
        if self.pair is not None:
            try:
                if self.args.keep:
                    self.pair.secondary.stop("fast")
                    self.pair.primary.stop("fast")
                else:
                    self.pair.destroy()
            except ClusterError as e:
                log(f"pair cleanup: {e}")
        for cluster in reversed(self.clusters):
            try:
                if self.args.keep:
                    cluster.stop("fast")
                else:
                    cluster.destroy()
            except ClusterError as e:
                log(f"cluster {cluster.name} cleanup: {e}")
        if self.base is not None:
            if self.args.keep:
                log(f"kept {self.base}")
            else:
                shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the connmgr pair against direct Postgres, a synchronous"
        " physical standby and PgBouncer.",
        epilog="See the module docstring (labs/bench_pair.py) for what the figures mean.",
    )
    p.add_argument("--seconds", type=int, default=10, help="duration of each run (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up before each run, s (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 s, 1 s warm-up")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: all but"
                   " direct-logical)")  # fmt: skip
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                   help=f"comma-separated subset of {','.join(ALL_WORKLOADS)}")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs, configs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 3, 1
    args.targets = bp.split_choices(p, "--targets", args.targets, ALL_TARGETS)
    args.workloads = bp.split_choices(p, "--workloads", args.workloads, ALL_WORKLOADS)
    if args.seconds < 1 or args.rounds < 1 or args.warmup < 0 or args.scale < 1:
        p.error("--seconds, --rounds and --scale must be at least 1, --warmup at least 0")
    return args


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bench = Bench(args)
    status = 0
    try:
        bench.setup()
        if not bench.targets:
            log("no target could be started")
            return 1
        bench.run_rounds()
        bench.report()
    except KeyboardInterrupt:
        log("interrupted; partial results follow")
        status = 130
        with contextlib.suppress(Exception):
            bench.report()
    except (ClusterError, TargetUnavailable, psycopg.Error) as e:
        log(f"setup failed: {e}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
