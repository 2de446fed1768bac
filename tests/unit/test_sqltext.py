"""The statement classifiers the pair's guarantees rest on (pure, no server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadow.sqltext import (
    DdlKind,
    created_table,
    ddl_kind,
    enforce_synchronous_commit,
    leading_words,
    quote_ident,
)


@pytest.mark.parametrize("sql, name", [
    (b"CREATE TABLE t (id int)", "t"),
    (b"create table if not exists \"My S\".\"T x\"(a int)", '"My S"."T x"'),
    (b"CREATE TABLE s.t PARTITION OF p FOR VALUES IN (1)", "s.t"),
    (b"CREATE TABLE x (LIKE y INCLUDING ALL)", "x"),
    (b"CREATE TABLE g (a int, b int GENERATED ALWAYS AS (a * 2) STORED)", "g"),
    (b"CREATE TABLE s.t AS SELECT 1", "s.t"),
    (b"CREATE TABLE t AS (SELECT 1)", "t"),
    (b"CREATE TABLE t(a) AS VALUES (1)", "t"),
    (b"CREATE TABLE IF NOT EXISTS t AS EXECUTE q", "t"),
    (b"CREATE UNLOGGED TABLE u (a int)", None),
    (b"CREATE TEMP TABLE x (a int)", None),
    (b"CREATE INDEX i ON t (a)", None),
    (b"SELECT 1 INTO t", "t"),
    (b"select a, b into table s.\"T x\" from y where z", 's."T x"'),
    (b"WITH c AS (SELECT 1) SELECT * INTO t3 FROM c", "t3"),
    (b"SELECT 1 INTO t4 UNION SELECT 2", "t4"),
    (b"SELECT 1 INTO UNLOGGED u", "u"),
    (b"SELECT 1 INTO TEMP t", None),
    (b"SELECT 'into' FROM x", None),
    (b"SELECT into_x FROM y", None),
    (b"SELECT 1 INTO", None),
])  # fmt: skip
def test_created_table(sql, name):
    assert created_table(sql) == name


@pytest.mark.parametrize("sql, kind", [
    (b"SELECT * INTO t FROM x", DdlKind.TRANSACTIONAL),
    (b"SELECT * INTO TEMPORARY t FROM x", DdlKind.NOT_REPLICATED),
    (b"SELECT 'INTO' FROM x", DdlKind.NONE),
    (b"SELECT 1 INTO (", DdlKind.NONE),  # not parsed: Postgres says what it is, nothing captured
    (b"INSERT INTO t VALUES (1)", DdlKind.NONE),
])  # fmt: skip
def test_select_into_is_ddl(sql, kind):
    assert ddl_kind(sql) == kind


@given(st.text(max_size=60))
def test_select_into_never_raises(text):
    ddl_kind(("SELECT " + text + " INTO " + text).encode())


@pytest.mark.parametrize("options, sent, asked", [
    ("", "-c synchronous_commit=on", None),
    ("-c synchronous_commit=off", "-c synchronous_commit=off -c synchronous_commit=on", "off"),
    ("-csynchronous_commit=remote_apply", "-csynchronous_commit=remote_apply", None),
    ("-c synchronous_commit=on -c work_mem=4MB", "-c synchronous_commit=on -c work_mem=4MB", None),
    ("--synchronous-commit=local", "--synchronous-commit=local -c synchronous_commit=on", "local"),
    ("-c synchronous_commit=remote_apply -c synchronous_commit=off",
     "-c synchronous_commit=remote_apply -c synchronous_commit=off -c synchronous_commit=on", "off"),
    ("-c search_path=a\\ b", "-c search_path=a\\ b -c synchronous_commit=on", None),
    ("-c x=y\\", "-c x=y -c synchronous_commit=on", None),
])  # fmt: skip
def test_enforce_synchronous_commit(options, sent, asked):
    assert enforce_synchronous_commit(options) == (sent, asked)


@given(st.text(max_size=80))
def test_enforced_options_always_end_synchronous(options):
    """Whatever the client sent, the last synchronous_commit the server reads keeps the
    guarantee (Postgres applies startup options in order: the last one wins)."""
    sent, _asked = enforce_synchronous_commit(options)
    again, asked = enforce_synchronous_commit(sent)
    assert again == sent and asked is None


@pytest.mark.parametrize("name", ["", "a\0b"])
def test_quote_ident_refuses_what_no_identifier_can_be(name):
    with pytest.raises(ValueError, match="invalid identifier"):
        quote_ident(name)


@given(st.text(min_size=1).filter(lambda t: "\0" not in t))
def test_quote_ident_round_trips(name):
    quoted = quote_ident(name)
    assert quoted[0] == quoted[-1] == '"' and quoted[1:-1].replace('""', '"') == name


def _leading_words_by_character(sql: bytes, limit: int) -> list[bytes]:
    """The scanner leading_words replaced (one Python step per character): the oracle."""
    words: list[bytes] = []
    i, n = 0, len(sql)
    while i < n and len(words) < limit:
        c = sql[i]
        if c in b" \t\r\n\f\v":
            i += 1
        elif sql.startswith(b"--", i):
            j = sql.find(b"\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith(b"/*", i):
            j = sql.find(b"*/", i + 2)
            i = n if j < 0 else j + 2
        elif 65 <= c <= 90 or 97 <= c <= 122:
            j = i
            while j < n and (65 <= sql[j] <= 90 or 97 <= sql[j] <= 122 or sql[j] == 95):
                j += 1
            words.append(sql[i:j].upper())
            i = j
        else:
            break
    return words


@pytest.mark.parametrize("sql, limit, words", [
    (b"begin", 2, [b"BEGIN"]),
    (b"  \n\tCommit prepared 'x'", 2, [b"COMMIT", b"PREPARED"]),
    (b"/* a */ -- b\n end -- c\n work;", 3, [b"END", b"WORK"]),
    (b"SELECT(1)", 2, [b"SELECT"]),
    (b"select/**/x_1", 3, [b"SELECT", b"X_"]),
    (b"-- only a comment", 2, []),
    (b"/* unterminated", 2, []),
    (b"1 select", 2, []),
    (b"", 2, []),
    (b"_x", 2, []),
    (b"a b c d", 3, [b"A", b"B", b"C"]),
])
def test_leading_words(sql: bytes, limit: int, words: list[bytes]) -> None:
    assert leading_words(sql, limit) == words


@given(st.lists(st.sampled_from([b" ", b"\n", b"\t", b"--", b"/*", b"*/", b"-", b"/", b"*", b"_", b"x", b"Ab",
                                 b"begin", b"1", b";", b"(", b"\xc3\xa9", b"\v"]), max_size=14),
       st.integers(1, 4))  # fmt: skip
def test_leading_words_is_the_character_scan(parts: list[bytes], limit: int) -> None:
    sql = b"".join(parts)
    assert leading_words(sql, limit) == _leading_words_by_character(sql, limit)
