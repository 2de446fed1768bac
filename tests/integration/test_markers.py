"""Purge markers and DDL capture (replay/markers.py): connmgr embeds in each writing
transaction -- before an explicit COMMIT, or inside an autocommit statement's own implicit
transaction -- a row of connmgr.markers naming the session and transaction, and before a
DDL statement a logical message carrying it; the client sees nothing of either."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import psycopg
import pytest
from connmgr_fixtures import wait_for

from replay import markers
from replay.mirror_protocol import Marker
from replay.pgoutput import Begin, Insert, Message, Relation, Update, decode_pgoutput


@pytest.fixture
def wal_watch(pg):
    """A temporary pgoutput slot on `pg`; returns a function listing what connmgr left in
    the WAL since: ``("mark", xid, "origin:session:seq")`` for each marker row written and
    ``("ddl", xid, statement)`` for each captured DDL statement, in commit order."""
    conn = pg.connect(dbname="app", autocommit=True)
    conn.execute("CREATE TABLE IF NOT EXISTS markers_t (v int)")
    conn.execute("ALTER TABLE markers_t REPLICA IDENTITY FULL")
    conn.execute("DROP PUBLICATION IF EXISTS markers_pub")
    conn.execute("CREATE PUBLICATION markers_pub FOR TABLE markers_t, connmgr.markers")
    slot = "markers_watch"
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', true)", (slot,))

    def watch() -> list[tuple[str, int, str]]:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'markers_pub', 'messages', 'true')",
            (slot,),
        ).fetchall()
        out, xid, names = [], None, {}
        for (data,) in rows:
            msg = decode_pgoutput(bytes(data))
            if isinstance(msg, Begin):
                xid = msg.xid
            elif isinstance(msg, Relation):
                names[msg.oid] = (msg.qualified_name, [c.name for c in msg.columns])
            elif isinstance(msg, Insert | Update) and names[msg.relation_oid][0] == "connmgr.markers":
                row = dict(zip(names[msg.relation_oid][1], msg.new, strict=True))
                out.append(("mark", xid, b":".join(row[k] for k in ("origin", "session", "seq")).decode()))
            elif isinstance(msg, Message) and msg.prefix == markers.DDL_PREFIX:
                out.append(("ddl", xid, markers.parse_ddl_message(msg.content).sql))
        return out

    yield watch
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    conn.execute("DROP PUBLICATION IF EXISTS markers_pub")
    conn.close()


def session_of(cm, conn):
    return next(c for c in list(cm.app.clients.values()) if c.key and c.key[0] == conn.info.backend_pid)


def marks_of(watch, cm, sid) -> list[tuple[int, int]]:
    """(xid, seq) of the marker rows session ``sid`` of connmgr ``cm`` wrote."""
    prefix = f"{cm.app.origin}:{sid}:"
    return [(x, int(c.rsplit(":", 1)[1])) for kind, x, c in watch() if kind == "mark" and c.startswith(prefix)]


def mirrored_marks(received, sid) -> list[int]:
    return sorted(r.seq for r in list(received) if isinstance(r, Marker) and r.session_id == sid)


def test_committing_writers_are_marked_readers_are_not(pair, wal_watch):
    primary, _secondary, received = pair
    with psycopg.connect(primary.conninfo(password="postgres")) as conn:
        sid = session_of(primary, conn).id
        xids = []
        base = random.randrange(1 << 20, 1 << 30)  # this test's rows in the shared table
        for v in range(3):  # three writing transactions: 1, 2, 3
            with conn.transaction():
                conn.execute("INSERT INTO markers_t VALUES (%s)", (base + v,))
                xids.append(conn.execute("SELECT txid_current()").fetchone()[0])
        with conn.transaction():  # 4: read-only -> no marker row, and no xid forced
            assert conn.execute("SELECT count(*) FROM markers_t WHERE v BETWEEN %s AND %s",
                                (base, base + 2)).fetchone()[0] == 3  # fmt: skip
            assert conn.execute("SELECT txid_current_if_assigned()").fetchone()[0] is None
        with conn.transaction():  # 5: writes again
            conn.execute("INSERT INTO markers_t VALUES (99)")
        conn.rollback()
    mine = marks_of(wal_watch, primary, sid)
    assert [q for _x, q in mine] == [1, 2, 3, 5]
    assert [x for x, _q in mine][:3] == xids  # the marker is in the transaction's own WAL
    # the secondary hears of a marker only when it wrote its row (the primary saw its result)
    assert wait_for(lambda: mirrored_marks(received, sid) == [1, 2, 3, 5])


def test_autocommit_writes_are_marked_in_both_protocols(pair, wal_watch):
    primary, _secondary, received = pair
    with psycopg.connect(primary.conninfo(password="postgres"), autocommit=True) as conn:
        sid = session_of(primary, conn).id
        conn.execute("INSERT INTO markers_t VALUES (1)")  # 1: simple protocol (no parameters)
        conn.execute("INSERT INTO markers_t VALUES (%s)", (2,))  # 2: extended, implicit transaction
        conn.execute("SELECT 1")  # 3: a reader: nothing
        conn.execute("UPDATE markers_t SET v = v WHERE false")  # 4: writes no row: no xid, no marker
        with pytest.raises(psycopg.errors.DivisionByZero):  # 5: fails: rolled back, nothing
            conn.execute("INSERT INTO markers_t VALUES (1/0)")
        with pytest.raises(psycopg.errors.DivisionByZero):  # 6: the same, extended
            conn.execute("INSERT INTO markers_t VALUES (%s/0)", (1,))
        cur = conn.execute("INSERT INTO markers_t VALUES (7), (7) RETURNING v")  # 7: rows come back intact
        assert cur.fetchall() == [(7,), (7,)] and cur.statusmessage == "INSERT 0 2"
        with conn.cursor().copy("COPY markers_t FROM STDIN") as copy:  # 8: COPY
            copy.write_row((8,))
        conn.execute("DELETE FROM markers_t WHERE v = %s", (8,))  # 9
        rel = primary.app.clients[sid].relay
        assert (rel.injector.injected, rel.injector.injected_done, rel.injector.injected_errors) == (8, 8, 2)  # not 3 (a reader)
    assert [q for _x, q in marks_of(wal_watch, primary, sid)] == [1, 2, 7, 8, 9]
    assert wait_for(lambda: mirrored_marks(received, sid) == [1, 2, 7, 8, 9])


def test_pipelined_and_prepared_autocommit(pair, wal_watch):
    primary, _secondary, _received = pair
    with psycopg.connect(primary.conninfo(password="postgres"), autocommit=True) as conn:
        sid = session_of(primary, conn).id
        # 1 is psycopg's Parse+Sync (an empty transaction: ReadyForQuery numbers them),
        # 2-4 the Bind/Execute/Sync of the prepared statement
        base = random.randrange(1 << 20, 1 << 30)  # this test's rows in the shared table
        for v in range(3):
            conn.execute("INSERT INTO markers_t VALUES (%s)", (base + v,), prepare=True)
        # 5: a pipeline sends one Sync at its end: the three inserts are one implicit
        # transaction, marked once
        with conn.pipeline():
            for v in range(3):
                conn.execute("INSERT INTO markers_t VALUES (%s)", (base + v,))
        # 6, 7: Pipeline.sync() also collects the results, so each segment starts with
        # nothing in flight and is marked
        with conn.pipeline() as p:
            conn.execute("INSERT INTO markers_t VALUES (10)")
            p.sync()
            conn.execute("INSERT INTO markers_t VALUES (11)")
            p.sync()
        assert conn.execute("SELECT count(*) FROM markers_t WHERE v BETWEEN %s AND %s",
                            (base, base + 2)).fetchone()[0] == 6  # fmt: skip
    assert [q for _x, q in marks_of(wal_watch, primary, sid)] == [2, 3, 4, 5, 6, 7]


def test_ddl_is_captured_with_role_and_search_path(pair, wal_watch):
    primary, _secondary, _received = pair
    with psycopg.connect(primary.conninfo(password="postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE markers_ddl (a int)")  # autocommit DDL
        conn.execute("BEGIN")
        conn.execute("ALTER TABLE markers_ddl ADD COLUMN b text")  # in a block
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE markers_gone (a int)")  # rolled back: never captured
        conn.execute("ROLLBACK")
        conn.execute("CREATE TEMP TABLE markers_tmp (a int)")  # session-local: not captured
        conn.execute("CREATE INDEX CONCURRENTLY markers_ddl_a ON markers_ddl (a)")  # outside blocks: logged
        conn.execute("DROP TABLE markers_ddl")
        relay = primary.app.clients[session_of(primary, conn).id].relay
        assert (relay.injector.ddl_captured, relay.injector.ddl_not_captured) == (4, 1)
    ddl = [c for kind, _x, c in wal_watch() if kind == "ddl"]
    assert ddl == ["CREATE TABLE markers_ddl (a int)", "ALTER TABLE markers_ddl ADD COLUMN b text",
                   "DROP TABLE markers_ddl"]  # fmt: skip


def test_the_client_sees_exactly_what_it_would_see_direct(pair, pg, tmp_path):
    primary, _s, _r = pair
    script = tmp_path / "s.sql"
    script.write_text(
        "CREATE TABLE IF NOT EXISTS markers_psql (v int);\n"
        "BEGIN;\nINSERT INTO markers_psql VALUES (1);\nCOMMIT;\n"
        "BEGIN;\nSELECT 1;\nEND;\n"
        "BEGIN;\nSELECT 1/0;\nCOMMIT;\n"  # a failed block: COMMIT answers ROLLBACK
        "INSERT INTO markers_psql VALUES (2) RETURNING v, 'x' AS connmgr;\n"  # autocommit, rows back
        "INSERT INTO markers_psql VALUES (3) -- a trailing comment\n;\n"
        "UPDATE markers_psql SET v = v + 10 WHERE v = 1/0;\n"  # autocommit error
        "COPY markers_psql FROM STDIN;\n4\n5\n\\.\n"
        "WITH d AS (DELETE FROM markers_psql WHERE v = 5 RETURNING v) SELECT count(*) FROM d;\n"
        "\\set VERBOSITY verbose\nINSERT INTO markers_psql VALUES ('x');\n"  # error with position
        "BEGIN;\nALTER TABLE markers_psql ADD COLUMN w int;\nCOMMIT;\n"
        "CREATE TABLE markers_bad (a nosuchtype);\n"  # autocommit DDL error: its position
        "CREATE TABLE markers_psql2 (a int);\nDROP TABLE markers_psql2;\n"
        "SELECT * FROM markers_psql ORDER BY v;\nDROP TABLE markers_psql;\n"
    )

    def run(host, port):
        r = subprocess.run(
            [shutil.which("psql") or "psql", "-X", "-a", "-h", host, "-p", str(port), "-U", "postgres", "-d", "app", "-f", str(script)],
            capture_output=True, text=True, timeout=60, env={"PGPASSWORD": "postgres", "PATH": os.environ["PATH"]},
        )
        return r.stdout, r.stderr.replace(f"port {port}", "PORT")

    via = run(primary.host, primary.port)
    direct = run(pg.host, pg.port)
    assert via == direct
    assert "ROLLBACK" in via[0] and "division by zero" in via[1]
    conn = primary.app
    assert conn.metrics.client_errors == {}  # the errors are the server's, relayed: none is connmgr's


def test_prepare_db_installs_what_markers_need(pg):
    name = "prep_markers"
    pg.create_database(name)
    try:
        dsn = pg.conninfo(name)
        r = subprocess.run([sys.executable, "-m", "connmgr", "prepare-db", dsn], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip().endswith(f"/{name}: connmgr.markers and connmgr.mark() ready"), r
        with pg.connect(dbname=name, autocommit=True) as c:
            assert c.execute(markers.CHECK_SQL).fetchone() == (True,)
            c.execute("CREATE TABLE t (v int)")
            c.execute("BEGIN")
            assert c.execute("SELECT connmgr.mark(1, 2, 3)").fetchone() == (None,)  # no xid yet: nothing
            c.execute("INSERT INTO t VALUES (1)")
            assert c.execute("SELECT connmgr.mark(1, 2, 3)").fetchone() == (True,)
            c.execute("COMMIT")
            assert c.execute("SELECT origin, session, seq FROM connmgr.markers").fetchall() == [(1, 2, 3)]
        again = subprocess.run([sys.executable, "-m", "connmgr", "prepare-db", dsn], capture_output=True, text=True, timeout=60)
        assert again.returncode == 0  # idempotent
        bad = subprocess.run([sys.executable, "-m", "connmgr", "prepare-db", dsn.replace(name, "no_such_db")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert bad.returncode == 1 and "no_such_db" in bad.stderr
    finally:
        with pg.connect() as c:
            c.autocommit = True
            c.execute(f"DROP DATABASE {name} WITH (FORCE)")
