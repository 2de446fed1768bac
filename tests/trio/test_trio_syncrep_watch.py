"""connmgr/pair/syncrep_watch.py on a virtual clock, against a fake primary whose
``pg_stat_activity`` says how long each commit has waited: the WARNING comes at the first
look after a commit has waited ``after`` (3) seconds, once per episode, the INFO when the
episode ends, and a broken session is closed and reopened at the next look."""

from __future__ import annotations

import logging

import pytest
import trio

from connmgr.pair.syncrep_watch import SyncRepWatch

pytestmark = pytest.mark.trio


class FakePrimary:
    """What the watch sees of a primary: commits waiting in SyncRep from ``start`` to
    ``end`` (virtual seconds); ``down`` refuses new sessions, ``broken`` fails queries."""

    def __init__(
        self, waits: list[tuple[float, float]], *, replication: bytes | None = None
    ) -> None:
        self.waits = waits
        self.replication = replication
        self.down = False
        self.broken = False
        self.opens: list[float] = []
        self.closes: list[float] = []
        self.looks: list[float] = []
        self.queries: list[bytes] = []

    async def open_session(self) -> FakeSession:
        self.opens.append(trio.current_time())
        if self.down:
            raise ConnectionRefusedError("connection refused")
        return FakeSession(self)


class FakeSession:
    def __init__(self, primary: FakePrimary) -> None:
        self.primary = primary
        self.closed = False

    async def query_rows(self, query: bytes) -> list[tuple]:
        p = self.primary
        assert not self.closed
        p.queries.append(query)
        if p.broken:
            raise ConnectionResetError("server closed the connection")
        now = trio.current_time()
        p.looks.append(now)
        ages = [now - start for start, end in p.waits if start <= now < end]
        longest = max(ages, default=0.0)
        return [(str(len(ages)).encode(), repr(longest).encode(), b"secondary", p.replication)]

    def close(self) -> None:
        self.closed = True
        self.primary.closes.append(trio.current_time())


def syncrep_lines(caplog) -> list[tuple[float, str, str]]:
    return [
        (r.vtime, r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "connmgr.syncrep"
    ]


async def test_a_long_syncrep_wait_is_reported_once_after_3_s_and_its_end_once(
    autojump_clock, vcaplog
):
    # a commit waits from 10.5 to 20.5; a short one (2.5 s) at 30.5 is not worth a line;
    # a second long one (40.5 to 45.5, two commits) is a second episode
    primary = FakePrimary([(10.5, 20.5), (30.5, 33.0), (40.5, 45.5), (41.5, 45.5)])
    watch = SyncRepWatch(primary.open_session, interval=1.0, after=3.0)
    vcaplog.set_level(logging.INFO, logger="connmgr.syncrep")
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        await trio.sleep(50.5)
        nursery.cancel_scope.cancel()

    assert primary.looks == [pytest.approx(float(t)) for t in range(51)]  # one look a second
    assert primary.opens == [0.0] and primary.closes == []  # one session for the whole run
    assert b"wait_event = 'SyncRep'" in primary.queries[0]
    cause = ("no standby is connected (synchronous_standby_names = 'secondary'): the secondary's"
             " subscription is down or disabled")  # fmt: skip
    assert syncrep_lines(vcaplog) == [
        # the first look at which the commit had waited >= 3 s: 14.0 (waited 3.5 s)
        (pytest.approx(14.0), "WARNING",
         f"1 commit(s) have waited for the synchronous standby for up to 3.5 s: {cause}"),
        (pytest.approx(21.0), "INFO", "no commit waits for the synchronous standby any more"),
        (pytest.approx(44.0), "WARNING",
         f"2 commit(s) have waited for the synchronous standby for up to 3.5 s: {cause}"),
        (pytest.approx(46.0), "INFO", "no commit waits for the synchronous standby any more"),
    ]  # fmt: skip
    assert watch.episodes == 2
    assert (watch.waiting, watch.longest) == (0, 0.0)


async def test_the_figures_follow_each_look_and_name_the_likely_cause(autojump_clock, vcaplog):
    primary = FakePrimary([(0.5, 100.0)], replication=b"secondary sync")
    watch = SyncRepWatch(primary.open_session, interval=0.5, after=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        await trio.sleep(2.75)
        assert (watch.waiting, watch.longest, watch.episodes) == (1, pytest.approx(2.0), 0)
        await trio.sleep(1.0)
        assert (watch.waiting, watch.longest, watch.episodes) == (1, pytest.approx(3.0), 1)
        nursery.cancel_scope.cancel()
    [(vtime, level, message)] = syncrep_lines(vcaplog)
    assert (vtime, level) == (pytest.approx(3.5), "WARNING")
    assert "for up to 3.0 s: the secondary's apply worker does not apply" in message


async def test_an_async_only_standby_is_named_as_the_cause(autojump_clock, vcaplog):
    primary = FakePrimary([(0.5, 100.0)], replication=b"secondary async")
    watch = SyncRepWatch(primary.open_session, interval=0.5, after=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        await trio.sleep(3.75)
        nursery.cancel_scope.cancel()
    [(_vtime, _level, message)] = syncrep_lines(vcaplog)
    assert message.endswith(
        "for up to 3.0 s: no connected standby is synchronous (secondary async)"
    )


async def test_a_broken_session_is_closed_and_reopened_at_the_next_look(autojump_clock, vcaplog):
    primary = FakePrimary([(0.5, 100.0)])
    watch = SyncRepWatch(primary.open_session, interval=1.0, after=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        await trio.sleep_until(1.5)
        primary.broken = True  # the look at 2.0 fails: the session is closed
        await trio.sleep_until(2.5)
        primary.broken = False
        primary.down = True  # 3.0, 4.0: no session to be had
        await trio.sleep_until(4.5)
        primary.down = False  # 5.0: a new session, the watch goes on
        await trio.sleep_until(6.5)
        nursery.cancel_scope.cancel()
    assert primary.opens == pytest.approx([0.0, 3.0, 4.0, 5.0])
    assert primary.closes == pytest.approx([2.0])
    assert primary.looks == pytest.approx([0.0, 1.0, 5.0, 6.0])
    # the wait started at 0.5 is reported at the first successful look past 3.5 s
    [(vtime, level, _message)] = syncrep_lines(vcaplog)
    assert (vtime, level, watch.episodes) == (pytest.approx(5.0), "WARNING", 1)
