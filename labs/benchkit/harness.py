"""The frame of a benchmark: :class:`Bench` and :func:`run_bench`, and the arguments every
benchmark takes.

How a run goes: ``setup`` makes the temp dir, lets the subclass make its clusters
(``make_clusters``) and its targets (``make_target``; one that cannot start is skipped with
a note). ``run_rounds`` interleaves the rounds: every round runs every workload against
every target, in an order rotated from round to round and workload to workload, so slow
drifts of the machine (thermal, other load, checkpoints) hit all targets alike. A run is
``prepare``, an optional warm-up (``pgbench -n``, not counted), the measured pgbench run
with the proxies' CPU, and ``release``, whose notes go into the table. ``report`` prints
the summary table, the subclass's extra tables (``report_more``), the skipped targets and,
with ``--json``, every figure. ``cleanup`` stops every process and removes every cluster,
also after an error or Ctrl-C/SIGTERM; ``--keep`` keeps the temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import psycopg

from connmgr.embedded.clusters import Cluster, ClusterError, free_port, temp_base_dir

from . import profile
from .pgbench import Run, Workload, find_pgbench, measure_run, run_pgbench
from .procs import HOST, Service, TargetUnavailable, first_error_line, log
from .report import Row, print_table, summarize
from .targets import Target, pgbouncer_service, pgbouncer_version

#: what may go wrong while a target is made, prepared or released: the target is skipped,
#: or the run fails, and the benchmark goes on
TARGET_ERRORS = (TargetUnavailable, ClusterError, psycopg.Error)


class Bench:
    """Owns the temp dir, clusters and targets of one benchmark; ``cleanup`` removes them all.

    A subclass provides ``make_clusters``, ``make_target`` and ``title``, and may extend
    ``measure``, ``report_more`` and ``json_more``.
    """

    temp_prefix = "connmgr-bench-"
    #: the database pgbench uses, and the password (None: trust)
    db = "postgres"
    password: str | None = None
    run_type: type[Run] = Run
    #: seconds a run takes besides warm-up and measurement (for the estimate only)
    run_overhead_s = 1.5

    def __init__(self, args: argparse.Namespace, workloads: list[Workload]) -> None:
        self.args = args
        self.workloads = [w for w in workloads if w.name in args.workloads]
        self.warmup = 0
        self.base: Path | None = None
        self.clusters: list[Cluster] = []  # destroyed in reverse order
        self.pgbench = ""
        self.targets: list[Target] = []
        self.skipped: dict[str, str] = {}
        self.runs: list[Run] = []
        self.environment: dict = {}

    # ------------------------------------------------------------ setup

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    def setup(self) -> None:
        self.base = temp_base_dir(self.temp_prefix)
        log(f"temp dir {self.base}")
        self.logs.mkdir()
        self.make_clusters()
        for name in self.args.targets:
            try:
                target = self.make_target(name)
            except TARGET_ERRORS as e:
                self.skipped[name] = str(e)
                log(f"{name}: SKIPPED - {e}")
                continue
            log(f"{name}: ready " + (f"({target.description})" if target.description
                                     else f"on {HOST}:{target.port}"))  # fmt: skip
            self.targets.append(target)

    def make_clusters(self) -> None:
        """Make, start and fill the clusters (``new_cluster``, ``pgbench_init``)."""
        raise NotImplementedError

    def make_target(self, name: str) -> Target:
        """The target ``name``, ready. Raises one of TARGET_ERRORS to skip it."""
        raise NotImplementedError

    def new_cluster(self, name: str, **create: object) -> Cluster:
        """A cluster in the temp dir (``Cluster.create`` arguments), started."""
        cluster = Cluster.create(self.base, name, **create)
        self.clusters.append(cluster)
        cluster.start()
        return cluster

    def pgbench_init(self, cluster: Cluster, extra: Sequence[str] = ()) -> None:
        """``pgbench -i -q -s SCALE EXTRA`` on ``cluster``. Raises ClusterError."""
        self.pgbench = self.pgbench or find_pgbench(cluster)
        args = ["-i", "-q", "-s", str(self.args.scale), *extra]
        rc, out, err = run_pgbench(self.pgbench, cluster.port, args, timeout=3600, db=self.db,
                                   password=self.password)  # fmt: skip
        if rc != 0:
            raise ClusterError(f"pgbench {' '.join(args)} on {cluster.name} failed: "
                               f"{first_error_line(err + out)}")  # fmt: skip

    def start_pgbouncer(self, pg_port: int, **settings: object) -> Service:
        """PgBouncer in front of ``HOST:pg_port`` with ``settings`` (see
        :func:`~benchkit.targets.pgbouncer_service`), started; its version goes into the
        environment. Raises TargetUnavailable or ClusterError."""
        service = pgbouncer_service(self.base / "pgbouncer", free_port(HOST), pg_port,
                                    self.logs / "pgbouncer.log", **settings)  # fmt: skip
        service.start()
        self.environment["pgbouncer"] = pgbouncer_version(service.argv[0])
        return service

    def record_environment(self, cluster: Cluster, **more: object) -> None:
        self.environment.update({
            "postgres": cluster.psql("SELECT version()"),
            "python": sys.version.split()[0],
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            **more,
        })  # fmt: skip

    # ------------------------------------------------------------ runs

    def run(self) -> None:
        """Everything measured (the rounds)."""
        self.run_rounds()

    def run_rounds(self) -> None:
        a = self.args
        n_runs = a.rounds * len(self.workloads) * len(self.targets)
        each = f"{self.warmup}s warm-up + {a.seconds}s" if self.warmup else f"{a.seconds}s each"
        minutes = n_runs * (a.seconds + self.warmup + self.run_overhead_s) / 60
        log(f"{n_runs} runs of {each} (≈{minutes:.1f} min)")
        for rnd in range(a.rounds):
            for i, wl in enumerate(self.workloads):
                k = (rnd + i) % len(self.targets)
                for target in self.targets[k:] + self.targets[:k]:
                    run = self.bench_once(target, wl, rnd + 1)
                    self.runs.append(run)
                    log(f"round {rnd + 1}/{a.rounds}: {wl.name} via {target.name}"
                        f" ... {run.describe()}")  # fmt: skip

    def bench_once(self, target: Target, wl: Workload, rnd: int) -> Run:
        """Prepare, warm up, measure ``wl`` against ``target``, release; never raises for a
        failing target."""
        run = self.run_type(rnd, wl.name, target.name)
        try:
            target.prepare(f"r{rnd}-{wl.name}")
        except TARGET_ERRORS as e:
            run.error = f"could not prepare: {e}"
            run.notes += self._release(target)
            return run
        try:
            if self.warmup > 0:
                rc, out, err = run_pgbench(
                    self.pgbench, target.port, ["-n", "-T", str(self.warmup), *wl.args],
                    timeout=self.warmup + 120, db=self.db, password=self.password,
                )  # fmt: skip
                if rc != 0:
                    run.error = f"warm-up failed: {first_error_line(err + chr(10) + out)}"
                    return run
            self.measure(target, wl, run)
        finally:
            run.notes += self._release(target)
        return run

    def measure(self, target: Target, wl: Workload, run: Run) -> None:
        """The measured run of ``wl`` against ``target``, into ``run`` (with ``--py-spy``,
        py-spy on each proxy process during it: labs/benchkit/profile.py)."""
        pids = target.proxy_pids()
        recorder = contextlib.nullcontext()
        if self.args.py_spy is not None and pids:
            recorder = profile.recording(pids, self.args.seconds, self.args.py_spy,
                                         f"r{run.round}-{wl.name}-{target.name}")  # fmt: skip
        with recorder:
            measure_run(run, self.pgbench, target.port, list(wl.args), self.args.seconds,
                        db=self.db, password=self.password, pids=pids)  # fmt: skip

    @staticmethod
    def _release(target: Target) -> list[str]:
        try:
            return target.release()
        except TARGET_ERRORS as e:
            return [f"release: {e}"]

    # ------------------------------------------------------------ output

    def title(self, rounds: int) -> str:
        """The summary table's title; ``rounds``: how many rounds it has (fewer than asked
        for when interrupted)."""
        raise NotImplementedError

    def summary_rows(self) -> list[Row]:
        return summarize(self.runs, [w.name for w in self.workloads], [t.name for t in self.targets])

    def report(self) -> None:
        if not self.runs:
            log("no runs completed")
        else:
            print()
            print_table(self.summary_rows(), self.title(len({r.round for r in self.runs})))
        self.report_more()
        for name, why in self.skipped.items():
            print(f"{name}: skipped - {why}")
        if self.args.json:
            self.write_json(Path(self.args.json))

    def report_more(self) -> None:
        """What a benchmark prints after the summary table."""

    def json_more(self) -> dict:
        """What a benchmark adds to the JSON file."""
        return {}

    def write_json(self, path: Path) -> None:
        data = {
            "config": dict(vars(self.args)),
            "environment": self.environment,
            "workloads": {w.name: list(w.args) for w in self.workloads},
            "skipped": self.skipped,
            "runs": [r.to_json() for r in self.runs],
            "summary": [asdict(r) for r in self.summary_rows()],
            **self.json_more(),
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        log(f"figures written to {path}")

    # ------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Stop every process we started and remove the clusters; each step on its own."""
        for target in self.targets:
            try:
                target.stop()
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log(f"could not stop {target.name}: {e}")
        self.remove_clusters()
        if self.base is not None:
            if self.args.keep:
                log(f"kept {self.base}")
            else:
                shutil.rmtree(self.base, ignore_errors=True)

    def remove_clusters(self) -> None:
        """Destroy the clusters (with ``--keep``: stop them), newest first."""
        for cluster in reversed(self.clusters):
            try:
                if self.args.keep:
                    cluster.stop("fast")
                else:
                    cluster.destroy()
            except ClusterError as e:
                log(f"cluster {cluster.name} cleanup: {e}")


# ------------------------------------------------------------------------------ main


def add_arguments(p: argparse.ArgumentParser, *, rounds: int, targets: Sequence[str],
                  default_targets: Sequence[str], workloads: Sequence[str]) -> None:  # fmt: skip
    """The arguments of every benchmark: run length, rounds, scale, clients, the targets and
    workloads to run, ``--json`` and ``--keep``."""
    p.add_argument("--seconds", type=int, default=10, help="duration of each run (default 10)")
    p.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--clients", type=int, default=8,
                   help="pgbench -c for the multi-client workloads (default 8)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j for them (default 2)")
    opt_in = [t for t in targets if t not in default_targets]
    p.add_argument("--targets", default=",".join(default_targets),
                   help=f"comma-separated subset of {','.join(targets)}"
                   + (f" (default: all but {', '.join(opt_in)})" if opt_in else ""))  # fmt: skip
    p.add_argument("--workloads", default=",".join(workloads),
                   help=f"comma-separated subset of {','.join(workloads)}")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs, configs)")
    p.add_argument("--py-spy", metavar="DIR", type=Path, dest="py_spy",
                   help="py-spy on the proxies during each measured run: collapsed stacks into DIR and"
                   " the top functions printed (distorts the figures; labs/benchkit/profile.py)")  # fmt: skip


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace,
                    targets: Sequence[str], workloads: Sequence[str]) -> argparse.Namespace:  # fmt: skip
    """``args`` with ``targets`` and ``workloads`` as lists; exits with a usage error when
    they name unknown ones or a count is below 1."""
    args.targets = split_choices(p, "--targets", args.targets, targets)
    args.workloads = split_choices(p, "--workloads", args.workloads, workloads)
    if args.seconds < 1 or args.rounds < 1 or args.scale < 1:
        p.error("--seconds, --rounds and --scale must be at least 1")
    if args.py_spy is not None and (why := profile.available()):
        p.error(f"--py-spy: {why}")
    return args


def split_choices(p: argparse.ArgumentParser, opt: str, text: str, allowed) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        p.error(f"{opt}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(chosen))


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(bench: Bench) -> int:
    """Set up, run and report ``bench``, and clean up whatever happens; SIGTERM counts as
    Ctrl-C (partial results are reported). Returns the exit status."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    status = 0
    try:
        bench.setup()
        if not bench.targets:
            log("no target could be started")
            return 1
        bench.run()
        bench.report()
    except KeyboardInterrupt:
        log("interrupted; partial results follow")
        status = 130
        with contextlib.suppress(Exception):
            bench.report()
    except TARGET_ERRORS as e:
        log(f"setup failed: {e}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
    return status
