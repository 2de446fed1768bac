"""Feasibility part 2a: TCP repair between two namespaces, soccr-style, with full queues.

Run as root:  python labs/host_failover/poc_tcp_repair.py
client (fs14-client) connects to the VIP on fs14-hosta. Then, in fs14-hosta:
  1. the server socket has unread client bytes (receive queue) and, because the client stops
     reading and has a tiny receive buffer, a send queue with sent-unacknowledged and unsent
     bytes;
  2. the server socket is put in repair mode and its state read with getsockopt (as
     libsoccr_save does);
  3. a second attempt to rebuild while the original still exists shows the errno;
  4. the original is closed in repair mode (no FIN, no RST: checked with a sniffer on the
     client's interface);
  5. a third socket is rebuilt in repair mode with the same 4-tuple, sequence numbers,
     options, timestamp, window and both queues, and leaves repair mode;
  6. the client reads every byte the server had queued, the new socket reads the bytes the
     old one never read, and both directions keep working.
Every namespace is removed at the end.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import poc_soccr as soccr
from poc_common import ADDR, VIP, Lab, Sniffer, in_netns, parse_tcp

PORT = 5432


def pattern(n: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(n))


def rst_or_fin(frames) -> list[str]:
    out = []
    for data, _ in frames:
        t = parse_tcp(data)
        if t and {t["src"], t["dst"]} == {VIP, ADDR["client"]} and t["flags"] & 0x05:
            out.append(f"{t['src']}:{t['sport']}->{t['dst']}:{t['dport']} flags={t['flags']:#x}")
    return out


def main() -> int:
    lab = Lab()
    ok = True
    try:
        lab.build()
        with in_netns(lab.ns["hosta"]):
            ls = socket.socket()
            ls.bind((VIP, PORT))
            ls.listen(4)
        with in_netns(lab.ns["client"]):
            c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: the server's queue fills
        c.settimeout(5)
        c.connect((VIP, PORT))
        ls.settimeout(5)
        s, _ = ls.accept()
        s.settimeout(5)
        for i in range(5):
            c.sendall(b"query %d;" % i)
            s.recv(100)
            s.sendall(b"reply %d;" % i)
            c.recv(100)
        c.sendall(b"BYTES-THE-SERVER-NEVER-READ")
        big = pattern(300_000)
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                sent += s.send(big[sent:])
            except BlockingIOError:
                time.sleep(0.05)
            if sent == len(big):
                break
        time.sleep(0.3)
        print(f"server queued {sent} of {len(big)} bytes for a client that does not read")

        sniff = Sniffer(lab.ns["client"])

        # 2. save, as libsoccr_save
        soccr.repair(s, soccr.TCP_REPAIR_ON)
        st = soccr.save(s)
        print("saved:", st.short())
        print(f"  inq_data={st.inq_data!r}  outq_data={len(st.outq_data)} bytes")

        # 3. rebuilding while the original still holds the 4-tuple
        with in_netns(lab.ns["hosta"]):
            dup = socket.socket()
        try:
            soccr.restore(st, sock=dup, log=lambda m: print("  expected failure:", m))
            print("UNEXPECTED: restore succeeded while the original exists")
            ok = False
        except OSError as e:
            print(f"PASS  restore while the original socket exists fails: errno {e.errno} ({e.strerror})")

        # 4. kill the original silently
        soccr.silent_close(s)
        ls.close()  # the listener is not needed by the repaired socket (repair sets SK_FORCE_REUSE)
        time.sleep(0.3)
        bad = rst_or_fin(sniff.drain(0.0))
        print(("PASS" if not bad else "FAIL") + "  original closed in repair mode: client saw no FIN/RST", bad)
        ok = ok and not bad

        # 5. rebuild in hosta with a third socket
        with in_netns(lab.ns["hosta"]):
            fresh = socket.socket()
        t0 = time.monotonic()
        r = soccr.restore(st, sock=fresh)
        print(f"PASS  restored in {1000 * (time.monotonic() - t0):.2f} ms, repair off")
        r.settimeout(5)
        ri = r.getsockopt(socket.IPPROTO_TCP, soccr.TCP_INFO, 104)
        print(f"  repaired socket state={soccr.TCP_STATES.get(ri[0])} {r.getsockname()}->{r.getpeername()}")

        # 6. the conversation goes on
        got = r.recv(1000)
        print(("PASS" if got == b"BYTES-THE-SERVER-NEVER-READ" else "FAIL") + f"  repaired side reads the restored receive queue: {got!r}")
        ok = ok and got == b"BYTES-THE-SERVER-NEVER-READ"
        received = b""
        c.settimeout(5)
        while len(received) < sent:
            chunk = c.recv(65536)
            if not chunk:
                break
            received += chunk
        same = received == big[:sent]
        print(("PASS" if same else "FAIL") + f"  client received all {len(received)} queued bytes, identical: {same}")
        ok = ok and same
        for i in range(5):
            c.sendall(b"after %d;" % i)
            a = r.recv(100)
            r.sendall(b"answer %d;" % i)
            b = c.recv(100)
            assert a == b"after %d;" % i and b == b"answer %d;" % i, (a, b)
        print("PASS  5 round trips client <-> repaired socket after the move")
        frames = sniff.drain(0.2)
        bad = rst_or_fin(frames)
        print(("PASS" if not bad else "FAIL") + "  no FIN/RST on the client's wire during the whole move", bad)
        ok = ok and not bad
        ts_vals = [t["opts"].get("ts") for t in (parse_tcp(f) for f, _ in frames) if t and t["src"] == VIP and "ts" in t["opts"]]
        print(f"  server TSvals after the move: first {ts_vals[0] if ts_vals else None}, saved timestamp {st.timestamp}")
        ci = c.getsockopt(socket.IPPROTO_TCP, soccr.TCP_INFO, 104)
        print(f"  client tcp_info: state={soccr.TCP_STATES.get(ci[0])} retransmits={ci[2]} backoff={ci[4]}")

        # 7. bytes in flight (sent, never acknowledged): the client's port is down while the
        #    server writes; it comes back up, then the socket moves. (a) as soccr does: restored as "sent" in
        #    repair mode -> they go out at the retransmission timer; (b) restored as if never
        #    sent (written after leaving repair) -> they go out at once.
        for variant in ("as-sent (soccr)", "as-unsent"):
            lab.set_link("router", "r-client", "down")
            payload = pattern(3000)
            r.sendall(payload)
            time.sleep(0.3)
            soccr.repair(r, soccr.TCP_REPAIR_ON)
            st2 = soccr.save(r)
            print(f"  in flight [{variant}]: outq={st2.outq_len} unsent={st2.unsq_len}")
            if variant == "as-unsent":
                st2.unsq_len = st2.outq_len
            soccr.silent_close(r)
            lab.set_link("router", "r-client", "up")
            time.sleep(0.2)
            with in_netns(lab.ns["hosta"]):
                fresh = socket.socket()
            t0 = time.monotonic()
            r = soccr.restore(st2, sock=fresh)
            r.settimeout(5)
            got = b""
            while len(got) < len(payload):
                got += c.recv(65536)
            dt = time.monotonic() - t0
            good = got == payload
            print(("PASS" if good else "FAIL") + f"  in-flight bytes [{variant}] reach the client, identical={good}, {1000 * dt:.0f} ms after the restore")
            ok = ok and good
            c.sendall(b"still there?")
            assert r.recv(100) == b"still there?"
        c.close()
        r.close()
        sniff.close()
    except Exception as e:
        ok = False
        print("FAIL", repr(e))
        raise
    finally:
        lab.teardown()
        print("namespaces left:", repr(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout))
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
