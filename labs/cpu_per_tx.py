"""CPU microseconds per pgbench transaction spent in the proxy process.

Steadier than TPS on a noisy machine: it counts only what the proxy itself burns (user and
system time from /proc/PID/stat around a pgbench run), not what it waits for.

    python labs/cpu_per_tx.py                       # connmgr (engine), connmgr --relay tasks, naive relay
    python labs/cpu_per_tx.py --modes simple --targets connmgr --seconds 10

Prints one line per run: tps, CPU us per transaction and the user part of it.

``--callgrind`` counts instructions instead (repeatable where seconds are not: the issue-15
measure). Each proxy runs under ``valgrind --tool=callgrind``, uninstrumented; it is
switched on (``callgrind_control -i on``, counters zeroed) for exactly one pgbench run of ``--transactions``
transactions per client and the proxy's instructions are divided by the transactions
(valgrind serialises the proxy's threads; the kernel's work is not counted):

    python labs/cpu_per_tx.py --callgrind --targets connmgr,connmgr-mirror,relay --transactions 2000

(``connmgr-mirror`` prints its secondary's instructions per transaction too: the records it
takes in, frames and holds.)

``--strace`` counts the proxy's system calls per transaction instead (``strace -f -c``
attached for one such run; strace slows the proxy, so only the counts mean anything):

    python labs/cpu_per_tx.py --strace --targets connmgr --transactions 2000
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit.pgbench import find_pgbench, parse_pgbench, run_pgbench  # noqa: E402
from benchkit.procs import Service, TargetUnavailable, cpu_times, first_error_line  # noqa: E402
from benchkit.targets import connmgr_argv, relay_argv  # noqa: E402

from connmgr.embedded.clusters import Cluster, free_port, temp_base_dir  # noqa: E402


def callgrind(kind: str, base: Path) -> list[str]:
    """The launcher that runs a Python proxy under callgrind, not instrumented until asked
    (so it also starts at a fraction of callgrind's cost)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={base / kind}.callgrind.%p", sys.executable]  # fmt: skip


def instructions(pid: int, base: Path, kind: str) -> int:
    """Dump the counts of ``pid`` (collected since the last dump) and read their total."""
    for f in base.glob(f"{kind}.callgrind.{pid}*"):
        f.unlink()
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=300)
    total = 0
    for f in base.glob(f"{kind}.callgrind.{pid}.*"):  # the dump (the main file is written at exit)
        m = re.search(r"^(?:summary|totals):\s+(\d+)", f.read_text(errors="replace"), re.M)
        total += int(m.group(1)) if m else 0
    return total


def start(kind: str, pg_port: int, base: Path, launcher: list[str] | None = None) -> list[Service]:
    """Start one proxy; returns its services, the measured one last. ``connmgr-mirror`` is
    connmgr mirroring every session to a second connmgr (started here too, as the
    secondary) with the redo monitor tagging LSNs."""
    port = free_port()
    services = []
    if kind == "relay":
        argv = relay_argv(port, pg_port)
        if launcher is not None:
            argv = [*launcher, *argv[1:]]
        services.append(Service(kind, argv, port, base / "relay.log"))
    elif kind == "connmgr-mirror":
        mport, sport = free_port(), free_port()
        (base / "secondary.toml").write_text(f'[mirror]\nlisten = "127.0.0.1:{mport}"\n')
        (base / "primary.toml").write_text(f'[mirror]\npeer = "127.0.0.1:{mport}"\n[redo]\nuser = "postgres"\n')
        services.append(Service("secondary", connmgr_argv(sport, pg_port, ["--config", str(base / "secondary.toml")],
                                                         launcher=launcher and [*callgrind("secondary", base), "-m"]),
                                sport, base / "secondary.log"))  # fmt: skip
        services.append(Service(kind, connmgr_argv(port, pg_port, ["--config", str(base / "primary.toml")],
                                                   launcher=launcher and [*launcher, "-m"]),
                                port, base / "primary.log", markers=("listening on", "mirror link up")))  # fmt: skip
    else:
        extra = ["--relay", "tasks"] if kind == "connmgr-tasks" else []
        services.append(Service(kind, connmgr_argv(port, pg_port, extra, launcher=launcher and [*launcher, "-m"]),
                                port, base / f"{kind}.log"))  # fmt: skip
        if kind == "connmgr-pure":  # the hot path from the Python source
            services[-1].env["CONNMGR_PURE_PYTHON"] = "1"
    if launcher is not None:
        for service in services:
            service.ready_timeout = 600.0
    try:
        for service in services:
            service.start()
    except TargetUnavailable as e:
        for service in services:
            service.stop()
        raise SystemExit(str(e)) from e
    return services


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="connmgr,connmgr-tasks,relay", help="any of connmgr, connmgr-pure, connmgr-tasks, connmgr-mirror, relay")
    ap.add_argument("--modes", default="simple,extended")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--callgrind", action="store_true", help="count the proxy's instructions per transaction")
    ap.add_argument("--transactions", type=int, default=2000, help="per client, with --callgrind")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--strace", action="store_true", help="count the proxy's system calls per transaction")
    ap.add_argument("--keep", metavar="DIR", type=Path,
                    help="with --callgrind: copy each counted dump there (for callgrind_annotate)")
    args = ap.parse_args()
    if args.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    base = temp_base_dir("connmgr-cpu-")
    cluster = Cluster.create(base, "cpu", host_auth="trust")
    procs: dict[str, list[Service]] = {}
    try:
        cluster.start()
        pgbench = find_pgbench(cluster)
        rc, out, err = run_pgbench(pgbench, cluster.port, ["-i", "-s", "2", "-q"], timeout=600, db="postgres")
        if rc != 0:
            raise SystemExit(f"pgbench -i failed: {first_error_line(err + out)}")
        for kind in args.targets.split(","):
            procs[kind] = start(kind, cluster.port, base, callgrind(kind, base) if args.callgrind else None)
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                for kind, services in procs.items():
                    proxy = services[-1]
                    if args.callgrind:
                        count_instructions(kind, services, pgbench, mode, args, base)
                        continue
                    if args.strace:
                        count_syscalls(kind, proxy, pgbench, mode, args)
                        continue
                    u0, s0 = cpu_times(proxy.pid()) or (0.0, 0.0)
                    rc, out, err = run_pgbench(
                        pgbench, proxy.port,
                        ["-n", "-S", "-c", "8", "-j", "2", "-T", str(args.seconds), "-M", mode],
                        timeout=args.seconds + 120, db="postgres",
                    )  # fmt: skip
                    u1, s1 = cpu_times(proxy.pid()) or (u0, s0)
                    figures = parse_pgbench(out)
                    if rc != 0 or "tps" not in figures or not figures.get("transactions"):
                        print(f"{mode:9s} {kind:14s} FAILED: {first_error_line(err + out)[:200]}", flush=True)
                        continue
                    count = figures["transactions"]
                    cpu = 1e6 * (u1 + s1 - u0 - s0) / count
                    print(f"{mode:9s} {kind:14s} tps {figures['tps']:8.0f}  cpu/tx {cpu:6.1f} us  (user {1e6 * (u1 - u0) / count:5.1f})", flush=True)
    finally:
        for services in procs.values():
            for service in reversed(services):
                service.stop()
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def count_instructions(kind: str, services: list[Service], pgbench: str, mode: str, args, base: Path) -> None:
    """One pgbench run of ``args.transactions`` per client with collection on; prints the
    proxy's instructions per transaction (and its secondary's, for ``connmgr-mirror``)."""
    proxy = services[-1]
    pids = {(kind if s is proxy else s.name): s.pid() for s in services}
    warm = ["-n", "-S", "-c", str(args.clients), "-j", "2", "-t", "50", "-M", mode]
    run_pgbench(pgbench, proxy.port, warm, timeout=600, db="postgres")  # its code paths warm, not counted
    for pid in pids.values():
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True, timeout=60)
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=60)
    rc, out, err = run_pgbench(
        pgbench, proxy.port,
        ["-n", "-S", "-c", str(args.clients), "-j", "2", "-t", str(args.transactions), "-M", mode],
        timeout=3600, db="postgres",
    )  # fmt: skip
    totals = {}
    for name, pid in pids.items():
        totals[name] = instructions(pid, base, name)  # the dump holds what ran since the zeroing
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for f in base.glob(f"{name}.callgrind.{pid}.*"):
                shutil.copy(f, args.keep / f"{name}-{mode}.callgrind")
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True, timeout=60)
    figures = parse_pgbench(out)
    if rc != 0 or not figures.get("transactions"):
        print(f"{mode:9s} {kind:14s} FAILED: {first_error_line(err + out)[:200]}", flush=True)
        return
    count = figures["transactions"]
    for name, total in totals.items():
        print(f"{mode:9s} {name:14s} instructions/tx {total / count:10,.0f}  ({count} transactions, {total:,} instructions)",
              flush=True)  # fmt: skip


def count_syscalls(kind: str, proxy: Service, pgbench: str, mode: str, args) -> None:
    """One pgbench run of ``args.transactions`` per client under ``strace -f -c``; prints
    the proxy's system calls per transaction, by call."""
    strace = subprocess.Popen(["strace", "-f", "-c", "-p", str(proxy.pid())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(1.0)  # attached to every thread
        rc, out, err = run_pgbench(
            pgbench, proxy.port,
            ["-n", "-S", "-c", str(args.clients), "-j", "2", "-t", str(args.transactions), "-M", mode],
            timeout=3600, db="postgres",
        )  # fmt: skip
    finally:
        strace.send_signal(signal.SIGINT)
        _, report = strace.communicate(timeout=60)
    figures = parse_pgbench(out)
    if rc != 0 or not figures.get("transactions"):
        print(f"{mode:9s} {kind:14s} FAILED: {first_error_line(err + out)[:200]}", flush=True)
        return
    count = figures["transactions"]
    calls = {}
    for line in report.splitlines():  # % time, seconds, usecs/call, calls, [errors,] syscall
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    total = sum(calls.values())
    top = ", ".join(f"{name} {n / count:.2f}" for name, n in sorted(calls.items(), key=lambda kv: -kv[1])[:8])
    print(f"{mode:9s} {kind:14s} syscalls/tx {total / count:6.2f}  ({top})", flush=True)


if __name__ == "__main__":
    main()
