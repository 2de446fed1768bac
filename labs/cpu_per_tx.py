"""CPU microseconds per pgbench transaction spent in the proxy process.

Steadier than TPS on a noisy machine: it counts only what the proxy itself burns (user and
system time from /proc/PID/stat around a pgbench run), not what it waits for.

    python labs/cpu_per_tx.py                       # connmgr (engine), connmgr --relay tasks, naive relay
    python labs/cpu_per_tx.py --modes simple --targets connmgr --seconds 10

Prints one line per run: tps, CPU us per transaction and the user part of it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit.pgbench import find_pgbench, parse_pgbench, run_pgbench  # noqa: E402
from benchkit.procs import Service, TargetUnavailable, cpu_times, first_error_line  # noqa: E402
from benchkit.targets import connmgr_argv, relay_argv  # noqa: E402

from connmgr.embedded.clusters import Cluster, free_port, temp_base_dir  # noqa: E402


def start(kind: str, pg_port: int, base: Path) -> list[Service]:
    """Start one proxy; returns its services, the measured one last. ``connmgr-mirror`` is
    connmgr mirroring every session to a second connmgr (started here too, as the
    secondary) with the redo monitor tagging LSNs."""
    port = free_port()
    services = []
    if kind == "relay":
        services.append(Service(kind, relay_argv(port, pg_port), port, base / "relay.log"))
    elif kind == "connmgr-mirror":
        mport, sport = free_port(), free_port()
        (base / "secondary.toml").write_text(f'[mirror]\nlisten = "127.0.0.1:{mport}"\n')
        (base / "primary.toml").write_text(f'[mirror]\npeer = "127.0.0.1:{mport}"\n[redo]\nuser = "postgres"\n')
        services.append(Service("secondary", connmgr_argv(sport, pg_port, ["--config", str(base / "secondary.toml")]),
                                sport, base / "secondary.log"))  # fmt: skip
        services.append(Service(kind, connmgr_argv(port, pg_port, ["--config", str(base / "primary.toml")]),
                                port, base / "primary.log", markers=("listening on", "mirror link up")))  # fmt: skip
    else:
        extra = ["--relay", "tasks"] if kind == "connmgr-tasks" else []
        services.append(Service(kind, connmgr_argv(port, pg_port, extra), port, base / f"{kind}.log"))
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
    ap.add_argument("--targets", default="connmgr,connmgr-tasks,relay", help="any of connmgr, connmgr-tasks, connmgr-mirror, relay")
    ap.add_argument("--modes", default="simple,extended")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
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
            procs[kind] = start(kind, cluster.port, base)
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                for kind, services in procs.items():
                    proxy = services[-1]
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


if __name__ == "__main__":
    main()
