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
   ``connmgr-wN`` the same with ``--workers N`` (N = 2, 3, 4): a supervisor and N worker
                  processes sharing the port; after the table, a scaling table compares
                  each with ``connmgr`` (N = 1): tps ratio, efficiency (ratio / N, the
                  issue's target is >= 0.7), and the CPU of all its processes per
                  transaction;
   ``connmgr-policy`` the same with ``--policy``: a class takes every client and refuses
                  objects and kinds pgbench never uses (issue 16: the analysis's cost,
                  each statement split, classified, parsed and checked, decisions cached);
   ``connmgr-masks`` the same with a mask on pgbench_accounts.filler, which pgbench never
                  reads (each statement's output columns traced; nothing masked);
   ``connmgr-masked`` a mask on pgbench_accounts.abalance: every row select-only gets is
                  masked on the wire (tpcb's ``SET abalance = abalance + d`` is refused:
                  a write that reads a masked column);
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
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit.harness import Bench, add_arguments, check_arguments, run_bench  # noqa: E402
from benchkit.pgbench import Workload  # noqa: E402
from benchkit.procs import (  # noqa: E402
    REPO,
    Service,
    TargetUnavailable,
    first_error_line,
    kill_group,
    log,
    tail,
)
from benchkit.targets import Target, connmgr_argv, relay_argv  # noqa: E402

from connmgr.embedded.clusters import Cluster, free_port  # noqa: E402

ALL_TARGETS = ("direct", "connmgr", "connmgr-w2", "connmgr-w3", "connmgr-w4", "connmgr-pure", "connmgr-tasks",
               "connmgr-base", "connmgr-policy", "connmgr-masks", "connmgr-masked", "pgbouncer", "relay")  # fmt: skip

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


def workloads(clients: int, jobs: int) -> list[Workload]:
    c, j = ("-c", str(clients)), ("-j", str(jobs))
    return [
        Workload("select-simple", ("-S", "-M", "simple", *c, *j)),
        Workload("select-extended", ("-S", "-M", "extended", *c, *j)),
        Workload("tpcb", ("-M", "simple", *c, *j)),
        Workload("latency-1c", ("-S", "-M", "simple", "-c", "1", "-j", "1")),
    ]


class ProxyBench(Bench):
    """One trust-auth cluster; the proxies in front of it run for the whole benchmark."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, workloads(args.clients, args.jobs))
        self.cluster: Cluster | None = None
        self.profile_path: str | None = None

    def make_clusters(self) -> None:
        self.cluster = self.new_cluster("bench", host_auth="trust", settings=CLUSTER_SETTINGS)
        log(f"initializing pgbench, scale {self.args.scale} ...")
        self.pgbench_init(self.cluster)
        self.record_environment(self.cluster)

    def make_target(self, name: str) -> Target:
        """``connmgr-tasks`` is connmgr with ``--relay tasks`` (two trio tasks per session
        instead of the epoll relay engine); ``connmgr-pure`` is connmgr with its hot path
        run from the Python source (CONNMGR_PURE_PYTHON=1); ``connmgr-base`` runs the code of another
        checkout (``--baseline DIR``), to compare two commits in one interleaved run."""
        pg_port = self.cluster.port
        if name == "direct":
            return Target(name, pg_port)
        if name == "pgbouncer":
            users = self.base / "userlist.txt"
            users.write_text('"postgres" ""\n')
            service = self.start_pgbouncer(pg_port, auth_type="trust", auth_file=users,
                                           pool_mode=self.args.pgbouncer_mode,
                                           admin_users="postgres")  # fmt: skip
            return Target(name, service.port, service=service)
        port = free_port()
        if name == "relay":
            service = Service(name, relay_argv(port, pg_port), port, self.logs / "relay.log")
        else:
            extra = shlex.split(self.args.connmgr_args)
            root = REPO
            if name == "connmgr-tasks":
                extra.extend(["--relay", "tasks"])
            if name.startswith("connmgr-w"):  # [server] workers = N behind one port
                extra.extend(["--workers", name.removeprefix("connmgr-w")])
            if name == "connmgr-policy":  # a class takes pgbench's user; nothing it reads is refused
                policy = self.base / "policy.toml"
                policy.write_text('[[class]]\nname = "bench"\nusers = ["*"]\nrefuse_kinds = ["TRUNCATE"]\n'
                                  'refuse_objects = ["secret.*", "function:query_to_xml"]\n')  # fmt: skip
                extra.extend(["--policy", str(policy)])
            if name in ("connmgr-masks", "connmgr-masked"):
                # masks: a column of the table pgbench reads, not one it reads (each statement's
                # output traced, none masked); masked: the balance every select returns
                column = "filler" if name == "connmgr-masks" else "abalance"
                policy = self.base / f"{name}.toml"
                policy.write_text('[[class]]\nname = "bench"\nusers = ["*"]\n[[class.mask]]\n'
                                  f'column = "pgbench_accounts.{column}"\nmask = "full"\n')  # fmt: skip
                extra.extend(["--policy", str(policy)])
            if name == "connmgr-base":
                if not self.args.baseline:
                    raise TargetUnavailable(
                        "connmgr-base needs --baseline DIR (e.g. git worktree add DIR <commit>)"
                    )
                root = Path(self.args.baseline).resolve()
            service = Service(name, connmgr_argv(port, pg_port, extra), port,
                              self.logs / f"{name}.log", cwd=root, pythonpath=root)  # fmt: skip
            if name == "connmgr-pure":
                service.env["CONNMGR_PURE_PYTHON"] = "1"
        service.start()
        return Target(name, port, service=service)

    def title(self, rounds: int) -> str:
        a = self.args
        return (f"pgbench, {a.seconds}s per run, median of {rounds} round(s), "
                f"scale {a.scale}, pgbouncer {a.pgbouncer_mode} mode")  # fmt: skip

    def run(self) -> None:
        self.run_rounds()
        if self.args.profile:
            self.profile()

    def json_more(self) -> dict:
        return {"profile": self.profile_path, "workers": self.scaling()}

    def scaling(self) -> list[dict]:
        """Per workload and ``connmgr-wN`` target: the median tps against ``connmgr``'s
        (one process) in the same rounds, and the CPU per transaction of all its processes."""
        out = []
        for wl in (w.name for w in self.workloads):
            base = [r for r in self.runs if r.workload == wl and r.target == "connmgr" and r.ok]
            for t in (t.name for t in self.targets):
                if not t.startswith("connmgr-w"):
                    continue
                mine = [r for r in self.runs if r.workload == wl and r.target == t and r.ok]
                if not mine:
                    continue
                n = int(t.removeprefix("connmgr-w"))
                tps = statistics.median(r.tps for r in mine)
                row = {"workload": wl, "target": t, "workers": n, "tps": tps,
                       "cpu_us_per_tx": statistics.median(sum(r.cpu_us_per_tx.values()) for r in mine)}  # fmt: skip
                if base:
                    one = statistics.median(r.tps for r in base)
                    row.update(tps_1=one, ratio=tps / one, efficiency=tps / one / n,
                               cpu_us_per_tx_1=statistics.median(sum(r.cpu_us_per_tx.values()) for r in base))
                out.append(row)
        return out

    def report_more(self) -> None:
        rows = self.scaling()
        if not rows:
            return
        print("\nworkers (connmgr-wN against connmgr, one process, in the same rounds):")
        print(f"{'workload':<16} {'target':<11} {'tps':>9} {'tps N=1':>9} {'× N=1':>6} {'eff.':>5}"
              f" {'cpu µs/tx':>9} {'N=1':>6}")  # fmt: skip
        for r in rows:
            print(f"{r['workload']:<16} {r['target']:<11} {r['tps']:>9,.0f} {r.get('tps_1', 0):>9,.0f}"
                  f" {r.get('ratio', 0):>5.2f}× {r.get('efficiency', 0):>5.2f} {r['cpu_us_per_tx']:>9.1f}"
                  f" {r.get('cpu_us_per_tx_1', 0):>6.1f}")  # fmt: skip

    # ------------------------------------------------------------ profile

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

    def _profile_py_spy(self, connmgr: Target, wl: Workload, out: Path) -> bool:
        with contextlib.suppress(TargetUnavailable):
            connmgr.prepare("profile")
        if not connmgr.service.alive():
            return False
        spy_log = self.logs / "py-spy.log"
        with open(spy_log, "wb") as f:
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(connmgr.service.pid()), "--subprocesses",
                 "--format", "speedscope", "-o", str(out)],
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            time.sleep(1.0)  # let it attach
            if spy.poll() is not None:
                log(f"py-spy could not attach: {first_error_line(tail(spy_log, 20))}")
                return False
            run = self.bench_once(connmgr, wl, 0)
            log(f"profile: {wl.name} via connmgr under py-spy ... {run.describe()}")
        finally:
            kill_group(spy, signal.SIGINT, timeout=30)  # SIGINT: py-spy writes the file
        return out.exists() and out.stat().st_size > 0

    def _profile_pyinstrument(self, connmgr: Target, wl: Workload, out: Path) -> bool:
        """Restart connmgr under pyinstrument for one run; stop it with SIGINT to save."""
        connmgr.stop()
        wrapper = [sys.executable, "-m", "pyinstrument", "-r", "speedscope", "-o", str(out), "-m"]
        argv = connmgr_argv(connmgr.port, self.cluster.port, shlex.split(self.args.connmgr_args),
                            launcher=wrapper)  # fmt: skip
        profiled = Target("connmgr", connmgr.port, service=Service(
            "connmgr", argv, connmgr.port, self.logs / "pyinstrument.log"))  # fmt: skip
        try:
            profiled.service.start()
            run = self.bench_once(profiled, wl, 0)
            log(f"profile: {wl.name} via connmgr under pyinstrument ... {run.describe()}")
        except TargetUnavailable as e:
            log(f"pyinstrument: connmgr did not start: {e}")
        finally:
            profiled.service.stop(signal.SIGINT, timeout=30)
        return out.exists() and out.stat().st_size > 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    wl_names = [w.name for w in workloads(8, 2)]
    p = argparse.ArgumentParser(
        description="Benchmark connmgr against direct Postgres, PgBouncer and a naive relay.",
        epilog="See the module docstring (labs/bench_proxy.py) for what the figures mean.",
    )
    add_arguments(p, rounds=2, targets=ALL_TARGETS, default_targets=ALL_TARGETS,
                  workloads=wl_names)  # fmt: skip
    p.add_argument("--pgbouncer-mode", choices=("session", "transaction"), default="session")
    p.add_argument("--connmgr-args", default="", help="extra arguments for connmgr serve")
    p.add_argument("--baseline", metavar="DIR",
                   help="a checkout of another commit, run as target connmgr-base beside connmgr")  # fmt: skip
    p.add_argument(
        "--profile",
        nargs="?",
        metavar="FILE",
        const=f"connmgr-profile-{time.strftime('%Y%m%d-%H%M%S')}.speedscope.json",
        help="profile connmgr during an extra select-simple run (speedscope file; "
        "default ./connmgr-profile-<time>.speedscope.json)",
    )
    return check_arguments(p, p.parse_args(argv), ALL_TARGETS, wl_names)


def main(argv: list[str] | None = None) -> int:
    return run_bench(ProxyBench(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
