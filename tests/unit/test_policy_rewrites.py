"""Rewrites (issue 16) as fixture pairs, sqlglot-style: every ``tests/unit/rewrites/NAME.in.sql``
decided for the class of ``rewrites/policy.toml`` comes out as ``NAME.out.sql``; plus the
file's errors, the shape cache, and a Parse's parameter types kept."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from shadow.framing import Framer
from shadow.policy.decision import decide_query, decide_query_by_shape
from shadow.policy.guard import Guard
from shadow.policy.rules import PolicyError, load_policy, parse_policy

HERE = Path(__file__).parent / "rewrites"
CASES = sorted(p.name.removesuffix(".in.sql") for p in HERE.glob("*.in.sql"))


@pytest.fixture(scope="module")
def cls():
    return load_policy(str(HERE / "policy.toml")).classes[0]


def test_there_are_fixtures() -> None:
    assert len(CASES) >= 15 and all((HERE / f"{c}.out.sql").exists() for c in CASES)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("decide", [decide_query, decide_query_by_shape], ids=["full", "by-shape"])
def test_fixture(cls, case: str, decide) -> None:
    text = (HERE / f"{case}.in.sql").read_text().strip()
    want = (HERE / f"{case}.out.sql").read_text().strip()
    for _ in range(2):  # (the second time from the shape cache)
        got = decide(text, cls)
        assert got.refusal is None
        assert (got.text if got.text is not None else text) == want


@pytest.mark.parametrize(("body", "words"), [
    ("[[class.rewrite]]\nmatch = 'SELECT 1'", "a rewrite has match and replace"),
    ("[[class.rewrite]]\nmatch = 'SELEC 1'\nreplace = 'SELECT 2'", "match: "),
    ("[[class.rewrite]]\nmatch = 'SELECT * FROM t WHERE a = ?'\nreplace = 'SELECT $2'", "replace uses $2 but match has 1"),
    ("[[class.rewrite]]\nmatch = 'SELECT 1'\nreplace = 'SELECT 2'\n[[class.rewrite]]\nmatch = 'select 5'\n"
     "replace = 'SELECT 3'", "rewrite 2: its match is rewrite 1's"),
    ("[[class.rule]]\nrule = 'limit'", "rule 'limit' needs max_rows"),
    ("[[class.rule]]\nrule = 'limit'\nmax_rows = 0", "max_rows: a positive number"),
    ("[[class.rule]]\nrule = 'sort'", "rule: one of limit, table_to_view, replace_function, python"),
    ("[[class.rule]]\nrule = 'table_to_view'\ntable = 't'\nview = 'v'\ncolour = 1", "colour: not a setting"),
    ("[[class.rule]]\nrule = 'python'\npython = 'no_such_module_x:f'", "python: cannot load"),
    ("[[class.rule]]\nrule = 'python'\npython = 'os'", "python: write \"module:function\""),
])  # fmt: skip
def test_a_broken_rewrite_is_refused_naming_the_key_and_the_fix(body: str, words: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(f"[[class]]\nname = 'x'\n{body}\n", "p.toml")
    assert words in str(err.value), str(err.value)


def add_limit_7(tree):
    """A python rule (loaded by the test below): every SELECT gets LIMIT 7."""
    return tree.limit(7) if tree.key == "select" else tree


def test_a_python_rule_is_an_expression_to_expression_function() -> None:
    cls = parse_policy("[[class]]\nname = 'x'\n[[class.rule]]\nrule = 'python'\n"
                       "python = 'test_policy_rewrites:add_limit_7'\n").classes[0]  # fmt: skip
    assert decide_query_by_shape("SELECT a FROM t WHERE b = 1", cls).text == "SELECT a FROM t WHERE b = 1 LIMIT 7"
    assert not cls.rewrites.by_shape  # (it may look at values: never shared by shape)


def test_a_rewritten_statement_is_what_the_policy_judges() -> None:
    cls = parse_policy("[[class]]\nname = 'x'\nrefuse_objects = ['secret']\n[[class.rewrite]]\n"
                       "match = 'SELECT * FROM open WHERE id = ?'\nreplace = 'SELECT * FROM secret WHERE id = $1'\n"
                       ).classes[0]  # fmt: skip
    got = decide_query("SELECT * FROM open WHERE id = 3", cls)
    assert got.refusal is not None and got.refusal.what == "table secret"


def test_a_rewritten_parse_keeps_its_parameter_types(cls) -> None:
    seen = []
    guard = Guard(cls, lambda r: None, on_rewrite=seen.append)
    body = b"s1\0SELECT * FROM orders WHERE id = $1\0" + struct.pack("!hi", 1, 23)
    message = b"P" + struct.pack("!i", len(body) + 4) + body
    buf, frames = guard.filter(*Framer(frontend=True).feed(message))
    ((tag, start, end),) = frames
    assert bytes(buf[start:end]) == b"s1\0SELECT id, customer, total FROM orders_v WHERE id = $1 LIMIT 1000\0" + \
        struct.pack("!hi", 1, 23)  # fmt: skip
    assert seen == [1]
