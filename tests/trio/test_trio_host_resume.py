"""connmgr/host/resume.py and takeover.py, the decisions that need no socket: which
requests sent while idle may go on after a host takeover, and the takeover's phases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("httpx", reason="the [net] extra (httpx) is not installed")

from connmgr.host.resume import NotResumable, SessionResumer, _whole_messages  # noqa: E402
from connmgr.host.takeover import _TRANSITIONS, Rebuilt, TakeoverEvent, TakeoverPhase  # noqa: E402
from replay.session_replica import SessionReplica  # noqa: E402
from shadow import messages as m  # noqa: E402

PARAMS = {"user": "u", "database": "app", "peer": "198.18.0.10:1", "local": "198.18.0.100:5432",
          "origin": "5", "markers": "1"}  # fmt: skip


def check(forwarded: bytes, committed: int = 0, markers: bool = True):
    replica = SessionReplica(3, {**PARAMS, "markers": "1" if markers else "0"})
    asked = []

    async def committed_seq(database, origin, sid):
        asked.append((database, origin, sid))
        return committed

    fake = SimpleNamespace(committed_seq=committed_seq)
    return SessionResumer._check_forwarded(fake, Rebuilt(replica, None, None, forwarded, forwarded)), asked


async def test_reads_sent_while_idle_go_on_without_asking(autojump_clock):
    coro, asked = check(m.query("SELECT 1") + m.query("SELECT 2")[:7])  # a partial one at the end
    await coro
    assert asked == []


async def test_a_write_goes_on_only_if_its_marker_row_says_it_did_not_commit(autojump_clock):
    coro, asked = check(m.query("INSERT INTO t VALUES (1)"))
    await coro
    assert asked == [("app", 5, 3)]
    coro, _ = check(m.query("INSERT INTO t VALUES (1)"), committed=1)
    with pytest.raises(NotResumable, match="had committed"):
        await coro


def bind_execute(statement: str) -> bytes:
    bind = b"\0" + statement.encode() + b"\0" + b"\0\0" + b"\0\0" + b"\0\0"
    execute = b"\0" + b"\0\0\0\0"
    return (b"B" + (len(bind) + 4).to_bytes(4, "big") + bind + b"E" + (len(execute) + 4).to_bytes(4, "big")
            + execute + m.sync())  # fmt: skip


async def test_a_prepared_write_is_known_by_its_statement(autojump_clock):
    """psycopg prepares a statement after five uses and then sends only Bind/Execute/Sync:
    the write is recognised through the statement the session prepared (found by the lab:
    a committed insert sent again, and its client got 23505)."""
    replica = SessionReplica(3, PARAMS)
    replica.session.prepared_statements["_pg3_0"] = "INSERT INTO ledger (note) VALUES ($1)"
    replica.session.prepared_statements["_pg3_1"] = "SELECT 1"

    async def committed_seq(database, origin, sid):
        return 1

    fake = SimpleNamespace(committed_seq=committed_seq)
    with pytest.raises(NotResumable, match="had committed"):
        await SessionResumer._check_forwarded(fake, Rebuilt(replica, None, None, b"", bind_execute("_pg3_0")))
    await SessionResumer._check_forwarded(fake, Rebuilt(replica, None, None, b"", bind_execute("_pg3_1")))
    with pytest.raises(NotResumable, match="had committed"):  # a statement not known here may write
        await SessionResumer._check_forwarded(fake, Rebuilt(replica, None, None, b"", bind_execute("_pg3_9")))


@pytest.mark.parametrize(("forwarded", "markers", "message"), [
    (m.query("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)"), True, "multi-statement write"),
    (b"F\0\0\0\x0e" + b"\0" * 10, True, "function call"),
    (m.query("UPDATE t SET a = 1"), False, "no connmgr markers"),
])  # fmt: skip
async def test_what_cannot_be_judged_does_not_go_on(autojump_clock, forwarded, markers, message):
    coro, _ = check(forwarded, markers=markers)
    with pytest.raises(NotResumable, match=message):
        await coro


async def test_whole_messages_stop_at_a_partial_one(autojump_clock):
    data = m.query("SELECT 1") + m.sync() + m.query("SELECT 2")[:-3]
    assert [t for t, _b in _whole_messages(data)] == [ord("Q"), ord("S")]


async def test_the_takeover_phases_go_one_way_and_fail_back_to_waiting(autojump_clock):
    path = [TakeoverPhase.STANDBY]
    for event in (TakeoverEvent.ELECTED, TakeoverEvent.PROMOTED, TakeoverEvent.REBUILT, TakeoverEvent.ANNOUNCED,
                  TakeoverEvent.RESUMED):  # fmt: skip
        path.append(_TRANSITIONS[(path[-1], event)])
    assert path[-1] is TakeoverPhase.SERVING
    assert _TRANSITIONS[(TakeoverPhase.ANNOUNCING, TakeoverEvent.LOST)] is TakeoverPhase.FAILED
    assert _TRANSITIONS[(TakeoverPhase.FAILED, TakeoverEvent.ELECTED)] is TakeoverPhase.PROMOTING
    assert (TakeoverPhase.SERVING, TakeoverEvent.ELECTED) not in _TRANSITIONS
