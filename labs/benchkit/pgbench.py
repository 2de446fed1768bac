"""pgbench: found, run in its own process group, its report parsed into a :class:`Run`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field

from connmgr.embedded.clusters import Cluster

from .procs import HOST, cpu_times, first_error_line, kill_group

USER = "postgres"


def find_pgbench(cluster: Cluster) -> str:
    """pgbench next to the cluster's server binaries, else the one on PATH; SystemExit if none."""
    own = cluster.bindir / "pgbench"
    exe = str(own) if os.access(own, os.X_OK) else shutil.which("pgbench")
    if not exe:
        raise SystemExit("pgbench not found (next to the server binaries or on PATH)")
    return exe


def pgbench_env(password: str | None = None) -> dict[str, str]:
    """Our environment without PG* variables, with a connect timeout (and the password)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def run_pgbench(pgbench: str, port: int, args: list[str], timeout: float, *, db: str,
                password: str | None = None) -> tuple[int, str, str]:  # fmt: skip
    """Run pgbench against ``HOST:port``/``db`` as USER in its own process group; kill the
    group on timeout or interrupt. Returns (exit code, stdout, stderr); -1 on timeout."""
    cmd = [pgbench, "-h", HOST, "-p", str(port), "-U", USER, *args, db]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
        env=pgbench_env(password), start_new_session=True,
    )  # fmt: skip
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


def parse_pgbench(out: str) -> dict:
    """Pull the figures out of pgbench's report (PostgreSQL 13+ and older wordings):
    the keys of :class:`Run` that were found, with their values."""
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


@dataclass(frozen=True)
class Workload:
    name: str
    args: tuple[str, ...]


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
    #: what the target reported about the run (a proxy that died, warnings in its log)
    notes: list[str] = field(default_factory=list)
    #: CPU (user + system) of each proxy process during the measured run, µs per transaction
    cpu_us_per_tx: dict[str, float] = field(default_factory=dict)

    def details(self) -> list[str]:
        """Figures beyond tps and latency worth a progress line (none here)."""
        return []

    def describe(self) -> str:
        """One line: tps and latency (or why it failed), details, then the notes."""
        if not self.ok:
            text = f"FAILED: {self.error}"
        else:
            text = f"{self.tps:,.0f} tps, {self.latency_ms:.3f} ms"
            if self.failed_transactions:
                text += f", {self.failed_transactions} failed transactions"
        return text + "".join(f"; {part}" for part in [*self.details(), *self.notes])

    def to_json(self) -> dict:
        return asdict(self)


def measure_run(run: Run, pgbench: str, port: int, args: list[str], seconds: int, *, db: str,
                password: str | None = None, pids: dict[str, int] | None = None) -> None:  # fmt: skip
    """Run ``pgbench -T seconds args`` once and put its figures into ``run``: ``ok`` and
    the figures, or ``error``; the CPU per transaction of each process in ``pids`` (a
    name: pid map). Never raises for a failing run."""
    pids = pids or {}
    cpu0 = {name: cpu_times(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    rc, out, err = run_pgbench(pgbench, port, ["-T", str(seconds), *args], timeout=seconds + 120,
                               db=db, password=password)  # fmt: skip
    run.wall_s = round(time.monotonic() - t0, 2)
    cpu1 = {name: cpu_times(pid) for name, pid in pids.items()}
    for key, value in parse_pgbench(out).items():
        setattr(run, key, value)
    if rc == 0 and run.tps is not None:
        run.ok = True
        for name in pids:
            if cpu0[name] is not None and cpu1[name] is not None and run.transactions:
                used = sum(cpu1[name]) - sum(cpu0[name])
                run.cpu_us_per_tx[name] = round(1e6 * used / run.transactions, 1)
    else:
        run.error = first_error_line(err + "\n" + out)
        if rc not in (0, -1):
            run.error = f"(exit {rc}) {run.error}"
