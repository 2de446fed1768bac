"""Feasibility part 1: namespaces, veths, bridge, link down, frame mirroring, nftables/iptables.

Run as root:  python labs/host_failover/poc_netns_lab.py
Builds fs14-{client,router,hosta,hostb,witness}, tries each mechanism, prints PASS/FAIL
lines, and removes every namespace it made (also on failure or Ctrl-C).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from poc_common import ADDR, VIP, Lab, Sniffer, in_netns, parse_tcp

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def sh(ns: str | None, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    cp = subprocess.run(full, capture_output=True, text=True, timeout=20)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} -> {cp.returncode}: {cp.stderr.strip()}")
    return cp


def tcp_pair(lab: Lab, server_host: str, addr: str, port: int):
    """A connected (client_sock, server_sock) pair between the client and ``server_host``."""
    with in_netns(lab.ns[server_host]):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((addr, port))
        ls.listen(8)
    with in_netns(lab.ns["client"]):
        c = socket.socket()
    c.settimeout(3)
    c.connect((addr, port))
    ls.settimeout(3)
    s, _ = ls.accept()
    ls.close()
    s.settimeout(3)
    return c, s


def exchange(c: socket.socket, s: socket.socket, n: int = 20) -> None:
    for i in range(n):
        c.sendall(b"ping %d" % i)
        s.recv(100)
        s.sendall(b"pong %d" % i)
        c.recv(100)


def count_vip_frames(frames, lab: Lab) -> dict[str, int]:
    """Frames of the client<->VIP connection seen by a sniffer, by direction."""
    out = {"client->vip": 0, "vip->client": 0}
    for data, _pkttype in frames:
        t = parse_tcp(data)
        if t is None:
            continue
        if t["src"] == ADDR["client"] and t["dst"] == VIP:
            out["client->vip"] += 1
        elif t["src"] == VIP and t["dst"] == ADDR["client"]:
            out["vip->client"] += 1
    return out


def mirror_trial(lab: Lab, label: str, port: int, expect_copy: bool, witness_too: bool | None = None) -> None:
    sb = Sniffer(lab.ns["hostb"])
    sw = Sniffer(lab.ns["witness"])
    try:
        c, s = tcp_pair(lab, "hosta", VIP, port)
        try:
            exchange(c, s)
        finally:
            c.close()
            s.close()
        time.sleep(0.2)
        got_b = count_vip_frames(sb.drain(0.2), lab)
        got_w = count_vip_frames(sw.drain(0.0), lab)
    finally:
        sb.close()
        sw.close()
    both = got_b["client->vip"] >= 20 and got_b["vip->client"] >= 20
    ok = both if expect_copy else (got_b["client->vip"] + got_b["vip->client"] == 0)
    if witness_too is not None:
        wsum = got_w["client->vip"] + got_w["vip->client"]
        ok = ok and ((wsum > 0) == witness_too)
    report(label, ok, f"hostb saw {got_b}, witness saw {got_w}")


def main() -> int:
    lab = Lab()
    try:
        lab.build()
        report("pyroute2: 5 namespaces, bridge, 4 veth pairs, addresses, VIP", True, str(lab.mac))

        # --- plain connectivity -------------------------------------------------------------
        c, s = tcp_pair(lab, "hosta", VIP, 5432)
        exchange(c, s, 3)
        c.close()
        s.close()
        report("TCP client -> VIP on hosta through the bridge", True)

        # --- baseline: a learning bridge does not show host A's unicast to host B -----------
        mirror_trial(lab, "baseline (learning bridge): hostb sees no VIP frames", 5433, expect_copy=False)

        # --- flooding with per-port flags ---------------------------------------------------
        r = lab.ns["router"]
        sh(r, "bridge", "link", "set", "dev", "r-hosta", "learning", "off")
        sh(r, "bridge", "link", "set", "dev", "r-client", "learning", "off")
        sh(r, "bridge", "link", "set", "dev", "r-witness", "flood", "off")
        # (`bridge fdb flush dev r-hosta` -> "Operation not supported" here; this works:)
        sh(r, "ip", "link", "set", "dev", "r-hosta", "type", "bridge_slave", "fdb_flush")
        sh(r, "ip", "link", "set", "dev", "r-client", "type", "bridge_slave", "fdb_flush")
        mirror_trial(
            lab,
            "flooding: learning off on r-hosta/r-client, flood off on r-witness",
            5434,
            expect_copy=True,
            witness_too=False,
        )
        sh(r, "bridge", "link", "set", "dev", "r-hosta", "learning", "on")
        sh(r, "bridge", "link", "set", "dev", "r-client", "learning", "on")
        sh(r, "bridge", "link", "set", "dev", "r-witness", "flood", "on")

        # --- flooding with ageing_time 0 (pyroute2) -----------------------------------------
        from pyroute2 import NetNS

        with NetNS(r) as rr:
            br = rr.link_lookup(ifname="br0")[0]
            rr.link("set", index=br, kind="bridge", br_ageing_time=0)
        sh(r, "ip", "link", "set", "dev", "br0", "type", "bridge", "fdb_flush")
        mirror_trial(lab, "flooding: br0 ageing_time 0 (floods to every port)", 5435, expect_copy=True, witness_too=True)
        with NetNS(r) as rr:
            rr.link("set", index=br, kind="bridge", br_ageing_time=30000)
        # let the bridge learn again
        c, s = tcp_pair(lab, "hosta", VIP, 5436)
        exchange(c, s, 3)
        c.close()
        s.close()

        # --- tc mirred: clsact on r-hosta, both directions, to r-hostb -----------------------
        sh(r, "tc", "qdisc", "add", "dev", "r-hosta", "clsact")
        for direction in ("ingress", "egress"):
            sh(r, "tc", "filter", "add", "dev", "r-hosta", direction, "protocol", "all", "u32",
               "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", "r-hostb")
        mirror_trial(lab, "tc clsact + u32 + mirred egress mirror r-hosta -> r-hostb", 5437, expect_copy=True, witness_too=False)
        print(sh(r, "tc", "-s", "filter", "show", "dev", "r-hosta", "egress").stdout)
        sh(r, "tc", "qdisc", "del", "dev", "r-hosta", "clsact")

        # --- the same with pyroute2's tc API ------------------------------------------------
        try:
            with NetNS(r) as rr:
                ha = rr.link_lookup(ifname="r-hosta")[0]
                hb = rr.link_lookup(ifname="r-hostb")[0]
                rr.tc("add", "clsact", ha)
                for parent in (0xFFFFFFF2, 0xFFFFFFF3):  # TC_H_MIN_INGRESS, TC_H_MIN_EGRESS
                    rr.tc(
                        "add-filter", "u32", ha, parent=parent, protocol=0x0003, prio=10,
                        keys=["0x0/0x0+0"], target=0x10001, action={"kind": "mirred", "direction": "egress", "action": "mirror", "ifindex": hb},
                    )
            mirror_trial(lab, "pyroute2 tc: clsact + u32 + mirred", 5438, expect_copy=True, witness_too=False)
            with NetNS(r) as rr:
                rr.tc("del", "clsact", ha)
        except Exception as e:
            report("pyroute2 tc: clsact + u32 + mirred", False, repr(e))

        # --- nftables netdev dup (alternative to tc) ----------------------------------------
        try:
            sh(r, "nft", "add", "table", "netdev", "fs14m")
            for hook in ("ingress",):
                sh(r, "nft", f"add chain netdev fs14m {hook}_a {{ type filter hook {hook} device r-hosta priority 0 ; }}")
            sh(r, "nft", "add", "rule", "netdev", "fs14m", "ingress_a", "dup", "to", "r-hostb")
            try:
                sh(r, "nft", "add chain netdev fs14m egress_a { type filter hook egress device r-hosta priority 0 ; }")
                sh(r, "nft", "add", "rule", "netdev", "fs14m", "egress_a", "dup", "to", "r-hostb")
                mirror_trial(lab, "nft netdev ingress+egress dup to r-hostb", 5439, expect_copy=True, witness_too=False)
            except RuntimeError as e:
                report("nft netdev egress hook (nft 1.0.6)", False, str(e)[-200:])
            sh(r, "nft", "delete", "table", "netdev", "fs14m")
        except RuntimeError as e:
            report("nft netdev dup", False, str(e)[-300:])

        # --- link down: host A cut from the router ------------------------------------------
        c, s = tcp_pair(lab, "hosta", VIP, 5440)
        sa = Sniffer(lab.ns["hosta"])
        lab.set_link("router", "r-hosta", "down")
        c.sendall(b"into the void")
        time.sleep(0.5)
        seen = count_vip_frames(sa.drain(0.0), lab)
        sa.close()
        lab.set_link("router", "r-hosta", "up")
        c.close()
        s.close()
        report("link down (r-hosta): host A receives nothing", seen["client->vip"] == 0, str(seen))
        lab.set_link("hosta", "eth0", "down")
        lab.set_link("hosta", "eth0", "up")
        report("link down/up of eth0 inside hosta", True)

        # --- nftables and iptables inside a namespace: drop the VIP's port ------------------
        for tool, add, delete in (
            (
                "nft",
                [["nft", "add", "table", "inet", "fs14"],
                 ["nft", "add chain inet fs14 input { type filter hook input priority -10 ; }"],
                 ["nft", "add", "rule", "inet", "fs14", "input", "ip", "daddr", VIP, "tcp", "dport", "5441", "drop"]],
                [["nft", "delete", "table", "inet", "fs14"]],
            ),
            (
                "iptables",
                [["iptables", "-I", "INPUT", "-d", VIP, "-p", "tcp", "--dport", "5441", "-j", "DROP"]],
                [["iptables", "-D", "INPUT", "-d", VIP, "-p", "tcp", "--dport", "5441", "-j", "DROP"]],
            ),
        ):
            try:
                for cmd in add:
                    sh(lab.ns["hosta"], *cmd)
                with in_netns(lab.ns["hosta"]):
                    ls = socket.socket()
                    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    ls.bind((VIP, 5441))
                    ls.listen(1)
                with in_netns(lab.ns["client"]):
                    c = socket.socket()
                c.settimeout(1.0)
                try:
                    c.connect((VIP, 5441))
                    dropped = False
                except TimeoutError:
                    dropped = True
                c.close()
                for cmd in delete:
                    sh(lab.ns["hosta"], *cmd)
                with in_netns(lab.ns["client"]):
                    c = socket.socket()
                c.settimeout(2.0)
                c.connect((VIP, 5441))
                c.close()
                ls.close()
                report(f"{tool}: drop rule for VIP:port in a namespace, then removed", dropped, "SYN silently dropped, no RST" if dropped else "not dropped")
            except Exception as e:
                report(f"{tool} in a namespace", False, repr(e))
    except Exception as e:
        report("lab", False, repr(e))
        raise
    finally:
        lab.teardown()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        print("namespaces left:", repr(left))
    bad = [n for n, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
