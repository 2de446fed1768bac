"""What connmgr holds while a client streams one very large message (issue 13, part 8).

A raw client logs in and sends ``SELECT <size> --xxx...`` as one simple Query of
``--mb`` megabytes, in ``--chunk-kb`` pieces with a pause between them, while this script
samples the resident memory (VmRSS) of the connmgr process and of the backend serving the
session. The same is done direct to Postgres, as the reference. Printed: per target, how
long the send took, the answer (it must be the body's length), and the peak RSS above the
process's RSS before the message, absolute and as a multiple of the message size.

    python3 labs/big_message.py --mb 600
    python3 labs/big_message.py --mb 64            # quicker

``connmgr`` is a lone connmgr with the default ``[server] max_buffered_message`` (8 MiB): the
Query streams through it. Measured (600 MiB): connmgr 0.0 MiB above its RSS before, the
backend 600 MiB (it holds every message whole). A pair's journal and mirror outbox hold
copies too, bounded by their own settings (``[failover] max_replay_bytes``, ``[mirror]
max_buffer_bytes``); ``tests/integration/test_streaming.py`` measures a 64 MiB Query
through a pair with tracemalloc (11.7 MiB traced in both connmgrs together).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.procs import HOST, Service, log  # noqa: E402
from benchkit.targets import connmgr_argv  # noqa: E402

from connmgr.embedded.clusters import Cluster, free_port, temp_base_dir  # noqa: E402
from shadow import messages as m  # noqa: E402


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def read_message(sock: socket.socket) -> tuple[str, bytes]:
    head = _read_exactly(sock, 5)
    (length,) = struct.unpack("!I", head[1:])
    return chr(head[0]), _read_exactly(sock, length - 4)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def login(port: int) -> tuple[socket.socket, int]:
    """A trust login as postgres; returns the socket and the backend pid it reports
    (connmgr's virtual pid for connmgr: the real one is looked up separately)."""
    sock = socket.create_connection((HOST, port), timeout=600)
    sock.sendall(m.startup_message({"user": "postgres", "database": "postgres"}))
    pid = 0
    while True:
        tag, body = read_message(sock)
        if tag == "E":
            raise ConnectionError(f"login refused: {body!r}")
        if tag == "K":
            pid = struct.unpack("!i", body[:4])[0]
        if tag == "Z":
            return sock, pid


def backend_pid(cluster: Cluster, application_name: str) -> int:
    with cluster.connect() as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)).fetchone()
    return row[0] if row else 0


def stream_query(cluster: Cluster, port: int, mb: int, chunk_kb: int, pause: float, watch: dict[str, int]) -> dict:
    """Send the big Query to ``port``; sample the RSS of ``watch`` ({name: pid}) and of the
    session's backend."""
    sock, _pid = login(port)
    sock.sendall(m.query("SET application_name = 'big_message'"))
    while read_message(sock)[0] != "Z":
        pass
    watch = {**{k: v for k, v in watch.items() if v}, "backend": backend_pid(cluster, "big_message")}
    before = {name: rss_kib(pid) for name, pid in watch.items()}
    peak = dict(before)
    size = mb << 20
    # a line comment: Postgres's scanner skips it without a copy (a string literal of
    # 600 MiB is over its own 1 GiB allocation limit once it is unescaped)
    head = b"SELECT %d --" % size
    tail = b"\0"
    body_len = size - len(head) - len(tail)
    sock.sendall(b"Q" + struct.pack("!I", 4 + size) + head)
    chunk = b"x" * (chunk_kb << 10)
    sent, t0 = 0, time.monotonic()
    while sent < body_len:
        piece = chunk if body_len - sent >= len(chunk) else chunk[: body_len - sent]
        sock.sendall(piece)
        sent += len(piece)
        for name, pid in watch.items():
            peak[name] = max(peak[name], rss_kib(pid))
        if pause:
            time.sleep(pause)
    sock.sendall(tail)
    answer = None
    while True:
        for name, pid in watch.items():
            peak[name] = max(peak[name], rss_kib(pid))
        tag, body = read_message(sock)
        if tag == "D":
            answer = int(body[6:].decode()) - len(head) - len(tail)
        elif tag == "E":
            answer = f"error {body[:120]!r}"
        elif tag == "Z":
            break
    seconds = time.monotonic() - t0
    sock.close()
    return {"seconds": seconds, "answer": answer, "expected": body_len,
            "held_mib": {name: (peak[name] - before[name]) / 1024 for name in watch}}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=600, help="message size in MiB (default 600)")
    ap.add_argument("--chunk-kb", type=int, default=1024, help="send size in KiB (default 1024)")
    ap.add_argument("--pause", type=float, default=0.002, help="seconds between sends (default 0.002)")
    ap.add_argument("--targets", default="direct,connmgr", help="direct, connmgr (default both)")
    args = ap.parse_args()
    base = temp_base_dir("connmgr-bigmsg-")
    cluster = Cluster.create(base, "big", host_auth="trust")
    service = None
    rows = []
    try:
        cluster.start()
        for target in args.targets.split(","):
            watch: dict[str, int] = {}
            port = cluster.port
            if target == "connmgr":
                port = free_port()
                service = Service("connmgr", connmgr_argv(port, cluster.port), port, base / "connmgr.log")
                service.start()
                watch["connmgr"] = service.pid() or 0
            elif target != "direct":
                raise SystemExit(f"unknown target {target!r}")
            log(f"{target}: streaming a {args.mb} MiB Query in {args.chunk_kb} KiB pieces")
            result = stream_query(cluster, port, args.mb, args.chunk_kb, args.pause, watch)
            rows.append((target, result))
            if service is not None:
                service.stop()
                service = None
    finally:
        if service is not None:
            service.stop()
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)
    size = args.mb
    print(f"\n{'target':10} {'seconds':>8} {'answer ok':>9} {'process':>10} {'held MiB':>9} {'x message':>9}")
    for target, r in rows:
        ok = r["answer"] == r["expected"]
        for name, held in r["held_mib"].items():
            print(f"{target:10} {r['seconds']:8.1f} {str(ok):>9} {name:>10} {held:9.1f} {held / size:9.2f}")
        if not ok:
            print(f"{'':10} answer: {r['answer']} (expected {r['expected']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
