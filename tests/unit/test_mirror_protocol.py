"""The mirror stream protocol (replay/mirror_protocol.py): wire format, in-order
exactly-once delivery across loss, duplication, reordering, reconnects and overflow."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.mirror_protocol import (
    Ack,
    AckRequest,
    Data,
    DeltaRequest,
    Heartbeat,
    Hello,
    HelloAck,
    Marker,
    MirrorDecoder,
    MirrorProtocolError,
    MirrorReceiver,
    MirrorSender,
    Resync,
    SessionClosed,
    SessionOpened,
    Topology,
    Unmarked,
    encode,
)

RECORDS = [
    SessionOpened(1, 7, (("user", "alice"), ("database", "app"))),
    Data(2, 7, "c", 0x16B374D848, 0, b"Q\0\0\0\x0dselect 1\0"),
    Data(3, 7, "b", 0x16B374D900, 0, b"Z\0\0\0\x05I"),
    Marker(4, 7, 12),
    Unmarked(4, 7, 2),
    Data(4, 7, "h", 0, 0, b"C\0\0\0\x0dINSERT 0 1\0"),
    SessionClosed(5, 7),
    Topology(6, "10.0.0.2:5432", "[::1]:5433"),
    Heartbeat(5, 0x16B3750000, 1_700_000_000_000_000),
    Hello(0xDEADBEEF, "host-a"),
    HelloAck(0xDEADBEEF, 6),
    Ack(5),
    DeltaRequest(3),
    Resync(9),
]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip(rec):
    assert MirrorDecoder().feed(encode(rec)) == [rec]


def test_byte_at_a_time_equals_whole():
    wire = b"".join(encode(r) for r in RECORDS)
    whole = MirrorDecoder().feed(wire)
    dec = MirrorDecoder()
    pieces = [r for i in range(len(wire)) for r in dec.feed(wire[i:i + 1])]
    assert pieces == whole == RECORDS


@pytest.mark.parametrize("wire, what", [
    (b"Z\0\0\0\0", "unknown mirror record kind"),
    (b"A\0\0\0\x03abc", "record body of 3 bytes"),
    (b"M\0\0\0\x1d" + b"\0" * 12 + b"x" + b"\0" * 16, "direction"),
    (b"S\0\0\0\x0e" + b"\0" * 12 + b"ab", "NUL-terminated pairs"),
    (b"M\xff\xff\xff\xff", "over"),
    (b"T\0\0\0\x0b" + b"\0" * 8 + b"a\0b", "two NUL-terminated addresses"),
])
def test_malformed_frames(wire, what):
    with pytest.raises(MirrorProtocolError, match=what):
        MirrorDecoder().feed(wire)


def pump(sender_wire: bytes, receiver: MirrorReceiver, delivered: list) -> list:
    replies = []
    for rec in MirrorDecoder().feed(sender_wire):
        out, back = receiver.on_record(rec)
        delivered.extend(out)
        replies.extend(back)
    return replies


def test_gap_is_repaired_from_the_delta_exactly_once():
    s, r, got = MirrorSender(epoch=1), MirrorReceiver(), []
    r.on_hello(Hello(1, "a"))
    wires = [s.data(1, "c", 100 + i, i * 10, b"x") for i in range(5)]
    replies = pump(wires[0] + wires[2] + wires[3], r, got)  # version 2 lost
    assert [x.version for x in got] == [1]
    assert replies == [DeltaRequest(2)]  # asked once, not once per held record
    replies = pump(s.delta(2) + wires[4], r, got)
    assert [x.version for x in got] == [1, 2, 3, 4, 5]
    assert r.duplicates == 3 and r.gaps == 1 and replies == []  # 3, 4 (held, resent) and 5 (resent twice)


def test_heartbeat_reveals_loss_at_the_end():
    s, r, got = MirrorSender(epoch=1), MirrorReceiver(), []
    r.on_hello(Hello(1, "a"))
    pump(s.data(1, "c", 1, 0, b"a"), r, got)
    s.data(1, "c", 2, 1, b"b")  # lost
    assert pump(s.heartbeat(5, 0), r, got) == [DeltaRequest(2)]
    pump(s.delta(2), r, got)
    assert [x.payload for x in got] == [b"a", b"b"]


def test_ack_trims_the_buffer_and_reconnect_resends_the_rest():
    s, r, got = MirrorSender(epoch=9), MirrorReceiver(), []
    hack = r.on_hello(Hello(9, "a"))
    assert hack == HelloAck(9, 1)
    for i in range(4):
        pump(s.data(1, "b", i, i, bytes([i])), r, got)
    s.on_ack(r.acked)
    assert s.buffered_bytes == 0
    w5, w6 = s.data(1, "b", 5, 5, b"5"), s.data(1, "b", 6, 6, b"6")  # link drops: both lost
    # reconnect: the receiver says what it has, the sender resends exactly the rest
    resend = s.on_hello_ack(r.on_hello(Hello(9, "a")))
    assert resend == w5 + w6
    pump(resend, r, got)
    assert [x.version for x in got] == [1, 2, 3, 4, 5, 6]


def test_overflow_drops_history_and_says_resync():
    s, r, got = MirrorSender(epoch=1, max_buffer_bytes=200), MirrorReceiver(), []
    r.on_hello(Hello(1, "a"))
    for i in range(20):  # the secondary is gone: nothing arrives, nothing is acked
        s.data(1, "c", i, i, b"p" * 20)
    assert s.overflows > 0 and s.buffered_bytes <= 200
    pump(s.delta(1), r, got)
    assert isinstance(got[0], Resync)
    assert [x.version for x in got[1:]] == list(range(got[0].next_version, 21))
    assert r.resyncs == 1


def test_restarted_secondary_is_resynced_from_what_is_buffered():
    s, r, got = MirrorSender(epoch=3), MirrorReceiver(), []
    r.on_hello(Hello(3, "a"))
    for i in range(3):
        pump(s.data(1, "b", i, i, bytes([i])), r, got)
    s.on_ack(r.acked)  # versions 1-3 acknowledged, gone from the buffer
    s.data(1, "b", 4, 4, b"4")
    s.data(1, "b", 5, 5, b"5")
    fresh, got2 = MirrorReceiver(), []  # the secondary restarted: it knows nothing
    resend = s.on_hello_ack(fresh.on_hello(Hello(3, "a")))
    pump(resend, fresh, got2)
    # it cannot get 1-3 back, so it is told to resync (sessions not replayable), then 4, 5
    assert got2[0] == Resync(4) and [x.version for x in got2[1:]] == [4, 5]
    assert fresh.acked == 5 and s.resyncs_sent == 1


def test_ack_request_round_trip():
    r = MirrorReceiver()
    r.on_hello(Hello(1, "a"))
    assert r.on_record(AckRequest(7)) == ([], []) and r.ack_wanted == 7
    assert MirrorDecoder().feed(encode(AckRequest(7))) == [AckRequest(7)]


def test_new_primary_incarnation_restarts_versions():
    r, got = MirrorReceiver(), []
    r.on_hello(Hello(1, "a"))
    s1 = MirrorSender(epoch=1)
    pump(s1.data(1, "c", 1, 0, b"old"), r, got)
    s2 = MirrorSender(epoch=2)  # primary connmgr restarted
    assert r.on_hello(Hello(2, "a")) == HelloAck(2, 1)
    pump(s2.data(1, "c", 1, 0, b"new"), r, got)
    assert [x.payload for x in got] == [b"old", b"new"]


def test_ack_beyond_what_was_sent_is_an_error():
    s = MirrorSender(epoch=1)
    s.data(1, "c", 0, 0, b"x")
    with pytest.raises(MirrorProtocolError):
        s.on_ack(2)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**32), st.floats(0, 0.5), st.floats(0, 0.3))
def test_any_loss_duplication_and_reordering_delivers_each_version_once_in_order(n, seed, loss, dup):
    rng = random.Random(seed)
    s, r, got = MirrorSender(epoch=1), MirrorReceiver(), []
    r.on_hello(Hello(1, "a"))
    wires = [s.data(rng.randrange(8), "c", i, i, i.to_bytes(4, "big")) for i in range(1, n + 1)]
    in_flight = []
    for w in wires:
        if rng.random() >= loss:
            in_flight.append(w)
        if rng.random() < dup:
            in_flight.append(w)
    rng.shuffle(in_flight)
    requests = pump(b"".join(in_flight), r, got)
    for _ in range(n + 2):  # the repair loop: heartbeat, delta requests, resends
        requests += pump(s.heartbeat(0, 0), r, got)
        if not requests:
            break
        wire = b"".join(s.delta(q.from_version) for q in requests if isinstance(q, DeltaRequest))
        requests = pump(wire, r, got)
    assert [x.version for x in got] == list(range(1, n + 1))
    assert [int.from_bytes(x.payload, "big") for x in got] == list(range(1, n + 1))
