"""Synchronized activation (shadow/policy/activation.py) and a guard following the
version in use (shadow/policy/guard.py), without I/O: the cycle's decisions on sync rows,
a simulated fleet whose members stage or fail at random moments, the clock offset's
bound, and a session switching class only between transactions."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.framing import Framer
from shadow.policy.activation import (
    ClockOffset,
    Sync,
    Version,
    advance,
    in_effect,
    parse_sync,
    sync_update_sql,
)
from shadow.policy.guard import UNRESTRICTED, Guard
from shadow.policy.maintenance import Maintenance
from shadow.policy.rules import parse_policy

ALL = frozenset({"a", "b"})


def _sync(**kw) -> Sync:
    base = {"active": None, "next": None, "staged": None, "activation": 100.0, "interval": 10.0}
    return Sync(**{**base, **kw})


def test_before_the_activation_time_nothing_moves() -> None:
    assert advance(_sync(staged=1), 99.999, 1, {"a": (True, ""), "b": (True, "")}, ALL) is None


def test_a_version_every_member_staged_is_next_and_a_newer_one_is_staged() -> None:
    moved = advance(_sync(active=1, staged=2), 100.5, 3, {"a": (True, ""), "b": (True, "")}, ALL)
    assert (moved.active, moved.next, moved.staged, moved.activation) == (1, 2, 3, 110.0)
    # the cycle after: next is in effect, 3 approved
    again = advance(moved, 110.2, 3, {"a": (True, ""), "b": (True, "")}, ALL)
    assert (again.active, again.next, again.staged) == (2, 3, None)
    assert in_effect(moved, 109.999) == 1 and in_effect(moved, 110.0) == 2


def test_one_member_that_cannot_stage_refuses_it_everywhere() -> None:
    moved = advance(_sync(active=1, staged=2), 100.0, 2, {"a": (True, ""), "b": (False, "key_env X not set")}, ALL)
    assert (moved.active, moved.next, moved.staged, moved.failed) == (1, None, None, 2)
    assert moved.failure == "b: key_env X not set"
    # the refused version is never staged again; a newer one is
    assert advance(moved, 110.0, 2, {}, ALL).staged is None
    assert advance(moved, 110.0, 3, {}, ALL).staged == 3


def test_a_member_that_has_not_reported_keeps_it_staged() -> None:
    moved = advance(_sync(active=1, staged=2), 100.0, 2, {"a": (True, "")}, ALL)
    assert (moved.next, moved.staged) == (None, 2)
    # a newer push replaces it (its staging starts afresh)
    assert advance(_sync(active=1, staged=2), 100.0, 5, {"a": (True, "")}, ALL).staged == 5


def test_missed_cycles_keep_the_grid_and_land_after_now() -> None:
    moved = advance(_sync(), 1234.5, None, {}, ALL)
    assert moved.activation == 1240.0


def test_the_sync_row_round_trips_through_its_text() -> None:
    sync = _sync(active=3, next=None, staged=4, failed=2, failure="b: it's broken", activation=1.7e9 + 0.125)
    sql = sync_update_sql(sync)
    assert "'b: it''s broken'" in sql and "next = NULL" in sql and "activation = 1700000000.125" in sql
    row = (b"3", None, b"4", b"1700000000.125", b"10", b"2", b"b: it's broken")
    assert parse_sync(row) == sync


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(2, 4), st.integers(1, 6))
def test_a_fleet_never_runs_a_version_one_member_cannot_stage(seed: int, members: int, pushes: int) -> None:
    """Members cycle in random order at random moments after each activation; pushes land
    at random times; each member can stage a version or not (decided up front). Every
    version in effect was staged by every member, each was in effect for all at once (one
    function of the row and the store's clock), and every version pushed ends up decided."""
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(members)]
    can = {(m, v): rng.random() > 0.15 for m in names for v in range(1, pushes + 1)}
    sync = _sync(activation=0.0, interval=1.0)
    staging: dict[int, dict[str, tuple[bool, str]]] = {}
    pushed = 0
    effective = []
    for step in range(12 * pushes + 20):
        now = step * 1.0
        if pushed < pushes and rng.random() < 0.4:
            pushed += 1
        for m in rng.sample(names, len(names)):
            t = now + rng.random() * 0.5
            if t >= sync.activation:
                moved = advance(sync, t, pushed or None, staging.get(sync.staged, {}), frozenset(names))
                if moved is not None:
                    sync = moved
            if sync.staged is not None and rng.random() < 0.8:  # (some members are slow to stage)
                staging.setdefault(sync.staged, {})[m] = (can[(m, sync.staged)], "" if can[(m, sync.staged)] else "no")
        effective.append(in_effect(sync, now + 0.99))
    for version in {v for v in effective if v is not None}:
        assert all(can[(m, version)] for m in names), f"version {version} in effect, not stageable everywhere"
    if sync.failed is not None:
        assert not all(can[(m, sync.failed)] for m in names)
    assert effective == sorted(effective, key=lambda v: -1 if v is None else v), "a version went back"


@settings(max_examples=300, deadline=None)
@given(st.floats(-5, 5), st.lists(st.tuples(st.floats(0, 0.05), st.floats(0, 0.05), st.floats(0, 1e4)),
                                   min_size=1, max_size=8))  # fmt: skip
def test_the_clock_offset_is_within_its_error_bound(true_offset: float, trips) -> None:
    """Whatever the delays each way, the estimate is within half the best round trip."""
    offset = ClockOffset()
    for out, back, at in trips:
        offset.sample(at, at + out + true_offset, at + out + back)
    assert abs(offset.offset - true_offset) <= offset.error + 1e-9


# ---------------------------------------------------------------------- a guard follows the version


def _batch(*messages: bytes) -> tuple[bytes, list]:
    return Framer(frontend=True).feed(b"".join(messages))


def _q(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def _bind(name: bytes) -> bytes:
    body = b"\0" + name + b"\0" + struct.pack("!hhh", 0, 0, 0)
    return b"B" + struct.pack("!I", len(body) + 4) + body


class _Source:
    def __init__(self, version: Version) -> None:
        self.active = version


V1 = Version(1, parse_policy('[[class]]\nname = "app"\nusers = ["app"]\nrefuse_objects = ["secrets"]\n'))
V2 = Version(2, parse_policy('[[class]]\nname = "app"\nusers = ["app"]\nrefuse_objects = ["secrets", "payroll"]\n'))
V3 = Version(3, parse_policy('[[class]]\nname = "app"\nusers = ["app"]\nrefuse_objects = ["secrets", "payroll"]\n'))


def _guard(source: _Source, prepared: dict[str, str]) -> Guard:
    g = Guard(source.active.policy.classes[0], lambda refusal: None)
    g.maintenance = Maintenance()
    g.source, g.version, g.client = source, source.active, ("app", "db", "", None)
    g.statements = lambda: dict(prepared)
    return g


def test_a_session_switches_between_transactions_only() -> None:
    source = _Source(V1)
    g = _guard(source, {})
    buf, frames = _batch(_q("SELECT * FROM payroll"))
    assert g.filter(buf, frames)[0] == buf  # allowed under 1
    source.active = V2
    g.must_wait(buf, frames, in_transaction=True)  # a transaction begun under 1 finishes under 1
    assert g.version is V1 and g.filter(buf, frames)[0] == buf
    g.must_wait(buf, frames, in_transaction=False)
    assert g.version is V2 and b"connmgr_refused" in g.filter(buf, frames)[0]


def test_the_same_rules_keep_the_session_as_it_is_and_others_make_prepared_statements_stale() -> None:
    source = _Source(V1)
    g = _guard(source, {"pay": "SELECT * FROM payroll", "ok": "SELECT 1"})
    source.active = V2
    buf, frames = _batch(_bind(b"pay"), _bind(b"ok"))
    g.must_wait(buf, frames, in_transaction=False)
    assert g.stale == {b"pay", b""}  # (and the unnamed statement: bound again only after a Parse)
    out, out_frames = g.filter(buf, frames)
    first, second = (out[s - 5:e] for _t, s, e in out_frames)
    assert b"prepared under a policy version no longer in use" in first and second == _bind(b"ok")
    # version 3 has the same rules as 2: only the class object changes
    source.active = V3
    g.must_wait(buf, frames, in_transaction=False)
    assert g.cls is V3.policy.classes[0] and g.stale == {b"pay", b""}


def test_sql_level_names_made_under_the_class_before_are_not_executed() -> None:
    """PREPARE and DECLARE ... WITH HOLD made under version 1 (decided by its class):
    after a class change, EXECUTE/FETCH of them gets 26000 (nothing runs); a name made
    again under the new class is used as usual; a statement whose text was not kept (a
    Parse that streamed) is stale."""
    source = _Source(V1)
    g = _guard(source, {"long": ""})
    source.active = V2
    buf, frames = _batch(_q("SELECT 1"))
    g.must_wait(buf, frames, in_transaction=False)
    assert b"long" in g.stale
    for sql in ("EXECUTE pay_s", "SELECT 1; execute pay_s(1)", "FETCH 5 FROM held_c", "MOVE held_c"):
        out = g.filter(*_batch(_q(sql)))[0]
        assert b"26000" in out and b"no longer in use" in out, sql
    out = g.filter(*_batch(_q("PREPARE pay_s AS SELECT 1; EXECUTE pay_s")))[0]
    assert out == _q("PREPARE pay_s AS SELECT 1; EXECUTE pay_s")


def test_a_batch_with_a_streamed_message_does_not_switch() -> None:
    """Its long message was cut by a framer that streams (the class before did not need it
    whole): the switch waits for the next batch, whose messages come whole."""
    source = _Source(V1)
    g = _guard(source, {})
    source.active = V2
    streamed = [(0x100 | ord("Q"), 5, 9000)]
    g.must_wait(b"Q" + b"\0" * 9000, streamed, in_transaction=False)
    assert g.version is V1
    buf, frames = _batch(_q("SELECT 1"))
    g.must_wait(buf, frames, in_transaction=False)
    assert g.version is V2


def test_a_client_no_class_takes_any_more_is_unrestricted() -> None:
    source = _Source(V1)
    g = _guard(source, {})
    source.active = Version(4, parse_policy(""))
    buf, frames = _batch(_q("SELECT * FROM secrets"))
    g.must_wait(buf, frames, in_transaction=False)
    assert g.cls is UNRESTRICTED and g.unrestricted and g.filter(buf, frames)[0] == buf


@pytest.mark.parametrize("pending", [True, False])
def test_a_switch_to_a_masking_class_tells_the_relay(pending: bool) -> None:
    """The relay learns of a new class (it stops streaming long messages, masks rows)."""
    source = _Source(V1)
    g = _guard(source, {})
    told = []
    g.on_switch = lambda: told.append(g.results)
    source.active = Version(5, parse_policy('[[class]]\nname = "app"\n[[class.mask]]\ncolumn = "t.c"\nmask = "full"\n'))
    buf, frames = _batch(_q("SELECT 1"))
    g.must_wait(buf, frames, in_transaction=pending)
    assert (told == []) if pending else (len(told) == 1 and told[0] is not None)
