"""The right to hold the VIP and serve: a leader key held by an etcd lease (sans-IO).

How it works
------------
Two connection managers cannot break a tie alone, so the decision is etcd's, the way
Patroni takes it: each connmgr keeps a lease of ``ttl`` seconds alive and tries to create
the leader key with it, *only if the key does not exist* (a transaction comparing its
create revision with 0). The one that succeeds leads; the key's create revision is the
**fencing token**: whoever acts as leader checks, before it adds the VIP, before it sends
ARP and before it commits anything on its database, that the key still exists with that
revision (:meth:`Lease.token`, checked by the trio side against etcd).

**Stepping down on time.** etcd expires a lease ``ttl`` seconds after the last keepalive it
processed, and that was *after* this connmgr sent it. So a leader whose last acknowledged
renewal was *sent* at ``t`` is safe until ``t + ttl`` and steps down at
``t + ttl - margin`` (:attr:`Lease.valid_until`, on the monotonic clock) -- by its own
timer, not between renewals: a renewal stuck until its timeout must not keep it leading
past that point (the feasibility study saw 0.3 s of two leaders when it did). A
connmgr cut off from etcd therefore stops serving ``margin`` seconds before any other can
win the key.

This module is the bookkeeping: states and transitions (an enum and a table; an illegal
event raises :class:`IllegalLeaseEvent` naming both), when to renew, whether serving is
allowed at an instant. :mod:`connmgr.host.leader` does the talking and the timing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["IllegalLeaseEvent", "Lease", "LeaseEvent", "LeaseState"]


class LeaseState(enum.Enum):
    FOLLOWER = "follower"  # not leading; campaigning when the key is free
    LEADER = "leader"  # holds the key, until valid_until


class LeaseEvent(enum.Enum):
    WON = "won the leader key"
    RENEWED = "lease renewed"
    LOST = "lease or key lost"
    EXPIRED = "valid_until passed"
    RESIGNED = "resigned"


_TRANSITIONS: dict[tuple[LeaseState, LeaseEvent], LeaseState] = {
    (LeaseState.FOLLOWER, LeaseEvent.WON): LeaseState.LEADER,
    (LeaseState.FOLLOWER, LeaseEvent.RENEWED): LeaseState.FOLLOWER,  # the campaign's own lease
    (LeaseState.FOLLOWER, LeaseEvent.LOST): LeaseState.FOLLOWER,
    (LeaseState.FOLLOWER, LeaseEvent.EXPIRED): LeaseState.FOLLOWER,
    (LeaseState.FOLLOWER, LeaseEvent.RESIGNED): LeaseState.FOLLOWER,
    (LeaseState.LEADER, LeaseEvent.RENEWED): LeaseState.LEADER,
    (LeaseState.LEADER, LeaseEvent.LOST): LeaseState.FOLLOWER,
    (LeaseState.LEADER, LeaseEvent.EXPIRED): LeaseState.FOLLOWER,
    (LeaseState.LEADER, LeaseEvent.RESIGNED): LeaseState.FOLLOWER,
}


class IllegalLeaseEvent(Exception):
    """A lease event that the state does not allow: a bug in the caller. Internal."""

    def __init__(self, state: LeaseState, event: LeaseEvent) -> None:
        super().__init__(f"lease event {event.value!r} is not allowed in state {state.value!r}")
        self.state, self.event = state, event


@dataclass(slots=True)
class Lease:
    """One connmgr's view of the leader key. Times are ``time.monotonic()`` seconds."""

    ttl: float
    margin: float
    state: LeaseState = LeaseState.FOLLOWER
    #: the leader key's create revision while this connmgr leads (the fencing token)
    token: int | None = None
    #: the lease kept alive (etcd's id), while campaigning or leading
    lease_id: int | None = None
    #: until when the lease is certainly alive in etcd, minus the margin
    valid_until: float = 0.0
    #: how many times this connmgr won, and stepped down
    terms: int = 0
    step_downs: int = 0
    last_reason: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.margin < self.ttl:
            raise ValueError(f"the safety margin ({self.margin:g} s) must be at least 0 and below the TTL ({self.ttl:g} s)")

    def _on(self, event: LeaseEvent) -> LeaseState:
        nxt = _TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise IllegalLeaseEvent(self.state, event)
        before, self.state = self.state, nxt
        if before is LeaseState.LEADER and nxt is LeaseState.FOLLOWER:
            self.step_downs += 1
            self.token = None
        return nxt

    def granted(self, lease_id: int, ttl: float, sent_at: float) -> None:
        """A new lease: granted by a request sent at ``sent_at`` with ``ttl`` seconds."""
        self.lease_id = lease_id
        self.renewed(ttl, sent_at)

    def won(self, token: int) -> None:
        """The create-if-absent transaction with our lease succeeded at revision ``token``."""
        if self.lease_id is None:
            raise IllegalLeaseEvent(self.state, LeaseEvent.WON)
        self._on(LeaseEvent.WON)
        self.token = token
        self.terms += 1

    def renewed(self, ttl: float, sent_at: float) -> None:
        """A keepalive sent at ``sent_at`` came back with ``ttl`` seconds left; ``ttl`` <= 0
        means the lease is gone."""
        if ttl <= 0:
            self.lost("the lease expired in etcd")
            return
        self._on(LeaseEvent.RENEWED)
        # etcd counts from when it processed the keepalive, which is after sent_at
        self.valid_until = max(self.valid_until, sent_at + min(ttl, self.ttl) - self.margin)

    def lost(self, reason: str) -> None:
        """The lease or the key is gone (etcd said so)."""
        self.last_reason = reason
        self._on(LeaseEvent.LOST)
        self.lease_id = None
        self.valid_until = 0.0

    def expire(self, now: float) -> bool:
        """Step down if ``valid_until`` has passed; True if this ended a term."""
        if now < self.valid_until:
            return False
        leading = self.state is LeaseState.LEADER
        self.last_reason = "no renewal acknowledged in time"
        self._on(LeaseEvent.EXPIRED)
        self.lease_id = None
        return leading

    def resign(self, reason: str) -> None:
        self.last_reason = reason
        self._on(LeaseEvent.RESIGNED)

    def may_serve(self, now: float) -> bool:
        """May this connmgr act as the leader at ``now``?"""
        return self.state is LeaseState.LEADER and now < self.valid_until

    def renew_at(self, interval: float) -> float:
        """When to send the next keepalive: ``interval`` after the last renewal (which
        ends its validity ``ttl - margin`` after it was sent)."""
        return self.valid_until - (self.ttl - self.margin) + interval
