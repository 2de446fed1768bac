"""Fixtures that run a real connmgr in front of the session's real Postgres.

connmgr runs in-process (:class:`connmgr.embedded.EmbeddedConnmgr`, a thread with its own
trio loop), so a test can drive it with blocking clients (psql, pgbench, psycopg) and still
look at its ``App`` (metrics, registry).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from connmgr import config as config_mod
from connmgr.embedded import EmbeddedConnmgr, wait_until

USERS_TEXT = '"postgres" "postgres"\n"scram_user" "scram-pw"\n"md5_user" "md5-pw"\n'


class ConnmgrThread(EmbeddedConnmgr):
    """EmbeddedConnmgr whose conninfo defaults to the test database ``app``."""

    def conninfo(self, user: str = "postgres", dbname: str = "app", password: str | None = None, **extra: str) -> str:
        return super().conninfo(user, dbname, password, **extra)


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


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    return wait_until(predicate, timeout)


@pytest.fixture
def pair(start_connmgr):
    """(primary connmgr, secondary connmgr, records the secondary received)."""
    secondary = start_connmgr(mirror={"listen": "127.0.0.1:0"})
    received: list = []
    lock = threading.Lock()

    def consume(records):
        with lock:
            received.extend(records)

    secondary.app.mirror_consumers.append(consume)
    host, port = secondary.app.mirror_listen_address
    primary = start_connmgr(
        mirror={"peer": f"{host}:{port}", "heartbeat_interval": 0.05},
        redo={"user": "postgres", "password": "postgres", "interval": 0.002},
    )
    assert wait_for(lambda: primary.app.mirror.connected), "mirror link never came up"
    return primary, secondary, received


