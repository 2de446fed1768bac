"""Purge markers (replay/__init__.py): connmgr embeds, just before a client's COMMIT, a
transactional logical message naming the session and transaction -- only if the
transaction wrote -- and the client sees nothing of it."""

from __future__ import annotations

import subprocess

import psycopg
import pytest
from connmgr_fixtures import wait_for

from connmgr.mirror_protocol import Marker
from replay.pgoutput import Begin, Message, decode_pgoutput


@pytest.fixture
def wal_watch(pg):
    """A temporary pgoutput slot on `pg`; returns a function listing the connmgr markers
    decoded since, as (xid, content)."""
    conn = pg.connect(dbname="app")
    slot = "markers_watch"
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', true)", (slot,))

    def markers() -> list[tuple[int, str]]:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'markers_pub', 'messages', 'true')",
            (slot,),
        ).fetchall()
        out, xid = [], None
        for (data,) in rows:
            msg = decode_pgoutput(bytes(data))
            if isinstance(msg, Begin):
                xid = msg.xid
            elif isinstance(msg, Message) and msg.prefix == "connmgr":
                out.append((xid, msg.content.decode()))
        return out

    yield markers
    conn.close()  # the temporary slot goes with its session


def session_of(cm, conn):
    return next(c for c in list(cm.app.clients.values()) if c.key and c.key[0] == conn.info.backend_pid)


def test_committing_writers_are_marked_readers_are_not(pair, pg, wal_watch):
    primary, _secondary, received = pair
    with pg.connect(dbname="app") as c:
        c.execute("CREATE TABLE IF NOT EXISTS markers_t (v int)")
        c.execute("CREATE PUBLICATION markers_pub FOR TABLE markers_t")
    try:
        with psycopg.connect(primary.conninfo(password="postgres")) as conn:
            sid = session_of(primary, conn).id
            xids = []
            for v in range(3):  # three writing transactions: 1, 2, 3
                with conn.transaction():
                    conn.execute("INSERT INTO markers_t VALUES (%s)", (v,))
                    xids.append(conn.execute("SELECT txid_current()").fetchone()[0])
            with conn.transaction():  # 4: read-only -> no marker, and no xid forced
                assert conn.execute("SELECT count(*) FROM markers_t").fetchone()[0] >= 3
                assert conn.execute("SELECT txid_current_if_assigned()").fetchone()[0] is None
            with conn.transaction():  # 5: writes again
                conn.execute("INSERT INTO markers_t VALUES (99)")
            conn.rollback()
        marks = wal_watch()
        mine = [(x, c) for x, c in marks if c.startswith(f"{sid}:")]
        assert [c for _x, c in mine] == [f"{sid}:1", f"{sid}:2", f"{sid}:3", f"{sid}:5"]
        assert [x for x, _c in mine][:3] == xids  # the marker is in the transaction's own WAL
        assert wait_for(lambda: any(isinstance(r, Marker) and r.session_id == sid and r.seq == 5 for r in received))
        mirrored = sorted(r.seq for r in received if isinstance(r, Marker) and r.session_id == sid)
        assert mirrored == [1, 2, 3, 4, 5]  # sent for every COMMIT; the server decides if it writes
    finally:
        with pg.connect(dbname="app") as c:
            c.execute("DROP PUBLICATION IF EXISTS markers_pub")
            c.execute("DROP TABLE IF EXISTS markers_t")


def test_the_client_sees_exactly_what_it_would_see_direct(pair, pg, tmp_path):
    primary, _s, _r = pair
    script = tmp_path / "s.sql"
    script.write_text(
        "CREATE TABLE IF NOT EXISTS markers_psql (v int);\n"
        "BEGIN;\nINSERT INTO markers_psql VALUES (1);\nCOMMIT;\n"
        "BEGIN;\nSELECT 1;\nEND;\n"
        "BEGIN;\nSELECT 1/0;\nCOMMIT;\n"  # a failed block: COMMIT answers ROLLBACK
        "SELECT count(*) FROM markers_psql;\nDROP TABLE markers_psql;\n"
    )

    def run(host, port):
        r = subprocess.run(
            ["psql", "-X", "-a", "-h", host, "-p", str(port), "-U", "postgres", "-d", "app", "-f", str(script)],
            capture_output=True, text=True, timeout=60, env={"PGPASSWORD": "postgres", "PATH": "/usr/bin:/bin"},
        )
        return r.stdout, r.stderr.replace(f"port {port}", "PORT")

    via = run(primary.host, primary.port)
    direct = run(pg.host, pg.port)
    assert via == direct
    assert "ROLLBACK" in via[0] and "division by zero" in via[1]
    conn = primary.app
    assert conn.metrics.client_errors == {} or set(conn.metrics.client_errors) <= {"22012"}
