"""Fixtures that run a real connmgr in front of the session's real Postgres.

connmgr runs in-process, in a thread with its own trio loop (``ConnmgrThread``), so a test
can drive it with blocking clients (psql, pgbench, psycopg) and still look at its ``App``
(metrics, registry). ``ConnmgrThread.stop()`` shuts it down gracefully and re-raises
anything that crashed the loop.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from connmgr import config as config_mod
from connmgr.app import App

USERS_TEXT = '"postgres" "postgres"\n"scram_user" "scram-pw"\n"md5_user" "md5-pw"\n'


class ConnmgrThread:
    def __init__(self, config: config_mod.Config) -> None:
        self.config = config
        self.app = App(config)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._main, name="connmgr", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: self.app.serve(handle_signals=False, task_status=task_status))
                self._started.set()

        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - re-raised in stop()
            self._error = e
        finally:
            self._started.set()

    def start(self) -> ConnmgrThread:
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def host(self) -> str:
        return self.app.listen_addresses[0][0]

    @property
    def port(self) -> int:
        return self.app.listen_addresses[0][1]

    def conninfo(self, user: str = "postgres", dbname: str = "app", password: str | None = None, **extra: str) -> str:
        parts = {"host": self.host, "port": str(self.port), "user": user, "dbname": dbname}
        if password is not None:
            parts["password"] = password
        parts.update(extra)
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def run_sync(self, fn, *args):
        """Run ``fn(*args)`` on connmgr's trio thread and return its result."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stop(self, timeout: float = 30) -> None:
        if self._thread.is_alive() and self._token is not None:
            try:
                self.run_sync(self.app.shutdown)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("connmgr did not stop within %ss" % timeout)
        if self._error is not None:
            raise self._error


def make_config(pg, tmp_dir: Path, users_text: str | None = USERS_TEXT, **sections: dict) -> config_mod.Config:
    """A Config in front of cluster ``pg`` listening on a free port; ``sections`` override."""
    overrides: dict[str, dict] = {
        "server": {"listen": ["127.0.0.1:0"], "shutdown_timeout": 5.0},
        "primary": {"host": pg.host, "port": pg.port},
    }
    if users_text is not None:
        users = tmp_dir / "userlist.txt"
        users.write_text(users_text)
        overrides["auth"] = {"users_file": str(users)}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return config_mod.load(None, **overrides)


@pytest.fixture
def start_connmgr(pg, tmp_path):
    """Factory: ``start_connmgr(**sections)`` starts a connmgr (stopped after the test)."""
    running: list[ConnmgrThread] = []

    def start(users_text: str | None = USERS_TEXT, **sections: dict) -> ConnmgrThread:
        cm = ConnmgrThread(make_config(pg, tmp_path, users_text, **sections)).start()
        running.append(cm)
        return cm

    yield start
    for cm in running:
        cm.stop()


@pytest.fixture
def proxy(start_connmgr):
    """A connmgr with SCRAM toward clients (users file) in front of ``pg``."""
    return start_connmgr()
