"""replay.session_recorder: the session state a move must rebuild, read from the client's SQL,
with Postgres's transactional semantics. (Against real servers: tests/integration/
test_session_restore.py.)"""

from __future__ import annotations

import pytest

from replay.session_recorder import SessionRecorder


def run(rec: SessionRecorder, *statements: str, committed: bool = True) -> None:
    """One transaction of ``statements``, ending committed or not."""
    for s in statements:
        rec.on_sql(s.encode())
    rec.end_transaction(committed)


def test_sets_apply_at_commit_and_vanish_on_rollback():
    rec = SessionRecorder()
    run(rec, "SET search_path TO app, public")
    run(rec, "SET work_mem = '8MB'", committed=False)
    run(rec, "SET LOCAL statement_timeout = 5")  # transaction-scoped: nothing to keep
    run(rec, "SET TIME ZONE 'UTC'", "set session application_name to 'x'")
    assert rec.restore_sql() == [
        "SET search_path TO app, public",
        "SET TIME ZONE 'UTC'",
        "set session application_name to 'x'",
    ]
    run(rec, "RESET search_path")
    run(rec, "SET timezone = 'Europe/Paris'")  # the same parameter, another spelling
    assert rec.restore_sql() == ["set session application_name to 'x'", "SET timezone = 'Europe/Paris'"]
    run(rec, "RESET ALL")
    assert rec.restore_sql() == [] and rec.movable


def test_prepared_listen_and_advisory_locks():
    rec = SessionRecorder()
    run(rec, "PREPARE q1 (int) AS SELECT $1", 'PREPARE "Q2" AS SELECT 2', "DEALLOCATE q1")
    run(rec, "LISTEN jobs", 'LISTEN "Mixed"', "UNLISTEN jobs")
    run(rec, "LISTEN lost", committed=False)  # LISTEN is transactional
    run(rec, "SELECT pg_advisory_lock(42)", "SELECT pg_advisory_lock(42)", "SELECT pg_advisory_lock_shared(1, 2)")
    run(rec, "SELECT pg_advisory_unlock(42)", "SELECT pg_advisory_xact_lock(7)")  # xact: not the session's
    assert rec.restore_sql() == [
        'PREPARE "Q2" AS SELECT 2',
        'LISTEN "Mixed"',
        "SELECT pg_catalog.pg_advisory_lock(42)",
        "SELECT pg_catalog.pg_advisory_lock_shared(1, 2)",
    ]
    assert rec.movable
    run(rec, "SELECT pg_advisory_unlock_all()")
    run(rec, "DISCARD ALL")
    assert rec.restore_sql() == []


@pytest.mark.parametrize(
    ("statements", "reason"),
    [
        (["CREATE TEMP TABLE t (a int)"], "temporary objects"),
        (["DECLARE c CURSOR WITH HOLD FOR SELECT 1"], "cursors WITH HOLD"),
        (["SELECT pg_try_advisory_lock(1)"], "pg_try_advisory_lock (granted or not is in the reply)"),
        (["SELECT pg_advisory_lock($1)"], "advisory locks with keys that are not literals"),
        (["SAVEPOINT a", "SET work_mem = '1MB'", "ROLLBACK TO a"], "SET in a transaction that rolled back to a savepoint"),
        (["SET work_mem = '1MB'; SELECT 1"], "session state changed inside a multi-statement Query"),
    ],
)
def test_what_cannot_move_is_named(statements, reason):
    rec = SessionRecorder()
    run(rec, *statements)
    assert rec.not_movable == [reason] and not rec.movable


def test_closing_what_blocked_makes_the_session_movable_again():
    rec = SessionRecorder()
    run(rec, "DECLARE c CURSOR WITH HOLD FOR SELECT 1")
    run(rec, "CLOSE c")
    run(rec, "CREATE TEMPORARY TABLE t (a int)")
    run(rec, "DISCARD TEMP")
    assert rec.movable


def test_ordinary_statements_record_nothing():
    rec = SessionRecorder()
    run(rec, "SELECT 1", "INSERT INTO t VALUES (1)", "UPDATE t SET a = 2", "CREATE TABLE x (a int)", "BEGIN")
    assert rec.restore_sql() == [] and rec.movable and not rec.settings


@pytest.mark.parametrize("head", [b"SET search_path = 'x", b"  create temp table t AS SELECT '", b"LISTEN a; --",
                                  b"SELECT pg_advisory_lock(1), '"])  # fmt: skip
def test_a_streamed_text_that_may_change_session_state_blocks_a_move(head):
    rec = SessionRecorder()
    rec.on_streamed_sql(head)
    assert rec.not_movable == ["a statement over [server] max_buffered_message that may change session state"]


def test_a_streamed_insert_records_nothing():
    rec = SessionRecorder()
    rec.on_streamed_sql(b"INSERT INTO t VALUES ('xxxxxxxx")
    rec.on_streamed_sql(b"COPY t FROM STDIN")
    assert rec.movable and rec.restore_sql() == []
