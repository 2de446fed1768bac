"""The statement classifiers the pair's guarantees rest on (pure, no server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadow.sqltext import created_table, enforce_synchronous_commit


@pytest.mark.parametrize("sql, name", [
    (b"CREATE TABLE t (id int)", "t"),
    (b"create table if not exists \"My S\".\"T x\"(a int)", '"My S"."T x"'),
    (b"CREATE TABLE s.t PARTITION OF p FOR VALUES IN (1)", "s.t"),
    (b"CREATE TABLE x (LIKE y INCLUDING ALL)", "x"),
    (b"CREATE TABLE g (a int, b int GENERATED ALWAYS AS (a * 2) STORED)", "g"),
    (b"CREATE TABLE s.t AS SELECT 1", None),
    (b"CREATE TABLE t AS (SELECT 1)", None),
    (b"CREATE TABLE t AS VALUES (1)", None),
    (b"CREATE TABLE t AS EXECUTE q", None),
    (b"CREATE UNLOGGED TABLE u (a int)", None),
    (b"CREATE TEMP TABLE x (a int)", None),
    (b"CREATE INDEX i ON t (a)", None),
    (b"SELECT 1 INTO t", None),
])  # fmt: skip
def test_created_table(sql, name):
    assert created_table(sql) == name


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
