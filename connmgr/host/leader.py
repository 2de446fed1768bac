"""Campaigning for the leader key, keeping it, and stepping down on time (trio side of
:mod:`replay.lease`).

:meth:`Leader.run` owns two tasks:

* the **keeper** keeps this connmgr's lease alive (a keepalive every ``renew_interval``)
  and, while not leading and allowed to campaign, tries every ``retry_interval`` to create
  the leader key with it (create-if-absent). Winning calls ``on_elected(token)``.
* the **fence** sleeps until the lease's ``valid_until`` (last acknowledged renewal's send
  time + TTL - margin) and, if no renewal moved it meanwhile, steps down: it calls
  ``on_step_down(reason)`` at once, whatever the keeper is stuck in. etcd itself cannot
  expire the key before ``margin`` seconds later, so no other connmgr can have won yet.

Beside the leader key, a lasting **primary record** (``<key>/primary``, no lease) names the
connmgr whose database is the primary. The first primary claims it; a secondary that takes
over writes its own name there (only while it holds the key) before it promotes its
database. A host that comes back after a takeover finds another name there and does not
campaign (:meth:`Leader.claim_primary`): its database was left behind, and leading on it
would serve without every commit made since.

A stepped-down leader forgets its lease (and revokes it if etcd answers), so a renewal
that comes back late cannot make it believe it leads again. :meth:`Leader.check` is the
fencing check (callers use it before the VIP is added, before ARP, before a commit):
the lease is valid by the local clock *and* etcd says the key is still the one this
connmgr created (a linearizable read).

All times are ``trio.current_time()`` (monotonic; a MockClock in the trio tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from connmgr.host.etcd import Etcd, EtcdError, KeyValue
from replay.lease import Lease, LeaseState

log = logging.getLogger("connmgr.leader")

__all__ = ["Leader"]


class Leader:
    """See the module docstring."""

    def __init__(self, etcd: Etcd, key: str, name: str, *, ttl: float = 2.0, margin: float = 0.5,
                 renew_interval: float = 0.5, retry_interval: float = 0.2, campaign: bool = True) -> None:  # fmt: skip
        if not 0 < renew_interval < ttl - margin:
            raise ValueError(f"renew_interval ({renew_interval:g} s) must be above 0 and below the TTL minus the"
                             f" safety margin ({ttl - margin:g} s), or the lease lapses between renewals")  # fmt: skip
        self.etcd = etcd
        self.key = key
        self.name = name
        self.lease = Lease(ttl=ttl, margin=margin)
        self.renew_interval = renew_interval
        self.retry_interval = retry_interval
        #: may this connmgr take the key when it is free? (a host that came back after a
        #: takeover may not, until it is re-seeded as the secondary)
        self.campaign = campaign
        self.on_elected: Callable[[int], None] | None = None
        self.on_step_down: Callable[[str], None] | None = None
        #: the key's holder as last seen (None: free or not known)
        self.holder: KeyValue | None = None
        self.etcd_errors = 0
        self._changed = trio.Event()
        #: leases given up on stepping down, revoked when etcd answers again
        self._stale: list[int] = []

    @property
    def primary_key(self) -> str:
        return f"{self.key}/primary"

    async def claim_primary(self) -> str:
        """This connmgr's database is the primary: record it if no primary is recorded
        yet. Returns the name recorded (another one: this connmgr must not lead).
        Raises EtcdError."""
        created, _rev, holder = await self.etcd.create(self.primary_key, self.name, 0)
        return self.name if created or holder is None else holder.value

    async def record_primary(self, token: int) -> bool:
        """Record this connmgr as the primary's (after a takeover), while it holds the key
        created at ``token``. Never raises; False if it could not."""
        with trio.move_on_after(self.etcd.attempt_timeout * len(self.etcd.endpoints)):
            try:
                return await self.etcd.put_if_held(self.primary_key, self.name, self.key, token)
            except EtcdError as e:
                log.warning("could not record this connmgr as the primary's: %s", e)
        return False

    @property
    def token(self) -> int | None:
        return self.lease.token

    def may_serve(self) -> bool:
        return self.lease.may_serve(trio.current_time())

    async def check(self) -> bool:
        """The fencing check: True only if the lease is valid now and etcd confirms the
        key is still ours. Never raises; False when etcd cannot say."""
        token = self.lease.token
        if token is None or not self.may_serve():
            return False
        with trio.move_on_after(self.etcd.attempt_timeout * len(self.etcd.endpoints)):
            try:
                return await self.etcd.holds(self.key, self.name, token) and self.lease.token == token and self.may_serve()
            except EtcdError as e:
                log.warning("fencing check of the leader key failed: %s", e)
        return False

    async def resign(self, reason: str = "resigned") -> None:
        """Give the key up now (a planned switchover): step down, then delete the key."""
        token = self.lease.token
        if self.lease.state is LeaseState.LEADER:
            old = self.lease.lease_id
            self.lease.resign(reason)
            self._stepped_down(reason, old)
        if token is not None:
            with trio.move_on_after(self.etcd.attempt_timeout * len(self.etcd.endpoints)):
                try:
                    await self.etcd.delete_if(self.key, token)
                except EtcdError as e:
                    log.warning("could not delete the leader key after resigning (it expires with the lease): %s", e)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the lease and campaign until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fence)
            task_status.started()
            await self._keeper()

    # ------------------------------------------------------------------ tasks

    async def _keeper(self) -> None:
        lease = self.lease
        next_renew = next_try = trio.current_time()
        while True:
            now = trio.current_time()
            if lease.state is LeaseState.FOLLOWER and lease.lease_id is not None and now >= lease.valid_until:
                lease.expire(now)  # the campaign's lease lapsed unrenewed: a new one
            try:
                while self._stale:
                    await self.etcd.revoke(self._stale[-1])
                    self._stale.pop()
                if lease.lease_id is None:
                    sent = trio.current_time()
                    lease_id, ttl = await self.etcd.grant(max(1, round(lease.ttl)))
                    lease.granted(lease_id, ttl, sent)
                    next_renew = sent + self.renew_interval
                    self._wake()
                elif now >= next_renew:
                    await self._renew()
                    next_renew = now + self.renew_interval
                if lease.lease_id is not None and lease.state is LeaseState.FOLLOWER \
                        and trio.current_time() >= next_try:  # fmt: skip
                    next_try = trio.current_time() + self.retry_interval
                    if self.campaign:
                        await self._try_to_win()
                    else:  # only watching who holds it
                        self.holder = await self.etcd.get(self.key)
            except EtcdError as e:
                self.etcd_errors += 1
                log.debug("etcd: %s", e)
                next_renew = min(next_renew, trio.current_time() + self.retry_interval)
            wake = next_renew if lease.state is LeaseState.LEADER else min(next_renew, next_try)
            await trio.sleep_until(max(wake, trio.current_time() + 0.01))

    async def _renew(self) -> None:
        lease = self.lease
        lease_id = lease.lease_id
        sent = trio.current_time()
        ttl = await self.etcd.keepalive(lease_id)
        if lease.lease_id != lease_id:  # stepped down meanwhile: that lease is not ours any more
            return
        was_leading = lease.state is LeaseState.LEADER
        lease.renewed(ttl, sent)
        if was_leading and lease.state is not LeaseState.LEADER:
            self._stepped_down(lease.last_reason, None)  # etcd says the lease is gone
        self._wake()

    async def _try_to_win(self) -> None:
        lease = self.lease
        created, revision, holder = await self.etcd.create(self.key, self.name, lease.lease_id)
        if not created and holder is not None and holder.value == self.name and holder.lease == lease.lease_id:
            # ours: an earlier attempt created it and its answer was lost (the client then
            # asked another member, whose answer is this one)
            created, revision = True, holder.create_revision
        if not created:
            if holder != self.holder:
                log.info("the leader key is held by %s (lease %x, since revision %d)", holder.value if holder else "?",
                         holder.lease if holder else 0, holder.create_revision if holder else 0)  # fmt: skip
            self.holder = holder
            return
        if trio.current_time() >= lease.valid_until:
            # the lease ran out by our clock while the transaction was on its way: we may not
            # lead on it, and the key must not outlive it (renewing that lease would keep a
            # key nobody serves under): give the lease up, revoke it, campaign again
            log.warning("%s created the leader key after its lease's validity had passed; giving that lease up",
                        self.name)  # fmt: skip
            self._stale.append(lease.lease_id)
            lease.lost("the lease ran out while the leader key was being created")
            return
        lease.won(revision)
        self.holder = KeyValue(self.key, self.name, revision, revision, lease.lease_id)
        log.warning("%s holds the leader key now (fencing token %d, valid for %.2f s)", self.name, revision,
                    lease.valid_until - trio.current_time())  # fmt: skip
        self._wake()
        if self.on_elected is not None:
            self.on_elected(revision)

    async def _fence(self) -> None:
        lease = self.lease
        while True:
            if lease.state is LeaseState.LEADER:
                await trio.sleep_until(lease.valid_until)
                if lease.state is LeaseState.LEADER and trio.current_time() >= lease.valid_until:
                    old = lease.lease_id
                    lease.expire(trio.current_time())
                    self._stepped_down(lease.last_reason, old)
            else:
                changed = self._changed
                await changed.wait()

    # ------------------------------------------------------------------ helpers

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _stepped_down(self, reason: str, old: int | None) -> None:
        """``old``: the lease given up, revoked later (it may still live in etcd)."""
        self.lease.lease_id = None  # a late renewal of it must not count
        log.error("%s stepped down as leader: %s", self.name, reason)
        if old is not None:
            self._stale.append(old)
        self._wake()
        if self.on_step_down is not None:
            self.on_step_down(reason)
