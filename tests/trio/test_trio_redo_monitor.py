"""connmgr/pg/redo_monitor.py on a virtual clock, against fake primaries that answer
``pg_current_wal_insert_lsn()``: one sample per ``interval``, a position that never goes
back, :attr:`healthy` turning False exactly ``stale_after`` after the last sample, the
outage's log lines and its 1 s back-off, and a retarget that reconnects at once."""

from __future__ import annotations

import logging

import pytest
import trio

from connmgr.pg.redo_monitor import RedoMonitor

pytestmark = pytest.mark.trio


def lsn_text(lsn: int) -> bytes:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}".encode()


class FakePrimary:
    """A primary whose WAL insert position is ``base`` plus 1000 bytes a virtual second
    (or the next of ``script``); ``down`` refuses sessions and fails open ones."""

    def __init__(self, base: int, *, script: list[int] | None = None) -> None:
        self.base = base
        self.script = script
        self.down = False
        self.opens: list[float] = []
        self.closes: list[float] = []
        self.queries: list[bytes] = []

    async def connect(self) -> FakeSession:
        self.opens.append(trio.current_time())
        if self.down:
            raise ConnectionRefusedError("connection refused")
        return FakeSession(self)

    def position(self) -> int:
        if self.script is not None:
            return self.script.pop(0)
        return self.base + round(trio.current_time() * 1000)


class FakeSession:
    def __init__(self, primary: FakePrimary) -> None:
        self.primary = primary

    async def query_rows(self, query: bytes) -> list[tuple]:
        self.primary.queries.append(query)
        if self.primary.down:
            raise ConnectionResetError("server closed the connection")
        return [(lsn_text(self.primary.position()),)]

    def close(self) -> None:
        self.primary.closes.append(trio.current_time())


async def test_one_sample_per_interval_and_started_after_the_first(autojump_clock):
    primary = FakePrimary(0x3_0000_0000)
    monitor = RedoMonitor(interval=0.25, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run, primary.connect)
        assert (monitor.samples, monitor.lsn, trio.current_time()) == (1, 0x3_0000_0000, 0.0)
        await trio.sleep(10.1)
        nursery.cancel_scope.cancel()
    assert monitor.samples == 41  # 0, 0.25, ..., 10.0
    assert monitor.lsn == 0x3_0000_0000 + 10_000
    assert monitor.updated_at == pytest.approx(10.0)
    assert primary.queries[0] == primary.queries[-1]
    assert b"pg_current_wal_insert_lsn()" in primary.queries[0]
    assert primary.opens == [0.0] and primary.closes == [pytest.approx(10.1)]


async def test_while_nothing_is_mirrored_samples_slow_down_and_activity_wakes_them(autojump_clock):
    primary = FakePrimary(0x3_0000_0000)
    monitor = RedoMonitor(interval=0.01, idle_interval=1.0, clock=trio.current_time)
    records = [0]
    monitor.activity = lambda: records[0]
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run, primary.connect)
        await trio.sleep(10.2)  # idle: one sample a second (give or take an interval)
        assert monitor.samples == 11
        records[0] += 1  # a record was mirrored (the mirror link wakes the monitor):
        monitor.wake()  # the next sample within one interval
        await trio.sleep(0.011)
        assert monitor.samples == 12
        for _ in range(100):  # busy: one sample per interval
            records[0] += 1
            monitor.wake()
            await trio.sleep(0.01)
        assert monitor.samples == pytest.approx(112, abs=1)
        records[0] += 1  # moved without a wake: seen at the end of the pause at the latest
        await trio.sleep(1.02)
        assert monitor.samples == pytest.approx(113, abs=1)
        nursery.cancel_scope.cancel()


async def test_the_position_never_goes_back(autojump_clock):
    primary = FakePrimary(0, script=[0x500, 0x300, 0x900, 0x900, 0x100])
    monitor = RedoMonitor(interval=1.0, clock=trio.current_time)
    seen = []
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run, primary.connect)
        for t in range(5):
            await trio.sleep_until(t + 0.5)  # between two samples
            seen.append((monitor.samples, monitor.lsn))
        nursery.cancel_scope.cancel()
    assert seen == [(1, 0x500), (2, 0x500), (3, 0x900), (4, 0x900), (5, 0x900)]


async def test_a_silent_primary_turns_unhealthy_after_stale_after_and_back(autojump_clock, vcaplog):
    primary = FakePrimary(0x1000)
    monitor = RedoMonitor(interval=0.1, stale_after=1.0, clock=trio.current_time)
    vcaplog.set_level(logging.INFO, logger="connmgr.redo")
    healthy = []
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run, primary.connect)
        await trio.sleep_until(4.95)
        primary.down = True  # the sample due at 5.0 fails; the reconnects at 6, 7, 8 too
        last = monitor.updated_at
        assert last == pytest.approx(4.9)
        await trio.sleep_until(last + 1.0 - 1e-6)
        healthy.append(monitor.healthy)
        await trio.sleep_until(last + 1.0)
        healthy.append(monitor.healthy)
        await trio.sleep_until(8.5)
        healthy.append(monitor.healthy)
        primary.down = False  # the reconnect at 9.0 works
        await trio.sleep_until(9.05)
        healthy.append(monitor.healthy)
        nursery.cancel_scope.cancel()

    assert healthy == [True, False, False, True]
    assert monitor.errors == 4  # the sample at 5.0, the connects at 6, 7 and 8
    assert primary.opens == pytest.approx([0.0, 6.0, 7.0, 8.0, 9.0])
    assert primary.closes[0] == pytest.approx(5.0)  # the broken session is closed at once
    assert monitor.lsn == 0x1000 + 9000
    assert [(r.vtime, r.levelname, r.getMessage()) for r in vcaplog.records] == [
        (
            pytest.approx(5.0),
            "WARNING",
            "redo monitor: server closed the connection; retrying every 1 s",
        ),
        (pytest.approx(9.0), "INFO", "redo monitor: sampling again after 4 failed attempt(s)"),
    ]


async def test_retarget_drops_the_session_and_reconnects_at_once(autojump_clock, vcaplog):
    old, new = FakePrimary(0x9_0000_0000), FakePrimary(0x2_0000_0000)
    primaries = [old]

    async def connect() -> FakeSession:
        return await primaries[-1].connect()

    monitor = RedoMonitor(interval=0.5, clock=trio.current_time)
    vcaplog.set_level(logging.INFO, logger="connmgr.redo")
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run, connect)
        await trio.sleep_until(3.25)
        assert monitor.lsn == 0x9_0000_0000 + 3000
        primaries.append(new)  # the failover happened
        monitor.retarget()
        assert monitor.lsn == 0  # at once: the old server's positions mean nothing now
        await trio.sleep_until(3.5)
        # the new primary's position is lower than the old one's, and it is published
        assert monitor.lsn == 0x2_0000_0000 + 3250

        # a retarget during a back-off ends the back-off too
        new.down = True
        await trio.sleep_until(4.0)  # the sample due at 3.75 failed: back-off until 4.75
        primaries.append(FakePrimary(0x4_0000_0000))
        monitor.retarget()
        await trio.sleep_until(4.1)
        nursery.cancel_scope.cancel()

    assert old.opens == [0.0] and old.closes == [pytest.approx(3.25)]
    assert new.opens == [pytest.approx(3.25)] and new.closes == [pytest.approx(3.75)]
    assert primaries[-1].opens == [pytest.approx(4.0)]
    assert monitor.lsn == 0x4_0000_0000 + 4000
    assert monitor.errors == 1
    assert [(r.levelname, r.getMessage()) for r in vcaplog.records] == [
        ("WARNING", "redo monitor: server closed the connection; retrying every 1 s"),
        ("INFO", "redo monitor: sampling again after 1 failed attempt(s)"),
    ]


async def test_no_sample_yet_is_not_healthy_whatever_the_clock_reads(autojump_clock):
    """A clock that starts near zero (MockClock; CLOCK_MONOTONIC on a fresh boot) must not
    make a monitor that never sampled look healthy."""
    monitor = RedoMonitor(interval=0.25, clock=trio.current_time)
    assert trio.current_time() < monitor.stale_after and not monitor.healthy
    monitor.publish(5)
    assert monitor.healthy
