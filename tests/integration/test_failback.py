"""Fail-back end to end: after a move, the old primary becomes the secondary of the new one
(connmgr/failover/reseed.py), the pair is whole again turned around, and a second failure moves the
sessions back. Assertions are on the data each side holds, on the replication state the
re-seed leaves (subscriptions, synchronous standbys, slots), on what the clients received,
and on the counters."""

from __future__ import annotations

import psycopg
import pytest
from connmgr_fixtures import DB, PASSWORD, live_pair_of, wait_for

from connmgr import config as config_mod
from connmgr.errors import ConfigError
from connmgr.failover.reseed import conninfo
from connmgr.ops.cli import main

SUB = "connmgr_sub_app"  # the pair's subscription: it keeps its name on either side


def rows(cluster, sql: str):
    with cluster.connect(DB) as c:
        return c.execute(sql).fetchall()


def setting(cluster, name: str) -> str:
    return rows(cluster, f"SELECT current_setting('{name}')")[0][0]


def sync_standbys(cluster) -> list:
    return rows(cluster, "SELECT application_name, sync_state FROM pg_stat_replication"
                         " WHERE application_name LIKE 'connmgr_sub%' ORDER BY 1")  # fmt: skip


def subscriptions(cluster) -> list:
    return rows(cluster, "SELECT subname, subenabled FROM pg_subscription ORDER BY 1")


def digest(cluster, table: str) -> str:
    return rows(cluster, f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t")[0][0]


def test_conninfo_quotes_what_libpq_needs():
    text = conninfo("db.example", 5433, "o'brien", "pa ss\\'word", "app")
    assert text == "host='db.example' port='5433' user='o\\'brien' dbname='app' password='pa ss\\\\\\'word'"
    assert "password" not in conninfo("h", 1, "u", "", "d")
    parsed = psycopg.conninfo.conninfo_to_dict(text)  # libpq's own parser reads it back
    assert (parsed["user"], parsed["password"]) == ("o'brien", "pa ss\\'word")


@pytest.mark.parametrize("values, error", [
    ({"failback": "later"}, "failback: must be one of stay, return, manual, got 'later'"),
    ({"reseed_interval": 0}, "reseed_interval: must be > 0"),
    ({"reseed_timeout": 0}, "reseed_timeout: must be > 0"),
])
def test_failback_config_errors(values, error):
    with pytest.raises(ConfigError, match=error):
        config_mod.load(None, failover=values)


@pytest.fixture
def pair_of(pg_bindir, pg_base_dir, tmp_path, request):
    def make(**failover_options):
        return live_pair_of(pg_bindir, pg_base_dir / f"failback-{request.node.name[:40]}", tmp_path,
                            failover_options={"reseed_interval": 0.2, **failover_options})  # fmt: skip
    return make


def test_switchover_reseeds_without_copy_and_a_kill_moves_sessions_back(pair_of):
    """failback = stay. After a switchover the old primary is re-seeded on its own, with
    no copy (the slot was made at the point of failure). The pair is whole, turned
    around: every commit is on the old primary as it returns, the secondary connmgr
    reads its poster queue from the new primary. Then the new primary is killed with a
    transaction open: the session moves back to the old primary and commits there."""
    with pair_of(failback="stay") as lp:
        p, s = lp.pair.primary, lp.pair.secondary
        sync_before = setting(p, "synchronous_standby_names")
        assert SUB in sync_before
        idle = lp.connect(autocommit=True)
        in_block = lp.connect()
        in_block.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
        with psycopg.connect(lp.primary.conninfo("postgres", "connmgr", PASSWORD), autocommit=True) as admin:
            admin.execute("SWITCHOVER")
        fo = lp.failover
        assert fo.failed_over and fo.previous is not None
        assert wait_for(lambda: fo.reseeds == 1, 30), fo.timeline
        assert fo.reseed_copies == 0 and not fo.failed_over and fo.previous is None
        assert fo.server.port == p.port and lp.primary.app.server.port == s.port
        # the subscription changed sides, synchronous_standby_names with it
        assert subscriptions(s) == [] and subscriptions(p) == [(SUB, True)]
        assert setting(s, "synchronous_standby_names") == sync_before
        assert setting(p, "synchronous_standby_names") == ""
        assert sync_standbys(s) == [(SUB, "sync")] and sync_standbys(p) == []
        assert not rows(p, f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{SUB}'")  # the old slot went
        # commits through connmgr are on the old primary when they return: synchronous
        in_block.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 2")
        in_block.commit()
        for i in range(20):
            idle.execute("INSERT INTO ledger (note) VALUES (%s)", (f"after-{i}",))
            assert rows(p, f"SELECT count(*) FROM ledger WHERE note = 'after-{i}'") == [(1,)]
        assert rows(p, "SELECT id, balance FROM accounts WHERE id <= 2 ORDER BY id") == [(1, 990), (2, 1010)]
        # the secondary connmgr turned too: poster queue on the new primary, sequences ahead on the old
        sec = lp.secondary.app.secondary
        wait_for(lambda: sec.topology_changes == 1 and sec.imports.poster_connected, 30,
                 what="the secondary connmgr's poster queue to turn to the new primary")
        assert sec.poster_address == (s.host, s.port) and sec.replica_server.port == p.port
        (ahead,) = rows(p, "SELECT last_value FROM ledger_id_seq")[0]
        (used,) = rows(s, "SELECT max(id) FROM ledger")[0]
        wait_for(lambda: rows(p, "SELECT last_value FROM ledger_id_seq")[0][0] > used, 30,
                 what=f"the old primary's sequence past {used} (it was {ahead})")
        # a new session is mirrored and marked again: its commit leaves the import queue
        # once the poster queue (now read on the new primary) shows its marker
        fresh = lp.connect(autocommit=True)
        fresh.execute("INSERT INTO ledger (note) VALUES ('fresh')")
        wait_for(lambda: sec.imports.purged > 0, 30, what="the fresh session's commit to be purged by its marker")

        # the second failure: the new primary dies with a transaction open
        in_block.execute("UPDATE accounts SET balance = balance - 7 WHERE id = 3")
        s.kill()
        assert wait_for(lambda: fo.failed_over, 10), fo.timeline
        in_block.execute("UPDATE accounts SET balance = balance + 7 WHERE id = 4")
        in_block.commit()
        assert idle.execute("SELECT count(*), sum(balance) FROM accounts").fetchone() == (20, 20000)
        assert fresh.execute("SELECT count(*) FROM ledger").fetchone() == (21,)
        assert rows(p, "SELECT id, balance FROM accounts WHERE id <= 4 ORDER BY id") == [
            (1, 990), (2, 1010), (3, 993), (4, 1007)]
        assert not fo.sessions_failed and not fo.transactions_rolled_back
        assert lp.primary.app.server.port == p.port
        for c in (idle, in_block, fresh):
            c.close()


def test_crash_then_manual_reseed_copies_and_discards_what_the_old_primary_alone_has(pair_of, monkeypatch, capsys):
    """failback = manual. After a crash the old primary comes back with a commit the new
    primary never had. `connmgr reseed` empties its replicated tables and copies them
    afresh: the stray commit is gone, both sides are equal; `connmgr switchover` then
    takes the sessions home."""
    with pair_of(failback="manual") as lp:
        p, s = lp.pair.primary, lp.pair.secondary
        c = lp.connect()
        c.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
        p.kill()
        fo = lp.failover
        assert wait_for(lambda: fo.failed_over, 10), fo.timeline
        c.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 2")
        c.commit()
        p.start()
        with p.connect(DB) as direct:  # a commit only the old primary has (not through connmgr)
            direct.execute("SET synchronous_commit = local")
            direct.execute("INSERT INTO ledger (note) VALUES ('stray')")
            direct.commit()
        assert fo.reseeds == 0 and fo.previous is not None  # manual: nothing happens on its own
        monkeypatch.setenv("PGPASSWORD", PASSWORD)
        capsys.readouterr()
        assert main(["reseed", f"{lp.primary.host}:{lp.primary.port}"]) == 0
        out = capsys.readouterr().out
        assert "emptying" in out and "the pair is whole again" in out, out
        assert fo.reseeds == 1 and fo.reseed_copies == 1
        assert rows(p, "SELECT count(*) FROM ledger WHERE note = 'stray'") == [(0,)]
        for table in ("accounts", "ledger", "transfers", "connmgr.markers"):
            assert digest(p, table) == digest(s, table), table
        assert sync_standbys(s) == [(SUB, "sync")]
        # a second RESEED has nothing to do
        assert main(["reseed", f"{lp.primary.host}:{lp.primary.port}"]) == 1
        assert "55000" in capsys.readouterr().err
        # and home again by a planned switchover
        c.execute("UPDATE accounts SET balance = balance - 5 WHERE id = 5")
        assert main(["switchover", f"{lp.primary.host}:{lp.primary.port}"]) == 0
        c.execute("UPDATE accounts SET balance = balance + 5 WHERE id = 6")
        c.commit()
        assert lp.primary.app.server.port == p.port
        assert rows(p, "SELECT id, balance FROM accounts WHERE id IN (1, 2, 5, 6) ORDER BY id") == [
            (1, 999), (2, 1001), (5, 995), (6, 1005)]
        assert not fo.sessions_failed and not fo.transactions_rolled_back
        c.close()


def test_failback_return_brings_the_sessions_home_after_a_crash(pair_of):
    """failback = return. The primary is killed; the sessions move; it is restarted. On its
    own connmgr re-seeds it (copy), switches over back to it, and re-seeds the other one
    (no copy): the pair is as it began, with everything committed on both sides."""
    with pair_of(failback="return") as lp:
        p, s = lp.pair.primary, lp.pair.secondary
        sync_before = setting(p, "synchronous_standby_names")
        c = lp.connect(autocommit=True)
        for i in range(10):
            c.execute("INSERT INTO ledger (note) VALUES (%s)", (f"before-{i}",))
        p.kill()
        fo = lp.failover
        for i in range(10):  # the first one waits for the move
            c.execute("INSERT INTO ledger (note) VALUES (%s)", (f"during-{i}",))
        assert fo.sessions_moved == 1 and lp.primary.app.server.port == s.port
        p.start()
        assert wait_for(lambda: fo.reseeds == 2 and lp.primary.app.server.port == p.port, 60), fo.timeline
        assert fo.reseed_copies == 1 and fo.switchovers == 1 and not fo.failed_over
        for i in range(10):
            c.execute("INSERT INTO ledger (note) VALUES (%s)", (f"after-{i}",))
        assert rows(p, "SELECT count(*) FROM ledger") == [(30,)]
        assert wait_for(lambda: digest(p, "ledger") == digest(s, "ledger"), 5)
        assert subscriptions(p) == [] and subscriptions(s) == [(SUB, True)]
        assert setting(p, "synchronous_standby_names") == sync_before
        assert sync_standbys(p) == [(SUB, "sync")]
        assert not fo.sessions_failed and not fo.transactions_rolled_back
        c.close()
