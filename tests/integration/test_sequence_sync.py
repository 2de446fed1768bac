"""connmgr.sequence_sync: the secondary's sequences kept ahead of the primary's, on a real
logically replicated pair (and the pure planning step on its own).

The pair is shared by the module; every test makes its own schema, so a round (which
covers the whole database) may also touch sequences of earlier tests: counts are checked
against what changed on the server, over all sequences. psycopg calls block, so they run
in a thread.
"""

from __future__ import annotations

import logging
import time

import pytest
import trio

from connmgr.embedded.cluster_pair import ClusterPair
from connmgr.pair.sequence_sync import SequenceSync, draw_leads, plan
from connmgr.pg.backend import BackendServer, Credentials, open_backend
from shadow.sqltext import quote_ident, quote_literal

DB = "app"


@pytest.fixture(scope="module")
def pair(pg_bindir, pg_base_dir):
    """One asynchronous pair for the module (sequences do not need synchronous commits)."""
    p = ClusterPair.create(pg_base_dir / "seqsync", synchronous=False, databases=(DB,),
                           bindir=pg_bindir)  # fmt: skip
    try:
        yield p
    finally:
        p.destroy()


def opener(cluster, name: str = ""):
    """An ``open_*`` callable for SequenceSync, as App._open_redo_session makes one."""
    server = BackendServer(name or cluster.name, cluster.host, cluster.port)
    params = {"user": "postgres", "database": DB, "application_name": "connmgr sequence sync"}

    async def open_session():
        return await open_backend(server, params, Credentials(password="postgres"),
                                  max_message_size=1 << 20)  # fmt: skip

    return open_session


@pytest.fixture
def make_sync(pair):
    """Factory: a SequenceSync between the pair's servers; sessions closed after the test."""
    made: list[SequenceSync] = []

    def make(**kw) -> SequenceSync:
        s = SequenceSync(opener(pair.primary), opener(pair.secondary), **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


async def sql(cluster, text: str) -> list[tuple]:
    """Run ``text`` on ``cluster`` (database app, autocommit); rows of its last statement."""

    def run():
        with cluster.connect(DB) as conn:
            cur = conn.execute(text)
            return cur.fetchall() if cur.description is not None else []

    return await trio.to_thread.run_sync(run)


async def values(pair, cluster) -> dict[str, int | None]:
    return await trio.to_thread.run_sync(pair.sequence_values, cluster, DB)


async def schema(pair, ddl: str) -> None:
    await trio.to_thread.run_sync(pair.sync_schema, DB, ddl)


# ---------------------------------------------------------------- against the pair

SCHEMA1 = 'Seq "1" it\'s'
S1 = quote_ident(SCHEMA1)
DOWN1 = "down \\ it's"  # a descending sequence whose name needs every kind of quoting


async def test_a_round_puts_every_sequence_ahead(pair, make_sync):
    await schema(pair, f"CREATE SCHEMA {S1};"
                       f" CREATE TABLE {S1}.orders (id serial PRIMARY KEY,"
                       f"  ref bigint GENERATED ALWAYS AS IDENTITY, note text);"
                       f" CREATE SEQUENCE {S1}.{quote_ident(DOWN1)} INCREMENT BY -1")  # fmt: skip
    await sql(pair.primary, f"INSERT INTO {S1}.orders (note) SELECT 'n' || g FROM generate_series(1, 50) g")
    await sql(pair.primary, f"SELECT nextval({quote_literal(f'{S1}.{quote_ident(DOWN1)}')}) FROM generate_series(1, 7)")
    primary = await values(pair, pair.primary)
    ours = {f"{SCHEMA1}.orders_id_seq": 1, f"{SCHEMA1}.orders_ref_seq": 1, f"{SCHEMA1}.{DOWN1}": -1}
    assert {k: primary[k] for k in ours} == {f"{SCHEMA1}.orders_id_seq": 50,
                                             f"{SCHEMA1}.orders_ref_seq": 50,
                                             f"{SCHEMA1}.{DOWN1}": -7}  # fmt: skip
    before = await values(pair, pair.secondary)
    # Not replicated: the rows arrived with their keys, the sequences stayed put.
    assert all(before[k] is None for k in ours)

    sync = make_sync(lead=1000)
    moved = await sync.sync_once()

    after = await values(pair, pair.secondary)
    for name, inc in ours.items():
        assert after[name] == primary[name] + 1000 * inc, name
        nxt = after[name] + inc
        assert (nxt > primary[name]) if inc > 0 else (nxt < primary[name]), name
    assert moved == sum(after[k] != before[k] for k in after) >= 3
    assert (sync.rounds, sync.advanced, sync.errors, sync.missing) == (1, moved, 0, 0)
    assert sync.connected and time.time() - sync.last_sync < 5
    # What that is for: a key the secondary hands out after a switch does not collide.
    ((key,),) = await sql(pair.secondary, f"SELECT nextval({quote_literal(f'{S1}.orders_id_seq')})")
    ((taken,),) = await sql(pair.primary, f"SELECT max(id) FROM {S1}.orders")
    assert key == 1051 > taken == 50


async def test_a_comfortable_lead_is_left_alone_until_half_is_used(pair, make_sync):
    await schema(pair, "CREATE SCHEMA s2; CREATE TABLE s2.t (id bigserial PRIMARY KEY)")
    await sql(pair.primary, "INSERT INTO s2.t SELECT FROM generate_series(1, 5)")
    sync = make_sync(lead=100)
    first = await sync.sync_once()
    assert first >= 1
    assert (await values(pair, pair.secondary))["s2.t_id_seq"] == 105
    assert await sync.sync_once() == 0  # at once: comfortably ahead
    # lead // 2 = 50 more draws: the secondary is still 50 ahead, which is enough
    await sql(pair.primary, "INSERT INTO s2.t SELECT FROM generate_series(1, 50)")
    assert await sync.sync_once() == 0
    assert (await values(pair, pair.secondary))["s2.t_id_seq"] == 105
    # one more and it is not comfortable any more
    await sql(pair.primary, "INSERT INTO s2.t DEFAULT VALUES")
    assert await sync.sync_once() == 1
    assert (await values(pair, pair.secondary))["s2.t_id_seq"] == 56 + 100
    assert (sync.rounds, sync.advanced, sync.errors) == (4, first + 1, 0)


async def test_a_secondary_sequence_is_never_lowered(pair, make_sync):
    await schema(pair, "CREATE SCHEMA s3; CREATE SEQUENCE s3.up; CREATE SEQUENCE s3.down INCREMENT -5;"
                       " CREATE SEQUENCE s3.pending")  # fmt: skip
    await sql(pair.primary, "SELECT nextval('s3.up'), nextval('s3.down'), nextval('s3.pending')"
                            " FROM generate_series(1, 10)")  # fmt: skip
    await sql(pair.secondary, "SELECT setval('s3.up', 1000000000), setval('s3.down', -1000000000),"
                              " setval('s3.pending', 2000000000, false)")  # fmt: skip
    sync = make_sync(lead=1000)
    await sync.sync_once()
    await sync.sync_once()
    rows = await sql(pair.secondary, "SELECT 'up', last_value, is_called FROM s3.up UNION ALL"
                                     " SELECT 'down', last_value, is_called FROM s3.down UNION ALL"
                                     " SELECT 'pending', last_value, is_called FROM s3.pending")  # fmt: skip
    # pg_sequences shows NULL for the one set with is_called = false: it gets a setval,
    # but the setval reads the sequence and keeps the higher value (now called).
    assert rows == [("up", 1000000000, True), ("down", -1000000000, True),
                    ("pending", 2000000000, True)]  # fmt: skip


async def test_run_keeps_the_secondary_ahead_and_stops_on_cancel(pair, make_sync):
    await schema(pair, "CREATE SCHEMA s4; CREATE TABLE s4.t (id serial PRIMARY KEY)")
    sync = make_sync(interval=0.05, lead=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(sync.run)

        async def comfortably_ahead(drawn: int) -> None:
            # (a round may have run before the draws: then 1000 -- the lead from 0 -- is it)
            with trio.fail_after(2):
                while ((await values(pair, pair.secondary))["s4.t_id_seq"] or 0) < drawn + 500:
                    await trio.sleep(0.02)

        await sql(pair.primary, "INSERT INTO s4.t SELECT FROM generate_series(1, 20)")
        await comfortably_ahead(20)
        # drawing more than lead / 2 between rounds is caught up again
        await sql(pair.primary, "INSERT INTO s4.t SELECT FROM generate_series(1, 600)")
        assert (await values(pair, pair.primary))["s4.t_id_seq"] == 620
        await comfortably_ahead(620)
        # 600 draws in one 0.05 s round: the lead follows the rate (2 * 600 > 1000)
        assert 620 + 1000 <= (await values(pair, pair.secondary))["s4.t_id_seq"] <= 620 + 2 * 600
        assert sync.connected and sync.rounds >= 2 and sync.errors == 0
        nursery.cancel_scope.cancel()
    assert not sync.connected
    rounds = sync.rounds
    await trio.sleep(0.2)
    assert sync.rounds == rounds


async def test_missing_sequences_are_counted_and_logged_once(pair, make_sync, caplog):
    await sql(pair.primary, "CREATE SCHEMA s5; CREATE SEQUENCE s5.only_here")
    try:
        sync = make_sync()
        with caplog.at_level(logging.WARNING, "connmgr.sequence_sync"):
            await sync.sync_once()
            await sync.sync_once()
        assert sync.missing == 1
        assert [r.getMessage() for r in caplog.records if r.name == "connmgr.sequence_sync"] == [
            'sequence sync: sequence "s5"."only_here" is missing on the secondary; it is not kept ahead'
        ]
    finally:
        await sql(pair.primary, "DROP SCHEMA s5 CASCADE")
    await sync.sync_once()
    assert sync.missing == 0


async def test_run_survives_an_unreachable_primary(pair, make_sync, caplog):
    dead = BackendServer("gone", "127.0.0.1", 1, connect_timeout=1)
    params = {"user": "postgres", "database": DB}

    async def open_dead():
        return await open_backend(dead, params, Credentials(password="postgres"), max_message_size=1 << 20)

    sync = SequenceSync(open_dead, opener(pair.secondary), interval=0.05)
    with caplog.at_level(logging.WARNING, "connmgr.sequence_sync"):
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            with trio.fail_after(5):
                while sync.errors < 2:  # retried after the 1 s back-off
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert sync.rounds == 0 and not sync.connected and sync.last_sync == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.name == "connmgr.sequence_sync"]
    assert len(warnings) == 1 and 'could not connect to server "gone"' in warnings[0]


# ---------------------------------------------------------------- planning, no server


def row(name: str, last: int | None, inc: int = 1, lo: int = 1, hi: int = 2**63 - 1,
        start: int | None = None, readable: bool = True) -> tuple:  # fmt: skip
    start = (lo if inc > 0 else hi) if start is None else start

    def enc(v: int | None) -> bytes | None:
        return None if v is None else str(v).encode()

    return (b"public", name.encode(), enc(last), enc(inc), enc(hi), enc(lo), enc(start),
            b"t" if readable else b"f")  # fmt: skip


def test_plan_targets_clamps_and_directions():
    p = plan(
        [row("a", 10), row("b", -10, -1, lo=-100, hi=-1), row("c", 95, hi=100),
         row("fresh", None), row("hidden", None, readable=False), row("gone", 3)],
        [row("a", None), row("b", -600, -1, lo=-2000, hi=-1), row("c", 100, hi=100),
         row("fresh", None), row("hidden", None)],
        lead=1000,
    )  # fmt: skip
    assert [(a.qualified, a.target, a.descending) for a in p.advances] == [
        ('"public"."a"', 1010, False),
        ('"public"."fresh"', 1000, False),  # never used: as if 0 was handed out
    ]  # b is far enough ahead (descending); c is at its bound already
    assert p.missing == ('"public"."gone"',) and p.unreadable == ('"public"."hidden"',)
    (b,) = plan([row("b", -10, -1, lo=-100, hi=-1)], [row("b", -20, -1, lo=-100, hi=-1)], 1000).advances
    assert b.target == -100 and b.descending


def test_quoting():
    assert quote_ident('a "b" c') == '"a ""b"" c"'
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("a\\b'") == "E'a\\\\b'''"
    (a,) = plan([row('x"y', 1)], [row('x"y', None)], 10).advances
    assert a.sql() == ("SELECT pg_catalog.setval('\"public\".\"x\"\"y\"'::pg_catalog.regclass,"
                       ' GREATEST(11, last_value), true), last_value, is_called'
                       ' FROM "public"."x""y"')  # fmt: skip


def test_plan_reports_the_smallest_margin_and_takes_larger_leads():
    A = '"public"."a"'
    p = plan([row("a", 100), row("b", 500), row("d", 100, inc=-1, lo=-1000, hi=1000)],
             [row("a", 1100), row("b", 400), row("d", 80, inc=-1, lo=-1000, hi=1000)], 1000, {A: 5000})
    assert p.min_margin == -100  # b was 100 behind
    targets = {a.qualified: a.target for a in p.advances}
    assert targets[A] == 5100  # 1100 < 100 + 5000 // 2: moved to 100 + 5000
    assert plan([row("a", 100)], [row("a", 2700)], 1000, {A: 5000}).advances == ()  # >= 100 + 2500


def test_draw_leads_follow_the_rate():
    A = '"public"."a"'
    before, leads = draw_leads({}, [row("a", 100)], 10.0, 1.0, 1000)
    assert leads == {} and before == {A: (100, 10.0)}
    # 3000 draws in 1 s with rounds every 1 s: 2 * 3000
    before, leads = draw_leads(before, [row("a", 3100)], 11.0, 1.0, 1000)
    assert leads == {A: 6000}
    _, leads = draw_leads(before, [row("a", 3110)], 12.0, 1.0, 1000)
    assert leads == {}  # 10 draws a second: the configured lead is enough
