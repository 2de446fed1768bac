"""The failover controller built alone: a Route, an empty Registry and openers, no proxy.

The decision's timing runs on trio's autojump clock: the probe's ``detect_timeout``, the
switchover's drain. The secondary is a loopback port nobody listens on, so the point of
failure and the fence fail at once (connection refused), as they would against a dead
secondary.
"""

from __future__ import annotations

import socket

import pytest
import trio

from connmgr.config import FailoverSection
from connmgr.failover.controller import Failover, FailoverError
from connmgr.failover.phases import FailoverPhase
from connmgr.metrics import Metrics
from connmgr.pg.backend import BackendServer, Route
from connmgr.proxy.registry import Registry


def _closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Session:
    closed = False

    def close(self) -> None:
        self.closed = True


def _failover(open_primary, **config) -> tuple[Failover, Route]:
    secondary = f"127.0.0.1:{_closed_port()}"
    route = Route(BackendServer("primary", "127.0.0.1", _closed_port(), connect_timeout=1.0))
    cfg = FailoverSection(secondary=secondary, **{"detect_timeout": 0.3, "max_wait": 5.0, **config})
    return Failover(cfg, route, Registry(Metrics()), open_primary=open_primary, origin=1), route


async def test_a_primary_that_answers_the_probe_is_a_false_alarm(autojump_clock):
    opened = []

    async def open_primary(purpose: str):
        opened.append(purpose)
        return _Session()

    fo, route = _failover(open_primary)
    primary = route.server
    async with trio.open_nursery() as nursery:
        await nursery.start(fo.run)
        fo.freeze(primary, "client 1: server closed the connection")
        assert (fo.phase, fo.frozen, fo.freezes) == (FailoverPhase.DECIDING, primary, 1)
        assert await fo.decide("client 2: the same") is False  # shares the running decision
        nursery.cancel_scope.cancel()
    assert opened == ["connmgr failover probe"]
    assert (fo.phase, fo.frozen, fo.decisions, fo.false_alarms) == (FailoverPhase.ARMED, None, 1, 1)
    assert route.server is primary
    assert [what for _t, what in fo.timeline][-1] == "primary answers: no failover"


async def test_a_silent_primary_is_given_up_after_detect_timeout_and_a_dead_secondary_fails_the_move(autojump_clock):
    async def open_primary(purpose: str):
        await trio.sleep_forever()  # a host that drops packets: no answer, no refusal

    fo, route = _failover(open_primary)
    primary = route.server
    async with trio.open_nursery() as nursery:
        await nursery.start(fo.run)
        start = trio.current_time()
        assert await fo.decide("the redo monitor has had no answer") is False
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert took == pytest.approx(0.3, abs=0.05)  # detect_timeout, then a refused connection
    assert fo.phase is FailoverPhase.ARMED and route.server is primary and fo.frozen is None
    assert fo.failed is not None and "secondary" in fo.failed
    notes = [what for _t, what in fo.timeline]
    assert "probe: no answer within 0.3s" in notes
    assert notes[-1].startswith("FAILED: the secondary cannot take over")


async def test_a_switchover_whose_fence_fails_is_abandoned_and_arms_again(autojump_clock):
    async def open_primary(purpose: str):
        raise OSError(111, "Connection refused")

    fo, route = _failover(open_primary)
    async with trio.open_nursery() as nursery:
        await nursery.start(fo.run)
        with pytest.raises(FailoverError, match="switchover|connect|refused|secondary"):
            await fo.switchover(1.0)
        assert fo.phase is FailoverPhase.ARMED and not fo.switching
        # armed again: a second switchover is taken (and fails the same way)
        with pytest.raises(FailoverError):
            await fo.switchover(1.0)
        nursery.cancel_scope.cancel()
    assert (fo.switchovers, fo.switchovers_abandoned, fo.decisions) == (0, 2, 0)
    assert any("switchover abandoned" in what for _t, what in fo.timeline)


async def test_a_decision_cut_short_arms_again_and_releases_the_held_replies(autojump_clock):
    async def open_primary(purpose: str):
        await trio.sleep_forever()

    fo, route = _failover(open_primary, detect_timeout=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(fo.run)
        with trio.move_on_after(1.0):  # a session's max_wait around its decide()
            await fo.decide("client 1: lost")
        assert fo.phase is FailoverPhase.ARMED and fo.frozen is None
        assert await fo.frozen_outcome() is False  # the pumps that held replies deliver them
        nursery.cancel_scope.cancel()
