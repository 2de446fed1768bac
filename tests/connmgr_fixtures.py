"""Fixtures that run a real connmgr in front of the session's real Postgres.

connmgr runs in-process (:class:`connmgr.embedded.harness.EmbeddedConnmgr`, a thread with its own
trio loop), so a test can drive it with blocking clients (psql, pgbench, psycopg) and still
look at its ``App`` (metrics, registry).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import psycopg
import pytest

from connmgr import config as config_mod
from connmgr.embedded.cluster_pair import ClusterPair
from connmgr.embedded.harness import EmbeddedConnmgr, SupervisedConnmgr, running_pair

#: the database and superuser password of the failover pairs (live_pair_of)
DB = "app"
PASSWORD = "postgres"

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


def wait_for(predicate, timeout: float = 10.0, what: str = "the condition"):
    """Poll ``predicate`` every 20 ms until it returns something true, and return that;
    after ``timeout`` seconds raise AssertionError naming ``what`` (so a bare call cannot
    pass by timing out). The one wait of the tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


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


def update_behind_a_lock(conn: psycopg.Connection, cluster, sql: str) -> tuple[threading.Thread, dict]:
    """Run ``sql`` (a statement that will wait for a row lock another session holds) on
    ``conn`` in a thread, and return once ``cluster`` shows it waiting; the box gets
    "row" (its first row) or "error" when it ends."""
    box: dict = {}

    def run() -> None:
        try:
            box["row"] = conn.execute(sql).fetchone()
        except Exception as e:  # noqa: BLE001 - the finding
            box["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=run)
    t.start()
    with cluster.connect(DB) as c:
        wait_for(lambda: c.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                   " AND datname = %s", (DB,)).fetchone() == (1,), 5, "the statement waiting")  # fmt: skip
    return t, box


class LivePair:
    def __init__(self, pair: ClusterPair, primary: EmbeddedConnmgr, secondary: EmbeddedConnmgr) -> None:
        self.pair = pair
        self.primary = primary
        self.secondary = secondary

    @property
    def failover(self):
        return self.primary.app.failover

    def connect(self, **kw) -> psycopg.Connection:
        return psycopg.connect(self.primary.conninfo("postgres", DB, PASSWORD), **kw)

    def on_secondary(self, sql: str):
        with self.pair.secondary.connect(DB) as c:
            return c.execute(sql).fetchall()


@contextlib.contextmanager
def live_pair_of(pg_bindir, base, tmp_path, *, primary_extra: dict | None = None,
                 failover_options: dict | None = None, server_options: dict | None = None,
                 policy_options: dict | None = None):
    """A fresh pair and its two connection managers (failover on), with tables accounts
    (20 rows of 1000), transfers and ledger."""
    with running_pair(base, database=DB, password=PASSWORD, poster_slot="failover_poster", bindir=pg_bindir,
                      users_dir=tmp_path, sequence_interval=0.1, failover=True, primary_extra=primary_extra,
                      failover_options=failover_options, server_options=server_options,
                      policy_options=policy_options) as (pair, primary, secondary):  # fmt: skip
        pair.sync_schema(DB, "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);"
                             "CREATE TABLE transfers (id text PRIMARY KEY, src int, dst int, amount int);"
                             "CREATE TABLE ledger (id bigserial PRIMARY KEY, note text UNIQUE NOT NULL)")  # fmt: skip
        with pair.primary.connect(DB) as c:
            c.execute("INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 20) g")
        pair.wait_caught_up()
        yield LivePair(pair, primary, secondary)



class Supervised(SupervisedConnmgr):
    """``connmgr serve -c CONF`` with workers, as the tests start it: waits until it listens."""

    def __init__(self, conf: Path) -> None:
        super().__init__(conf, password="postgres", dbname="app")

    def wait_listening(self) -> Supervised:
        try:
            self.start()
        except OSError as e:
            raise AssertionError(str(e)) from None
        return self
