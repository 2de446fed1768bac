"""The pair's primary connmgr with ``[server] workers = 2``: a real ``connmgr serve``
supervising two worker processes, each mirroring its own sessions to the (embedded)
secondary connmgr, in front of a real pair of databases.

What must hold: every worker mirrors (the secondary has one receiver per worker); a kill
of the primary database moves the sessions of both workers, with one decision; their open
transactions carry on and the survivor holds exactly what was committed; a switchover
from one worker's console moves every worker's sessions; RESEED from a console re-arms
every worker.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from connmgr_fixtures import DB, PASSWORD, update_behind_a_lock, wait_for

from connmgr.embedded.cluster_pair import ClusterPair
from connmgr.embedded.harness import SupervisedConnmgr, running_pair

WORKER_SHIFT = 24


class WorkerPair:
    def __init__(self, pair: ClusterPair, primary: SupervisedConnmgr, secondary) -> None:
        self.pair = pair
        self.primary = primary
        self.secondary = secondary

    def connect(self, **kw) -> psycopg.Connection:
        return psycopg.connect(self.primary.conninfo(), **kw)

    def on(self, cluster, sql: str):
        with cluster.connect(DB) as c:
            return c.execute(sql).fetchall()

    def metric(self, name: str) -> dict[str, float]:
        return self.primary.per_worker(name)


@pytest.fixture
def worker_pair(pg_bindir, pg_base_dir, tmp_path, request):
    with running_pair(pg_base_dir / f"wpair-{request.node.name[:30]}", database=DB, password=PASSWORD,
                      poster_slot="workers_poster", bindir=pg_bindir, users_dir=tmp_path, sequence_interval=0.1,
                      failover=True, failover_options={"failback": "manual"}, shutdown_timeout=3.0,
                      workers=2) as (pair, primary, secondary):  # fmt: skip
        assert sorted(secondary.app.secondary.receivers) == ["primary worker 0", "primary worker 1"]
        pair.sync_schema(DB, "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
        with pair.primary.connect(DB) as c:
            c.execute("INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 40) g")
        pair.wait_caught_up()
        yield WorkerPair(pair, primary, secondary)


def _no_wait_ran_out(wp: WorkerPair) -> None:
    """Every step of the move was signalled: no bounded wait of the order ran out, and the
    coordinator answered every worker."""
    log = wp.primary.log()
    for words in ("did not resolve their commits", "did not finish replaying", "did not answer", "Traceback"):
        assert words not in log, log[-6000:]


def _on_both_workers(wp: WorkerPair, n: int, **kw) -> list[psycopg.Connection]:
    """``n`` connections or more, until both workers hold at least two."""
    conns: list[psycopg.Connection] = []
    while len(conns) < n or min(sum(1 for c in conns if c.info.backend_pid >> WORKER_SHIFT == w) for w in (0, 1)) < 2:
        conns.append(wp.connect(**kw))
        assert len(conns) < 64, "the kernel put every connection on one worker"
    return conns


def test_a_kill_moves_the_sessions_of_every_worker(worker_pair):
    wp = worker_pair
    conns = _on_both_workers(wp, 10)
    idle = wp.connect(autocommit=True)
    for i, c in enumerate(conns, 1):  # an open transaction in every session, on both workers
        c.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (i, i))
    wp.pair.primary.kill()
    # each open transaction carries on where it was (replayed on the survivor), then commits
    for i, c in enumerate(conns, 1):
        assert c.execute("SELECT balance FROM accounts WHERE id = %s", (i,)).fetchone() == (1000 + i,)
        c.execute("UPDATE accounts SET balance = balance + 1000 WHERE id = %s", (i,))
        c.commit()
    assert idle.execute("SELECT count(*), sum(balance) FROM accounts").fetchone()[0] == 40
    expected = [(i, 2000 + i) for i in range(1, len(conns) + 1)]
    assert wp.on(wp.pair.secondary, f"SELECT id, balance FROM accounts WHERE id <= {len(conns)} ORDER BY id") == expected
    moved = wp.metric("connmgr_failover_sessions_moved")
    assert moved.get("0", 0) >= 2 and moved.get("1", 0) >= 2, moved
    assert sum(wp.metric("connmgr_failover_failed_over").values()) == 2
    # one decision: the point of failure was made once (the supervisor's log says so once)
    assert wp.primary.log().count("point of failure reached") == 1, wp.primary.log()[-4000:]
    assert not sum(wp.metric("connmgr_failover_transactions_rolled_back").values())
    _no_wait_ran_out(wp)
    for c in (*conns, idle):
        c.close()
    # a worker started again after the move joins it: its new sessions go to the survivor
    wp.primary.kill_worker(1)
    assert wp.metric("connmgr_failover_failed_over") == {"0": 1.0, "1": 1.0}
    late = _on_both_workers(wp, 4, autocommit=True)
    for i, c in enumerate(late, 1):
        c.execute("UPDATE accounts SET balance = %s WHERE id = %s", (-i, 40 - i))
    assert wp.on(wp.pair.secondary, "SELECT count(*) FROM accounts WHERE balance < 0") == [(len(late),)]
    for c in late:
        c.close()


def test_a_terminated_backend_is_one_false_alarm_for_every_worker(worker_pair):
    """pg_terminate_backend of one session's backend (worker A) while a session of worker
    B waits for its row lock: both workers freeze, the coordinator's probe finds the
    primary alive, both thaw. The victim gets the server's 57P01; the waiting session's
    reply arrives intact (held or not, depending on which came first) and nothing moves."""
    wp = worker_pair
    conns = _on_both_workers(wp, 4)
    victim = next(c for c in conns if c.info.backend_pid >> WORKER_SHIFT == 0)
    other = next(c for c in conns if c.info.backend_pid >> WORKER_SHIFT == 1)
    victim.execute("SET application_name = 'victim'")
    victim.execute("UPDATE accounts SET balance = balance + 100 WHERE id = 7")
    t, box = update_behind_a_lock(other, wp.pair.primary,
                                  "UPDATE accounts SET balance = balance + 1 WHERE id = 7 RETURNING balance")
    with wp.pair.primary.connect(DB) as admin:
        assert admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                             " WHERE application_name = 'victim'").fetchone() == (1,)  # fmt: skip
    with pytest.raises(psycopg.OperationalError) as err:
        victim.execute("SELECT 1")
    # the server's 57P01, or -- when the request crossed the FATAL and the closed socket
    # answered it with a reset, which can discard the FATAL unread -- the socket closed:
    # as with Postgres direct, whose backend exits the same way
    assert err.value.sqlstate == "57P01" or (err.value.sqlstate is None and "closed" in str(err.value)), err.value
    t.join(10)
    assert box["row"] == (1001,)
    other.commit()
    wait_for(lambda: wp.metric("connmgr_failover_false_alarms") == {"0": 1.0, "1": 1.0}, 10, "a false alarm in both")
    assert wp.metric("connmgr_failover_freezes") == {"0": 1.0, "1": 1.0}
    assert wp.metric("connmgr_failover_failed_over") == {"0": 0.0, "1": 0.0}
    assert sum(wp.metric("connmgr_failover_sessions_moved").values()) == 0
    assert wp.on(wp.pair.primary, "SELECT balance FROM accounts WHERE id = 7") == [(1001,)]
    assert other.execute("SELECT 2").fetchone() == (2,)
    for c in conns:
        if c is not victim:
            c.close()


def test_a_bank_workload_on_both_workers_survives_a_kill(worker_pair):
    """Clients on both workers transfer money in explicit transactions; the primary is
    killed mid-run. Every acknowledged transfer is on the survivor, money is conserved."""
    wp = worker_pair
    wp.pair.sync_schema(DB, "CREATE TABLE transfers (id text PRIMARY KEY, src int, dst int, amount int)")
    wp.pair.wait_caught_up()
    conns = _on_both_workers(wp, 8)
    stop = threading.Event()
    acked: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int, c: psycopg.Connection) -> None:
        import random

        rnd = random.Random(i)
        n = 0
        try:
            while not stop.is_set():
                n += 1
                src, dst = rnd.sample(range(1, 41), 2)
                tid = f"{i}-{n}"
                with c.transaction():  # (rows locked in id order: no deadlock of the workload's own)
                    for account in sorted((src, dst)):
                        c.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                                  (-1 if account == src else 1, account))  # fmt: skip
                    c.execute("INSERT INTO transfers VALUES (%s, %s, %s, 1)", (tid, src, dst))
                with lock:
                    acked.append(tid)
        except psycopg.Error as e:
            with lock:
                errors.append(f"client {i} (worker {c.info.backend_pid >> WORKER_SHIFT}): {e.sqlstate} {e}")

    for c in conns:
        c.autocommit = True
    threads = [threading.Thread(target=client, args=(i, c), daemon=True) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 50, 20, "50 acknowledged transfers")
    wp.pair.primary.kill()
    before = len(acked)
    wait_for(lambda: len(acked) >= before + 50 or errors, 30, "50 more transfers after the kill")
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    ids = {r[0] for r in wp.on(wp.pair.secondary, "SELECT id FROM transfers")}
    lost = [t for t in acked if t not in ids]
    assert not lost, f"{len(lost)} acknowledged transfers are not on the survivor: {lost[:10]}"
    assert wp.on(wp.pair.secondary, "SELECT sum(balance) FROM accounts") == [(40000,)]
    moved = wp.metric("connmgr_failover_sessions_moved")
    assert moved.get("0", 0) >= 2 and moved.get("1", 0) >= 2, moved
    _no_wait_ran_out(wp)
    for c in conns:
        c.close()


def test_switchover_and_reseed_from_one_console_act_on_every_worker(worker_pair):
    wp = worker_pair
    conns = _on_both_workers(wp, 6)
    for i, c in enumerate(conns, 1):
        c.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (i, i))
    _cols, rows = wp.primary.console("SWITCHOVER")
    events = [r[1] for r in rows]
    assert any("fence committed" in e for e in events), events
    assert any("secondary is the primary now" in e for e in events), events
    for i, c in enumerate(conns, 1):  # the open transactions go on, now on the secondary database
        assert c.execute("SELECT balance FROM accounts WHERE id = %s", (i,)).fetchone() == (1000 + i,)
        c.commit()
    expected = [(i, 1000 + i) for i in range(1, len(conns) + 1)]
    assert wp.on(wp.pair.secondary, f"SELECT id, balance FROM accounts WHERE id <= {len(conns)} ORDER BY id") == expected
    assert wp.metric("connmgr_failover_failed_over") == {"0": 1.0, "1": 1.0}
    _cols, rows = wp.primary.console("RESEED")
    assert any("the pair is whole again" in r[1] for r in rows), rows
    wait_for(lambda: wp.metric("connmgr_failover_failed_over") == {"0": 0.0, "1": 0.0}, 10, "both workers re-armed")
    # the old primary follows the new one now: a commit through connmgr reaches it
    with wp.connect(autocommit=True) as c:
        c.execute("UPDATE accounts SET balance = 7 WHERE id = 40")
    wait_for(lambda: wp.on(wp.pair.primary, "SELECT balance FROM accounts WHERE id = 40") == [(7,)], 10,
             "the commit on the re-seeded old primary")  # fmt: skip
    for c in conns:
        c.close()


def test_switchover_with_a_session_waiting_for_another_workers_paused_lock(worker_pair):
    """An autocommit UPDATE on worker 1 waits for a row lock that a transaction on worker 0
    holds, left open (paused at its boundary by the switchover): worker 1's drain sees
    its blocker idle in its transaction, ends the waiting backend on the old primary and
    lets it move with its request in flight; on the secondary it waits for the replayed
    lock holder again and completes when that commits."""
    wp = worker_pair
    conns = _on_both_workers(wp, 4)
    holder = next(c for c in conns if c.info.backend_pid >> WORKER_SHIFT == 0)
    waiter = next(c for c in conns if c.info.backend_pid >> WORKER_SHIFT == 1)
    waiter.autocommit = True
    holder.execute("UPDATE accounts SET balance = balance - 100 WHERE id = 7")
    t, box = update_behind_a_lock(waiter, wp.pair.primary, "UPDATE accounts SET balance = balance + 1 WHERE id = 7 RETURNING balance")
    _cols, rows = wp.primary.console("SWITCHOVER 5")
    events = [r[1] for r in rows]
    assert any("1 of them ended while waiting for a lock" in e for e in events), events
    assert "row" not in box and "error" not in box  # still waiting: now for the replayed lock holder
    holder.commit()
    t.join(10)
    assert box == {"row": (901,)}
    assert wp.on(wp.pair.secondary, "SELECT balance FROM accounts WHERE id = 7") == [(901,)]
    assert wp.on(wp.pair.primary, "SELECT balance FROM accounts WHERE id = 7") == [(1000,)]  # committed neither
    assert not sum(wp.metric("connmgr_failover_transactions_rolled_back").values())
    _no_wait_ran_out(wp)
    for c in conns:
        c.close()
