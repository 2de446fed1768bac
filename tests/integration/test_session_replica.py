"""Host B's copy of each session (replay/session_replica.py), built from the mirror alone,
equals what host A's relay knows about it: the protocol shadow, the open transaction's
bytes, the SQL-level state, the transaction count and the requests in flight that may
commit unmarked. That is what lets host B continue a session after host A is gone."""

from __future__ import annotations

import threading

import psycopg
import pytest
from connmgr_fixtures import live_pair_of, wait_for

from shadow.session import Phase


@pytest.fixture
def pair(pg_bindir, pg_base_dir, tmp_path, request):
    with live_pair_of(pg_bindir, pg_base_dir / f"replica-{request.node.name[:40]}", tmp_path) as lp:
        # as with [host] vip set on the secondary (the lab's configuration)
        lp.secondary.app.imports.replicas = {}
        yield lp


def caught_up(lp) -> bool:
    sender = lp.primary.app.mirror.sender
    return sender.acked_version == sender.latest_version


def compare(lp) -> int:
    """Every client session of host A against host B's replica of it; returns how many."""
    wait_for(lambda: caught_up(lp), 10, "the secondary to acknowledge everything mirrored")
    replicas = lp.secondary.app.imports.replicas
    compared = 0
    for conn in list(lp.primary.app.clients.values()):
        if conn.relay is None:
            continue
        rep = replicas.get(conn.id)
        assert rep is not None, f"no replica of session {conn.id}"
        a, b = conn.session, rep.session
        assert rep.problem is None, rep.problem
        assert (b.phase, b.tx_status) == (a.phase, a.tx_status)
        assert [r.kind for r in b.pending] == [r.kind for r in a.pending]
        assert b.parse_messages == a.parse_messages and b.prepared_statements == a.prepared_statements
        ja, jb = conn.journal, rep.journal
        assert (bytes(jb.requests), bytes(jb.replies)) == (bytes(ja.requests), bytes(ja.replies))
        assert (jb.sync_ends, jb.answered, jb.overflow) == (ja.sync_ends, ja.answered, ja.overflow)
        assert rep.transactions == conn.relay.transactions
        assert rep.unmarked == conn.relay.injector.unmarked
        assert rep.markers == conn.relay.markers
        assert rep.recorder.restore_sql() == conn.recorder.restore_sql()
        assert rep.recorder.not_movable == conn.recorder.not_movable
        assert rep.key == conn.key
        assert rep.peer is not None and f"{rep.peer[0]}:{rep.peer[1]}" == conn.peer
        assert rep.local == tuple(lp.primary.app.listen_addresses[0])
        assert rep.origin == lp.primary.app.origin
        compared += 1
    return compared


def test_the_replica_follows_every_kind_of_session_state(pair):
    lp = pair
    simple = lp.connect(autocommit=True)
    simple.execute("SET application_name = 'replica-test'")
    simple.execute("SET search_path = public, pg_catalog")
    simple.execute("PREPARE one AS SELECT balance FROM accounts WHERE id = $1")
    simple.execute("INSERT INTO ledger (note) VALUES ('autocommit')")
    ext = lp.connect(autocommit=True)
    for i in range(3):
        assert ext.execute("SELECT balance FROM accounts WHERE id = %s", (i + 1,), prepare=True).fetchone() == (1000,)
    ext.execute("INSERT INTO ledger (note) VALUES (%s)", ("extended",))
    tx = lp.connect()  # an open transaction, idle in it
    tx.execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
    tx.execute("SELECT balance FROM accounts WHERE id = 1").fetchone()
    failed = lp.connect()  # a failed transaction block
    with pytest.raises(psycopg.errors.DivisionByZero):
        failed.execute("SELECT 1 / 0")
    copy = lp.connect(autocommit=True)
    with copy.cursor().copy("COPY ledger (note) FROM STDIN") as cp:
        for i in range(5):
            cp.write_row((f"copy-{i}",))
    assert compare(lp) == 5
    assert lp.secondary.app.imports.replicas  # and what they hold is exact:
    rep = lp.secondary.app.imports.replicas[next(c.id for c in lp.primary.app.clients.values()
                                                  if c.session.tx_status.name == "IN_TRANSACTION")]  # fmt: skip
    assert b"UPDATE accounts" in bytes(rep.journal.requests) and rep.session.phase is Phase.READY
    tx.commit()
    failed.rollback()
    assert compare(lp) == 5
    for c in (simple, ext, tx, failed, copy):
        c.close()
    wait_for(lambda: not lp.secondary.app.imports.replicas, 10, "the replicas of closed sessions to go")


def test_a_request_in_flight_that_may_commit_unmarked_is_counted_on_both_hosts(pair):
    """A multi-statement write cannot carry a marker: while it runs, host A counts it
    unmarked, and so must host B (a takeover then ends that session with 08006 rather
    than replay a write that may have committed)."""
    lp = pair
    c = lp.connect(autocommit=True)
    running = threading.Thread(target=lambda: c.execute(
        "INSERT INTO ledger (note) VALUES ('multi'); SELECT pg_sleep(1.5)"))  # fmt: skip
    running.start()
    try:
        wait_for(lambda: any(x.relay is not None and x.relay.injector.unmarked for x in lp.primary.app.clients.values()),
                 5, "host A to count the write as unmarked")  # fmt: skip
        compare(lp)
        assert sum(r.unmarked for r in lp.secondary.app.imports.replicas.values()) == 1
    finally:
        running.join()
    compare(lp)
    assert sum(r.unmarked for r in lp.secondary.app.imports.replicas.values()) == 0
    c.close()
