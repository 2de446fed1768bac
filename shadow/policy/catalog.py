"""The database's catalog as the policy needs it: what a view reads, what an SQL function
reads, which functions are written in a language whose reads cannot be seen.

A statement names ``v``; if ``v`` is a view, the statement reads what ``v``'s definition
reads, and so on down (:meth:`Catalog.expand`). A function written in SQL reads what its
body reads; one written in another language (plpgsql, C, ...) reads what it likes: a
statement calling it is *not analysed* (a class that restricts objects refuses it, fail
closed). Built-in functions (``pg_catalog``) are not in the catalog: they read nothing but
their arguments (the ones that run SQL or read tables by name are refused by name,
shadow/policy/decision.py).

A table or view named without its schema is resolved to every schema that has a relation
of that name (the session's search path is its own: each of them counts); a name no schema
has (a temporary table made since, a typo) stays without one, and matches patterns of any
schema. So ``audit.*`` refuses ``SELECT * FROM log`` only where a schema ``audit`` has a
``log``. Functions are looked up the same way.

:data:`CATALOG_SQL` reads it; :meth:`Catalog.from_rows` builds it from the rows. No I/O.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

from shadow.policy.analysis import Statement, statements

__all__ = ["CATALOG_SQL", "COLUMNS_SQL", "UNREAD", "Catalog"]

#: (kind 'r' table, 'v' view or 'f' function, schema, name, SQL text: a view's definition
#: or an SQL function's body; NULL for a table and for a function in another language)
CATALOG_SQL = (
    "SELECT 'r', n.nspname, c.relname, NULL"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('r', 'p', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    " AND n.nspname NOT LIKE 'pg\\_toast%'"
    " UNION ALL"
    " SELECT 'v', n.nspname, c.relname, pg_catalog.pg_get_viewdef(c.oid)"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    " UNION ALL"
    " SELECT 'f', n.nspname, p.proname, CASE WHEN l.lanname = 'sql' THEN"
    " coalesce(nullif(p.prosrc, ''), pg_catalog.pg_get_function_sqlbody(p.oid)) END"
    " FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
    " JOIN pg_catalog.pg_language l ON l.oid = p.prolang"
    " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
)

#: (schema, table or view, column, type OID) of every column, in order (the masks need them)
COLUMNS_SQL = (
    "SELECT n.nspname, c.relname, a.attname, a.atttypid::int"
    " FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'f', 'v', 'm')"
    " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'"
    " ORDER BY c.oid, a.attnum"
)

#: how deep views and functions may nest before the statement is taken as not analysed
_MAX_DEPTH = 32


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """``views`` and ``functions``: name -> [(schema, SQL text or None)], lower case.
    Compared and hashed by identity: a refreshed catalog is a new object (the decision
    cache keys on it)."""

    views: dict[str, list[tuple[str, str | None]]]
    functions: dict[str, list[tuple[str, str | None]]]
    #: table or view name -> the schemas that have one
    schemas: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: (schema, table or view) -> ((column, type OID), ...) in order
    columns: dict[tuple[str, str], tuple[tuple[str, int], ...]] = dataclasses.field(default_factory=dict)
    _reached: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple], column_rows: Iterable[tuple] = ()) -> Catalog:
        views: dict[str, list] = defaultdict(list)
        functions: dict[str, list] = defaultdict(list)
        schemas: dict[str, list] = defaultdict(list)
        for kind, schema, name, text in rows:
            kind, schema, name = _text(kind), _text(schema).lower(), _text(name).lower()
            body = _text(text) if text is not None else None
            if kind in ("r", "v"):
                schemas[name].append(schema)
            if kind in ("v", "f"):
                (views if kind == "v" else functions)[name].append((schema, body))
        columns: dict[tuple[str, str], list] = defaultdict(list)
        for schema, table, column, oid in column_rows:
            columns[(_text(schema).lower(), _text(table).lower())].append((_text(column).lower(), int(oid)))
        return cls(dict(views), dict(functions), dict(schemas), {k: tuple(v) for k, v in columns.items()})

    def reached(self, schema: str, name: str, *, view: bool = False) -> frozenset[tuple[str | None, str]]:
        """The tables function (or view) ``schema.name`` reads, through its views and
        functions."""
        key = (schema, name, view)
        found = self._reached.get(key)
        if found is None:
            st = Statement(0, 0, frozenset({"SELECT"}), tables=frozenset({(schema, name)}) if view else frozenset(),
                           functions=frozenset() if view else frozenset({(schema, name)}))  # fmt: skip
            found = self._reached[key] = self.expand(st).tables
        return found

    def _resolved(self, tables: Iterable[tuple[str | None, str]]) -> set[tuple[str | None, str]]:
        """Unqualified names, each in every schema that has it (as is where none does)."""
        out = set()
        for schema, name in tables:
            if schema is None and name in self.schemas:
                out.update((s, name) for s in self.schemas[name])
            else:
                out.add((schema, name))
        return out

    def expand(self, st: Statement, trusted=()) -> Statement:
        """``st`` with every table and function its views and SQL functions reach added;
        not analysed if it calls a function whose reads cannot be seen (unless one of
        ``trusted``, ObjectPatterns the class trusts, names it), or nests past the limit."""
        if not st.analysed:
            return st
        tables, functions = self._resolved(st.tables), set(st.functions)
        seen: set[tuple[str, str | None, str]] = set()
        todo = [("v", schema, name, 0) for schema, name in st.tables] + \
            [("f", schema, name, 0) for schema, name in st.functions]  # fmt: skip
        while todo:
            kind, schema, name, depth = todo.pop()
            if (kind, schema, name) in seen:
                continue
            seen.add((kind, schema, name))
            found = (self.views if kind == "v" else self.functions).get(name, ())
            for where, text in found:
                if schema is not None and where != schema:
                    continue
                label = f"{'view' if kind == 'v' else 'function'} {where}.{name}"
                if text is None:
                    if kind == "f" and any(p.matches("function", where, name) for p in trusted):
                        continue  # (trusted_functions: the operator vouches for what it reads)
                    return dataclasses.replace(st, analysed=False, why=f"calls {label}, not written in SQL: what it"
                                                                       " reads cannot be seen")  # fmt: skip
                if depth >= _MAX_DEPTH:
                    return dataclasses.replace(st, analysed=False, why=f"{label} nests deeper than {_MAX_DEPTH}")
                for inner in statements(text):
                    if not inner.analysed:
                        return dataclasses.replace(st, analysed=False,
                                                   why=f"{label} cannot be analysed ({inner.why})")  # fmt: skip
                    tables.update(self._resolved(inner.tables))
                    functions.update(inner.functions)
                    todo.extend(("v", s, n, depth + 1) for s, n in inner.tables)
                    todo.extend(("f", s, n, depth + 1) for s, n in inner.functions)
        if tables == st.tables and functions == st.functions:
            return st
        return dataclasses.replace(st, tables=frozenset(tables), functions=frozenset(functions))


class _Unread(Catalog):
    """A database whose catalog could not be read yet: a statement that names a table or a
    function is not analysed (a class that restricts objects refuses it: fail closed)."""

    def expand(self, st: Statement, trusted=()) -> Statement:
        if st.analysed and (st.tables or st.functions):
            return dataclasses.replace(st, analysed=False, why="the database's catalog is not read yet: its views"
                                       " and functions cannot be looked through")  # fmt: skip
        return st


#: the catalog of a database not read yet, for a session whose class came with a new
#: policy version (connmgr/proxy/policy.py)
UNREAD = _Unread({}, {})


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
