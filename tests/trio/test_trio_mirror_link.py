"""connmgr/pair/mirror.py on a virtual clock: the link's heartbeats, the secondary's
acknowledgements at each heartbeat, the bounded buffer and the Resync that follows an
overflow, the two-phase degrade and its return, the flush timer and the reconnect back-off.

MirrorLink connects with ``trio.open_tcp_stream`` and then drives the raw socket itself, so
the link cannot take a memory stream: these tests run it over loopback TCP (127.0.0.1,
port 0) against ``serve_mirror`` or :class:`FakeSecondary`. On Linux a loopback send is
delivered within the sending system call, so what one task sends is readable when the
scheduler next polls, before the autojumping clock can move.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from itertools import pairwise

import pytest
import trio

from connmgr.pair.mirror import MirrorLink, serve_mirror
from replay.mirror_protocol import (
    Ack,
    AckRequest,
    Data,
    Heartbeat,
    Hello,
    MirrorDecoder,
    MirrorReceiver,
    Resync,
    encode,
)

pytestmark = pytest.mark.trio

HOST = "127.0.0.1"


async def until(
    predicate: Callable[[], bool], *, step: float = 0.001, limit: float = 30.0
) -> float:
    """Poll ``predicate`` every ``step`` virtual seconds; returns the virtual time it held."""
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(step)
    return trio.current_time()


class FakeSecondary:
    """A secondary connmgr that answers Hello and records every record with the virtual
    time it arrived; it acknowledges (on heartbeats and AckRequests) only while
    ``acking``, otherwise it stays silent after the HelloAck."""

    def __init__(self, *, acking: bool = True) -> None:
        self.acking = acking
        self.receiver = MirrorReceiver()
        self.arrivals: list[tuple[float, object]] = []
        self.connections = 0
        self._scope = trio.CancelScope()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            listeners = await trio.open_tcp_listeners(0, host=HOST)
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(self._handle, listeners)

    def stop(self) -> None:
        """Gone: the listener and every connection closed (the link's next connect is refused)."""
        self._scope.cancel()

    def of(self, kind: type) -> list[tuple[float, object]]:
        return [(t, r) for t, r in self.arrivals if isinstance(r, kind)]

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        decoder = MirrorDecoder()
        async with stream:
            while data := await stream.receive_some(65536):
                now = trio.current_time()
                replies = []
                for rec in decoder.feed(data):
                    self.arrivals.append((now, rec))
                    if isinstance(rec, Hello):
                        replies.append(self.receiver.on_hello(rec))
                        continue
                    _out, back = self.receiver.on_record(rec)
                    if self.acking:
                        replies.extend(back)
                        if isinstance(rec, Heartbeat | AckRequest):
                            replies.append(Ack(self.receiver.acked))
                if replies:
                    await stream.send_all(b"".join(encode(r) for r in replies))


async def test_heartbeats_go_out_every_interval_and_carry_the_latest_version(autojump_clock):
    secondary = FakeSecondary()
    link = MirrorLink(HOST, 0, heartbeat_interval=0.25, lsn=lambda: 0xABC, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        link.port = await nursery.start(secondary.serve)
        await nursery.start(link.run)
        await until(lambda: link.connected)
        [(t_hello, _hello)] = secondary.of(Hello)
        await trio.sleep_until(t_hello + 1.1)
        for i in range(3):
            link.session_data(7, "c", 0, b"Q%d" % i)
        link.flush_nowait()
        await trio.sleep_until(t_hello + 2.6)
        nursery.cancel_scope.cancel()

    assert secondary.connections == 1
    beats = secondary.of(Heartbeat)
    assert [t - t_hello for t, _ in beats] == pytest.approx(
        [0.25 * k for k in range(1, 11)], abs=1e-6
    )
    assert [b.latest_version for _, b in beats] == [0] * 4 + [3] * 6
    assert {b.lsn for _, b in beats} == {0xABC}
    assert [(t - t_hello, r.payload) for t, r in secondary.of(Data)] == [
        (pytest.approx(1.1), b"Q0"), (pytest.approx(1.1), b"Q1"), (pytest.approx(1.1), b"Q2"),
    ]  # fmt: skip


async def test_the_secondary_acknowledges_at_the_next_heartbeat_when_traffic_stops(autojump_clock):
    """serve_mirror coalesces acknowledgements (one per ``ack_interval``) but answers every
    heartbeat with one: a primary's buffer drains within a heartbeat interval."""
    delivered: list = []
    link = MirrorLink(HOST, 0, heartbeat_interval=0.25, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        _host, link.port = await nursery.start(
            partial(serve_mirror, HOST, 0, delivered.extend, ack_interval=3600.0)
        )
        await nursery.start(link.run)
        t_up = await until(lambda: link.connected)
        await trio.sleep_until(t_up + 0.3)
        for i in range(5):
            link.session_data(1, "b", 10 * i, b"R" * 10)
        link.flush_nowait()
        await until(lambda: len(delivered) == 5)
        assert link.sender.buffered_bytes > 0 and link.sender.acked_version == 0
        t_acked = await until(lambda: link.sender.acked_version == 5)
        nursery.cancel_scope.cancel()

    # the heartbeat at t_up + 0.5 (2nd one) brought the acknowledgement; nothing before it
    assert t_acked - t_up == pytest.approx(0.5, abs=0.0021)
    assert link.sender.buffered_bytes == 0
    assert [r.version for r in delivered] == [1, 2, 3, 4, 5]


async def test_the_buffer_keeps_the_newest_records_and_a_reconnect_resyncs(autojump_clock):
    """While the link is down, records wait in the sender's buffer, bounded in bytes: the
    oldest go, and the secondary is told to Resync from the oldest one kept."""
    record_size = 5 + 29 + 100  # frame head, Data fields, payload
    delivered: list = []
    link = MirrorLink(HOST, 0, max_buffer_bytes=3 * record_size, clock=trio.current_time)
    for i in range(10):
        link.session_data(1, "c", 100 * i, bytes([0x30 + i]) * 100)
    assert (link.sender.overflows, link.sender.lost_below) == (7, 8)
    assert link.sender.buffered_bytes == 3 * record_size
    async with trio.open_nursery() as nursery:
        _host, link.port = await nursery.start(serve_mirror, HOST, 0, delivered.extend)
        await nursery.start(link.run)
        await until(lambda: link.sender.acked_version == 10)
        nursery.cancel_scope.cancel()

    assert delivered[0] == Resync(8)
    assert [(r.version, r.offset, r.payload) for r in delivered[1:]] == [
        (8, 700, b"7" * 100), (9, 800, b"8" * 100), (10, 900, b"9" * 100),
    ]  # fmt: skip
    assert link.sender.buffered_bytes == 0


async def test_two_phase_degrades_after_the_timeout_and_comes_back(autojump_clock, vcaplog):
    secondary = FakeSecondary(acking=False)
    link = MirrorLink(HOST, 0, heartbeat_interval=0.1, two_phase=True, two_phase_timeout=0.5,
                      clock=trio.current_time)  # fmt: skip
    vcaplog.set_level(logging.WARNING, logger="connmgr.mirror")
    released: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        link.port = await nursery.start(secondary.serve)
        await nursery.start(link.run)
        await until(lambda: link.connected)

        # a commit's acknowledgement is held; the silent secondary confirms nothing
        t_hold = trio.current_time()
        link.hold(
            link.session_data(1, "b", 0, b"C"), lambda: released.append(("a", trio.current_time()))
        )
        await trio.sleep_until(t_hold + 0.5 - 1e-6)
        assert released == [] and link.holds == 1 and link.two_phase
        await until(lambda: released)
        assert [r.version for _, r in secondary.of(AckRequest)] == [1]  # it was asked at once

        # degraded: the next commit is not held
        t_next = trio.current_time()
        link.hold(
            link.session_data(1, "b", 1, b"C"), lambda: released.append(("b", trio.current_time()))
        )
        assert released[-1] == ("b", t_next) and link.holds == 0

        # the secondary answers again: acknowledged within a second, two-phase is back
        secondary.acking = True
        t_back = await until(lambda: link.two_phase)
        t_hold3 = trio.current_time()
        link.hold(
            link.session_data(1, "b", 2, b"C"), lambda: released.append(("c", trio.current_time()))
        )
        await until(lambda: len(released) == 3)
        nursery.cancel_scope.cancel()

    (_, t_a), _, (_, t_c) = released
    assert 0.5 < t_a - t_hold <= 0.5 + 0.05 + 1e-6  # the timeout, then at most one watch tick
    assert t_back - t_next <= 0.1 + 0.05 + 0.002  # a heartbeat's Ack, then a watch tick
    assert t_c - t_hold3 < 0.01  # held again, until the secondary's answer
    assert (link.degradations, link.holds_total, link.two_phase_configured) == (1, 2, True)
    lines = [(r.vtime, r.getMessage()) for r in vcaplog.records if r.name == "connmgr.mirror"]
    assert [m for _, m in lines] == [
        f"mirror: the secondary at {HOST}:{link.port} acknowledged nothing for {t_a - t_hold:.2f}s"
        " (link up): two-phase DEGRADED to one-phase; 1 held commit acknowledgements released",
        f"mirror: the secondary at {HOST}:{link.port} caught up: two-phase restored",
    ]
    assert [t for t, _ in lines] == pytest.approx([t_a, t_back], abs=0.0011)


async def test_a_confirming_secondary_releases_each_hold_at_once_and_never_degrades(autojump_clock):
    link = MirrorLink(HOST, 0, two_phase=True, two_phase_timeout=0.5, clock=trio.current_time)
    waits: list[float] = []
    delivered: list = []
    async with trio.open_nursery() as nursery:
        _host, link.port = await nursery.start(serve_mirror, HOST, 0, delivered.extend)
        await nursery.start(link.run)
        await until(lambda: link.connected)
        for i in range(20):
            t0 = trio.current_time()
            done = trio.Event()
            link.hold(link.session_data(1, "b", i, b"C"), done.set)
            await done.wait()
            waits.append(trio.current_time() - t0)
            await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert max(waits) < 0.005
    assert (link.degradations, link.two_phase, link.holds_total, link.holds) == (0, True, 20, 0)
    assert len(delivered) == 20


async def coalescing_delays(link: MirrorLink, rounds: int = 50) -> tuple[list[float], list[float]]:
    """Mirror pairs of records the way the relay does (``session_data``, ``flush_soon``)
    at any phase of the link's timer; returns (delays of the first of each pair, which
    finds the link idle, delays of the second, which follows a send at once)."""
    secondary = FakeSecondary()
    sent: list[float] = []
    async with trio.open_nursery() as nursery:
        link.port = await nursery.start(secondary.serve)
        await nursery.start(link.run)
        await until(lambda: link.connected)
        for i in range(rounds):
            await trio.sleep(0.0137)
            sent.append(trio.current_time())
            link.session_data(1, "c", 2 * i, b"A")
            link.flush_soon()
            link.session_data(1, "c", 2 * i + 1, b"B")
            link.flush_soon()
        await until(lambda: len(secondary.of(Data)) == 2 * rounds)
        nursery.cancel_scope.cancel()
    arrived = [t for t, _ in secondary.of(Data)]
    first = [b - a for a, b in zip(sent, arrived[0::2], strict=True)]
    second = [b - a for a, b in zip(sent, arrived[1::2], strict=True)]
    return first, second


async def test_a_record_after_an_idle_spell_goes_out_at_once_the_next_is_coalesced(autojump_clock):
    link = MirrorLink(HOST, 0, heartbeat_interval=100.0, clock=trio.current_time)
    first, second = await coalescing_delays(link)
    assert first == [0.0] * 50
    assert min(second) > 0.0  # left for the link task, not sent by the relay
    assert max(second) <= link.flush_delay + 1e-9


async def test_a_coalesced_record_waits_at_most_flush_delay(autojump_clock):
    link = MirrorLink(HOST, 0, heartbeat_interval=100.0, clock=trio.current_time)
    _first, second = await coalescing_delays(link)
    assert max(second) <= link.flush_delay + 1e-9


async def test_reconnects_back_off_from_50_ms_doubling_to_2_s(autojump_clock, vcaplog):
    with trio.socket.socket() as s:  # a port nobody listens on: refused at once
        await s.bind((HOST, 0))
        port = s.getsockname()[1]
    link = MirrorLink(HOST, port, clock=trio.current_time)
    vcaplog.set_level(logging.DEBUG, logger="connmgr.mirror")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await trio.sleep(7.2)
        nursery.cancel_scope.cancel()
    lines = [
        (r.vtime, r.levelname, r.getMessage())
        for r in vcaplog.records
        if r.name == "connmgr.mirror"
    ]
    assert [t for t, _, _ in lines] == pytest.approx(
        [0.0, 0.05, 0.15, 0.35, 0.75, 1.55, 3.15, 5.15, 7.15]
    )
    assert [m.rsplit(" ", 1)[1] for _, _, m in lines] == [
        "0.05s", "0.10s", "0.20s", "0.40s", "0.80s", "1.60s", "2.00s", "2.00s", "2.00s",
    ]  # fmt: skip
    assert [level for _, level, _ in lines] == ["WARNING"] + ["DEBUG"] * 8  # one warning per outage
    assert link.connects == 0


async def test_a_lost_link_reconnects_with_the_back_off_it_logs(autojump_clock, vcaplog):
    secondary = FakeSecondary()
    link = MirrorLink(HOST, 0, clock=trio.current_time)
    vcaplog.set_level(logging.DEBUG, logger="connmgr.mirror")
    async with trio.open_nursery() as nursery:
        link.port = await nursery.start(secondary.serve)
        await nursery.start(link.run)
        await until(lambda: link.connected)
        t_lost = trio.current_time()
        secondary.stop()  # for good: every reconnect is refused
        await trio.sleep(3.2)
        nursery.cancel_scope.cancel()
    lines = [
        (r.vtime, r.getMessage()) for r in vcaplog.records if "reconnecting in" in r.getMessage()
    ]
    times = [t - t_lost for t, _ in lines]
    waits = [float(m.rsplit(" ", 1)[1].removesuffix("s")) for _, m in lines]
    gaps = [b - a for a, b in pairwise(times)]
    assert gaps == pytest.approx(waits[: len(gaps)])  # each line names the wait that follows it
    assert len(lines) <= 8  # growing: 0.05, 0.1, 0.2, ... 2 s, not 60 attempts in 3 s
    levels = [r.levelname for r in vcaplog.records if "reconnecting in" in r.getMessage()]
    assert levels == ["WARNING"] + ["DEBUG"] * (len(levels) - 1)  # the loss is said once


async def test_a_secondary_that_says_nothing_is_dropped_after_peer_timeout_and_the_link_made_again(
        autojump_clock, vcaplog):
    """A secondary that keeps the TCP connection open but acknowledges nothing (a hung
    process): after ``peer_timeout`` the primary drops the link, says why once, counts it,
    and connects again. A secondary that acknowledges its heartbeats is never dropped."""
    secondary = FakeSecondary(acking=False)
    link = MirrorLink(HOST, 0, heartbeat_interval=0.1, peer_timeout=1.0, clock=trio.current_time)
    vcaplog.set_level(logging.DEBUG, logger="connmgr.mirror")
    async with trio.open_nursery() as nursery:
        link.port = await nursery.start(secondary.serve)
        await nursery.start(link.run)
        await until(lambda: link.connected)
        t_up = trio.current_time()
        await until(lambda: link.peer_silent == 1)
        dropped = trio.current_time() - t_up
        await until(lambda: secondary.connections == 2 and link.connected)
        nursery.cancel_scope.cancel()
    assert 1.0 < dropped <= 1.1 + 1e-9  # the first heartbeat after peer_timeout
    said = [r for r in vcaplog.records if "said nothing" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"], [r.getMessage() for r in vcaplog.records]

    healthy = FakeSecondary(acking=True)
    link = MirrorLink(HOST, 0, heartbeat_interval=0.1, peer_timeout=1.0, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        link.port = await nursery.start(healthy.serve)
        await nursery.start(link.run)
        await until(lambda: link.connected)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert (link.peer_silent, healthy.connections) == (0, 1)
