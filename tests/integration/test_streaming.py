"""Messages longer than [server] max_buffered_message are relayed as they arrive (issue 13):
connmgr holds a bounded part of them, they arrive intact both ways, a pair keeps working,
and a failover with one in flight never replays a write that may have committed."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc

import psycopg
import pytest
from connmgr_fixtures import live_pair_of, wait_for
from rawpg import Msg, RawPg, errors_in

MIB = 1 << 20


def login(cm) -> RawPg:
    client = RawPg.connect(cm.host, cm.port, timeout=60)
    client.login("postgres", "app", "postgres")
    return client


def read_answer(client: RawPg) -> list[Msg]:
    """Messages up to ReadyForQuery or the end of the connection."""
    msgs = []
    while (msg := client.read_message()) is not None:
        msgs.append(msg)
        if msg.tag == "Z":
            break
    return msgs


def stream_query(client: RawPg, size: int, chunk: int = MIB) -> tuple[int, int]:
    """Send ``SELECT <size> --xxx...`` as one Query of ``size`` bytes in ``chunk`` pieces
    (a line comment: Postgres skips it without a copy); returns (the number the server
    answered, the peak of Python memory traced in this process meanwhile, above the start)."""
    head = b"SELECT %d --" % size
    body_len = size - len(head) - 1
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        client.send(b"Q" + struct.pack("!I", 4 + size) + head)
        piece = b"x" * chunk
        sent = 0
        while sent < body_len:
            n = min(chunk, body_len - sent)
            client.send(piece if n == chunk else piece[:n])
            sent += n
        client.send(b"\0")
        msgs = client.read_until_ready()
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert not errors_in(msgs), msgs
    (row,) = [x for x in msgs if x.tag == "D"]
    return int(row.body[6:]), peak


@pytest.mark.parametrize("buffered", [8 * MIB, 0])
def test_a_64_mib_query_is_relayed_with_a_bounded_part_held(start_connmgr, buffered):
    """With the default limit (8 MiB) connmgr holds a small part of a 64 MiB Query; held
    whole (0) it holds all of it -- which shows the measure sees what is held."""
    cm = start_connmgr(server={"max_buffered_message": buffered})
    client = login(cm)
    answered, peak = stream_query(client, 64 * MIB)
    assert answered == 64 * MIB
    if buffered:
        assert peak < 16 * MIB, f"connmgr held {peak / MIB:.1f} MiB of a 64 MiB message"
        assert cm.app.metrics.messages_streamed == 1
    else:
        assert peak > 64 * MIB, f"only {peak / MIB:.1f} MiB traced for a message held whole"
        assert cm.app.metrics.messages_streamed == 0
    # the session goes on, in step
    assert [x.tag for x in client.query("SELECT 1")] == ["T", "D", "C", "Z"]
    client.close()


@pytest.fixture
def small_buffer_pair(pg_bindir, pg_base_dir, tmp_path, request):
    """A pair (failover on) whose connmgrs stream every message over 64 KiB."""
    with live_pair_of(pg_bindir, pg_base_dir / f"stream-{request.node.name[:40]}", tmp_path,
                      failover_options={"failback": "manual"},
                      server_options={"max_buffered_message": 64 << 10}) as lp:  # fmt: skip
        lp.pair.sync_schema("app", "CREATE TABLE blobs (id int PRIMARY KEY, v bytea NOT NULL, t text)")
        yield lp


def test_long_parameters_rows_and_copy_pass_a_pair_intact(small_buffer_pair):
    """A 5 MiB bytea parameter (Bind), a 5 MiB text in a simple Query, the 5 MiB rows they
    come back as, and a COPY with long rows, through a pair streaming everything over
    64 KiB: the bytes are intact on the client and on the secondary, and the pair is
    unharmed (the secondary's import drops the sessions it cannot keep, nothing else)."""
    lp = small_buffer_pair
    value = bytes(range(256)) * (5 * MIB // 256)
    text = "é" * (5 * MIB // 2)
    with lp.connect(autocommit=True) as c:
        c.execute("INSERT INTO blobs VALUES (1, %s)", (value,))  # extended protocol: a long Bind
        psycopg.ClientCursor(c).execute("INSERT INTO blobs VALUES (2, '\\x00', %s)", (text,))  # a long Query
        with c.cursor() as cur:
            cur.execute("INSERT INTO blobs VALUES (3, '\\x00', %s)", (text,))
        with c.cursor().copy("COPY blobs (id, v, t) FROM STDIN") as copy:
            copy.write_row((4, value[: MIB], text))
        assert c.execute("SELECT v FROM blobs WHERE id = 1").fetchone()[0] == value  # a long DataRow
        assert c.execute("SELECT t FROM blobs WHERE id = 2").fetchone()[0] == text
        assert c.execute("SELECT id FROM blobs WHERE t = %s ORDER BY id", (text,)).fetchall() == [(2,), (3,), (4,)]
    digest = hashlib.md5(value).hexdigest()
    lp.pair.wait_caught_up()
    assert lp.on_secondary("SELECT id, md5(v), md5(t) FROM blobs ORDER BY id") == [
        (1, digest, None),
        (2, hashlib.md5(b"\0").hexdigest(), hashlib.md5(text.encode()).hexdigest()),
        (3, hashlib.md5(b"\0").hexdigest(), hashlib.md5(text.encode()).hexdigest()),
        (4, hashlib.md5(value[:MIB]).hexdigest(), hashlib.md5(text.encode()).hexdigest()),
    ]
    assert lp.primary.app.metrics.messages_streamed >= 4
    imports = lp.secondary.app.imports
    assert imports.import_errors == 0
    assert imports.queue.stats.overflows >= 1  # the sessions with long messages are not kept
    assert lp.primary.app.mirror.connected


def test_a_streamed_named_statement_makes_its_session_refuse_a_move(small_buffer_pair):
    """A prepared statement whose Parse was too long to keep cannot be prepared again on the
    secondary: at a failover its session ends with 08006 naming it, instead of moving and
    failing later with 26000."""
    lp = small_buffer_pair
    c = lp.connect(autocommit=True)
    long_sql = "SELECT count(*) FROM blobs WHERE id = %s " + "-- " + "x" * (100 << 10) + "\n"
    assert c.execute(long_sql, (1,), prepare=True).fetchone() == (0,)
    lp.pair.primary.kill()
    assert wait_for(lambda: lp.failover.failed_over, 10), lp.failover.timeline
    with pytest.raises(psycopg.OperationalError) as err:
        c.execute("SELECT 1")
    assert "not kept" in str(err.value)
    assert lp.failover.sessions_failed["session state"] == 1
    c.close()


def test_a_failover_mid_message_ends_the_session_with_08006(small_buffer_pair):
    """The primary dies while an autocommit INSERT of 8 MiB is still being sent: the new
    server could not be given the part already relayed, so the session ends with 08006
    naming why, and the survivor has no such row."""
    lp = small_buffer_pair
    client = login(lp.primary)
    sql = b"INSERT INTO blobs VALUES (7, '\\x00', '" + b"y" * (8 * MIB) + b"')\0"
    message = b"Q" + struct.pack("!I", 4 + len(sql)) + sql
    client.send(message[: len(message) // 2])
    lp.pair.primary.kill()
    client.send_quietly(message[len(message) // 2:])
    msgs = read_answer(client)
    assert wait_for(lambda: lp.failover.failed_over, 10), lp.failover.timeline
    (error,) = errors_in(msgs)
    assert error.sqlstate == "08006" and "was sending a message over" in error.message, msgs
    assert lp.failover.sessions_failed["too large"] == 1
    assert lp.on_secondary("SELECT count(*) FROM blobs WHERE id = 7") == [(0,)]
    client.close()


def test_a_failover_with_an_unmarked_write_in_flight_does_not_replay_it(small_buffer_pair):
    """An autocommit INSERT too long to carry a marker (1 MiB, streamed over 64 KiB) has been
    relayed whole and is running when the primary dies: whether it committed cannot be
    known from the secondary, so it is not replayed (a replay could write it twice); the
    session ends with 08006, the answer Postgres gives when it dies mid-commit."""
    lp = small_buffer_pair
    client = login(lp.primary)
    sql = b"INSERT INTO blobs SELECT 8, '\\x00', '" + b"z" * MIB + b"' FROM pg_sleep(2)\0"
    message = b"Q" + struct.pack("!I", 4 + len(sql)) + sql
    client.send(message)
    (conn,) = lp.primary.app.clients.values()
    assert wait_for(lambda: conn.stats.bytes_from_client >= len(message) and not conn.relay.client_framer.streaming,
                    10, "the whole Query relayed")  # fmt: skip
    assert conn.relay.injector.unmarked == 1
    lp.pair.primary.kill()
    msgs = read_answer(client)
    assert wait_for(lambda: lp.failover.failed_over, 10), lp.failover.timeline
    (error,) = errors_in(msgs)
    assert error.sqlstate == "08006" and "carried no connmgr marker" in error.message, msgs
    assert lp.failover.sessions_failed["unmarked commit"] == 1
    assert lp.on_secondary("SELECT count(*) FROM blobs WHERE id = 8") == [(0,)]
    client.close()


def test_a_64_mib_query_through_a_pair_is_held_by_neither_connmgr(small_buffer_pair):
    """Both connmgrs of a pair (one process here, so one measure covers the primary's
    relay, journal and mirror outbox and the secondary's import): a 64 MiB Query leaves
    a bounded part behind -- the journal's [failover] max_replay_bytes (8 MiB) and the
    mirror records not yet acknowledged."""
    lp = small_buffer_pair
    client = login(lp.primary)
    answered, peak = stream_query(client, 64 * MIB)
    assert answered == 64 * MIB
    print(f"pair: {peak / MIB:.1f} MiB traced for a 64 MiB Query")
    assert peak < 32 * MIB, f"the pair held {peak / MIB:.1f} MiB of a 64 MiB message"
    assert lp.primary.app.mirror.connected and lp.secondary.app.imports.import_errors == 0
    client.close()
