"""The policy's pure parts: the file's validation, the statement analysis, the decision
table and the guard's rewriting of message batches."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.framing import Framer
from shadow.policy.analysis import statements
from shadow.policy.decision import check, refusal_sql, rewrite_query
from shadow.policy.guard import Guard
from shadow.policy.rules import PolicyError, parse_policy

POLICY = """
[[class]]
name = "reporting"
users = ["report_*"]
networks = ["10.0.0.0/8"]
refuse_kinds = ["INSERT", "UPDATE", "DELETE", "DDL", "TRUNCATE"]
refuse_objects = ["hr.salaries", "audit.*", "function:pg_read_file"]

[[class]]
name = "app"
databases = ["app"]
allow_kinds = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRANSACTION", "SET", "SHOW"]
allow_objects = ["public.*"]
"""


@pytest.fixture(scope="module")
def policy():
    return parse_policy(POLICY, "policy.toml")


# ---------------------------------------------------------------------- the file


@pytest.mark.parametrize(("text", "words"), [
    ("[[class]]\nusers = ['a']", "every class needs a name"),
    ("[[class]]\nname = 'x'\nrefuse_kinds = ['UPSERT']", "unknown kind(s) UPSERT"),
    ("[[class]]\nname = 'x'\nrefuse_objects = ['a.b.c']", "is not an object"),
    ("[[class]]\nname = 'x'\nnetworks = ['10.0.0.300/8']", "networks"),
    ("[[class]]\nname = 'x'\nuser = ['a']", "unknown key(s) user"),
    ("[[class]]\nname = 'x'\n[[class]]\nname = 'x'", "used twice"),
    ("[class]\nname = 'x'", "[[class]] table"),
    ("[[class]]\nname = 'x'\nusers = 'a'", "expected a list of non-empty strings"),
    ("name = [", "not valid TOML"),
    ("version = 1", "unknown key(s) version"),
])  # fmt: skip
def test_a_broken_policy_is_refused_naming_the_key_and_the_fix(text: str, words: str) -> None:
    with pytest.raises(PolicyError, match=None) as err:
        parse_policy(text, "p.toml")
    assert words in str(err.value) and str(err.value).startswith("p.toml")


def test_the_first_class_that_holds_takes_the_client(policy) -> None:
    assert policy.classify("report_eu", "app", "psql", "10.1.2.3").name == "reporting"
    assert policy.classify("report_eu", "app", "psql", "192.168.0.1").name == "app"  # outside its network
    assert policy.classify("report_eu", "other", "psql", None) is None  # a Unix socket has no network
    assert policy.classify("alice", "app", "", "::1").name == "app"


# ---------------------------------------------------------------------- analysis


@pytest.mark.parametrize(("sql", "kinds", "tables", "functions"), [
    ("SELECT * FROM hr.salaries s JOIN people p USING (id)", {"SELECT"}, {("hr", "salaries"), (None, "people")}, set()),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", {"SELECT", "DELETE"}, {(None, "t")}, set()),
    ("EXPLAIN ANALYZE DELETE FROM hr.salaries", {"EXPLAIN", "DELETE"}, {("hr", "salaries")}, set()),
    ("PREPARE p(int) AS SELECT * FROM hr.salaries WHERE id = $1", {"PREPARE", "SELECT"}, {("hr", "salaries")}, set()),
    ("DECLARE c CURSOR FOR SELECT * FROM audit.log", {"CURSOR", "SELECT"}, {("audit", "log")}, set()),
    ("CALL hr.p(1, (SELECT ssn FROM hr.salaries))", {"CALL"}, {("hr", "salaries")}, {("hr", "p")}),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd')", {"SELECT"}, set(), {("pg_catalog", "pg_read_file")}),
    ("COPY (SELECT * FROM hr.salaries) TO STDOUT", {"COPY"}, {("hr", "salaries")}, set()),
    ("SELECT 1 INTO newt", {"SELECT", "DDL"}, {(None, "newt")}, set()),
    ('SELECT * FROM "HR"."Salaries"', {"SELECT"}, {("hr", "salaries")}, set()),
    ("LISTEN channel", {"LISTEN"}, set(), set()),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", {"TRANSACTION"}, set(), set()),
])  # fmt: skip
def test_kinds_and_objects(sql, kinds, tables, functions) -> None:
    (s,) = statements(sql)
    assert s.analysed, s.why
    assert (set(s.kinds), set(s.tables), set(s.functions) >= functions) == (kinds, tables, True)


def test_a_query_splits_at_top_level_semicolons_only() -> None:
    sql = "SELECT 'a;b'; SELECT $x$ ; $x$ ; /* ; */ SELECT \"c;d\" FROM t"
    parts = [sql[s.start:s.end] for s in statements(sql)]
    assert parts == ["SELECT 'a;b'", "SELECT $x$ ; $x$", "/* ; */ SELECT \"c;d\" FROM t"] or \
        parts == ["SELECT 'a;b'", "SELECT $x$ ; $x$", "SELECT \"c;d\" FROM t"]  # fmt: skip


@pytest.mark.parametrize("sql", ["DO $$BEGIN EXECUTE 'SELECT 1'; END$$", "SELEC x FROM t", "VACUUM t",
                                 "SELECT * FROM", "EXPLAIN"])  # fmt: skip
def test_what_cannot_be_read_is_not_analysed(sql) -> None:
    (s,) = statements(sql)
    assert not s.analysed and s.why


def test_the_shape_holds_no_literal() -> None:
    (a,) = statements("SELECT * FROM t WHERE ssn = '123-45-6789' AND n = 42")
    (b,) = statements("SELECT * FROM t WHERE ssn = '999-99-9999' AND n = 7")
    assert "123" not in a.shape and "42" not in a.shape and a.digest == b.digest


# ---------------------------------------------------------------------- decisions


@pytest.mark.parametrize(("cls", "sql", "refused"), [
    ("reporting", "SELECT * FROM hr.salaries", "table hr.salaries"),
    ("reporting", "SELECT * FROM salaries", "table salaries"),  # unqualified: any schema (fail closed)
    ("reporting", "SELECT * FROM hr.people", None),
    ("reporting", "SELECT * FROM audit.anything", "table audit.anything"),
    ("reporting", "DELETE FROM public.t", "request kind DELETE"),
    ("reporting", "WITH d AS (DELETE FROM t RETURNING 1) SELECT 1", "request kind DELETE"),
    ("reporting", "SELECT pg_read_file('x')", "function pg_read_file"),
    ("reporting", "DO $$BEGIN END$$", "a statement connmgr cannot analyse"),
    ("reporting", "WITH salaries AS (SELECT 1) SELECT * FROM salaries", None),
    ("reporting", "SELECT query_to_xml('select * from hr.salaries', true, false, '')",
     "function query_to_xml (it runs SQL or reads a table named in its arguments)"),
    ("reporting", "SELECT table_to_xml('hr.salaries'::regclass, true, false, '')",
     "function table_to_xml (it runs SQL or reads a table named in its arguments)"),
    ("reporting", "SELECT most_common_vals FROM pg_stats WHERE tablename = 'salaries'",
     "view pg_catalog.pg_stats (it shows values of every table's columns)"),
    ("app", "SELECT * FROM public.t", None),
    ("app", "SELECT * FROM other.t", "table other.t"),
    ("app", "COPY public.t TO STDOUT", "request kind COPY"),
    ("app", "SET search_path = public", None),
])  # fmt: skip
def test_the_decision_table(policy, cls, sql, refused) -> None:
    c = next(k for k in policy.classes if k.name == cls)
    (s,) = statements(sql)
    r = check(c, s)
    assert (r.what if r else None) == refused
    if r is not None:
        assert f"class {cls!r}" in r.rule


def test_the_refused_statement_is_replaced_and_the_others_kept(policy) -> None:
    c = policy.classes[0]
    new, r = rewrite_query("SELECT 1; SELECT * FROM hr.salaries; SELECT 2", c)
    assert r.what == "table hr.salaries"
    assert new.startswith("SELECT 1; DO $connmgr_refused$") and new.endswith("; SELECT 2")
    assert "ERRCODE = '42501'" in new and "hr.salaries" in new
    assert rewrite_query("SELECT 1; SELECT 2", c) == (None, None)


def test_the_refusal_cannot_be_broken_out_of(policy) -> None:
    """A table name (or anything of the statement) that ends the DO body or the literal
    stays inside them."""
    c = policy.classes[0]
    (s,) = statements('SELECT * FROM audit."x$connmgr_refused$; DROP TABLE t; --\'"')
    sql = refusal_sql(check(c, s))
    assert sql.count("$connmgr_refused") == 0 or "$connmgr_refused_$" in sql
    (again,) = statements(sql)
    assert again.kinds == {"DO"}


# ---------------------------------------------------------------------- the guard


def _batch(*messages: bytes) -> tuple[bytes, list]:
    return Framer(frontend=True).feed(b"".join(messages))


def _q(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def _parse(name: bytes, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = name + b"\0" + sql.encode() + b"\0" + struct.pack("!h", len(types)) + b"".join(struct.pack("!I", t) for t in types)
    return b"P" + struct.pack("!I", len(body) + 4) + body


def _bind(name: bytes, *values: bytes) -> bytes:
    body = b"\0" + name + b"\0" + struct.pack("!hh", 1, 0) + struct.pack("!h", len(values))
    body += b"".join(struct.pack("!i", len(v)) + v for v in values) + struct.pack("!hh", 1, 1)
    return b"B" + struct.pack("!I", len(body) + 4) + body


def test_the_guard_replaces_a_refused_parse_and_unbinds_its_binds(policy) -> None:
    refused = []
    g = Guard(policy.classes[0], refused.append)
    buf, frames = _batch(_parse(b"s1", "SELECT * FROM hr.salaries WHERE id = $1", (23,)), _bind(b"s1", b"7"),
                         _q("SELECT 1"), _parse(b"s2", "SELECT $1"), _bind(b"s2", b"8"))  # fmt: skip
    out, out_frames = g.filter(buf, frames)
    again, again_frames = Framer(frontend=True).feed(out)
    assert again == out and [f[0] for f in again_frames] == [f[0] for f in out_frames] == [ord(c) for c in "PBQPB"]
    assert [tuple(f) for f in again_frames] == [tuple(f) for f in out_frames]
    assert b"hr.salaries" in out and b"DO $connmgr_refused$" in out and len(refused) == 1
    # the Bind to s1 lost its parameter (and kept its result format); s2's is untouched
    p1, b1, _q1, _p2, b2 = (out[s - 5:e] for _t, s, e in out_frames)
    assert b1 == b"B" + struct.pack("!I", 4 + 1 + 3 + 4 + 4) + b"\0s1\0" + b"\0\0\0\0" + struct.pack("!hh", 1, 1)
    assert b2 == _bind(b"s2", b"8")
    # an allowed statement parsed under the name again is bound normally
    buf, frames = _batch(_parse(b"s1", "SELECT 2"), _bind(b"s1"))
    assert g.filter(buf, frames)[0] == buf


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["SELECT 1", "SELECT * FROM hr.salaries", "DELETE FROM t", "SELECT 'é;'",
                                 "DO $$x$$", "LISTEN c", "SELECT * FROM audit.x WHERE a = $1"]), min_size=1, max_size=6),
       st.booleans())  # fmt: skip
def test_the_guard_always_yields_whole_messages(policy, parts, extended) -> None:
    g = Guard(policy.classes[0], lambda r: None)
    msgs = [_parse(b"", p) + _bind(b"") for p in parts] if extended else [_q("; ".join(parts))]
    buf, frames = _batch(*msgs)
    out, out_frames = g.filter(buf, frames)
    again, again_frames = Framer(frontend=True).feed(out)
    assert again == out and [tuple(f) for f in again_frames] == [tuple(f) for f in out_frames]
    assert (b"hr.salaries" in out or b"audit.x" in out or b"DELETE" in out) <= (b"connmgr_refused" in out)


# ---------------------------------------------------------------------- the catalog


def _catalog():
    from shadow.policy.catalog import Catalog

    return Catalog.from_rows([
        ("r", "hr", "salaries", None), ("r", "public", "people", None), ("r", "audit", "log", None),
        ("r", "public", "log", None),
        ("v", "public", "pay", "SELECT id FROM hr.salaries"),
        ("v", b"public", b"pay2", b"SELECT * FROM pay"),  # (rows come as bytes from the wire)
        ("v", "public", "loop1", "SELECT * FROM loop2"),
        ("v", "public", "loop2", "SELECT * FROM loop1"),
        ("v", "other", "pay", "SELECT 1"),
        ("f", "public", "total", "SELECT sum(x) FROM pay2"),
        ("f", "public", "opaque", None),
    ])  # fmt: skip


@pytest.mark.parametrize(("sql", "refused"), [
    ("SELECT * FROM pay2", "table hr.salaries"),  # view -> view -> table
    ("SELECT total()", "table hr.salaries"),  # SQL function -> view -> view -> table
    ("SELECT * FROM other.pay", None),  # the other schema's pay reads nothing refused
    ("SELECT * FROM loop1", None),  # a cycle ends
    ("SELECT opaque()", "a statement connmgr cannot analyse"),
    ("SELECT * FROM people", None),  # only public has one: audit.* does not take it
    ("SELECT * FROM log", "table audit.log"),  # audit has one: it may be that one
    ("SELECT * FROM nowhere", "table nowhere"),  # no schema has it: audit.* takes it (fail closed)
])  # fmt: skip
def test_views_and_functions_are_read_through(policy, sql, refused) -> None:
    new, r = rewrite_query(sql, policy.classes[0], _catalog())
    assert (r.what if r else None) == refused
    if refused == "a statement connmgr cannot analyse":
        assert "function public.opaque, not written in SQL" in r.detail


def test_a_trusted_function_in_another_language_may_be_called(policy) -> None:
    """``trusted_functions``: the operator vouches for what a plpgsql/C function reads; the
    others stay refused, and what the trusted one is given is still judged."""
    from dataclasses import replace

    from shadow.policy.rules import ObjectPattern

    cls = replace(policy.classes[0], trusted_functions=(ObjectPattern.parse("function:public.opaque", "t"),))
    assert rewrite_query("SELECT opaque()", cls, _catalog())[1] is None
    assert rewrite_query("SELECT opaque() FROM pay", cls, _catalog())[1].what == "table hr.salaries"
    other = replace(policy.classes[0], trusted_functions=(ObjectPattern.parse("function:other.opaque", "t"),))
    assert rewrite_query("SELECT opaque()", other, _catalog())[1].what == "a statement connmgr cannot analyse"
    with pytest.raises(PolicyError, match="trusted_functions"):
        parse_policy('[[class]]\nname = "x"\ntrusted_functions = ["a.b.c"]\n')


def test_a_function_call_by_oid_is_refused_to_a_restricting_class(policy) -> None:
    """FunctionCall names its function by OID: nothing to analyse, so it is sent as a Query
    of the raising DO (the client gets ErrorResponse and ReadyForQuery, as for a failed
    FunctionCall); an unrestricted class's goes through."""
    from shadow.policy.rules import ClientClass

    call = b"F" + struct.pack("!I", 4 + 4 + 2 + 2 + 4 + 1 + 2) + struct.pack("!Ihhi", 764, 0, 1, 1) + b"x" + struct.pack("!h", 0)
    buf, frames = _batch(_q("SELECT 1"), call)
    refused = []
    out, out_frames = Guard(policy.classes[0], refused.append).filter(buf, frames)
    again, again_frames = Framer(frontend=True).feed(out)
    assert [f[0] for f in again_frames] == [f[0] for f in out_frames] == [ord("Q"), ord("Q")]
    assert b"FunctionCall" in out and len(refused) == 1 and refused[0].what.startswith("a function call by OID")
    assert Guard(ClientClass("free"), refused.append).filter(buf, frames) == (buf, frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from([
        "SELECT {v} FROM people WHERE id = {v}", "SELECT * FROM hr.salaries WHERE ssn = {v}",
        "EXPLAIN SELECT {v}", "EXPLAIN DELETE FROM hr.salaries WHERE id = {v}", "DO $$BEGIN PERFORM {v}; END$$",
        "SELECT query_to_xml({v}, true, false, '')", "UPDATE people SET a = {v}", "CALL p({v})",
        "PREPARE q AS SELECT * FROM hr.salaries WHERE a = {v}", "SELECT {v}::regclass",
        "SELECT * FROM audit.log LIMIT {v}", "SELECT $x${v}$x$ FROM people",
    ]),
    st.sampled_from(["1", "'x'", "'it''s'", "E'\\\\''", "$q$;$q$", "-2.5e3", "'hr.salaries'", "X'ff'",
                     "'SELECT * FROM hr.salaries'"]),
), min_size=1, max_size=4))  # fmt: skip
def test_the_shape_cache_decides_as_the_full_analysis(policy, parts) -> None:
    """A decision cached by a statement's shape (its tokens without the literals' values)
    is the decision the full analysis makes for the same statement with other values."""
    from shadow.policy.decision import rewrite_query_by_shape

    sql = "; ".join(template.format(v=value) for template, value in parts)
    for cls in policy.classes:
        full_text, full = rewrite_query(sql, cls, _catalog())
        by_shape_text, by_shape = rewrite_query_by_shape(sql, cls, _catalog_once())
        assert by_shape_text == full_text
        assert (by_shape.what if by_shape else None) == (full.what if full else None)


_CATALOG = []


def _catalog_once():
    """One catalog object for all examples (the shape cache keys on it, as in a session)."""
    if not _CATALOG:
        _CATALOG.append(_catalog())
    return _CATALOG[0]
