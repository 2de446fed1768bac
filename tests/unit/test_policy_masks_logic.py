"""Column masks' pure parts: the masks in the policy file, a value masked by type and
format, the lineage table (what each statement shows, and which are refused), COPY rows in
text, CSV and binary, and the server's answers matched to the statements the guard saw."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadow.framing import Framer
from shadow.policy.analysis import statements, token_groups
from shadow.policy.catalog import Catalog
from shadow.policy.copying import CopyMasker, parse_copy
from shadow.policy.decision import decide_query
from shadow.policy.guard import Guard
from shadow.policy.masking import FULL, mask_data_row, mask_value
from shadow.policy.rules import ColumnMask, PolicyError, parse_policy

KEY = "0123456789abcdef0123"

POLICY = """
[[class]]
name = "support"
[[class.mask]]
column = "person.ssn"
mask = "last"
keep = 4
[[class.mask]]
column = "public.person.salary"
mask = "full"
[[class.mask]]
column = "person.email"
mask = "hash"
key_env = "TEST_MASK_KEY"
allow_predicates = true
"""


@pytest.fixture
def cls(monkeypatch):
    monkeypatch.setenv("TEST_MASK_KEY", KEY)
    return parse_policy(POLICY, "p.toml").classes[0]


def _catalog() -> Catalog:
    return Catalog.from_rows(
        [("r", "public", "person", None), ("r", "public", "card", None),
         ("v", "public", "pv", "SELECT person.id, person.ssn AS s FROM person WHERE person.ssn IS NOT NULL;"),
         ("v", "public", "pv2", "SELECT pv.s FROM pv;"), ("f", "public", "getssn", "SELECT ssn FROM person"),
         ("f", "public", "people_of", "SELECT id, name, ssn FROM person WHERE id = $1"),
         ("f", "public", "ssn_of", "SELECT ssn FROM person WHERE id = $1 AND ssn IS NOT NULL"),
         ("f", "public", "by_name", "SELECT ssn FROM person WHERE name = p_name"),
         ("f", "public", "twice", "SELECT 1; SELECT ssn FROM person")],
        [("public", "person", "id", 23), ("public", "person", "name", 25), ("public", "person", "ssn", 25),
         ("public", "person", "salary", 1700), ("public", "person", "email", 25), ("public", "card", "pid", 23),
         ("public", "card", "num", 25), ("public", "pv", "id", 23), ("public", "pv", "s", 25),
         ("public", "pv2", "s", 25)])  # fmt: skip


# ---------------------------------------------------------------------- the file


@pytest.mark.parametrize(("mask", "words"), [
    ("column = 'ssn'\nmask = 'full'", "write \"schema.table.column\""),
    ("column = 'p.ssn'\nmask = 'blur'", "mask: one of full, last, hash, null, constant"),
    ("column = 'p.ssn'\nmask = 'last'\nkeep = -1", "keep: the number of last characters"),
    ("column = 'p.ssn'\nmask = 'full'\nkeep = 2", "keep: not a setting of mask 'full'"),
    ("column = 'p.ssn'\nmask = 'constant'", "value: the text shown instead"),
    ("column = 'p.ssn'\nmask = 'hash'", "key_env: the environment variable"),
    ("column = 'p.ssn'\nmask = 'hash'\nkey_env = 'NO_SUCH_VARIABLE_X'", "it is not set"),
    ("column = 'p.ssn'\nmask = 'null'\nallow_predicates = 'yes'", "allow_predicates: true or false"),
    ("column = 'p.ssn'\nmask = 'null'\ncolour = 1", "unknown key(s) colour"),
])  # fmt: skip
def test_a_broken_mask_is_refused_naming_the_key_and_the_fix(mask: str, words: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(f"[[class]]\nname = 'x'\n[[class.mask]]\n{mask}\n", "p.toml")
    assert words in str(err.value), str(err.value)


def test_a_hash_key_is_never_shown(cls) -> None:
    assert KEY not in repr(cls) and cls.restricts_objects


# ---------------------------------------------------------------------- values


def _mask(kind: str, **kw) -> ColumnMask:
    return ColumnMask(None, "t", "c", kind, "t.c", **kw)


@pytest.mark.parametrize(("mask", "value", "oid", "binary", "want"), [
    (_mask("full"), b"123-45-6789", 25, False, b"****"),
    (_mask("full"), b"123-45-6789", 1043, True, b"****"),  # varchar: binary is the text
    (_mask("last", keep=4), b"123-45-6789", 25, False, b"*******6789"),
    (_mask("last", keep=4), b"abc", 25, False, b"***"),  # shorter than keep: nothing kept
    (_mask("last", keep=2), b"24681357", 23, False, b"57"),
    (_mask("last", keep=2), struct.pack("!i", 24681357), 23, True, struct.pack("!i", 57)),
    (_mask("full"), b"987654321.25", 1700, False, b"0"),
    (_mask("full"), b"\x00\x03\x00\x02\x00\x00\x00\x02", 1700, True, b"\0" * 8),
    (_mask("full"), b"t", 16, False, b"f"),
    (_mask("full"), b"2024-01-02", 1082, False, b"1970-01-01"),
    (_mask("full"), struct.pack("!i", 8767), 1082, True, struct.pack("!i", -10957)),
    (_mask("full"), b'{"a": 1}', 3802, False, b'"****"'),
    (_mask("full"), b'\x01{"a": 1}', 3802, True, b'\x01"****"'),
    (_mask("full"), b"{1,2}", 1007, False, None),  # an array: NULL
    (_mask("null"), b"x", 25, False, None),
    (_mask("constant", value="n/a"), b"x", 25, False, b"n/a"),
    (_mask("constant", value="7"), struct.pack("!q", 5), 20, True, struct.pack("!q", 7)),
    (_mask("constant", value="7"), b"\x00", 1700, True, None),  # no binary form of the constant: NULL
    (_mask("last", keep=4), None, 25, False, None),  # NULL stays NULL
])  # fmt: skip
def test_a_value_is_masked_in_its_type_and_format(mask, value, oid, binary, want) -> None:
    assert mask_value(mask, value, oid, binary) == want


def test_a_keyed_hash_is_stable_keyed_and_typed() -> None:
    a, b = _mask("hash", key=b"k" * 16), _mask("hash", key=b"j" * 16)
    assert mask_value(a, b"x@y", 25, False) == mask_value(a, b"x@y", 25, True)
    assert mask_value(a, b"x@y", 25, False) != mask_value(b, b"x@y", 25, False)
    assert len(mask_value(a, b"x@y", 25, False)) == 32
    text, binary = mask_value(a, b"42", 23, False), mask_value(a, struct.pack("!i", 42), 23, True)
    assert struct.unpack("!i", binary)[0] == int(text) and 0 <= int(text) < 2**31  # the same number either way


def test_a_data_row_is_masked_in_place_and_a_broken_one_nulled() -> None:
    body = struct.pack("!h", 3) + struct.pack("!i", 1) + b"7" + struct.pack("!i", -1) + struct.pack("!i", 3) + b"abc"
    out = mask_data_row(body, 0, len(body), {2: (FULL, 25, False), 1: (FULL, 25, False)})
    assert out == b"D" + struct.pack("!i", 4 + 2 + 5 + 4 + 8) + struct.pack("!h", 3) + struct.pack("!i", 1) + b"7" + \
        struct.pack("!i", -1) + struct.pack("!i", 4) + b"****"  # fmt: skip
    broken = struct.pack("!h", 2) + struct.pack("!i", 99) + b"x"
    assert mask_data_row(broken, 0, len(broken), {0: (FULL, 25, False)}).endswith(struct.pack("!ii", -1, -1))


# ---------------------------------------------------------------------- lineage


def _masks(sql: str, cls) -> list | str:
    decision = decide_query(sql, cls, _catalog())
    if decision.refusal is not None:
        return decision.refusal.detail
    outcome = decision.outcomes[0] if decision.outcomes else None
    shown = outcome.shown or outcome.bound if outcome is not None else None
    return [] if shown is None else [m.mask if m else None for m in shown.masks]


@pytest.mark.parametrize(("sql", "want"), [
    ("SELECT * FROM card", []),
    ("SELECT * FROM person", [None, None, "last", "full", "hash"]),
    ("SELECT p.name, p.ssn FROM person p WHERE p.id = 1", [None, "last"]),
    ("SELECT x FROM (SELECT ssn AS x FROM person) s", ["last"]),
    ("WITH w AS (SELECT ssn FROM person) SELECT * FROM w", ["last"]),
    ("WITH RECURSIVE r(n, s) AS (SELECT 1, ssn FROM person UNION ALL SELECT n + 1, s FROM r WHERE n < 3)"
     " SELECT s FROM r", ["last"]),
    ("WITH RECURSIVE r(n, s) AS (SELECT 1, ssn FROM person UNION ALL SELECT n + 1, substr(s, 2) FROM r"
     " WHERE n < 3) SELECT s FROM r", ["full"]),  # (the recursion computes with it: a fixed point)
    ("SELECT ssn FROM person UNION ALL SELECT name FROM person", ["last"]),
    ("SELECT ssn || '' FROM person", ["full"]), ("SELECT substr(ssn, 1, 3) FROM person", ["full"]),
    ("SELECT p FROM person p", ["full"]), ("SELECT row_to_json(p) FROM person p", ["full"]),
    ("SELECT to_jsonb(p.*) FROM person p", ["full"]), ("SELECT array_agg(p) FROM person p", ["full"]),
    ("SELECT (SELECT ssn FROM person LIMIT 1)", ["last"]), ("SELECT * FROM pv", [None, "last"]),
    ("SELECT * FROM pv2", ["last"]), ("SELECT l.* FROM person p, LATERAL (SELECT p.ssn) l", ["last"]),
    ("SELECT email FROM person WHERE email = 'x'", ["hash"]),  # allow_predicates
    ("DELETE FROM person WHERE id = 1 RETURNING ssn, name", ["last", None]),
    ("PREPARE q AS SELECT ssn FROM person", ["last"]), ("DECLARE c CURSOR FOR SELECT salary FROM person", ["full"]),
    ("COPY person (id, ssn) TO STDOUT", [None, "last"]), ("COPY (SELECT ssn FROM person) TO STDOUT CSV", ["last"]),
    ("SELECT ssn FROM person WHERE ssn = 'x'", "WHERE on masked column person.ssn"),
    ("SELECT ssn FROM person ORDER BY 1", "ORDER BY on masked column"),
    ("SELECT ssn FROM person ORDER BY 2", "Unknown output column: 2"),  # (Postgres would refuse it too)
    ("SELECT ssn, id FROM person ORDER BY 2", ["last", None]),
    ("SELECT count(*) FROM person GROUP BY ssn", "GROUP BY on masked column"),
    ("SELECT DISTINCT ssn FROM person", "DISTINCT on masked column"),
    ("SELECT DISTINCT ON (ssn) id FROM person", "DISTINCT ON on masked column"),
    ("SELECT ssn FROM person UNION SELECT 'x'", "UNION (it compares rows"),
    ("SELECT ssn FROM person INTERSECT ALL SELECT 'x'", "INTERSECT (it compares rows"),
    ("SELECT ssn::int FROM person", "a cast to int over masked column"),
    ("SELECT salary + 1 FROM person", "operator ADD over masked column public.person.salary"),
    ("SELECT ssn = 'x' FROM person", "operator EQ over masked column"),
    ("SELECT * FROM person a JOIN card b ON b.num = a.ssn", "JOIN ... ON on masked column"),
    ("SELECT lag(id) OVER (ORDER BY ssn) FROM person", "a window's ORDER on masked column"),
    ("SELECT s FROM pv WHERE s LIKE '1%'", "WHERE on masked column person.ssn"),
    ("SELECT * FROM people_of(1)", [None, None, "last"]),  # a function's rows: traced through its body
    ("SELECT p.ssn, p.name FROM public.people_of($1) AS p", ["last", None]),
    ("SELECT ssn_of(7)", ["last"]),  # its one value (its own WHERE on ssn is its owner's)
    ("SELECT getssn()", ["last"]),
    ("SELECT * FROM people_of(1) WHERE ssn = 'x'", "WHERE on masked column"),  # the client's probe still is one
    ("SELECT ssn_of(id) FROM person", "is given a column, a query or a function: call it with values"),
    ("SELECT * FROM people_of(ssn_of(1)::int)", "is given a column, a query or a function"),  # (the cast's error)
    ("SELECT * FROM people_of((SELECT 1))", "is given a column, a query or a function"),
    ("SELECT * FROM people_of(-1 + $1::int)", [None, None, "last"]),
    ("SELECT 1 WHERE ssn_of(7) LIKE '1%'", "WHERE on masked column"),
    ("SELECT ssn_of(7) ORDER BY 1", "cannot be resolved"),  # (sqlglot's own assertion: fail closed)
    ("SELECT ssn_of(7)::int", "a cast to int over masked column person.ssn"),
    ("SELECT by_name('x')", "cannot be resolved"),  # (a parameter by name: not traced, refused)
    ("SELECT * FROM twice()", "its body is not one query"),
    ("INSERT INTO card SELECT id, ssn FROM person", "writes masked column person.ssn into a table"),
    ("CREATE TABLE t AS SELECT ssn FROM person", "writes masked column person.ssn into a table"),
    ("UPDATE person SET name = ssn WHERE id = 1", "UPDATE reads masked column person.ssn"),
    ("SELECT * FROM person p, unnest(ARRAY[p.ssn]) u", "function unnest over masked column"),
    ("COPY person TO '/tmp/x'", "COPY TO a file or program would write masked column"),
    ("SELECT ssn FROM nosuch", []),  # no masked table is read
])  # fmt: skip
def test_what_each_statement_shows_or_why_it_is_refused(cls, sql: str, want) -> None:
    got = _masks(sql, cls)
    if isinstance(want, str):
        assert isinstance(got, str) and want in got, got
    else:
        assert got == want


def test_order_by_a_number_is_not_shared_by_shape(cls) -> None:
    from shadow.policy.decision import decide_query_by_shape

    catalog = _catalog()
    assert decide_query_by_shape("SELECT ssn, id FROM person ORDER BY 2", cls, catalog).refusal is None
    assert decide_query_by_shape("SELECT ssn, id FROM person ORDER BY 1", cls, catalog).refusal is not None


# ---------------------------------------------------------------------- COPY


def _copy(sql: str):
    return parse_copy(sql, token_groups(sql)[0])


_TEXT_FIELD = st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                                            max_size=12))  # fmt: skip


def _pg_text(fields, delimiter: str, null: str) -> bytes:
    def esc(v: str) -> str:
        escapes = {"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
        return "".join(escapes.get(c) or ("\\" + c if c == delimiter else c) for c in v)  # (as CopyAttributeOutText)

    return (delimiter.join(null if f is None else esc(f) for f in fields) + "\n").encode()


def _pg_csv(fields, delimiter: str, quote: str) -> bytes:
    def q(v: str) -> str:
        if v == "" or any(c in v for c in (delimiter, quote, "\n", "\r")) or v.strip() != v:
            return quote + v.replace(quote, quote * 2) + quote
        return v

    return (delimiter.join("" if f is None else q(f) for f in fields) + "\n").encode()


@settings(max_examples=200, deadline=None)
@given(fields=st.lists(_TEXT_FIELD, min_size=1, max_size=5), masked=st.sets(st.integers(0, 4)),
       delimiter=st.sampled_from(["\t", "|", ",", ";"]))  # fmt: skip
def test_a_text_copy_row_keeps_every_unmasked_field_and_masks_the_others(fields, masked, delimiter) -> None:
    mask = _mask("last", keep=2)
    fmt = _copy(f"COPY t TO STDOUT (DELIMITER '{delimiter}')").format
    columns = {i: (mask, 25) for i in masked if i < len(fields)}
    out = CopyMasker(fmt, columns, len(fields)).row(_pg_text(fields, delimiter, "\\N"))
    want = [f if i not in columns or f is None else mask_value(mask, f.encode(), 25, False).decode()
            for i, f in enumerate(fields)]  # fmt: skip
    assert out == _pg_text(want, delimiter, "\\N")


@settings(max_examples=200, deadline=None)
@given(fields=st.lists(_TEXT_FIELD, min_size=2, max_size=5), masked=st.sets(st.integers(0, 4)))
def test_a_csv_copy_row_keeps_every_unmasked_value_and_masks_the_others(fields, masked) -> None:
    import csv
    import io

    mask = _mask("full")
    fmt = _copy("COPY t TO STDOUT (FORMAT csv)").format
    columns = {i: (mask, 25) for i in masked if i < len(fields)}
    out = CopyMasker(fmt, columns, len(fields)).row(_pg_csv(fields, ",", '"'))
    (row,) = list(csv.reader(io.StringIO(out.decode(), newline="")))
    want = ["" if f is None else ("****" if i in columns else f) for i, f in enumerate(fields)]
    assert row == want


def test_a_binary_copy_masks_by_field_length_with_the_header_and_trailer_kept() -> None:
    fmt = _copy("COPY t TO STDOUT (FORMAT binary)").format
    masker = CopyMasker(fmt, {1: (_mask("full"), 25), 0: (_mask("last", keep=1), 23)}, 2)
    header = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0)
    row = struct.pack("!hi", 2, 4) + struct.pack("!i", 1234) + struct.pack("!i", 3) + b"abc"
    assert masker.row(header + row) == header + struct.pack("!hi", 2, 4) + struct.pack("!i", 4) + \
        struct.pack("!i", 4) + b"****"  # fmt: skip
    assert masker.row(struct.pack("!h", -1)) == struct.pack("!h", -1)
    assert masker.row(struct.pack("!hi", 2, 50) + b"short") == struct.pack("!hii", 2, -1, -1)  # broken: NULLs


def test_copy_options_old_and_new() -> None:
    a = _copy("COPY p (a, b) TO STDOUT WITH (FORMAT csv, HEADER, DELIMITER ';', NULL 'x')")
    assert (a.table, a.columns, a.to, a.stdout) == ((None, "p"), ("a", "b"), True, True)
    assert (a.format.kind, a.format.delimiter, a.format.null, a.format.header) == ("csv", ";", "x", True)
    b = _copy("COPY s.\"P\" TO STDOUT DELIMITER AS '|' NULL AS '' CSV QUOTE '''' ESCAPE '\\'")
    assert b.table == ("s", "P") and (b.format.quote, b.format.escape, b.format.header) == ("'", "\\", False)
    assert _copy("COPY (SELECT 1) TO STDOUT BINARY").format.kind == "binary"
    assert not _copy("COPY t TO '/tmp/x'").stdout and not _copy("COPY t FROM STDIN").to


# ---------------------------------------------------------------------- the server's answers


def _msg(tag: bytes, body: bytes = b"") -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def _row_description(*oids: int, fmt: int = 0) -> bytes:
    body = struct.pack("!h", len(oids)) + b"".join(b"c\0" + struct.pack("!ihihih", 0, 0, oid, -1, -1, fmt)
                                                   for oid in oids)  # fmt: skip
    return _msg(b"T", body)


def _data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values)) + b"".join(struct.pack("!i", -1) if v is None else
                                                     struct.pack("!i", len(v)) + v for v in values)  # fmt: skip
    return _msg(b"D", body)


def _through(guard: Guard, client: bytes, server: bytes) -> bytes:
    buf, frames = Framer(frontend=True).feed(client)
    guard.filter(buf, frames)
    buf, frames = Framer().feed(server)
    return guard.results.filter(buf, frames)[0]


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def test_a_query_of_two_statements_masks_each_by_its_own(cls) -> None:
    guard = Guard(cls, lambda r: None, lambda: _catalog())
    client = _msg(b"Q", _cstr("SELECT name, ssn FROM person; SELECT ssn, name FROM person"))
    server = _row_description(25, 25) + _data_row(b"al", b"123456789") + _msg(b"C", _cstr("SELECT 1")) + \
        _row_description(25, 25) + _data_row(b"123456789", b"al") + _msg(b"C", _cstr("SELECT 1")) + \
        _msg(b"Z", b"I")  # fmt: skip
    out = _through(guard, client, server)
    assert _data_row(b"al", b"*****6789") in out and _data_row(b"*****6789", b"al") in out
    assert b"123456789" not in out


def test_an_unexpected_description_masks_every_column(cls) -> None:
    guard = Guard(cls, lambda r: None, lambda: _catalog())
    client = _msg(b"Q", _cstr("SELECT ssn FROM person"))
    server = _row_description(25, 23) + _data_row(b"123456789", b"7") + _msg(b"C", _cstr("SELECT 1")) + \
        _msg(b"Z", b"I")  # fmt: skip
    assert _data_row(b"****", b"0") in _through(guard, client, server)


def test_a_pipeline_masks_each_execute_by_the_portal_it_was_sent_for(cls) -> None:
    guard = Guard(cls, lambda r: None, lambda: _catalog())
    bind = _msg(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
    client = b"".join([
        _msg(b"P", b"\0" + _cstr("SELECT ssn FROM person") + b"\0\0"), bind, _msg(b"D", b"P\0"), _msg(b"E", b"\0\0\0\0\0"),
        _msg(b"P", b"\0" + _cstr("SELECT 'x'::text") + b"\0\0"), bind, _msg(b"D", b"P\0"), _msg(b"E", b"\0\0\0\0\0"),
        _msg(b"S")])  # fmt: skip
    server = b"".join([
        _msg(b"1"), _msg(b"2"), _row_description(25), _data_row(b"123456789"), _msg(b"C", _cstr("SELECT 1")),
        _msg(b"1"), _msg(b"2"), _row_description(25), _data_row(b"123456789"), _msg(b"C", _cstr("SELECT 1")),
        _msg(b"Z", b"I")])  # fmt: skip
    out = _through(guard, client, server)
    assert out.count(_data_row(b"*****6789")) == 1 and out.count(_data_row(b"123456789")) == 1


def test_an_error_skips_to_the_sync_and_the_next_request_is_matched(cls) -> None:
    guard = Guard(cls, lambda r: None, lambda: _catalog())
    bind = _msg(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 1) + struct.pack("!h", 1))  # binary results
    client = b"".join([
        _msg(b"P", b"\0" + _cstr("SELECT 1/0") + b"\0\0"), bind, _msg(b"E", b"\0\0\0\0\0"),
        _msg(b"P", b"\0" + _cstr("SELECT 1") + b"\0\0"), bind, _msg(b"E", b"\0\0\0\0\0"), _msg(b"S"),
        _msg(b"P", b"\0" + _cstr("SELECT salary FROM person") + b"\0\0"), bind, _msg(b"E", b"\0\0\0\0\0"),
        _msg(b"S")])  # fmt: skip
    server = b"".join([
        _msg(b"1"), _msg(b"2"), _msg(b"E", b"SERROR\0C22012\0\0"), _msg(b"Z", b"I"),
        _msg(b"1"), _msg(b"2"), _data_row(b"\0\x02\0\0\0\0\0\0"), _msg(b"C", _cstr("SELECT 1")), _msg(b"Z", b"I")])  # fmt: skip
    out = _through(guard, client, server)
    assert _data_row(b"\0" * 8) in out  # numeric 0 in binary, by the type the catalog gives


def test_a_fetch_from_a_cursor_shows_what_the_declare_was_found_to_show(cls) -> None:
    guard = Guard(cls, lambda r: None, lambda: _catalog())
    client = _msg(b"Q", _cstr("DECLARE c CURSOR FOR SELECT ssn FROM person; FETCH 1 FROM c; FETCH 1 FROM d"))
    server = _msg(b"C", _cstr("DECLARE CURSOR")) + _row_description(25) + _data_row(b"123456789") + \
        _msg(b"C", _cstr("FETCH 1")) + _row_description(25) + _data_row(b"abc") + _msg(b"C", _cstr("FETCH 1")) + \
        _msg(b"Z", b"I")  # fmt: skip
    out = _through(guard, client, server)
    assert _data_row(b"*****6789") in out
    assert _data_row(b"****") in out  # a cursor it never saw declared: every value masked


def test_statements_without_a_masked_column_pass_unchanged(cls) -> None:
    guard = Guard(cls, lambda r: None, lambda: _catalog())
    client = _msg(b"Q", _cstr("SELECT num FROM card"))
    server = _row_description(25) + _data_row(b"123456789") + _msg(b"C", _cstr("SELECT 1")) + _msg(b"Z", b"I")
    buf, frames = Framer(frontend=True).feed(client)
    guard.filter(buf, frames)
    buf, frames = Framer().feed(server)
    assert guard.results.filter(buf, frames)[2] is False


def test_statement_texts_name_what_they_make_and_use() -> None:
    got = [(s.binds, s.uses) for s in statements('PREPARE "Q x" AS SELECT 1; EXECUTE "Q x"; DECLARE c CURSOR FOR'
                                                ' SELECT 1; FETCH NEXT IN C; MOVE c')]  # fmt: skip
    assert got == [(("prepare", "Q x"), None), (None, ("prepare", "Q x")), (("cursor", "c"), None),
                   (None, ("cursor", "c")), (None, ("cursor", "c"))]  # fmt: skip


def test_a_resumed_session_masks_the_replies_it_is_still_owed(cls) -> None:
    """Host takeover: the guard of a session that continues on the other connmgr learns
    from the shadow's copy what is prepared and in flight; a row of a request it knows
    nothing of is masked in full."""
    from shadow.session import SessionState

    state = SessionState.joined()
    parse = b"s1\0" + _cstr("SELECT ssn FROM person") + b"\0\0"
    state.frontend_message(ord("P"), parse)
    state.frontend_message(ord("S"), b"")
    state.backend_message(ord("1"), b"")
    state.backend_message(ord("Z"), b"I")
    state.frontend_message(ord("Q"), _cstr("SELECT name, ssn FROM person"))  # in flight when host A died
    guard = Guard(cls, lambda r: None, lambda: _catalog())
    guard.resume(state)
    server = _row_description(25, 25) + _data_row(b"al", b"123456789") + _msg(b"C", _cstr("SELECT 1")) + \
        _msg(b"Z", b"I")  # fmt: skip
    buf, frames = Framer().feed(server)
    assert _data_row(b"al", b"*****6789") in guard.results.filter(buf, frames)[0]
    client = _msg(b"B", b"\0s1\0" + struct.pack("!hhh", 0, 0, 0)) + _msg(b"E", b"\0\0\0\0\0") + _msg(b"S")
    server = _msg(b"2") + _data_row(b"123456789") + _msg(b"C", _cstr("SELECT 1")) + _msg(b"Z", b"I")
    assert _data_row(b"*****6789") in _through(guard, client, server)  # the statement prepared on host A
    stray = _data_row(b"123456789")
    buf, frames = Framer().feed(stray)
    assert guard.results.filter(buf, frames)[0] == _data_row(None)  # a row of nothing it saw sent


_SHARED = ["SELECT ssn, id FROM person WHERE id = 1", "SELECT * FROM card WHERE pid = 12 AND num = '34'",
           "SELECT ssn FROM person ORDER BY 1", "SELECT ssn, id FROM person ORDER BY 2", "SELECT * FROM pv2",
           "SELECT s1.ssn FROM person s1 WHERE s1.id = 3", "SELECT num FROM card LIMIT 5",
           "SELECT salary + 1 FROM person WHERE id = 7", 'SELECT "ssn" FROM person WHERE id = 1']  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.sampled_from(_SHARED), st.integers(0, 99)), min_size=1, max_size=12))
def test_the_cache_by_values_decides_as_the_full_analysis(cls, picks) -> None:
    """Texts that differ in their numbers share a decision only where that cannot change
    it: every text decided through the guard's caches gets what the full analysis gives."""
    import re

    from shadow.policy.guard import decide

    catalog = _catalog()
    for template, n in picks:
        text = re.sub(r"(?<![A-Za-z0-9_.])[0-9]+", lambda m, n=n: str(n + len(m.group(0))), template)
        want = decide_query(text, cls, catalog)
        new, refusal, outcomes, *_ = decide(cls, catalog, text.encode())
        assert (new.decode() if new is not None else None) == want.text, text
        assert (refusal is None) == (want.refusal is None) and outcomes == want.outcomes, text


def test_a_constraint_detail_that_shows_the_row_is_hidden(cls) -> None:
    """``Failing row contains (...)`` lists every column of the row, masked ones too."""
    guard = Guard(cls, lambda r: None, lambda: _catalog())
    client = _msg(b"Q", _cstr("UPDATE person SET id = NULL WHERE id = 1"))
    error = b"SERROR\0C23502\0Mnull value in column \"id\"\0DFailing row contains (null, al, 123456789).\0\0"
    notice = b"SNOTICE\0C00000\0Mfine\0Dnothing of a row\0\0"
    out = _through(guard, client, _msg(b"N", notice) + _msg(b"E", error) + _msg(b"Z", b"I"))
    assert b"123456789" not in out and b"Failing row" not in out and b"masks columns" in out
    assert _msg(b"N", notice) in out and b"Mnull value in column" in out
