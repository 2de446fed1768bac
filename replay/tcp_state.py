"""Every client connection's TCP state, followed from copied frames (sans-IO; issue 14).

How it works
------------
When host A dies, host B continues each client's TCP conversation with a socket rebuilt
by TCP repair (:mod:`connmgr.host.tcp_repair`). What that socket must be set to -- both
sequence numbers, MSS, window scales, SACK, timestamps, windows -- lives only in host A's
kernel, which is gone. Host B learns it beforehand from the frames the router copies to it
(a mirror port, ``tc mirred`` in the lab; seed 004 [0039]-[0040]): :meth:`TcpTracker.on_frame`
takes each raw Ethernet frame and follows the connections to the served addresses
(the VIP and its port), both directions:

* the **handshake** gives both initial sequence numbers and each side's options (MSS,
  window scale, SACK-permitted, timestamps);
* every later segment moves a side's **high-water mark** (the end of the data it sent),
  its last ACK, window and timestamp;
* the **payload** is kept in a bounded per-direction buffer keyed by *stream offset*
  (offset 0 is the first byte after the SYN, the same offsets the mirror stream carries),
  so host B can recover the client's bytes host A's kernel acknowledged but host A's
  connmgr never mirrored, and the bytes host A sent that the client has not acknowledged.
  Each direction is trimmed once the mirror carries it (:meth:`TcpTracker.trim`), the
  server's no further than the client acknowledged.

Sequence numbers are 32 bits and wrap; offsets are unbounded integers. A sequence number
is turned into an offset relative to the side's high-water mark (the nearest one within
2^31), which is exact while a connection moves less than 2 GiB between two frames seen.

:meth:`TrackedConnection.repair_state` turns what was seen into a :class:`RepairState`:
the server side of the connection as host B must rebuild it. Its rules, each from the
feasibility study (``labs/host_failover/FEASIBILITY.md``):

* ``rcv_nxt`` is the end of the client bytes host B holds contiguously -- at least what
  host A acknowledged (the client will never send that again), more if host B saw the
  client send more after host A died (the bridge floods frames for a dead port); a hole
  below host A's acknowledgement means a copied frame was lost and the connection cannot
  continue faithfully (:class:`NotRecoverable`).
* The send side starts at the client's last acknowledgement (``snd_una``); whatever host
  A sent beyond it is restored as *unsent*, so it leaves at once instead of waiting for a
  retransmission timer the rebuilt socket has no RTT sample for.
* The timestamp clock continues from host A's last TSval plus the time since that frame,
  with bit 0 clear (Linux >= 6.7 reads bit 0 as "microsecond timestamps").

Frames that are not Ethernet/IPv4/TCP to or from a served address are ignored; a frame
too short for the lengths it claims is counted (``malformed``) and ignored. IPv6 and IP
fragments are not followed (a client on IPv6 is not moved; see :meth:`TcpTracker.on_frame`).
"""

from __future__ import annotations

import enum
from bisect import insort
from dataclasses import dataclass, field
from struct import Struct

__all__ = [
    "ConnState",
    "NotRecoverable",
    "RepairState",
    "Segment",
    "TcpTracker",
    "TrackedConnection",
    "parse_frame",
]

_ETH_IPV4 = 0x0800
_ETH_VLAN = (0x8100, 0x88A8)
_TCP = 6
_IP_HEAD = Struct("!BBHHHBBH4s4s")
_TCP_HEAD = Struct("!HHIIHH")
_U16 = Struct("!H")
_TS = Struct("!II")

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
#: what a kept chunk costs beyond its bytes (its entries), counted against the bound
_CHUNK_COST = 64
#: how much of the start of each stream a connection keeps (see TrackedConnection.head)
HEAD = 2048
HEAD_LIMIT = 2 * HEAD + 64 * _CHUNK_COST
_MOD = 1 << 32
_HALF = 1 << 31


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP segment as the frame carried it."""

    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    ack: int
    flags: int
    window: int  # as sent, not scaled
    payload: bytes = field(repr=False)
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    tsval: int | None = None
    tsecr: int | None = None
    src_mac: bytes = b""


def _ip(b: bytes) -> str:
    return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"


def parse_frame(frame: bytes) -> Segment | None:
    """The TCP segment in an Ethernet frame (802.1Q tags skipped), or None if the frame
    is not IPv4/TCP or is a fragment. Raises ValueError if the frame is shorter than the
    lengths it claims."""
    if len(frame) < 14:
        return None
    ethertype = _U16.unpack_from(frame, 12)[0]
    at = 14
    while ethertype in _ETH_VLAN:
        if len(frame) < at + 4:
            raise ValueError("VLAN tag cut short")
        ethertype = _U16.unpack_from(frame, at + 2)[0]
        at += 4
    if ethertype != _ETH_IPV4:
        return None
    if len(frame) < at + 20:
        raise ValueError("IPv4 header cut short")
    vihl, _tos, total, _id, frag, _ttl, proto, _sum, src, dst = _IP_HEAD.unpack_from(frame, at)
    if vihl >> 4 != 4 or proto != _TCP:
        return None
    if frag & 0x3FFF:  # a fragment (MF set or an offset): not followed
        return None
    ihl = (vihl & 0x0F) * 4
    end = at + total
    if ihl < 20 or total < ihl + 20 or len(frame) < end:
        raise ValueError(f"IPv4 lengths do not fit the frame (header {ihl}, total {total}, frame {len(frame) - at})")
    t = at + ihl
    sport, dport, seq, ack, off_flags, window = _TCP_HEAD.unpack_from(frame, t)
    doff = (off_flags >> 12) * 4
    if doff < 20 or t + doff > end:
        raise ValueError(f"TCP header length {doff} does not fit the segment")
    mss = wscale = tsval = tsecr = None
    sack = False
    i, oend = t + 20, t + doff
    while i < oend:
        kind = frame[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= oend or frame[i + 1] < 2 or i + frame[i + 1] > oend:
            raise ValueError("TCP option cut short")
        length = frame[i + 1]
        if kind == 2 and length == 4:
            mss = _U16.unpack_from(frame, i + 2)[0]
        elif kind == 3 and length == 3:
            wscale = min(frame[i + 2], 14)  # RFC 7323: larger values are taken as 14
        elif kind == 4 and length == 2:
            sack = True
        elif kind == 8 and length == 10:
            tsval, tsecr = _TS.unpack_from(frame, i + 2)
        i += length
    return Segment((_ip(src), sport), (_ip(dst), dport), seq, ack, off_flags & 0x1FF, window,
                   bytes(frame[oend:end]), mss, wscale, sack, tsval, tsecr, bytes(frame[6:12]))  # fmt: skip


class ConnState(enum.Enum):
    """A followed connection, as far as the frames show it."""

    SYN_SENT = "syn sent"  # the client's SYN seen
    SYN_RECEIVED = "syn received"  # the server's SYN-ACK seen
    ESTABLISHED = "established"  # data may flow both ways: the only state a takeover continues
    CLOSING = "closing"  # a FIN seen from either side
    CLOSED = "closed"  # a RST seen, or both FINs


class TcpEvent(enum.Enum):
    SYN = "client SYN"
    SYN_ACK = "server SYN-ACK"
    ACK = "client ACK"
    FIN = "FIN"
    RST = "RST"


#: (state, event) -> next state; anything missing leaves the state as it is (a retransmitted
#: SYN, a late ACK): frames are observations, not commands, so nothing here is an error
_TRANSITIONS: dict[tuple[ConnState, TcpEvent], ConnState] = {
    (ConnState.SYN_SENT, TcpEvent.SYN_ACK): ConnState.SYN_RECEIVED,
    (ConnState.SYN_RECEIVED, TcpEvent.ACK): ConnState.ESTABLISHED,
    **{(s, TcpEvent.FIN): ConnState.CLOSING for s in (ConnState.SYN_RECEIVED, ConnState.ESTABLISHED)},
    **{(s, TcpEvent.RST): ConnState.CLOSED for s in ConnState},
}


class NotRecoverable(Exception):
    """Host B cannot continue this connection faithfully; the message says why. Internal:
    the takeover counts it and leaves that connection to end (the client sees a timeout,
    not a SQLSTATE)."""


class _Bytes:
    """One direction's payload, by stream offset; bounded."""

    __slots__ = ("starts", "chunks", "floor", "held", "limit", "dropped_below")

    def __init__(self, limit: int) -> None:
        self.starts: list[int] = []
        self.chunks: dict[int, bytes] = {}
        self.floor = 0  # nothing below this is kept (trimmed on purpose)
        self.held = 0
        self.limit = limit
        self.dropped_below = 0  # bytes below this may be missing for lack of room

    def add(self, offset: int, data: bytes) -> None:
        if offset < self.floor:
            data = data[self.floor - offset:]
            offset = self.floor
        if not data:
            return
        old = self.chunks.get(offset)
        if old is not None:
            if len(old) >= len(data):
                return
            self.held -= len(old) + _CHUNK_COST
        else:
            insort(self.starts, offset)
        self.chunks[offset] = data
        self.held += len(data) + _CHUNK_COST
        while self.held > self.limit and self.starts:
            first = self.starts.pop(0)
            gone = self.chunks.pop(first)
            self.held -= len(gone) + _CHUNK_COST
            self.dropped_below = max(self.dropped_below, first + len(gone))

    def trim(self, offset: int) -> None:
        """Forget everything below ``offset``."""
        if offset <= self.floor:
            return
        self.floor = offset
        while self.starts and self.starts[0] + len(self.chunks[self.starts[0]]) <= offset:
            self.held -= len(self.chunks.pop(self.starts.pop(0))) + _CHUNK_COST

    def contiguous_end(self, start: int) -> int:
        """The end of the bytes held without a hole from ``start`` (``start`` if none).
        Bytes below the floor were trimmed because the mirror carries them: from a
        ``start`` below it, the bytes count as held up to the floor."""
        pos = max(start, self.floor)
        for s in self.starts:  # chunks may overlap (retransmissions with other bounds)
            if s > pos:
                break
            end = s + len(self.chunks[s])
            if end > pos:
                pos = end
        return pos

    def read(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) if all are held, else None."""
        if end <= start:
            return b""
        if start < self.floor or self.contiguous_end(start) < end:
            return None
        out = bytearray()
        pos = start
        for s in self.starts:
            chunk = self.chunks[s]
            if s + len(chunk) > pos:
                out += chunk[pos - s:end - s]
                pos = min(end, s + len(chunk))
                if pos >= end:
                    break
        return bytes(out)


@dataclass(slots=True)
class _Side:
    """What one end of the connection sent, as seen."""

    isn: int | None = None
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamps: bool = False
    #: the end of the data it sent, as a stream offset (its SYN not counted)
    high: int = 0
    #: its last segment: sequence number, acknowledgement, window in bytes (scaled)
    last_seq: int | None = None
    last_ack: int | None = None
    last_window: int = 0
    max_window: int = 0
    last_tsval: int | None = None
    #: the ``now`` of the frame that carried ``last_tsval``
    tsval_at: float = 0.0
    frames: int = 0

    def offset(self, seq: int) -> int:
        """The stream offset of sequence number ``seq`` of this side (nearest to ``high``)."""
        base = (self.isn + 1 + self.high) % _MOD
        delta = (seq - base) % _MOD
        if delta >= _HALF:
            delta -= _MOD
        return self.high + delta

    def seq(self, offset: int) -> int:
        return (self.isn + 1 + offset) % _MOD


@dataclass(frozen=True, slots=True)
class RepairState:
    """The server side of one connection as host B rebuilds it (see the module docstring).
    Sequence numbers are 32-bit; ``window`` is the kernel's ``tcp_repair_window``
    (snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup), windows scaled."""

    local: tuple[str, int]
    peer: tuple[str, int]
    rcv_nxt: int
    snd_una: int
    mss: int
    sack: bool
    timestamps: bool
    snd_wscale: int | None  # the client's shift (applies to the windows it sends)
    rcv_wscale: int | None  # host A's shift (the client applies it to ours)
    timestamp: int
    window: tuple[int, int, int, int, int]
    #: stream offsets: the client bytes end here (rcv_nxt) and the client has received
    #: the server's bytes up to ``client_received``
    client_end: int
    client_received: int
    #: host A's bytes the client has not acknowledged, from ``client_received`` on:
    #: they go out first, as never sent
    unsent: bytes = field(repr=False)


@dataclass(slots=True)
class TrackedConnection:
    """One client connection to a served address."""

    client: tuple[str, int]
    server: tuple[str, int]
    state: ConnState
    c: _Side
    s: _Side
    client_bytes: _Bytes = field(repr=False)
    server_bytes: _Bytes = field(repr=False)
    server_mac: bytes = b""
    #: the server stream offset the mirror carries up to (see TcpTracker.trim)
    server_mirrored: int = 0
    #: the first HEAD bytes of each stream, never trimmed: the start-up and the
    #: authentication exchange, which the mirror does not carry (host B recovers a SCRAM
    #: client's ClientKey from them, to log the session in again)
    client_head: _Bytes = field(default_factory=lambda: _Bytes(HEAD_LIMIT), repr=False)
    server_head: _Bytes = field(default_factory=lambda: _Bytes(HEAD_LIMIT), repr=False)

    def head(self, direction: str) -> bytes:
        """The contiguous start of the client's (``"c"``) or the server's stream kept."""
        h = self.client_head if direction == "c" else self.server_head
        return h.read(0, h.contiguous_end(0)) or b""

    def on(self, event: TcpEvent) -> None:
        self.state = _TRANSITIONS.get((self.state, event), self.state)

    @property
    def acked_by_server(self) -> int:
        """Client stream offset up to which host A's kernel acknowledged."""
        return self.c.offset(self.s.last_ack) if self.s.last_ack is not None else 0

    @property
    def acked_by_client(self) -> int:
        """Server stream offset up to which the client acknowledged."""
        return self.s.offset(self.c.last_ack) if self.c.last_ack is not None else 0

    def client_data(self, start: int, end: int) -> bytes | None:
        """The client's bytes [start, end) if host B saw them all, else None."""
        return self.client_bytes.read(start, end)

    def server_data(self, start: int, end: int) -> bytes | None:
        """The server's bytes [start, end) if host B saw them all, else None."""
        return self.server_bytes.read(start, end)

    def client_seen_end(self, start: int) -> int:
        """Where the client bytes host B holds without a hole from ``start`` end."""
        return self.client_bytes.contiguous_end(start)

    def repair_state(self, client_from: int, now: float, *, mirrored: bytes | bytearray = b"",
                     mirrored_from: int = 0) -> RepairState:  # fmt: skip
        """The state to rebuild the server side with, when the client bytes below
        ``client_from`` are accounted for elsewhere (the mirror carried them) and ``now``
        is the frames' clock. ``mirrored`` is what the mirror holds of the server stream,
        from offset ``mirrored_from``: the bytes to send again come from it first, then
        from the frames (it may lag the wire, or run ahead of it in two-phase mode, where
        it holds replies the client has not been sent yet: they go out too). Raises
        NotRecoverable if the connection cannot continue."""
        if self.state is not ConnState.ESTABLISHED:
            raise NotRecoverable(f"the connection is {self.state.value}, not established")
        c, s = self.c, self.s
        if s.last_seq is None or c.last_seq is None:
            raise NotRecoverable("no segment of the established connection seen yet")
        acked = self.acked_by_server
        end = self.client_seen_end(client_from)
        if end < acked:
            lost = "not kept (the per-connection buffer was full)" if self.client_bytes.dropped_below > client_from \
                else "never seen here (a copied frame was lost)"
            raise NotRecoverable(f"client bytes {end}..{acked} were acknowledged by the dead host but {lost},"
                                 " and the client will not send them again")
        received = self.acked_by_client
        m_end = mirrored_from + len(mirrored)
        s_end = max(s.high, m_end)
        unsent = b""
        pos = received
        if mirrored_from <= pos < m_end:
            unsent = bytes(mirrored[pos - mirrored_from:])
            pos = m_end
        if pos < s_end:
            rest = self.server_bytes.read(pos, s_end)
            if rest is None:
                raise NotRecoverable(f"server bytes {pos}..{s_end} the client has not acknowledged were neither"
                                     " mirrored nor seen here")  # fmt: skip
            unsent += rest
        wscale = c.wscale is not None and s.wscale is not None
        timestamps = c.timestamps and s.timestamps
        ts = 0
        if timestamps and s.last_tsval is not None:
            ts = (s.last_tsval + int((now - s.tsval_at) * 1000) + 2) % _MOD & ~1
        rcv_nxt = c.seq(end)
        window = (c.last_seq, c.last_window, c.max_window, s.last_window, s.last_ack)
        return RepairState(
            local=self.server, peer=self.client, rcv_nxt=rcv_nxt, snd_una=s.seq(received),
            mss=c.mss or 536, sack=c.sack_permitted and s.sack_permitted, timestamps=timestamps,
            snd_wscale=c.wscale if wscale else None, rcv_wscale=s.wscale if wscale else None, timestamp=ts,
            window=window, client_end=end, client_received=received, unsent=unsent,
        )  # fmt: skip


class TcpTracker:
    """Follows the connections to ``servers`` (the addresses clients connect to: the VIP
    and its port) from copied frames. ``max_connections`` bounds how many are followed
    (the oldest closed one goes first, else new ones are not followed, counted in
    ``untracked``); ``max_bytes`` bounds the payload kept per direction of a connection."""

    def __init__(self, servers: set[tuple[str, int]], *, max_connections: int = 100_000,
                 max_bytes: int = 16 << 20) -> None:  # fmt: skip
        self.servers = set(servers)
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self.connections: dict[tuple[str, int], TrackedConnection] = {}
        self.frames = 0
        self.malformed = 0
        #: connections first seen mid-stream (their handshake was before the capture)
        self.joined_late = 0
        self.untracked = 0

    def connection(self, client: tuple[str, int]) -> TrackedConnection | None:
        return self.connections.get(client)

    def forget(self, client: tuple[str, int]) -> None:
        self.connections.pop(client, None)

    def trim(self, client: tuple[str, int], direction: str, offset: int) -> None:
        """The mirror carries the bytes below ``offset`` of one direction (``"c"`` from the
        client, ``"b"`` to it): not kept here (the server's no further than the client
        acknowledged, so what it has not may still be sent again from here)."""
        conn = self.connections.get(client)
        if conn is None:
            return
        if direction == "c":
            conn.client_bytes.trim(offset)
        else:
            conn.server_mirrored = max(conn.server_mirrored, offset)
            conn.server_bytes.trim(min(offset, conn.acked_by_client))

    def on_frame(self, frame: bytes, now: float) -> TrackedConnection | None:
        """Take one copied frame (``now``: a monotonic clock, seconds); returns the
        connection it moved, if any."""
        self.frames += 1
        try:
            seg = parse_frame(frame)
        except ValueError:
            self.malformed += 1
            return None
        if seg is None:
            return None
        if seg.dst in self.servers:
            return self._from_client(seg, now)
        if seg.src in self.servers:
            return self._from_server(seg, now)
        return None

    def _new(self, client: tuple[str, int], server: tuple[str, int]) -> TrackedConnection | None:
        if len(self.connections) >= self.max_connections:
            for key, conn in self.connections.items():
                if conn.state is ConnState.CLOSED:
                    del self.connections[key]
                    break
            else:
                self.untracked += 1
                return None
        conn = TrackedConnection(client, server, ConnState.SYN_SENT, _Side(), _Side(),
                                 _Bytes(self.max_bytes), _Bytes(self.max_bytes))  # fmt: skip
        self.connections[client] = conn
        return conn

    def _from_client(self, seg: Segment, now: float) -> TrackedConnection | None:
        conn = self.connections.get(seg.src)
        if seg.flags & SYN:
            if conn is None or conn.state is ConnState.CLOSED or conn.c.isn != seg.seq:
                conn = self._new(seg.src, seg.dst)  # a new connection on a reused port
                if conn is None:
                    return None
                c = conn.c
                c.isn, c.mss, c.wscale = seg.seq, seg.mss, seg.wscale
                c.sack_permitted, c.timestamps = seg.sack_permitted, seg.tsval is not None
                _syn_seen(c, seg, now)
            return conn
        if conn is None:
            self.joined_late += 1  # its handshake was not seen: its offsets cannot be known
            return None
        c = conn.c
        c.frames += 1
        if c.isn is None:
            return conn
        if seg.flags & RST:
            conn.on(TcpEvent.RST)
            return conn
        if seg.flags & ACK:
            if conn.state is ConnState.SYN_RECEIVED and conn.s.isn is not None and seg.ack == (conn.s.isn + 1) % _MOD:
                conn.on(TcpEvent.ACK)
            if conn.s.isn is not None:
                if c.last_ack is None or conn.s.offset(seg.ack) >= conn.s.offset(c.last_ack):
                    c.last_ack = seg.ack
                conn.server_bytes.trim(min(conn.s.offset(seg.ack), conn.server_mirrored))
        self._sent(conn, c, seg, now, conn.client_bytes, conn.client_head)
        return conn

    def _from_server(self, seg: Segment, now: float) -> TrackedConnection | None:
        conn = self.connections.get(seg.dst)
        if conn is None:
            return None
        s = conn.s
        s.frames += 1
        conn.server_mac = seg.src_mac
        if seg.flags & SYN:
            if seg.flags & ACK and conn.c.isn is not None and seg.ack == (conn.c.isn + 1) % _MOD:
                s.isn, s.mss, s.wscale = seg.seq, seg.mss, seg.wscale
                s.sack_permitted, s.timestamps = seg.sack_permitted, seg.tsval is not None
                s.last_ack = seg.ack
                _syn_seen(s, seg, now)
                conn.on(TcpEvent.SYN_ACK)
            return conn
        if s.isn is None:
            return conn
        if seg.flags & RST:
            conn.on(TcpEvent.RST)
            return conn
        if seg.flags & ACK:
            if s.last_ack is None or conn.c.offset(seg.ack) >= conn.c.offset(s.last_ack):
                s.last_ack = seg.ack
        self._sent(conn, s, seg, now, conn.server_bytes, conn.server_head)
        return conn

    def _sent(self, conn: TrackedConnection, side: _Side, seg: Segment, now: float, data: _Bytes,
              head: _Bytes) -> None:  # fmt: skip
        """A data or ACK segment from ``side``."""
        off = side.offset(seg.seq)
        if seg.payload:
            data.add(off, seg.payload)
            if off < HEAD:
                head.add(off, seg.payload[:HEAD - off])
        end = off + len(seg.payload)
        if end > side.high:
            side.high = end
        side.last_seq = seg.seq
        # a window is scaled once both SYNs offered scaling (never in a SYN itself)
        window = seg.window << side.wscale if conn.c.wscale is not None and conn.s.wscale is not None else seg.window
        side.last_window = window
        if window > side.max_window:
            side.max_window = window
        if seg.tsval is not None:
            side.last_tsval, side.tsval_at = seg.tsval, now
        if seg.flags & FIN:
            side.high = max(side.high, end)  # the FIN's own sequence number is not data
            conn.on(TcpEvent.FIN)


def _syn_seen(side: _Side, seg: Segment, now: float) -> None:
    side.last_seq = seg.seq
    side.last_window = side.max_window = seg.window  # never scaled in a SYN
    if seg.tsval is not None:
        side.last_tsval, side.tsval_at = seg.tsval, now
