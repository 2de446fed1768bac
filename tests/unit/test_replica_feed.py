"""replay/session_replica.py: host B's copy of a mirrored session, fed batch by batch
(the live comparison with host A's relay is tests/integration/test_session_replica.py)."""

from __future__ import annotations

from replay.injection import frames_of
from replay.session_replica import SessionReplica, parse_address
from shadow import messages as m
from shadow.session import TxStatus

PARAMS = {"user": "alice", "database": "app", "peer": "198.18.0.10:40000", "local": "198.18.0.100:5432",
          "origin": "77", "markers": "1", "virtual_pid": "12345", "cancel_secret": "678"}  # fmt: skip


def feed(rep: SessionReplica, direction: str, data: bytes) -> None:
    if direction == "c":
        offset = rep.client_end or 0
        rep.client_raw(offset, len(data))
        rep.client_batch(offset, data, frames_of(data))
    else:
        offset = rep.server_end or 0
        rep.server_raw(offset, data)
        rep.server_batch(offset, data, frames_of(data))


def test_parameters_say_where_the_connection_is_and_whose_it_is():
    rep = SessionReplica(7, PARAMS)
    assert (rep.peer, rep.local, rep.origin, rep.markers, rep.key) == (
        ("198.18.0.10", 40000), ("198.18.0.100", 5432), 77, True, (12345, 678))
    assert (rep.user, rep.database) == ("alice", "app")
    assert parse_address("[::1]:5432") == ("::1", 5432) and parse_address("nonsense") is None


def test_an_open_transaction_is_journaled_until_it_ends_and_then_counted():
    rep = SessionReplica(7, PARAMS)
    feed(rep, "c", m.query("BEGIN"))
    feed(rep, "b", m.command_complete("BEGIN") + m.ready_for_query("T"))
    feed(rep, "c", m.query("INSERT INTO t VALUES (1)"))
    feed(rep, "b", m.command_complete("INSERT 0 1") + m.ready_for_query("T"))
    assert rep.session.tx_status is TxStatus.IN_TRANSACTION and rep.transactions == 0
    assert bytes(rep.journal.requests) == m.query("BEGIN") + m.query("INSERT INTO t VALUES (1)")
    feed(rep, "c", m.query("COMMIT"))
    assert [r.kind for r in rep.session.pending] == ["Q"]
    feed(rep, "b", m.command_complete("COMMIT") + m.ready_for_query("I"))
    assert rep.transactions == 1 and rep.session.is_idle() and bytes(rep.journal.requests) == b""
    assert rep.problem is None and rep.server_bytes(0, 5) == m.command_complete("BEGIN")[:5]


def test_unmarked_requests_are_answered_one_per_ready_for_query_and_held_replies_released():
    rep = SessionReplica(7, PARAMS)
    rep.unmarked_requests(1)
    feed(rep, "c", m.query("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)"))
    rep.held(m.command_complete("INSERT 0 1"))
    assert rep.unmarked == 1 and bytes(rep.stash) == m.command_complete("INSERT 0 1")
    feed(rep, "b", m.command_complete("INSERT 0 1") * 2 + m.ready_for_query("I"))
    assert rep.unmarked == 0 and rep.stash == bytearray() and rep.transactions == 1


def test_a_gap_or_a_protocol_desync_makes_the_session_not_movable():
    rep = SessionReplica(7, PARAMS)
    feed(rep, "c", m.query("SELECT 1"))
    rep.client_raw(100, 10)  # the mirror skipped bytes 13..100
    assert "client stream gap" in rep.problem
    other = SessionReplica(8, PARAMS)
    feed(other, "b", m.ready_for_query("I"))  # a reply to nothing
    assert not other.tracking and "lost track" in other.problem


def test_the_tail_keeps_the_last_server_bytes_only():
    rep = SessionReplica(7, PARAMS, max_tail=10)
    rep.server_raw(0, b"0123456789")
    rep.server_raw(10, b"abcde")
    assert rep.tail_start == 5 and rep.server_bytes(5, 15) == b"56789abcde"
    assert rep.server_bytes(0, 5) is None
