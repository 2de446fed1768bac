"""connmgr/pg/reconnect.py: one WARNING per outage, one INFO at the recovery, and a restart
that ends a back-off at once."""

from __future__ import annotations

import logging

import trio

from connmgr.pg.reconnect import Outage


def test_one_warning_per_outage_and_the_recovery_counts_the_failures(caplog):
    log = logging.getLogger("test.outage")
    outage = Outage(log, "poster queue", retrying="reopening every 1 s")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.success()  # nothing failed: nothing to say
        for reason in ("refused", "refused", "timed out"):
            outage.failure(reason)
        outage.success()
        outage.failure("refused")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "poster queue: refused; reopening every 1 s"),
        ("INFO", "poster queue: connected again after 3 failed attempt(s)"),
        ("WARNING", "poster queue: refused; reopening every 1 s"),
    ]
    assert outage.failed == 1


async def test_restart_ends_the_back_off_and_the_attempt():
    outage = Outage(logging.getLogger("test.outage"), "redo monitor", backoff=30.0)
    with trio.fail_after(2):  # the 30 s back-off must end at the restart
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage.back_off)
            await trio.sleep(0.01)
            outage.restart()
    with outage.attempt() as scope:
        outage.restart()
        await trio.sleep(30)
    assert scope.cancelled_caught
