"""The unit ring: sans-IO logic and the tree itself, no server, no socket, no clock.

A test here that asks (directly or through another fixture) for a PostgreSQL cluster
fails at collection: it belongs in ``tests/integration``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
_SERVERS = frozenset({"pg", "pg_base_dir"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents and _SERVERS & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid}: the unit ring starts no PostgreSQL (tests/integration does)")
