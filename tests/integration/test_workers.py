"""``[server] workers = N``: a real ``connmgr serve`` supervising real worker processes in
front of the session's Postgres, driven by psycopg.

What must hold: clients land on every worker and their rows arrive; a cancel request
reaches the session's worker wherever it lands; the console and the metrics endpoint
answer for all workers; a killed worker is started again; max_clients is the total;
SIGTERM stops every worker; a worker that cannot start stops the supervisor with a reason.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from connmgr_fixtures import USERS_TEXT, Supervised, wait_for

REPO = Path(__file__).resolve().parents[2]


def _config_text(pg, tmp_path: Path, server: str, extra: str) -> Path:
    users = tmp_path / "users.txt"
    users.write_text(USERS_TEXT)
    conf = tmp_path / f"connmgr-{uuid.uuid4().hex[:6]}.toml"
    conf.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\nshutdown_timeout = 3\nadmin_users = ["postgres"]\n{server}\n'
        f'[primary]\nhost = "{pg.host}"\nport = {pg.port}\n[auth]\nusers_file = "{users}"\n'
        f'[metrics]\nlisten = "127.0.0.1:0"\n{extra}'
    )
    return conf


@pytest.fixture
def supervised(pg, tmp_path):
    started: list[Supervised] = []

    def start(server: str = "workers = 2", extra: str = "", wait: bool = True) -> Supervised:
        s = Supervised(_config_text(pg, tmp_path, server, extra))
        started.append(s)
        return s.wait_listening() if wait else s

    yield start
    for s in started:
        s.kill_all()  # never leave a worker behind, also when a test failed


@pytest.fixture
def fresh_table(pg):
    name = f"w_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        c.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, pid int)")
    yield name
    with psycopg.connect(pg.conninfo(dbname="app"), autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {name}")


def test_clients_land_on_every_worker_and_their_rows_arrive(supervised, pg, fresh_table):
    s = supervised()
    conns = [s.connect() for _ in range(24)]
    try:
        for i, c in enumerate(conns):
            pid = c.info.backend_pid
            c.execute(f"INSERT INTO {fresh_table} VALUES (%s, %s)", (i, pid))
        cols, rows = s.show("CLIENTS")
        assert cols[0] == "worker"
        app_rows = [r for r in rows if r[cols.index("database")] == "app"]
        assert len(app_rows) == 24, rows
        per_worker = {w: sum(1 for r in app_rows if r[0] == w) for w in ("0", "1")}
        assert all(per_worker.values()), f"the kernel put every client on one worker: {per_worker}"
        # each client's virtual pid carries its worker's number in the top bits
        vpids = {int(r[cols.index("virtual_pid")]): r[0] for r in app_rows}
        assert {str(pid >> 24) for pid in vpids} == set(vpids.values()) == {"0", "1"}
        assert sorted(c.info.backend_pid for c in conns) == sorted(vpids)
    finally:
        for c in conns:
            c.close()
    with psycopg.connect(pg.conninfo(dbname="app")) as direct:
        rows = direct.execute(f"SELECT id, pid FROM {fresh_table} ORDER BY id").fetchall()
    assert [r[0] for r in rows] == list(range(24))
    assert sorted(r[1] for r in rows) == sorted(vpids)
    cols, workers = s.show("WORKERS")
    assert cols == ["worker", "pid", "clients", "uptime_s", "restarts"]
    assert [w[0] for w in workers] == ["0", "1"]
    assert len({w[1] for w in workers}) == 2 and all(int(w[1]) in s.worker_pids() for w in workers)


def test_cancel_reaches_the_worker_of_the_session(supervised):
    s = supervised()
    conns = [s.connect() for _ in range(16)]

    def sleep_and_report(c: psycopg.Connection) -> str:
        try:
            c.execute("SELECT pg_sleep(30)")
        except psycopg.Error as e:
            return e.sqlstate or type(e).__name__
        return "finished"

    try:
        with concurrent.futures.ThreadPoolExecutor(len(conns)) as pool:
            futures = [pool.submit(sleep_and_report, c) for c in conns]
            wait_for(lambda: _in_flight(s) >= 16, timeout=15, what="every query in flight")
            started = time.monotonic()
            for c in conns:
                c.cancel_safe(timeout=10)
            outcomes = [f.result(timeout=20) for f in futures]
        assert outcomes == ["57014"] * 16, outcomes
        assert time.monotonic() - started < 15
    finally:
        for c in conns:
            c.close()
    samples, _text = s.metrics()
    forwarded = sum(x.value for x in samples["connmgr_cancels_forwarded"])
    routed = sum(x.value for x in samples["connmgr_cancels"])
    assert routed == 16, samples["connmgr_cancels"]
    assert forwarded >= 1, "16 cancel connections never landed on a worker other than their session's"


def _in_flight(s: Supervised) -> int:
    cols, rows = s.show("CLIENTS")
    return sum(1 for r in rows if r[cols.index("pending")] not in ("0", None))


def test_metrics_endpoint_speaks_for_every_worker(supervised):
    s = supervised()
    conns = [s.connect() for _ in range(8)]
    try:
        samples, text = s.metrics()
    finally:
        for c in conns:
            c.close()
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps)), "a family appears twice"
    assert samples["connmgr_workers"][0].value == 2
    assert samples["connmgr_workers_running"][0].value == 2
    assert samples["connmgr_workers_answered"][0].value == 2
    active = {x.labels["worker"]: x.value for x in samples["connmgr_clients_active"]}
    assert set(active) == {"0", "1"} and sum(active.values()) == 8, active
    accepted = sum(x.value for x in samples["connmgr_clients_accepted"])
    assert accepted >= 8


def test_a_killed_worker_is_started_again(supervised, fresh_table):
    s = supervised()
    s.kill_worker(0)
    assert "worker 0" in s.log() and "exited with code -9" in s.log()
    for i in range(16):  # every new client is served, whichever worker it lands on
        with s.connect() as c:
            c.execute(f"INSERT INTO {fresh_table} VALUES (%s, 0)", (i,))
    with s.connect() as c:
        assert c.execute(f"SELECT count(*) FROM {fresh_table}").fetchone() == (16,)
    samples, _text = s.metrics()
    assert samples["connmgr_worker_restarts"][0].value == 1


def test_max_clients_is_the_total_over_the_workers(supervised):
    s = supervised("workers = 2\nmax_clients = 6")
    held, refused = [], []
    try:
        for _ in range(14):
            try:
                held.append(s.connect())
            except psycopg.OperationalError as e:
                refused.append(str(e))
        assert 3 <= len(held) <= 6, (len(held), refused)  # ceil(6 / 2) = 3 per worker
        assert refused and all("too many clients" in r for r in refused), refused
    finally:
        for c in held:
            c.close()


def test_sigterm_stops_the_supervisor_and_every_worker(supervised):
    s = supervised()
    pids = s.worker_pids()
    assert len(pids) == 2
    with s.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0, s.log()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_console_shutdown_stops_every_worker(supervised):
    s = supervised()
    with psycopg.connect(s.conninfo(dbname="connmgr"), autocommit=True) as admin:
        admin.execute("SHUTDOWN")
    assert s.proc.wait(20) == 0, s.log()
    assert "SHUTDOWN from the console of worker" in s.log()


def test_a_worker_that_cannot_start_stops_the_supervisor(supervised, tmp_path):
    s = supervised(extra=f'[tls]\nmode = "require"\ncert_file = "{tmp_path}/no-cert.pem"\n'
                         f'key_file = "{tmp_path}/no-key.pem"\n', wait=False)  # fmt: skip
    assert s.proc.wait(30) == 1, s.log()
    time.sleep(0.2)
    assert re.search(r"worker \d \(pid \d+\) exited with code 1 before it listened", s.log()), s.log()
    assert "no-cert.pem" in s.log() or "No such file" in s.log(), s.log()


def test_the_workers_flag_is_checked_like_the_file():
    r = subprocess.run([sys.executable, "-m", "connmgr", "serve", "--workers", "65"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "[server] workers: must be 1-64, got 65" in r.stderr


def test_workers_end_when_the_supervisor_is_killed(supervised):
    s = supervised()
    pids = s.worker_pids()
    assert len(pids) == 2
    s.proc.kill()
    s.proc.wait(10)
    deadline = time.monotonic() + 15  # shutdown_timeout = 3 s: they drain, then go
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a worker outlived its supervisor"


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status
