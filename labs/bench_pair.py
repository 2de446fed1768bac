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
                       session keeps its replay journal and session recorder);
   ``pair-failover-w2`` (opt-in) ``pair-failover`` with the primary connmgr's
                       ``[server] workers = 2`` (each worker mirrors its own sessions).

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
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchkit.targets as kit  # noqa: E402
import psycopg  # noqa: E402
from benchkit.harness import Bench, add_arguments, check_arguments, run_bench  # noqa: E402
from benchkit.pgbench import Run, Workload  # noqa: E402
from benchkit.procs import HOST, Service, TargetUnavailable, first_error_line, log, tail  # noqa: E402
from benchkit.report import table_lines  # noqa: E402
from benchkit.targets import connmgr_serve  # noqa: E402
from psycopg import sql  # noqa: E402

from connmgr import config as config_mod  # noqa: E402
from connmgr.embedded.cluster_pair import PAIR_SETTINGS, ClusterPair  # noqa: E402
from connmgr.embedded.clusters import (  # noqa: E402
    DEFAULT_SETTINGS,
    Cluster,
    ClusterError,
    clean_env,
    free_port,
    give_to_server_user,
    run_tool,
    server_os_user,
)
from connmgr.errors import ConfigError  # noqa: E402
from connmgr.metrics import percentile as _percentile  # noqa: E402

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
ALL_TARGETS = (*DEFAULT_TARGETS, "direct-logical", "pair-failover", "pair-failover-w2")
ALL_WORKLOADS = ("select", "tpcb")
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


def percentile(values: list[float], q: float) -> float | None:
    """connmgr.metrics.percentile (nearest rank), None for no values (a column left empty)."""
    return _percentile(values, q) if values else None


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
class Target(kit.Target):
    """A target whose replication lag may be sampled during tpcb runs."""

    lag_cluster: Cluster | None = None  # where replication lag is sampled (tpcb runs)
    lag_names: list[str] = field(default_factory=list)


@dataclass
class SyncRepTarget(Target):
    standby: Cluster | None = None

    def prepare(self, tag: str) -> None:
        wait_sync_state(self.lag_cluster, [STANDBY_NAME], timeout=15)

    def release(self) -> list[str]:
        wait_replayed(self.lag_cluster, [STANDBY_NAME], timeout=60)
        return []


@dataclass
class PairTarget(Target):
    """The two connmgrs, started for each run in front of the shared ClusterPair."""

    pair: ClusterPair | None = None
    mode: str | None = None  # [mirror] mode; None: this connmgr has no such key
    failover: bool = False  # with [failover] (secondary = the pair's secondary)
    workers: int = 1  # the primary connmgr's [server] workers
    base: Path = Path("/nonexistent")
    users_file: Path = Path("/nonexistent")
    services: list[Service] = field(default_factory=list)

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
            "server": {"listen": [f"{HOST}:{self.port}"], **common,
                       **({"workers": self.workers} if self.workers > 1 else {})},
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
        sec_cfg, pri_cfg, sport, pport = self.configs()
        logs = self.base / "logs"
        for role, cfg, port, markers in (
            ("secondary", sec_cfg, sport, ("listening on", f"replication slot {POSTER_SLOT}")),
            ("primary", pri_cfg, pport, ("listening on", "mirror link up")),
        ):
            service = Service(f"{self.name} {role} connmgr", connmgr_serve("-c", str(cfg)), port,
                              logs / f"{tag}-{self.name}-{role}.log", markers, stop_timeout=10)  # fmt: skip
            self.services.append(service)
            service.start()

    def release(self) -> list[str]:
        notes = []
        # What the connmgrs log while being stopped (the secondary sees the mirror link
        # break when the primary goes) is not about the run.
        sizes = [service.log_size() for service in self.services]
        for service, size in reversed(list(zip(self.services, sizes, strict=True))):  # primary first
            died = service.ready and not service.alive()
            service.stop()
            if died:
                notes.append(f"{service.name} died during the run: {first_error_line(tail(service.log_path, 20))}")
            warnings = service.log_warnings(size)
            if warnings:
                notes.append(f"{service.name}: {len(warnings)} warning(s), first: {warnings[0][-160:]}")
            ups = service.log_text().count("mirror link up")
            if ups > self.workers:
                notes.append(f"{service.name}: mirror link came up {ups} times")
        self.services.clear()
        with contextlib.suppress(ClusterError):
            self.pair.wait_caught_up(timeout=60)
        return notes

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    def proxy_pids(self) -> dict[str, int]:
        """The two connmgrs (with workers, the primary's supervisor and each worker, ``/wI``)."""
        names = ("secondary connmgr", "primary connmgr")
        pids = {n: s.pid() for n, s in zip(names, self.services, strict=False) if s.alive()}
        if self.workers > 1 and "primary connmgr" in pids:
            pids.update({f"primary connmgr/w{i}": c for i, c in enumerate(kit.child_pids(pids["primary connmgr"]))})
        return pids


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


def workloads(clients: int, jobs: int) -> list[Workload]:
    c, j = ("-c", str(clients)), ("-j", str(jobs))
    return [
        Workload("select", ("-S", "-M", "simple", *c, *j)),
        Workload("tpcb", ("-M", "simple", *c, *j)),
    ]


@dataclass
class PairRun(Run):
    """One measured pgbench run, with the replication lag sampled during it."""

    lag: dict | None = None
    lag_samples: list[LagSample] = field(default_factory=list)

    def details(self) -> list[str]:
        out = []
        if self.lag and self.lag["replay_lag_s"]["n"]:
            r, b = self.lag["replay_lag_s"], self.lag["lag_bytes"]
            out.append(f"replay lag p50 {r['p50'] * 1e3:.2f} ms p99 {r['p99'] * 1e3:.2f} ms,"
                       f" {b['p50']:,.0f}/{b['p99']:,.0f} bytes")  # fmt: skip
        if self.cpu_us_per_tx:
            out.append("cpu/tx " + ", ".join(f"{n} {us:.0f} µs" for n, us in self.cpu_us_per_tx.items()))
        return out

    def to_json(self) -> dict:
        d = super().to_json()
        d.pop("lag_samples")
        return d


# --------------------------------------------------------------------------- benchmark


class PairBench(Bench):
    """Clusters for direct, direct-syncrep and the pair; the pair's connmgrs run per run."""

    temp_prefix = "connmgr-bench-pair-"
    db = DB
    password = PASSWORD
    run_type = PairRun
    run_overhead_s = 3

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, workloads(args.clients, args.jobs))
        self.warmup = args.warmup
        self.pair: ClusterPair | None = None
        self.direct: Cluster | None = None
        self.syncrep: tuple[Cluster, Cluster] | None = None  # primary, standby
        self.users_file = Path("/nonexistent")  # SCRAM secrets of connmgr and PgBouncer

    # ------------------------------------------------------------ setup

    def make_clusters(self) -> None:
        wanted = set(self.args.targets)
        self.users_file = self.base / "userlist.txt"
        self.users_file.write_text(f'"{USER}" "{PASSWORD}"\n')
        self.users_file.chmod(0o644)  # pgbouncer (as the server OS user) reads it too
        if wanted & {"direct", "pgbouncer"}:
            self.direct = self._plain_cluster("direct")
        if "direct-syncrep" in wanted:
            self._setup_syncrep()
        if wanted & {"pair-1phase", "pair-2phase", "direct-logical", "pair-failover", "pair-failover-w2"}:
            self._setup_pair()
        every = [*self.clusters, *([self.pair.primary, self.pair.secondary] if self.pair else [])]
        for cluster in every:
            cluster.psql("CHECKPOINT")
        self.record_environment(every[0], cluster_settings={**DEFAULT_SETTINGS, **BENCH_SETTINGS})

    def _plain_cluster(self, name: str) -> Cluster:
        t0 = time.monotonic()
        cluster = self.new_cluster(name, password=PASSWORD, settings=BENCH_SETTINGS)
        cluster.create_database(DB)
        log(f"{name}: cluster on port {cluster.port}, pgbench -i -s {self.args.scale} ...")
        self.pgbench_init(cluster)
        log(f"{name}: ready in {time.monotonic() - t0:.1f}s")
        return cluster

    def _setup_syncrep(self) -> None:
        primary = self._plain_cluster("srprimary")
        t0 = time.monotonic()
        user = server_os_user()
        root = self.base / "standby"
        root.mkdir(mode=0o700)
        give_to_server_user(root, user)
        sock = root / "sock"
        sock.mkdir(mode=0o700)
        give_to_server_user(sock, user)
        standby = Cluster(name="standby", datadir=root / "data", host=HOST, port=free_port(HOST),
                          bindir=primary.bindir, superuser=USER, password=PASSWORD,
                          log_path=root / "server.log", socket_dir=sock)  # fmt: skip
        self.clusters.append(standby)
        log("srprimary: pg_basebackup -R of a streaming standby ...")
        run_tool([primary.bindir / "pg_basebackup", "-h", primary.host, "-p", str(primary.port),
              "-U", USER, "-D", standby.datadir, "-R", "-X", "stream", "-c", "fast", "--no-sync",
              "-d", f"application_name={STANDBY_NAME}"],
             "pg_basebackup of srprimary", as_server=True, timeout=1800, cwd=root,
             env=clean_env(PGPASSWORD=PASSWORD))  # fmt: skip
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
        # DDL does not replicate: the secondary gets the tables and keys, no data, first
        # (so the apply worker meets no unknown table); then the primary is filled, and
        # the subscription refresh copies the tables.
        log(f"pair: pgbench -i -s {self.args.scale} (tables on the secondary, data on the primary) ...")
        self.pgbench_init(pair.secondary, ["-I", "dtp"])
        self.pgbench_init(pair.primary)
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

    def make_target(self, name: str) -> Target:
        direct = self.direct
        if name == "direct":
            return Target(name, direct.port, "Postgres, no replica")
        if name == "direct-syncrep":
            primary, standby = self.syncrep
            return SyncRepTarget(
                name, primary.port, "Postgres + physical streaming standby,"
                f" synchronous_standby_names = '{STANDBY_NAME}', synchronous_commit = on (commit"
                " waits for the standby's flush)", lag_cluster=primary, lag_names=[STANDBY_NAME],
                standby=standby,
            )  # fmt: skip
        if name == "pgbouncer":
            service = self.start_pgbouncer(direct.port, auth_type="scram-sha-256",
                                           auth_file=self.users_file, pool_mode="session")  # fmt: skip
            return Target(name, service.port, "PgBouncer, session pooling, SCRAM, in front of"
                          " the direct cluster", service=service)  # fmt: skip
        if name == "direct-logical":
            return Target(
                name, self.pair.primary.port, "the pair's primary Postgres straight, no connmgr:"
                " synchronous logical replication to the pair's secondary (commit waits until"
                " applied there)", lag_cluster=self.pair.primary,
                lag_names=self.pair.subscription_names,
            )  # fmt: skip
        # the pair
        supported, why = mirror_mode_support()
        self.environment["mirror_mode_supported"] = supported
        wanted_mode = "one-phase" if name == "pair-1phase" else "two-phase"
        failover = name.startswith("pair-failover")
        workers = 2 if name.endswith("-w2") else 1
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
        if workers > 1:
            desc += f"; the primary connmgr with [server] workers = {workers} (one failover for all)"
        target = PairTarget(name, 0, desc, lag_cluster=self.pair.primary,
                            lag_names=self.pair.subscription_names, pair=self.pair,
                            mode=wanted_mode if supported else None, base=self.base,
                            users_file=self.users_file, failover=failover, workers=workers)  # fmt: skip
        # Catch a refused configuration (or a connmgr that cannot start) now, not per run.
        try:
            target.prepare("check")
        finally:
            target.release()
        return target

    # ------------------------------------------------------------ runs

    def measure(self, target: Target, wl: Workload, run: PairRun) -> None:
        """The measured run, with the replication lag sampled during tpcb."""
        sampler = None
        if wl.name == "tpcb" and target.lag_cluster is not None:
            sampler = LagSampler(target.lag_cluster, target.lag_names).start()
        try:
            super().measure(target, wl, run)
        finally:
            if sampler is not None:
                run.lag_samples = sampler.stop()
                run.lag = lag_stats(run.lag_samples)
                if sampler.error:
                    run.notes.append(sampler.error)

    # ------------------------------------------------------------ output

    def title(self, rounds: int) -> str:
        a = self.args
        return (f"pgbench -c {a.clients} -j {a.jobs}, {a.seconds}s per run after {a.warmup}s"
                f" warm-up, median of {rounds} round(s), scale {a.scale}")  # fmt: skip

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

    def report_more(self) -> None:
        self.print_lag()
        self.print_cpu()
        print()
        print("targets:")
        width = max((len(t.name) for t in self.targets), default=0)
        for t in self.targets:
            print(f"  {t.name.ljust(width)}  {t.description}")
        print(f"every cluster: {SETTINGS_NOTE}; SCRAM over TCP")

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
        print()
        print(f"replication lag during tpcb, sampled every {LAG_INTERVAL * 1e3:.0f} ms on the primary"
              " (pg_stat_replication replay_lag / write_lag; bytes = pg_current_wal_lsn() - replay_lsn)")
        for line in table_lines(headers, cells, right=range(1, len(headers))):
            print(line)

    def json_more(self) -> dict:
        return {
            "targets": {t.name: t.description for t in self.targets},
            "lag_tpcb": self.lag_summary(),
            "proxy_cpu_us_per_tx": [{"workload": w, "target": t, "median": c}
                                    for w, t, c in self.cpu_summary()],  # fmt: skip
        }

    # ------------------------------------------------------------ cleanup

    def remove_clusters(self) -> None:
        if self.pair is not None:
            try:
                if self.args.keep:
                    self.pair.secondary.stop("fast")
                    self.pair.primary.stop("fast")
                else:
                    self.pair.destroy()
            except ClusterError as e:
                log(f"pair cleanup: {e}")
        super().remove_clusters()


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the connmgr pair against direct Postgres, a synchronous"
        " physical standby and PgBouncer.",
        epilog="See the module docstring (labs/bench_pair.py) for what the figures mean.",
    )
    add_arguments(p, rounds=3, targets=ALL_TARGETS, default_targets=DEFAULT_TARGETS,
                  workloads=ALL_WORKLOADS)  # fmt: skip
    p.add_argument("--warmup", type=int, default=2, help="warm-up before each run, s (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 s, 1 s warm-up")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 3, 1
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return check_arguments(p, args, ALL_TARGETS, ALL_WORKLOADS)


def main(argv: list[str] | None = None) -> int:
    return run_bench(PairBench(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
