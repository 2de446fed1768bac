"""Synchronized activation of policy versions (issue 16, seed 001) with real parts: two
``connmgr serve`` processes in front of the session's Postgres, one of them under
libfaketime with its clock 7 s ahead, the store in a fresh database of that Postgres,
versions pushed with the real ``connmgr policy push``, psycopg clients polling each
connmgr.

Each version rewrites ``SELECT policy_probe()`` to ``SELECT <its number>``, so a client
sees which version decided its statement. What must hold: both connmgrs switch at one
instant (the flip of each, seen by a client polling it without pause, within a bound that
a connmgr ignoring its clock offset -- 7 s -- could never meet; labs/policy_skew.py
measures the skew itself over many trials); a transaction begun under a version finishes
under it; a version one connmgr cannot stage (its mask key is missing there) is refused
and activated nowhere, and ``connmgr policy status`` says which connmgr and why; the next
good version goes through; a connmgr that starts takes the version in effect at once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from connmgr_fixtures import USERS_TEXT, wait_for

from connmgr.embedded.harness import SupervisedConnmgr
from connmgr.proxy.registry import WORKER_SHIFT

REPO = Path(__file__).resolve().parents[2]
INTERVAL = 1.0
AHEAD = 7  # seconds connmgr B's clock is ahead

pytestmark = pytest.mark.skipif(shutil.which("faketime") is None, reason="needs libfaketime (apt install faketime)")


def policy_text(number: int, mask_key_env: str | None = None) -> str:
    text = (f'[[class]]\nname = "probe"\nusers = ["scram_user"]\n'
            f'[[class.rewrite]]\nmatch = "SELECT policy_probe()"\nreplace = "SELECT {number}"\n')  # fmt: skip
    if mask_key_env:
        text += f'[[class.mask]]\ncolumn = "nowhere.secret"\nmask = "hash"\nkey_env = "{mask_key_env}"\n'
    return text


class Connmgr(SupervisedConnmgr):
    """``connmgr serve -c CONF`` as a process (``ahead``: its clock that many seconds ahead,
    under faketime), started; :meth:`connect` as the probe class's user."""

    def __init__(self, conf: Path, ahead: int = 0, env: dict | None = None) -> None:
        super().__init__(conf, launcher=["faketime", "-f", f"+{ahead}s"] if ahead else (), env=env)
        self.start()

    def connect(self, **kw) -> psycopg.Connection:
        return psycopg.connect(self.conninfo("scram_user", "app", "scram-pw"), **kw)


@pytest.fixture
def store(pg):
    """A fresh database holding the store (dropped after, whatever happened)."""
    name = f"store_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.conninfo(dbname="postgres"), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    yield name
    with psycopg.connect(pg.conninfo(dbname="postgres"), autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def fleet(pg, store, tmp_path):
    started: list[Connmgr] = []

    def start(member: str, ahead: int = 0, env: dict | None = None) -> Connmgr:
        users = tmp_path / "users.txt"
        users.write_text(USERS_TEXT)
        conf = tmp_path / f"{member}.toml"
        conf.write_text(
            f'[server]\nlisten = ["127.0.0.1:0"]\nshutdown_timeout = 2\nadmin_users = ["postgres"]\n'
            f'[primary]\nhost = "{pg.host}"\nport = {pg.port}\n[auth]\nusers_file = "{users}"\n'
            f'[redo]\nuser = "postgres"\npassword = "postgres"\n'
            f'[policy]\nstore_database = "{store}"\nstore_poll = 0.2\nmember = "{member}"\n')  # fmt: skip
        cm = Connmgr(conf, ahead, env)
        started.append(cm)
        return cm

    yield start
    for cm in started:
        cm.stop()


def push(pg, store: str, tmp_path: Path, text: str, *extra: str) -> str:
    path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "connmgr", "policy", "push", str(path), pg.conninfo(dbname=store),
                        "--interval", str(INTERVAL), *extra], cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def probe(c: psycopg.Connection) -> int:
    """The version that decided the statement (0: none rewrote it, so the server did not know the function)."""
    try:
        return c.execute("SELECT policy_probe()", prepare=False).fetchone()[0]
    except psycopg.errors.UndefinedFunction:
        return 0


def flip_time(c: psycopg.Connection, old: int, new: int, stop: threading.Event, out: dict, key: str) -> None:
    """Poll without pause; out[key] = (the last moment seen old, the first seen new), in
    this process's clock: the switch happened between the two."""
    last_old = None
    while not stop.is_set():
        sent = time.time()
        v = probe(c)
        got = time.time()
        if v == old:
            last_old = sent
        elif v == new:
            out[key] = (last_old, got)
            return


def test_two_connmgrs_switch_together_and_a_version_one_cannot_stage_runs_nowhere(pg, store, fleet, tmp_path):
    key = "CONNMGR_TEST_MASK_KEY"
    print("\n" + push(pg, store, tmp_path, policy_text(1)).strip())
    a = fleet("cm-a", env={key: "k" * 32})
    b = fleet("cm-b", ahead=AHEAD, env={key: ""})
    ca, cb = a.connect(autocommit=True), b.connect(autocommit=True)
    assert wait_for(lambda: probe(ca) == 1 and probe(cb) == 1, 20, "version 1 on both")
    offsets = {cm: dict(cm.console("SHOW POLICY")[1])["clock offset"] for cm in (a, b)}
    print("clock offsets to the store:", offsets[a], "(a)", offsets[b], "(b, faketime +7 s)")
    assert abs(float(offsets[b].split()[0]) + AHEAD * 1000) < 50 and abs(float(offsets[a].split()[0])) < 50

    # version 2: each connmgr polled without pause from here; a transaction begun under 1
    tx = a.connect()
    assert probe(tx) == 1  # (its transaction began under version 1)
    stop, flips = threading.Event(), {}
    pollers = [threading.Thread(target=flip_time, args=(c, 1, 2, stop, flips, name))
               for c, name in ((ca, "a"), (cb, "b"))]  # fmt: skip
    for t in pollers:
        t.start()
    push(pg, store, tmp_path, policy_text(2))
    for t in pollers:
        t.join(4 * INTERVAL + 10)
    stop.set()
    assert set(flips) == {"a", "b"}, f"not both switched: {flips}"
    (a_old, a_new), (b_old, b_new) = flips["a"], flips["b"]
    skew = abs((a_old + a_new) / 2 - (b_old + b_new) / 2)
    window = max(a_new - a_old, b_new - b_old)
    print(f"activation skew between a and b: {skew * 1000:.2f} ms (each flip seen within {window * 1000:.2f} ms)")
    assert skew < 0.5, f"the two connmgrs switched {skew:.3f} s apart"
    assert probe(tx) == 1, "a transaction begun under version 1 must finish under it"
    tx.commit()
    assert probe(tx) == 2
    tx.close()

    # version 3 cannot be staged on b (its mask key is missing there): refused, nowhere active
    push(pg, store, tmp_path, policy_text(3, key), "--no-check")

    def refused() -> str:
        r = subprocess.run([sys.executable, "-m", "connmgr", "policy", "status", pg.conninfo(dbname=store)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
        return r.stdout if "refused:   version 3" in r.stdout else ""

    assert wait_for(refused, 6 * INTERVAL + 10, "version 3 refused")
    status = refused()
    print(status)
    assert "cm-b: policy version 3" in status and key in status, status
    time.sleep(2 * INTERVAL)
    assert (probe(ca), probe(cb)) == (2, 2), "a version one connmgr cannot stage must run nowhere"

    # the next good version goes through; a connmgr that starts takes it at once
    push(pg, store, tmp_path, policy_text(4))
    assert wait_for(lambda: probe(ca) == 4 and probe(cb) == 4, 6 * INTERVAL + 10, "version 4 on both")
    c = fleet("cm-c")
    with c.connect(autocommit=True) as cc:
        assert probe(cc) == 4
    ca.close()
    cb.close()


def test_the_store_of_a_pair_is_followed_by_both_connmgrs_and_survives_a_failover(pg_bindir, pg_base_dir, tmp_path):
    """The store in the pair's database: the secondary connmgr reads it on the primary
    database (as its poster does), the secondary database gets its rows through the
    subscription; when the primary database is killed, the version in use stays, and a
    version pushed to the survivor is activated by the connmgr that moved there."""
    from connmgr_fixtures import DB, PASSWORD, live_pair_of

    text = ('[[class]]\nname = "probe"\napplication_names = ["probe*"]\n[[class.rewrite]]\n'
            'match = "SELECT policy_probe()"\nreplace = "SELECT {n}"\n')  # fmt: skip
    with live_pair_of(pg_bindir, pg_base_dir / "policy-store-pair", tmp_path, failover_options={"failback": "manual"},
                      policy_options={"store_database": DB, "store_poll": 0.2}) as lp:  # fmt: skip
        primary_db, secondary_db = lp.pair.primary.conninfo(DB), lp.pair.secondary.conninfo(DB)
        first = tmp_path / "v1.toml"
        first.write_text(text.format(n=1))
        r = subprocess.run([sys.executable, "-m", "connmgr", "policy", "push", str(first), primary_db, "--interval",
                            str(INTERVAL), "--secondary", secondary_db], cwd=REPO, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        on_primary = psycopg.connect(lp.primary.conninfo("postgres", DB, PASSWORD, application_name="probe-p"),
                                     autocommit=True)  # fmt: skip
        on_secondary = psycopg.connect(lp.secondary.conninfo("postgres", DB, PASSWORD, application_name="probe-s"),
                                       autocommit=True)  # fmt: skip
        assert wait_for(lambda: probe(on_primary) == 1 and probe(on_secondary) == 1, 20, "version 1 on both")
        members = lp.pair.primary.connect(DB).execute("SELECT count(*) FROM connmgr.policy_members").fetchone()
        assert members == (2,), "both connmgrs of the pair take part in the store on the primary database"
        assert wait_for(lambda: lp.on_secondary("SELECT max(version) FROM connmgr.policy_versions") == [(1,)], 15,
                        "the store's rows on the secondary database")  # fmt: skip
        # the subscriber's copy is not pushed to (its next row would stop the subscription)
        r = subprocess.run([sys.executable, "-m", "connmgr", "policy", "push", str(first), secondary_db], cwd=REPO,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 2 and "subscriber's copy" in r.stderr, r.stderr

        lp.pair.primary.kill()
        assert wait_for(lambda: lp.failover.failed_over, 15), lp.failover.timeline
        assert probe(on_primary) == 1  # the session moved; the version in use stayed
        second = tmp_path / "v2.toml"
        second.write_text(text.format(n=2))
        r = subprocess.run([sys.executable, "-m", "connmgr", "policy", "push", str(second), secondary_db],
                           cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0 and "policy version 2 pushed" in r.stdout, r.stderr
        # (the secondary connmgr cannot read the store on the dead primary: after three
        # intervals it is no longer a live member, and version 2 is approved without it)
        assert wait_for(lambda: probe(on_primary) == 2, 10 * INTERVAL + 10, "version 2 after the failover")
        on_primary.close()
        on_secondary.close()


def test_the_command_line_names_what_is_wrong(pg, store, tmp_path):
    """A broken file is refused before anything is written (the key and the fix named); an
    unreachable database and a database with no store are said so; a bad [policy] store
    stops serve naming it."""
    broken = tmp_path / "broken.toml"
    broken.write_text('[[class]]\nname = "x"\nrefuse_kinds = ["SELEKT"]\n')

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "connmgr", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    r = run("policy", "push", str(broken), pg.conninfo(dbname=store))
    assert r.returncode == 2 and "refuse_kinds: unknown kind(s) SELEKT" in r.stderr, r.stderr
    r = run("policy", "status", pg.conninfo(dbname=store))
    assert r.returncode == 0 and "no policy store here" in r.stdout, r.stdout  # (nothing was written)
    r = run("policy", "push", str(tmp_path / "missing.toml"), pg.conninfo(dbname=store))
    assert r.returncode == 2 and "missing.toml" in r.stderr, r.stderr
    r = run("policy", "status", "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=3")
    assert r.returncode == 1 and "the store's database" in r.stderr, r.stderr
    conf = tmp_path / "bad.toml"
    conf.write_text('[policy]\nstore = "etcd"\n')
    r = run("serve", "-c", str(conf))
    assert r.returncode != 0 and '[policy] store: "database"' in r.stderr and "'etcd'" in r.stderr, r.stderr


def test_maintenance_through_the_store_holds_statements_on_every_connmgr(pg, store, fleet, tmp_path):
    """``connmgr maintenance begin OBJECT --store``: it returns once both connmgrs hold
    statements on the object; a statement on it waits on each (another table is answered
    meanwhile); ``end`` lets both go, and their rows come back."""
    table = f"maint_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        c.execute(f"INSERT INTO {table} VALUES (1)")
        c.execute(f"GRANT SELECT ON {table} TO scram_user")
    try:
        push(pg, store, tmp_path, "")  # (a policy of no classes: the store exists)
        a, b = fleet("cm-a"), fleet("cm-b")
        conninfo = pg.conninfo(dbname=store)

        def cli(action: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "connmgr", "maintenance", action, f"public.{table}",
                                   "--store", conninfo, "--wait", "20"], cwd=REPO, capture_output=True, text=True,
                                  timeout=60)  # fmt: skip

        assert wait_for(lambda: "cm-a" in policy_status(pg, store) and "cm-b" in policy_status(pg, store), 20,
                        "both connmgrs in the store")  # fmt: skip
        r = cli("begin")
        assert r.returncode == 0 and "held by every connmgr (2: cm-a, cm-b)" in r.stdout, (r.stdout, r.stderr)
        results: dict = {}

        def read(name: str, cm: Connmgr) -> None:
            with cm.connect(autocommit=True) as c:
                results[name] = (c.execute(f"SELECT id FROM {table}").fetchall(), time.monotonic())

        started = time.monotonic()
        readers = [threading.Thread(target=read, args=(n, cm)) for n, cm in (("a", a), ("b", b))]
        for t in readers:
            t.start()
        time.sleep(0.8)
        assert results == {}, "a statement on an object under maintenance must wait on every connmgr"
        with b.connect(autocommit=True) as other:  # another object is not held
            assert other.execute("SELECT 1").fetchone() == (1,)
        ended = time.monotonic()
        r = cli("end")
        assert r.returncode == 0 and "let go by every connmgr" in r.stdout, (r.stdout, r.stderr)
        for t in readers:
            t.join(20)
        assert {k: v[0] for k, v in results.items()} == {"a": [(1,)], "b": [(1,)]}
        assert all(v[1] >= ended for v in results.values()), (started, ended, results)
    finally:
        with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
            c.execute(f"DROP TABLE IF EXISTS {table}")


def policy_status(pg, store: str) -> str:
    r = subprocess.run([sys.executable, "-m", "connmgr", "policy", "status", pg.conninfo(dbname=store)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    return r.stdout


def test_every_worker_of_a_supervised_connmgr_is_a_member_and_switches(pg, store, tmp_path):
    """``[server] workers = 2``: each worker process takes part in the store (its own
    member), so a version is approved once both staged it and every session, whichever
    worker it lands on, is decided by it."""
    from connmgr_fixtures import Supervised

    users = tmp_path / "users.txt"
    users.write_text(USERS_TEXT)
    conf = tmp_path / "workers.toml"
    conf.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\nshutdown_timeout = 2\nadmin_users = ["postgres"]\nworkers = 2\n'
        f'[primary]\nhost = "{pg.host}"\nport = {pg.port}\n[auth]\nusers_file = "{users}"\n'
        f'[redo]\nuser = "postgres"\npassword = "postgres"\n'
        f'[policy]\nstore_database = "{store}"\nstore_poll = 0.2\nmember = "sup"\n')  # fmt: skip
    push(pg, store, tmp_path, policy_text(1))
    s = Supervised(conf).wait_listening()
    try:
        def on_every_worker() -> set[int]:
            seen = {}
            for _ in range(12):
                with psycopg.connect(s.conninfo("scram_user", "app", "scram-pw"), autocommit=True) as c:
                    seen[c.info.backend_pid >> WORKER_SHIFT] = probe(c)
            return set(seen.values()) if len(seen) == 2 else set()

        assert wait_for(lambda: on_every_worker() == {1}, 20, "version 1 on both workers")
        assert re.search(r"sup/0: live.*\n.*sup/1: live", policy_status(pg, store)), policy_status(pg, store)
        push(pg, store, tmp_path, policy_text(2))
        assert wait_for(lambda: on_every_worker() == {2}, 20, "version 2 on both workers")
    finally:
        s.kill_all()
