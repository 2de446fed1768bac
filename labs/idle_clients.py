"""Idle clients: what one connmgr holding N idle sessions costs, and the N+1st refused.

Starts a cluster (``max_connections`` raised to fit) and connmgr with ``[server]
max_clients = N`` -- or, with ``--pair``, connmgr mirroring every session to a second
connmgr, as a pair runs -- logs N clients in (the v3 start-up, trust authentication, up to
ReadyForQuery; a real server session behind each) and keeps them idle. Then:

* connmgr's resident memory (VmRSS) before the fleet (one client in) and with it, and the
  difference per client; with ``--pair``, the secondary's too (it keeps a copy of every
  session);
* connmgr's CPU over ``--idle`` seconds with one client, and with the idle fleet (per
  client: microseconds of CPU per second);
* client N+1: must get ErrorResponse 53300 (too many connections) from connmgr, at once,
  while the N go on (one of them runs a query afterwards).

    python labs/idle_clients.py --clients 2000
    python labs/idle_clients.py --clients 10000 --pair     # needs ~20 GB for 10,000 backends

The file-descriptor limit is raised to the hard limit for this process and what it starts
(each client costs connmgr two descriptors, and this script one); where the hard limit is
fixed (no CAP_SYS_RESOURCE), it caps what one connmgr can hold: 20,000 gives about 9,900.
"""

from __future__ import annotations

import argparse
import resource
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit.procs import HOST, Service, TargetUnavailable, cpu_times  # noqa: E402
from benchkit.targets import connmgr_argv  # noqa: E402

from connmgr.embedded.clusters import Cluster, free_port, temp_base_dir  # noqa: E402
from shadow import messages as m  # noqa: E402


def login(port: int, timeout: float = 60.0) -> tuple[socket.socket | None, str]:
    """One client logged in and idle: (socket, "") -- or (None, the SQLSTATE or error)."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.sendall(m.StartupMessage(m.PROTOCOL_3_0, {"user": "postgres", "database": "postgres"}).encode())
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            return None, "closed"
        buf += chunk
        while len(buf) >= 5:
            tag = buf[:1]
            (length,) = struct.unpack("!I", buf[1:5])
            if len(buf) < 1 + length:
                break
            body, buf = buf[5:1 + length], buf[1 + length:]
            if tag == b"E":
                sock.close()
                fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
                return None, fields.get(b"C", b"?").decode()
            if tag == b"Z":
                return sock, ""


def query(sock: socket.socket, sql: str) -> list[bytes]:
    """Run ``sql`` on an idle client; the tags of the replies up to ReadyForQuery."""
    sock.sendall(m.Query(sql).encode())
    tags, buf = [], b""
    while True:
        buf += sock.recv(65536)
        while len(buf) >= 5:
            (length,) = struct.unpack("!I", buf[1:5])
            if len(buf) < 1 + length:
                break
            tags.append(buf[:1])
            if buf[:1] == b"Z":
                return tags
            buf = buf[1 + length:]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def raise_fd_limit(need: int) -> int:
    """Soft limit up to the hard one; the hard one up to ``need`` where we may (root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < need:
        raise SystemExit(f"the file limit is {hard}, {need} needed: raise it (ulimit -Hn) or use fewer --clients")
    return hard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--pair", action="store_true", help="connmgr mirrors every session to a secondary")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds the fleet sits idle while CPU is measured")
    ap.add_argument("--threads", type=int, default=16, help="clients logging in at once")
    args = ap.parse_args()
    n = args.clients
    raise_fd_limit(2 * n + 200)  # connmgr: a client socket and a server socket per session
    base = temp_base_dir("connmgr-idle-")
    cluster = Cluster.create(base, "idle", host_auth="trust",
                             settings={"max_connections": n + 30, "shared_buffers": "128MB"})  # fmt: skip
    services: list[Service] = []
    clients: list[socket.socket] = []
    try:
        cluster.start(timeout=120)
        port = free_port()
        (base / "primary.toml").write_text(f"[server]\nmax_clients = {n}\n")
        extra = ["--config", str(base / "primary.toml")]
        markers = ("listening on",)
        if args.pair:
            mport, sport = free_port(), free_port()
            (base / "secondary.toml").write_text(f'[server]\nmax_clients = {n}\n[mirror]\nlisten = "{HOST}:{mport}"\n')
            (base / "primary.toml").write_text(f'[server]\nmax_clients = {n}\n[mirror]\npeer = "{HOST}:{mport}"\n'
                                               '[redo]\nuser = "postgres"\n')  # fmt: skip
            services.append(Service("secondary", connmgr_argv(sport, cluster.port, ["--config", str(base / "secondary.toml")]),
                                    sport, base / "secondary.log"))  # fmt: skip
            markers = ("listening on", "mirror link up")
        services.append(Service("connmgr", connmgr_argv(port, cluster.port, extra), port, base / "connmgr.log",
                                markers=markers))  # fmt: skip
        for s in services:
            s.start()
        proxy = services[-1]
        secondary = services[0] if args.pair else None
        first, why = login(port)
        if first is None:
            raise SystemExit(f"the first client could not log in: {why}")
        clients.append(first)
        time.sleep(1.0)
        c0 = sum(cpu_times(proxy.pid()) or (0.0, 0.0))
        time.sleep(args.idle)
        cpu_before = (sum(cpu_times(proxy.pid()) or (0.0, 0.0)) - c0) / args.idle
        rss0 = rss_kib(proxy.pid())
        srss0 = rss_kib(secondary.pid()) if secondary else 0
        t0 = time.monotonic()
        failures: dict[str, int] = {}
        with ThreadPoolExecutor(args.threads) as pool:
            for i, (sock, why) in enumerate(pool.map(lambda _: login(port), range(n - 1)), start=2):
                if sock is None:
                    failures[why] = failures.get(why, 0) + 1
                else:
                    clients.append(sock)
                if i % 1000 == 0 or i == n:
                    print(f"  {i:6d} clients logged in  ({time.monotonic() - t0:5.1f} s, connmgr RSS"
                          f" {rss_kib(proxy.pid()) / 1024:7.1f} MiB)", flush=True)  # fmt: skip
        if failures:
            print(f"  logins that failed: {failures}")
        time.sleep(2.0)  # settle (the mirror's records of the last sessions)
        rss1 = rss_kib(proxy.pid())
        srss1 = rss_kib(secondary.pid()) if secondary else 0
        u0, s0 = cpu_times(proxy.pid()) or (0.0, 0.0)
        time.sleep(args.idle)
        u1, s1 = cpu_times(proxy.pid()) or (u0, s0)
        extra_sock, code = login(port, timeout=10)
        if extra_sock is not None:
            extra_sock.close()
        alive = query(clients[len(clients) // 2], "select 1")
        held = len(clients)
        print()
        print(f"idle clients held by one connmgr{' (pair: mirrored to a secondary)' if args.pair else ''}: {held}")
        print(f"  {'':34s} {'before':>10s} {'with the fleet':>15s} {'per client':>11s}")
        per = (rss1 - rss0) / max(1, held - 1)
        print(f"  {'connmgr RSS':34s} {rss0 / 1024:8.1f} MiB {rss1 / 1024:12.1f} MiB {per:8.1f} KiB")
        if secondary:
            sper = (srss1 - srss0) / max(1, held - 1)
            print(f"  {'secondary connmgr RSS':34s} {srss0 / 1024:8.1f} MiB {srss1 / 1024:12.1f} MiB {sper:8.1f} KiB")
        cpu = (u1 + s1 - u0 - s0) / args.idle
        print(f"  {'connmgr CPU while idle':34s} {100 * cpu_before:8.2f} %   {100 * cpu:12.2f} %  "
              f"{1e6 * (cpu - cpu_before) / held:8.2f} us/s")
        print(f"  client {n + 1}: {'SQLSTATE ' + code if extra_sock is None else 'ACCEPTED (expected 53300)'}"
              f"; a held client then ran select 1: {'ok' if alive and alive[-1] == b'Z' and b'E' not in alive else alive}")  # fmt: skip
        print(f"  target: <= 32 KiB per idle client: {'met' if per <= 32 else 'NOT met'}; the {n + 1}st refused with"
              f" 53300: {'yes' if code == '53300' else 'NO'}")  # fmt: skip
    except TargetUnavailable as e:
        raise SystemExit(str(e)) from e
    finally:
        for sock in clients:
            sock.close()
        for s in reversed(services):
            s.stop()
        cluster.destroy()


if __name__ == "__main__":
    main()
