"""Maintenance delays (issue 16, seed 004 [0099]-[0101]) through a real connmgr and
Postgres, on both relays (the engine and the trio pumps).

What must hold: once an object is under maintenance, a statement that touches it waits,
its connection kept, while other objects and clients go on; the maintenance job's own
session is not held; when the entry ends, the held statement runs (after the job's DDL:
it sees the new column); after ``[policy] maintenance_wait`` it fails with 55P03 naming
the object, nothing of it run, the session usable (a transaction aborted as by any
error); a transaction that began before the maintenance goes on (no deadlock with the
job, which waits for that transaction's locks on the server).
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest
from connmgr_fixtures import wait_for

from connmgr.ops.cli import main as cli_main


@pytest.fixture(params=["engine", "tasks"])
def maintained(request, pg, start_connmgr):
    u = uuid.uuid4().hex[:8]
    names = {"m": f"maint_{u}", "o": f"other_{u}"}
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        for t in names.values():
            c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY)")
            c.execute(f"INSERT INTO {t} VALUES (1), (2)")
    cm = start_connmgr(server={"admin_users": ["postgres"], "relay": request.param},
                       policy={"maintenance_wait": 2.0})  # fmt: skip
    yield cm, names
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        for t in names.values():
            c.execute(f"DROP TABLE IF EXISTS {t}")


def _console(cm, sql: str) -> list:
    with psycopg.connect(cm.conninfo("postgres", "connmgr", "postgres"), autocommit=True) as c:
        return c.execute(sql).fetchall()


def _in_thread(cm, sql: str, **kw) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            with psycopg.connect(cm.conninfo("postgres", "app", "postgres"), autocommit=True, **kw) as c:
                box["started"] = time.monotonic()
                cur = c.execute(sql)
                if cur.description is not None:
                    box["rows"] = cur.fetchall()
                    box["columns"] = [d.name for d in cur.description]
                box["ended"] = time.monotonic()
        except psycopg.Error as e:
            box["error"] = e
            box["ended"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_a_statement_on_an_object_under_maintenance_waits_then_runs(maintained):
    cm, names = maintained
    m, o = names["m"], names["o"]
    assert _console(cm, f"MAINTENANCE BEGIN public.{m}")[0][:2] == (f"public.{m}", "connmgr-maintenance*")
    assert [r[0] for r in _console(cm, "SHOW MAINTENANCE")] == [f"public.{m}"]
    held, box = _in_thread(cm, f"SELECT * FROM {m} ORDER BY id")
    with psycopg.connect(cm.conninfo("postgres", "app", "postgres"), autocommit=True) as c:
        assert c.execute(f"SELECT count(*) FROM {o}").fetchone() == (2,)  # another object: not held
        assert c.execute("SELECT 1").fetchone() == (1,)
    time.sleep(0.4)
    assert "ended" not in box, box  # still held
    with psycopg.connect(cm.conninfo("postgres", "app", "postgres", application_name="connmgr-maintenance job"),
                         autocommit=True) as job:  # fmt: skip  # the job itself is not held
        job.execute(f"ALTER TABLE {m} ADD COLUMN note text DEFAULT 'after'")
    assert "ended" not in box, box
    assert _console(cm, f"MAINTENANCE END PUBLIC.{m.upper()}")[0][0] == f"public.{m}"  # (spelled as begun)
    held.join(10)
    assert box.get("rows") == [(1, "after"), (2, "after")] and box["columns"] == ["id", "note"], box
    assert _console(cm, "SHOW MAINTENANCE") == []


def test_the_wait_is_bounded_by_55p03_naming_the_object(maintained):
    cm, names = maintained
    m = names["m"]
    _console(cm, f"MAINTENANCE BEGIN {m}")
    try:
        with psycopg.connect(cm.conninfo("postgres", "app", "postgres")) as c:
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable) as err:
                c.execute(f"UPDATE {m} SET id = id + 10 WHERE id = %s", (1,))  # extended protocol
            waited = time.monotonic() - started
            assert 1.8 <= waited <= 8, waited
            assert f"{m} is under maintenance (connmgr)" in str(err.value)
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):  # aborted as by any error
                c.execute("SELECT 1")
            c.rollback()
            assert c.execute("SELECT 1").fetchone() == (1,)  # the session goes on
            c.rollback()
        with psycopg.connect(cm.conninfo("postgres", "app", "postgres"), autocommit=True) as c:
            with pytest.raises(psycopg.errors.LockNotAvailable):
                psycopg.ClientCursor(c).execute(f"SELECT 1; DELETE FROM {m}")  # simple protocol
    finally:
        _console(cm, f"MAINTENANCE END {m}")
    with psycopg.connect(cm.conninfo("postgres", "app", "postgres"), autocommit=True) as c:
        assert c.execute(f"SELECT id FROM {m} ORDER BY id").fetchall() == [(1,), (2,)]  # nothing of them ran


def test_a_transaction_begun_before_the_maintenance_goes_on(maintained):
    """Its locks are what the job waits for: holding it would deadlock the two."""
    cm, names = maintained
    m = names["m"]
    with psycopg.connect(cm.conninfo("postgres", "app", "postgres")) as tx:
        assert tx.execute(f"SELECT count(*) FROM {m}").fetchone() == (2,)  # its lock on the table
        _console(cm, f"MAINTENANCE BEGIN {m}")
        try:
            job, box = _in_thread(cm, f"ALTER TABLE {m} ADD COLUMN later int", application_name="connmgr-maintenance")
            assert wait_for(lambda: tx.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] >= 1,
                            5, "the job waiting for the transaction's lock")  # fmt: skip
            assert tx.execute(f"SELECT count(*) FROM {m}").fetchone() == (2,)  # not held
            tx.commit()
            job.join(10)
            assert "error" not in box and "ended" in box, box
        finally:
            _console(cm, f"MAINTENANCE END {m}")


def test_the_command_line_begins_and_ends_it(maintained, monkeypatch, capsys):
    cm, names = maintained
    monkeypatch.setenv("PGPASSWORD", "postgres")
    address = f"{cm.host}:{cm.port}"
    assert cli_main(["maintenance", "begin", f"public.{names['m']}", address, "--by", "nightly*"]) == 0
    assert f"public.{names['m']}: under maintenance since" in capsys.readouterr().out
    assert _console(cm, "SHOW MAINTENANCE")[0][:2] == (f"public.{names['m']}", "nightly*")
    assert cli_main(["maintenance", "end", f"public.{names['m']}", address]) == 0
    assert cli_main(["maintenance", "end", f"public.{names['m']}", address]) == 1  # (not under maintenance)
    assert "42704" in capsys.readouterr().err
    assert cli_main(["maintenance", "begin", "a.b.c", address]) == 1
