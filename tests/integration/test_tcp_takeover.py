"""Host B continues a client's TCP connection after host A's death, from copied frames alone
(issue 14, parts 1, 3 and 4): real namespaces, a real bridge mirroring host A's port, a
real kill, connmgr.host.privileged doing the repair. No Postgres here; the whole takeover
with replay is tests/integration/test_host_failover.py."""

from __future__ import annotations

import sys
import time

import pytest

from connmgr.embedded import netlab

if netlab.missing():
    pytest.skip("the host-failover lab needs: " + "; ".join(netlab.missing()), allow_module_level=True)

from connmgr.host import privileged  # noqa: E402
from replay.tcp_state import FIN, RST, TcpTracker, parse_frame  # noqa: E402

PORT = 5432
SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("listening", flush=True)
c, _ = s.accept()
f = c.makefile("rb")
for _ in range(4):
    line = f.readline()
    c.sendall(b"A:" + line)
print("stopped reading", flush=True)
import time
time.sleep(600)
"""


def drain(sock, into: list, wait: float = 0.0) -> list:
    deadline = time.monotonic() + wait
    while True:
        try:
            into.append((sock.recv(65535), time.monotonic()))
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return into
            time.sleep(0.01)


def recv_exactly(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise AssertionError(f"EOF after {out!r}")
        out += chunk
    return out


@pytest.mark.parametrize("in_flight", ["client bytes", "server bytes"])
def test_host_b_continues_the_connection_with_the_bytes_in_flight(in_flight):
    """``client bytes``: the client's last line was acknowledged by host A's kernel and never
    read by its server, and the next went out after host A died (the bridge floods it to
    host B): host B holds both. ``server bytes``: host A's last reply left but never reached
    the client (its data segments are dropped on their way in, after the router copied
    them), so the client never acknowledged it: host B sends it again first."""
    with netlab.NetLab() as lab:
        with netlab.in_netns(lab.ns["hostb"]):
            capture = privileged.open_capture("eth0")
        with netlab.in_netns(lab.ns["client"]):
            watch = privileged.open_capture("eth0")  # what reaches the client
        server = lab.popen("hosta", [sys.executable, "-c", SERVER, netlab.VIP, str(PORT)], stdout=-1, text=True)
        assert server.stdout.readline().strip() == "listening"
        client = lab.socket_in("client")
        client.setsockopt(netlab.socket.IPPROTO_TCP, netlab.socket.TCP_NODELAY, 1)  # as libpq does
        client.settimeout(10)
        client.connect((netlab.VIP, PORT))
        consumed = 0
        for i in range(3):
            line = b"q%d\n" % i
            client.sendall(line)
            consumed += len(line)
            assert recv_exactly(client, len(line) + 2) == b"A:" + line
        if in_flight == "server bytes":
            lab.nft("client", "add table inet lab\nadd chain inet lab input { type filter hook input priority -10 ; }\n"
                              f"add rule inet lab input ip saddr {netlab.VIP} tcp sport {PORT} drop\n")  # fmt: skip
        client.sendall(b"q3\n")
        consumed += 3
        assert server.stdout.readline().strip() == "stopped reading"
        if in_flight == "client bytes":
            assert recv_exactly(client, 5) == b"A:q3\n"
        client.sendall(b"acked-never-read\n")  # host A's kernel acknowledges it; its server never reads it
        time.sleep(0.3)
        killed = lab.kill_host("hosta")
        if in_flight == "client bytes":
            client.sendall(b"after-the-death\n")  # flooded by the bridge, host A's port being gone
            time.sleep(0.2)
        else:
            lab.run("client", ["nft", "delete", "table", "inet", "lab"])

        tracker = TcpTracker({(netlab.VIP, PORT)})
        frames = drain(capture, [])
        for f, at in frames:
            tracker.on_frame(f, at)
        conn = tracker.connection(client.getsockname())
        assert conn is not None, f"host B followed nothing in {len(frames)} frames"
        rs = conn.repair_state(client_from=consumed, now=time.monotonic())
        if in_flight == "client bytes":
            assert rs.unsent == b""
            assert conn.client_data(consumed, rs.client_end) == b"acked-never-read\nafter-the-death\n"
            expect = b"B:continues\n"
        else:
            assert rs.unsent == b"A:q3\n", "host A's reply the client never acknowledged"
            assert conn.client_data(consumed, rs.client_end) == b"acked-never-read\n"
            expect = b"A:q3\nB:continues\n"

        with netlab.in_netns(lab.ns["hostb"]):
            sock = privileged.rebuild(rs)
            assert privileged.add_address("eth0", netlab.VIP, netlab.PREFIXLEN)
            privileged.gratuitous_arp("eth0", netlab.VIP)
        privileged.leave_repair(sock)
        sock.sendall(b"B:continues\n")
        got = recv_exactly(client, len(expect))
        stall = time.monotonic() - killed
        assert got == expect
        client.sendall(b"next\n")
        sock.settimeout(5)
        assert recv_exactly(sock, 5) == b"next\n"
        assert lab.neighbour("client", netlab.VIP) == lab.mac["hostb"]

        seen = drain(watch, [], wait=0.1)
        resets = [s for s in (parse_frame(f) for f, _ in seen)
                  if s is not None and s.src == (netlab.VIP, PORT) and s.flags & (RST | FIN)]  # fmt: skip
        assert resets == [], "the client saw its connection end"
        assert stall < 5, f"stall {stall:.2f}s"
        for s in (client, sock, capture, watch):
            s.close()
