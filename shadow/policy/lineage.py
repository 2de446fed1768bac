"""Where a statement's result columns come from, for a class that masks columns: which
output shows a masked column (and under which mask), and which use of a masked column
would let the client learn its value by other means. No I/O.

:func:`result_masks` takes a statement's sqlglot tree and the database's catalog:

1. If nothing it reads (through views and SQL functions too) has a masked column, there is
   nothing to do (the common case costs a set lookup).
2. Views that reach a masked column are put in place as subqueries (their definition from
   the catalog, nested views too), so what they show is traced like the rest; what a view
   filters or sorts by is its owner's decision, not a probe by the client.
3. sqlglot's ``qualify`` resolves every column to its source against the catalog's
   columns (``*`` and ``t.*`` expanded); a statement it cannot resolve is refused
   (:class:`Unmaskable`): fail closed.
4. Every output column is traced through aliases, derived tables, CTEs (recursive ones to
   a fixed point), scalar subqueries, set operations and expressions to the masked columns
   it shows. Shown *as is* (through names only): its mask. Computed from one
   (``ssn || ''``, ``substr(ssn, 1, 3)``, ``row_to_json(p)``, a whole-row ``p``): the
   ``full`` mask, in the output's type.

Refused, unless every mask involved has ``allow_predicates`` (the error names the column):

* a masked column in WHERE, JOIN ... ON, GROUP BY, HAVING, ORDER BY, DISTINCT (and
  ``UNION``/``INTERSECT``/``EXCEPT`` without ALL, which compare rows), a window's PARTITION
  BY or ORDER BY, LIMIT: the rows the client gets would tell what the value is;
* a masked column under any function or operator that is not *total* (:data:`TOTAL`):
  one that can fail on some values (``ssn::int``) puts the value in its error message, or
  tells by failing or not (``1/(ssn = 'x')::int``); a comparison is a predicate;
* a masked column written elsewhere (``INSERT ... SELECT ssn``, ``CREATE TABLE AS``,
  ``SELECT INTO``, ``UPDATE t SET a = ssn``): the copy would not be masked;
* a function written in SQL whose body reads a masked column (what it returns is not traced
  column by column), and a table name several schemas have when one has masks (the
  session's search_path decides which is read).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, build_scope

from shadow.policy.masking import FULL
from shadow.policy.rules import ClientClass, ColumnMask

__all__ = ["TOTAL", "Unmaskable", "copied_masks", "masked_tables", "result_masks"]

#: a flow: (mask, type OID, shown as is) for each masked column an expression shows (the
#: type of the column shown as is; 0 for a value computed from it)
Flow = frozenset

#: expressions that cannot fail whatever their argument's value, and compare nothing:
#: a masked column may be computed with them (the result is masked in full)
TOTAL = (exp.Alias, exp.Paren, exp.Column, exp.DPipe, exp.Concat, exp.ConcatWs, exp.Substring, exp.Upper,
         exp.Lower, exp.Left, exp.Right, exp.Trim, exp.Coalesce, exp.Length, exp.Count, exp.ArrayAgg,
         exp.GroupConcat, exp.Max, exp.Min, exp.Array, exp.Tuple, exp.Struct, exp.Star, exp.Literal, exp.Null,
         exp.Boolean, exp.Window, exp.Initcap, exp.Reverse, exp.Lag, exp.Lead, exp.FirstValue, exp.LastValue,
         exp.ToChar, exp.JSONObject, exp.JSONArrayAgg, exp.Distinct)  # fmt: skip
#: functions sqlglot does not know by class, total as :data:`TOTAL`
TOTAL_NAMES = frozenset({"row_to_json", "to_json", "to_jsonb", "json_agg", "jsonb_agg", "array_to_json", "format",
                         "json_build_object", "jsonb_build_object", "json_build_array", "jsonb_build_array",
                         "json_object_agg", "jsonb_object_agg", "quote_literal", "quote_nullable", "quote_ident",
                         "textcat", "lpad", "rpad", "btrim", "ltrim", "rtrim", "md5", "octet_length",
                         "char_length", "character_length", "bit_length", "row", "string_agg", "array_agg",
                         "xmlelement", "xmlforest", "xmlconcat", "xmlagg"})  # fmt: skip
_TEXT_TYPES = frozenset({exp.DataType.Type.TEXT, exp.DataType.Type.VARCHAR, exp.DataType.Type.CHAR,
                         exp.DataType.Type.NAME, exp.DataType.Type.NCHAR, exp.DataType.Type.NVARCHAR})  # fmt: skip
#: clauses of a SELECT whose masked columns would be probes
_PROBE_CLAUSES = (("where", "WHERE"), ("having", "HAVING"), ("qualify", "QUALIFY"), ("group", "GROUP BY"),
                  ("order", "ORDER BY"), ("limit", "LIMIT"), ("offset", "OFFSET"))  # fmt: skip
_MAX_VIEW_DEPTH = 16
_MAX_FIXPOINT = 8


class Unmaskable(Exception):
    """A statement that reads masked columns in a way connmgr will not let through (the
    message says which column and why). Internal: it becomes a refusal, 42501."""


def masked_tables(catalog, cls: ClientClass) -> dict[tuple[str, str], dict[str, ColumnMask]]:
    """(schema, table or view) -> {column: mask} for every relation of the catalog with a
    column ``cls`` masks."""
    return _masked_tables(catalog, cls)


@functools.lru_cache(maxsize=64)
def _masked_tables(catalog, cls: ClientClass) -> dict:
    out: dict[tuple[str, str], dict[str, ColumnMask]] = {}
    for (schema, table), columns in catalog.columns.items():
        for name, _oid in columns:
            mask = cls.mask_of(schema, table, name)
            if mask is not None:
                out.setdefault((schema, table), {})[name] = mask
    return out


def result_masks(tree: exp.Expression, tables: Iterable[tuple[str | None, str]], catalog,
                 cls: ClientClass) -> tuple[tuple[ColumnMask | None, ...], tuple[int, ...]] | None:  # fmt: skip
    """The mask of each output column of ``tree`` (a statement reading ``tables``, views
    and SQL functions expanded) and each one's source type OID (0: computed), or None if
    it reads no masked column; raises :class:`Unmaskable`."""
    masked = masked_tables(catalog, cls)
    reached = {t for t in tables if t in masked or (t[0] is None and any(n == t[1] for _, n in masked))}
    if not reached:
        return None
    tree = tree.copy()
    _inline_functions(tree, catalog, masked, 0)
    for schema, name in _functions_reaching(tree, catalog, masked):
        raise Unmaskable(f"function {schema}.{name} reads a masked column: what it returns cannot be traced column"
                         " by column")  # fmt: skip
    _inline_views(tree, catalog, masked, 0)
    _pin_schemas(tree, catalog, masked)
    try:
        tree = qualify(tree, schema=_schema_of(tree, catalog), dialect="postgres", validate_qualify_columns=True,
                       quote_identifiers=False, identify=False)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - sqlglot's own assertions too (ORDER BY 1 over a subquery): fail closed
        raise Unmaskable(f"its columns cannot be resolved against the catalog ({_first_line(e)})") from None
    return _Tracer(tree, masked, catalog).run()


def copied_masks(table: tuple[str | None, str], columns: tuple[str, ...] | None, catalog,
                 cls: ClientClass) -> tuple[tuple[ColumnMask | None, ...], tuple[int, ...]] | None:  # fmt: skip
    """The masks of ``COPY table [(columns)] TO``: each column's (None if none is masked)."""
    masked = masked_tables(catalog, cls)
    schema, name = table
    schemas = [schema] if schema is not None else catalog.schemas.get(name, [])
    if not any((s, name) in masked for s in schemas):
        return None
    if len(schemas) > 1:
        raise Unmaskable(f"table name {name} is in schemas {', '.join(sorted(schemas))}, one with masked columns:"
                         " write its schema")  # fmt: skip
    key = (schemas[0], name)
    known = dict(catalog.columns.get(key, ()))
    names = columns if columns is not None else tuple(c for c, _ in catalog.columns.get(key, ()))
    if any(c not in known for c in names):
        raise Unmaskable(f"COPY names a column {name} does not have (in the catalog read last)")
    masks = tuple(masked[key].get(c) for c in names)
    return masks, tuple(known[c] if m is not None else 0 for c, m in zip(names, masks, strict=True))


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"\.? *Line: \d+, Col: \d+\.?", "", text)[:200]


def _functions_reaching(tree: exp.Expression, catalog, masked: dict):
    for func in tree.find_all(exp.Anonymous):
        name = func.name.lower()
        for schema, body in catalog.functions.get(name, ()):
            if body is None:
                continue  # (not SQL: refused as not analysed before this)
            if any(t in masked for t in catalog.reached(schema, name)):
                yield schema, name


def _inline_functions(tree: exp.Expression, catalog, masked: dict, depth: int) -> None:
    """Every SQL function in ``tree`` whose body reaches a masked column put in place as
    its body -- in FROM a derived table (its rows), elsewhere a scalar subquery (its one
    value) -- with its parameters ``$n`` replaced by the call's arguments; its body is
    trusted as a view's definition is (the function's owner wrote it). Raises Unmaskable
    (so the statement is refused) for what cannot be put in place: several functions of
    that name, a body that is not one query, parameters used by name, arguments that read
    columns (they would be judged as the owner's), nesting past the limit."""
    for func in list(tree.find_all(exp.Anonymous)):
        name = func.name.lower()
        table = func.parent if isinstance(func.parent, exp.Table) and func.parent.this is func else None
        schema = ((table.db if table is not None else "") or "").lower() or None
        found = [(s, body) for s, body in catalog.functions.get(name, ()) if schema in (None, s)]
        reaching = [(s, b) for s, b in found if b is not None and any(t in masked for t in catalog.reached(s, name))]
        if not reaching:
            continue
        where, text = reaching[0]
        label = f"function {where}.{name}"
        if len(found) > 1:
            raise Unmaskable(f"{label} reads a masked column and its name has {len(found)} definitions: what it"
                             " returns cannot be traced")  # fmt: skip
        if depth >= _MAX_VIEW_DEPTH:
            raise Unmaskable(f"{label} nests functions deeper than {_MAX_VIEW_DEPTH}")
        if not all(_constant(a) for a in func.expressions):
            raise Unmaskable(f"{label} reads a masked column and is given a column, a query or a function: call it"
                             " with values")  # fmt: skip
        try:
            bodies = sqlglot.parse(text.strip().rstrip(";"), read="postgres")
        except SqlglotError as e:
            raise Unmaskable(f"{label} reads a masked column and cannot be parsed ({_first_line(e)})") from None
        if len(bodies) != 1 or not isinstance(bodies[0], exp.Query):
            raise Unmaskable(f"{label} reads a masked column and its body is not one query")
        body = bodies[0]
        for param in list(body.find_all(exp.Parameter)):
            n = param.this.name if isinstance(param.this, exp.Literal) else ""
            if not n.isdigit() or not 1 <= int(n) <= len(func.expressions):
                raise Unmaskable(f"{label}: its body uses a parameter it is not given")
            param.replace(func.expressions[int(n) - 1].copy())
        _inline_functions(body, catalog, masked, depth + 1)
        body.meta["connmgr_view"] = label
        if table is not None:
            alias = table.args.get("alias") or exp.TableAlias(this=exp.to_identifier(name))
            table.replace(exp.Subquery(this=body, alias=alias.copy()))
        else:
            func.replace(exp.Subquery(this=body))


#: what an argument of a function put in place may be made of: values, not reads (an
#: argument lands inside the trusted body, where a read of a masked column would pass)
_CONSTANT = (exp.Literal, exp.Parameter, exp.Placeholder, exp.Null, exp.Boolean, exp.Cast, exp.TryCast, exp.Neg,
             exp.Paren, exp.Add, exp.Sub, exp.Mul, exp.Div, exp.DataType, exp.Var)  # fmt: skip


def _constant(arg: exp.Expression) -> bool:
    return all(isinstance(node, _CONSTANT) or (isinstance(node, exp.Identifier) and isinstance(node.parent, exp.DataType))
               for node in arg.walk())  # fmt: skip


def _cte_names(table: exp.Table) -> bool:
    node = table.parent
    name = table.name.lower()
    while node is not None:
        with_ = node.args.get("with_") or node.args.get("with")
        if isinstance(with_, exp.With) and any(c.alias_or_name.lower() == name for c in with_.expressions):
            return True
        node = node.parent
    return False


def _inline_views(tree: exp.Expression, catalog, masked: dict, depth: int) -> None:
    """Every view in ``tree`` that reaches a masked column, replaced by its definition."""
    for table in list(tree.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier) or (not table.db and _cte_names(table)):
            continue
        name, schema = table.name.lower(), (table.db or "").lower() or None
        views = [(s, text) for s, text in catalog.views.get(name, ()) if schema in (None, s)]
        if not views:
            continue
        if len(views) > 1:
            raise Unmaskable(f"view name {name} is in schemas {', '.join(s for s, _ in views)}: write its schema")
        where, text = views[0]
        if not any(t in masked for t in catalog.reached(where, name, view=True)):
            continue
        if depth >= _MAX_VIEW_DEPTH or text is None:
            raise Unmaskable(f"view {where}.{name} nests views deeper than {_MAX_VIEW_DEPTH}")
        if isinstance(table.parent, exp.Schema | exp.Insert | exp.Update | exp.Delete | exp.Merge):
            continue  # a write's target: what it writes is checked as a write
        try:
            body = sqlglot.parse_one(text.strip().rstrip(";"), read="postgres")
        except SqlglotError as e:
            raise Unmaskable(f"view {where}.{name} cannot be parsed ({_first_line(e)})") from None
        _inline_views(body, catalog, masked, depth + 1)
        _pin_schemas(body, catalog, masked)
        body.meta["connmgr_view"] = f"{where}.{name}"
        alias = table.args.get("alias") or exp.TableAlias(this=exp.to_identifier(name))
        table.replace(exp.Subquery(this=body, alias=alias.copy()))


def _pin_schemas(tree: exp.Expression, catalog, masked: dict) -> None:
    """Every table named without its schema given the one schema that has it (qualify
    needs its columns); refused if several schemas have it and one of them masks."""
    for table in tree.find_all(exp.Table):
        if table.db or not isinstance(table.this, exp.Identifier) or _cte_names(table):
            continue
        name = table.name.lower()
        schemas = catalog.schemas.get(name, [])
        if len(schemas) == 1:
            table.set("db", exp.to_identifier(schemas[0]))
        elif len(schemas) > 1 and any((s, name) in masked for s in schemas):
            raise Unmaskable(f"table name {name} is in schemas {', '.join(sorted(schemas))}, one with masked columns:"
                             " write its schema")  # fmt: skip


def _schema_of(tree: exp.Expression, catalog) -> dict:
    out: dict[str, dict[str, dict[str, str]]] = {}
    for table in tree.find_all(exp.Table):
        schema, name = (table.db or "").lower(), table.name.lower()
        columns = catalog.columns.get((schema, name))
        if columns:
            out.setdefault(schema, {})[name] = {c: "TEXT" for c, _ in columns}
    return out


class _Tracer:
    def __init__(self, tree: exp.Expression, masked: dict, catalog) -> None:
        self.tree = tree
        self.masked = masked
        self.catalog = catalog
        self.outputs_of: dict[int, list[tuple[str, frozenset]]] = {}
        self.busy: set[int] = set()
        self.cyclic: set[int] = set()

    def run(self):
        tree = self.tree
        if isinstance(tree, exp.Insert | exp.Update | exp.Delete | exp.Merge):
            return self._write(tree)
        root = build_scope(tree)
        if root is None:
            raise Unmaskable(f"a {type(tree).__name__} statement over masked columns is not understood")
        scopes = list(root.traverse())
        self.scope_of = {id(s.expression): s for s in scopes}
        for scope in scopes:
            self._probes(scope)
        outputs = self.outputs(root)
        into = isinstance(tree, exp.Create) or (isinstance(tree, exp.Select) and tree.args.get("into") is not None)
        if into and any(flow for _, flow in outputs):
            raise Unmaskable(f"it writes {self._label(outputs)} into a table, where no mask would hide it")
        return tuple(_mask_of(flow) for _, flow in outputs), tuple(_oid_of(flow) for _, flow in outputs)

    # -- outputs

    def outputs(self, scope: Scope) -> list[tuple[str, frozenset]]:
        key = id(scope)
        if key in self.busy:  # a recursive CTE: what is known so far; run() comes back to it
            self.cyclic.add(key)
            return self.outputs_of.get(key, [])
        self.busy.add(key)
        try:
            for _ in range(_MAX_FIXPOINT):
                result = self._outputs(scope)
                if key not in self.cyclic or result == self.outputs_of.get(key):
                    break
                self.outputs_of[key] = result
            else:
                raise Unmaskable("a recursive query over masked columns does not settle")
        finally:
            self.busy.discard(key)
        self.outputs_of[key] = result
        return result

    def _outputs(self, scope: Scope) -> list[tuple[str, frozenset]]:
        expression = scope.expression
        if isinstance(expression, exp.SetOperation):
            sides = [self.outputs(s) for s in scope.set_operation_scopes]
            left = sides[0]
            out = []
            for i, (name, _flow) in enumerate(left):
                flow = frozenset().union(*(side[i][1] for side in sides if i < len(side)))
                out.append((name, flow))
            return out
        if isinstance(expression, exp.Select):
            trusted = self._trusted(expression)
            for e in expression.expressions:  # (left by qualify: the columns of a source it cannot list)
                if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
                    names = [e.table.lower()] if isinstance(e, exp.Column) and e.table else list(scope.sources)
                    sources = [self._source(scope, n) for n in names]
                    flow = frozenset().union(*(self._whole(src) for src in sources if src is not None))
                    if flow or None in sources:
                        raise Unmaskable(f"* over a source whose columns connmgr cannot list, with masked column"
                                         f" {_names(flow) if flow else '(unknown)'}")  # fmt: skip
            return [(e.alias_or_name.lower(), self.flow(e, scope, trusted)) for e in expression.expressions]
        if isinstance(expression, exp.Lateral | exp.Unnest | exp.Values) or isinstance(expression, exp.Func):
            inner = expression.this if isinstance(expression, exp.Lateral) else None
            if isinstance(inner, exp.Subquery) and id(inner.this) in self.scope_of:
                return self.outputs(self.scope_of[id(inner.this)])
            flow = self.flow(expression, scope, False)  # (raises for a function that is not total)
            if flow:
                raise Unmaskable(f"a set-returning function or VALUES over masked column {_names(flow)}")
            return []  # (nothing masked: every column of it shows as is)
        raise Unmaskable(f"a {expression.key.upper()} in FROM over masked columns is not understood")

    # -- flows

    def flow(self, node: exp.Expression, scope: Scope, trusted: bool) -> frozenset:
        """The masked columns ``node`` shows; raises Unmaskable for a use that is not total."""
        if isinstance(node, exp.Column):
            return self._column(node, scope)
        if isinstance(node, exp.TableColumn):  # a whole-row reference (qualified by sqlglot)
            source = self._source(scope, node.name.lower())
            if source is None:
                raise Unmaskable(f"{node.name.lower()} cannot be resolved")
            return _computed(self._whole(source))
        if isinstance(node, exp.Subquery | exp.Select | exp.SetOperation):
            inner = node.this if isinstance(node, exp.Subquery) else node
            sub = self.scope_of.get(id(inner))
            if sub is None:
                raise Unmaskable("a subquery over masked columns is not understood")
            outputs = self.outputs(sub)
            if isinstance(node.parent, exp.Exists):
                return frozenset()  # (whether a row exists: its values are not shown)
            return frozenset().union(*(f for _, f in outputs)) if outputs else frozenset()
        flows = [self.flow(child, scope, trusted) for child in _children(node)]
        flow = frozenset().union(*flows) if flows else frozenset()
        if not flow or isinstance(node, exp.Alias | exp.Paren):
            return flow
        if not trusted and not _total(node) and not all(m.allow_predicates for m, _, _ in flow):
            raise Unmaskable(f"{_what(node)} over masked column {_names(flow)}: it could fail or compare on its"
                             " value, telling the value")  # fmt: skip
        return _computed(flow)

    def _column(self, column: exp.Column, scope: Scope) -> frozenset:
        table, name = column.table.lower(), column.name.lower()
        if not table:
            select = scope.expression
            if isinstance(select, exp.Select):  # ORDER BY an output's alias
                for e in select.expressions:
                    if isinstance(e, exp.Alias) and e.alias.lower() == name and e is not column.parent:
                        return self.flow(e.this, scope, self._trusted(select))
            source = self._source(scope, name)
            if source is None:
                raise Unmaskable(f"column {name} cannot be resolved")
            return _computed(self._whole(source))  # a whole-row reference
        source = self._source(scope, table)
        if source is None:
            raise Unmaskable(f"table {table} of column {table}.{name} cannot be resolved")
        if isinstance(column.this, exp.Star):  # t.* as an argument: the whole row
            return _computed(self._whole(source))
        if isinstance(source, exp.Table):
            mask = self._table_masks(source).get(name)
            return frozenset({(mask, self._oid(source, name), True)}) if mask is not None else frozenset()
        outputs = self.outputs(source)
        for out_name, flow in outputs:
            if out_name == name:
                return flow
        if any(flow for _, flow in outputs):  # (a column not found where masked ones are: fail closed)
            raise Unmaskable(f"column {table}.{name} cannot be traced")
        return frozenset()

    def _source(self, scope: Scope, name: str):
        while scope is not None:
            source = scope.sources.get(name)
            if isinstance(source, Scope):  # (the one traversed: a CTE's own is another object)
                return self.scope_of.get(id(source.expression), source)
            if source is not None:
                return source
            scope = scope.parent
        return None

    def _table_masks(self, table: exp.Table) -> dict[str, ColumnMask]:
        return self.masked.get(((table.db or "").lower(), table.name.lower()), {})

    def _oid(self, table: exp.Table, name: str) -> int:
        for column, oid in self.catalog.columns.get(((table.db or "").lower(), table.name.lower()), ()):
            if column == name:
                return oid
        return 0

    def _whole(self, source) -> frozenset:
        if isinstance(source, exp.Table):
            return frozenset((m, 0, False) for m in self._table_masks(source).values())
        return frozenset().union(*(f for _, f in self.outputs(source))) if self.outputs(source) else frozenset()

    def _trusted(self, node: exp.Expression) -> bool:
        """Is ``node`` inside a view's definition (its owner's, not the client's)?"""
        while node is not None:
            if node.meta.get("connmgr_view"):
                return True
            node = node.parent
        return False

    # -- probes

    def _probes(self, scope: Scope) -> None:
        select = scope.expression
        if self._trusted(select):
            return
        if isinstance(select, exp.SetOperation):
            compares = select.args.get("distinct") or not isinstance(select, exp.Union)
            if compares and any(f for _, f in self.outputs(scope)):
                self._probe(frozenset().union(*(f for _, f in self.outputs(scope))),
                            f"{select.key.upper()} (it compares rows, as UNION without ALL does)")  # fmt: skip
            return
        if not isinstance(select, exp.Select):
            return
        for key, what in _PROBE_CLAUSES:
            clause = select.args.get(key)
            if clause is not None:
                self._probe(self._clause_flow(clause, scope), what)
        for join in select.args.get("joins") or ():
            for key in ("on", "using"):
                if join.args.get(key) is not None:
                    value = join.args[key]
                    for part in value if isinstance(value, list) else [value]:
                        self._probe(self._clause_flow(part, scope), "JOIN ... " + key.upper())
        distinct = select.args.get("distinct")
        if distinct is not None:
            self._probe(frozenset().union(*(f for _, f in self.outputs(scope))), "DISTINCT")
            on = distinct.args.get("on")
            if on is not None:
                self._probe(self._clause_flow(on, scope), "DISTINCT ON")
        for window in select.find_all(exp.Window):
            if self.scope_of.get(id(_enclosing_select(window))) is not scope:
                continue
            for key in ("partition_by", "order"):
                value = window.args.get(key)
                for part in value if isinstance(value, list) else [value] if value is not None else []:
                    self._probe(self._clause_flow(part, scope), "a window's " + key.replace("_", " ").upper())

    def _clause_flow(self, clause: exp.Expression, scope: Scope) -> frozenset:
        try:
            return self.flow(clause, scope, False)
        except Unmaskable as e:
            if "over masked column" in str(e):  # a comparison in WHERE: the clause names it better
                return frozenset((m, 0, False) for m in self._mentioned(clause, scope))
            raise

    def _mentioned(self, clause: exp.Expression, scope: Scope) -> set[ColumnMask]:
        out: set[ColumnMask] = set()
        for column in clause.find_all(exp.Column):
            try:
                out.update(m for m, _, _ in self._column(column, scope))
            except Unmaskable:
                continue
        return out or {FULL}

    def _probe(self, flow: frozenset, what: str) -> None:
        if flow and not all(m.allow_predicates for m, _, _ in flow):
            raise Unmaskable(f"{what} on masked column {_names(flow)}: the rows returned would tell its value (allow"
                             " it with allow_predicates)")  # fmt: skip

    # -- writes

    def _write(self, tree: exp.Expression):
        """INSERT/UPDATE/DELETE/MERGE: a masked column may be written to and shown by
        RETURNING (masked), not read anywhere else."""
        target = tree.this.this if isinstance(tree.this, exp.Schema) else tree.this
        target_masks = self._table_masks(target) if isinstance(target, exp.Table) else {}
        returning = tree.args.get("returning")
        source = tree.args.get("expression") if isinstance(tree, exp.Insert) else None
        if isinstance(source, exp.Query):
            root = build_scope(source)
            if root is not None:
                self.scope_of = {id(s.expression): s for s in root.traverse()}
                for scope in root.traverse():
                    self._probes(scope)
                flows = [f for _, f in self.outputs(root)]
                if any(flows):
                    raise Unmaskable(f"it writes masked column {_names(frozenset().union(*flows))} into a table,"
                                     " where no mask would hide it")  # fmt: skip
        names = dict(target_masks)
        for table in tree.find_all(exp.Table):  # (a FROM/USING table's masked columns, by name: fail closed)
            names.update(self._table_masks(table))
        for column in tree.find_all(exp.Column):
            if column.name.lower() not in names or _under(column, returning) or _under(column, source):
                continue
            if _is_set_target(column):
                continue
            raise Unmaskable(f"{type(tree).__name__.upper()} reads masked column {names[column.name.lower()].label}"
                             " (outside RETURNING): the rows it changes, or the values it writes, would tell its"
                             " value")  # fmt: skip
        if returning is None:
            return None
        masks: list[ColumnMask | None] = []
        oids: list[int] = []
        types = dict(self.catalog.columns.get(((target.db or "").lower(), target.name.lower()), ()))
        for e in returning.expressions:
            if isinstance(e, exp.Star):
                for name, oid in self.catalog.columns.get(((target.db or "").lower(), target.name.lower()), ()):
                    masks.append(target_masks.get(name))
                    oids.append(oid if name in target_masks else 0)
                continue
            inner = e.this if isinstance(e, exp.Alias) else e
            if isinstance(inner, exp.Column) and inner.name.lower() in target_masks:
                masks.append(target_masks[inner.name.lower()])
                oids.append(types.get(inner.name.lower(), 0))
            elif any(c.name.lower() in names for c in inner.find_all(exp.Column)):
                if not all(isinstance(n, TOTAL) or _total(n) for n in inner.walk()):
                    raise Unmaskable("RETURNING computes with a masked column what could fail or compare on its"
                                     " value")  # fmt: skip
                masks.append(FULL)
                oids.append(0)
            else:
                masks.append(None)
                oids.append(0)
        if not any(masks):
            return None
        return tuple(masks), tuple(oids)

    def _label(self, outputs) -> str:
        return "masked column " + _names(frozenset().union(*(f for _, f in outputs)))


def _children(node: exp.Expression):
    for value in node.args.values():
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, exp.Expression) and not isinstance(child, exp.DataType):
                yield child


def _total(node: exp.Expression) -> bool:
    if isinstance(node, exp.Cast | exp.TryCast):
        to = node.args.get("to")
        return isinstance(to, exp.DataType) and to.this in _TEXT_TYPES
    if isinstance(node, exp.Anonymous):
        return node.name.lower() in TOTAL_NAMES
    if isinstance(node, exp.Func) and node.sql_name().lower() in TOTAL_NAMES:
        return True
    return isinstance(node, TOTAL)


def _what(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return f"function {node.name.lower()}"
    if isinstance(node, exp.Cast | exp.TryCast):
        return f"a cast to {node.args['to'].sql('postgres').lower()}"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name().lower()}"
    if isinstance(node, exp.Predicate | exp.Binary):
        return f"operator {node.key.upper()}"
    return node.key.upper()


def _names(flow: frozenset) -> str:
    return ", ".join(sorted({m.label for m, _, _ in flow}))


def _mask_of(flow: frozenset) -> ColumnMask | None:
    if not flow:
        return None
    masks = {m for m, _, _ in flow}
    if len(masks) == 1 and all(direct for _, _, direct in flow):
        return next(iter(masks))
    return FULL


def _oid_of(flow: frozenset) -> int:
    """The type of a masked column shown as is (0: computed, or several)."""
    oids = {oid for _, oid, direct in flow if direct}
    return oids.pop() if len(oids) == 1 and all(direct for _, _, direct in flow) else 0


def _computed(flow: frozenset) -> frozenset:
    return frozenset((m, 0, False) for m, _, _ in flow)


def _enclosing_select(node: exp.Expression):
    node = node.parent
    while node is not None and not isinstance(node, exp.Select):
        node = node.parent
    return node


def _under(node: exp.Expression, root: exp.Expression | None) -> bool:
    if root is None:
        return False
    while node is not None:
        if node is root:
            return True
        node = node.parent
    return False


def _is_set_target(column: exp.Column) -> bool:
    """Is ``column`` the left side of an UPDATE's SET (written, not read)?"""
    parent = column.parent
    return isinstance(parent, exp.EQ) and parent.this is column and isinstance(parent.parent, exp.Update) \
        and parent in parent.parent.expressions  # fmt: skip
