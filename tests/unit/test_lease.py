"""replay/lease.py: the leader lease's bookkeeping."""

from __future__ import annotations

import pytest

from replay.lease import IllegalLeaseEvent, Lease, LeaseState


def test_a_won_lease_is_valid_until_its_renewal_was_sent_plus_ttl_minus_margin():
    lease = Lease(ttl=2.0, margin=0.5)
    lease.granted(7, 2, sent_at=10.0)
    assert lease.valid_until == 11.5
    lease.won(42)
    assert (lease.state, lease.token, lease.terms) == (LeaseState.LEADER, 42, 1)
    assert lease.may_serve(11.49) and not lease.may_serve(11.5)
    lease.renewed(2, sent_at=11.0)
    assert lease.valid_until == 12.5
    lease.renewed(2, sent_at=10.5)  # a late answer to an earlier keepalive never shortens it
    assert lease.valid_until == 12.5


def test_etcd_raising_the_ttl_does_not_extend_ours():
    lease = Lease(ttl=2.0, margin=0.5)
    lease.granted(7, 5, sent_at=0.0)  # etcd's minimum TTL may be above the configured one
    assert lease.valid_until == 1.5


def test_expiry_ends_the_term_and_drops_the_token():
    lease = Lease(ttl=2.0, margin=0.5)
    lease.granted(7, 2, 0.0)
    lease.won(1)
    assert not lease.expire(1.49)
    assert lease.expire(1.5)
    assert (lease.state, lease.token, lease.lease_id, lease.step_downs) == (LeaseState.FOLLOWER, None, None, 1)
    assert not lease.may_serve(1.0)
    assert "no renewal" in lease.last_reason


def test_a_keepalive_answered_with_ttl_0_is_a_lost_lease():
    lease = Lease(ttl=2.0, margin=0.5)
    lease.granted(7, 2, 0.0)
    lease.won(1)
    lease.renewed(0, 0.5)
    assert lease.state is LeaseState.FOLLOWER and lease.lease_id is None and lease.step_downs == 1


def test_winning_needs_a_lease_and_the_margin_must_fit():
    with pytest.raises(IllegalLeaseEvent, match="won the leader key"):
        Lease(ttl=2.0, margin=0.5).won(1)
    with pytest.raises(ValueError, match="safety margin"):
        Lease(ttl=1.0, margin=1.0)


def test_renew_at_follows_the_last_renewal():
    lease = Lease(ttl=3.0, margin=0.5)
    lease.granted(1, 3, sent_at=5.0)
    assert lease.renew_at(1.0) == 6.0
