"""A statement against a client's class: allowed, or refused with what and by which rule.

The order of the checks: the kinds (``allow_kinds``, then ``refuse_kinds``), then, for a
class that restricts objects, whether the statement could be analysed at all (fail
closed: its objects are unknown), then every table and function it names (``allow_objects``,
then ``refuse_objects``). The first finding refuses.

A refused statement is not dropped: it is *replaced* in the Query by a ``DO`` block that
raises 42501 (insufficient_privilege) on the server, naming the object or kind and the
rule (:func:`refusal_sql`). The server then answers exactly as it answers any error:
the statements before it ran, the ones after it do not, an open transaction is aborted
(25P02 until ROLLBACK), ReadyForQuery says so; nothing of the refused statement ran.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from shadow.policy.analysis import Statement, shape_key, span, statements, token_groups
from shadow.policy.catalog import Catalog
from shadow.policy.copying import CopyFormat
from shadow.policy.lineage import Unmaskable, copied_masks, result_masks
from shadow.policy.rules import ClientClass, ColumnMask
from shadow.sqltext import raising_do

__all__ = ["DYNAMIC_FUNCTIONS", "STATISTICS_VIEWS", "UNKNOWN", "Decision", "Outcome", "Refusal", "Shown", "check",
           "decide_query", "judge", "refusal_sql", "rewrite_query", "rewrite_query_by_shape"]

#: catalog relations that show values of other tables' columns (most common values,
#: histogram bounds): a class that restricts objects may not read them
STATISTICS_VIEWS = frozenset({"pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic",
                              "pg_statistic_ext_data"})  # fmt: skip

#: functions that run SQL given as text or read a table given by name (built in, and of
#: common extensions): what they touch cannot be seen in the statement, so a class that
#: restricts objects refuses them (fail closed)
DYNAMIC_FUNCTIONS = frozenset({
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema",
    "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema", "schema_to_xml", "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema", "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
    "dblink", "dblink_exec", "dblink_open", "dblink_fetch", "dblink_send_query", "dblink_get_result",
    "ts_stat", "pg_stat_statements", "xpath_table", "crosstab", "crosstab2", "crosstab3", "crosstab4", "connectby",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class Refusal:
    statement: Statement
    #: what is refused: "table hr.salaries", "request kind DELETE", ...
    what: str
    #: the rule: 'class "reporting": refuse_objects "hr.*"'
    rule: str

    @property
    def message(self) -> str:
        return f"permission denied for {self.what} (connmgr policy)"

    @property
    def detail(self) -> str:
        why = f" The statement {self.statement.why}." if not self.statement.analysed and self.statement.why else ""
        return f"Refused by {self.rule}.{why}"


def check(cls: ClientClass, st: Statement) -> Refusal | None:
    """The refusal of ``st`` for a client of ``cls``, or None if it may run."""
    where = f"class {cls.name!r}"
    if cls.allow_kinds is not None:
        for kind in sorted(st.kinds - cls.allow_kinds):
            return Refusal(st, f"request kind {kind}", f"{where}: allow_kinds (it is not among them)")
    for kind in sorted(st.kinds & cls.refuse_kinds):
        return Refusal(st, f"request kind {kind}", f"{where}: refuse_kinds")
    if not cls.restricts_objects:
        return None
    if not st.analysed:
        return Refusal(st, "a statement connmgr cannot analyse", f"{where}: it restricts objects (fail closed)")
    for schema, name in sorted(st.tables, key=str):
        if name in STATISTICS_VIEWS and schema in (None, "pg_catalog"):
            return Refusal(st, f"view pg_catalog.{name} (it shows values of every table's columns)",
                           f"{where}: it restricts objects (fail closed)")  # fmt: skip
    for schema, name in sorted(st.functions, key=str):
        if name in DYNAMIC_FUNCTIONS and schema in (None, "pg_catalog", "public"):
            return Refusal(st, f"function {name} (it runs SQL or reads a table named in its arguments)",
                           f"{where}: it restricts objects (fail closed)")  # fmt: skip
    objects = [("table", s, n) for s, n in sorted(st.tables, key=str)] + \
        [("function", s, n) for s, n in sorted(st.functions, key=str)]  # fmt: skip
    for kind, schema, name in objects:
        label = f"{kind} {schema + '.' if schema else ''}{name}"
        if cls.allow_objects is not None and not any(p.matches(kind, schema, name) for p in cls.allow_objects):
            if kind == "function" and not any(p.kind == "function" for p in cls.allow_objects):
                continue  # an allow-list of tables says nothing of functions
            return Refusal(st, label, f"{where}: allow_objects (it is not among them)")
        for pattern in cls.refuse_objects:
            if pattern.matches(kind, schema, name):
                return Refusal(st, label, f"{where}: refuse_objects {pattern.text!r}")
    return None


@dataclass(frozen=True, slots=True)
class Shown:
    """What a client is shown of a statement's rows: each output column's mask (None: as
    is) and the type of the masked column it shows as is (0: computed, or unknown)."""

    masks: tuple[ColumnMask | None, ...]
    oids: tuple[int, ...]
    #: a COPY TO STDOUT: the format of its rows
    copy: CopyFormat | None = None


#: the rows of a cursor or prepared statement connmgr did not see made: every value masked
UNKNOWN = Shown((), ())


@dataclass(frozen=True, slots=True)
class Outcome:
    """For a class with masks: what one allowed statement's rows show (``shown``), and for
    PREPARE/DECLARE the name it makes and what its later EXECUTE/FETCH will show
    (``binds``, ``bound``), for EXECUTE/FETCH the name whose rows it returns (``uses``)."""

    shown: Shown | None = None
    binds: tuple[str, str] | None = None
    bound: Shown | None = None
    uses: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """A Query's decision: ``text`` the text to send instead (None: as it is), the refusal,
    and the outcome of each statement that runs (a class with masks), in order."""

    text: str | None
    refusal: Refusal | None
    outcomes: tuple[Outcome | None, ...] = ()
    #: statements a rewrite changed
    rewritten: int = 0
    #: decided by shape alone (every statement had one, none was rewritten): a text that
    #: differs only in its values gets the same decision
    shared: bool = False
    #: what the statements that run name, views and SQL functions looked through where
    #: the catalog is known: (schema or None, name) (objects under maintenance)
    tables: frozenset = frozenset()
    functions: frozenset = frozenset()


def judge(cls: ClientClass, st: Statement, catalog: Catalog | None) -> tuple[Refusal | None, Outcome | None]:
    """:func:`check`, and for a class with masks what the statement's rows show."""
    refusal = check(cls, st)
    if refusal is not None or not cls.masks:
        return refusal, None
    if st.copy is not None and not st.copy.to:
        return None, None  # COPY FROM: a write (a masked column may be written to)
    if (st.tree is None and st.copy is None) or not st.tables:
        return None, Outcome(binds=st.binds, uses=st.uses) if st.binds or st.uses else None
    where = f"class {cls.name!r}"
    if catalog is None:
        return Refusal(st, "a statement over tables before the catalog is read", f"{where}: masks (fail closed)"), None
    try:
        found = result_masks(st.tree, st.tables, catalog, cls) if st.tree is not None else \
            copied_masks(st.copy.table, st.copy.columns, catalog, cls)  # fmt: skip
    except Unmaskable as e:
        return Refusal(st, "a masked column", f"{where}: mask ({e})"), None
    if found is not None and not any(m is not None for m in found[0]):
        found = None  # (it reads a table with masks, but none of its masked columns)
    shown = None if found is None else Shown(*found, copy=st.copy.format if st.copy is not None else None)
    if shown is not None and st.copy is not None and not st.copy.stdout:
        labels = ", ".join(sorted({m.label for m in shown.masks if m is not None}))
        return Refusal(st, "a masked column", f"{where}: mask (COPY TO a file or program would write masked column"
                                              f" {labels} unmasked)"), None  # fmt: skip
    if "EXPLAIN" in st.kinds:
        return None, None  # (a plan shows no values; the probes of what it runs were refused above)
    if st.binds is not None:
        return None, Outcome(binds=st.binds, bound=shown)
    return None, None if shown is None else Outcome(shown=shown)


def refusal_sql(refusal: Refusal) -> str:
    """A statement that makes the server raise 42501 with the refusal's message and detail."""
    return raising_do("42501", refusal.message, refusal.detail, "connmgr_refused")


def rewrite_query(sql: str, cls: ClientClass, catalog: Catalog | None = None) -> tuple[str | None, Refusal | None]:
    """Query text ``sql`` for a client of ``cls``: (None, None) when every statement may run;
    else (the text with its first refused statement replaced by :func:`refusal_sql`,
    the refusal). The statements after it stay as they were: the server never runs them.
    With the database's ``catalog``, what views and SQL functions read counts too."""
    decision = decide_query(sql, cls, catalog)
    return decision.text, decision.refusal


def decide_query(sql: str, cls: ClientClass, catalog: Catalog | None = None) -> Decision:
    """:func:`rewrite_query` with the outcome of each statement (:class:`Decision`); a
    class's rewrites (shadow/policy/rewrite.py) apply first, and the statement as
    rewritten is what is judged."""
    outcomes = []
    pieces: list[str] = []
    done = rewritten = 0
    tables: set = set()
    functions: set = set()
    for st in statements(sql):
        new = cls.rewrites.rewrite(sql[st.start:st.end]) if cls.rewrites and st.tree is not None else None
        judged = st
        if new is not None:
            (judged,) = statements(new)[:1] or (st,)
            rewritten += 1
        if catalog is not None:
            judged = catalog.expand(judged, cls.trusted_functions)
        refusal, outcome = judge(cls, judged, catalog)
        if refusal is not None or new is not None:
            pieces += [sql[done:st.start], refusal_sql(refusal) if refusal is not None else new]
            done = st.end
        if refusal is not None:
            return Decision("".join(pieces) + sql[done:], refusal, tuple(outcomes), rewritten, False,
                            frozenset(tables), frozenset(functions))  # fmt: skip
        tables.update(judged.tables)
        functions.update(judged.functions)
        outcomes.append(outcome)
    text = "".join(pieces) + sql[done:] if pieces else None
    return Decision(text, None, tuple(outcomes) if any(outcomes) else (), rewritten, False, frozenset(tables),
                    frozenset(functions))  # fmt: skip


#: (class, catalog, shape key) -> the refusal (or None) of a statement of that shape
_BY_SHAPE: OrderedDict = OrderedDict()
_BY_SHAPE_LIMIT = 16384


def rewrite_query_by_shape(sql: str, cls: ClientClass, catalog: Catalog | None = None) -> tuple[str | None, Refusal | None]:
    """:func:`rewrite_query` by way of :func:`decide_query_by_shape`."""
    decision = decide_query_by_shape(sql, cls, catalog)
    return decision.text, decision.refusal


def decide_query_by_shape(sql: str, cls: ClientClass, catalog: Catalog | None = None) -> Decision:
    """:func:`decide_query`, with each statement's decision cached by its shape (its
    tokens without the literals' values, :func:`~shadow.policy.analysis.shape_key`): a
    statement repeated with other values costs a tokenization, not a parse. A statement
    a rewrite changes is decided in full each time (its values go into the new text)."""
    if cls.rewrites and not cls.rewrites.by_shape:
        return decide_query(sql, cls, catalog)
    try:
        groups = token_groups(sql)
    except Exception:  # noqa: BLE001 - text the tokenizer cannot read: the full path says why
        return decide_query(sql, cls, catalog)
    outcomes = []
    pieces: list[str] = []
    done = rewritten = 0
    shared = True
    tables: set = set()
    functions: set = set()
    for tokens in groups:
        start, end = span(tokens)
        key = shape_key(tokens)
        shared = shared and key is not None
        cached = _BY_SHAPE.get((cls, catalog, key)) if key is not None else None
        if cached is not None and cached is not _REWRITTEN:
            refusal, outcome, named, called = cached
            _BY_SHAPE.move_to_end((cls, catalog, key))
            new = None
        else:
            one = decide_query(sql[start:end], cls, catalog)
            refusal, outcome = one.refusal, (one.outcomes[0] if one.outcomes else None)
            named, called = one.tables, one.functions
            new = one.text if one.rewritten else None
            if key is not None:
                _BY_SHAPE[(cls, catalog, key)] = _REWRITTEN if one.rewritten else (refusal, outcome, named, called)
                if len(_BY_SHAPE) > _BY_SHAPE_LIMIT:
                    _BY_SHAPE.popitem(last=False)
            if new is not None:
                rewritten += 1
                pieces += [sql[done:start], new]
                done = end
                if refusal is not None:
                    return Decision("".join(pieces) + sql[done:], refusal, tuple(outcomes), rewritten, False,
                                    frozenset(tables), frozenset(functions))  # fmt: skip
                tables.update(named)
                functions.update(called)
                outcomes.append(outcome)
                continue
        if refusal is not None:
            pieces += [sql[done:start], refusal_sql(refusal)]
            return Decision("".join(pieces) + sql[end:], refusal, tuple(outcomes), rewritten, False,
                            frozenset(tables), frozenset(functions))  # fmt: skip
        tables.update(named)
        functions.update(called)
        outcomes.append(outcome)
    text = "".join(pieces) + sql[done:] if pieces else None
    return Decision(text, None, tuple(outcomes) if any(outcomes) else (), rewritten, shared and not rewritten,
                    frozenset(tables), frozenset(functions))  # fmt: skip


#: a shape whose statements a rewrite changes (decided in full each time)
_REWRITTEN = object()
