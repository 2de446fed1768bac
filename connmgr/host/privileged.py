"""Everything connmgr does that needs CAP_NET_ADMIN or CAP_NET_RAW, in one place.

* **TCP repair** (Linux ``TCP_REPAIR``, as CRIU's soccr uses it): :func:`rebuild` makes a
  socket that continues a client's connection where host A left it, from a
  :class:`~replay.tcp_state.RepairState`; :func:`leave_repair` lets it speak;
  :func:`silent_close` drops a socket without a FIN or RST (a host that must stop serving
  leaves its connections to the one that takes over).
* **The address**: :func:`add_address` / :func:`remove_address` (pyroute2), and
  :func:`gratuitous_arp` (the frame built by scapy, sent on a raw socket).
* **The copy of the frames**: :func:`open_capture`, a promiscuous AF_PACKET socket.

The order of the repair calls is soccr's (bind, queue sequence numbers, connect, options,
timestamp, queues, window) with three changes this kernel needed, each found by the
feasibility study (``labs/host_failover/FEASIBILITY.md``): ``TCP_MAXSEG`` before
``connect`` (else the MSS collapses to 524), ``IP_TRANSPARENT`` so the socket can own the
VIP before host B holds it (no moment when a client segment finds no socket and is
answered with a reset), and host A's unacknowledged bytes written as *unsent* (they leave
at once, not after a 3 s retransmission timer).
"""

from __future__ import annotations

import socket
import struct

from replay.tcp_state import RepairState

__all__ = [
    "PrivilegeError",
    "add_address",
    "capture_drops",
    "gratuitous_arp",
    "leave_repair",
    "open_capture",
    "rebuild",
    "remove_address",
    "silent_close",
]

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_PROBE = 1, 0, -1
NO_QUEUE, RECV_QUEUE, SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
IP_TRANSPARENT = 19
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC, PACKET_STATISTICS = 1, 1, 6
SO_RCVBUFFORCE = 33
#: the capture's receive buffer: frames wait here while the secondary's Python parses;
#: a full buffer drops frames (counted by :func:`capture_drops`)
CAPTURE_BUFFER = 32 << 20
ETH_P_ALL = 0x0003


class PrivilegeError(OSError):
    """A privileged operation failed; the message names the step (and the capability
    it needs when the error is EPERM)."""


def _fail(step: str, e: OSError) -> PrivilegeError:
    hint = " (needs CAP_NET_ADMIN: run as root or grant the capability)" if e.errno in (1, 13) else ""
    return PrivilegeError(e.errno, f"{step}: {e.strerror}{hint}")


def rebuild(rs: RepairState, *, sndbuf: int = 0, rcvbuf: int = 0) -> socket.socket:
    """A socket continuing the connection ``rs`` describes, left in repair mode: call
    :func:`leave_repair` once the address is held. The bytes the client has not
    acknowledged (``rs.unsent``: host A's, sent before it died) are queued as never sent,
    and that sends them at once (IP_TRANSPARENT routes them before the VIP is here): the
    only segments this host sends before the VIP, under the leader key the takeover
    checked just before, and the same bytes at the same sequence numbers host A sent, so
    a client that has them drops them. Raises PrivilegeError."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    step = "TCP_REPAIR on"
    try:
        s.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
        if sndbuf:
            step = "SO_SNDBUF"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(sndbuf, 2 * len(rs.unsent)))
        if rcvbuf:
            step = "SO_RCVBUF"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        step = "IP_TRANSPARENT"
        s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        # the listener for new clients binds the same address and port afterwards
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        step = f"bind {rs.local}"
        s.bind(rs.local)
        step = "receive queue sequence"
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", rs.rcv_nxt))
        step = "send queue sequence"
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", rs.snd_una))
        step = "TCP_MAXSEG"
        s.setsockopt(SOL_TCP, socket.TCP_MAXSEG, rs.mss)
        step = f"connect {rs.peer} in repair mode"
        s.connect(rs.peer)  # no SYN: the socket is ESTABLISHED at once
        step = "TCP_REPAIR_OPTIONS"
        opts = [(TCPOPT_MAXSEG, rs.mss)]
        if rs.sack:
            opts.append((TCPOPT_SACK_PERM, 0))
        if rs.snd_wscale is not None and rs.rcv_wscale is not None:
            opts.append((TCPOPT_WINDOW, rs.snd_wscale | rs.rcv_wscale << 16))
        if rs.timestamps:
            opts.append((TCPOPT_TIMESTAMP, 0))
        s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", c, v) for c, v in opts))
        if rs.timestamps:
            step = "TCP_TIMESTAMP"
            s.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("I", rs.timestamp))
        step = "TCP_REPAIR_WINDOW"
        s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("5I", *rs.window))
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
        if rs.unsent:
            step = "queue host A's unacknowledged bytes"
            s.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF_NO_PROBE)
            s.setblocking(False)
            view = memoryview(rs.unsent)
            while view:  # IP_TRANSPARENT routes them even before the address is held
                view = view[s.send(view):]
            s.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
        return s
    except OSError as e:
        s.close()
        raise _fail(f"rebuilding the connection to {rs.peer[0]}:{rs.peer[1]} failed at {step}", e) from e


def leave_repair(sock: socket.socket) -> None:
    """Let a rebuilt socket speak: leaving repair mode sends a window probe, which the
    client answers at once (its current ACK and window)."""
    sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF)
    # leaving repair also clears the socket's address reuse: a listener on the same
    # address and port (new clients) must still be able to bind next to it
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def silent_close(sock: socket.socket) -> None:
    """Close a connected TCP socket with nothing on the wire (no FIN, no RST): in repair
    mode the kernel's disconnect sends nothing."""
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
    except OSError as e:
        raise _fail("TCP_REPAIR on for a silent close", e) from e
    finally:
        sock.close()


def add_address(interface: str, address: str, prefixlen: int) -> bool:
    """Add ``address`` to ``interface``; False if it was there already. Raises PrivilegeError."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            index = ipr.link_lookup(ifname=interface)[0]
        except IndexError:
            raise PrivilegeError(19, f"no interface {interface!r} to add {address} to") from None
        try:
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code == 17:  # EEXIST
                return False
            raise _fail(f"adding {address}/{prefixlen} to {interface}", OSError(e.code, str(e))) from e
    return True


def remove_address(interface: str, address: str, prefixlen: int) -> bool:
    """Remove ``address`` from ``interface``; False if it was not there."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            return False
        try:
            ipr.addr("del", index=found[0], address=address, prefixlen=prefixlen)
        except NetlinkError as e:
            if e.code in (99, 19):  # EADDRNOTAVAIL, ENODEV
                return False
            raise _fail(f"removing {address}/{prefixlen} from {interface}", OSError(e.code, str(e))) from e
    return True


def arp_announcement(address: str, mac: str) -> bytes:
    """A gratuitous ARP for ``address`` at ``mac`` (request form: sender and target IP both
    the address, target MAC zero; Linux takes it as gratuitous and updates an existing
    entry even within its lock time, where a reply form with a broadcast target MAC is
    ignored)."""
    from scapy.layers.l2 import ARP, Ether

    frame = Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) / ARP(
        op=1, hwsrc=mac, psrc=address, hwdst="00:00:00:00:00:00", pdst=address
    )
    return bytes(frame).ljust(60, b"\0")


def warm_up(interface: str, address: str) -> bytes:
    """Load now what a takeover needs, and return the gratuitous ARP frame for ``address``
    on ``interface`` (for :func:`gratuitous_arp`). Measured: the first rtnetlink request
    costs about 120 ms (pyroute2 loads its modules) and the first ARP frame about 150 ms
    (scapy), later ones 1-2 ms and 19 ms -- all of it inside the clients' stall unless
    paid at the start. Raises PrivilegeError (no such interface, no CAP_NET_RAW)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=interface):
            raise PrivilegeError(19, f"no interface {interface!r} for the VIP")
        ipr.get_addr(index=ipr.link_lookup(ifname=interface)[0])
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    except OSError as e:
        raise _fail("opening a raw socket for gratuitous ARP (needs CAP_NET_RAW)", e) from e
    with s:
        s.bind((interface, 0))
        return arp_announcement(address, s.getsockname()[4].hex(":"))


def gratuitous_arp(interface: str, address: str, count: int = 3, frame: bytes | None = None) -> None:
    """Announce that ``address`` is at ``interface``'s MAC, ``count`` frames (``frame``:
    the announcement made beforehand by :func:`warm_up`)."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    except OSError as e:
        raise _fail("opening a raw socket for gratuitous ARP (needs CAP_NET_RAW)", e) from e
    try:
        s.bind((interface, 0))
        if frame is None:
            frame = arp_announcement(address, s.getsockname()[4].hex(":"))
        for _ in range(count):
            s.send(frame)
    except OSError as e:
        raise _fail(f"sending gratuitous ARP for {address} on {interface}", e) from e
    finally:
        s.close()


def open_capture(interface: str) -> socket.socket:
    """A non-blocking, promiscuous AF_PACKET socket receiving every frame on ``interface``
    (the copies the router sends arrive addressed to host A's MAC)."""
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except OSError as e:
        raise _fail("opening the capture socket (needs CAP_NET_RAW)", e) from e
    try:
        s.bind((interface, 0))
        mreq = struct.pack("iHH8s", socket.if_nametoindex(interface), PACKET_MR_PROMISC, 0, b"")
        s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        try:  # above net.core.rmem_max (CAP_NET_ADMIN)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CAPTURE_BUFFER)
        s.setblocking(False)
    except OSError as e:
        s.close()
        raise _fail(f"capturing on {interface}", e) from e
    return s


def capture_drops(sock: socket.socket) -> tuple[int, int]:
    """(frames received, frames dropped because the buffer was full) since the last call
    (the kernel resets its counters when they are read)."""
    packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return packets, drops
