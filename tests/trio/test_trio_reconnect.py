"""connmgr/pg/reconnect.py on a virtual clock: the back-off lasts exactly ``backoff``,
``restart()`` ends a back-off or an attempt at that instant, and a retry loop says one
WARNING per outage and one INFO at the recovery."""

from __future__ import annotations

import logging

import pytest
import trio

from connmgr.pg.reconnect import Outage

pytestmark = pytest.mark.trio

log = logging.getLogger("test.trio.outage")


async def test_back_off_sleeps_exactly_backoff_virtual_seconds(autojump_clock):
    outage = Outage(log, "poster queue", backoff=2.5)
    for _ in range(3):
        t0 = trio.current_time()
        await outage.back_off()
        assert trio.current_time() - t0 == pytest.approx(2.5, abs=1e-9)
    assert trio.current_time() == pytest.approx(7.5, abs=1e-9)


async def test_restart_ends_a_back_off_at_once(autojump_clock):
    outage = Outage(log, "redo monitor", backoff=30.0)
    ended = []

    async def backing_off():
        await outage.back_off()
        ended.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(backing_off)
        await trio.sleep(4.0)
        assert ended == []  # still backing off 4 s into a 30 s back-off
        outage.restart()
    assert ended == [pytest.approx(4.0, abs=1e-9)]

    # the restart was used up: the next back-off is a full one again
    await outage.back_off()
    assert trio.current_time() == pytest.approx(34.0, abs=1e-9)


async def test_restart_ends_an_attempt_at_once_and_says_so(autojump_clock):
    outage = Outage(log, "redo monitor")

    async def restart_at(t: float) -> None:
        await trio.sleep_until(t)
        outage.restart()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(restart_at, 7.0)
        with outage.attempt() as scope:
            await trio.sleep(3600)  # one connection's life, until the restart
    assert scope.cancelled_caught
    assert trio.current_time() == pytest.approx(7.0, abs=1e-9)

    # an attempt that ends by itself is not cancelled, and a restart after it is a no-op
    with outage.attempt() as scope:
        await trio.sleep(1.0)
    outage.restart()
    assert not scope.cancelled_caught
    assert trio.current_time() == pytest.approx(8.0, abs=1e-9)


async def test_a_retry_loop_logs_one_warning_per_outage_and_counts_on_recovery(
    autojump_clock, caplog
):
    """The loop every user of Outage runs: attempt, fail, back off. Three refusals, a
    success, later one more refusal and a success: two WARNINGs, two INFOs, and the
    time spent is exactly the back-offs."""
    outage = Outage(
        log, "sequence sync", retrying="retrying every 1 s", again="syncing again", backoff=1.0
    )
    script = iter(["refused", "refused", "timed out", None, "refused", None])
    connected_at = []

    async def connect() -> None:
        reason = next(script)
        if reason is not None:
            raise ConnectionRefusedError(reason)

    caplog.set_level(logging.INFO, logger=log.name)
    while len(connected_at) < 2:
        try:
            with outage.attempt():
                await connect()
                outage.success()
                connected_at.append(trio.current_time())
                continue
        except ConnectionRefusedError as e:
            outage.failure(e)
        await outage.back_off()

    assert connected_at == [pytest.approx(3.0, abs=1e-9), pytest.approx(4.0, abs=1e-9)]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "sequence sync: refused; retrying every 1 s"),
        ("INFO", "sequence sync: syncing again after 3 failed attempt(s)"),
        ("WARNING", "sequence sync: refused; retrying every 1 s"),
        ("INFO", "sequence sync: syncing again after 1 failed attempt(s)"),
    ]
    assert outage.failed == 0
