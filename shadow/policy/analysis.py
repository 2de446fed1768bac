"""A Query's text as statements: where each is, what kind of request it is, which tables
and functions it names.

:func:`statements` splits the text at its top-level semicolons with sqlglot's Postgres
tokenizer (so a semicolon in a string, a dollar-quoted body, a quoted identifier or a
comment does not split), classifies each statement by its first words, and parses it
with sqlglot (postgres) for the objects it names. A statement sqlglot cannot parse (or
only as an opaque command) is *not analysed*: its objects are unknown, and a class that
restricts objects refuses it (shadow/policy/decision.py).

The wrappers that run another statement are looked through: ``EXPLAIN [ANALYZE] stmt``
(ANALYZE executes it), ``PREPARE name AS stmt``, ``DECLARE c CURSOR FOR query``,
``CREATE TABLE ... AS query``; a writable CTE (``WITH d AS (DELETE ...) SELECT``) counts
as the writes it holds. ``DO`` bodies are dynamic SQL: never analysed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.dialects.postgres import Postgres

from shadow.policy.copying import CopyStatement, parse_copy

__all__ = ["Statement", "shape_key", "span", "statements", "token_groups"]

# sqlglot says "falling back to parsing as a Command" for every VACUUM or CALL it meets
logging.getLogger("sqlglot").setLevel(logging.ERROR)

_DIALECT = Postgres()

#: statements that name no table or function (nothing to analyse), by first word
_NO_OBJECTS = {
    "BEGIN": "TRANSACTION", "START": "TRANSACTION", "COMMIT": "TRANSACTION", "END": "TRANSACTION",
    "ROLLBACK": "TRANSACTION", "ABORT": "TRANSACTION", "SAVEPOINT": "TRANSACTION", "RELEASE": "TRANSACTION",
    "SET": "SET", "RESET": "SET", "DISCARD": "SET", "SHOW": "SHOW", "LISTEN": "LISTEN", "UNLISTEN": "LISTEN",
    "NOTIFY": "NOTIFY", "FETCH": "CURSOR", "MOVE": "CURSOR", "CLOSE": "CURSOR", "DEALLOCATE": "PREPARE",
    "EXECUTE": "EXECUTE", "CHECKPOINT": "MAINTENANCE",
}  # fmt: skip
#: the kind of a statement by its first word (when its tree does not say more)
_FIRST_WORD = {
    "SELECT": "SELECT", "VALUES": "SELECT", "TABLE": "SELECT", "WITH": "SELECT", "INSERT": "INSERT",
    "UPDATE": "UPDATE", "DELETE": "DELETE", "MERGE": "MERGE", "COPY": "COPY", "CALL": "CALL", "DO": "DO",
    "CREATE": "DDL", "ALTER": "DDL", "DROP": "DDL", "COMMENT": "DDL", "REINDEX": "DDL", "CLUSTER": "DDL",
    "REFRESH": "DDL", "SECURITY": "DDL", "IMPORT": "DDL", "TRUNCATE": "TRUNCATE", "GRANT": "GRANT",
    "REVOKE": "GRANT", "VACUUM": "MAINTENANCE", "ANALYZE": "MAINTENANCE", "ANALYSE": "MAINTENANCE",
    "LOCK": "LOCK", "EXPLAIN": "EXPLAIN", "PREPARE": "PREPARE", "DECLARE": "CURSOR", "LOAD": "OTHER",
}  # fmt: skip
#: where the statement an EXPLAIN runs may start
_EXPLAINABLE = {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "MERGE", "TABLE", "CREATE", "EXECUTE",
                "DECLARE"}  # fmt: skip
_WRITES = ((exp.Insert, "INSERT"), (exp.Update, "UPDATE"), (exp.Delete, "DELETE"), (exp.Merge, "MERGE"))


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a Query: ``text[start:end]`` (without its semicolon)."""

    start: int
    end: int
    kinds: frozenset[str]
    #: (schema or None when not written, name), lower case
    tables: frozenset[tuple[str | None, str]] = frozenset()
    functions: frozenset[tuple[str | None, str]] = frozenset()
    #: the objects are known (parsed); False: ``why`` says why not
    analysed: bool = True
    why: str = ""
    #: the statement's shape with every literal replaced by ``?`` (for logs: no values)
    shape: str = ""
    #: its sqlglot tree (of the statement an EXPLAIN, PREPARE or DECLARE runs), if parsed
    tree: exp.Expression | None = field(default=None, compare=False, repr=False)
    #: ("prepare" or "cursor", name) this statement makes (PREPARE, DECLARE) or uses
    #: (EXECUTE, FETCH, MOVE): what it returns is the named statement's result
    binds: tuple[str, str] | None = None
    uses: tuple[str, str] | None = None
    #: a COPY: what it reads or writes, in which format (``tree`` is its query's, if any)
    copy: CopyStatement | None = None

    @property
    def digest(self) -> str:
        """12 hex digits naming the shape (the same for the same statement with other values)."""
        return hashlib.sha1(self.shape.encode()).hexdigest()[:12]


def statements(sql: str) -> list[Statement]:
    """The statements of Query text ``sql`` (none for blank text)."""
    try:
        groups = token_groups(sql)
    except Exception as e:  # noqa: BLE001 - sqlglot's TokenError, or a bug of its: the text is not analysed
        return [Statement(0, len(sql), frozenset({"OTHER"}), analysed=False, why=f"cannot be tokenized: {e}",
                          shape=_opaque(sql))] if sql.strip() else []  # fmt: skip
    return [_statement(sql, group) for group in groups]


def token_groups(sql: str) -> list[list]:
    """The tokens of each statement of ``sql`` (split at top-level semicolons); raises
    what sqlglot's tokenizer raises for text it cannot read."""
    out = []
    group: list = []
    for token in [*_DIALECT.tokenize(sql), None]:
        if token is None or token.token_type == sqlglot.TokenType.SEMICOLON:
            if group:
                out.append(group)
            group = []
        else:
            group.append(token)
    return out


def span(tokens: list) -> tuple[int, int]:
    """Where a statement's tokens are in its text (without the semicolon)."""
    return tokens[0].start, tokens[-1].end + 1


#: token types whose text is a value: a statement's kinds and objects do not depend on it
_LITERALS = frozenset({sqlglot.TokenType.STRING, sqlglot.TokenType.NUMBER, sqlglot.TokenType.HEREDOC_STRING,
                       sqlglot.TokenType.BYTE_STRING, sqlglot.TokenType.BIT_STRING, sqlglot.TokenType.HEX_STRING,
                       sqlglot.TokenType.NATIONAL_STRING, sqlglot.TokenType.RAW_STRING})  # fmt: skip


def shape_key(tokens: list) -> tuple | None:
    """A statement's tokens with every literal's value left out: two statements with the
    same key name the same kinds, tables and functions, so one decision serves both
    (``SELECT ... WHERE aid = 1`` and ``... = 2``). None where a literal is not a value:
    after a keyword sqlglot reads as a command (``EXPLAIN``, ``PREPARE``, ``CALL``,
    ``DO``, ...), the rest of the statement is one string token."""
    if tokens[0].token_type == sqlglot.TokenType.COMMAND or tokens[0].text.upper() in _NAMING:
        return None
    out = []
    listing = False  # (in an ORDER BY or GROUP BY list: a number there names an output column)
    previous = None
    for t in tokens:
        kind = t.token_type
        if kind in _BY or t.text.upper() == "BY":
            listing = True
        elif kind in _ENDS_LIST:
            listing = False
        position = listing and kind == sqlglot.TokenType.NUMBER and (previous in _BY or previous in _BEFORE_POSITION
                                                                     or previous == "BY")  # fmt: skip
        out.append((kind, "" if kind in _LITERALS and not position else t.text))
        previous = "BY" if t.text.upper() == "BY" else kind
    return tuple(out)


_BY = frozenset({sqlglot.TokenType.ORDER_BY, sqlglot.TokenType.GROUP_BY})
_BEFORE_POSITION = frozenset({sqlglot.TokenType.COMMA, sqlglot.TokenType.L_PAREN})
_ENDS_LIST = frozenset({sqlglot.TokenType.WHERE, sqlglot.TokenType.HAVING, sqlglot.TokenType.LIMIT,
                        sqlglot.TokenType.OFFSET, sqlglot.TokenType.FETCH, sqlglot.TokenType.WINDOW,
                        sqlglot.TokenType.UNION, sqlglot.TokenType.INTERSECT, sqlglot.TokenType.EXCEPT,
                        sqlglot.TokenType.R_PAREN, sqlglot.TokenType.FOR, sqlglot.TokenType.QUALIFY,
                        sqlglot.TokenType.SELECT, sqlglot.TokenType.FROM})  # fmt: skip


def _statement(sql: str, tokens: list) -> Statement:
    start, end = span(tokens)
    first = tokens[0].text.upper()
    # (sqlglot's tokenizer takes the rest of an EXPLAIN, PREPARE, CALL, ... as one string)
    words, offsets = [first], [start]
    if tokens[0].token_type == sqlglot.TokenType.COMMAND and len(tokens) > 1:
        rest = tokens[0].end + 1  # (that string token's own start is not where it starts)
        try:
            tail = _DIALECT.tokenize(sql[rest:end])
        except Exception:  # noqa: BLE001 - as below: not analysed
            tail = []
        words += [t.text.upper() for t in tail]
        offsets += [rest + t.start for t in tail]
    else:
        words += [t.text.upper() for t in tokens[1:]]
        offsets += [t.start for t in tokens[1:]]
    if first in _NO_OBJECTS:
        uses = None
        if first == "EXECUTE" and (name := _name(sql[start:end], _SECOND)) is not None:
            uses = ("prepare", name)
        elif first in ("FETCH", "MOVE") and (name := _name(sql[start:end], _LAST)) is not None:
            uses = ("cursor", name)
        return Statement(start, end, frozenset({_NO_OBJECTS[first]}), shape=_opaque(sql[start:end]), uses=uses)
    kind = _FIRST_WORD.get(first)
    if kind is None:
        return _opaque_statement(sql, start, end, {"OTHER"}, f"{first[:40]!r} is not a statement the analyser knows")
    kinds = {kind}
    inner = 0
    text = sql[start:end]
    if first == "EXPLAIN":
        inner = next((i for i, w in enumerate(words) if i and w in _EXPLAINABLE), 0)
    elif first == "PREPARE":
        if len(words) > 1 and words[1] == "TRANSACTION":
            return Statement(start, end, frozenset({"TRANSACTION"}), shape="PREPARE TRANSACTION …")
        inner = next((i + 1 for i, w in enumerate(words) if w == "AS" and i + 1 < len(words)), 0)
    elif first == "DECLARE":
        inner = next((i + 1 for i, w in enumerate(words) if w == "FOR" and i + 1 < len(words)), 0)
    elif first == "CALL":
        text = "SELECT " + sql[offsets[1]:end] if len(offsets) > 1 else ""  # the call as an expression
    elif first == "DO":
        return _opaque_statement(sql, start, end, kinds, "a DO block is dynamic SQL")
    if first in ("EXPLAIN", "PREPARE", "DECLARE"):
        if not inner:
            return _opaque_statement(sql, start, end, kinds, f"no statement found in its {first}")
        text = sql[offsets[inner]:end]
        kinds.add(_FIRST_WORD.get(words[inner], "OTHER"))
    copy = None
    if first == "COPY":
        copy = parse_copy(sql, tokens)
        if copy is None:
            return _opaque_statement(sql, start, end, kinds, "its COPY cannot be read")
        if copy.query is None:
            assert copy.table is not None
            shape = f"COPY {'.'.join(p for p in copy.table if p)} {'TO' if copy.to else 'FROM'} …"
            return Statement(start, end, frozenset(kinds), frozenset({copy.table}), shape=shape, copy=copy)
        text = copy.query  # (its writes count, as a writable CTE's do)
    try:
        trees = [t for t in sqlglot.parse(text, read="postgres") if t is not None]
    except Exception as e:  # noqa: BLE001 - ParseError, or a bug of sqlglot's: not analysed, never a crash
        return _opaque_statement(sql, start, end, kinds, f"cannot be parsed ({_first_line(e)})")
    if len(trees) != 1 or isinstance(trees[0], exp.Command):
        return _opaque_statement(sql, start, end, kinds, "not understood by the analyser")
    tree = trees[0]
    kinds.update(kind for cls, kind in _WRITES if any(True for _ in tree.find_all(cls)))
    if isinstance(tree, exp.Select) and tree.args.get("into") is not None:
        kinds.add("DDL")  # SELECT ... INTO makes a table
    binds = None
    if first in ("PREPARE", "DECLARE") and (name := _name(sql[start:end], _SECOND)) is not None:
        binds = ("prepare" if first == "PREPARE" else "cursor", name)
    shape = _shape(tree)
    if first == "CALL":
        shape = "CALL " + shape.removeprefix("SELECT ")
    elif first == "COPY":
        shape = f"COPY ({shape}) TO …"
    return Statement(start, end, frozenset(kinds), frozenset(_tables(tree)), frozenset(_functions(tree)),
                     shape=shape, tree=tree, binds=binds, copy=copy)  # fmt: skip


_IDENT = r'("(?:[^"]|"")+"|[^\s"(),;]+)'
#: the name a statement makes or uses: its second word (PREPARE, DECLARE, EXECUTE), its last (FETCH, MOVE)
_SECOND = re.compile(r"\s*\w+\s+" + _IDENT)
_LAST = re.compile(_IDENT + r"\s*$")
#: first words of statements that make or use a name (their decision is not shared by shape)
_NAMING = frozenset({"EXECUTE", "FETCH", "MOVE", "PREPARE", "DECLARE", "CLOSE", "DEALLOCATE", "COPY"})


def _name(text: str, pattern: re.Pattern) -> str | None:
    """The identifier ``pattern`` finds in ``text`` as Postgres folds it (lower case unless
    quoted), None if there is none (comments are not looked through: then no name)."""
    match = pattern.search(text) if pattern is _LAST else pattern.match(text)
    if match is None:
        return None
    word = match.group(1)
    return word[1:-1].replace('""', '"') if word.startswith('"') else word.lower()


def _opaque_statement(sql: str, start: int, end: int, kinds: set[str], why: str) -> Statement:
    return Statement(start, end, frozenset(kinds), analysed=False, why=why, shape=_opaque(sql[start:end]))


def _tables(tree: exp.Expression):
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            continue  # a function in FROM (its name is among the functions)
        name, schema = table.name.lower(), (table.db or "").lower() or None
        if schema is None and _is_cte(table, name):
            continue
        yield schema, name


def _is_cte(table: exp.Table, name: str) -> bool:
    """Is an unqualified ``name`` a CTE of a WITH around ``table`` (not a table)?"""
    node = table.parent
    while node is not None:
        args = node.args if isinstance(node, exp.Expression) else {}
        with_ = args.get("with_") or args.get("with")  # (the key's name changed in sqlglot 26)
        if isinstance(with_, exp.With) and any(cte.alias_or_name.lower() == name for cte in with_.expressions):
            return True
        node = node.parent
    return False


def _functions(tree: exp.Expression):
    for func in tree.find_all(exp.Func):
        if isinstance(func, exp.Anonymous):
            name = func.name.lower()
        else:
            name = func.sql_name().lower()
        schema = None
        if isinstance(func.parent, exp.Dot) and func.parent.expression is func:
            schema = func.parent.this.name.lower() or None
        yield schema, name


def _shape(tree: exp.Expression) -> str:
    def blank(node: exp.Expression) -> exp.Expression:
        return exp.var("?") if isinstance(node, exp.Literal) else node

    try:
        return tree.transform(blank).sql(dialect="postgres")[:500]
    except Exception:  # noqa: BLE001 - a shape is for logs only
        return type(tree).__name__


def _opaque(text: str) -> str:
    """A shape for text that was not parsed: its first word only (it may hold values)."""
    words = text.split(None, 1)
    return f"{words[0].upper()} …" if words else ""


def _first_line(e: Exception) -> str:
    """sqlglot's reason, without where in the text it stopped (that moves with the values
    of literals, and a decision is shared by statements that differ only in them)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"\.? *Line \d+, Col: \d+\.?", "", text)[:200]
