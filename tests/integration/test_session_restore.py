"""replay.session_recorder against real servers: the restore script rebuilds exactly the
settings a session had, and the secondary connmgr follows each session's state from the
mirror, off the client's path."""

from __future__ import annotations

import psycopg

from replay.session_recorder import SessionRecorder


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
