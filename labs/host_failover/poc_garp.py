"""Feasibility part 4: gratuitous ARP from a namespace, and the peer's neighbour table.

Run as root:  python labs/host_failover/poc_garp.py
The client talks to the VIP on host A (so it has a neighbour entry VIP -> A's MAC). The VIP
moves to host B, which announces it with scapy (request form); the client's entry must point
to B at once, even inside the 1 s locktime. Then it moves back with a raw AF_PACKET socket
(reply form). Last, a gratuitous ARP for an address the client has no entry for (default
arp_accept=0: no entry is created).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from poc_common import VIP, Lab, garp_raw, garp_scapy, in_netns

NUD = {0x01: "INCOMPLETE", 0x02: "REACHABLE", 0x04: "STALE", 0x08: "DELAY", 0x10: "PROBE", 0x20: "FAILED", 0x40: "NOARP", 0x80: "PERMANENT"}


def talk_to_vip(port: int, lab: Lab, server: str) -> None:
    with in_netns(lab.ns[server]):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((VIP, port))
        ls.listen(1)
    with in_netns(lab.ns["client"]):
        c = socket.socket()
    c.settimeout(3)
    c.connect((VIP, port))
    ls.settimeout(3)
    s, _ = ls.accept()
    c.close()
    s.close()
    ls.close()


def entry(lab: Lab, ip: str = VIP) -> str:
    n = lab.neighbours("client").get(ip)
    if n is None:
        return "none"
    return f"{n[0]} {NUD.get(n[1], n[1])}"


def main() -> int:
    import scapy.all  # noqa: F401  (imported up front: the import alone takes most of a second)

    lab = Lab()
    ok = True
    try:
        lab.build()
        talk_to_vip(6000, lab, "hosta")
        before = entry(lab)
        print(f"client neighbour entry for the VIP after talking to host A: {before}  (A={lab.mac['hosta']})")

        # move the VIP A -> B and announce it with scapy, within the locktime (1 s) of the entry
        from pyroute2 import NetNS

        with NetNS(lab.ns["hosta"]) as a:
            a.addr("del", index=a.link_lookup(ifname="eth0")[0], address=VIP, prefixlen=24)
        lab.add_vip("hostb")
        t0 = time.monotonic()
        garp_scapy(lab.ns["hostb"], VIP, lab.mac["hostb"], op=1)
        time.sleep(0.05)
        after = entry(lab)
        good = after.startswith(lab.mac["hostb"])
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}  scapy GARP (request form) from hostb: client entry now {after}  "
              f"(B={lab.mac['hostb']}), {1000 * (time.monotonic() - t0):.0f} ms")
        talk_to_vip(6001, lab, "hostb")
        print(f"PASS  client connects to the VIP, now answered by host B; entry {entry(lab)}")

        # and back with a raw AF_PACKET socket, reply form
        with NetNS(lab.ns["hostb"]) as b:
            b.addr("del", index=b.link_lookup(ifname="eth0")[0], address=VIP, prefixlen=24)
        lab.add_vip("hosta")
        garp_raw(lab.ns["hosta"], VIP, lab.mac["hosta"], op=2, reply_tha_broadcast=True)
        time.sleep(0.05)
        after = entry(lab)
        print(f"INFO  raw GARP, reply form with target MAC ff:ff:ff:ff:ff:ff, within the locktime: entry {after} "
              f"({'updated' if after.startswith(lab.mac['hosta']) else 'NOT updated: not a GARP for Linux'})")
        garp_raw(lab.ns["hosta"], VIP, lab.mac["hosta"], op=2)
        time.sleep(0.05)
        after = entry(lab)
        good = after.startswith(lab.mac["hosta"])
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}  raw AF_PACKET GARP (reply form, target MAC = sender MAC) from hosta: client entry now {after}")

        # no entry, default arp_accept: nothing is created
        other = "198.18.0.200"
        lab.set_link("hostb", "eth0", "up")
        with NetNS(lab.ns["hostb"]) as b:
            b.addr("add", index=b.link_lookup(ifname="eth0")[0], address=other, prefixlen=24)
        garp_raw(lab.ns["hostb"], other, lab.mac["hostb"], op=1)
        time.sleep(0.05)
        aa = subprocess.run(["ip", "netns", "exec", lab.ns["client"], "sysctl", "-n", "net.ipv4.conf.eth0.arp_accept"],
                            capture_output=True, text=True).stdout.strip()
        print(f"INFO  GARP for an address the client has no entry for (arp_accept={aa}): entry {entry(lab, other)}")
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
