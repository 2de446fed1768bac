"""connmgr/host/leader.py on a virtual clock, against an in-memory stand-in for etcd that
expires leases the way etcd does (TTL counted from when it processes a keepalive). The
real etcd is in tests/integration/test_etcd_leader.py; here the timing properties are
checked exhaustively: at no instant may two connmgrs serve."""

from __future__ import annotations

import pytest
import trio

pytest.importorskip("httpx", reason="the [net] extra (httpx) is not installed")

from connmgr.host.etcd import EtcdUnavailable, KeyValue  # noqa: E402
from connmgr.host.leader import Leader  # noqa: E402


class Store:
    """etcd's semantics for one key and its leases, on trio's clock."""

    def __init__(self) -> None:
        self.revision = 1
        self.leases: dict[int, float] = {}  # id -> expiry
        self.ttl: dict[int, int] = {}
        self.key: KeyValue | None = None
        self.next_id = 100

    def expire(self) -> None:
        now = trio.current_time()
        for lid, until in list(self.leases.items()):
            if now >= until:
                del self.leases[lid]
                if self.key is not None and self.key.lease == lid:
                    self.key = None
                    self.revision += 1


class View:
    """One connmgr's connection to the store: ``cut`` makes every call hang until the
    attempt times out; ``delay`` delays answers (the request is processed on arrival)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.endpoints = ["http://fake:2379"]
        self.attempt_timeout = 0.5
        self.cut = False
        self.delay = 0.0

    async def _reach(self) -> None:
        await trio.sleep(0.001)
        if self.cut:
            await trio.sleep(self.attempt_timeout)
            raise EtcdUnavailable("cut off")
        self.store.expire()

    async def _answer(self) -> None:
        if self.delay:
            await trio.sleep(self.delay)

    async def grant(self, ttl):
        await self._reach()
        s = self.store
        s.next_id += 1
        s.leases[s.next_id] = trio.current_time() + ttl
        s.ttl[s.next_id] = ttl
        await self._answer()
        return s.next_id, ttl

    async def keepalive(self, lease_id):
        await self._reach()
        s = self.store
        if lease_id not in s.leases:
            await self._answer()
            return 0
        s.leases[lease_id] = trio.current_time() + s.ttl[lease_id]
        await self._answer()
        return s.ttl[lease_id]

    async def revoke(self, lease_id):
        await self._reach()
        s = self.store
        s.leases.pop(lease_id, None)
        if s.key is not None and s.key.lease == lease_id:
            s.key = None
            s.revision += 1

    async def create(self, key, value, lease_id):
        await self._reach()
        s = self.store
        if s.key is not None:
            await self._answer()
            return False, s.revision, s.key
        if lease_id not in s.leases:
            from connmgr.host.etcd import EtcdError

            raise EtcdError("etcdserver: requested lease not found")
        s.revision += 1
        s.key = KeyValue(key, value, s.revision, s.revision, lease_id)
        await self._answer()
        return True, s.revision, None

    async def get(self, key):
        await self._reach()
        return self.store.key

    async def holds(self, key, value, create_revision):
        await self._reach()
        k = self.store.key
        return k is not None and k.value == value and k.create_revision == create_revision

    async def delete_if(self, key, create_revision):
        await self._reach()
        s = self.store
        if s.key is not None and s.key.create_revision == create_revision:
            s.key = None
            s.revision += 1
            return True
        return False


class Node:
    def __init__(self, store: Store, name: str, **kw) -> None:
        self.view = View(store)
        self.leader = Leader(self.view, "/connmgr/leader", name, **kw)
        self.events: list[tuple[float, str]] = []
        self.leader.on_elected = lambda token: self.events.append((trio.current_time(), f"elected {token}"))
        self.leader.on_step_down = lambda why: self.events.append((trio.current_time(), f"stepped down: {why}"))


async def sample(nodes, until: float, overlaps: list, every: float = 0.01) -> None:
    """Every ``every`` seconds: which nodes believe they may serve."""
    while trio.current_time() < until:
        serving = [n.leader.name for n in nodes if n.leader.may_serve()]
        if len(serving) > 1:
            overlaps.append((trio.current_time(), serving))
        await trio.sleep(every)


async def test_exactly_one_of_two_wins_and_keeps_it(autojump_clock):
    store = Store()
    a, b = Node(store, "a"), Node(store, "b")
    async with trio.open_nursery() as n:
        await n.start(a.leader.run)
        await n.start(b.leader.run)
        await trio.sleep(10)
        winners = [x for x in (a, b) if x.leader.may_serve()]
        assert len(winners) == 1
        assert [e for _, e in winners[0].events] == [f"elected {store.key.create_revision}"]
        assert await winners[0].leader.check()
        n.cancel_scope.cancel()


@pytest.mark.parametrize("fault", ["cut off", "answers stall", "keeper dead"])
async def test_a_leader_that_cannot_renew_steps_down_before_anyone_else_can_win(autojump_clock, fault):
    store = Store()
    a = Node(store, "a")
    b = Node(store, "b")
    overlaps: list = []
    async with trio.open_nursery() as n:
        await n.start(a.leader.run)
        await trio.sleep(1)
        await n.start(b.leader.run)
        n.start_soon(sample, [a, b], trio.current_time() + 15, overlaps)
        await trio.sleep(2)
        assert a.leader.may_serve() and not b.leader.may_serve()
        t_fault = trio.current_time()
        if fault == "cut off":
            a.view.cut = True
        elif fault == "answers stall":
            a.view.delay = 30.0  # processed, but the answers never come back in time
        else:
            a.view.cut = True
            a.view.attempt_timeout = 1000.0  # the keeper hangs in a call
        await trio.sleep(10)
        stepped = [t for t, e in a.events if e.startswith("stepped down")]
        elected_b = [t for t, e in b.events if e.startswith("elected")]
        assert stepped and elected_b, (a.events, b.events)
        assert stepped[0] < elected_b[0], "b won while a still served"
        assert stepped[0] - t_fault <= 2.0 - 0.5 + 0.01  # TTL - margin after the last renewal
        assert b.leader.may_serve() and not a.leader.may_serve()
        assert not await a.leader.check()
        n.cancel_scope.cancel()
    assert overlaps == []


async def test_the_old_leader_does_not_win_back_on_a_late_renewal(autojump_clock):
    store = Store()
    a, b = Node(store, "a"), Node(store, "b")
    async with trio.open_nursery() as n:
        await n.start(a.leader.run)
        await trio.sleep(1)
        await n.start(b.leader.run)
        a.view.cut = True
        await trio.sleep(5)
        a.view.cut = False  # a hears etcd again: b holds the key, a stays a follower
        await trio.sleep(5)
        assert b.leader.may_serve() and not a.leader.may_serve()
        assert a.leader.holder is not None and a.leader.holder.value == "b"
        assert a.leader.lease.terms == 1 and b.leader.lease.terms == 1
        n.cancel_scope.cancel()


async def test_resign_hands_over_at_once_and_campaign_off_never_wins(autojump_clock):
    store = Store()
    a = Node(store, "a")
    b = Node(store, "b")
    c = Node(store, "c", campaign=False)
    async with trio.open_nursery() as n:
        await n.start(a.leader.run)
        await trio.sleep(1)
        await n.start(b.leader.run)
        await n.start(c.leader.run)
        await trio.sleep(1)
        t = trio.current_time()
        await a.leader.resign("switchover")
        await trio.sleep(1)
        elected_b = [tt for tt, e in b.events if e.startswith("elected")]
        assert elected_b and elected_b[0] - t < 0.5, "b waited for the lease to expire"
        assert c.events == [] and not c.leader.may_serve()
        assert c.leader.holder is not None and c.leader.holder.value == "b"  # it watches
        n.cancel_scope.cancel()


async def test_the_renew_interval_must_fit_in_the_lease(autojump_clock):
    with pytest.raises(ValueError, match="renew_interval"):
        Leader(View(Store()), "/k", "a", ttl=2.0, margin=0.5, renew_interval=1.5)


async def test_a_create_whose_answer_was_lost_is_recognised_as_ours(autojump_clock):
    """The create transaction succeeds but its answer is lost (the client times out and
    asks another member): the next attempt finds the key held by this connmgr's own lease
    and leads on it, instead of waiting for ever behind itself (found in the lab under
    load: nobody led, the key held by the follower's own lease, which it kept renewing)."""
    store = Store()
    b = Node(store, "b")
    real_create = b.view.create
    lost = []

    async def create(key, value, lease_id):
        answer = await real_create(key, value, lease_id)
        if not lost:
            lost.append(answer)
            raise EtcdUnavailable("answer lost")
        return answer

    b.view.create = create
    async with trio.open_nursery() as n:
        await n.start(b.leader.run)
        await trio.sleep(2)
        assert lost and lost[0][0], "the first create did succeed"
        assert b.leader.may_serve(), b.events
        assert b.leader.token == store.key.create_revision and store.key.lease == b.leader.lease.lease_id
        n.cancel_scope.cancel()
