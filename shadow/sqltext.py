"""What a statement is, from its first words (sans-IO, no SQL parser).

connmgr decides a few things per statement on the hot path -- does this COMMIT, may this
write, is this DDL, may a marker statement share its implicit transaction -- and a full
parse (sqlglot) costs far more than the statement's round trip. The first two or three
words decide all of them, so :func:`leading_words` scans past blanks and comments and no
further. Anything it cannot classify (a leading parenthesis, a dollar-quoted prefix) is
"other": the caller then does the conservative thing (no marker, no capture).

One statement needs more than its first words: ``SELECT ... INTO table`` creates a table.
A SELECT whose text holds the word INTO (a cheap search) is parsed with sqlglot to see
whether it is one; nothing else on the read path pays for a parse.
"""

from __future__ import annotations

import re

import sqlglot
from sqlglot import exp

__all__ = [
    "quote_ident",
    "quote_literal",
    "raising_do",
    "leading_words",
    "first_word",
    "is_commit",
    "may_write",
    "is_transaction_control",
    "ddl_kind",
    "DdlKind",
    "created_table",
    "select_into",
    "enforce_synchronous_commit",
]


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier: always in double quotes, inner ones doubled. Raises
    ValueError for an empty name or one holding NUL (no identifier can be either). The one
    quote_ident of connmgr."""
    if not name or "\0" in name:
        raise ValueError(f"invalid identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """``text`` as an SQL string literal, as Postgres's ``quote_literal`` writes it: single
    quotes doubled, and an ``E''`` literal with doubled backslashes if it has any (so it
    reads the same whatever ``standard_conforming_strings`` is)."""
    quoted = "'" + text.replace("'", "''") + "'"
    if "\\" in text:
        return "E" + quoted.replace("\\", "\\\\")
    return quoted


def raising_do(sqlstate: str, message: str, detail: str, tag: str) -> str:
    """A ``DO`` block that makes the server raise ``sqlstate`` with ``message`` and
    ``detail`` (the server answers it as any error: a transaction is aborted); its dollar
    quote ``$tag$`` made longer until the body does not hold it."""
    body = (f"BEGIN RAISE EXCEPTION USING ERRCODE = {quote_literal(sqlstate)}, MESSAGE = {quote_literal(message)},"
            f" DETAIL = {quote_literal(detail)}; END")  # fmt: skip
    while f"${tag}$" in body:
        tag += "_"
    return f"DO ${tag}${body}${tag}$"


#: a word (a letter, then letters and underscores) after optional blanks
_WORD = re.compile(rb"[ \t\r\n\f\v]*([A-Za-z][A-Za-z_]*)")
_BLANKS = re.compile(rb"[ \t\r\n\f\v]*")


def leading_words(sql: bytes, limit: int = 2) -> list[bytes]:
    """The first ``limit`` words of ``sql``, upper-cased, skipping blanks and comments;
    the first other character ends them. Each word and the blanks before it are one
    compiled match (no nested repetition: linear), comments are skipped by ``find``: a
    relayed statement costs a few calls, not a Python step per character."""
    words: list[bytes] = []
    i, n = 0, len(sql)
    while len(words) < limit:
        m = _WORD.match(sql, i)
        if m is not None:
            words.append(m.group(1).upper())
            i = m.end()
            continue
        i = _BLANKS.match(sql, i).end()
        if sql.startswith(b"--", i):
            j = sql.find(b"\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith(b"/*", i):
            j = sql.find(b"*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            break
    return words


_COMMIT_TEXTS = frozenset({
    b"COMMIT", b"END", b"COMMIT WORK", b"COMMIT TRANSACTION", b"END WORK", b"END TRANSACTION",
})  # fmt: skip


def is_commit(sql: bytes) -> bool:
    """``COMMIT``, ``END`` and their WORK/TRANSACTION forms, any case and spacing, one
    ``;``; not ``COMMIT PREPARED``, ``COMMIT AND CHAIN`` or anything with a comment."""
    if len(sql) > 64:
        return False
    return b" ".join(sql.strip().rstrip(b";").upper().split()) in _COMMIT_TEXTS


#: statements that change rows and may share an implicit transaction with another
_WRITES = frozenset({b"INSERT", b"UPDATE", b"DELETE", b"MERGE", b"WITH", b"COPY"})


def first_word(sql: bytes) -> bytes:
    """The first word of ``sql``, upper-cased (b"" if none). The classifiers below take
    it as ``first=`` so a caller asking several questions scans the text once."""
    words = leading_words(sql, 1)
    return words[0] if words else b""


def may_write(sql: bytes, first: bytes | None = None) -> bool:
    """True for DML that may run in a transaction block with other statements: INSERT,
    UPDATE, DELETE, MERGE, WITH (a data-modifying CTE) and COPY. SELECT is left out on
    purpose: it is the hot read path, and a SELECT that writes through a function in
    autocommit mode is documented as unmarked."""
    return (first_word(sql) if first is None else first) in _WRITES


_CONTROL = frozenset({
    b"BEGIN", b"START", b"COMMIT", b"END", b"ROLLBACK", b"ABORT", b"SAVEPOINT",
    b"RELEASE", b"PREPARE",
})  # fmt: skip


def is_transaction_control(sql: bytes, first: bytes | None = None) -> bool:
    """BEGIN/START, COMMIT/END, ROLLBACK/ABORT, SAVEPOINT, RELEASE, PREPARE TRANSACTION."""
    return (first_word(sql) if first is None else first) in _CONTROL


class DdlKind:
    """Results of :func:`ddl_kind`."""

    NONE = 0  #: not DDL
    TRANSACTIONAL = 1  #: DDL that may run in a transaction block: captured and replicated
    OUTSIDE_BLOCK = 2  #: DDL Postgres refuses in a block (CONCURRENTLY, DATABASE, ...)
    NOT_REPLICATED = 3  #: cluster-wide or session-local: not for the secondary's stream


_DDL_FIRST = frozenset({
    b"CREATE", b"ALTER", b"DROP", b"COMMENT", b"GRANT", b"REVOKE", b"SECURITY", b"IMPORT",
})  # fmt: skip
_OUTSIDE_BLOCK_WORDS = frozenset({b"CONCURRENTLY", b"DATABASE", b"TABLESPACE", b"SYSTEM", b"SUBSCRIPTION"})
#: objects that are not replicated with a database's data (global, or this session's only)
_NOT_REPLICATED_OBJECTS = frozenset({b"ROLE", b"USER", b"GROUP", b"TEMP", b"TEMPORARY", b"PUBLICATION"})


def ddl_kind(sql: bytes, first: bytes | None = None) -> int:
    """Classify a statement for DDL capture (see :class:`DdlKind`). Looks at four words
    (``CREATE UNIQUE INDEX CONCURRENTLY`` is the deepest form that matters), but only
    once the first says DDL; a SELECT is DDL when it is a ``SELECT ... INTO``."""
    first = first_word(sql) if first is None else first
    if first not in _DDL_FIRST:
        if first in _SELECTS and _INTO.search(sql) is not None:
            into = select_into(sql)
            if into is not None:
                return DdlKind.NOT_REPLICATED if into[1] else DdlKind.TRANSACTIONAL
        return DdlKind.NONE
    words = leading_words(sql, 4)
    rest = set(words[1:])
    if rest & _OUTSIDE_BLOCK_WORDS:
        return DdlKind.OUTSIDE_BLOCK
    if len(words) > 1 and words[1] in _NOT_REPLICATED_OBJECTS:
        return DdlKind.NOT_REPLICATED
    if words[0] == b"CREATE" and any(w.startswith(b"TEMP") for w in words[1:3]):
        return DdlKind.NOT_REPLICATED
    return DdlKind.TRANSACTIONAL


_TABLE_PREFIX = frozenset({b"GLOBAL", b"LOCAL"})
_IF_NOT_EXISTS = re.compile(rb"\s*IF\s+NOT\s+EXISTS\b", re.IGNORECASE)
#: a possibly qualified name: words or double-quoted identifiers joined by dots
_QUALIFIED = re.compile(rb'\s*((?:"(?:[^"]|"")+"|[A-Za-z_\x80-\xff][\w$\x80-\xff]*)'
                        rb'(?:\s*\.\s*(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\xff][\w$\x80-\xff]*)){0,2})')


_SELECTS = frozenset({b"SELECT", b"WITH"})
_INTO = re.compile(rb"\bINTO\b", re.IGNORECASE)


def select_into(sql: bytes) -> tuple[str, bool] | None:
    """For a ``SELECT ... INTO [TEMP | UNLOGGED] [TABLE] name``: the name as written and
    whether it is a temporary table (this session's only); None for anything else,
    including text sqlglot cannot parse (then Postgres decides what it is, and connmgr
    does not capture it)."""
    try:
        tree = sqlglot.parse_one(sql.decode("utf-8", "replace"), read="postgres")
    except Exception:  # noqa: BLE001 - sqlglot's own errors, or a parser bug: never the relay's crash
        return None
    if not isinstance(tree, (exp.Select, exp.SetOperation)):
        return None
    into = tree.find(exp.Into)  # of a UNION: its first SELECT's
    if not isinstance(into, exp.Into) or not isinstance(into.this, exp.Table):
        return None
    return into.this.sql(dialect="postgres"), bool(into.args.get("temporary"))


def created_table(sql: bytes) -> str | None:
    """The name (as written: ``to_regclass`` reads it) of the table a ``CREATE TABLE``
    makes, for a published table (column list, ``LIKE``, ``PARTITION OF``, ``OF type``,
    ``AS query``); None for anything else: TEMP or UNLOGGED (not replicated), not a CREATE
    TABLE, or a form this scan does not follow (a comment between the words). A ``SELECT
    ... INTO`` gives its table too (not TEMP; UNLOGGED only gives None when the guard sees
    the table)."""
    words = leading_words(sql, 3)
    if words and words[0] in _SELECTS:
        into = select_into(sql)
        return into[0] if into is not None and not into[1] else None
    if len(words) < 2 or words[0] != b"CREATE":
        return None
    i = 1
    if words[i] in _TABLE_PREFIX:
        i += 1
    if i >= len(words) or words[i] != b"TABLE":
        return None
    upper = sql.upper()
    at = upper.find(b"TABLE") + 5
    m = _IF_NOT_EXISTS.match(sql, at)
    if m is not None:
        at = m.end()
    m = _QUALIFIED.match(sql, at)
    if m is None:
        return None
    return m.group(1).decode("utf-8", "replace")


def _dollar_tag(sql: bytes, i: int) -> bytes | None:
    """The dollar-quote opener at ``sql[i]`` (``$$`` or ``$tag$``), or None (``$1``)."""
    j = i + 1
    n = len(sql)
    if j < n and 48 <= sql[j] <= 57:
        return None
    while j < n and (sql[j] == 95 or 48 <= sql[j] <= 57 or 65 <= sql[j] <= 90 or 97 <= sql[j] <= 122 or sql[j] >= 128):
        j += 1
    if j < n and sql[j] == 36:
        return sql[i:j + 1]
    return None


#: statement_count's fast path: a run of bytes that holds no statement separator, comment
#: start or dollar quote -- ordinary bytes and *complete* '', E'' and "" quotes (an E'' only
#: where the E starts a word). It stops where the careful loop has to decide.
_RUN = re.compile(rb"""(?:
      [^;'"$/\-eE]+
    | (?<![A-Za-z0-9_\x80-\xff])[eE]'(?:[^'\\]++|\\.|'')*+'
    | [eE](?!')
    | (?<=[A-Za-z0-9_\x80-\xff])[eE]
    | '(?:[^']++|'')*+'
    | "(?:[^"]++|"")*+"
    | /(?!\*)
    | -(?!-)
)*+""", re.X | re.S)
_NOT_SPACE = re.compile(rb"[^ \t\r\n\f\v]")
_COMMENT_EDGE = re.compile(rb"/\*|\*/")
_QUOTE_OR_BACKSLASH = re.compile(rb"['\\]")


def statement_count(sql: bytes, limit: int = 2) -> int:
    """How many non-empty statements ``sql`` holds, counting up to ``limit``: the
    ``;`` that separate them are found outside quotes ('', E'' with backslashes, "",
    dollar quotes) and comments (``--``, nested ``/* */``), as Postgres's lexer does.
    An unterminated quote or comment counts what came before it plus one. Runs of plain
    text and complete quotes are skipped by one compiled pattern, so a statement of
    hundreds of megabytes costs the event loop milliseconds per megabyte, not seconds."""
    count = 0
    content = False
    i, n = 0, len(sql)
    while i < n:
        j = _RUN.match(sql, i).end()
        if not content and _NOT_SPACE.search(sql, i, j) is not None:
            content = True
        if j >= n:
            break
        c = sql[j]
        if c == 59:  # ';'
            if content:
                count += 1
                if count >= limit:
                    return count
            content = False
            i = j + 1
        elif c == 45:  # '--': to the end of the line
            k = sql.find(b"\n", j)
            i = n if k < 0 else k + 1
        elif c == 47:  # '/*', nested
            depth, i = 1, j + 2
            while depth:
                edge = _COMMENT_EDGE.search(sql, i)
                if edge is None:
                    i = n
                    break
                depth += 1 if sql[edge.start()] == 47 else -1
                i = edge.end()
        elif c == 39 or c == 69 or c == 101:  # an unterminated '...' or E'...'
            content = True
            escapes = c != 39 or (j > 0 and sql[j - 1] in b"eE" and (j < 2 or not _is_word_byte(sql[j - 2])))
            if c != 39:
                j += 1
            k = j + 1
            while True:
                if escapes:
                    hit = _QUOTE_OR_BACKSLASH.search(sql, k)
                    pos = -1 if hit is None else hit.start()
                else:
                    pos = sql.find(b"'", k)
                if pos < 0:
                    i = n
                    break
                if sql[pos] == 92 or (pos + 1 < n and sql[pos + 1] == 39):  # \x or ''
                    k = pos + 2
                    continue
                i = pos + 1
                break
        elif c == 34:  # "..."
            content = True
            k = sql.find(b'"', j + 1)
            while k >= 0 and sql.startswith(b'""', k):
                k = sql.find(b'"', k + 2)
            i = n if k < 0 else k + 1
        else:  # '$': a dollar quote, or a parameter ($1) or part of a word
            content = True
            tag = _dollar_tag(sql, j) if j == 0 or not _is_word_byte(sql[j - 1]) else None
            if tag is None:
                i = j + 1
            else:
                k = sql.find(tag, j + len(tag))
                i = n if k < 0 else k + len(tag)
    return count + (1 if content else 0)


def _is_word_byte(b: int) -> bool:
    return b == 95 or 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122 or b >= 128


#: values of synchronous_commit that keep the pair's guarantee (the commit waits until the
#: synchronous standby applied it); anything else is overridden
SYNCHRONOUS = frozenset({"on", "remote_apply"})


def _option_words(options: str) -> list[str]:
    """A startup ``options`` string split as Postgres splits it (``pg_split_opts``):
    at unescaped whitespace, a backslash keeping the next character."""
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    return words


def enforce_synchronous_commit(options: str) -> tuple[str, str | None]:
    """The startup ``options`` a pair's backend gets: the client's, with
    ``-c synchronous_commit=on`` after them unless the client asked for a value that keeps
    the guarantee (``on``, ``remote_apply``). A client option overrides the server's
    configuration and ``ALTER ROLE/DATABASE ... SET``, so the session starts synchronous
    whatever those say. Returns (options, the weaker value the client asked for or None)."""
    asked = None
    words = _option_words(options)
    for i, word in enumerate(words):
        setting = None
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
        elif word.startswith("-c"):
            setting = word[2:]
        elif word.startswith("--"):
            setting = word[2:]
        if setting and "=" in setting:
            name, value = setting.split("=", 1)
            if name.strip().lower().replace("-", "_") == "synchronous_commit":
                asked = value.strip().strip("'").lower()
    if asked in SYNCHRONOUS:
        return options, None
    trailing = len(options) - len(options.rstrip("\\"))
    if trailing % 2:  # a last backslash escapes nothing for Postgres; here it would eat the space
        options = options[:-1]
    forced = (options + " " if options.strip() else "") + "-c synchronous_commit=on"
    return forced, asked
