"""Feasibility part 2b: host B continues a client's TCP connection after host A dies, from the
frames the router copied to it, without anything from host A.

Run as root:  python labs/host_failover/poc_host_takeover.py [--mode transparent|droprule] [--no-absorb]

  * router: tc clsact on r-hosta, u32 match-all, mirred egress mirror -> r-hostb (both ways);
  * hosta: a server *process* (ip netns exec) on VIP:5432 answers 5 requests, then stops
    reading; the client then sends a line host A's kernel acknowledges but its app never reads;
  * host A dies: its router port goes down and the server gets SIGKILL at the same instant, so
    whatever FIN/RST its kernel emits is lost; the client sends another line into the void;
  * host B (after a stand-in 300 ms "detection"), from its AF_PACKET sniffer only: derives the
    4-tuple, ISNs, MSS, window scales, SACK, timestamps, windows, rcv_nxt/snd_nxt and the bytes
    A acknowledged but its app never consumed (the app's position is what connmgr's mirror
    stream tells host B; here it is the 5 request lines), rebuilds the socket with TCP repair,
    takes the VIP, sends gratuitous ARP, leaves repair mode, reads, answers;
  * the client reads host B's answer on its original socket; no FIN/RST ever reaches it.

--mode transparent (default): the socket is rebuilt with IP_TRANSPARENT *before* the VIP is
  added, so there is no moment where the VIP is local and the 4-tuple has no socket (no RST
  possible, no firewall rule needed).
--mode freebind: the same with IP_FREEBIND instead of IP_TRANSPARENT.
--mode droprule: the VIP is added first, behind an nftables drop rule for its port; the rule
  goes once the socket is rebuilt.
--no-absorb: do not put the client's bytes that host A never acknowledged (seen by host B
  because the bridge floods frames for a dead port's MAC) into the rebuilt receive queue;
  the client must then retransmit them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import poc_soccr as soccr
from poc_common import ADDR, VIP, Lab, Sniffer, garp_raw, in_netns, parse_tcp

PORT = 5432

SERVER = f"""
import socket, sys, time
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(({VIP!r}, {PORT}))
ls.listen(8)
print("listening", flush=True)
s, _ = ls.accept()
buf = b""
for i in range(5):
    while b"\\n" not in buf:
        buf += s.recv(100)
    line, buf = buf.split(b"\\n", 1)
    s.sendall(b"A-reply-" + line + b"\\n")
print("stopped reading", flush=True)
time.sleep(600)
"""


def seq_add(a: int, b: int) -> int:
    return (a + b) & 0xFFFFFFFF


def seq_after(a: int, b: int) -> bool:
    return ((a - b) & 0xFFFFFFFF) < 0x80000000 and a != b


def state_from_frames(frames, client: tuple[str, int], consumed: int, absorb: bool) -> soccr.TcpState:
    """The server side of client<->VIP:PORT as host B can know it from copied frames alone."""
    syn = synack = None
    c_segs: dict[int, bytes] = {}
    last_c = last_a = None
    a_max_ack = None
    a_end = None
    c_max_ack = None
    max_c_win = 0
    for data, _pkttype in frames:
        t = parse_tcp(data)
        if t is None:
            continue
        if (t["src"], t["sport"], t["dst"], t["dport"]) == (*client, VIP, PORT):
            if t["flags"] & 0x02:
                syn = t
                continue
            last_c = t
            if t["payload"]:
                c_segs[t["seq"]] = t["payload"]
            if c_max_ack is None or seq_after(t["ack"], c_max_ack):
                c_max_ack = t["ack"]
            max_c_win = max(max_c_win, t["win"])
        elif (t["src"], t["sport"], t["dst"], t["dport"]) == (VIP, PORT, *client):
            if t["flags"] & 0x02:
                synack = t
                a_end = seq_add(t["seq"], 1)
                continue
            last_a = t
            end = seq_add(t["seq"], len(t["payload"]))
            if a_end is None or seq_after(end, a_end):
                a_end = end
            if a_max_ack is None or seq_after(t["ack"], a_max_ack):
                a_max_ack = t["ack"]
    if syn is None or synack is None or last_a is None:
        raise RuntimeError("the copied frames do not show the handshake: was the mirror in place?")
    c_isn, a_isn = syn["seq"], synack["seq"]
    # the client's byte stream, contiguous from its ISN+1
    stream, pos = b"", seq_add(c_isn, 1)
    while pos in c_segs:
        stream += c_segs[pos]
        pos = seq_add(pos, len(c_segs[pos]))
        while True:  # segments that overlap the end (retransmissions with other boundaries)
            nxt = [s for s in c_segs if not seq_after(s, pos) and seq_after(seq_add(s, len(c_segs[s])), pos)]
            if not nxt:
                break
            s = nxt[0]
            stream += c_segs[s][(pos - s) & 0xFFFFFFFF :]
            pos = seq_add(s, len(c_segs[s]))
    acked_by_a = (a_max_ack - seq_add(c_isn, 1)) & 0xFFFFFFFF
    upto = len(stream) if absorb else acked_by_a
    inq = stream[consumed:upto]
    co, ao = syn["opts"], synack["opts"]
    mask = 0
    if "ts" in co and "ts" in ao:
        mask |= soccr.TCPI_OPT_TIMESTAMPS
    if co.get("sack_perm") and ao.get("sack_perm"):
        mask |= soccr.TCPI_OPT_SACK
    if "wscale" in co and "wscale" in ao:
        mask |= soccr.TCPI_OPT_WSCALE
    snd_ws, rcv_ws = co.get("wscale", 0), ao.get("wscale", 0)
    rcv_nxt = seq_add(c_isn, 1 + upto)
    st = soccr.TcpState(local=(VIP, PORT), peer=client)
    st.inq_seq, st.inq_len, st.inq_data = rcv_nxt, len(inq), inq
    # host A's unacknowledged output would go here (restored as never sent); none in this run
    st.outq_seq, st.outq_len, st.unsq_len = a_end, 0, 0
    st.mss_clamp = co.get("mss", 536)
    st.opt_mask = mask
    st.snd_wscale, st.rcv_wscale = snd_ws, rcv_ws
    st.timestamp = last_a["opts"]["ts"][0] if "ts" in last_a["opts"] else 0
    st.window = (
        last_c["seq"],  # snd_wl1
        last_c["win"] << snd_ws,  # snd_wnd
        max_c_win << snd_ws,  # max_window
        last_a["win"] << rcv_ws,  # rcv_wnd
        a_max_ack,  # rcv_wup: where host A last advertised its window
    )
    st.extra.update(
        client_isn=c_isn, a_isn=a_isn, acked_by_a=acked_by_a, client_bytes_seen=len(stream),
        client_last_tsval=last_c["opts"].get("ts", (None,))[0], snd_una=c_max_ack,
    )
    return st


def nft(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", *args], check=True, capture_output=True, timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("transparent", "freebind", "droprule"), default="transparent")
    ap.add_argument("--no-absorb", action="store_true")
    args = ap.parse_args()
    absorb = not args.no_absorb

    lab = Lab()
    server = None
    ok = True
    try:
        lab.build()
        r = lab.ns["router"]
        subprocess.run(["ip", "netns", "exec", r, "tc", "qdisc", "add", "dev", "r-hosta", "clsact"], check=True)
        for d in ("ingress", "egress"):
            subprocess.run(["ip", "netns", "exec", r, "tc", "filter", "add", "dev", "r-hosta", d, "protocol", "all",
                            "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", "r-hostb"],
                           check=True)
        sniff_b = Sniffer(lab.ns["hostb"])
        sniff_c = Sniffer(lab.ns["client"])

        server = subprocess.Popen(["ip", "netns", "exec", lab.ns["hosta"], sys.executable, "-c", SERVER],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        with in_netns(lab.ns["client"]):
            c = socket.socket()
        c.settimeout(5)
        c.connect((VIP, PORT))
        consumed = 0
        for i in range(5):
            q = b"q%d\n" % i
            c.sendall(q)
            consumed += len(q)
            assert c.recv(100) == b"A-reply-q%d\n" % i
        assert server.stdout.readline().strip() == "stopped reading"
        c.sendall(b"ACKED-BUT-NEVER-READ-BY-A\n")
        time.sleep(0.2)
        print(f"client {c.getsockname()} -> VIP {VIP}:{PORT}: 5 round trips with host A, then one line A never read")
        print(f"client neighbour entry for the VIP: {lab.neighbours('client').get(VIP)}  (A={lab.mac['hosta']}, B={lab.mac['hostb']})")

        # --- host A dies: port down and SIGKILL at the same instant ----------------------------
        t_kill = time.monotonic()
        lab.set_link("router", "r-hosta", "down")
        os.kill(server.pid, signal.SIGKILL)
        server.wait(5)
        print(f"t=0 ms: host A's router port down + SIGKILL of its server ({1000 * (time.monotonic() - t_kill):.1f} ms)")
        time.sleep(0.05)
        c.sendall(b"AFTER-FAILOVER\n")  # into the void: the client now retransmits
        reply: dict = {}

        def reader() -> None:
            try:
                c.settimeout(15)
                reply["data"] = c.recv(100)
                reply["t"] = time.monotonic()
            except Exception as e:
                reply["error"] = repr(e)

        th = threading.Thread(target=reader)
        th.start()

        time.sleep(0.25)  # stand-in for detection and the etcd lease
        t_b = time.monotonic()
        frames = sniff_b.drain(0.0)
        st = state_from_frames(frames, c.getsockname(), consumed, absorb)
        # never below the last TSval the client saw; bit 0 must be clear: since Linux 6.7 the low
        # bit of TCP_TIMESTAMP selects microsecond TSvals (an odd value made TSvals run 1000x fast)
        st.timestamp = (st.timestamp + int(1000 * (time.monotonic() - t_kill)) + 2) & 0xFFFFFFFE
        print(f"t={1000 * (t_b - t_kill):.0f} ms: host B derives the state from {len(frames)} copied frames:")
        print("   ", st.short())
        print(f"    inq_data={st.inq_data!r}  extra={st.extra}")

        # --- host B takes over -----------------------------------------------------------------
        with in_netns(lab.ns["hostb"]):
            fresh = socket.socket()
        if args.mode == "droprule":
            nft(lab.ns["hostb"], "add", "table", "inet", "fs14")
            nft(lab.ns["hostb"], "add chain inet fs14 input { type filter hook input priority -10 ; }")
            nft(lab.ns["hostb"], "add", "rule", "inet", "fs14", "input", "ip", "daddr", VIP, "tcp", "dport", str(PORT), "drop")
            lab.add_vip("hostb")
            garp_raw(lab.ns["hostb"], VIP, lab.mac["hostb"], count=1)
            s = soccr.restore(st, sock=fresh, leave_repair=None)
        else:
            s = soccr.restore(st, sock=fresh, transparent=args.mode == "transparent",
                              freebind=args.mode == "freebind", leave_repair=None)
            lab.add_vip("hostb")
            garp_raw(lab.ns["hostb"], VIP, lab.mac["hostb"], count=1)
        ts_back = soccr._u32(s, soccr.TCP_TIMESTAMP)
        soccr.repair(s, soccr.TCP_REPAIR_OFF)  # sends a window probe: the client's ACK follows
        if args.mode == "droprule":
            nft(lab.ns["hostb"], "delete", "table", "inet", "fs14")
        t_ready = time.monotonic()
        print(f"t={1000 * (t_ready - t_kill):.0f} ms: host B rebuilt the socket ({args.mode}), holds the VIP, sent GARP, left repair mode")
        print(f"    client neighbour entry for the VIP now: {lab.neighbours('client').get(VIP)}")
        print(f"    TCP_TIMESTAMP set {st.timestamp}, read back in repair mode {ts_back}")
        s.settimeout(10)
        got = b""
        want = b"ACKED-BUT-NEVER-READ-BY-A\nAFTER-FAILOVER\n"
        while len(got) < len(want):
            chunk = s.recv(100)
            if not chunk:
                break
            got += chunk
        t_got = time.monotonic()
        good = got == want
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}  t={1000 * (t_got - t_kill):.0f} ms: host B's socket read {got!r}")
        s.sendall(b"B-answer\n")
        time.sleep(0.1)
        garp_raw(lab.ns["hostb"], VIP, lab.mac["hostb"], count=1)  # the second burst
        th.join(15)
        good = reply.get("data") == b"B-answer\n"
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}  client got {reply.get('data')!r} on its original socket, "
              f"stall {1000 * (reply.get('t', t_kill) - t_kill):.0f} ms after the kill {reply.get('error', '')}")
        for i in range(3):
            c.sendall(b"more %d\n" % i)
            assert s.recv(100) == b"more %d\n" % i
            s.sendall(b"B-more %d\n" % i)
            assert c.recv(100) == b"B-more %d\n" % i
        print("PASS  3 more round trips client <-> host B")
        bad = []
        firsts = []
        for data, _ in sniff_c.drain(0.1):
            t = parse_tcp(data)
            if t and t["src"] == VIP and t["dst"] == ADDR["client"]:
                if t["flags"] & 0x05:
                    bad.append(f"flags={t['flags']:#x}")
                firsts.append((t["src_mac"], t["seq"], t["ack"], t["opts"].get("ts")))
        ok &= not bad
        print(f"{'PASS' if not bad else 'FAIL'}  no FIN/RST from the VIP ever reached the client {bad}")
        from_a = [f for f in firsts if f[0] == lab.mac["hosta"]]
        from_b = [f for f in firsts if f[0] == lab.mac["hostb"]]
        print(f"    last frame from A (mac, seq, ack, ts): {from_a[-1] if from_a else None}")
        print(f"    first frame from B (mac, seq, ack, ts): {from_b[0] if from_b else None}")
        ci = c.getsockopt(socket.IPPROTO_TCP, soccr.TCP_INFO, 104)
        print(f"    client tcp_info: state={soccr.TCP_STATES.get(ci[0])}, retransmits now {ci[2]}")
        c.close()
        s.close()
        sniff_b.close()
        sniff_c.close()
    except Exception as e:
        ok = False
        print("FAIL", repr(e))
        raise
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(5)
        lab.teardown()
        print("namespaces left:", repr(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout))
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
