"""CPU microseconds per pgbench transaction spent in the proxy process.

Steadier than TPS on a noisy machine: it counts only what the proxy itself burns (user and
system time from /proc/PID/stat around a pgbench run), not what it waits for.

    python labs/cpu_per_tx.py                       # connmgr (engine), connmgr --relay tasks, naive relay
    python labs/cpu_per_tx.py --modes simple --targets connmgr --seconds 10

Prints one line per run: tps, CPU us per transaction and the user part of it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from connmgr.embedded.clusters import Cluster, free_port, temp_base_dir  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
_secondaries: list[subprocess.Popen] = []


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, user + system) CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    return user / TICK, (user + system) / TICK


def start(kind: str, pg_port: int, base: Path) -> tuple[subprocess.Popen, int]:
    """Start one proxy. ``connmgr-mirror`` is connmgr mirroring every session to a second
    connmgr (started here too, as the secondary) with the redo monitor tagging LSNs."""
    port = free_port()
    if kind == "connmgr-mirror":
        mport = free_port()
        (base / "secondary.toml").write_text(f'[mirror]\nlisten = "127.0.0.1:{mport}"\n')
        secondary = subprocess.Popen(
            [sys.executable, "-m", "connmgr", "serve", "--config", str(base / "secondary.toml"),
             "--listen", f"127.0.0.1:{free_port()}", "--primary", f"127.0.0.1:{pg_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        )
        _secondaries.append(secondary)
        (base / "primary.toml").write_text(f'[mirror]\npeer = "127.0.0.1:{mport}"\n[redo]\nuser = "postgres"\n')
        cmd = [sys.executable, "-m", "connmgr", "serve", "--config", str(base / "primary.toml"),
               "--listen", f"127.0.0.1:{port}", "--primary", f"127.0.0.1:{pg_port}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        time.sleep(2.5)
        return proc, port
    if kind == "relay":
        cmd = [sys.executable, str(REPO / "labs" / "naive_relay.py"), "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{pg_port}"]
    else:
        cmd = [sys.executable, "-m", "connmgr", "serve", "--listen", f"127.0.0.1:{port}", "--primary", f"127.0.0.1:{pg_port}"]
        if kind == "connmgr-tasks":
            cmd += ["--relay", "tasks"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    time.sleep(2)
    if proc.poll() is not None:
        raise SystemExit(f"{kind} exited at start ({proc.returncode})")
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="connmgr,connmgr-tasks,relay", help="any of connmgr, connmgr-tasks, connmgr-mirror, relay")
    ap.add_argument("--modes", default="simple,extended")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base = temp_base_dir("connmgr-cpu-")
    cluster = Cluster.create(base, "cpu", host_auth="trust")
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        cluster.start()
        subprocess.run(["pgbench", "-i", "-s", "2", "-q", "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres", "postgres"], check=True, capture_output=True)
        for kind in args.targets.split(","):
            procs[kind] = start(kind, cluster.port, base)
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                for kind, (proc, port) in procs.items():
                    u0, c0 = cpu_seconds(proc.pid)
                    r = subprocess.run(
                        ["pgbench", "-n", "-S", "-c", "8", "-j", "2", "-T", str(args.seconds), "-M", mode, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"],
                        capture_output=True, text=True,
                    )
                    u1, c1 = cpu_seconds(proc.pid)
                    n = re.search(r"processed: (\d+)", r.stdout)
                    tps = re.search(r"tps = ([\d.]+) \(without", r.stdout)
                    if not (n and tps):
                        print(f"{mode:9s} {kind:14s} FAILED: {r.stderr.strip()[:200]}", flush=True)
                        continue
                    count = int(n.group(1))
                    print(f"{mode:9s} {kind:14s} tps {float(tps.group(1)):8.0f}  cpu/tx {1e6 * (c1 - c0) / count:6.1f} us  (user {1e6 * (u1 - u0) / count:5.1f})", flush=True)
    finally:
        for proc in [p for p, _ in procs.values()] + _secondaries:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.destroy()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
