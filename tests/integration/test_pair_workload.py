"""The pair under a mixed workload, end to end: DDL sent through the primary connmgr is
replayed on the secondary at its point in the stream, rows follow by logical replication,
sequences are kept ahead, and afterwards both databases hold the same data."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from connmgr_fixtures import wait_for

from connmgr.embedded.harness import running_pair

DB = "app"
PASSWORD = "postgres"


@pytest.fixture(scope="module")
def live_pair(pg_bindir, pg_base_dir, tmp_path_factory):
    """(ClusterPair, primary connmgr, secondary connmgr): the whole pair, as the demo runs it."""
    with running_pair(pg_base_dir / "workload", database=DB, password=PASSWORD, poster_slot="workload_poster",
                      bindir=pg_bindir, users_dir=tmp_path_factory.mktemp("users"), sequence_interval=0.1) as live:
        yield live


def tables(cluster, db=DB) -> list[str]:
    out = cluster.psql(
        "SELECT string_agg(schemaname || '.' || tablename, ' ' ORDER BY tablename) FROM pg_tables"
        " WHERE schemaname = 'public'", db,
    )
    return out.split() if out else []


def test_mixed_workload_leaves_identical_databases(live_pair):
    pair, primary, secondary = live_pair
    dsn = primary.conninfo("postgres", DB, PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # DDL through connmgr: autocommit, in a block together with rows, and later changes
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL)")
        conn.execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, acct int, amount int, note text)")
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE tagged (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tag text)")
        conn.execute("INSERT INTO tagged (tag) SELECT 'early ' || g FROM generate_series(1, 20) g")
        conn.execute("COMMIT")
        conn.execute("CREATE SEQUENCE ticket_seq INCREMENT 5")
        conn.execute("INSERT INTO acct SELECT g, 1000 FROM generate_series(1, 50) g")

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with psycopg.connect(dsn) as c:
                for n in range(60):
                    a, b = (i * 7 + n) % 50 + 1, (i * 13 + n * 3) % 50 + 1
                    with c.transaction():  # a transfer: extended protocol, explicit block
                        # rows locked in id order, so concurrent transfers cannot deadlock
                        for acct, delta in sorted([(a, -n), (b, n)]):
                            c.execute("UPDATE acct SET balance = balance + %s WHERE id = %s", (delta, acct))
                        c.execute("INSERT INTO ledger (acct, amount, note) VALUES (%s, %s, 'transfer')", (a, n))
                    c.commit()
                    c.autocommit = True  # an autocommit write and a sequence draw
                    c.execute("INSERT INTO tagged (tag) VALUES (%s)", (f"w{i}-{n}",))
                    c.execute("SELECT nextval('ticket_seq')")
                    c.autocommit = False
                with c.cursor().copy("COPY ledger (acct, amount, note) FROM STDIN") as copy:
                    for n in range(100):
                        copy.write_row((i + 1, n, f"copied {n}"))
                c.commit()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    with psycopg.connect(dsn, autocommit=True) as conn:  # DDL while the workload runs
        time.sleep(0.2)
        conn.execute("ALTER TABLE ledger ADD COLUMN checked boolean NOT NULL DEFAULT false")
        conn.execute("CREATE INDEX ledger_acct ON ledger (acct)")
    for t in threads:
        t.join(120)
    assert not errors, errors
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE ledger SET checked = true WHERE id % 3 = 0")
        conn.execute("DELETE FROM tagged WHERE id % 10 = 0")
        assert conn.execute("SELECT sum(balance) FROM acct").fetchone()[0] == 50 * 1000

    pair.wait_caught_up(30)
    assert tables(pair.secondary) == tables(pair.primary) == ["public.acct", "public.ledger", "public.tagged"]
    for table in tables(pair.primary):
        assert wait_for(
            lambda t=table: pair.table_digest(pair.primary, DB, t) == pair.table_digest(pair.secondary, DB, t), 15
        ), f"{table} differs between primary and secondary"
    assert pair.secondary.psql("SELECT indexname FROM pg_indexes WHERE indexname = 'ledger_acct'", DB) == "ledger_acct"
    ddl = secondary.app.imports.ddl
    assert ddl.errors == 0 and ddl.applied == 6

    # every sequence on the secondary is at least the primary's (serial, identity, plain)
    def sequences_ahead() -> bool:
        prim = pair.sequence_values(pair.primary, DB)
        sec = pair.sequence_values(pair.secondary, DB)
        return set(prim) == set(sec) and all(sec[k] is not None and sec[k] >= (prim[k] or 0) for k in prim)

    assert wait_for(sequences_ahead, 10), (pair.sequence_values(pair.primary, DB), pair.sequence_values(pair.secondary, DB))
    # and the import queue holds nothing: every transaction settled
    assert wait_for(lambda: secondary.app.imports.queue.transactions == 0, 10)
