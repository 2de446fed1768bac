"""replay/tcp_state.py: TCP state followed from copied frames (built here with scapy)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

scapy_all = pytest.importorskip("scapy.all", reason="the [net] extra (scapy) is not installed")
Ether, IP, TCP, Dot1Q, UDP = scapy_all.Ether, scapy_all.IP, scapy_all.TCP, scapy_all.Dot1Q, scapy_all.UDP

from replay.tcp_state import ConnState, NotRecoverable, TcpTracker, parse_frame  # noqa: E402

VIP = ("198.18.0.100", 5432)
CLIENT = ("198.18.0.10", 40000)
A_MAC = "02:00:00:00:00:0a"
C_MAC = "02:00:00:00:00:0c"


def frame(src, dst, flags, seq, ack=0, payload=b"", window=502, options=(), mac=C_MAC) -> bytes:
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=src[0], dst=dst[0])
                 / TCP(sport=src[1], dport=dst[1], flags=flags, seq=seq, ack=ack, window=window,
                       options=list(options)) / payload)  # fmt: skip


class Conn:
    """A scripted connection: the client at CLIENT, host A at the VIP."""

    def __init__(self, tracker: TcpTracker, c_isn=1000, a_isn=5000, ts=True, now=0.0):
        self.t = tracker
        self.c_isn, self.a_isn = c_isn, a_isn
        self.c_next = (c_isn + 1) % 2**32
        self.a_next = (a_isn + 1) % 2**32
        self.c_ts, self.a_ts = 100, 7000
        self.ts = ts
        self.now = now
        c_opts = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7)] + ([("Timestamp", (self.c_ts, 0))] if ts else [])
        a_opts = [("MSS", 1400), ("SAckOK", b""), ("WScale", 9)] + ([("Timestamp", (self.a_ts, self.c_ts))] if ts else [])
        tracker.on_frame(frame(CLIENT, VIP, "S", c_isn, options=c_opts, window=64240), now)
        tracker.on_frame(frame(VIP, CLIENT, "SA", a_isn, self.c_next, options=a_opts, window=65160, mac=A_MAC), now)
        self.client_ack()

    def _opts(self, side):
        if not self.ts:
            return []
        if side == "c":
            self.c_ts += 1
            return [("Timestamp", (self.c_ts, self.a_ts))]
        self.a_ts += 1
        return [("Timestamp", (self.a_ts, self.c_ts))]

    def client_send(self, data: bytes, ack=None, seq=None):
        seq = self.c_next if seq is None else seq
        self.t.on_frame(frame(CLIENT, VIP, "PA", seq, self.a_next if ack is None else ack, data,
                              options=self._opts("c")), self.now)  # fmt: skip
        self.c_next = (seq + len(data)) % 2**32 if seq == self.c_next else self.c_next

    def client_ack(self, ack=None, window=501):
        self.t.on_frame(frame(CLIENT, VIP, "A", self.c_next, self.a_next if ack is None else ack, window=window,
                              options=self._opts("c")), self.now)  # fmt: skip

    def server_send(self, data: bytes, ack=None):
        self.t.on_frame(frame(VIP, CLIENT, "PA", self.a_next, self.c_next if ack is None else ack, data,
                              options=self._opts("a"), mac=A_MAC), self.now)  # fmt: skip
        self.a_next = (self.a_next + len(data)) % 2**32

    def server_ack(self, ack=None, window=300):
        self.t.on_frame(frame(VIP, CLIENT, "A", self.a_next, self.c_next if ack is None else ack, window=window,
                              options=self._opts("a"), mac=A_MAC), self.now)  # fmt: skip


def tracker(**kw) -> TcpTracker:
    return TcpTracker({VIP}, **kw)


# ---------------------------------------------------------------------------- frames


def test_parse_frame_reads_options_and_payload():
    f = frame(CLIENT, VIP, "S", 123, options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7),
                                               ("Timestamp", (11, 22))])  # fmt: skip
    seg = parse_frame(f)
    assert (seg.src, seg.dst, seg.seq, seg.flags) == (CLIENT, VIP, 123, 0x02)
    assert (seg.mss, seg.wscale, seg.sack_permitted, seg.tsval, seg.tsecr) == (1460, 7, True, 11, 22)
    assert seg.src_mac == bytes.fromhex(C_MAC.replace(":", ""))


def test_parse_frame_strips_ethernet_padding_and_vlan_tags():
    f = bytes(Ether() / Dot1Q(vlan=7) / IP(src=CLIENT[0], dst=VIP[0]) / TCP(sport=1, dport=2) / b"x")
    seg = parse_frame(f + b"\0" * 30)  # padding after the IP datagram is not payload
    assert seg.payload == b"x"


def test_parse_frame_ignores_other_protocols_and_fragments_and_rejects_lies():
    assert parse_frame(bytes(Ether() / IP() / UDP() / b"x")) is None
    assert parse_frame(bytes(Ether() / IP(flags="MF") / TCP() / b"x")) is None
    assert parse_frame(b"\0" * 10) is None
    whole = bytes(Ether() / IP() / TCP() / b"abc")
    with pytest.raises(ValueError, match="IPv4 lengths"):
        parse_frame(whole[:-2])
    t = tracker()
    t.on_frame(whole[:-2], 0.0)
    assert t.malformed == 1


# ---------------------------------------------------------------------------- states


def test_handshake_establishes_and_offsets_follow_both_streams():
    t = tracker()
    c = Conn(t)
    conn = t.connection(CLIENT)
    assert conn.state is ConnState.ESTABLISHED
    c.client_send(b"hello")
    c.server_ack()
    c.server_send(b"world!")
    c.client_ack()
    assert conn.acked_by_server == 5
    assert conn.acked_by_client == 6
    assert conn.client_data(0, 5) == b"hello"
    assert conn.server_data(0, 6) == b"world!"  # the mirror may not have it yet
    t.trim(CLIENT, "b", 4)
    assert conn.server_data(0, 6) is None and conn.server_data(4, 6) == b"d!"
    t.trim(CLIENT, "b", 6)
    assert conn.server_bytes.held == 0  # mirrored and acknowledged: not kept


def test_repair_state_from_frames():
    t = tracker()
    c = Conn(t, c_isn=2**32 - 3, a_isn=2**32 - 2)  # both wrap within the first bytes
    c.client_send(b"Q-one")
    c.server_ack()
    c.server_send(b"reply-one")
    c.client_ack()
    c.server_send(b"not-yet-acked")
    c.now = 2.5
    rs = t.connection(CLIENT).repair_state(client_from=5, now=3.0)
    assert rs.local == VIP and rs.peer == CLIENT
    assert rs.rcv_nxt == (2**32 - 3 + 1 + 5) % 2**32
    assert rs.snd_una == (2**32 - 2 + 1 + 9) % 2**32
    assert rs.unsent == b"not-yet-acked"
    assert (rs.client_end, rs.client_received) == (5, 9)
    assert (rs.mss, rs.sack, rs.timestamps, rs.snd_wscale, rs.rcv_wscale) == (1460, True, True, 7, 9)
    assert rs.timestamp % 2 == 0 and rs.timestamp >= c.a_ts + 500  # last TSval + 0.5 s at 1 kHz
    wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = rs.window
    assert snd_wnd == 501 << 7 and max_window == 502 << 7  # the client's windows, scaled by its shift
    assert rcv_wnd == 502 << 9 and rcv_wup == rs.rcv_nxt  # host A's last window, its shift


def test_client_bytes_acked_but_not_mirrored_are_recovered_and_later_ones_absorbed():
    t = tracker()
    c = Conn(t)
    c.client_send(b"mirrored;")
    c.client_send(b"acked-not-mirrored;")
    c.server_ack()
    c.client_send(b"after-the-death;")  # host A never acknowledged these: the bridge flooded them
    conn = t.connection(CLIENT)
    t.trim(CLIENT, "c", 9)  # the mirror carried the first message
    rs = conn.repair_state(client_from=9, now=0.0)
    assert conn.client_data(9, rs.client_end) == b"acked-not-mirrored;after-the-death;"
    assert rs.rcv_nxt == (1000 + 1 + len(b"mirrored;acked-not-mirrored;after-the-death;")) % 2**32


def test_bytes_recovered_into_the_mirror_still_count_as_received():
    """Found by the host-kill campaign: bytes recovered from the frames are fed to the
    mirror, which trims them here; the repair computed from the old mirrored offset then
    set rcv_nxt before them, host B acknowledged only up to there, and the client sent the
    UPDATE again, which ran twice. Bytes trimmed because the mirror has them are held."""
    t = tracker()
    c = Conn(t)
    c.client_send(b"mirrored;")
    c.client_send(b"UPDATE a;")  # host A read it and died before acknowledging it
    conn = t.connection(CLIENT)
    t.trim(CLIENT, "c", 9)
    t.trim(CLIENT, "c", 18)  # recovered: now in the mirror too
    for client_from in (9, 18):
        rs = conn.repair_state(client_from=client_from, now=0.0)
        assert rs.client_end == 18
        assert rs.rcv_nxt == (1000 + 1 + 18) % 2**32


def test_a_lost_copy_below_the_dead_hosts_ack_is_not_recoverable():
    t = tracker()
    c = Conn(t)
    c.client_send(b"aaaa")
    c.c_next += 4  # the frame carrying "bbbb" was never copied to host B
    c.client_send(b"cccc")
    c.server_ack()
    with pytest.raises(NotRecoverable, match="never seen here"):
        t.connection(CLIENT).repair_state(client_from=0, now=0.0)


def test_unacked_server_bytes_missing_is_not_recoverable():
    t = tracker()
    c = Conn(t)
    c.a_next += 10  # a segment host A sent was not copied
    c.server_send(b"tail")
    with pytest.raises(NotRecoverable, match="server bytes 0..14 .* neither mirrored nor seen"):
        t.connection(CLIENT).repair_state(client_from=0, now=0.0)
    # the mirror has the first bytes, the frames the rest: together they are whole
    rs = t.connection(CLIENT).repair_state(client_from=0, now=0.0, mirrored=b"0123456789", mirrored_from=0)
    assert rs.unsent == b"0123456789tail"


def test_two_phase_replies_the_client_was_never_sent_go_out_too():
    t = tracker()
    c = Conn(t)
    c.server_send(b"sent;")
    rs = t.connection(CLIENT).repair_state(0, 0.0, mirrored=b"sent;held-for-the-ack;", mirrored_from=0)
    assert rs.unsent == b"sent;held-for-the-ack;"
    c.client_ack()  # the client has the first five bytes
    rs = t.connection(CLIENT).repair_state(0, 0.0, mirrored=b"held-for-the-ack;", mirrored_from=5)
    assert rs.unsent == b"held-for-the-ack;" and rs.client_received == 5


def test_the_buffer_bound_drops_oldest_and_says_so():
    t = tracker(max_bytes=200)
    c = Conn(t)
    for i in range(10):
        c.client_send(b"%02d" % i * 20)
    c.server_ack()
    conn = t.connection(CLIENT)
    assert conn.client_bytes.held <= 200
    with pytest.raises(NotRecoverable, match="not kept"):
        conn.repair_state(client_from=0, now=0.0)


def test_rst_and_fin_end_what_can_be_continued():
    t = tracker()
    c = Conn(t)
    t.on_frame(frame(CLIENT, VIP, "FA", c.c_next, c.a_next), 0.0)
    assert t.connection(CLIENT).state is ConnState.CLOSING
    with pytest.raises(NotRecoverable, match="closing"):
        t.connection(CLIENT).repair_state(0, 0.0)
    t.on_frame(frame(VIP, CLIENT, "R", c.a_next, 0, mac=A_MAC), 0.0)
    assert t.connection(CLIENT).state is ConnState.CLOSED


def test_connections_first_seen_mid_stream_are_counted_not_followed():
    t = tracker()
    t.on_frame(frame(CLIENT, VIP, "PA", 77, 88, b"x"), 0.0)
    assert t.connection(CLIENT) is None and t.joined_late == 1


def test_a_reused_port_starts_a_new_connection_and_the_bound_evicts_closed_ones():
    t = tracker(max_connections=1)
    c = Conn(t)
    t.on_frame(frame(VIP, CLIENT, "R", c.a_next, 0, mac=A_MAC), 0.0)
    Conn(t, c_isn=9_000_000)
    assert t.connection(CLIENT).c.isn == 9_000_000
    t.on_frame(frame(("198.18.0.11", 1), VIP, "S", 5), 0.0)
    assert t.untracked == 1  # the one slot holds a live connection


def test_no_timestamps_no_window_scaling():
    t = tracker()
    Conn(t, ts=False)
    conn = t.connection(CLIENT)
    conn.c.wscale = None  # as if the client had not offered it
    rs = conn.repair_state(0, 0.0)
    assert (rs.timestamps, rs.timestamp, rs.snd_wscale, rs.rcv_wscale) == (False, 0, None, None)


# ---------------------------------------------------------------------------- property


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.data())
def test_any_segmentation_reordering_and_retransmission_gives_the_stream_back(stream, data):
    """Whatever bounds, order and repeats the client's segments come in (as long as every
    byte comes at least once), the bytes read back are the stream."""
    t = tracker()
    c = Conn(t, c_isn=data.draw(st.integers(0, 2**32 - 1)))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12))) if len(stream) > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, len(stream)], strict=True))
    extra = data.draw(st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(1, 50)), max_size=5))
    segs = bounds + [(s, min(len(stream), s + n)) for s, n in extra]
    order = data.draw(st.permutations(segs))
    base = c.c_next
    for s, e in order:
        c.client_send(stream[s:e], seq=(base + s) % 2**32)
    conn = t.connection(CLIENT)
    assert conn.client_seen_end(0) == len(stream)
    assert conn.client_data(0, len(stream)) == stream
    k = data.draw(st.integers(0, len(stream)))
    t.trim(CLIENT, "c", k)
    assert conn.client_data(k, len(stream)) == stream[k:]
