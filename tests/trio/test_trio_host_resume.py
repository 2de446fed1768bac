"""connmgr/host/resume.py and takeover.py, the decisions that need no socket: which
requests sent while idle may go on after a host takeover, and the takeover's phases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("httpx", reason="the [net] extra (httpx) is not installed")

from connmgr.host.resume import NotResumable, SessionResumer  # noqa: E402
from connmgr.host.takeover import _TRANSITIONS, Rebuilt, TakeoverEvent, TakeoverPhase  # noqa: E402
from replay.session_replica import SessionReplica  # noqa: E402
from replay.startup_exchange import whole_messages  # noqa: E402
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
    assert [t for t, _b in whole_messages(data)] == [ord("Q"), ord("S")]


async def test_the_takeover_phases_go_one_way_and_fail_back_to_waiting(autojump_clock):
    path = [TakeoverPhase.STANDBY]
    for event in (TakeoverEvent.ELECTED, TakeoverEvent.PROMOTED, TakeoverEvent.REBUILT, TakeoverEvent.ANNOUNCED,
                  TakeoverEvent.RESUMED):  # fmt: skip
        path.append(_TRANSITIONS[(path[-1], event)])
    assert path[-1] is TakeoverPhase.SERVING
    assert _TRANSITIONS[(TakeoverPhase.ANNOUNCING, TakeoverEvent.LOST)] is TakeoverPhase.FAILED
    assert _TRANSITIONS[(TakeoverPhase.FAILED, TakeoverEvent.ELECTED)] is TakeoverPhase.PROMOTING
    assert (TakeoverPhase.SERVING, TakeoverEvent.ELECTED) not in _TRANSITIONS


def unseen(replica: SessionReplica, committed: int, *, move: bool = True, forwarded: bytes = b""):
    async def committed_seq(database, origin, sid):
        return committed

    fake = SimpleNamespace(committed_seq=committed_seq,
                           ctx=SimpleNamespace(config=SimpleNamespace(host=SimpleNamespace(move_transactions=move))))
    return SessionResumer._check_unseen(fake, Rebuilt(replica, None, None, forwarded, forwarded))


def replica_in_transaction(markers: bool = True) -> SessionReplica:
    """A session of host A: one transaction done, the second open (BEGIN and an UPDATE
    answered), as host B's replica of it saw them."""
    replica = SessionReplica(3, {**PARAMS, "markers": "1" if markers else "0", "client_offset": "0",
                                 "server_offset": "0"})  # fmt: skip
    requests = [m.query("INSERT INTO t VALUES (1)"), m.query("BEGIN"), m.query("UPDATE t SET a = 2")]
    replies = [b"C\0\0\0\x0fINSERT 0 1\0" + b"Z\0\0\0\x05I", b"C\0\0\0\x0aBEGIN\0" + b"Z\0\0\0\x05T",
               b"C\0\0\0\x0dUPDATE 1\0" + b"Z\0\0\0\x05T"]  # fmt: skip
    c = s = 0
    for q, a in zip(requests, replies, strict=True):
        replica.client_batch(c, q, [(q[0], 5, len(q))])
        c += len(q)
        frames, i = [], 0
        while i < len(a):
            n = int.from_bytes(a[i + 1:i + 5], "big")
            frames.append((a[i], i + 5, i + 1 + n))
            i += 1 + n
        replica.server_batch(s, a, frames)
        s += len(a)
    assert replica.transactions == 1 and replica.session.tx_status.name == "IN_TRANSACTION"
    return replica


async def test_a_commit_host_a_ran_that_host_b_never_saw_stops_the_replay(autojump_clock):
    """Found by the host-kill campaign with move_transactions on: a transfer's COMMIT that
    host A read and ran but that neither the mirror nor the capture carried (the client
    sends it again to host B). Replaying the open transaction and then running that COMMIT
    applied the transfer twice; the marker row of transaction 2 shows it committed."""
    replica = replica_in_transaction()
    await unseen(replica, committed=1)  # only the first transaction committed: the replay may go on
    with pytest.raises(NotResumable, match="transaction 2 committed on the failed host") as e:
        await unseen(replica, committed=2)
    assert e.value.kind == "unseen commit" and e.value.sqlstate == "08006"


async def test_an_idle_session_whose_unseen_write_committed_does_not_go_on(autojump_clock):
    replica = replica_in_transaction()
    replica.client_batch(replica.client_end, m.query("COMMIT"), [(ord("Q"), 5, len(m.query("COMMIT")))])
    commit = b"C\0\0\0\x0bCOMMIT\0" + b"Z\0\0\0\x05I"
    replica.server_batch(replica.server_end, commit, [(ord("C"), 5, 12), (ord("Z"), 17, 18)])
    assert replica.transactions == 2 and replica.session.is_idle()
    await unseen(replica, committed=2)
    with pytest.raises(NotResumable, match="transaction 3 committed"):
        await unseen(replica, committed=3)


async def test_a_commit_in_flight_that_host_b_saw_is_left_to_the_move(autojump_clock):
    """The COMMIT was seen (pending): whether it committed is the move's question, which
    acknowledges it from the marker row rather than replaying it."""
    replica = replica_in_transaction()
    commit = m.query("COMMIT")
    replica.client_batch(replica.client_end, commit, [(ord("Q"), 5, len(commit))])
    assert replica.session.pending
    await unseen(replica, committed=2)
    with pytest.raises(NotResumable, match="transaction 3 committed"):  # and a later one too: not seen
        await unseen(replica, committed=3)


async def test_without_markers_an_open_transaction_is_not_moved_by_a_host_takeover(autojump_clock):
    replica = replica_in_transaction(markers=False)
    with pytest.raises(NotResumable, match="no connmgr markers") as e:
        await unseen(replica, committed=0)
    assert e.value.kind == "no markers"
    await unseen(replica, committed=0, move=False)  # it ends with 08006 anyway, for its own reason
