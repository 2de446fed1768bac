"""The simplest use and the basic client paths, asserted on data."""

import os
import subprocess

import psycopg
import pytest


@pytest.fixture(params=["engine", "tasks"])
def proxy(request, start_connmgr):
    """Both relay carriers: the epoll engine and the per-direction trio tasks."""
    return start_connmgr(server={"relay": request.param})


def psql(cm, sql_args, user="postgres", password="postgres", dbname="app"):
    env = {"PGPASSWORD": password, "PATH": os.environ["PATH"]}
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", cm.host, "-p", str(cm.port), "-U", user, "-d", dbname, *sql_args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_psql_through_connmgr_scram(proxy):
    r = psql(proxy, ["-c", "select 40 + 2", "-c", "select current_user"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["42", "postgres"]


def test_psycopg_md5_user_and_prepared(proxy):
    with psycopg.connect(proxy.conninfo(user="md5_user", password="md5-pw")) as conn:
        cur = conn.execute("select %s::int * 2, current_user", (21,), prepare=True)
        assert cur.fetchone() == (42, "md5_user")
        for i in range(6):  # past psycopg's prepare threshold
            assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)


def test_wrong_password_is_28P01(proxy):
    r = psql(proxy, ["-c", "select 1"], user="scram_user", password="nope")
    assert r.returncode != 0
    assert 'password authentication failed for user "scram_user"' in r.stderr
    assert proxy.app.metrics.auth_failures == 1
    assert proxy.app.metrics.client_errors["28P01"] == 1


def test_copy_both_ways_and_notices(proxy, tmp_path):
    """COPY in and out, a notice and an error mid-session, on either carrier."""
    src = tmp_path / "in.csv"
    src.write_text("".join(f"{i},row {i}\n" for i in range(1, 2001)))
    out = tmp_path / "out.csv"
    r = psql(proxy, [
        "-c", "drop table if exists qs_copy; create table qs_copy (a int, b text)",
        "-c", f"\\copy qs_copy from '{src}' csv",
        "-c", "do $$ begin raise notice 'hello %', 42; end $$",
        "-c", f"\\copy (select * from qs_copy order by a) to '{out}' csv",
        "-c", "select count(*), sum(a) from qs_copy",
        "-c", "drop table qs_copy",
    ])
    assert r.returncode == 0, r.stderr
    assert "NOTICE:  hello 42" in r.stderr
    assert "2000|2001000" in r.stdout
    assert out.read_text() == src.read_text()
