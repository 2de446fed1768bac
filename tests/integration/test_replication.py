"""connmgr.pg.replication against the real Postgres of the session (``pg``, database ``app``).

Every test uses its own table, publication and slot names and removes them at the end: a
replication slot left behind makes the server keep WAL forever. psycopg calls block, so
they run in a thread (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import uuid

import pytest
import trio

from connmgr.pg.backend import BackendServer, Credentials
from connmgr.pg.replication import (
    ReplicationError,
    ReplicationStream,
    create_publication_sql,
    drop_publication_sql,
    drop_slot_sql,
    open_replication_stream,
)
from replay.lsn import parse_lsn
from replay.pgoutput import NonTransactionalMessage, PosterRecord, TransactionAssembler

APP = "app"


class Scratch:
    """Unique names on ``pg`` for one test: a table, a publication FOR ALL TABLES, and a
    slot name (the slot itself is made by the stream)."""

    def __init__(self, pg) -> None:
        self.pg = pg
        sfx = uuid.uuid4().hex[:10]
        self.table = f"repl_{sfx}"
        self.publication = f"pub_{sfx}"
        self.slot = f"slot_{sfx}"
        self.server = BackendServer("primary", pg.host, pg.port)
        self.credentials = Credentials(password=pg.password)

    def sql(self, *statements: str, autocommit: bool = True) -> list:
        """Run statements in one session (one transaction unless autocommit); return the
        last one's rows."""
        with self.pg.connect(APP, autocommit=autocommit) as conn:
            rows: list = []
            for s in statements:
                cur = conn.execute(s)
                rows = cur.fetchall() if cur.description else []
            return rows

    async def run(self, *statements: str, autocommit: bool = True) -> list:
        return await trio.to_thread.run_sync(lambda: self.sql(*statements, autocommit=autocommit))

    async def open(self, **kw) -> ReplicationStream:
        kw.setdefault("temporary", True)
        return await open_replication_stream(
            self.server, self.credentials, user="postgres", database=APP,
            slot=kw.pop("slot", self.slot), publication=kw.pop("publication", self.publication), **kw,
        )  # fmt: skip

    async def slot_row(self, slot: str | None = None) -> tuple | None:
        rows = await self.run(
            "SELECT confirmed_flush_lsn::text, active, temporary FROM pg_replication_slots"
            f" WHERE slot_name = '{slot or self.slot}'"
        )
        return rows[0] if rows else None


@pytest.fixture
def scratch(pg):
    s = Scratch(pg)
    s.sql(f"CREATE TABLE {s.table} (id int PRIMARY KEY, v text)", create_publication_sql(s.publication))
    try:
        yield s
    finally:
        s.sql(drop_publication_sql(s.publication), f"DROP TABLE IF EXISTS {s.table}")
        # temporary slots go with their connection; make sure nothing was left either way
        pg.psql(drop_slot_sql(s.slot), dbname=APP)
        left = pg.psql(f"SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE '%{s.slot[5:]}%'")
        assert left == "", f"replication slots left behind: {left}"


async def next_record(stream: ReplicationStream, timeout: float = 5.0):
    with trio.fail_after(timeout):
        return await stream.__anext__()


async def record_of(stream: ReplicationStream, xid: int, timeout: float = 5.0) -> PosterRecord:
    """The next PosterRecord of transaction ``xid`` (others -- nothing else should write
    in ``app`` meanwhile, but the publication is FOR ALL TABLES -- are skipped)."""
    with trio.fail_after(timeout):
        async for item in stream:
            if isinstance(item, PosterRecord) and item.xid == xid:
                return item
    raise AssertionError("stream ended")


async def test_a_transaction_becomes_one_poster_record(scratch):
    t = scratch.table
    async with await scratch.open() as stream:
        # a committed transaction with a marker; capture its xid and an LSN inside it
        xid, inside = (await scratch.run(
            f"INSERT INTO {t} VALUES (1, 'a'), (2, 'b')",
            f"INSERT INTO {t} VALUES (3, 'c')",
            "SELECT pg_logical_emit_message(true, 'connmgr', 's1:t1')",
            "SELECT txid_current(), pg_current_wal_insert_lsn()::text",
            autocommit=False,
        ))[0]  # fmt: skip
        # a rolled-back one, then a non-transactional message, then a last transaction
        with pytest.raises(Exception, match="rolled back on purpose"):
            await scratch.run(
                f"INSERT INTO {t} VALUES (4, 'rolled back')",
                "SELECT pg_logical_emit_message(true, 'connmgr', 'rolled-back')",
                "DO $$ BEGIN RAISE 'rolled back on purpose'; END $$",
                autocommit=False,
            )
        await scratch.run("SELECT pg_logical_emit_message(false, 'connmgr', 'heartbeat')")
        (last_xid,) = (await scratch.run(
            f"INSERT INTO {t} VALUES (5, 'e')", "SELECT txid_current()", autocommit=False
        ))[0]  # fmt: skip

        items = []
        while not items or not (isinstance(items[-1], PosterRecord) and items[-1].xid == last_xid):
            items.append(await next_record(stream))

        first = items[0]
        assert isinstance(first, PosterRecord)
        assert first.xid == xid
        assert first.n_changes == 3 and len(first.change_lsns) == 3
        assert first.messages == (("connmgr", b"s1:t1"),)
        assert first.relations == (f"public.{t}",)
        inside = parse_lsn(inside)
        assert first.first_lsn == first.change_lsns[0]
        assert list(first.change_lsns) == sorted(first.change_lsns)
        # the commit record is written after the captured position -- *at* it when nothing
        # else wrote WAL in between -- so commit_lsn >= inside and end_lsn > inside
        assert first.change_lsns[-1] < inside <= first.commit_lsn < first.end_lsn
        assert not first.truncated and not first.streamed
        assert first.commit_time_us > 0

        # the rolled-back transaction left no trace; the non-transactional message came
        # through on its own, before the last transaction
        assert len(items) == 3, items
        assert items[1] == NonTransactionalMessage(items[1].lsn, "connmgr", b"heartbeat")
        assert first.end_lsn <= items[1].lsn < items[2].commit_lsn
        assert items[2].n_changes == 1 and items[2].messages == ()
        assert stream.latest_wal_end >= items[2].commit_lsn
        assert stream.assembler.confirmed_lsn == items[2].end_lsn


async def test_confirm_advances_the_slots_confirmed_flush_lsn(scratch):
    async with await scratch.open() as stream:
        created_at = parse_lsn((await scratch.slot_row())[0])
        (xid,) = (await scratch.run(
            f"INSERT INTO {scratch.table} VALUES (1, 'x')", "SELECT txid_current()", autocommit=False
        ))[0]  # fmt: skip
        rec = await record_of(stream, xid)
        assert rec.commit_lsn > created_at

        # handed out but not confirmed: the slot must not move past it
        await stream.send_status()
        flushed, active, temporary = await scratch.slot_row()
        assert active and temporary
        assert parse_lsn(flushed) < rec.end_lsn

        with pytest.raises(ValueError, match="handed out records up to"):
            stream.confirm(rec.end_lsn + 1000)
        stream.confirm(rec.confirm_lsn)
        assert stream.confirmed_lsn == rec.end_lsn
        await stream.send_status()
        with trio.fail_after(5):  # the walsender applies the update asynchronously
            while parse_lsn((await scratch.slot_row())[0]) < rec.end_lsn:
                await trio.sleep(0.02)
        assert parse_lsn((await scratch.slot_row())[0]) == rec.end_lsn


async def test_an_idle_stream_confirms_keepalive_positions(scratch, pg):
    """With every record confirmed and nothing in flight, WAL written elsewhere (another
    database) must not stay pinned by the slot."""
    async with await scratch.open(status_interval=0.05) as stream:
        (xid,) = (await scratch.run(
            f"INSERT INTO {scratch.table} VALUES (1, 'x')", "SELECT txid_current()", autocommit=False
        ))[0]  # fmt: skip
        rec = await record_of(stream, xid)
        stream.confirm(rec.confirm_lsn)
        await trio.to_thread.run_sync(
            lambda: pg.psql("CREATE TEMP TABLE elsewhere AS SELECT generate_series(1, 100) AS n")
        )
        with trio.fail_after(5):
            while stream.confirmed_lsn <= rec.end_lsn:
                with trio.move_on_after(0.1):
                    item = await stream.__anext__()
                    pytest.fail(f"nothing was to be decoded, got {item}")
        assert stream.confirmed_lsn <= stream.latest_wal_end
        # the stream is still healthy after those cancelled waits
        (xid2,) = (await scratch.run(
            f"INSERT INTO {scratch.table} VALUES (2, 'y')", "SELECT txid_current()", autocommit=False
        ))[0]  # fmt: skip
        assert (await record_of(stream, xid2)).n_changes == 1


async def test_reopening_a_slot_resumes_after_the_confirmed_transaction(scratch):
    t = scratch.table
    try:
        stream = await scratch.open(temporary=False)
        async with stream:
            (a,) = (await scratch.run(f"INSERT INTO {t} VALUES (1, 'a')", "SELECT txid_current()", autocommit=False))[0]
            (b,) = (await scratch.run(f"INSERT INTO {t} VALUES (2, 'b')", "SELECT txid_current()", autocommit=False))[0]
            rec_a = await record_of(stream, a)
            stream.confirm(rec_a.confirm_lsn)
            rec_b = await record_of(stream, b)  # handed out, never confirmed
        # aclose reported rec_a as flushed; the persistent slot stays, inactive
        with trio.fail_after(5):
            while (row := await scratch.slot_row()) is None or row[1]:
                await trio.sleep(0.02)
        assert parse_lsn(row[0]) == rec_a.end_lsn and not row[2]

        async with await scratch.open(temporary=False) as again:
            first = await next_record(again)
            assert isinstance(first, PosterRecord) and first.xid == b
            assert first == rec_b
    finally:
        await trio.to_thread.run_sync(lambda: scratch.pg.psql(drop_slot_sql(scratch.slot), dbname=APP))


async def test_large_transactions_stream_with_protocol_2(scratch):
    """streaming 'on' with a 64kB logical_decoding_work_mem: the transaction arrives in
    stream blocks, a rolled-back savepoint's rows are taken out, and it still becomes one
    record at its commit."""
    t = scratch.table
    async with await scratch.open(
        streaming=True, extra_params={"options": "-c logical_decoding_work_mem=64kB"},
        assembler=TransactionAssembler(max_change_lsns=100),
    ) as stream:  # fmt: skip
        (xid,) = (await scratch.run(
            f"INSERT INTO {t} SELECT g, repeat('x', 100) FROM generate_series(1, 1000) g",
            "SAVEPOINT s1",
            f"INSERT INTO {t} SELECT g, repeat('y', 100) FROM generate_series(1001, 2000) g",
            "ROLLBACK TO SAVEPOINT s1",
            f"INSERT INTO {t} SELECT g, repeat('z', 100) FROM generate_series(3001, 3500) g",
            "SELECT pg_logical_emit_message(true, 'connmgr', 'big')",
            "SELECT txid_current()",
            autocommit=False,
        ))[0]  # fmt: skip
        rec = await record_of(stream, xid, timeout=10)
        assert rec.streamed
        assert rec.n_changes == 1500
        assert len(rec.change_lsns) == 100 and rec.truncated
        assert rec.messages == (("connmgr", b"big"),)
        assert rec.relations == (f"public.{t}",)


async def test_a_missing_publication_is_reported_with_the_slot_name(scratch):
    """At the opening, on every version (PostgreSQL 18's pgoutput would decode past it
    with a WARNING, and the stream would stay silent)."""
    with pytest.raises(ReplicationError) as info:
        await scratch.open(publication="no_such_pub")
    err = info.value
    assert err.sqlstate == "42704" and err.slot == scratch.slot
    assert scratch.slot in err.message and 'publication "no_such_pub" does not exist' in err.message


async def test_opening_errors(scratch):
    with pytest.raises(ValueError, match="invalid replication slot name"):
        await scratch.open(slot="Bad-Name")
    with pytest.raises(ReplicationError, match="does not exist") as info:
        await scratch.open(create_slot=False)
    assert info.value.sqlstate == "42704"

    async with await scratch.open():
        with pytest.raises(ReplicationError) as info:
            await scratch.open()  # the same slot, in use by the first stream
        assert info.value.sqlstate == "55006" and "is active" in info.value.message

    wrong = Scratch(scratch.pg)
    wrong.credentials = Credentials(password="not the password")
    with pytest.raises(ReplicationError) as info:
        await wrong.open()
    assert info.value.sqlstate == "28P01" and wrong.slot in info.value.message


def test_sql_helpers_quote_names():
    assert create_publication_sql("pub") == 'CREATE PUBLICATION "pub" FOR ALL TABLES'
    assert create_publication_sql('My "Pub"') == 'CREATE PUBLICATION "My ""Pub""" FOR ALL TABLES'
    assert drop_publication_sql("p") == 'DROP PUBLICATION IF EXISTS "p"'
    assert "slot_name = 'ok_1'" in drop_slot_sql("ok_1")
    for bad in ["", "x" * 64, "Upper", "semi;colon", "quote'"]:
        with pytest.raises(ValueError):
            drop_slot_sql(bad)
    with pytest.raises(ValueError):
        create_publication_sql("nul\0")
