"""The ``connmgr.guard`` message (pure): what the secondary reads from it, and that bad
bytes give a ValueError naming the problem, never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replay.markers import parse_guard_message


def test_a_guard_names_its_filled_tables_and_keeps_the_rows_as_sent():
    text = ('{"id": "ab12", "tables": ["public.t", "s.\\"Q x\\"", "public.e"], "copy": false,'
            ' "rows": {"public.t": ["(1,0.1000000000000000055511151231257827)"], "s.\\"Q x\\"": ["(2)"]}}')
    guard = parse_guard_message(text.encode())
    assert (guard.id, guard.filled, guard.copy) == ("ab12", ["public.t", 's."Q x"'], False)
    assert guard.tables == ["public.t", 's."Q x"', "public.e"]
    assert guard.payload == text  # the rows are not re-encoded: no float ever holds them


def test_the_fill_statement_quotes_the_payload():
    guard = parse_guard_message(json.dumps({"id": "g", "rows": {"public.t": ["(1,\"it's\")"]}, "tables": []}).encode())
    sql = guard.fill_sql()
    assert "'{\"id\": \"g\", \"rows\": {\"public.t\": [\"(1,\\\"it''s\\\")\"]}, \"tables\": []}'::jsonb" in sql
    assert sql.startswith("BEGIN; SET LOCAL session_replication_role = replica;") and sql.endswith("COMMIT")


@pytest.mark.parametrize("content, says", [
    (b"\xff\xfe", "not JSON"),
    (b"0123abcd", "not JSON"),  # the id-only message of an older connmgr
    (b'{"id": 5, "rows": {}}', "no string 'id'"),
    (b'{"id": "x", "rows": []}', "object 'rows'"),
    (b'{"id": "x", "rows": {}}', "list of table names"),
    (b'{"id": "x", "rows": {}, "tables": [1]}', "list of table names"),
    (b'["id"]', "no string 'id'"),
])  # fmt: skip
def test_a_malformed_guard_says_what_is_wrong(content, says):
    with pytest.raises(ValueError, match=says):
        parse_guard_message(content)


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_value_error(content):
    try:
        guard = parse_guard_message(content)
    except ValueError:
        return
    assert isinstance(guard.id, str) and all(isinstance(t, str) for t in guard.filled)
