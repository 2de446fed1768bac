"""A bypass corpus for the policy's refusals: every query here reaches a refused table's
canary value some way (aliases, subqueries, set operations, CTEs, LATERAL, whole-row
values, aggregates, casts and functions of the column, XML and JSON builders, dynamic SQL,
views, functions, COPY, cursors, prepared statements, comments and quoting, the
statistics views). Each is sent by a client of the restricted class through connmgr, in
text and in binary format, and nothing the client receives -- rows, notices, errors --
may hold the canary. A query may be refused (42501) or fail on its own (a syntax the
server rejects); it may not leak.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

CLASS_USER, CLASS_PASSWORD = "scram_user", "scram-pw"
CANARY = "CANARY-7f3a9c"

CORPUS = [
    "SELECT * FROM {s}", "SELECT ssn FROM {s}", "TABLE {s}", "SELECT * FROM public.{s}",
    'SELECT * FROM "public"."{s}"', "SELECT * FROM PUBLIC.{S}", "SELECT (SELECT ssn FROM {s} LIMIT 1)",
    "SELECT * FROM {o} WHERE v IN (SELECT ssn FROM {s})", "SELECT * FROM {o} o JOIN {s} s ON true",
    "SELECT id, v FROM {o} UNION ALL SELECT id, ssn FROM {s}", "SELECT v FROM {o} INTERSECT SELECT ssn FROM {s}",
    "WITH x AS (SELECT * FROM {s}) SELECT * FROM x",
    "WITH RECURSIVE r AS (SELECT ssn FROM {s} UNION SELECT ssn FROM r) SELECT * FROM r",
    "WITH {o} AS (SELECT * FROM {s}) SELECT * FROM {o}", "SELECT * FROM (SELECT * FROM {s}) sub",
    "SELECT * FROM {o}, LATERAL (SELECT ssn FROM {s}) l", "SELECT row_to_json(t) FROM {s} t",
    "SELECT to_jsonb(t) FROM {s} t", "SELECT json_agg(t) FROM {s} t", "SELECT jsonb_agg(t) FROM {s} t",
    "SELECT array_agg(t) FROM {s} t", "SELECT t FROM {s} t", "SELECT t.* FROM {s} t",
    "SELECT string_agg(ssn, ',') FROM {s}", "SELECT format('%s', ssn) FROM {s}", "SELECT ssn || '' FROM {s}",
    "SELECT CAST(ssn AS text) FROM {s}", "SELECT ssn::varchar FROM {s}", "SELECT substr(ssn, 1) FROM {s}",
    "SELECT upper(ssn) FROM {s}", "SELECT concat(ssn) FROM {s}", "SELECT xmlelement(name x, ssn) FROM {s}",
    "SELECT xmlagg(xmlelement(name x, ssn)) FROM {s}", "SELECT max(ssn) FROM {s}",
    "SELECT ssn FROM {s} ORDER BY 1", "SELECT DISTINCT ssn FROM {s}", "SELECT ssn, count(*) FROM {s} GROUP BY ssn",
    "SELECT * FROM {s} WHERE ssn LIKE 'C%'", "SELECT * FROM ONLY {s}", "SELECT * FROM {s} AS a WHERE a.id = 1",
    "SELECT * FROM {o}; SELECT * FROM {s}", "/* ; */ SELECT * FROM {s}", "SELECT * FROM {s} -- trailing",
    "select/**/ssn/**/from/**/{s}", "SELECT first_value(ssn) OVER () FROM {s}",
    "SELECT query_to_xml('select * from {s}', true, false, '')",
    "SELECT table_to_xml('{s}'::regclass, true, false, '')",
    "SELECT cursor_to_xml('c', 1, true, false, '')", "SELECT * FROM {view}", "SELECT * FROM {view2}",
    "SELECT {func}()", "SELECT * FROM {srf}()", "SELECT {srf}()", "COPY {s} TO STDOUT",
    "COPY (SELECT * FROM {s}) TO STDOUT", "EXPLAIN ANALYZE SELECT * FROM {s}",
    "PREPARE p_{u} AS SELECT * FROM {s}", "EXECUTE p_{u}",
    "DECLARE c_{u} CURSOR WITH HOLD FOR SELECT * FROM {s}", "FETCH ALL FROM c_{u}",
    "CREATE TEMP TABLE t_{u} AS SELECT * FROM {s}", "SELECT * INTO TEMP t2_{u} FROM {s}",
    "DO $$ BEGIN RAISE NOTICE '%', (SELECT ssn FROM {s} LIMIT 1); END $$",
    "DO $$ BEGIN RAISE EXCEPTION '%', (SELECT ssn FROM {s} LIMIT 1); END $$",
    "SELECT most_common_vals::text FROM pg_stats WHERE tablename = '{s}'",
    "SELECT histogram_bounds::text FROM pg_catalog.pg_stats WHERE tablename = '{s}'",
    "SELECT * FROM pg_stats", "UPDATE {o} SET v = (SELECT ssn FROM {s} LIMIT 1) RETURNING v",
    "INSERT INTO {o} SELECT id + 100, ssn FROM {s} RETURNING v",
    "DELETE FROM {o} WHERE v IN (SELECT ssn FROM {s}) RETURNING *",
    "SELECT 1 / (SELECT count(*) FROM {s} WHERE ssn = '" + CANARY + "')::int",
    "SELECT ssn::int FROM {s}", "SELECT to_number(ssn, '9') FROM {s}",
    "SELECT * FROM {o} WHERE v = (SELECT ssn FROM {s} LIMIT 1)::text",
]  # fmt: skip


@pytest.fixture
def corpus_db(pg, start_connmgr, tmp_path):
    u = uuid.uuid4().hex[:8]
    names = {"s": f"secret_{u}", "o": f"open_{u}", "view": f"vs_{u}", "view2": f"vvs_{u}", "func": f"fs_{u}",
             "srf": f"srf_{u}", "u": u}  # fmt: skip
    names["S"] = names["s"].upper()
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        c.execute(f"CREATE TABLE {names['s']} (id int PRIMARY KEY, ssn text)")
        c.execute(f"INSERT INTO {names['s']} SELECT g, %s FROM generate_series(1, 20) g", (CANARY,))
        c.execute(f"CREATE TABLE {names['o']} (id int PRIMARY KEY, v text)")
        c.execute(f"INSERT INTO {names['o']} VALUES (1, 'one')")
        c.execute(f"CREATE VIEW {names['view']} AS SELECT ssn FROM {names['s']}")
        c.execute(f"CREATE VIEW {names['view2']} AS SELECT * FROM {names['view']}")
        c.execute(f"CREATE FUNCTION {names['func']}() RETURNS text LANGUAGE sql AS"
                  f" 'SELECT ssn FROM {names['s']} LIMIT 1'")  # fmt: skip
        c.execute(f"CREATE FUNCTION {names['srf']}() RETURNS SETOF {names['s']} LANGUAGE sql AS"
                  f" 'SELECT * FROM {names['s']}'")  # fmt: skip
        for t in ("s", "o", "view", "view2"):
            c.execute(f"GRANT ALL ON {names[t]} TO {CLASS_USER}")
        c.execute(f"ANALYZE {names['s']}")  # (pg_stats then holds the canary)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[[class]]\nname = "restricted"\nusers = ["{CLASS_USER}"]\n'
                      'refuse_objects = ["public.secret_*"]\n')  # fmt: skip
    cm = start_connmgr(policy={"file": str(policy), "catalog_refresh": 0.2},
                       redo={"user": "postgres", "password": "postgres"})  # fmt: skip
    yield cm, names
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        c.execute(f"DROP FUNCTION IF EXISTS {names['func']}(), {names['srf']}()")
        c.execute(f"DROP VIEW IF EXISTS {names['view2']}, {names['view']}")
        c.execute(f"DROP TABLE IF EXISTS {names['o']}, {names['s']}")


def _run(conn: psycopg.Connection, sql: str, binary: bool) -> str:
    """Everything the client gets back for ``sql``: rows, notices, the error."""
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(f"{d.message_primary} {d.message_detail}"))
    try:
        with conn.cursor(binary=binary) as cur:
            if sql.startswith("COPY") and "TO STDOUT" in sql:
                with cur.copy(sql) as copy:
                    seen.extend(bytes(block).decode("utf-8", "replace") for block in copy)
            else:
                cur.execute(sql)
                while True:
                    if cur.description is not None:
                        seen.extend(repr(row) for row in cur.fetchall())
                    if not cur.nextset():
                        break
    except psycopg.Error as e:
        seen.append(f"{e.sqlstate} {e} {e.diag.message_detail} {e.diag.context}")
    return "\n".join(seen)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_no_query_of_the_corpus_leaks_the_canary(corpus_db, binary):
    cm, names = corpus_db
    leaks, refused = [], 0
    with psycopg.connect(cm.conninfo(CLASS_USER, "app", CLASS_PASSWORD), autocommit=True) as c:
        for template in CORPUS:
            sql = template.format(**names)
            got = _run(c, sql, binary)
            if CANARY in got.replace(CANARY + "')", ""):  # (the probe's own literal, echoed, is not a leak)
                leaks.append(f"{sql}\n    -> {got[:300]}")
            refused += "42501" in got and "connmgr policy" in got
    assert not leaks, f"{len(leaks)} of {len(CORPUS)} queries leaked the canary:\n" + "\n".join(leaks)
    assert refused >= len(CORPUS) - 10, refused  # nearly every one is refused by the policy itself


#: (statement, the SQLSTATE the client of the allow-list class gets; None: it runs)
RIGHTS = [
    ("SELECT v FROM {o}", None), ("SELECT v FROM public.{o}", None), ("INSERT INTO {o} VALUES (7, 'x')", None),
    ("UPDATE {o} SET v = 'y' WHERE id = 7", None), ("DELETE FROM {o} WHERE id = 7", None),
    ("SET work_mem = '8MB'", None), ("SHOW work_mem", None), ("BEGIN", None), ("COMMIT", None),
    ("SELECT * FROM {s}", "42501"), ("SELECT * FROM {view}", "42501"), ("COPY {o} TO STDOUT", "42501"),
    ("TRUNCATE {o}", "42501"), ("CREATE TABLE x_{u} (a int)", "42501"), ("DROP TABLE {o}", "42501"),
    ("LISTEN ch", "42501"), ("NOTIFY ch", "42501"), ("DO $$BEGIN END$$", "42501"), ("VACUUM {o}", "42501"),
    ("SELECT * FROM pg_class", "42501"), ("SELECT {func}()", "42501"), ("GRANT SELECT ON {o} TO PUBLIC", "42501"),
    ("SELEC 1", "42501"), ("SELECT 1 +", "42501"),
]  # fmt: skip


def test_an_allow_list_class_gets_the_sqlstate_of_its_table(corpus_db, tmp_path, start_connmgr):
    """A class with allow_kinds and allow_objects: what is listed runs, anything else is
    refused with 42501 -- also what the analyser cannot read (a typo, a half statement):
    fail closed, where Postgres itself would have answered 42601."""
    _cm, names = corpus_db
    policy = tmp_path / "allow.toml"
    policy.write_text(f'[[class]]\nname = "app"\nusers = ["{CLASS_USER}"]\n'
                      'allow_kinds = ["SELECT", "INSERT", "UPDATE", "DELETE", "SET", "SHOW", "TRANSACTION"]\n'
                      f'allow_objects = ["public.{names["o"]}"]\n')  # fmt: skip
    cm = start_connmgr(policy={"file": str(policy)}, redo={"user": "postgres", "password": "postgres"})
    got = []
    with psycopg.connect(cm.conninfo(CLASS_USER, "app", CLASS_PASSWORD), autocommit=True) as c:
        for template, _want in RIGHTS:
            try:
                c.execute(template.format(**names))
                got.append(None)
            except psycopg.Error as e:
                got.append(e.sqlstate)
    table = list(zip([t for t, _ in RIGHTS], got, strict=True))
    assert got == [want for _t, want in RIGHTS], table
    with psycopg.connect(cm.conninfo("postgres", "app", "postgres"), autocommit=True) as c:
        assert c.execute(f"SELECT count(*) FROM {names['o']}").fetchone() == (1,)  # the insert was deleted again
