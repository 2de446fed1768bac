"""replay.session_recorder: the session state a move must rebuild, read from the client's SQL,
with Postgres's transactional semantics -- and, against a real server, the restore script
rebuilds exactly the settings the session had."""

from __future__ import annotations

import psycopg
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


def test_restore_script_rebuilds_the_settings_on_a_real_server(pg):
    statements = [
        "SET search_path TO public, pg_catalog",
        "SET TIME ZONE 'Asia/Tokyo'",
        "SET statement_timeout = '7s'",
        "SET application_name TO 'moved'",
        "SET datestyle = 'SQL, DMY'",
    ]
    probe = "SELECT current_setting('search_path'), current_setting('TimeZone'), current_setting('statement_timeout')," \
            " current_setting('application_name'), current_setting('DateStyle')"  # fmt: skip
    rec = SessionRecorder()
    with pg.connect(dbname="app", autocommit=True) as original:
        for s in statements:
            original.execute(s)
            rec.on_sql(s.encode())
            rec.end_transaction(True)
        original.execute("BEGIN")
        original.execute("SET work_mem = '2MB'")  # rolled back: must not reappear
        rec.on_sql(b"SET work_mem = '2MB'")
        original.execute("ROLLBACK")
        rec.end_transaction(False)
        want = original.execute(probe).fetchone()
        want_mem = original.execute("SHOW work_mem").fetchone()
    with pg.connect(dbname="app", autocommit=True) as moved:
        for s in rec.restore_sql():
            moved.execute(s)
        assert moved.execute(probe).fetchone() == want
        assert moved.execute("SHOW work_mem").fetchone() == want_mem
    with pg.connect(dbname="app", autocommit=True) as fresh:  # the probe really distinguishes
        assert fresh.execute(probe).fetchone() != want


def test_the_secondary_follows_each_sessions_state_off_the_clients_path(pair):
    """Through the pair: the secondary connmgr rebuilds the restore script from the mirror
    (committed SETs only, LISTEN, prepared statements) and names what cannot move."""
    from connmgr_fixtures import wait_for

    primary, secondary, _received = pair
    imports = secondary.app.imports
    with psycopg.connect(primary.conninfo(password="postgres"), autocommit=True) as conn:
        sid = next(c.id for c in list(primary.app.clients.values()) if c.key and c.key[0] == conn.info.backend_pid)
        conn.execute("SET search_path TO public")
        conn.execute("LISTEN jobs")
        conn.execute("PREPARE q AS SELECT 1")
        with conn.transaction():
            conn.execute("SET work_mem = '3MB'")
        conn.execute("BEGIN")
        conn.execute("SET work_mem = '9MB'")  # rolled back
        conn.execute("ROLLBACK")
        want = ["SET search_path TO public", "SET work_mem = '3MB'", "PREPARE q AS SELECT 1", 'LISTEN "jobs"']
        assert wait_for(lambda: sid in imports.session_state and imports.session_state[sid].restore_sql() == want), \
            imports.session_state.get(sid) and imports.session_state[sid].restore_sql()  # fmt: skip
        assert imports.session_state[sid].movable
        conn.execute("CREATE TEMP TABLE scratch (a int)")
        assert wait_for(lambda: imports.session_state[sid].not_movable == ["temporary objects"])
        assert wait_for(lambda: imports.sessions_not_movable == 1)
    assert wait_for(lambda: sid not in imports.session_state)  # forgotten with the session
