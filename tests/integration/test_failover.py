"""Failover end to end: the primary database is killed with SIGKILL while clients are
connected through the primary connmgr, idle, inside transactions and mid-commit; their
sessions move to the secondary and carry on. Assertions are on data on the survivor,
on what each client received, and on the move's counters."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from connmgr_fixtures import DB, PASSWORD, live_pair_of, update_behind_a_lock, wait_for

from connmgr.ops.cli import main


@pytest.fixture
def live_pair(pg_bindir, pg_base_dir, tmp_path, request):
    """A fresh pair per test (each test kills its primary). No automatic fail-back: these
    tests look at the old primary as the move left it (test_failback.py turns it)."""
    with live_pair_of(pg_bindir, pg_base_dir / f"failover-{request.node.name[:40]}", tmp_path,
                      failover_options={"failback": "manual"}) as lp:  # fmt: skip
        yield lp


def test_idle_and_open_transactions_move_and_continue(live_pair):
    lp = live_pair
    idle = lp.connect(autocommit=True)
    in_block = lp.connect()
    prepared = lp.connect()
    vpid = idle.info.backend_pid
    in_block.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    in_block.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2")
    assert in_block.execute("SELECT balance FROM accounts WHERE id = 1").fetchone() == (990,)
    # a protocol-level prepared statement made before the failure, used after it
    prepared.execute("SELECT balance FROM accounts WHERE id = %s", (3,), prepare=True)
    prepared.commit()

    lp.pair.primary.kill()
    assert wait_for(lambda: lp.failover.failed_over, 10), lp.failover.timeline

    # the open transaction carries on where it was: its two updates are there once
    assert in_block.execute("SELECT balance FROM accounts WHERE id IN (1, 2) ORDER BY id").fetchall() == [(990,), (1010,)]
    in_block.execute("UPDATE accounts SET balance = balance - 5 WHERE id = 3")
    in_block.execute("UPDATE accounts SET balance = balance + 5 WHERE id = 4")
    in_block.commit()
    assert idle.execute("SELECT count(*), sum(balance) FROM accounts").fetchone() == (20, 20000)
    assert idle.info.backend_pid == vpid  # the client's key did not change
    assert prepared.execute("SELECT balance FROM accounts WHERE id = %s", (3,), prepare=True).fetchone() == (995,)
    prepared.commit()
    # the survivor holds exactly what was committed
    assert lp.on_secondary("SELECT id, balance FROM accounts WHERE id <= 4 ORDER BY id") == [
        (1, 990), (2, 1010), (3, 995), (4, 1005)]
    fo = lp.failover
    assert fo.sessions_moved >= 3
    assert fo.transactions_replayed >= 1
    assert not fo.transactions_rolled_back and not fo.sessions_failed
    for c in (idle, in_block, prepared):
        c.close()


def test_replay_that_differs_is_rolled_back_with_40001(live_pair):
    lp = live_pair
    c = lp.connect()
    c.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 5")
    c.execute("SELECT clock_timestamp()").fetchone()  # cannot be replayed faithfully
    lp.pair.primary.kill()
    assert wait_for(lambda: lp.failover.failed_over, 10)
    with pytest.raises(psycopg.errors.SerializationFailure) as err:
        c.execute("SELECT 1")
    assert "could not be moved" in str(err.value)
    c.rollback()
    # the session is intact and usable; the transaction's update is not on the survivor
    assert c.execute("SELECT balance FROM accounts WHERE id = 5").fetchone() == (1000,)
    assert lp.failover.transactions_rolled_back["result differs"] == 1
    c.close()


def test_commit_in_flight_whose_replay_differs_commits_nowhere(live_pair):
    """A COMMIT the primary never got confirmed (the secondary's apply is stuck behind a
    lock, so the synchronous commit waits) is replayed there; its transaction read
    clock_timestamp(), so the replay differs. The client gets 40001, and the secondary must
    not hold the update: the commit goes to the secondary only after the answered part of
    the transaction matched."""
    lp = live_pair
    c = lp.connect()
    c.execute("UPDATE accounts SET balance = balance + 7 WHERE id = 6")
    c.execute("SELECT clock_timestamp()").fetchone()
    locker = lp.pair.secondary.connect(DB, autocommit=False)
    locker.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")  # the apply worker waits
    outcome = []

    def commit():
        try:
            c.commit()
            outcome.append("committed")
        except psycopg.Error as e:
            outcome.append(e.sqlstate)

    t = threading.Thread(target=commit)
    t.start()
    with lp.pair.primary.connect(DB) as watch:
        assert wait_for(lambda: watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
                        .fetchone() == (1,), 10)  # fmt: skip
    lp.pair.primary.kill()
    assert wait_for(lambda: lp.failover.failed_over, 10), lp.failover.timeline
    locker.rollback()  # the apply worker was ended at the point of failure; the replay may go on
    t.join(20)
    assert outcome == ["40001"]
    assert lp.failover.transactions_rolled_back["result differs"] == 1
    assert lp.on_secondary("SELECT balance FROM accounts WHERE id = 6") == [(1000,)]
    c.rollback()
    assert c.execute("SELECT balance FROM accounts WHERE id = 6").fetchone() == (1000,)
    locker.close()
    c.close()


def test_bank_workload_survives_a_kill(live_pair):
    """N clients transfer money in explicit transactions (simple and extended protocol)
    and insert into a ledger in autocommit; the primary is killed mid-run. Every
    acknowledged transfer is on the survivor exactly once, money is conserved, and no
    client saw an error."""
    lp = live_pair
    stop = threading.Event()
    acked: list[str] = []
    ledger: list[str] = []
    errors: list[str] = []
    retried: list[str] = []  # 40001: connmgr found the replay truly differed
    lock = threading.Lock()

    def client(i: int) -> None:
        import random

        rnd = random.Random(i)
        try:
            with lp.connect() as c:
                n = 0
                while not stop.is_set():
                    n += 1
                    src, dst = rnd.sample(range(1, 21), 2)
                    tid = f"{i}-{n}"
                    if n % 3 == 0:
                        c.autocommit = True
                        c.execute("INSERT INTO ledger (note) VALUES (%s)", (tid,))
                        c.autocommit = False
                        with lock:
                            ledger.append(tid)
                        continue
                    a, b = sorted((src, dst))
                    try:
                        c.execute("SELECT balance FROM accounts WHERE id IN (%s, %s) ORDER BY id FOR UPDATE", (a, b),
                                  prepare=(i % 2 == 0))  # fmt: skip
                        c.execute("UPDATE accounts SET balance = balance - 7 WHERE id = %s", (src,))
                        c.execute("UPDATE accounts SET balance = balance + 7 WHERE id = %s", (dst,))
                        c.execute("INSERT INTO transfers VALUES (%s, %s, %s, 7)", (tid, src, dst))
                        c.commit()
                    except psycopg.errors.SerializationFailure:
                        c.rollback()
                        with lock:
                            retried.append(tid)
                        continue
                    with lock:
                        acked.append(tid)
        except psycopg.errors.SerializationFailure as e:
            with lock:
                errors.append(f"client {i}: 40001 outside COMMIT: {e}")
        except Exception as e:  # noqa: BLE001 - every client error is the finding
            with lock:
                errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    lp.pair.primary.kill()
    assert wait_for(lambda: lp.failover.failed_over, 10), lp.failover.timeline
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(retried) <= sum(lp.failover.transactions_rolled_back.values())
    transfers = {r[0] for r in lp.on_secondary("SELECT id FROM transfers")}
    assert not transfers & set(retried)
    assert set(acked) <= transfers
    notes = [r[0] for r in lp.on_secondary("SELECT note FROM ledger")]
    assert set(ledger) <= set(notes) and len(notes) == len(set(notes))
    assert lp.on_secondary("SELECT sum(balance) FROM accounts") == [(20000,)]
    # every account's balance is explained by the transfers on the survivor: nothing twice
    balances = dict(lp.on_secondary("SELECT id, balance FROM accounts"))
    expect = {i: 1000 for i in range(1, 21)}
    for src, dst, amount in lp.on_secondary("SELECT src, dst, amount FROM transfers"):
        expect[src] -= amount
        expect[dst] += amount
    assert balances == expect
    assert len(acked) > 20 and lp.failover.sessions_moved == 4


def test_terminated_backend_is_a_false_alarm_and_nothing_moves(live_pair):
    """pg_terminate_backend of one session's backend: connmgr freezes the primary's
    replies, probes, finds the primary alive, and lets everything through again. The
    victim gets the server's own 57P01. The other session was waiting for the victim's
    row lock, so its reply comes right when the victim dies -- usually during the freeze
    -- and arrives intact; it stays on the primary."""
    lp = live_pair
    victim = lp.connect(application_name="victim")
    victim.execute("UPDATE accounts SET balance = balance + 100 WHERE id = 7")
    other = lp.connect()
    t, box = update_behind_a_lock(other, lp.pair.primary,
                                  "UPDATE accounts SET balance = balance + 1 WHERE id = 7 RETURNING balance")
    with lp.pair.primary.connect(DB) as admin:
        assert admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                             " WHERE application_name = 'victim'").fetchone() == (1,)  # fmt: skip
    with pytest.raises(psycopg.errors.AdminShutdown) as err:
        victim.execute("SELECT 1")
    assert err.value.sqlstate == "57P01"
    t.join(10)
    assert box["row"] == (1001,)  # the victim's update rolled back
    other.commit()
    fo = lp.failover
    assert (fo.freezes, fo.false_alarms, fo.failed_over, fo.sessions_moved) == (1, 1, False, 0), fo.timeline
    assert fo.frozen is None and fo.replies_dropped == 0
    with lp.pair.primary.connect(DB) as c:
        assert c.execute("SELECT balance FROM accounts WHERE id = 7").fetchone() == (1001,)
    assert other.execute("SELECT 2").fetchone() == (2,)
    print("replies held during the freeze:", fo.replies_held)
    other.close()
    victim.close()


def _admin(lp) -> psycopg.Connection:
    return psycopg.connect(lp.primary.conninfo("postgres", "connmgr", PASSWORD), autocommit=True)


def test_switchover_moves_every_session_with_nothing_lost(live_pair, monkeypatch, capsys):
    """SWITCHOVER on the admin console: client input pauses at request boundaries, the
    sessions drain, a fence commit proves the secondary has everything, and every session
    moves -- an open transaction is replayed there and commits; a busy client just
    pauses. The old primary stays up and keeps none of connmgr's client sessions."""
    lp = live_pair
    idle = lp.connect(autocommit=True)
    vpid = idle.info.backend_pid
    in_block = lp.connect()
    in_block.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    in_block.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2")
    stop = threading.Event()
    acked: list[str] = []
    errors: list[str] = []

    def busy() -> None:
        try:
            with lp.connect(application_name="busy") as c:
                n = 0
                while not stop.is_set():
                    n += 1
                    c.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 3")
                    c.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 4")
                    c.execute("INSERT INTO transfers VALUES (%s, 3, 4, 1)", (f"busy-{n}",))
                    c.commit()
                    acked.append(f"busy-{n}")
        except Exception as e:  # noqa: BLE001 - any client error is the finding
            errors.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=busy)
    t.start()
    assert wait_for(lambda: len(acked) > 20, 10)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    capsys.readouterr()
    assert main(["switchover", f"{lp.primary.host}:{lp.primary.port}"]) == 0  # `connmgr switchover`
    events = capsys.readouterr().out
    assert "fence committed" in events and "sessions move" in events, events
    fo = lp.failover
    assert fo.failed_over and not fo.sessions_failed and not fo.transactions_rolled_back
    assert wait_for(lambda: fo.sessions_moved >= 3, 10), fo.timeline
    n_before = len(acked)
    assert wait_for(lambda: len(acked) > n_before + 20, 10)  # the busy client goes on, on the secondary
    stop.set()
    t.join(20)
    assert not errors, errors
    # the open transaction continues where it was and commits on the secondary
    assert in_block.execute("SELECT balance FROM accounts WHERE id IN (1, 2) ORDER BY id").fetchall() == [(990,), (1010,)]
    in_block.commit()
    assert lp.on_secondary("SELECT id, balance FROM accounts WHERE id <= 2 ORDER BY id") == [(1, 990), (2, 1010)]
    transfers = {r[0] for r in lp.on_secondary("SELECT id FROM transfers")}
    assert set(acked) <= transfers and len(transfers) == len(acked)
    assert lp.on_secondary("SELECT balance FROM accounts WHERE id IN (3, 4) ORDER BY id") == [
        (1000 - len(acked),), (1000 + len(acked),)]
    assert idle.execute("SELECT 1").fetchone() == (1,) and idle.info.backend_pid == vpid
    # the old primary is alive and has no client session of connmgr's any more
    with lp.pair.primary.connect(DB) as c:
        left = "SELECT application_name, state, query FROM pg_stat_activity WHERE datname = 'app'" \
               " AND pid <> pg_backend_pid() AND backend_type = 'client backend'" \
               " AND application_name NOT LIKE 'connmgr %'"  # the secondary connmgr's own jobs stay
        assert wait_for(lambda: c.execute(left).fetchall() == [], 5), c.execute(left).fetchall()
        # and nothing written there after the switchover
        assert c.execute("SELECT count(*) FROM transfers").fetchone()[0] < len(acked)
    for c in (idle, in_block):
        c.close()


def test_switchover_fence_waits_for_a_secondary_that_is_behind(live_pair, monkeypatch, capsys):
    """The fence does not trust the synchronous standby setting: with it off (as just
    after it changed, before the checkpointer has read it), a commit returns before the
    secondary applied it. The secondary's apply is held behind a lock; the switchover's
    fence must wait for it instead of stopping the subscription with the commit unapplied."""
    lp = live_pair
    with lp.pair.primary.connect(DB) as c:
        c.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
        c.execute("SELECT pg_reload_conf()")
        c.execute("CHECKPOINT")  # the checkpointer has read it: commits no longer wait
    locker = lp.pair.secondary.connect(DB, autocommit=False)
    locker.execute("LOCK TABLE transfers IN ACCESS EXCLUSIVE MODE")
    c = lp.connect(autocommit=True)
    c.execute("INSERT INTO transfers VALUES ('behind', 1, 2, 3)")  # acknowledged at once
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    capsys.readouterr()
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(main(["switchover", f"{lp.primary.host}:{lp.primary.port}"])))
    t.start()
    fo = lp.failover
    assert wait_for(lambda: any("waiting for the secondary" in what for _t, what in fo.timeline), 10), fo.timeline
    time.sleep(0.3)
    assert not fo.failed_over  # still fenced
    locker.rollback()
    t.join(30)
    assert rc == [0] and fo.failed_over, fo.timeline
    assert lp.on_secondary("SELECT id, amount FROM transfers") == [("behind", 3)]
    assert c.execute("SELECT count(*) FROM transfers").fetchone() == (1,)  # through connmgr, on the new primary
    locker.close()
    c.close()


def test_switchover_with_a_session_waiting_for_a_paused_sessions_lock(live_pair):
    """An autocommit UPDATE waits for a row lock of a transaction left open (paused at its
    boundary by the switchover): it could never drain. Its backend on the old primary is
    ended before the lock holder moves (so it commits nothing there), and it moves with
    its request in flight: on the secondary it waits for the replayed lock holder again,
    and completes when that commits. Nothing is applied twice, nothing lost, no error."""
    lp = live_pair
    holder = lp.connect()
    holder.execute("UPDATE accounts SET balance = balance - 100 WHERE id = 7")
    waiter = lp.connect(autocommit=True)
    t, box = update_behind_a_lock(waiter, lp.pair.primary, "UPDATE accounts SET balance = balance + 1 WHERE id = 7 RETURNING balance")
    with _admin(lp) as admin:
        events = [e for _ms, e in admin.execute("SWITCHOVER 5").fetchall()]
    assert any("waited for locks of paused sessions" in e for e in events), events
    fo = lp.failover
    assert fo.failed_over and fo.switchovers == 1
    assert "row" not in box and "error" not in box  # still waiting: now for the replayed lock holder
    holder.commit()
    t.join(10)
    assert box == {"row": (901,)}
    assert lp.on_secondary("SELECT balance FROM accounts WHERE id = 7") == [(901,)]
    with lp.pair.primary.connect(DB) as c:  # the old primary committed neither
        assert c.execute("SELECT balance FROM accounts WHERE id = 7").fetchone() == (1000,)
    assert not fo.sessions_failed and not fo.transactions_rolled_back
    holder.close()
    waiter.close()


def test_switchover_that_cannot_drain_is_abandoned(live_pair):
    """A request that does not finish within the drain time: the switchover is abandoned
    with 55000 and a reason, and every session goes on on the primary."""
    lp = live_pair
    slow = lp.connect(autocommit=True)
    other = lp.connect(autocommit=True)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", slow.execute("SELECT pg_sleep(1.5), 7").fetchone()))
    t.start()
    time.sleep(0.2)
    with _admin(lp) as admin:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
            admin.execute("SWITCHOVER 0.3")
        assert "still had requests in flight" in str(err.value)
        with pytest.raises(psycopg.errors.SyntaxError):
            admin.execute("SWITCHOVER soon")
    t.join(10)
    assert box["r"] == ("", 7)
    fo = lp.failover
    assert not fo.failed_over and fo.sessions_moved == 0 and not fo.switching
    assert other.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 9 RETURNING balance").fetchone() == (1001,)
    with lp.pair.primary.connect(DB) as c:
        assert c.execute("SELECT balance FROM accounts WHERE id = 9").fetchone() == (1001,)
    slow.close()
    other.close()




@pytest.mark.parametrize("how", ["kill", "switchover"])
def test_tls_sessions_move(how, pg_bindir, pg_base_dir, tmp_path, tls_files):
    """Clients on TLS are relayed by the trio pumps, not the engine: their sessions move
    too -- after a SIGKILL (at their backend's EOF) and in a switchover (paused input)."""
    tls = {"tls": {"mode": "require", "cert_file": tls_files[0], "key_file": tls_files[1]}}
    with live_pair_of(pg_bindir, pg_base_dir / f"failover-tls-{how}", tmp_path, primary_extra=tls,
                      failover_options={"failback": "manual"}) as lp:  # fmt: skip
        idle = lp.connect(autocommit=True, sslmode="require")
        assert idle.pgconn.ssl_in_use
        in_block = lp.connect(sslmode="require")
        in_block.execute("UPDATE accounts SET balance = balance - 3 WHERE id = 11")
        in_block.execute("UPDATE accounts SET balance = balance + 3 WHERE id = 12")
        if how == "kill":
            lp.pair.primary.kill()
            assert wait_for(lambda: lp.failover.failed_over, 10), lp.failover.timeline
        else:
            with _admin(lp) as admin:
                admin.execute("SWITCHOVER 5")
        assert in_block.execute("SELECT balance FROM accounts WHERE id IN (11, 12) ORDER BY id").fetchall() == [
            (997,), (1003,)]
        in_block.commit()
        assert idle.execute("SELECT sum(balance), count(*) FROM accounts").fetchone() == (20000, 20)
        assert lp.on_secondary("SELECT balance FROM accounts WHERE id IN (11, 12) ORDER BY id") == [(997,), (1003,)]
        fo = lp.failover
        assert fo.sessions_moved == 2 and not fo.sessions_failed and not fo.transactions_rolled_back
        idle.close()
        in_block.close()
