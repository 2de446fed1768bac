"""The synchronous guarantee as a user can break it (issue 12): every commit acknowledged
through the pair is already applied on the secondary at the moment its client hears of
it, whatever the client does first -- create a table and write to it at once, turn
``synchronous_commit`` off -- and a kill right then loses nothing. Assertions are on rows
read directly on the secondary, and on where a commit waits (``SyncRep``)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from connmgr_fixtures import DB, PASSWORD, live_pair_of, wait_for


@pytest.fixture
def live_pair(pg_bindir, pg_base_dir, tmp_path, request):
    with live_pair_of(pg_bindir, pg_base_dir / f"guarantee-{request.node.name[:40]}", tmp_path,
                      failover_options={"failback": "manual"}) as lp:  # fmt: skip
        yield lp


@pytest.mark.parametrize("how", ["autocommit", "block"])
def test_a_new_table_is_applied_on_the_secondary_from_its_first_commit(live_pair, how):
    """Before the fence, a new table joined the subscription ~1 s after its CREATE, and
    commits in between were confirmed by the standby without being applied: the rows read
    on the secondary right after the acknowledgement were missing."""
    with live_pair.connect(autocommit=True) as c:
        for i in range(4):
            table = f"fresh_{how}_{i}"
            if how == "autocommit":
                c.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, v int NOT NULL)")
            else:
                with c.transaction():
                    c.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, v int NOT NULL)")
                    c.execute(f"CREATE INDEX ON {table} (v)")
            c.execute(f"INSERT INTO {table} (v) SELECT g FROM generate_series(1, 40) g")
            c.execute(f"UPDATE {table} SET v = -v WHERE v = 7")
            expected = c.execute(f"SELECT count(*), sum(v) FROM {table}").fetchone()
            # read on the secondary at once: a synchronous standby's confirmation means applied
            assert live_pair.on_secondary(f"SELECT count(*), sum(v) FROM {table}") == [expected], table
            state = live_pair.on_secondary(
                f"SELECT srsubstate FROM pg_subscription_rel WHERE srrelid = '{table}'::regclass")
            assert state == [("r",)], table
    assert live_pair.secondary.app.imports.ddl.fenced >= 4


BORN_FULL = {
    "block": ["CREATE TABLE {t} (id int PRIMARY KEY)", "INSERT INTO {t} SELECT generate_series(1, 10)"],
    "create as": ["CREATE TABLE {t} AS SELECT g AS id FROM generate_series(1, 10) g"],
    "autocommit create as": ["CREATE TABLE {t} AS SELECT g AS id FROM generate_series(1, 10) g"],
    "autocommit select into": ["SELECT g AS id INTO {t} FROM generate_series(1, 10) g"],
    "select into": ["SELECT g AS id INTO TABLE {t} FROM generate_series(1, 10) g"],
    "create as, then a key": ["CREATE TABLE {t} AS SELECT g AS id FROM generate_series(1, 10) g",
                              "ALTER TABLE {t} ADD PRIMARY KEY (id)"],
    "rows written and deleted": ["CREATE TABLE {t} (id int PRIMARY KEY)", "INSERT INTO {t} SELECT generate_series(1, 30)",
                                 "DELETE FROM {t} WHERE id > 10"],
    "a column dropped": ["CREATE TABLE {t} (gone text, id int PRIMARY KEY)", "ALTER TABLE {t} DROP COLUMN gone",
                         "INSERT INTO {t} SELECT generate_series(1, 10)"],
}  # fmt: skip


@pytest.mark.parametrize("how", list(BORN_FULL))
def test_a_table_written_in_its_creating_transaction_is_applied_at_once(live_pair, how):
    """The rows of the creating transaction were copied by a table synchronization worker
    about a second later, and the commits in between were confirmed without being applied.
    Now the guard carries them: the secondary has them before the commit returns, and the
    next commit's row with them."""
    with live_pair.connect(autocommit=True) as c:
        for i in range(3):
            table = f"born_full_{i}"
            if how.startswith("autocommit"):
                c.execute(BORN_FULL[how][0].format(t=table))
            else:
                with c.transaction():
                    for statement in BORN_FULL[how]:
                        c.execute(statement.format(t=table))
            assert live_pair.on_secondary(f"SELECT count(*), sum(id) FROM {table}") == [(10, 55)], table
            c.execute(f"INSERT INTO {table} VALUES (11)")
            assert live_pair.on_secondary(f"SELECT count(*), sum(id) FROM {table}") == [(11, 66)], table
            assert live_pair.on_secondary(
                f"SELECT srsubstate FROM pg_subscription_rel WHERE srrelid = '{table}'::regclass") == [("r",)]
    ddl = live_pair.secondary.app.imports.ddl
    assert (ddl.fenced, ddl.rows_filled, ddl.errors) == (3, 30, 0)


def test_the_rows_of_a_creating_transaction_arrive_exactly(live_pair):
    """Every kind of value, as the primary has it: the text of each row on both sides is
    the same (identity ALWAYS and generated columns included; user triggers do not fire on
    the secondary, as they do not for the apply worker)."""
    with live_pair.connect(autocommit=True) as c, c.transaction():
        c.execute("CREATE TABLE exact (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                  " n numeric, f float8, r real, b bytea, t text, j jsonb, a int[], ts timestamptz,"
                  " iv interval, u uuid, bo boolean, p point, twice int GENERATED ALWAYS AS (id * 2) STORED)")
        c.execute("CREATE FUNCTION exact_touch() RETURNS trigger LANGUAGE plpgsql AS"
                  " $$ BEGIN NEW.t := 'touched'; RETURN NEW; END $$")
        c.execute("CREATE TRIGGER exact_touch BEFORE INSERT ON exact FOR EACH ROW WHEN (NEW.t IS NULL)"
                  " EXECUTE FUNCTION exact_touch()")
        c.execute("INSERT INTO exact (n, f, r, b, t, j, a, ts, iv, u, bo, p) VALUES"
                  " (12345678901234567890.123456789, 0.1, 1.5, '\\x00ff'::bytea, 'it''s \\ \"q\"',"
                  "  '{\"k\": [1, 2.50, null]}', '{1,NULL,3}', '2026-12-03 08:00:00.123456+00', '1 day 02:00',"
                  "  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, '(1.5,2)'),"
                  " (-0.000001, 'NaN', '-Infinity', '', NULL, 'null', '{}', 'infinity', '-3 mons', NULL, NULL, NULL),"
                  " (NULL, 1e308, NULL, NULL, E'line\\nbreak \u00e9', '[]', NULL, NULL, NULL, NULL, false, NULL)")
    query = "SELECT string_agg(e::text, '|' ORDER BY id) FROM exact e"
    with live_pair.connect(autocommit=True) as c:
        on_primary = c.execute(query).fetchone()
    assert "touched" in on_primary[0]
    assert live_pair.on_secondary(query) == [on_primary]


def test_a_creating_transaction_whose_ddl_needs_a_lock_it_holds_on_the_secondary(live_pair):
    """The apply worker waits in the guard holding the locks of the rows the transaction
    wrote before; DDL of the same transaction that needs one of them (a REFERENCES, a
    CREATE INDEX on that table) waited for it until the guard gave up after 10 s. Now the
    worker in the guard is cancelled and applies the transaction again after the DDL."""
    with live_pair.connect(autocommit=True) as c:
        c.execute("CREATE TABLE parent (id int PRIMARY KEY)")
        with c.transaction():
            c.execute("INSERT INTO parent VALUES (1), (2)")
            c.execute("CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES parent)")
            c.execute("INSERT INTO child VALUES (10, 1)")
        with c.transaction():
            c.execute("INSERT INTO parent VALUES (3)")
            c.execute("CREATE TABLE other (id int)")
            c.execute("CREATE INDEX parent_plus_one ON parent ((id + 1))")
        assert live_pair.on_secondary("SELECT array_agg(id ORDER BY id) FROM parent") == [([1, 2, 3],)]
        assert live_pair.on_secondary("SELECT p FROM child") == [(1,)]
        assert live_pair.on_secondary("SELECT count(*) FROM pg_indexes WHERE indexname = 'parent_plus_one'") == [(1,)]
        c.execute("INSERT INTO child VALUES (11, 3)")
        assert live_pair.on_secondary("SELECT count(*) FROM child") == [(2,)]
    ddl = live_pair.secondary.app.imports.ddl
    assert ddl.guard_cancels >= 1 and ddl.errors == 0 and ddl.fenced == 3


def test_a_creating_transaction_over_the_rows_cap_is_copied(live_pair):
    """Above ``connmgr.guard_rows_max_bytes`` the rows do not go with the guard: the table
    is copied as before (slower to become safe, never wrong)."""
    with live_pair.connect(autocommit=True) as c:
        with c.transaction():
            c.execute("SET LOCAL connmgr.guard_rows_max_bytes = 100")
            c.execute("CREATE TABLE capped AS SELECT g AS id FROM generate_series(1, 50) g")
        assert wait_for(lambda: live_pair.on_secondary("SELECT count(*) FROM capped") == [(50,)], 20)
    assert live_pair.secondary.app.imports.ddl.rows_filled == 0


def test_kill_right_after_a_new_table_is_written_loses_nothing(live_pair):
    """SIGKILL of the primary within milliseconds of a CREATE TABLE and its first writes:
    every acknowledged row is on the survivor."""
    acked: list[int] = []
    stop = threading.Event()
    w = live_pair.connect(autocommit=True)  # connected before: the kill comes right after the first rows

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            try:
                w.execute("INSERT INTO hot VALUES (%s)", (n,))
            except psycopg.Error:
                return
            acked.append(n)

    with live_pair.connect(autocommit=True) as c:
        c.execute("CREATE TABLE hot (id int PRIMARY KEY)")
    t = threading.Thread(target=writer)
    t.start()
    assert wait_for(lambda: len(acked) >= 1, 10), "the writer acknowledged nothing"
    time.sleep(0.005)
    live_pair.pair.primary.kill()
    assert wait_for(lambda: live_pair.failover.failed_over, 20)
    time.sleep(0.2)
    stop.set()
    t.join(30)
    w.close()
    present = {r[0] for r in live_pair.on_secondary("SELECT id FROM hot")}
    missing = [n for n in acked if n not in present]
    assert not missing, f"{len(missing)} acknowledged rows missing on the survivor, first {missing[:5]}"


WEAKENINGS = {
    "startup options": ({"options": "-c synchronous_commit=off"}, []),
    "SET": ({}, ["SET synchronous_commit = off"]),
    "SET LOCAL in the block": ({}, ["BEGIN", "SET LOCAL synchronous_commit = local"]),
    "set_config()": ({}, ["SELECT set_config('synchronous_commit', 'off', false)"]),
    "ALTER ROLE ... SET": ({}, []),
    "ALTER DATABASE ... SET": ({}, []),
}


@pytest.mark.parametrize("how", list(WEAKENINGS))
def test_a_client_cannot_turn_synchronous_commit_off(live_pair, how):
    """Every way a client or a role can weaken synchronous_commit: the commit still waits
    for the secondary (its apply worker is held behind a lock: the commit must show
    ``SyncRep`` and not return), and the row is there once the lock goes."""
    lp = live_pair
    conn_kw, statements = WEAKENINGS[how]
    with lp.pair.primary.connect(DB) as admin:
        if how == "ALTER ROLE ... SET":
            admin.execute("ALTER ROLE postgres SET synchronous_commit = off")
        if how == "ALTER DATABASE ... SET":
            admin.execute(f"ALTER DATABASE {DB} SET synchronous_commit = off")
    conninfo = lp.primary.conninfo("postgres", DB, "postgres", **conn_kw)
    c = psycopg.connect(conninfo, autocommit=True)
    for sql in statements:
        c.execute(sql)
    weakened = c.execute("SHOW synchronous_commit").fetchone()[0]
    locker = lp.pair.secondary.connect(DB, autocommit=False)
    locker.execute("LOCK TABLE transfers IN ACCESS EXCLUSIVE MODE")  # the apply worker waits
    done = threading.Event()

    def write():
        c.execute("INSERT INTO transfers VALUES ('weak', 1, 2, 3)")
        if statements and statements[0] == "BEGIN":
            c.execute("COMMIT")
        done.set()

    t = threading.Thread(target=write)
    t.start()
    try:
        with lp.pair.primary.connect(DB) as watch:
            wait_for(lambda: watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchone() == (1,), 5,
                what=f"{how}: the commit to wait for the secondary (synchronous_commit was {weakened!r})")
        assert not done.is_set(), f"{how}: the commit returned while the secondary held it"
    finally:
        locker.rollback()
        locker.close()
        t.join(20)
    assert done.is_set()
    assert lp.on_secondary("SELECT src, dst, amount FROM transfers WHERE id = 'weak'") == [(1, 2, 3)]
    c.close()


def test_no_key_collides_after_a_kill_under_heavy_serial_inserts(pg_bindir, pg_base_dir, tmp_path):
    """8 clients insert into a bigserial and an identity table as fast as they can; the
    primary is killed. The secondary connmgr's catch-up rounds are off here, so only the
    point of failure can put the survivor's sequences past the keys the dead primary
    handed out: no insert after the move may fail with 23505."""
    from connmgr.embedded.harness import running_pair

    with running_pair(pg_base_dir / "guarantee-serial", database=DB, password="postgres", poster_slot="serial_poster",
                      bindir=pg_bindir, users_dir=tmp_path, sequence_interval=0, failover=True,
                      failover_options={"failback": "manual"}) as (pair, primary, _secondary):  # fmt: skip
        pair.sync_schema(DB, "CREATE TABLE s_big (id bigserial PRIMARY KEY, who int);"
                             "CREATE TABLE s_ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, who int)")  # fmt: skip
        pair.wait_caught_up()
        errors: list[str] = []
        after: list[int] = []
        stop = threading.Event()

        def client(who: int):
            with psycopg.connect(primary.conninfo("postgres", DB, "postgres"), autocommit=True) as c:
                while not stop.is_set():
                    try:
                        c.execute("INSERT INTO s_big (who) VALUES (%s)", (who,))
                        c.execute("INSERT INTO s_ident (who) VALUES (%s)", (who,))
                    except psycopg.Error as e:
                        errors.append(e.sqlstate or str(e))
                        if e.sqlstate != "23505":
                            return
                    if primary.app.failover.failed_over:
                        after.append(who)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        pair.primary.kill()
        assert wait_for(lambda: primary.app.failover.failed_over, 20)
        assert wait_for(lambda: len(after) >= 400, 20), f"only {len(after)} inserts after the move"
        stop.set()
        for t in threads:
            t.join(20)
        assert errors == [], f"{len(errors)} errors after the kill: {sorted(set(errors))}"
        with pair.secondary.connect(DB) as c:
            assert c.execute("SELECT count(*) - count(DISTINCT id) FROM s_big").fetchone() == (0,)


def test_a_commit_stuck_in_syncrep_is_logged_with_its_likely_cause(live_pair, caplog):
    """The secondary's apply worker is held behind a lock: a write through the pair hangs in
    SyncRep. connmgr logs one WARNING naming the likely cause and counts the episode."""
    lp = live_pair
    watch = lp.primary.app.syncrep
    watch.interval, watch.after = 0.05, 0.5
    locker = lp.pair.secondary.connect(DB, autocommit=False)
    locker.execute("LOCK TABLE transfers IN ACCESS EXCLUSIVE MODE")
    c = lp.connect(autocommit=True)
    t = threading.Thread(target=lambda: c.execute("INSERT INTO transfers VALUES ('stuck', 1, 2, 3)"))
    with caplog.at_level("WARNING", logger="connmgr.syncrep"):
        t.start()
        try:
            assert wait_for(lambda: watch.episodes == 1, 10)
        finally:
            locker.rollback()
            locker.close()
            t.join(20)
    warned = [r.getMessage() for r in caplog.records if r.name == "connmgr.syncrep"]
    assert len(warned) == 1 and "apply worker does not apply" in warned[0], warned
    assert wait_for(lambda: watch.waiting == 0, 5)
    c.close()


def test_a_client_logging_in_while_the_primary_dies_lands_on_the_new_primary(live_pair):
    """A login that reaches the primary right after its death (before anything else has
    noticed) is not an error: it waits for the move and logs in on the secondary."""
    lp = live_pair
    lp.pair.primary.kill()
    with lp.connect(autocommit=True) as c:  # at once: the failover has not been decided yet
        assert c.execute("SELECT count(*) FROM accounts").fetchone() == (20,)
        c.execute("INSERT INTO transfers VALUES ('after-login', 1, 2, 3)")
    assert lp.failover.failed_over
    assert lp.on_secondary("SELECT amount FROM transfers WHERE id = 'after-login'") == [(3,)]


def test_pair_check_on_the_admin_console(live_pair):
    """PAIR CHECK answers with the findings of ``connmgr pair check`` for the pair as it
    is now (every database the secondary subscribes in); a broken setting is a fail row."""
    admin_dsn = live_pair.primary.conninfo("postgres", "connmgr", PASSWORD)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        rows = admin.execute("PAIR CHECK").fetchall()
        assert [r[:2] for r in rows if r[0] != "ok"] == [], rows
        assert rows[-1][1] == "every check passed"
        with live_pair.pair.secondary.connect(DB) as c:
            c.execute("ALTER SUBSCRIPTION connmgr_sub_app SET (synchronous_commit = off)")
        rows = admin.execute("pair check;").fetchall()
        assert ("fail", "app: subscription connmgr_sub_app has synchronous_commit = off") in [r[:2] for r in rows]
