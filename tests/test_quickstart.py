"""The simplest use and the basic client paths, asserted on data."""

import subprocess

import psycopg


def psql(cm, sql_args, user="postgres", password="postgres", dbname="app"):
    env = {"PGPASSWORD": password, "PATH": "/usr/bin:/bin"}
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
