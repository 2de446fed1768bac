"""Rewrites: a client's statement replaced by another before anything else sees it (the
server, the analysis, the mirror). No I/O.

Two kinds, per class, applied in this order:

* the **lookup table** (``[[class.rewrite]]``, ``match`` -> ``replace``): a statement whose
  normalized sqlglot tree is the ``match``'s is replaced. Normalized: identifiers folded as
  Postgres folds them, keywords, spacing and comments as sqlglot writes them, and every
  literal, ``?`` and ``$n`` a *value*; the values of the client's statement, in order, are
  put where the replacement says ``$1``, ``$2``, ... So ``match = "SELECT * FROM orders
  WHERE id = ?"`` takes ``select *  from ORDERS where id=42`` and a Parse of ``... id = $1``
  alike, and ``replace = "SELECT id, total FROM orders_v WHERE id = $1"`` gets 42 (or the
  client's own ``$1``).
* **rules** (``[[class.rule]]``), pure ``Expression -> Expression`` functions: ``limit``
  (a top-level SELECT without LIMIT gets ``LIMIT max_rows``), ``table_to_view`` (a table
  read is sent to a view, under the table's name as alias), ``replace_function`` (a
  function called by another name), and ``python`` (``module:function``, the operator's
  own, loaded with the policy).

A statement that nothing changes keeps its text byte for byte; one that is changed is
written out by sqlglot (postgres). Whether a statement is rewritten depends on its shape
only (never on its values), except for a ``python`` rule, so the decision cache may share it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

__all__ = ["RULES", "Rewrites", "Rule", "TableEntry", "normalized"]

RULES = ("limit", "table_to_view", "replace_function", "python")


def normalized(tree: exp.Expression) -> tuple[str, list[exp.Expression]]:
    """(the key of ``tree``'s shape, its values in order): literals, ``?`` and ``$n`` are
    values; identifiers are folded; the key is sqlglot's text of the result."""
    tree = normalize_identifiers(tree.copy(), dialect="postgres")
    values: list[exp.Expression] = []

    def blank(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Parameter | exp.Placeholder) or (isinstance(node, exp.Literal)
                                                                 and not isinstance(node.parent, exp.Parameter)):
            values.append(node.copy())
            return exp.Placeholder()
        return node

    key = tree.transform(blank, copy=False).sql(dialect="postgres", comments=False)
    return key, values


@dataclass(frozen=True, slots=True)
class TableEntry:
    """One ``[[class.rewrite]]``: statements of the shape of ``match`` become ``replace``."""

    match: str
    replace: str
    key: str
    values: int
    #: the highest $n the replacement uses
    uses: int

    @classmethod
    def parse(cls, match: str, replace: str) -> TableEntry:
        """Raises ValueError (the message says what is wrong) for text sqlglot cannot
        read, or a replacement that uses more values than the match has."""
        trees = _one(match, "match")
        key, values = normalized(trees)
        template = _one(replace, "replace")
        numbers = [_number(p) for p in template.find_all(exp.Parameter)]
        uses = max([n for n in numbers if n is not None], default=0)
        if uses > len(values):
            raise ValueError(f"replace uses ${uses} but match has {len(values)} value(s) (literals, ? or $n)")
        return cls(match, replace, key, len(values), uses)

    def apply(self, values: list[exp.Expression]) -> exp.Expression:
        template = sqlglot.parse_one(self.replace, read="postgres")

        def put(node: exp.Expression) -> exp.Expression:
            n = _number(node) if isinstance(node, exp.Parameter) else None
            return values[n - 1].copy() if n is not None and 1 <= n <= len(values) else node

        return template.transform(put)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[class.rule]]``."""

    name: str
    options: tuple[tuple[str, object], ...]
    function: Callable[[exp.Expression], exp.Expression] | None = field(default=None, compare=False, repr=False)

    def option(self, key: str):
        return dict(self.options)[key]

    def apply(self, tree: exp.Expression) -> exp.Expression:
        if self.name == "limit":
            return _limit(tree, int(self.option("max_rows")))
        if self.name == "table_to_view":
            return _table_to_view(tree, str(self.option("table")), str(self.option("view")))
        if self.name == "replace_function":
            return _replace_function(tree, str(self.option("function")), str(self.option("with")))
        assert self.function is not None
        out = self.function(tree.copy())
        if not isinstance(out, exp.Expression):
            raise TypeError(f"rule {self.option('python')} returned {type(out).__name__}, not an sqlglot Expression")
        return out

    @classmethod
    def load(cls, name: str, options: dict) -> Rule:
        """Raises ValueError naming what is missing or wrong."""
        need = {"limit": ("max_rows",), "table_to_view": ("table", "view"), "replace_function": ("function", "with"),
                "python": ("python",)}[name]  # fmt: skip
        missing = [k for k in need if k not in options]
        if missing:
            raise ValueError(f"rule {name!r} needs {', '.join(missing)}")
        stray = set(options) - set(need)
        if stray:
            raise ValueError(f"{', '.join(sorted(stray))}: not a setting of rule {name!r} (it takes {', '.join(need)})")
        if name == "limit" and (not isinstance(options["max_rows"], int) or options["max_rows"] < 1):
            raise ValueError(f"max_rows: a positive number, got {options['max_rows']!r}")
        function = None
        if name == "python":
            function = _import(str(options["python"]))
        for key in ("table", "view", "function", "with"):
            if key in options and (not isinstance(options[key], str) or not options[key].strip()):
                raise ValueError(f"{key}: a name, got {options[key]!r}")
        return cls(name, tuple(sorted(options.items())), function)


@dataclass(frozen=True, slots=True)
class Rewrites:
    """A class's lookup table and rules."""

    table: tuple[TableEntry, ...] = ()
    rules: tuple[Rule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.table or self.rules)

    @property
    def by_shape(self) -> bool:
        """Does whether a statement is rewritten depend on its shape alone?"""
        return not any(rule.name == "python" for rule in self.rules)

    def rewrite(self, text: str) -> str | None:
        """The statement ``text`` rewritten, or None if nothing changes it (or sqlglot
        cannot read it: then it is analysed as it is)."""
        try:
            trees = [t for t in sqlglot.parse(text, read="postgres") if t is not None]
        except SqlglotError:
            return None
        if len(trees) != 1 or isinstance(trees[0], exp.Command):
            return None
        tree = original = trees[0]
        if self.table:
            key, values = normalized(tree)
            for entry in self.table:
                if entry.key == key:
                    tree = entry.apply(values)
                    break
        for rule in self.rules:
            tree = rule.apply(tree)
        if tree is original or tree == original:
            return None
        return tree.sql(dialect="postgres")


def _one(text: str, what: str) -> exp.Expression:
    try:
        trees = [t for t in sqlglot.parse(text, read="postgres") if t is not None]
    except SqlglotError as e:
        raise ValueError(f"{what}: sqlglot cannot read it ({str(e).splitlines()[0][:160]})") from None
    if len(trees) != 1 or isinstance(trees[0], exp.Command):
        raise ValueError(f"{what}: write one statement sqlglot understands, got {text[:80]!r}")
    return trees[0]


def _number(parameter: exp.Expression) -> int | None:
    inner = parameter.this
    text = inner.name if isinstance(inner, exp.Expression) else str(inner)
    return int(text) if text.isdigit() else None


def _limit(tree: exp.Expression, rows: int) -> exp.Expression:
    if not isinstance(tree, exp.Select | exp.SetOperation) or tree.args.get("limit") is not None:
        return tree
    if isinstance(tree, exp.Select) and tree.args.get("into") is not None:
        return tree
    return tree.limit(rows, copy=True)


def _table_to_view(tree: exp.Expression, table: str, view: str) -> exp.Expression:
    want = table.lower().split(".")
    to = view.split(".")

    def send(node: exp.Expression) -> exp.Expression:
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            return node
        name, schema = node.name.lower(), (node.db or "").lower()
        if name != want[-1] or (len(want) == 2 and schema not in ("", want[0])):
            return node
        if isinstance(node.parent, exp.Insert | exp.Update | exp.Delete | exp.Merge | exp.Schema):
            return node  # a write's target stays the table
        alias = node.args.get("alias") or exp.TableAlias(this=exp.to_identifier(node.name))
        out = exp.to_table(".".join(to), dialect="postgres")
        out.set("alias", alias.copy())
        return out

    return tree.transform(send)


def _replace_function(tree: exp.Expression, function: str, replacement: str) -> exp.Expression:
    name = function.lower()
    try:  # (sqlglot reads some names as its own classes: now() is CURRENT_TIMESTAMP)
        parsed = sqlglot.parse_one(f"SELECT {function}()", read="postgres").expressions[0]
    except SqlglotError:
        parsed = None
    kind = type(parsed) if isinstance(parsed, exp.Func) and not isinstance(parsed, exp.Anonymous) else None

    def swap(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Anonymous) and node.name.lower() == name or kind is not None and type(node) is kind:
            return exp.Anonymous(this=replacement, expressions=_arguments(node))
        return node

    return tree.transform(swap)


def _arguments(func: exp.Func) -> list[exp.Expression]:
    if isinstance(func, exp.Anonymous):
        return [a.copy() for a in func.expressions]
    out = []
    for value in func.args.values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, exp.Expression):
                out.append(v.copy())
    return out


def _import(spec: str) -> Callable[[exp.Expression], exp.Expression]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"python: write \"module:function\", got {spec!r}")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"python: cannot load {spec!r}: {e}") from None
    if not callable(function):
        raise ValueError(f"python: {spec!r} is not a function")
    return function
