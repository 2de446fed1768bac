"""Objects under maintenance, the pure part: which entries a statement waits for, and the
batch that waited until the limit (its statement replaced by a 55P03, nothing else)."""

from __future__ import annotations

import struct

import pytest

from shadow.framing import Framer
from shadow.policy.guard import UNRESTRICTED, Guard
from shadow.policy.maintenance import Maintenance, wait_sql
from shadow.policy.rules import PolicyError


def _guard(m: Maintenance, application_name: str = "app") -> Guard:
    g = Guard(UNRESTRICTED, lambda r: None)
    g.maintenance = m
    g.application_name = application_name
    return g


def _q(sql: str) -> bytes:
    return b"Q" + struct.pack("!i", len(sql) + 5) + sql.encode() + b"\0"


def _p(sql: str) -> bytes:
    body = b"s\0" + sql.encode() + b"\0\0\0"
    return b"P" + struct.pack("!i", len(body) + 4) + body


def _waits(g: Guard, message: bytes, in_transaction: bool = False) -> list[str]:
    buf, frames = Framer(frontend=True).feed(message)
    return [e.text for e in g.must_wait(buf, frames, in_transaction)]


def test_which_statements_wait() -> None:
    m = Maintenance()
    g = _guard(m)
    assert _waits(g, _q("SELECT * FROM orders")) == []  # nothing under maintenance: no analysis
    m.begin("public.orders")
    m.begin("function:rebuild_*")
    assert _waits(g, _q("SELECT * FROM orders WHERE id = 1")) == ["public.orders"]
    assert _waits(g, _q("select 1; UPDATE public.orders SET a = 1")) == ["public.orders"]
    assert _waits(g, _p("DELETE FROM orders WHERE id = $1")) == ["public.orders"]
    assert _waits(g, _q("SELECT * FROM audit.orders")) == []  # another schema's
    assert _waits(g, _q("SELECT * FROM customers")) == []
    assert _waits(g, _q("SELECT rebuild_index('x')")) == ["function:rebuild_*"]
    assert _waits(_guard(m, "connmgr-maintenance 7"), _q("SELECT * FROM orders")) == []  # the job


def test_a_transaction_begun_before_goes_on() -> None:
    m = Maintenance()
    g = _guard(m)
    assert _waits(g, _q("BEGIN; SELECT * FROM orders")) == []  # the transaction begins (version 0)
    m.begin("orders")
    assert _waits(g, _q("SELECT * FROM orders"), in_transaction=True) == []  # began before: goes on
    assert _waits(g, _q("SELECT * FROM orders"), in_transaction=False) == ["orders"]  # a new one waits
    assert _waits(g, _q("SELECT * FROM orders"), in_transaction=True) == ["orders"]  # (began after)


def test_end_begin_and_errors() -> None:
    m = Maintenance()
    entry = m.begin("Public.Orders", by="nightly*")
    assert m.end("public.orders") is entry and m.end("public.orders") is None and m.version == 2
    with pytest.raises(PolicyError):
        m.begin("a.b.c")


def test_the_batch_that_waited_until_the_limit_gets_55p03_for_that_statement_only() -> None:
    m = Maintenance()
    g = _guard(m)
    entry = m.begin("orders")
    g.expired = ((entry,), 2.0)
    batch = _q("SELECT * FROM orders") + _q("SELECT 1")
    buf, frames = g.filter(*Framer(frontend=True).feed(batch))
    assert len(frames) == 2
    assert bytes(buf[frames[0][1]:frames[0][2] - 1]).decode() == wait_sql((entry,), 2.0)
    assert bytes(buf[frames[1][1]:frames[1][2]]) == b"SELECT 1\0"
    assert "ERRCODE = '55P03'" in wait_sql((entry,), 2.0) and "orders is under maintenance" in wait_sql((entry,), 2.0)
    assert g.expired is None  # once
    m.end("orders")
    g.expired = ((entry,), 2.0)  # (it ended meanwhile: the batch goes as it is)
    assert g.filter(*Framer(frontend=True).feed(batch))[0] == batch
