"""The failover of ``[server] workers``, built in one process: the coordinator's Failover
and two workers' Failovers, wired to each other's handlers as the control channel would
(inline ops called at once, in order; the others awaited), with a real shared freeze flag.

What must hold: one suspicion freezes every worker (the flag reaches a worker before any
message does) and makes one decision; each worker follows the coordinator's phases
(false alarm, failed decision, move, re-seed, re-arm); a worker that joins after a move
takes its phase.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from connmgr.config import FailoverSection
from connmgr.failover.controller import Failover
from connmgr.failover.fleet import Coordinator, FreezeFlag, Member
from connmgr.failover.phases import FailoverEvent, FailoverPhase
from connmgr.metrics import Metrics
from connmgr.pg.backend import BackendServer, Route
from connmgr.proxy.registry import Registry

P = FailoverPhase


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Session:
    def close(self) -> None:
        pass


class Fleet:
    """A coordinator and ``n`` members; ``probes`` counts the coordinator's probes."""

    def __init__(self, n: int = 2, *, primary_answers: bool = True) -> None:
        self.flag = FreezeFlag.create()
        self.probes = 0
        self.port = _closed_port()
        self.secondary = f"127.0.0.1:{_closed_port()}"
        self.config = FailoverSection(secondary=self.secondary, detect_timeout=0.3, max_wait=5.0)

        async def open_primary(_purpose: str):
            self.probes += 1
            if not primary_answers:
                raise OSError("connection refused")
            return _Session()

        self.coordinator = Coordinator(self._send, self._call, lambda _ready: list(range(n)), self.flag)
        self.fleet = Failover(self.config, self._route(), (), open_primary=open_primary, origin=0,
                              members=self.coordinator)  # fmt: skip
        self.members = [self._member(i) for i in range(n)]

    def _route(self) -> Route:
        return Route(BackendServer("primary", "127.0.0.1", self.port, connect_timeout=1.0))

    def _member(self, index: int) -> Failover:
        coordinator = self.coordinator

        async def call(op: str, **args: Any) -> dict[str, Any]:
            frame = {"op": op, **args}
            inline = coordinator.inline_handlers()
            if op in inline:
                return inline[op](frame) or {}
            return await coordinator.handlers()[op](frame) or {}

        def tell(op: str, **args: Any) -> None:
            coordinator.inline_handlers()[op]({"op": op, **args})

        async def open_primary(_purpose: str):
            raise AssertionError("a worker never probes: the coordinator decides")

        member = Member(call, tell, FreezeFlag(self.flag.fd))
        return Failover(self.config, self._route(), Registry(Metrics()), open_primary=open_primary,
                        origin=index + 1, coordinator=member)  # fmt: skip

    async def _send(self, index: int, frame: dict[str, Any]) -> None:
        self.members[index].coordinator.inline_handlers()[frame["op"]](frame)

    async def _call(self, index: int, op: str, within: float, /, **args: Any) -> dict[str, Any]:
        member = self.members[index].coordinator
        frame = {"op": op, **args}
        if op in member.inline_handlers():
            return member.inline_handlers()[op](frame) or {}
        return await member.handlers()[op](frame) or {}

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.coordinator.run)
        await nursery.start(self.fleet.run)
        for m in self.members:
            await nursery.start(m.run)


@pytest.fixture
def fleet_of():
    made: list[Fleet] = []

    def make(**kw) -> Fleet:
        made.append(Fleet(**kw))
        return made[-1]

    yield make
    for f in made:
        f.flag.close()


async def test_one_suspicion_freezes_every_worker_and_a_live_primary_thaws_them(fleet_of, autojump_clock):
    f = fleet_of()
    a, b = f.members
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        a.freeze(a.route.server, "client 1: server closed the connection")
        assert (a.phase, a.frozen, f.flag.is_set) == (P.DECIDING, a.route.server, True)
        # worker b has had no message yet: its relays find the flag and freeze it at once
        assert b.phase is P.ARMED and b.fleet_flag.is_set
        assert b.frozen_by_fleet() is b.route.server and b.phase is P.DECIDING
        assert await b.decide("client 2: the same") is False  # waits for the coordinator's decision
        assert [m.phase for m in (f.fleet, a, b)] == [P.ARMED] * 3
        assert (a.false_alarms, b.false_alarms, f.fleet.false_alarms) == (1, 1, 1)
        assert (a.frozen, b.frozen, f.flag.is_set) == (None, None, False)
        assert f.probes == 1  # one decision for both workers
        nursery.cancel_scope.cancel()


async def test_a_decision_that_fails_leaves_every_worker_armed_with_the_reason(fleet_of, autojump_clock):
    f = fleet_of(primary_answers=False)  # the primary is gone, and the secondary cannot be reached
    a, b = f.members
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        assert await a.decide("client 1: lost connection") is False
        await f.coordinator.sent()
        assert [m.phase for m in (f.fleet, a, b)] == [P.ARMED] * 3
        assert a.failed and a.failed == b.failed == f.fleet.failed
        assert "cannot take over" in " ".join(w for _t, w in f.fleet.timeline)
        assert not f.flag.is_set and f.probes == 1
        nursery.cancel_scope.cancel()


async def test_a_worker_follows_a_move_a_reseed_and_a_rearm(fleet_of, autojump_clock):
    f = fleet_of()
    a = f.members[0]
    old, secondary = a.route.server, a.server
    a.follow(FailoverEvent.SUSPECT, {"why": "another worker"})
    assert a.phase is P.DECIDING and a.frozen is old
    deciding = a._deciding
    a.follow(FailoverEvent.SUSPECT, {"why": "again"})  # anticipated: nothing changes
    assert a._deciding is deciding and a.freezes == 1
    a.follow(FailoverEvent.MOVED, {"committers": [5, 7], "planned": False})
    assert (a.phase, a.route.server, a.previous) == (P.MOVED, secondary, old)
    assert deciding.is_set() and a.order.committers == set()  # neither 5 nor 7 is this worker's
    a.follow(FailoverEvent.ALIVE, {})  # not an event of MOVED: logged, ignored
    assert a.phase is P.MOVED
    a.follow(FailoverEvent.RESEED, {})
    a.follow(FailoverEvent.REARMED, {"copy": True})
    assert (a.phase, a.server, a.previous, a.reseeds, a.reseed_copies) == (P.ARMED, old, None, 1, 1)


async def test_a_worker_started_after_a_move_takes_its_phase(fleet_of, autojump_clock):
    f = fleet_of()
    a = f.members[0]
    a.adopt({"phase": "moved", "previous": ["127.0.0.1", 5999]})
    assert a.phase is P.MOVED and a.failed_over and a.previous.address.endswith("5999")
    a.follow(FailoverEvent.RESEED, {})
    a.follow(FailoverEvent.REARMED, {"copy": False})
    assert a.phase is P.ARMED and a.server.port == 5999


async def test_the_flag_is_set_by_a_decision_and_cleared_before_its_end_is_sent(fleet_of, autojump_clock):
    f = fleet_of()
    c = f.coordinator
    for event, flag in [(FailoverEvent.SUSPECT, True), (FailoverEvent.ALIVE, False), (FailoverEvent.SUSPECT, True),
                        (FailoverEvent.MOVED, True), (FailoverEvent.RESEED, True), (FailoverEvent.REARMED, False)]:  # fmt: skip
        c.fired(event, {})
        assert f.flag.is_set is flag, event
    assert [frame["event"] for frame in c._outbox] == ["suspect", "alive", "suspect", "moved", "reseed", "rearmed"]


async def test_a_flag_left_by_a_worker_that_died_still_gets_a_decision(fleet_of, autojump_clock):
    """The worker that set the flag died before it told the coordinator: the first other
    worker that finds the flag tells it, so the freeze ends with a decision."""
    f = fleet_of()
    _a, b = f.members
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        f.flag.set()  # (and nothing else: its worker is gone)
        assert b.frozen_by_fleet() is b.route.server
        assert await b.decide("client 9: waiting for the outcome") is False
        assert (b.phase, b.frozen, f.flag.is_set, f.probes) == (P.ARMED, None, False, 1)
        nursery.cancel_scope.cancel()


async def test_sent_waits_for_every_event_fired_before_and_while_it_waits(fleet_of, autojump_clock):
    f = fleet_of()
    c = f.coordinator
    c.fired(FailoverEvent.SUSPECT, {"why": "test"})
    woke = []

    async def wait_sent() -> None:
        await c.sent()
        woke.append(len(c._outbox))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_sent)
        await trio.sleep(0.1)  # the waiter waits; no sender runs yet
        c.fired(FailoverEvent.ALIVE, {})
        await nursery.start(c.run)
        with trio.fail_after(5):
            while not woke:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert woke == [0] and [m.phase for m in f.members] == [P.ARMED, P.ARMED]
    assert [m.false_alarms for m in f.members] == [1, 1]
