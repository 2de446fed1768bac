"""shadow.sqltext.statement_count against the plain byte-by-byte scanner it replaced (the
model: obviously right, too slow for a statement of hundreds of megabytes)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.sqltext import _dollar_tag, _is_word_byte, statement_count

_SPACE = frozenset(b" \t\r\n\f\v")


def model_count(sql: bytes, limit: int = 2) -> int:
    """How many non-empty statements ``sql`` holds, counting up to ``limit``: the
    ``;`` that separate them are found outside quotes ('', E'' with backslashes, "",
    dollar quotes) and comments (``--``, nested ``/* */``), as Postgres's lexer does.
    An unterminated quote or comment counts what came before it plus one."""
    count = 0
    content = False
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == 59:  # ';'
            if content:
                count += 1
                if count >= limit:
                    return count
            content = False
            i += 1
            continue
        if c in _SPACE:
            i += 1
            continue
        if c == 45 and sql.startswith(b"--", i):
            j = sql.find(b"\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == 47 and sql.startswith(b"/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith(b"/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith(b"*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        content = True
        if c == 39:  # '...'
            escapes = i > 0 and sql[i - 1] in b"eE" and (i < 2 or not _is_word_byte(sql[i - 2]))
            i += 1
            while i < n:
                if escapes and sql[i] == 92:
                    i += 2
                elif sql[i] == 39:
                    if i + 1 < n and sql[i + 1] == 39:
                        i += 2
                    else:
                        break
                else:
                    i += 1
            i += 1
        elif c == 34:  # "..."
            j = sql.find(b'"', i + 1)
            while j >= 0 and sql.startswith(b'""', j):
                j = sql.find(b'"', j + 2)
            i = n if j < 0 else j + 1
        elif c == 36 and (tag := _dollar_tag(sql, i)) is not None and (i == 0 or not _is_word_byte(sql[i - 1])):
            j = sql.find(tag, i + len(tag))
            i = n if j < 0 else j + len(tag)
        else:
            i += 1
    return count + (1 if content else 0)


PIECES = [b"a", b" ", b";", b"'", b'"', b"$", b"$$", b"$a$", b"--", b"\n", b"/*", b"*/", b"\\", b"E'", b"e",
          b"1", b"-", b"/", b"*", b"''", b"\xc3", b"_", b"E", b"$1", b"select"]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=24), st.sampled_from([2, 5]))
def test_the_fast_scan_counts_as_the_model(pieces, limit):
    sql = b"".join(pieces)
    assert statement_count(sql, limit) == model_count(sql, limit)


def test_known_answers():
    assert statement_count(b"insert into t values ('a;b', E'c\\';d', $x$;$x$) -- ;\n") == 1
    assert statement_count(b"select 1; /* ; /* nested ; */ */ select 2") == 2
    assert statement_count(b"  ;; ; ") == 0
    assert statement_count(b"select 'unterminated; select 2") == 1
    assert statement_count(b"select 1;select 2;select 3", limit=5) == 3
