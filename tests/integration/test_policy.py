"""The policy's refusals (issue 16, first part) through a real connmgr in front of the
session's Postgres, with real clients: psql (simple protocol) and psycopg (extended).

What must hold: a statement on a refused object or of a refused kind gets 42501 naming
the object or kind and the rule, and nothing of it runs; inside a transaction the
transaction is aborted as Postgres leaves it (25P02 afterwards); the statements before it
in a Query ran, those after it did not; a client no class takes is not restricted; a
statement the analyser cannot read is refused to a class that restricts objects; the
refusals are counted by class.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
import uuid

import psycopg
import pytest

CLASS_USER, CLASS_PASSWORD = "scram_user", "scram-pw"


@pytest.fixture
def tables(pg):
    """(open table, secret table), fresh, readable and writable by the class's user."""
    suffix = uuid.uuid4().hex[:8]
    open_t, secret_t = f"open_{suffix}", f"secret_{suffix}"
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        for t in (open_t, secret_t):
            c.execute(f"CREATE TABLE public.{t} (id int PRIMARY KEY, v text)")
            c.execute(f"INSERT INTO public.{t} VALUES (1, 'one')")
            c.execute(f"GRANT ALL ON public.{t} TO {CLASS_USER}")
    yield open_t, secret_t
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        for t in (open_t, secret_t):
            c.execute(f"DROP TABLE IF EXISTS public.{t}")


@pytest.fixture
def guarded(start_connmgr, tmp_path, tables):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[class]]\nname = "restricted"\n'
        f'users = ["{CLASS_USER}"]\n'
        'refuse_kinds = ["TRUNCATE", "DDL"]\n'
        'refuse_objects = ["public.secret_*", "function:pg_read_file"]\n'
    )
    return start_connmgr(policy={"file": str(policy), "catalog_refresh": 0.2}, metrics={"listen": "127.0.0.1:0"},
                         redo={"user": "postgres", "password": "postgres"})


def _connect(cm, user: str = CLASS_USER, password: str = CLASS_PASSWORD, **kw) -> psycopg.Connection:
    return psycopg.connect(cm.conninfo(user, "app", password), **kw)


def _psql(cm, sql: str, user: str = CLASS_USER, password: str = CLASS_PASSWORD) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=0", "-At", "-c", sql,
                           cm.conninfo(user, "app", password)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_a_refused_table_gets_42501_naming_it_and_the_rule(guarded, tables):
    open_t, secret_t = tables
    with _connect(guarded, autocommit=True) as c:
        assert c.execute(f"SELECT v FROM {open_t}").fetchall() == [("one",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            c.execute(f"SELECT v FROM {secret_t} WHERE id = %s", (1,))  # extended protocol, a parameter
        assert err.value.sqlstate == "42501"
        assert f"table public.{secret_t}" in str(err.value) and "connmgr policy" in str(err.value)
        assert "refuse_objects 'public.secret_*'" in err.value.diag.message_detail
        # the session goes on; the refused name is a CTE's here, not the table: allowed
        assert c.execute(f"WITH {secret_t} AS (SELECT 7 AS v) SELECT v FROM {secret_t}").fetchall() == [(7,)]
        for sql in (f"SELECT * FROM (SELECT * FROM public.{secret_t}) s", f"DELETE FROM {secret_t}",
                    f"EXPLAIN ANALYZE DELETE FROM {secret_t}", "SELECT pg_read_file('/etc/hostname')",
                    f"TRUNCATE {open_t}", "CREATE TABLE should_not_exist (a int)"):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)
    with psycopg.connect(guarded.conninfo("postgres", "app", "postgres"), autocommit=True) as admin:
        assert admin.execute(f"SELECT count(*) FROM {secret_t}").fetchone() == (1,)  # nothing deleted
        assert admin.execute(f"SELECT count(*) FROM {open_t}").fetchone() == (1,)  # nothing truncated
        assert admin.execute("SELECT to_regclass('should_not_exist')").fetchone() == (None,)


def test_a_refusal_in_a_transaction_aborts_it_as_postgres_would(guarded, tables):
    open_t, secret_t = tables
    with _connect(guarded) as c:
        c.execute(f"INSERT INTO {open_t} VALUES (2, 'two')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"SELECT * FROM {secret_t}")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):  # 25P02
            c.execute("SELECT 1")
        c.rollback()
        assert c.execute(f"SELECT count(*) FROM {open_t}").fetchone() == (1,)  # the insert rolled back


def test_a_query_runs_up_to_its_refused_statement(guarded, tables):
    open_t, secret_t = tables
    r = _psql(guarded, f"INSERT INTO {open_t} VALUES (3, 'three'); SELECT * FROM {secret_t};"
                       f" INSERT INTO {open_t} VALUES (4, 'four')")  # fmt: skip
    assert "permission denied for table" in r.stderr and secret_t in r.stderr, r.stderr
    # one Query is one implicit transaction: the error rolled back the statement before it too
    # (as direct), and the one after it never ran
    r = _psql(guarded, f"SELECT id FROM {open_t} ORDER BY id", user="postgres", password="postgres")
    assert r.stdout.split() == ["1"], r
    # psql's own statements run in their own Queries: the first commits, the refused one does not run
    r = subprocess.run(["psql", "-X", "-At", "-c", f"INSERT INTO {open_t} VALUES (5, 'five')", "-c",
                        f"DELETE FROM {secret_t}", guarded.conninfo(CLASS_USER, "app", CLASS_PASSWORD)],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert "42501" in r.stderr or "permission denied" in r.stderr, r.stderr
    r = _psql(guarded, f"SELECT (SELECT count(*) FROM {open_t}), (SELECT count(*) FROM {secret_t})",
              user="postgres", password="postgres")  # fmt: skip
    assert r.stdout.strip() == "2|1", r


def test_a_statement_the_analyser_cannot_read_is_refused_to_a_restricted_class(guarded, tables):
    open_t, _secret = tables
    with _connect(guarded, autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            c.execute(f"DO $$BEGIN PERFORM 1 FROM {open_t}; END$$")  # dynamic SQL
        assert "cannot analyse" in str(err.value) and "fail closed" in err.value.diag.message_detail


def test_a_client_no_class_takes_is_not_restricted_and_refusals_are_counted(guarded, tables):
    _open, secret_t = tables
    with _connect(guarded, autocommit=True) as c:
        for _ in range(3):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT * FROM {secret_t}")
    with _connect(guarded, "postgres", "postgres", autocommit=True) as c:
        assert c.execute(f"SELECT v FROM {secret_t}").fetchall() == [("one",)]
    host, port = guarded.app.metrics_address
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    assert 'connmgr_policy_refusals_total{class="restricted"} 3.0' in text, text[-2000:]


def test_views_and_functions_are_read_through(guarded, tables, pg):
    """A view over a refused table, an SQL function that reads one, a view made after the
    client logged in (the catalog is read again): refused as the table is. A function in
    plpgsql reads what it likes: refused (fail closed). A view over the open table passes."""
    open_t, secret_t = tables
    names = {k: f"{k}_{secret_t}" for k in ("v", "vv", "f", "g", "late", "ok")}
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as admin:
        admin.execute(f"CREATE VIEW {names['v']} AS SELECT id FROM {secret_t}")
        admin.execute(f"CREATE VIEW {names['vv']} AS SELECT * FROM {names['v']}")  # a view over the view
        admin.execute(f"CREATE VIEW {names['ok']} AS SELECT v FROM {open_t}")
        admin.execute(f"CREATE FUNCTION {names['f']}() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM {secret_t}'")
        admin.execute(f"CREATE FUNCTION {names['g']}() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END'")
        for n in ("v", "vv", "ok"):
            admin.execute(f"GRANT SELECT ON {names[n]} TO {CLASS_USER}")
    try:
        with _connect(guarded, autocommit=True) as c:
            assert c.execute(f"SELECT v FROM {names['ok']}").fetchall() == [("one",)]
            for sql in (f"SELECT * FROM {names['v']}", f"SELECT * FROM public.{names['vv']}",
                        f"SELECT {names['f']}()"):  # fmt: skip
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                    c.execute(sql)
                assert f"table public.{secret_t}" in str(err.value), str(err.value)
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                c.execute(f"SELECT {names['g']}()")
            assert "not written in SQL" in err.value.diag.message_detail
            with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as admin:
                admin.execute(f"CREATE VIEW {names['late']} AS SELECT v FROM {secret_t}")
                admin.execute(f"GRANT SELECT ON {names['late']} TO {CLASS_USER}")
            time.sleep(1.0)  # [policy] catalog_refresh is 0.2 s here
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT * FROM {names['late']}")
    finally:
        with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as admin:
            for n in ("late", "vv", "v", "ok"):
                admin.execute(f"DROP VIEW IF EXISTS {names[n]}")
            admin.execute(f"DROP FUNCTION IF EXISTS {names['f']}(), {names['g']}()")


def test_a_rewrite_runs_instead_over_both_protocols(start_connmgr, tmp_path, tables):
    """The lookup table through a real connmgr: psql's literal and psycopg's parameter
    both get the replacement's rows; a statement of another shape runs as sent."""
    open_t, _secret_t = tables
    policy = tmp_path / "rewrite.toml"
    policy.write_text(f'[[class]]\nname = "rewritten"\nusers = ["{CLASS_USER}"]\n'
                      f'[[class.rewrite]]\nmatch = "SELECT v FROM {open_t} WHERE id = ?"\n'
                      f'replace = "SELECT upper(v) AS v, $1::int * 10 AS id FROM {open_t} WHERE id = $1"\n'
                      '[[class.rule]]\nrule = "limit"\nmax_rows = 1\n')  # fmt: skip
    cm = start_connmgr(policy={"file": str(policy)}, metrics={"listen": "127.0.0.1:0"})
    out = _psql(cm, f"select v from {open_t} where id=1")
    assert out.stdout.split() == ["ONE|10"], out
    with _connect(cm, autocommit=True) as c:
        assert c.execute(f"SELECT v FROM {open_t} WHERE id = %s", (1,)).fetchall() == [("ONE", 10)]
        assert c.execute(f"SELECT v FROM {open_t} WHERE id = %s", (1,), prepare=True).fetchall() == [("ONE", 10)]
        c.execute(f"INSERT INTO {open_t} VALUES (2, 'two')")
        assert len(c.execute(f"SELECT v FROM {open_t}").fetchall()) == 1  # the limit rule
    with psycopg.connect(cm.conninfo("postgres", "app", "postgres"), autocommit=True) as c:  # no class: as sent
        assert c.execute(f"SELECT v FROM {open_t} WHERE id = 1").fetchall() == [("one",)]
    host, port = cm.app.metrics_address
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    assert 'connmgr_policy_rewrites_total{class="rewritten"}' in text
