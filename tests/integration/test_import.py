"""The import process on the secondary, end to end on real servers: mirrored sessions
into the import queue, commits read from the primary's WAL (our pgoutput slot) purge
exactly their own transactions (seed 004 Fig. 8)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import psycopg
import pytest
from connmgr_fixtures import wait_for

from connmgr.ops.prometheus import render
from replay import markers
from replay.import_queue import Outcome


@pytest.fixture
def importdb(pg):
    """A fresh database with a publication FOR ALL TABLES (dropped afterwards)."""
    name = f"imp_{uuid.uuid4().hex[:8]}"
    pg.create_database(name)
    with pg.connect(dbname=name) as c:
        c.execute(markers.SCHEMA_SQL)
        c.execute("CREATE TABLE seed_t (id serial PRIMARY KEY, v text)")
        c.execute("CREATE PUBLICATION connmgr FOR ALL TABLES")
    yield name
    with pg.connect() as c:
        for _ in range(50):  # the poster's walsender may still be closing
            c.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = %s AND active", (name,))
            c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s AND NOT active", (name,))
            if not c.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s", (name,)).fetchone():
                break
            time.sleep(0.1)
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def pair_with_poster(start_connmgr, pg, importdb):
    secondary = start_connmgr(
        mirror={"listen": "127.0.0.1:0"},
        poster={"host": pg.host, "port": pg.port, "password": "postgres", "dbname": importdb,
                "slot": f"poster_{importdb}", "temporary": True},
    )
    # the slot must exist before the sessions commit, or their commits are never decoded
    assert wait_for(lambda: secondary.app.imports.poster_connected), "poster never connected"
    host, port = secondary.app.mirror_listen_address
    primary = start_connmgr(
        mirror={"peer": f"{host}:{port}", "heartbeat_interval": 0.05},
        redo={"user": "postgres", "password": "postgres", "interval": 0.002},
    )
    assert wait_for(lambda: primary.app.mirror.connected)
    return primary, secondary, importdb


def session_id(cm, conn) -> int:
    return next(c.id for c in list(cm.app.clients.values()) if c.key and c.key[0] == conn.info.backend_pid)


def test_seed_004_example_p1_p2_p3(pair_with_poster):
    """P1 = a statement, P2 = the commit, P3 = a new statement still open after the commit:
    the commit decoded from the WAL purges transaction 1 exactly; the queue then holds
    only P3's work."""
    primary, secondary, db = pair_with_poster
    imports = secondary.app.imports
    purged = []
    imports.on_purge.append(purged.extend)
    with psycopg.connect(primary.conninfo(password="postgres", dbname=db)) as conn:
        sid = session_id(primary, conn)
        conn.execute("INSERT INTO seed_t (v) VALUES ('P1')")  # P1 (BEGIN + statement)
        (xid,) = conn.execute("SELECT txid_current()").fetchone()
        conn.commit()  # P2: the marker goes in front of it
        conn.execute("INSERT INTO seed_t (v) VALUES ('P3')")  # P3: open
        assert wait_for(lambda: any(t.session_id == sid for t in purged)), "transaction 1 was never purged"
        (t1,) = [t for t in purged if t.session_id == sid]
        assert (t1.seq, t1.outcome, t1.xid, t1.marked) == (1, Outcome.COMMITTED_ACK, xid, True)
        assert t1.first_lsn <= t1.commit_lsn  # the first tag is a lower bound of its WAL
        assert any(b"'P1'" in m.raw for m in t1.requests)
        # P3's statement joins the open transaction once its reply is mirrored
        assert wait_for(lambda: any(b"'P3'" in m.raw for t in imports.queue.open_transactions(sid) for m in t.requests))
        (open_tx,) = imports.queue.open_transactions(sid)
        assert open_tx.outcome is Outcome.OPEN and open_tx.seq == 2
        assert any(b"'P3'" in m.raw for m in open_tx.requests)
        assert not any(b"'P1'" in m.raw for m in open_tx.requests)
        conn.rollback()
    assert wait_for(lambda: imports.queue.depth(sid) == 0)


@pytest.mark.parametrize("protocol, per_client", [("simple", 1250), ("extended", 250), ("prepared", 250)])
def test_concurrent_sessions_purge_their_own_and_pgbench_leaves_queues_empty(pair_with_poster, pg, protocol, per_client):
    """8 pgbench clients (tpcb-like; 10,000 transactions with the simple protocol, 2,000
    with extended and prepared; overlapping LSN ranges): every committed transaction is
    purged from its own session's queue by its own marker; after an idle moment every
    queue is empty."""
    primary, secondary, db = pair_with_poster
    imports = secondary.app.imports
    env = {"PGPASSWORD": "postgres", "PATH": os.environ["PATH"]}
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", "postgres", db],
                          capture_output=True, text=True, env=env, timeout=120)
    assert init.returncode == 0, init.stderr
    r = subprocess.run(["pgbench", "-n", "-c", "8", "-j", "2", "-t", str(per_client), "-M", protocol,
                        "-h", primary.host, "-p", str(primary.port), "-U", "postgres", db],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    total = 8 * per_client
    assert f"number of transactions actually processed: {total}/{total}" in r.stdout, r.stdout
    q = imports.queue
    assert wait_for(lambda: q.transactions == 0 and q.sessions == 0, timeout=30), (q.depths(), q.stats)
    stats = q.stats
    # `purged` counts marker purges only: every writing transaction left by its own marker
    # (or with its session, if that closed before its commit was decoded). Read-only
    # "transactions" -- pgbench's startup queries, a PQprepare while idle -- leave at their ack.
    assert stats.purged + stats.dropped_at_close >= total
    assert (stats.bad_markers, stats.verdict_conflicts, stats.desyncs) == (0, 0, 0)
    assert stats.stale_markers <= stats.dropped_at_close  # records arriving after their session closed
    assert imports.not_replayable == set()
    assert stats.unmatched_commits <= 20  # only pgbench -i, which ran direct, commits without markers


def test_pair_metrics(pair_with_poster):
    """Prometheus figures of the pair: mirror lag, redo LSN, poster, purges."""
    primary, secondary, db = pair_with_poster

    q = secondary.app.imports.queue
    with psycopg.connect(primary.conninfo(password="postgres", dbname=db)) as conn:
        conn.execute("INSERT INTO seed_t (v) VALUES ('m')")
        conn.commit()
        # (kept open: a session that closes before its commit is decoded is simply dropped)
        assert wait_for(lambda: q.stats.purged >= 1), q.stats
    assert wait_for(lambda: primary.app.mirror.sender.acked_version == primary.app.mirror.sender.latest_version)

    def parse(text):
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}

    def primary_metrics():
        return parse(primary.run_sync(render, primary.app.exported))

    def settled():  # acks are coalesced, and records may still be on their way
        p, s = primary_metrics(), parse(secondary.run_sync(render, secondary.app.exported))
        return p["connmgr_mirror_lag_versions"] == 0 and s["connmgr_mirror_records_received"] == p["connmgr_mirror_latest_version"]

    assert wait_for(settled)
    p, s = primary_metrics(), parse(secondary.run_sync(render, secondary.app.exported))
    assert p["connmgr_mirror_connected"] == 1
    assert p["connmgr_redo_lsn"] > 0 and p["connmgr_redo_healthy"] == 1
    assert s["connmgr_import_purged"] >= 1 and s["connmgr_poster_connected"] == 1
    # replication lag as the poster reader sees it: the commit reached it within seconds,
    # and once idle nothing is left between what it processed and the server's WAL end
    assert 0 < s["connmgr_replication_lag_seconds"] < 5
    assert s["connmgr_replication_poster_lsn"] > 0
    assert wait_for(lambda: parse(secondary.run_sync(render, secondary.app.exported))["connmgr_replication_lag_bytes"] == 0)
    assert p["connmgr_markers_written_total"] >= 1
    assert s["connmgr_mirror_records_received"] >= 1


def test_sessions_of_another_database_than_the_posters_are_loud(caplog):
    """A secondary connmgr whose [poster] dbname is not the application's database: the
    first mirrored session of that database logs one ERROR naming the setting and the fix,
    and every such session is counted."""
    from connmgr.pair.import_process import ImportProcess
    from replay.mirror_protocol import SessionOpened

    imp = ImportProcess(database="postgres")
    with caplog.at_level("ERROR", logger="connmgr.import"):
        imp.on_records([SessionOpened(1, 1, (("user", "u"), ("database", "app"))),
                        SessionOpened(2, 2, (("user", "u"), ("database", "app"))),
                        SessionOpened(3, 3, (("user", "u"), ("database", "postgres")))])  # fmt: skip
    assert imp.foreign_sessions == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "set [poster] dbname = 'app'" in errors[0]
