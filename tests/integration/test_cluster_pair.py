"""connmgr.embedded.cluster_pair: a primary/secondary pair of real clusters kept in sync logically."""

from __future__ import annotations

import threading
import time

import pytest

from connmgr.embedded.cluster_pair import ClusterPair, PairError

DB = "app"


@pytest.fixture(scope="module")
def pair(pg_bindir, pg_base_dir):
    """One synchronous pair for the module; torn down with no server or slot left."""
    p = ClusterPair.create(pg_base_dir / "pair", synchronous=True, databases=(DB,),
                           bindir=pg_bindir)  # fmt: skip
    try:
        p.sync_schema(DB, "CREATE TABLE items (id serial PRIMARY KEY, val text NOT NULL)")
        yield p
        p.drop_subscriptions()
        assert p.primary.psql("SELECT count(*) FROM pg_replication_slots") == "0"
        assert p.secondary.psql("SELECT count(*) FROM pg_subscription") == "0"
    finally:
        p.destroy()
    for cluster in (p.primary, p.secondary):
        assert not cluster.is_running()
        assert not cluster.datadir.exists()


def _insert(pair: ClusterPair, n: int, table: str = "items") -> None:
    with pair.primary.connect(DB) as conn:
        for i in range(n):
            conn.execute(f"INSERT INTO {table} (val) VALUES (%s)", [f"row {i}"])


def test_subscription_is_a_synchronous_standby(pair):
    status = pair.replication_status()
    assert [(r["application_name"], r["state"], r["sync_state"]) for r in status] == [
        ("connmgr_sub_app", "streaming", "sync")
    ]
    assert pair.primary.psql("SHOW synchronous_standby_names") == 'FIRST 1 ("connmgr_sub_app")'


def test_rows_replicate_and_digests_match(pair):
    _insert(pair, 50)
    with pair.primary.connect(DB) as conn:
        conn.execute("UPDATE items SET val = val || ' updated' WHERE id % 7 = 0")
        conn.execute("DELETE FROM items WHERE id % 11 = 0")
    pair.wait_caught_up()
    primary = pair.table_digest(pair.primary, DB, "items")
    assert primary == pair.table_digest(pair.secondary, DB, "public.items")
    assert pair.secondary.psql("SELECT count(*) FROM items", DB) == pair.primary.psql(
        "SELECT count(*) FROM items", DB
    )


def test_synchronous_commit_is_visible_on_secondary_at_once(pair):
    visible = 0
    with pair.primary.connect(DB) as p, pair.secondary.connect(DB) as s:
        for i in range(200):
            (key,) = p.execute("INSERT INTO items (val) VALUES (%s) RETURNING id",
                               [f"sync {i}"]).fetchone()  # fmt: skip
            # No waiting: the commit returned, so the subscriber must have applied it.
            if s.execute("SELECT 1 FROM items WHERE id = %s", [key]).fetchone():
                visible += 1
    assert visible == 200


def test_ddl_added_later_replicates(pair):
    pair.sync_schema(DB, "CREATE TABLE later (id bigserial PRIMARY KEY, val text);"
                         " CREATE INDEX later_val ON later (val)")  # fmt: skip
    _insert(pair, 30, "later")
    pair.wait_caught_up()
    assert pair.secondary.psql("SELECT count(*) FROM later", DB) == "30"
    assert pair.table_digest(pair.primary, DB, "later") == pair.table_digest(
        pair.secondary, DB, "later"
    )


def test_rows_written_before_the_refresh_are_copied(pair):
    # The table exists on both sides but is not subscribed yet: the apply worker skips
    # its changes, and the refresh's copy brings them.
    pair.secondary.psql("CREATE TABLE early (id int PRIMARY KEY)", DB)
    pair.primary.psql("CREATE TABLE early (id int PRIMARY KEY);"
                      " INSERT INTO early SELECT generate_series(1, 100)", DB)  # fmt: skip
    pair.sync_schema(DB, "SELECT 1")  # no DDL; just the refresh
    pair.wait_caught_up()
    assert pair.secondary.psql("SELECT count(*) FROM early", DB) == "100"


def test_sync_sequences_puts_secondary_ahead(pair):
    _insert(pair, 20)
    primary = pair.sequence_values(pair.primary, DB)
    before = pair.sequence_values(pair.secondary, DB)
    assert "public.items_id_seq" in primary
    # Not replicated: the secondary's sequences lag (rows arrived with explicit ids).
    assert (before["public.items_id_seq"] or 0) < primary["public.items_id_seq"]
    updates = pair.sync_sequences(DB, margin=1000)
    after = pair.sequence_values(pair.secondary, DB)
    for name, value in primary.items():
        if value is not None:
            assert after[name] >= value, name
            assert after[name] == value + 1000 and updates[name] == value + 1000
    # Idempotent while the primary stands still; never moves backwards.
    assert pair.sync_sequences(DB, margin=1000) == {}
    assert pair.sync_sequences(DB, margin=10) == {}
    # A key handed out by the secondary after a switch does not collide.
    (next_key,) = pair.secondary.psql("SELECT nextval('items_id_seq')", DB).split()
    assert int(next_key) > primary["public.items_id_seq"]
    assert pair.primary.psql(f"SELECT count(*) FROM items WHERE id = {next_key}", DB) == "0"


def test_unknown_database_is_refused(pair):
    with pytest.raises(PairError, match="not replicated"):
        pair.sync_sequences("nope")


def test_commit_hangs_while_secondary_is_down(pair):
    """Synchronous mode: with the secondary dead, a write commit on the primary waits
    (no timeout); it completes once the secondary is back and has applied it."""
    result: dict[str, object] = {}

    def commit() -> None:
        try:
            with pair.primary.connect(DB) as conn:
                conn.execute("INSERT INTO items (val) VALUES ('while down')")
            result["done"] = time.monotonic()
        except BaseException as e:  # pragma: no cover - reported below
            result["error"] = e

    pair.secondary.kill()
    t = threading.Thread(target=commit, daemon=True)
    try:
        t.start()
        t.join(1.0)
        assert t.is_alive(), f"commit returned while the secondary was down: {result}"
        # The primary itself is fine: reads go on, and the commit sits in SyncRep.
        waiting = pair.primary.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'", DB
        )
        assert waiting == "1"
        restarted = time.monotonic()
        pair.secondary.start()
        t.join(10.0)
        assert not t.is_alive(), "commit still waiting 10 s after the secondary restarted"
        assert "error" not in result, result
        print(f"commit released {result['done'] - restarted:.2f}s after secondary start")
        assert pair.secondary.psql("SELECT count(*) FROM items WHERE val = 'while down'",
                                   DB) == "1"  # fmt: skip
        pair.wait_sync()
    finally:
        if t.is_alive():  # release the waiter so the run can end
            pair.set_synchronous(False)
            t.join(5)
            pair.secondary.start()
            pair.set_synchronous(True)
