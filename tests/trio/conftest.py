"""The trio ring: connmgr's trio components on a virtual clock, no Postgres.

Every test here is async, takes pytest-trio's ``autojump_clock`` (a ``MockClock`` with
``autojump_threshold=0``: whenever every task waits, the clock jumps to the next deadline)
and asks for no PostgreSQL cluster (``pg``, ``pg_base_dir``). All three are checked at
collection, so a test that would sleep in real time or start a server fails before it runs.

Module names start with ``test_trio_``: the test directories have no ``__init__.py``, so
pytest imports each test file by its base name, and a second ``test_mirror.py`` would clash
with ``tests/integration/test_mirror.py``. (An ``__init__.py`` here would make this
directory the package ``trio``, in the way of the real one.)
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import trio

HERE = Path(__file__).parent
_SERVERS = frozenset({"pg", "pg_base_dir"})  # as in tests/unit/conftest.py


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in Path(item.path).parents:
            continue
        fn = getattr(item, "obj", None)
        if not inspect.iscoroutinefunction(fn):
            raise pytest.UsageError(f"{item.nodeid}: the trio ring holds async tests only")
        if "autojump_clock" not in inspect.signature(fn).parameters:
            raise pytest.UsageError(
                f"{item.nodeid}: takes no autojump_clock (it would run in real time)"
            )
        if _SERVERS & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid}: the trio ring does not start PostgreSQL")


@pytest.fixture
def vcaplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """``caplog`` whose records carry ``vtime``: the virtual time they were logged at."""

    def stamp(record) -> bool:
        try:
            record.vtime = trio.current_time()
        except RuntimeError:  # logged outside the run
            record.vtime = None
        return True

    caplog.handler.addFilter(stamp)
    yield caplog
    caplog.handler.removeFilter(stamp)
