"""The leader lease against a real etcd (Debian's etcd-server, one member on loopback).
The partitions between hosts are in the host-failover lab's tests."""

from __future__ import annotations

import pytest
import trio

pytest.importorskip("httpx", reason="the [net] extra (httpx) is not installed")

from connmgr.embedded.etcd_cluster import EtcdCluster, etcd_binary  # noqa: E402
from connmgr.host.etcd import Etcd, EtcdUnavailable  # noqa: E402
from connmgr.host.leader import Leader  # noqa: E402

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (apt-get install etcd-server)")

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


@pytest.fixture(scope="module")
def etcd():
    with EtcdCluster.on_loopback() as cluster:
        yield cluster


async def test_create_if_absent_holds_and_the_key_dies_with_its_lease(etcd, request):
    key = f"/test/{request.node.name}"
    c = Etcd(etcd.endpoints)
    try:
        lid, ttl = await c.grant(5)
        assert ttl >= 5
        created, rev, holder = await c.create(key, "a", lid)
        assert created and holder is None
        lid2, _ = await c.grant(5)
        again, _, holder = await c.create(key, "b", lid2)
        assert not again and (holder.value, holder.create_revision, holder.lease) == ("a", rev, lid)
        assert await c.holds(key, "a", rev)
        assert not await c.holds(key, "b", rev) and not await c.holds(key, "a", rev + 1)
        assert await c.keepalive(lid) >= 4
        await c.revoke(lid)
        assert await c.get(key) is None and not await c.holds(key, "a", rev)
        assert await c.keepalive(lid) == 0
        await c.revoke(lid)  # gone already: not an error
        created, rev2, _ = await c.create(key, "b", lid2)
        assert created and rev2 > rev
        assert not await c.delete_if(key, rev) and await c.delete_if(key, rev2)
    finally:
        await c.aclose()


async def test_a_dead_member_is_skipped_and_none_alive_is_an_error(etcd):
    c = Etcd([DEAD, *etcd.endpoints])
    dead = Etcd([DEAD])
    try:
        lid, _ = await c.grant(3)
        assert c.failures == 1 and await c.keepalive(lid) > 0
        assert c.failures == 1, "the member that answered last is asked first"
        with pytest.raises(EtcdUnavailable, match="no etcd member answered lease/grant"):
            await dead.grant(3)
    finally:
        await c.aclose()
        await dead.aclose()


async def test_a_leader_cut_off_from_etcd_steps_down_before_the_other_wins(etcd, request):
    key = f"/test/{request.node.name}"
    clients = [Etcd(etcd.endpoints), Etcd(etcd.endpoints)]
    a = Leader(clients[0], key, "a", ttl=2.0, margin=0.5, renew_interval=0.5, retry_interval=0.1)
    b = Leader(clients[1], key, "b", ttl=2.0, margin=0.5, renew_interval=0.5, retry_interval=0.1)
    events: list[tuple[float, str]] = []
    a.on_elected = lambda tok: events.append((trio.current_time(), f"a elected {tok}"))
    a.on_step_down = lambda why: events.append((trio.current_time(), f"a stepped down: {why}"))
    b.on_elected = lambda tok: events.append((trio.current_time(), f"b elected {tok}"))
    overlaps = []
    try:
        async with trio.open_nursery() as n:
            await n.start(a.run)
            with trio.fail_after(5):
                while not a.may_serve():
                    await trio.sleep(0.05)
            token_a = a.token
            await n.start(b.run)
            await trio.sleep(1.5)
            assert not b.may_serve() and b.holder is not None and b.holder.value == "a"
            cut_at = trio.current_time()
            clients[0].endpoints = [DEAD]  # host A loses etcd
            with trio.fail_after(10):
                while not b.may_serve():
                    if a.may_serve() and b.may_serve():
                        overlaps.append(trio.current_time())
                    await trio.sleep(0.01)
            assert await b.check() and b.token > token_a
            assert not await a.check()
            n.cancel_scope.cancel()
    finally:
        for c in clients:
            await c.aclose()
    assert [" ".join(e.split()[:2]) for _, e in events] == ["a elected", "a stepped", "b elected"], events
    t_down = events[1][0]
    t_b = events[2][0]
    assert t_down - cut_at <= 2.0 - 0.5 + 0.1, "a steps down TTL - margin after its last renewal at most"
    assert t_b > t_down, events
    assert overlaps == []


async def test_a_host_that_comes_back_after_a_takeover_does_not_campaign(etcd, request):
    """The primary record: host A claims it at its first start; host B, elected, records
    itself before promoting; host A's connmgr restarted as the primary then finds host B
    named there and stays off the leader key (its database was left behind)."""
    from connmgr.config import HostSection
    from connmgr.host.takeover import HostRole

    key = f"/test/{request.node.name}"
    clients = [Etcd(etcd.endpoints) for _ in range(3)]

    def role(leader: Leader) -> HostRole:
        async def nothing() -> None:
            pass

        return HostRole(HostSection(vip="198.18.0.100/24", interface="lo", etcd=tuple(etcd.endpoints)), leader, imports=None,
                        promote=nothing, serve=lambda s: None, resume=lambda r: None,
                        connections=lambda: [])  # fmt: skip

    a = Leader(clients[0], key, "hosta", ttl=2, margin=0.5, renew_interval=0.5)
    b = Leader(clients[1], key, "hostb", ttl=2, margin=0.5, renew_interval=0.5)
    a_again = Leader(clients[2], key, "hosta", ttl=2, margin=0.5, renew_interval=0.5)
    try:
        first = role(a)
        assert a.campaign is False  # not before the record says so
        with trio.fail_after(5):
            await first._claim_primary()
        assert a.campaign is True and first.barred is None
        assert (await clients[0].get(a.primary_key)).value == "hosta"
        # host B wins the key (host A is gone) and records itself; a stale token cannot
        lid, _ = await clients[1].grant(5)
        created, token, _ = await clients[1].create(key, "hostb", lid)
        assert created
        assert not await b.record_primary(token + 1000)
        assert await b.record_primary(token)
        assert (await clients[1].get(b.primary_key)).value == "hostb"
        back = role(a_again)
        with trio.move_on_after(1.5):
            await back._claim_primary(recheck=0.5)
        assert a_again.campaign is False
        assert back.barred is not None and "hostb took over" in back.barred and "re-seed" in back.barred
        await clients[1].revoke(lid)
    finally:
        for c in clients:
            await c.aclose()


async def test_a_primary_elected_again_after_a_takeover_resigns(etcd, request):
    """A primary's connmgr that claimed the record at its start, lost the key (cut off),
    and wins it again after host B took over and died: it finds host B in the primary
    record before it adds the VIP, gives the key up and stops campaigning."""
    from connmgr.config import HostSection
    from connmgr.host.takeover import FencingLost, HostRole

    key = f"/test/{request.node.name}"
    c = Etcd(etcd.endpoints)
    a = Leader(c, key, "hosta", ttl=2, margin=0.5, renew_interval=0.5)

    async def nothing() -> None:
        pass

    # (on lo: were the check to regress, the takeover would go on and add the VIP there,
    # never on a real interface)
    role = HostRole(HostSection(vip="198.18.0.100/24", interface="lo", etcd=tuple(etcd.endpoints)), a, imports=None,
                    promote=nothing, serve=lambda s: None, resume=lambda r: None, connections=lambda: [])  # fmt: skip
    try:
        created, _rev, _ = await c.create(a.primary_key, "hostb", 0)  # host B took over meanwhile
        assert created
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            a.campaign = True  # as it was since its start, when the record named it
            with trio.fail_after(5):
                while a.token is None:
                    await trio.sleep(0.05)
            with pytest.raises(FencingLost, match="hostb took over"):
                await role._take_over(a.token, nursery)
            assert a.campaign is False and role.barred is not None
            assert await c.get(key) is None  # the key given up at once
            nursery.cancel_scope.cancel()
    finally:
        await c.aclose()
