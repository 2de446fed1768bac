"""Shared helpers for the host-failover feasibility proofs of concept (issue 14).

Not part of connmgr and not run in CI: these scripts were run once by hand, as root, to find
out what this kernel allows (see FEASIBILITY.md beside this file). Everything they create
lives in network namespaces named ``fs14-*`` with addresses from 198.18.0.0/15 and is torn
down in ``finally`` blocks.

Needs pyroute2 (>= 0.9, tested with 0.9.7) and, for some scripts, scapy (tested with 2.8.0).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

PREFIX = "fs14"
HOSTS = ("client", "hosta", "hostb", "witness")
ADDR = {"client": "198.18.0.10", "hosta": "198.18.0.1", "hostb": "198.18.0.2", "witness": "198.18.0.3"}
VIP = "198.18.0.100"
PLEN = 24


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str):
    """Run the block in network namespace ``name`` (this thread only).

    Python 3.11 has no os.setns (3.12 has), hence ctypes. A socket keeps the namespace it was
    created in, so sockets made inside the block can be used after it from any namespace.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(own)
        os.close(own)
        os.close(target)


class Lab:
    """client/router/hosta/hostb/witness: one bridge ``br0`` in ``router``, one veth per host.

    Host side of each veth is ``eth0`` in the host's namespace, router side is ``r-<host>``
    enslaved to br0. Host A also holds the VIP. No namespace has a default route: traffic
    never leaves the lab.
    """

    def __init__(self, prefix: str = PREFIX, vip_on: str | None = "hosta"):
        self.prefix = prefix
        self.ns = {role: f"{prefix}-{role}" for role in ("router", *HOSTS)}
        self.vip_on = vip_on
        self.mac: dict[str, str] = {}
        self.created: list[str] = []

    def build(self) -> Lab:
        from pyroute2 import IPRoute, NetNS, netns

        for name in self.ns.values():
            if name in netns.listnetns():
                raise RuntimeError(f"namespace {name} already exists: clean up first")
        for name in self.ns.values():
            netns.create(name)
            self.created.append(name)
        router = self.ns["router"]
        with NetNS(router) as r:
            r.link("add", ifname="br0", kind="bridge")
            br = r.link_lookup(ifname="br0")[0]
            r.link("set", index=br, state="up")
            lo = r.link_lookup(ifname="lo")[0]
            r.link("set", index=lo, state="up")
        with IPRoute() as ipr:
            for host in HOSTS:
                tmp = f"{self.prefix}r{host[:6]}"
                ipr.link("add", ifname=tmp, kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.ns[host]})
                idx = ipr.link_lookup(ifname=tmp)[0]
                ipr.link("set", index=idx, net_ns_fd=router)
        with NetNS(router) as r:
            br = r.link_lookup(ifname="br0")[0]
            for host in HOSTS:
                idx = r.link_lookup(ifname=f"{self.prefix}r{host[:6]}")[0]
                r.link("set", index=idx, ifname=f"r-{host}")
                r.link("set", index=idx, master=br, state="up")
        for host in HOSTS:
            with NetNS(self.ns[host]) as h:
                eth = h.link_lookup(ifname="eth0")[0]
                lo = h.link_lookup(ifname="lo")[0]
                h.link("set", index=lo, state="up")
                h.addr("add", index=eth, address=ADDR[host], prefixlen=PLEN)
                if host == self.vip_on:
                    h.addr("add", index=eth, address=VIP, prefixlen=PLEN)
                h.link("set", index=eth, state="up")
                self.mac[host] = h.get_links(eth)[0].get_attr("IFLA_ADDRESS")
        return self

    def teardown(self) -> None:
        from pyroute2 import netns

        for name in list(self.ns.values()):
            try:
                if name in netns.listnetns():
                    netns.remove(name)
            except Exception as e:  # report, keep removing the others
                print(f"teardown: could not remove {name}: {e!r}")

    def __enter__(self) -> Lab:
        try:
            return self.build()
        except BaseException:
            self.teardown()
            raise

    def __exit__(self, *exc) -> None:
        self.teardown()

    # --- small utilities -------------------------------------------------------------------
    def set_link(self, ns_role: str, ifname: str, state: str) -> None:
        from pyroute2 import NetNS

        with NetNS(self.ns[ns_role]) as n:
            n.link("set", index=n.link_lookup(ifname=ifname)[0], state=state)

    def add_vip(self, host: str) -> None:
        from pyroute2 import NetNS

        with NetNS(self.ns[host]) as n:
            n.addr("add", index=n.link_lookup(ifname="eth0")[0], address=VIP, prefixlen=PLEN)

    def neighbours(self, host: str) -> dict[str, tuple[str, int]]:
        """ip -> (lladdr, NUD state) in ``host``'s neighbour table."""
        from pyroute2 import NetNS

        out = {}
        with NetNS(self.ns[host]) as n:
            for nb in n.get_neighbours(family=socket.AF_INET):
                out[nb.get_attr("NDA_DST")] = (nb.get_attr("NDA_LLADDR"), nb["state"])
        return out


class Sniffer:
    """A raw AF_PACKET socket on ``eth0`` of one namespace, promiscuous, non-blocking."""

    SOL_PACKET = 263  # not exported by Python's socket module
    PACKET_ADD_MEMBERSHIP = 1
    PACKET_MR_PROMISC = 1
    ETH_P_ALL = 0x0003

    def __init__(self, ns: str, ifname: str = "eth0"):
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self.ETH_P_ALL))
            self.sock.bind((ifname, 0))
            ifindex = socket.if_nametoindex(ifname)
        mreq = struct.pack("iHH8s", ifindex, self.PACKET_MR_PROMISC, 0, b"")
        self.sock.setsockopt(self.SOL_PACKET, self.PACKET_ADD_MEMBERSHIP, mreq)
        self.sock.setblocking(False)

    def drain(self, duration: float = 0.0) -> list[tuple[bytes, int]]:
        """(frame, pkttype) for everything received, waiting up to ``duration`` seconds."""
        frames = []
        deadline = time.monotonic() + duration
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
                frames.append((data, addr[2]))  # addr[2] = pkttype: 0 host, 3 otherhost, 4 outgoing
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return frames
                time.sleep(0.01)

    def close(self) -> None:
        self.sock.close()


def parse_tcp(frame: bytes):
    """Ethernet/IPv4/TCP -> dict or None (no IP options handling beyond IHL)."""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack("!H", frame[16:18])[0]
    src = socket.inet_ntoa(frame[26:30])
    dst = socket.inet_ntoa(frame[30:34])
    t = 14 + ihl
    sport, dport, seq, ack, off_flags, win = struct.unpack("!HHIIHH", frame[t : t + 16])
    doff = (off_flags >> 12) * 4
    flags = off_flags & 0x1FF
    opts = frame[t + 20 : t + doff]
    payload = frame[t + doff : 14 + total]
    return {
        "dst_mac": frame[0:6].hex(":"),
        "src_mac": frame[6:12].hex(":"),
        "src": src,
        "dst": dst,
        "sport": sport,
        "dport": dport,
        "seq": seq,
        "ack": ack,
        "flags": flags,
        "win": win,
        "opts": parse_tcp_options(opts),
        "payload": payload,
    }


def parse_tcp_options(opts: bytes) -> dict:
    out: dict = {}
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts):
            break
        length = opts[i + 1]
        if length < 2:
            break
        body = opts[i + 2 : i + length]
        if kind == 2 and len(body) == 2:
            out["mss"] = struct.unpack("!H", body)[0]
        elif kind == 3 and len(body) == 1:
            out["wscale"] = body[0]
        elif kind == 4:
            out["sack_perm"] = True
        elif kind == 8 and len(body) == 8:
            out["ts"] = struct.unpack("!II", body)
        i += length
    return out


# --- gratuitous ARP ------------------------------------------------------------------------
def garp_frame(ip: str, mac: str, op: int = 1, reply_tha_broadcast: bool = False) -> bytes:
    """A gratuitous ARP (sender IP == target IP), broadcast; op 1 = request form, 2 = reply form.

    Linux (arp_is_garp) treats a reply as gratuitous only if target MAC == sender MAC; one
    with a broadcast target MAC is an ordinary reply, ignored within the 1 s locktime.
    """
    m = bytes.fromhex(mac.replace(":", ""))
    a = socket.inet_aton(ip)
    eth = b"\xff" * 6 + m + b"\x08\x06"
    tha = b"\x00" * 6 if op == 1 else (b"\xff" * 6 if reply_tha_broadcast else m)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + m + a + tha + a
    return eth + arp + b"\x00" * 18  # pad to the 60-byte minimum


def garp_raw(
    ns: str, ip: str, mac: str, op: int = 1, count: int = 1, ifname: str = "eth0", reply_tha_broadcast: bool = False
) -> None:
    """Send gratuitous ARP from ``ns`` with a plain AF_PACKET socket (no scapy needed)."""
    with in_netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((ifname, 0))
    try:
        for _ in range(count):
            s.send(garp_frame(ip, mac, op, reply_tha_broadcast))
    finally:
        s.close()


def garp_scapy(ns: str, ip: str, mac: str, op: int = 1, count: int = 1, ifname: str = "eth0") -> None:
    """The same with scapy's sendp, run inside the namespace."""
    from scapy.all import ARP, Ether, conf, sendp

    with in_netns(ns):
        # scapy's interface list was read in the namespace it was imported in: no eth0 there.
        # A raw L2 socket opened here, inside the namespace, sidesteps the lookup.
        sock = conf.L2socket(iface=ifname, promisc=False)  # promisc=True fails: ENODEV (see FEASIBILITY.md)
        try:
            pkt = Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) / ARP(
                op=op, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00" if op == 1 else mac, pdst=ip
            )
            sendp(pkt, socket=sock, count=count, verbose=False)
        finally:
            sock.close()
