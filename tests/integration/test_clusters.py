"""connmgr.embedded.clusters against real PostgreSQL servers."""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import psycopg
import pytest
import trio

from connmgr.embedded.clusters import Cluster, ClusterError, find_bindir, free_port


def _refuses(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
    return False


def _md5_login_sqlstate(host: str, port: int, user: str, password: str, dbname: str) -> str:
    """Log in with md5 by hand; return "" on AuthenticationOk, else the ErrorResponse's
    SQLSTATE. (psycopg cannot tell: libpq gives no result, so e.sqlstate is None.)"""

    def read_msg(sock: socket.socket) -> tuple[bytes, bytes]:
        def exactly(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = sock.recv(n - len(buf))
                assert chunk, "server closed the connection"
                buf += chunk
            return buf

        head = exactly(5)
        return head[:1], exactly(struct.unpack("!I", head[1:])[0] - 4)

    with socket.create_connection((host, port), timeout=10) as sock:
        params = b"".join(k + b"\0" + v.encode() + b"\0" for k, v in
                          ((b"user", user), (b"database", dbname))) + b"\0"  # fmt: skip
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        kind, body = read_msg(sock)
        assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 5, (kind, body)
        inner = hashlib.md5((password + user).encode()).hexdigest()
        digest = b"md5" + hashlib.md5(inner.encode() + body[4:8]).hexdigest().encode() + b"\0"
        sock.sendall(b"p" + struct.pack("!I", 4 + len(digest)) + digest)
        kind, body = read_msg(sock)
        if kind == b"R":
            assert struct.unpack("!I", body[:4])[0] == 0
            return ""
        assert kind == b"E", kind
        fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
        return fields[b"C"].decode()


@pytest.fixture
def scratch(pg_bindir, pg_base_dir, request):
    """A private cluster this test may break; destroyed afterwards."""
    clusters: list[Cluster] = []

    def make(**kw) -> Cluster:
        name = f"{request.node.name[:40]}-{len(clusters)}".replace("[", "-").replace("]", "")
        cluster = Cluster.create(pg_base_dir, name, bindir=pg_bindir, **kw)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.destroy()
        assert not cluster.is_running()
        assert not cluster.datadir.exists()


def test_find_bindir_has_server_binaries(pg_bindir):
    assert find_bindir() == pg_bindir
    for exe in ("initdb", "pg_ctl", "postgres"):
        assert os.access(pg_bindir / exe, os.X_OK)


def test_find_bindir_env_override(monkeypatch, tmp_path, pg_bindir):
    monkeypatch.setenv("CONNMGR_PG_BINDIR", str(pg_bindir))
    assert find_bindir() == pg_bindir
    monkeypatch.setenv("CONNMGR_PG_BINDIR", str(tmp_path))
    with pytest.raises(ClusterError, match="CONNMGR_PG_BINDIR.*initdb"):
        find_bindir()


def test_rows_round_trip_through_psql_and_psycopg(pg):
    pg.psql(
        "CREATE TABLE roundtrip (id int PRIMARY KEY, note text);"
        "INSERT INTO roundtrip VALUES (1, 'from psql'), (2, 'naïve | pipe');",
        dbname="app",
    )
    with pg.connect("app") as conn:
        assert conn.autocommit
        rows = conn.execute("SELECT id, note FROM roundtrip ORDER BY id").fetchall()
        assert rows == [(1, "from psql"), (2, "naïve | pipe")]
        conn.execute("INSERT INTO roundtrip VALUES (%s, %s)", (3, "from psycopg"))
    out = pg.psql("SELECT id, note FROM roundtrip ORDER BY id", dbname="app")
    assert out.splitlines() == ["1|from psql", "2|naïve | pipe", "3|from psycopg"]
    pg.psql("DROP TABLE roundtrip", dbname="app")


def test_cluster_settings_applied(pg):
    got = pg.psql(
        "SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'max_connections',"
        " 'fsync', 'password_encryption', 'unix_socket_directories', 'port') ORDER BY name"
    )
    settings = dict(line.split("|", 1) for line in got.splitlines())
    assert settings["wal_level"] == "logical"
    assert settings["max_connections"] == "700"
    assert settings["fsync"] == "off"
    assert settings["password_encryption"] == "scram-sha-256"
    assert settings["port"] == str(pg.port)
    assert settings["unix_socket_directories"] == str(pg.socket_dir)
    assert settings["unix_socket_directories"].startswith(str(pg.datadir.parent))


def test_psql_error_is_cluster_error(pg):
    with pytest.raises(ClusterError, match="no_such_table"):
        pg.psql("SELECT 1; SELECT * FROM no_such_table; SELECT 2")


def test_roles_store_the_requested_hash(pg, pg_users):
    out = pg.psql(
        "SELECT rolname, left(rolpassword, 14) FROM pg_authid"
        f" WHERE rolname IN ('{pg_users.md5.name}', '{pg_users.scram.name}',"
        f" '{pg_users.trust.name}') ORDER BY rolname"
    )
    stored = dict(line.split("|", 1) for line in out.splitlines())
    assert stored[pg_users.md5.name].startswith("md5")
    assert stored[pg_users.scram.name] == "SCRAM-SHA-256$"
    assert stored[pg_users.trust.name] == ""


def test_md5_user_logs_in_with_password(pg, pg_users):
    u = pg_users.md5
    with pg.connect("app", user=u.name, password=u.password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (u.name,)
    assert _md5_login_sqlstate(pg.host, pg.port, u.name, u.password, "app") == ""


def test_md5_user_wrong_password_is_28P01(pg, pg_users):
    u = pg_users.md5
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg.connect("app", user=u.name, password="wrong")
    assert _md5_login_sqlstate(pg.host, pg.port, u.name, "wrong", "app") == "28P01"


def test_scram_user_logs_in_and_wrong_password_fails(pg, pg_users):
    u = pg_users.scram
    with pg.connect("app", user=u.name, password=u.password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (u.name,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg.connect("app", user=u.name, password="wrong")


def test_trust_user_needs_no_password(pg, pg_users):
    with pg.connect("app", user=pg_users.trust.name) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (pg_users.trust.name,)
    assert pg.psql("SELECT current_user", user=pg_users.trust.name) == pg_users.trust.name


async def test_usable_from_trio_threads(pg):
    out = await trio.to_thread.run_sync(pg.psql, "SELECT 6 * 7")
    assert out == "42"


def test_create_role_twice_is_cluster_error(pg):
    pg.create_role("twice_role")
    try:
        with pytest.raises(ClusterError, match="twice_role.*already exists"):
            pg.create_role("twice_role")
    finally:
        pg.psql("DROP ROLE twice_role")


def test_kill_stop_and_restart_lifecycle(scratch):
    c = scratch()
    assert not c.is_running() and c.pid is None
    c.stop()  # not running: no error
    c.start()
    c.start()  # idempotent
    pid = c.pid
    assert pid is not None and c.is_running()
    c.psql("CREATE TABLE survives (x int); INSERT INTO survives VALUES (7)")

    c.kill()
    assert not c.is_running() and c.pid is None
    assert _refuses(c.host, c.port)
    with pytest.raises(ClusterError, match="not running"):
        c.kill()

    c.start()  # crash recovery; orphans and stale lock files are handled
    assert c.pid not in (None, pid)
    assert c.psql("SELECT x FROM survives") == "7"

    c.stop()
    assert not c.is_running()
    assert _refuses(c.host, c.port)
    c.stop()  # idempotent
    c.stop(mode="immediate")


def test_context_manager_starts_and_destroys(pg_bindir, pg_base_dir):
    with Cluster.create(pg_base_dir, "ctx", bindir=pg_bindir, password="s3cret") as c:
        assert c.is_running()
        assert c.psql("SELECT 1") == "1"
        assert "s3cret" not in repr(c)
    assert not c.is_running()
    assert not c.datadir.exists() and not c.datadir.parent.exists()


def test_settings_override_defaults(scratch):
    c = scratch(settings={"max_connections": 50, "cluster_name": "it's"})
    c.start()
    assert c.psql("SHOW max_connections") == "50"
    assert c.psql("SHOW cluster_name") == "it's"


def test_start_failure_reports_server_log(scratch):
    c = scratch(settings={"shared_buffers": "bogus"})
    with pytest.raises(ClusterError, match=r'(?s)could not start.*"shared_buffers": "bogus"'):
        c.start()
    assert not c.is_running()


def test_port_taken_is_reported(scratch):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        c = scratch(port=squatter.getsockname()[1])
        with pytest.raises(ClusterError, match=f"port {c.port} on 127.0.0.1 is already in use"):
            c.start()


def test_port_taken_by_a_race_is_reported(scratch, monkeypatch):
    # The port is grabbed after the pre-check: the server's own bind fails.
    monkeypatch.setattr(Cluster, "_check_port_free", lambda self: None)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        c = scratch(port=squatter.getsockname()[1])
        with pytest.raises(ClusterError, match=f"(?s)port {c.port} .* already in use.*server log"):
            c.start()
    assert not c.is_running()


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname() == ("127.0.0.1", port)


def test_create_refuses_existing_name(scratch, pg_base_dir):
    c = scratch()
    with pytest.raises(ClusterError, match="already exists"):
        Cluster.create(pg_base_dir, c.name, bindir=c.bindir)


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege dropping happens only as root")
def test_root_drops_to_an_unprivileged_os_user(pg):
    st = pg.datadir.stat()
    assert st.st_uid != 0
    assert pg.psql("SELECT pg_catalog.current_setting('data_directory')") == str(pg.datadir)
    with open(f"/proc/{pg.pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(st.st_uid)}


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege dropping happens only as root")
def test_root_with_unknown_os_user_is_refused(monkeypatch, pg_base_dir, pg_bindir):
    monkeypatch.setenv("CONNMGR_PG_OS_USER", "no-such-user-connmgr")
    with pytest.raises(ClusterError, match="no-such-user-connmgr.*does not exist"):
        Cluster.create(pg_base_dir, "unknown-user", bindir=pg_bindir)
    assert not (pg_base_dir / "unknown-user").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege dropping happens only as root")
def test_root_with_unreachable_base_dir_is_refused(tmp_path, pg_bindir):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(ClusterError, match="cannot enter .*locked"):
        Cluster.create(locked / "base", "c", bindir=pg_bindir)
    assert not (locked / "base" / "c").exists()
