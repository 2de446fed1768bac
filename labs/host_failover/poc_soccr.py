"""A small Python rendering of what CRIU's soccr library (soccr/soccr.c) does with TCP repair.

Option numbers are those of <linux/tcp.h>; the order of the calls follows soccr's
libsoccr_save() and libsoccr_restore() (bind, queue sequence numbers, connect, options,
timestamp, queues, window), with the unsent part of the send queue written after leaving
repair mode, as soccr does. Written for the feasibility study only.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass, field

SOL_TCP = socket.IPPROTO_TCP
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29

TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0  # leaving repair sends a window probe (an ACK) to the peer
TCP_REPAIR_OFF_NO_WP = -1  # leave repair without that probe (since 4.14)

TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2

TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4

SIOCINQ = 0x541B  # FIONREAD
SIOCOUTQ = 0x5411  # TIOCOUTQ
SIOCOUTQNSD = 0x894B

IP_FREEBIND = 15
IP_TRANSPARENT = 19

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


@dataclass
class TcpState:
    """What soccr's libsoccr_sk_data holds, plus the addresses and the queued bytes."""

    local: tuple[str, int]
    peer: tuple[str, int]
    state: int = 1
    inq_len: int = 0
    inq_seq: int = 0  # rcv_nxt
    outq_len: int = 0  # write_seq - snd_una
    outq_seq: int = 0  # write_seq
    unsq_len: int = 0  # bytes of the send queue never sent
    mss_clamp: int = 1460
    opt_mask: int = 0
    snd_wscale: int = 0
    rcv_wscale: int = 0
    timestamp: int = 0
    window: tuple[int, int, int, int, int] | None = None  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
    inq_data: bytes = b""
    outq_data: bytes = b""
    extra: dict = field(default_factory=dict)

    def short(self) -> str:
        w = self.window
        return (
            f"{self.local}->{self.peer} {TCP_STATES.get(self.state, self.state)} rcv_nxt={self.inq_seq} "
            f"write_seq={self.outq_seq} inq={self.inq_len} outq={self.outq_len} unsent={self.unsq_len} "
            f"mss={self.mss_clamp} opts={self.opt_mask:#x} wscale snd/rcv={self.snd_wscale}/{self.rcv_wscale} "
            f"ts={self.timestamp} window(wl1,snd,max,rcv,wup)={w}"
        )


def _u32(sock: socket.socket, opt: int) -> int:
    return struct.unpack("I", sock.getsockopt(SOL_TCP, opt, 4))[0]


def _ioctl_int(sock: socket.socket, req: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), req, b"\0" * 4))[0]


def repair(sock: socket.socket, on: int) -> None:
    sock.setsockopt(SOL_TCP, TCP_REPAIR, on)


def save(sock: socket.socket) -> TcpState:
    """libsoccr_save(): the socket must already be in repair mode."""
    local, peer = sock.getsockname(), sock.getpeername()
    # Python's timeout mode polls for readability before recv(); the send queue peeked below
    # never makes the socket readable, so peek with the socket in plain blocking mode
    timeout = sock.gettimeout()
    sock.settimeout(None)
    ti = sock.getsockopt(SOL_TCP, TCP_INFO, 104)
    st = TcpState(local=local, peer=peer, state=ti[0])
    st.outq_len = _ioctl_int(sock, SIOCOUTQ)
    st.unsq_len = _ioctl_int(sock, SIOCOUTQNSD)
    st.inq_len = _ioctl_int(sock, SIOCINQ)
    st.mss_clamp = struct.unpack("i", sock.getsockopt(SOL_TCP, socket.TCP_MAXSEG, 4))[0]
    st.opt_mask = ti[5]
    if st.opt_mask & TCPI_OPT_WSCALE:
        st.snd_wscale, st.rcv_wscale = ti[6] & 0x0F, ti[6] >> 4
    if st.opt_mask & TCPI_OPT_TIMESTAMPS:
        st.timestamp = _u32(sock, TCP_TIMESTAMP)
    st.window = struct.unpack("5I", sock.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))
    sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    st.inq_seq = _u32(sock, TCP_QUEUE_SEQ)
    if st.inq_len:
        st.inq_data = sock.recv(st.inq_len + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        assert len(st.inq_data) == st.inq_len, (len(st.inq_data), st.inq_len)
    sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    st.outq_seq = _u32(sock, TCP_QUEUE_SEQ)
    if st.outq_len:
        st.outq_data = sock.recv(st.outq_len + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        assert len(st.outq_data) == st.outq_len, (len(st.outq_data), st.outq_len)
    sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    # not TCP state, but CRIU restores them too: a send queue larger than the new socket's
    # default buffer would otherwise block the restore
    st.extra["sndbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    st.extra["rcvbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sock.settimeout(timeout)
    return st


def _send_all(sock: socket.socket, data: bytes) -> None:
    # soccr halves the chunk on failure: a repair-mode write to the receive queue allocates one
    # linear skb of the size given and fails with ENOMEM when that is too big for the slab.
    off, chunk = 0, len(data)
    while off < len(data):
        try:
            n = sock.send(data[off : off + chunk])
        except OSError:
            if chunk <= 1024:
                raise
            chunk //= 2
            continue
        off += n


def restore(
    st: TcpState,
    sock: socket.socket | None = None,
    transparent: bool = False,
    freebind: bool = False,
    leave_repair: int | None = TCP_REPAIR_OFF,
    set_maxseg: bool = True,
    log=print,
) -> socket.socket:
    """libsoccr_restore() for an ESTABLISHED socket, then leave repair mode.

    ``sock``: a fresh socket made in the target namespace (default: made here).
    ``transparent``: set IP_TRANSPARENT so the socket can be bound and connected with a local
    address the host does not hold yet (the VIP before it is added).
    """
    if st.state != 1:
        raise NotImplementedError("this proof of concept restores ESTABLISHED sockets only")
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    step = "TCP_REPAIR on"
    try:
        repair(s, TCP_REPAIR_ON)
        if "sndbuf" in st.extra:
            step = "SO_SNDBUF/SO_RCVBUF"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(st.extra["sndbuf"] // 2, 2 * st.outq_len))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, st.extra["rcvbuf"] // 2)
        if transparent:
            step = "IP_TRANSPARENT"
            s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        if freebind:
            step = "IP_FREEBIND"
            s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        step = f"bind {st.local}"
        s.bind(st.local)
        step = "TCP_QUEUE_SEQ recv"
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", (st.inq_seq - st.inq_len) & 0xFFFFFFFF))
        step = "TCP_QUEUE_SEQ send"
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", (st.outq_seq - st.outq_len) & 0xFFFFFFFF))
        if set_maxseg:
            # Without this the rebuilt socket keeps mss_cache at the default 536-12 = 524
            # bytes: TCP_REPAIR_OPTIONS (only allowed after connect) sets mss_clamp but does
            # not resync mss_cache. A user MSS set before connect() enters tcp_connect_init.
            step = "TCP_MAXSEG before connect"
            s.setsockopt(SOL_TCP, socket.TCP_MAXSEG, st.mss_clamp)
        step = f"connect {st.peer} in repair mode"
        s.connect(st.peer)  # in repair mode: no SYN, the socket is ESTABLISHED at once
        step = "TCP_REPAIR_OPTIONS"
        opts = []
        if st.opt_mask & TCPI_OPT_SACK:
            opts.append((TCPOPT_SACK_PERM, 0))
        if st.opt_mask & TCPI_OPT_WSCALE:
            opts.append((TCPOPT_WINDOW, st.snd_wscale | (st.rcv_wscale << 16)))
        if st.opt_mask & TCPI_OPT_TIMESTAMPS:
            opts.append((TCPOPT_TIMESTAMP, 0))
        opts.append((TCPOPT_MAXSEG, st.mss_clamp))
        s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", c, v) for c, v in opts))
        if st.opt_mask & TCPI_OPT_TIMESTAMPS:
            step = "TCP_TIMESTAMP"
            s.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("I", st.timestamp & 0xFFFFFFFF))
        if st.inq_len:
            step = "recv queue data"
            s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            _send_all(s, st.inq_data)
        sent_len = st.outq_len - st.unsq_len
        if sent_len:
            step = "send queue data (sent, unacknowledged)"
            s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            _send_all(s, st.outq_data[:sent_len])
        if st.unsq_len:
            step = "send queue data (never sent), outside repair"
            repair(s, TCP_REPAIR_OFF_NO_WP)
            s.setblocking(False)
            _send_all(s, st.outq_data[sent_len:])
            s.setblocking(True)
            repair(s, TCP_REPAIR_ON)
        if st.window is not None:
            step = "TCP_REPAIR_WINDOW"
            s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("5I", *(v & 0xFFFFFFFF for v in st.window)))
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        if leave_repair is not None:
            step = "TCP_REPAIR off"
            repair(s, leave_repair)
        return s
    except OSError as e:
        log(f"restore failed at step {step!r}: errno {e.errno} ({e.strerror})")
        s.close()
        raise


def silent_close(sock: socket.socket) -> None:
    """Close without FIN or RST: in repair mode tcp_close() -> tcp_disconnect() sends nothing."""
    repair(sock, TCP_REPAIR_ON)
    sock.close()
