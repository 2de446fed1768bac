"""Column masks (issue 16) through a real connmgr in front of the session's Postgres, with
real clients: psql (simple protocol) and psycopg (extended, text and binary formats,
prepared statements, server-side cursors).

What must hold: a masked column's values are replaced on the wire in the column's type
(the driver parses them: a number stays a number); what a client could learn a masked
value by (a predicate, ORDER BY, GROUP BY, DISTINCT, a cast that can fail, a copy into a
table) is refused with 42501 naming the column; a masked value never appears in any byte
the client receives, which a tap between client and connmgr checks on the raw wire.
"""

from __future__ import annotations

import decimal
import socket
import struct
import subprocess
import threading
import urllib.request
import uuid

import psycopg
import pytest

CLASS_USER, CLASS_PASSWORD = "scram_user", "scram-pw"
SSN = "SSN-CANARY-5d1e-6789"
EMAIL = "canary.5d1e@example.com"
SALARY = decimal.Decimal("987654321.25")
PIN = 24681357
NOTE = "NOTE-CANARY-5d1e"
#: what must never reach a masked client, as text and as binary values
SECRETS = [SSN[:-4].encode(), EMAIL.encode(), b"987654321", b"2468135", NOTE.encode(), struct.pack("!i", PIN)]
KEY = "k" * 24


class Tap:
    """A TCP forwarder on loopback in front of connmgr that keeps every byte connmgr
    sends to the client (the raw wire, whatever the client's driver makes of it)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=30)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, keep: bool) -> None:
        try:
            while data := src.recv(65536):
                if keep:
                    with self.lock:
                        self.received += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def leaks(self) -> list[bytes]:
        with self.lock:
            return [s for s in SECRETS if s in self.received]

    def close(self) -> None:
        self.closing = True
        self.listener.close()


@pytest.fixture
def masked_db(pg, start_connmgr, tmp_path, monkeypatch):
    u = uuid.uuid4().hex[:8]
    names = {"p": f"person_{u}", "o": f"other_{u}", "v": f"pview_{u}", "f": f"pfunc_{u}", "g": f"prows_{u}", "u": u}
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        c.execute(f"CREATE TABLE {names['p']} (id int PRIMARY KEY, name text, ssn text, salary numeric,"
                  " email text, pin int, note text)")  # fmt: skip
        c.execute(f"INSERT INTO {names['p']} SELECT g, 'name ' || g, %s, %s, %s, %s, %s"
                  " FROM generate_series(1, 5) g", (SSN, SALARY, EMAIL, PIN, NOTE))  # fmt: skip
        c.execute(f"CREATE TABLE {names['o']} (id int, v text)")
        c.execute(f"CREATE VIEW {names['v']} AS SELECT id, ssn AS s, name FROM {names['p']}")
        c.execute(f"CREATE FUNCTION {names['f']}() RETURNS text LANGUAGE sql AS 'SELECT ssn FROM {names['p']} LIMIT 1'")
        c.execute(f"CREATE FUNCTION {names['g']}(int) RETURNS SETOF {names['p']} LANGUAGE sql"
                  f" AS 'SELECT * FROM {names['p']} WHERE id = $1'")  # fmt: skip
        for t in ("p", "o", "v"):
            c.execute(f"GRANT ALL ON {names[t]} TO {CLASS_USER}")
    monkeypatch.setenv("CONNMGR_TEST_MASK_KEY", KEY)
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[[class]]
name = "support"
users = ["{CLASS_USER}"]
[[class.mask]]
column = "person_*.ssn"
mask = "last"
keep = 4
[[class.mask]]
column = "person_*.salary"
mask = "full"
[[class.mask]]
column = "person_*.email"
mask = "hash"
key_env = "CONNMGR_TEST_MASK_KEY"
allow_predicates = true
[[class.mask]]
column = "person_*.pin"
mask = "last"
keep = 2
[[class.mask]]
column = "person_*.note"
mask = "constant"
value = "(hidden)"
""")
    cm = start_connmgr(policy={"file": str(policy), "catalog_refresh": 0.2}, metrics={"listen": "127.0.0.1:0"},
                       redo={"user": "postgres", "password": "postgres"})  # fmt: skip
    tap = Tap(cm.host, cm.port)
    yield cm, tap, names
    tap.close()
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        c.execute(f"DROP FUNCTION IF EXISTS {names['f']}(), {names['g']}(int)")
        c.execute(f"DROP VIEW IF EXISTS {names['v']}")
        c.execute(f"DROP TABLE IF EXISTS {names['o']}, {names['p']}")


def _conninfo(tap: Tap) -> str:
    return f"host=127.0.0.1 port={tap.port} user={CLASS_USER} password={CLASS_PASSWORD} dbname=app"


def _masked_ssn() -> str:
    return "*" * (len(SSN) - 4) + SSN[-4:]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_masked_values_keep_their_type_in_text_and_binary(masked_db, binary):
    _cm, tap, names = masked_db
    with psycopg.connect(_conninfo(tap), autocommit=True) as c:
        cur = c.cursor(binary=binary)
        rows = cur.execute(f"SELECT * FROM {names['p']} WHERE id = %s", (2,)).fetchall()
        assert len(rows) == 1
        id_, name, ssn, salary, email, pin, note = rows[0]
        assert (id_, name) == (2, "name 2")  # not masked
        assert ssn == _masked_ssn()
        assert salary == decimal.Decimal(0) and isinstance(salary, decimal.Decimal)
        assert len(email) == 32 and int(email, 16) >= 0  # a keyed hash: hex, the same for the same value
        assert pin == 57 and isinstance(pin, int)
        assert note == "(hidden)"
        # the same value always hashes the same: a count by it still works
        emails = {r[0] for r in cur.execute(f"SELECT email FROM {names['p']}").fetchall()}
        assert emails == {email}
        # an expression over a masked column is masked in full (text: ****)
        assert cur.execute(f"SELECT ssn || '', upper(ssn), name FROM {names['p']} WHERE id = 1").fetchall() == \
            [("****", "****", "name 1")]  # fmt: skip
        # through a view, a CTE, a subquery, UNION ALL, a prepared statement
        assert cur.execute(f"SELECT s FROM {names['v']} WHERE id = 3").fetchall() == [(_masked_ssn(),)]
        assert cur.execute(f"WITH x AS (SELECT ssn AS y FROM {names['p']}) SELECT y FROM x LIMIT 1").fetchall() == \
            [(_masked_ssn(),)]  # fmt: skip
        assert cur.execute(f"SELECT (SELECT ssn FROM {names['p']} LIMIT 1), 'z'").fetchall() == [(_masked_ssn(), "z")]
        for _ in range(3):  # (psycopg prepares a statement run often: Parse once, Bind/Execute after)
            got = cur.execute(f"SELECT ssn, salary FROM {names['p']} WHERE id = %s", (4,), prepare=True).fetchall()
            assert got == [(_masked_ssn(), decimal.Decimal(0))]
    assert tap.leaks() == []
    host, port = _cm.app.metrics_address
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    counted = [line for line in text.splitlines() if line.startswith('connmgr_policy_masked_rows_total{class="support"}')]
    assert counted and float(counted[0].split()[-1]) >= 9, counted  # (the rows above, each with a value masked)


def test_psql_simple_protocol_and_sql_prepare_and_cursors(masked_db):
    cm, tap, names = masked_db
    p = names["p"]
    sql = (f"SELECT ssn, pin, name FROM {p} WHERE id = 1;"
           f" PREPARE q_{names['u']} AS SELECT ssn FROM {p} WHERE id = $1; EXECUTE q_{names['u']}(2);"
           f" BEGIN; DECLARE c_{names['u']} CURSOR FOR SELECT note, salary FROM {p};"
           f" FETCH 2 FROM c_{names['u']}; COMMIT;")  # fmt: skip
    out = subprocess.run(["psql", "-X", "-At", "-c", sql, _conninfo(tap)], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"{_masked_ssn()}|57|name 1" in lines
    assert _masked_ssn() in lines
    assert lines.count("(hidden)|0") == 2, lines
    assert tap.leaks() == []


#: probes: (statement, the column the refusal names)
PROBES = [
    "SELECT id FROM {p} WHERE ssn = 'x'", "SELECT id FROM {p} WHERE ssn LIKE 'S%'", "SELECT ssn FROM {p} ORDER BY ssn",
    "SELECT ssn FROM {p} ORDER BY 1", "SELECT count(*) FROM {p} GROUP BY ssn", "SELECT DISTINCT ssn FROM {p}",
    "SELECT ssn FROM {p} UNION SELECT 'x'", "SELECT ssn::int FROM {p}", "SELECT salary + 1 FROM {p}",
    "SELECT a.id FROM {p} a JOIN {o} b ON b.v = a.ssn", "SELECT CASE WHEN ssn > 'M' THEN 1 END FROM {p}",
    "SELECT ssn = 'x' FROM {p}", "SELECT s FROM {v} WHERE s LIKE 'S%'", "SELECT id FROM {p} WHERE pin > 1000",
    "SELECT lag(id) OVER (ORDER BY ssn) FROM {p}", "INSERT INTO {o} SELECT id, ssn FROM {p}",
    "CREATE TABLE copy_{u} AS SELECT ssn FROM {p}", "SELECT ssn INTO copy2_{u} FROM {p}",
    "UPDATE {p} SET name = ssn WHERE id = 1", "UPDATE {p} SET name = 'x' WHERE ssn = 'y'",
    "EXPLAIN ANALYZE SELECT id FROM {p} WHERE ssn = 'x'", "COPY (SELECT ssn FROM {p} ORDER BY ssn) TO STDOUT",
    "COPY {p} TO '/tmp/never_{u}'",
]  # fmt: skip


def test_probes_on_a_masked_column_are_refused_naming_it(masked_db):
    _cm, tap, names = masked_db
    got = {}
    with psycopg.connect(_conninfo(tap), autocommit=True) as c:
        for template in PROBES:
            sql = template.format(**names)
            try:
                c.execute(sql)
                got[sql] = None
            except psycopg.Error as e:
                got[sql] = (e.sqlstate, str(e), e.diag.message_detail or "")
        not_refused = {s: g for s, g in got.items() if g is None or g[0] != "42501"}
        assert not not_refused, not_refused
        unnamed = {s: g for s, g in got.items() if "mask (" not in g[2] or ("person_" not in g[2] and "pfunc_" not in g[2])}
        assert not unnamed, unnamed  # (the column, or the function that reads it)
        # an SQL function reading the masked column: put in place as its body, its value masked
        (shown,) = c.execute(f"SELECT {names['f']}()").fetchone()
        assert shown == "*" * (len(SSN) - 4) + SSN[-4:], shown
        # allowed: the email mask has allow_predicates; other columns as usual
        assert c.execute(f"SELECT count(*) FROM {names['p']} WHERE email = %s", (EMAIL,)).fetchone() == (5,)
        assert c.execute(f"SELECT id FROM {names['p']} WHERE name = 'name 3' ORDER BY id").fetchall() == [(3,)]
        assert c.execute(f"UPDATE {names['p']} SET ssn = 'new-0001' WHERE id = 5 RETURNING ssn").fetchall() == \
            [("****0001",)]  # fmt: skip
    with psycopg.connect(_conninfo(tap)) as c:  # in a transaction: aborted as by a Postgres error
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"SELECT id FROM {names['p']} ORDER BY ssn")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
    assert tap.leaks() == []


def test_a_server_side_cursor_and_pipelined_statements(masked_db):
    _cm, tap, names = masked_db
    with psycopg.connect(_conninfo(tap)) as c:
        with c.cursor(name=f"sc_{names['u']}") as cur:  # DECLARE ... then FETCH through the extended protocol
            cur.execute(f"SELECT id, ssn, salary FROM {names['p']} ORDER BY id")
            assert cur.fetchmany(2) == [(1, _masked_ssn(), 0), (2, _masked_ssn(), 0)]
            assert [r[1] for r in cur.fetchall()] == [_masked_ssn()] * 3
        c.rollback()
        with c.pipeline():
            curs = [c.execute(f"SELECT pin, name FROM {names['p']} WHERE id = %s", (i,)) for i in (1, 2)]
            curs.append(c.execute("SELECT %s::text", (SSN[-8:],)))  # (a value the client sent: not masked)
        assert [cur.fetchall() for cur in curs] == [[(57, "name 1")], [(57, "name 2")], [(SSN[-8:],)]]
    assert tap.leaks() == []


@pytest.mark.parametrize("options", ["", "(FORMAT csv)", "(FORMAT csv, HEADER, DELIMITER ';', QUOTE '|')",
                                     "(FORMAT text, DELIMITER '|', NULL 'nil')", "(FORMAT binary)"])
@pytest.mark.parametrize("source", ["{p}", "{p} (id, ssn, note)", "(SELECT id, ssn, note, salary FROM {p})"])
def test_copy_to_stdout_is_masked_in_every_format(masked_db, options, source):
    _cm, tap, names = masked_db
    sql = f"COPY {source.format(**names)} TO STDOUT {options}"
    with psycopg.connect(_conninfo(tap), autocommit=True) as c:
        c.execute(f"UPDATE {names['p']} SET note = NULL WHERE id = 5")  # (a NULL stays NULL)
        with c.cursor() as cur, cur.copy(sql) as copy:
            data = b"".join(bytes(block) for block in copy)
    assert data, sql
    if "binary" in options:
        assert data.startswith(b"PGCOPY\n\xff\r\n\0") and data.endswith(b"\xff\xff")
        assert _masked_ssn().encode() in data
    else:
        text = data.decode()
        lines = text.splitlines()
        assert len(lines) == 5 + ("HEADER" in options)
        assert _masked_ssn() in text and "(hidden)" in text
        if "nil" in options:
            assert "|nil" in text
    assert tap.leaks() == []


#: the bypass corpus for masks: each template with {c} is run for every masked column
MASK_CORPUS = [
    # shown as is, through names
    "SELECT {c} FROM {p}", "SELECT * FROM {p}", "SELECT p.* FROM {p} p", "TABLE {p}", "SELECT {c} AS x FROM {p}",
    "SELECT x FROM (SELECT {c} AS x FROM {p}) s", "SELECT s.x FROM (SELECT {c} FROM {p}) AS s(x)",
    "WITH w AS (SELECT {c} FROM {p}) SELECT * FROM w", "WITH w(x) AS (SELECT {c} FROM {p}) SELECT x FROM w",
    "WITH RECURSIVE r(n, x) AS (SELECT 1, {c} FROM {p} UNION ALL SELECT n + 1, x FROM r WHERE n < 2) SELECT x FROM r",
    "SELECT (SELECT {c} FROM {p} LIMIT 1)", "SELECT id, (SELECT {c} FROM {p} q WHERE q.id = p.id) FROM {p} p",
    "SELECT {c} FROM {p} UNION ALL SELECT {c} FROM {p}", "SELECT id, name FROM {p} UNION ALL SELECT id, {c}::text FROM {p}",
    "SELECT NULL UNION ALL SELECT {c}::text FROM {p}", "SELECT * FROM {o}, LATERAL (SELECT {c} FROM {p}) l",
    "SELECT l.* FROM {p} p, LATERAL (SELECT p.{c}) l", "SELECT * FROM {p} CROSS JOIN {o}", "SELECT * FROM {v}",
    "SELECT s FROM {v}", "SELECT * FROM (SELECT * FROM {v}) vv", "SELECT {c} FROM {p} WHERE id = 1",
    "SELECT {c} FROM {p} WHERE name = 'name 1' ORDER BY id LIMIT 2", "SELECT {c} FROM ONLY {p}",
    "SELECT {c} FROM {p} FOR UPDATE", "SELECT {c} FROM {p} TABLESAMPLE SYSTEM (100)",
    # computed from a masked column: masked in full
    "SELECT {c}::text FROM {p}", "SELECT CAST({c} AS varchar) FROM {p}", "SELECT {c}::text || '' FROM {p}",
    "SELECT concat({c}) FROM {p}", "SELECT concat_ws(',', {c}, name) FROM {p}", "SELECT format('%s', {c}) FROM {p}",
    "SELECT substr({c}::text, 1, 5) FROM {p}", "SELECT upper({c}::text) FROM {p}", "SELECT lower({c}::text) FROM {p}",
    "SELECT left({c}::text, 3) FROM {p}", "SELECT right({c}::text, 8) FROM {p}", "SELECT reverse({c}::text) FROM {p}",
    "SELECT md5({c}::text) FROM {p}", "SELECT length({c}::text) FROM {p}", "SELECT coalesce({c}::text, name) FROM {p}",
    "SELECT string_agg({c}::text, ',') FROM {p}", "SELECT array_agg({c}) FROM {p}", "SELECT max({c}) FROM {p}",
    "SELECT min({c}) FROM {p}", "SELECT count({c}) FROM {p}", "SELECT count(DISTINCT {c}) FROM {p}",
    "SELECT json_agg({c}) FROM {p}", "SELECT jsonb_agg({c}) FROM {p}", "SELECT to_json({c}) FROM {p}",
    "SELECT to_jsonb({c}) FROM {p}", "SELECT json_build_object('k', {c}) FROM {p}", "SELECT ARRAY[{c}] FROM {p}",
    "SELECT ROW({c}, id) FROM {p}", "SELECT xmlelement(name x, {c}) FROM {p}", "SELECT xmlforest({c}) FROM {p}",
    "SELECT xmlagg(xmlelement(name x, {c})) FROM {p}", "SELECT lag({c}) OVER (ORDER BY id) FROM {p}",
    "SELECT first_value({c}) OVER () FROM {p}", "SELECT lead({c}) OVER (PARTITION BY name) FROM {p}",
    "SELECT quote_literal({c}::text) FROM {p}", "SELECT lpad({c}::text, 40, 'x') FROM {p}",
    # whole rows
    "SELECT p FROM {p} p", "SELECT {p} FROM {p}", "SELECT row_to_json(p) FROM {p} p", "SELECT to_jsonb(p) FROM {p} p",
    "SELECT to_json(p.*) FROM {p} p", "SELECT json_agg(p) FROM {p} p", "SELECT jsonb_agg(p) FROM {p} p",
    "SELECT array_agg(p) FROM {p} p", "SELECT p::text FROM {p} p", "SELECT (p).* FROM {p} p", "SELECT (p).{c} FROM {p} p",
    "SELECT t FROM (SELECT {c} FROM {p}) t", "SELECT row_to_json(t) FROM (SELECT * FROM {v}) t",
    # probes: refused
    "SELECT id FROM {p} WHERE {c} IS NOT NULL", "SELECT id FROM {p} WHERE {c}::text LIKE 'S%'",
    "SELECT id FROM {p} WHERE {c}::text > 'M'", "SELECT id FROM {p} WHERE {c}::text IN ('a', 'b')",
    "SELECT id FROM {p} WHERE {c}::text BETWEEN 'A' AND 'T'", "SELECT id FROM {p} WHERE {c}::text ~ '^S'",
    "SELECT id FROM {p} WHERE {c}::text SIMILAR TO 'S%'", "SELECT id FROM {p} WHERE position('C' in {c}::text) > 0",
    "SELECT id FROM {p} WHERE length({c}::text) = 20", "SELECT {c} FROM {p} ORDER BY {c}", "SELECT {c} FROM {p} ORDER BY 1",
    "SELECT id FROM {p} ORDER BY {c} DESC", "SELECT {c} AS z FROM {p} ORDER BY z", "SELECT count(*) FROM {p} GROUP BY {c}",
    "SELECT {c}, count(*) FROM {p} GROUP BY 1", "SELECT count(*) FROM {p} GROUP BY ROLLUP ({c})",
    "SELECT count(*) FROM {p} HAVING max({c}::text) > 'M'", "SELECT DISTINCT {c} FROM {p}",
    "SELECT DISTINCT ON ({c}) id FROM {p}", "SELECT {c}::text FROM {p} UNION SELECT 'x'",
    "SELECT {c}::text FROM {p} INTERSECT SELECT 'x'", "SELECT {c}::text FROM {p} EXCEPT ALL SELECT 'x'",
    "SELECT a.id FROM {p} a JOIN {p} b ON a.{c} = b.{c}", "SELECT a.id FROM {p} a JOIN {o} b ON b.v = a.{c}::text",
    "SELECT rank() OVER (ORDER BY {c}) FROM {p}", "SELECT count(*) OVER (PARTITION BY {c}) FROM {p}",
    "SELECT CASE WHEN {c}::text LIKE 'S%' THEN 1 ELSE 0 END FROM {p}", "SELECT {c}::text = 'x' FROM {p}",
    "SELECT nullif({c}::text, 'x') FROM {p}", "SELECT greatest({c}::text, 'M') FROM {p}",
    "SELECT {c}::int FROM {p}", "SELECT {c}::text::int FROM {p}", "SELECT to_number({c}::text, '999') FROM {p}",
    "SELECT 1 / (length({c}::text) - 20) FROM {p}", "SELECT {c}::text::date FROM {p}",
    "SELECT string_agg({c}::text, ',' ORDER BY {c}) FROM {p}", "SELECT id FROM {p} LIMIT (SELECT count({c}) FROM {p})",
    "SELECT id FROM {p} WHERE EXISTS (SELECT 1 FROM {p} q WHERE q.{c}::text = 'x')",
    "SELECT id FROM {p} WHERE id IN (SELECT length({c}::text) FROM {p})", "SELECT * FROM (SELECT id FROM {p} WHERE {c} IS NULL) s",
    "SELECT * FROM {v} WHERE s LIKE 'S%'", "SELECT s FROM {v} ORDER BY s", "SELECT id FROM {p} p WHERE p IS NOT NULL",
    "SELECT generate_series(1, length({c}::text)) FROM {p}", "SELECT regexp_replace({c}::text, 'C', 'x') FROM {p}",
    "SELECT translate({c}::text, 'S', 'x') FROM {p}", "SELECT split_part({c}::text, '-', 2) FROM {p}",
    "SELECT encode(convert_to({c}::text, 'UTF8'), 'hex') FROM {p}", "SELECT pg_typeof({c}) FROM {p}",
    # writes that would copy a masked value where no mask hides it
    "INSERT INTO {o} SELECT id, {c}::text FROM {p}", "INSERT INTO {o} (id, v) SELECT 1, max({c}::text) FROM {p}",
    "UPDATE {o} SET v = (SELECT {c}::text FROM {p} LIMIT 1)", "UPDATE {p} SET name = {c}::text WHERE id = 1",
    "UPDATE {p} SET name = 'n' WHERE {c} IS NOT NULL", "DELETE FROM {p} WHERE {c} IS NULL",
    "CREATE TEMP TABLE t_{u} AS SELECT {c} FROM {p}", "SELECT {c} INTO TEMP t2_{u} FROM {p}",
    "CREATE TEMP VIEW tv_{u} AS SELECT {c} FROM {p}", "WITH d AS (UPDATE {o} SET v = 'x' RETURNING v) SELECT {c} FROM {p}",
    "COPY (SELECT {c} FROM {p}) TO '/tmp/never_{u}'", "UPDATE {p} SET name = name WHERE id = 1 RETURNING {c}",
    "UPDATE {p} SET id = NULL WHERE id = 1", "INSERT INTO {p} (id, name) VALUES (1, 'x')",
    "UPDATE {p} SET id = 2 WHERE id = 1",  # (a constraint's DETAIL shows the failing row: masked columns too)
    "DELETE FROM {o} WHERE id = -1 RETURNING *",
    # named and dynamic: cursors, prepared statements, functions, DO
    "DECLARE c_{u} CURSOR WITH HOLD FOR SELECT {c} FROM {p}", "FETCH ALL FROM c_{u}", "CLOSE c_{u}",
    "PREPARE q_{u} AS SELECT {c} FROM {p}", "EXECUTE q_{u}", "DEALLOCATE q_{u}", "EXECUTE never_prepared_{u}",
    "FETCH ALL FROM never_declared_{u}", "SELECT {f}()", "SELECT * FROM {f}()",
    # an SQL function put in place as its body: what is done with its value is the client's
    "SELECT {f}() || ''", "SELECT upper({f}())", "SELECT 1 WHERE {f}() LIKE 'S%'", "SELECT {f}()::int",
    "SELECT {f}() ORDER BY 1", "SELECT length({f}())", "SELECT * FROM {p} WHERE ssn = {f}()",
    "SELECT {f}() FROM {p} GROUP BY 1", "SELECT DISTINCT {f}() FROM {p}", "SELECT row_to_json(x) FROM {f}() x",
    "SELECT * FROM {g}(1)", "SELECT ssn, name FROM {g}(2) r", "SELECT * FROM {g}({f}()::int)",
    "SELECT * FROM {g}((SELECT pin FROM {p} LIMIT 1))", "SELECT * FROM {p} p, LATERAL {g}(p.id) r",
    "SELECT * FROM {g}(1) WHERE ssn LIKE 'S%'", "SELECT row_to_json(r) FROM {g}(3) r", "SELECT {g}(1)",
    "DO $$ BEGIN RAISE NOTICE '%', (SELECT {c} FROM {p} LIMIT 1); END $$",
    "DO $$ BEGIN RAISE EXCEPTION '%', (SELECT {c} FROM {p} LIMIT 1); END $$",
    "SELECT query_to_xml('select {c} from {p}', true, false, '')", "SELECT table_to_xml('{p}', true, false, '')",
    "SELECT cursor_to_xml('c_{u}', 10, true, false, '')", "SELECT * FROM pg_stats WHERE tablename = '{p}'",
    "SELECT most_common_vals::text FROM pg_stats WHERE tablename = '{p}'",
    "SELECT current_setting('search_path'), {c} FROM {p}", "EXPLAIN ANALYZE SELECT {c} FROM {p}",
    "EXPLAIN (VERBOSE) SELECT {c} FROM {p}", "EXPLAIN ANALYZE SELECT id FROM {p} WHERE {c} IS NULL",
    "COPY {p} TO STDOUT", "COPY (SELECT {c} FROM {p}) TO STDOUT CSV", "COPY {p} ({c}) TO STDOUT (FORMAT binary)",
    "SELECT {c} FROM {p}; SELECT {c} FROM {p} WHERE {c} IS NULL", "SELECT 1; SELECT * FROM {p}",
    "/* x */ SELECT {c} FROM {p} -- y", "select/**/{c}/**/from/**/{p}", 'SELECT "{c}" FROM "{p}"',
    "SELECT {c} FROM public.{p}", 'SELECT * FROM "public"."{p}"',
]  # fmt: skip
#: the masked columns a {c} template runs for
MASKED_COLUMNS = ("ssn", "salary", "pin", "note")


def _corpus(names: dict) -> list[str]:
    out = []
    for template in MASK_CORPUS:
        for column in MASKED_COLUMNS if "{c}" in template else (None,):
            sql = template.format(c=column, **names)
            if sql not in out:
                out.append(sql)
    return out


def _run_all(conn: psycopg.Connection, sql: str, binary: bool, prepare: bool | None) -> str:
    got = []
    try:
        if sql.startswith("COPY") and "STDOUT" in sql:
            with conn.cursor() as cur, cur.copy(sql) as copy:
                for block in copy:
                    got.append(bytes(block))
            return "copied"
        cur = conn.cursor(binary=binary)
        cur.execute(sql, prepare=prepare)
        while True:
            if cur.description is not None:
                got.extend(cur.fetchall())
            if not cur.nextset():
                break
        return "ran"
    except psycopg.Error as e:
        return e.sqlstate or "error"


@pytest.mark.parametrize("path", ["simple", "extended", "binary", "prepared"])
def test_no_query_of_the_mask_corpus_shows_a_masked_value_on_the_wire(masked_db, path):
    """The masked client's corpus, with a canary in every masked column: 0 canaries in any
    byte connmgr sends it (the tap sees the raw wire), whatever each query's outcome."""
    _cm, tap, names = masked_db
    names = {**names, "c": None}
    corpus = _corpus({k: v for k, v in names.items() if k != "c"})
    assert len(corpus) >= 200, len(corpus)
    outcomes: dict[str, int] = {}
    leaks = []
    cursor_factory = psycopg.ClientCursor if path == "simple" else psycopg.Cursor
    with psycopg.connect(_conninfo(tap), autocommit=True, cursor_factory=cursor_factory) as c:
        c.add_notice_handler(lambda d: None)
        for sql in corpus:
            before = len(tap.received)
            outcome = _run_all(c, sql, path == "binary", True if path == "prepared" else None)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            c.execute("SELECT 1")  # (the replies to sql have all arrived at the tap)
            with tap.lock:
                wire = bytes(tap.received[before:])
            found = [s for s in SECRETS if s in wire]
            if found:
                leaks.append(f"{sql}: {outcome}, {found}")
    assert not leaks, f"{len(leaks)} of {len(corpus)} leaked:\n" + "\n".join(leaks)
    print(f"{path}: {len(corpus)} queries, outcomes {outcomes}, 0 leaks")
    assert outcomes.get("42501", 0) >= 100 and outcomes.get("ran", 0) >= 60, outcomes


def test_masks_and_refusals_hold_after_a_failover_to_the_secondary(pg_bindir, pg_base_dir, tmp_path):
    """A masked client inside a transaction when the primary database is killed: its
    transaction moves to the secondary, and there its rows are still masked and its probes
    still refused; a client that connects after the failover is masked too."""
    from connmgr_fixtures import DB, PASSWORD, live_pair_of, wait_for

    policy = tmp_path / "pair-policy.toml"
    policy.write_text('[[class]]\nname = "masked"\napplication_names = ["masked*"]\n'
                      '[[class.mask]]\ncolumn = "accounts.balance"\nmask = "full"\n')  # fmt: skip
    extra = {"policy": {"file": str(policy), "catalog_refresh": 0.2}}
    with live_pair_of(pg_bindir, pg_base_dir / "policy-masks-failover", tmp_path, primary_extra=extra,
                      failover_options={"failback": "manual"}) as lp:  # fmt: skip
        conninfo = lp.primary.conninfo("postgres", DB, PASSWORD, application_name="masked-app")
        with psycopg.connect(conninfo) as c:
            assert c.execute("SELECT id, balance FROM accounts WHERE id <= 2 ORDER BY id").fetchall() == [(1, 0), (2, 0)]
            c.execute("UPDATE accounts SET balance = 1007 WHERE id = 3")  # (writing a masked column: allowed)
            lp.pair.primary.kill()
            assert wait_for(lambda: lp.failover.failed_over, 15), lp.failover.timeline
            assert c.execute("SELECT id, balance FROM accounts WHERE id = 3").fetchall() == [(3, 0)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT id FROM accounts ORDER BY balance")
            c.rollback()
            c.execute("UPDATE accounts SET balance = 1007 WHERE id = 3")
            c.commit()
        with psycopg.connect(conninfo, autocommit=True) as c:
            assert c.execute("SELECT balance FROM accounts WHERE id = 3").fetchall() == [(0,)]
        assert lp.on_secondary("SELECT balance FROM accounts WHERE id = 3") == [(1007,)]  # the write is there once
        with lp.connect(autocommit=True) as c:  # another class (none): as is
            assert c.execute("SELECT balance FROM accounts WHERE id = 3").fetchall() == [(1007,)]
