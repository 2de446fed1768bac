"""replay/injection.py: markers and DDL capture planned into client batches, their replies
taken out of the server's, an autocommit write's results held until its commit -- bytes in,
bytes out, no server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay import markers
from replay.injection import STASH_LIMIT, InjectMode, Injector, frames_of
from shadow import messages as m
from shadow.framing import STREAM_HEAD, STREAM_LAST
from shadow.session import SessionState, TxStatus

ORIGIN, SID = 77, 5
MARKER = m.RowDescription((m.FieldDescription(markers.MARKER_COLUMN),))
FLUSH = m.NoticeResponse({"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": markers.FLUSH_NOTICE})


def wire(*msgs) -> bytes:
    return b"".join(x.encode() for x in msgs)


def counters() -> SimpleNamespace:
    return SimpleNamespace(ddl_captured=0, ddl_not_captured=0, markers_written=0)


def session_in(tx: str) -> SessionState:
    s = SessionState()
    raw = m.StartupMessage(m.PROTOCOL_3_0, {"user": "u", "database": "d"}).encode()
    s.frontend_message(0, raw[4:])
    for x in (m.AuthenticationOk(), m.BackendKeyData(1, 2), m.ReadyForQuery("I")):
        raw = x.encode()
        s.backend_message(raw[0], raw[5:])
    if tx == "T":
        feed_client(s, wire(m.Query("BEGIN")))
        feed_server(s, wire(m.CommandComplete("BEGIN"), m.ReadyForQuery("T")))
    assert s.tx_status is (TxStatus.IN_TRANSACTION if tx == "T" else TxStatus.IDLE)
    return s


def feed_client(s: SessionState, data: bytes) -> None:
    for tag, start, end in frames_of(data):
        s.frontend_message(tag, data[start:end])


def feed_server(s: SessionState, data: bytes) -> None:
    for tag, start, end in frames_of(data):
        s.backend_message(tag, data[start:end])


def planned(inj: Injector, batch: bytes, transactions: int = 4) -> bytes:
    """What the relay does with a client batch: plan at the first Query/Sync/Parse/Bind
    that takes one, feeding the shadow the client's own messages; then apply the plan."""
    plan = None
    for tag, start, end in frames_of(batch):
        if plan is None and tag == ord("Q"):
            plan = inj.plan_query(batch, start, end, transactions, 1.5)
        elif plan is None and tag == ord("S"):
            plan = inj.plan_sync(start, transactions, 1.5)
        elif plan is None and tag in b"PB":
            plan = inj.plan_extended(tag, batch, start, end, transactions, 1.5)
        inj.session.frontend_message(tag, batch[start:end])
    return batch if plan is None else inj.apply(batch, plan)


def queries(data: bytes) -> list[str]:
    return [data[s:e - 1].decode() for t, s, e in frames_of(data) if t == ord("Q")]


def test_a_commit_in_a_block_gets_a_marker_query_before_it_and_its_replies_vanish():
    s, c = session_in("T"), counters()
    inj = Injector(s, ORIGIN, SID, c)
    out = planned(inj, wire(m.Query("COMMIT")))
    assert queries(out) == [markers.mark_sql(ORIGIN, SID, 5), "COMMIT"]
    assert (inj.mode, inj.marker_seq, inj.marker_at, inj.injected) == (InjectMode.CYCLE, 5, 1.5, 1)
    replies = wire(MARKER, m.DataRow((b"5",)), FLUSH, m.CommandComplete("SELECT 1"), m.ReadyForQuery("T"),
                   m.CommandComplete("COMMIT"), m.ReadyForQuery("I"))  # fmt: skip
    buf, frames, lost = inj.strip(replies, frames_of(replies), track=True)
    assert buf == wire(m.CommandComplete("COMMIT"), m.ReadyForQuery("I")) and lost is None
    assert frames == frames_of(buf)
    assert (inj.mode, inj.marked, inj.confirmed, c.markers_written) == (InjectMode.NONE, True, True, 1)
    assert s.tx_status is TxStatus.IDLE and not s.pending


def test_a_reader_marker_returns_null_and_marks_nothing():
    s, c = session_in("T"), counters()
    inj = Injector(s, ORIGIN, SID, c)
    planned(inj, wire(m.Query("COMMIT")))
    replies = wire(MARKER, m.DataRow((None,)), m.CommandComplete("SELECT 1"), m.ReadyForQuery("T"),
                   m.CommandComplete("COMMIT"), m.ReadyForQuery("I"))  # fmt: skip
    buf, _frames, _lost = inj.strip(replies, frames_of(replies), track=True)
    assert buf == wire(m.CommandComplete("COMMIT"), m.ReadyForQuery("I"))
    assert (inj.marked, inj.confirmed, c.markers_written) == (False, False, 0)


def test_an_autocommit_write_carries_its_marker_in_its_own_query():
    s, c = session_in("I"), counters()
    inj = Injector(s, ORIGIN, SID, c)
    out = planned(inj, wire(m.Query("INSERT INTO t VALUES (1)")))
    assert queries(out) == ["INSERT INTO t VALUES (1)\n;" + markers.mark_sql(ORIGIN, SID, 5)]
    assert inj.mode is InjectMode.NAMED
    replies = wire(m.CommandComplete("INSERT 0 1"), MARKER, m.DataRow((b"5",)), FLUSH, m.CommandComplete("SELECT 1"),
                   m.ReadyForQuery("I"))  # fmt: skip
    buf, _frames, _lost = inj.strip(replies, frames_of(replies), track=True)
    assert buf == wire(m.CommandComplete("INSERT 0 1"), m.ReadyForQuery("I"))
    assert inj.marked and inj.mode is InjectMode.NONE


def test_an_error_in_the_marker_reaches_the_client():
    s = session_in("T")
    inj = Injector(s, ORIGIN, SID, counters())
    planned(inj, wire(m.Query("COMMIT")))
    error = m.ErrorResponse({"S": "ERROR", "V": "ERROR", "C": "42883", "M": "function connmgr.mark does not exist"})
    replies = wire(error, m.ReadyForQuery("E"), m.CommandComplete("ROLLBACK"), m.ReadyForQuery("I"))
    buf, _frames, _lost = inj.strip(replies, frames_of(replies), track=True)
    assert buf == wire(error, m.CommandComplete("ROLLBACK"), m.ReadyForQuery("I"))  # its own Z is ours
    assert inj.injected_errors == 1 and not inj.marked


def test_ddl_in_a_block_is_captured_and_a_created_table_rides_with_the_marker():
    s, c = session_in("T"), counters()
    inj = Injector(s, ORIGIN, SID, c)
    out = planned(inj, wire(m.Query("CREATE TABLE fresh (id int)")))
    capture, statement = queries(out)
    assert capture.startswith("SELECT pg_catalog.pg_logical_emit_message(true, 'connmgr.ddl'")
    assert "$CREATE TABLE fresh (id int)$" in capture and statement == "CREATE TABLE fresh (id int)"
    assert (inj.ddl_captured, c.ddl_captured, inj.new_tables) == (1, 1, ["fresh"])
    replies = wire(m.RowDescription((m.FieldDescription(markers.DDL_COLUMN),)), m.DataRow((b"0/1",)),
                   m.CommandComplete("SELECT 1"), m.ReadyForQuery("T"), m.CommandComplete("CREATE TABLE"),
                   m.ReadyForQuery("T"))  # fmt: skip
    buf, _f, _l = inj.strip(replies, frames_of(replies), track=True)
    assert buf == wire(m.CommandComplete("CREATE TABLE"), m.ReadyForQuery("T"))
    out = planned(inj, wire(m.Query("COMMIT")))
    marker = queries(out)[0]
    assert marker.startswith(markers.mark_sql(ORIGIN, SID, 5) + ", connmgr.ddl_guard(")
    assert "pg_catalog.to_regclass('fresh')" in marker and inj.new_tables == []


def test_ddl_postgres_runs_outside_blocks_is_counted_not_captured():
    s, c = session_in("I"), counters()
    inj = Injector(s, ORIGIN, SID, c)
    batch = wire(m.Query("CREATE INDEX CONCURRENTLY i ON t (x)"))
    assert planned(inj, batch) == batch
    assert (inj.ddl_not_captured, c.ddl_not_captured, inj.mode) == (1, 1, InjectMode.NONE)


def test_nothing_is_planned_with_a_request_in_flight_or_for_a_reader():
    s = session_in("I")
    inj = Injector(s, ORIGIN, SID, counters())
    batch = wire(m.Query("SELECT 1"))
    assert planned(inj, batch) == batch  # a reader in autocommit: no marker
    batch = wire(m.Query("INSERT INTO t VALUES (1)"))  # the SELECT is still pending
    assert planned(inj, batch) == batch and inj.injected == 0


def test_an_extended_write_gets_a_marker_before_its_sync():
    s = session_in("I")
    inj = Injector(s, ORIGIN, SID, counters())
    batch = wire(m.Parse("", "UPDATE t SET x = 1"), m.Bind("", ""), m.Execute(""), m.Sync())
    out = planned(inj, batch)
    tags = bytes(t for t, _s, _e in frames_of(out))
    assert tags == b"PBE" + b"PBEC" + b"S" and inj.mode is InjectMode.EXT_TAIL
    replies = wire(m.ParseComplete(), m.BindComplete(), m.CommandComplete("UPDATE 1"),
                   m.ParseComplete(), m.BindComplete(), m.DataRow((b"5",)), FLUSH, m.CommandComplete("SELECT 1"),
                   m.CloseComplete(), m.ReadyForQuery("I"))  # fmt: skip
    buf, _f, _l = inj.strip(replies, frames_of(replies), track=True)
    assert buf == wire(m.ParseComplete(), m.BindComplete(), m.CommandComplete("UPDATE 1"), m.ReadyForQuery("I"))
    assert inj.marked and not s.pending


def test_a_held_back_error_stops_the_strip_there():
    s = session_in("T")
    inj = Injector(s, ORIGIN, SID, counters())
    planned(inj, wire(m.Query("COMMIT")))
    fatal = m.ErrorResponse({"S": "FATAL", "V": "FATAL", "C": "57P01", "M": "terminating"})
    replies = wire(MARKER, fatal, m.ReadyForQuery("I"))
    buf, frames, _lost = inj.strip(replies, frames_of(replies), track=True, held_back=lambda b, s, e: True)
    assert (buf, frames) == (b"", [])


def test_results_are_held_until_the_commit_and_come_out_whole():
    inj = Injector(session_in("I"), ORIGIN, SID, counters())
    first = wire(m.RowDescription((m.FieldDescription("id"),)), m.DataRow((b"1",)))
    rest = wire(m.CommandComplete("INSERT 0 1"), m.ReadyForQuery("I"))
    assert inj.hold(first, frames_of(first)) == (b"", [])
    buf, frames = inj.hold(rest, frames_of(rest))
    assert buf == first + rest and frames == frames_of(buf)
    assert inj.stash == bytearray()  # ready for the next write


def test_results_over_the_limit_and_copy_are_not_held():
    inj = Injector(session_in("I"), ORIGIN, SID, counters())
    big = wire(*[m.DataRow((b"x" * 1000,))] * (STASH_LIMIT // 1000 + 2))
    buf, _f = inj.hold(big, frames_of(big))
    assert buf == big and inj.stash is None  # relayed as it comes until the transaction ends
    end = wire(m.ReadyForQuery("I"))
    assert inj.hold(end, frames_of(end))[0] == end and inj.stash == bytearray()
    copy = wire(m.CopyInResponse(0, ()))
    assert inj.hold(copy, frames_of(copy))[0] == copy and inj.stash is None


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=6), max_size=6))
def test_stripping_in_pieces_equals_stripping_whole(cuts):
    """The h11 invariant: however the server's replies are cut into batches (at message
    boundaries), the client gets the same bytes."""
    replies = wire(m.CommandComplete("INSERT 0 1"), MARKER, m.DataRow((b"5",)), FLUSH, m.CommandComplete("SELECT 1"),
                   m.ReadyForQuery("I"), m.NotificationResponse(3, "c", "p"))  # fmt: skip

    def run(pieces):
        inj = Injector(session_in("I"), ORIGIN, SID, counters())
        planned(inj, wire(m.Query("INSERT INTO t VALUES (1)")))
        out = b""
        for piece in pieces:
            buf, _f, _l = inj.strip(piece, frames_of(piece), track=True)
            out += buf
        return out, inj.marked

    messages_ = [replies[s - 5:e] for _t, s, e in frames_of(replies)]
    pieces, i = [], 0
    for n in cuts:
        pieces.append(b"".join(messages_[i:i + n]))
        i += n
    pieces.append(b"".join(messages_[i:]))
    assert run([p for p in pieces if p]) == run([replies])


# ------------------------------------------------------------------ unmarked commits, streamed parts


def test_a_multi_statement_autocommit_write_gets_no_marker_and_is_counted_unmarked():
    inj = Injector(session_in("I"), 7, 3, counters())
    batch = wire(m.Query("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)"))
    assert planned(inj, batch) == batch  # nothing injected: a marker cannot ride along
    assert inj.unmarked == 1


@pytest.mark.parametrize(("tx", "sql", "unmarked"), [
    ("I", "SELECT 'a;b'", 0),
    ("I", "SELECT 1; DELETE FROM t", 1),  # the first word is not a write
    ("I", "BEGIN; INSERT INTO t VALUES (1); COMMIT", 1),
    ("I", "CREATE TABLE n (i int); INSERT INTO n VALUES (1)", 1),
    ("T", "INSERT INTO t VALUES (1); COMMIT", 1),  # it ends the block: no marker before it
    ("T", "UPDATE t SET v = 1; UPDATE t SET v = 2", 0),  # the block's COMMIT gets the marker
])
def test_a_multi_statement_query_that_may_commit_a_write_is_counted_unmarked(tx, sql, unmarked):
    inj = Injector(session_in(tx), 7, 3, counters())
    batch = wire(m.Query(sql))
    assert planned(inj, batch) == batch
    assert inj.unmarked == unmarked


def test_a_write_pipelined_behind_another_request_is_counted_unmarked():
    """Nothing is planned for a Query sent while another is in flight: a write or a
    COMMIT there commits unmarked, behind the sync points ahead of it."""
    s = session_in("I")
    inj = Injector(s, 7, 3, counters())
    planned(inj, wire(m.Query("SELECT pg_sleep(1)"), m.Query("INSERT INTO t VALUES (1)")))
    assert inj.mode == InjectMode.NONE and inj.unmarked == 2
    feed_server(s, wire(m.CommandComplete("SELECT 1"), m.ReadyForQuery("I")))
    inj.unmarked -= 1  # what the relay does at each ReadyForQuery
    planned(inj, wire(m.Query("SELECT 2")))  # nothing written: nothing more counted
    assert inj.unmarked == 1


def test_an_implicit_transaction_with_a_statement_of_unknown_text_is_counted_unmarked():
    s = session_in("I")
    s.frontend_streamed(ord("P"), b"\0INSERT INTO t VALUES ('xxxx")  # the head of a streamed Parse
    inj = Injector(s, 7, 3, counters())
    batch = wire(m.Bind("", ""), m.Execute(""), m.Sync())
    assert planned(inj, batch) == batch
    assert inj.unmarked == 1


def test_unmarkable_counts_the_sync_points_the_shadow_has_pending():
    s = session_in("I")
    inj = Injector(s, 7, 3, counters())
    feed_client(s, wire(m.Query("SELECT 1"), m.Parse("", "SELECT 2"), m.Bind("", ""), m.Execute(""), m.Sync()))
    inj.unmarkable()
    assert inj.unmarked == 3  # the Query's and the Sync's ReadyForQuery, then its own


def test_strip_keeps_the_parts_of_a_streamed_row_byte_exact():
    """An autocommit INSERT ... RETURNING whose row is streamed: the later parts of the
    row have no header in the batch; when strip() drops the marker's replies after them,
    they are copied as they are."""
    inj = Injector(session_in("I"), 7, 3, counters())
    planned(inj, wire(m.Query("INSERT INTO t VALUES (1) RETURNING v")))
    assert inj.mode == InjectMode.NAMED
    part = b"rest-of-a-long-row"
    theirs = wire(m.CommandComplete("INSERT 0 1"))
    ours = wire(m.RowDescription((m.FieldDescription(markers.MARKER_COLUMN),)), m.DataRow((b"1",)),
                m.CommandComplete("SELECT 1"))  # fmt: skip
    ready = wire(m.ReadyForQuery("I"))
    batch = part + theirs + ours + ready
    frames = [(STREAM_LAST | ord("D"), 0, len(part)),
              *((t, a + len(part), b + len(part)) for t, a, b in frames_of(theirs + ours + ready))]  # fmt: skip
    out, kept, _ = inj.strip(batch, frames, False)
    assert out == part + theirs + ready
    assert [t for t, _, _ in kept] == [STREAM_LAST | ord("D"), ord("C"), ord("Z")]
    assert out[kept[0][1]:kept[0][2]] == part and out[kept[1][1] - 5:kept[1][2]] == theirs
    assert inj.marked


def test_hold_stops_holding_at_a_streamed_row():
    inj = Injector(session_in("I"), 7, 3, counters())
    first = wire(m.RowDescription((m.FieldDescription("v"),)))
    assert inj.hold(first, frames_of(first)) == (b"", [])
    head = b"D" + (100_000).to_bytes(4, "big") + b"\0\1" + b"x" * 10
    out, frames = inj.hold(head, [(STREAM_HEAD | ord("D"), 5, len(head))])
    assert out == first + head and inj.stash is None
    # the batch that ends the write ends the pause: the next write's results are held again
    end = b"rest" + wire(m.CommandComplete("INSERT 0 1"), m.ReadyForQuery("I"))
    frames = [(STREAM_LAST | ord("D"), 0, 4), *((t, a + 4, b + 4) for t, a, b in frames_of(end[4:]))]
    assert inj.hold(end, frames) == (end, frames) and inj.stash == bytearray()
    second = wire(m.CommandComplete("INSERT 0 1"))
    assert inj.hold(second, frames_of(second)) == (b"", [])


def relayed(inj: Injector, batch: bytes) -> None:
    """Plan a client batch as the relay does (connmgr/proxy/relay.py Upstream.process): the
    first request that takes a plan gets it; a Query or Sync behind an injection or a
    planned request is looked at by unplanned_query/unplanned_sync."""
    plan = None
    for tag, start, end in frames_of(batch):
        if tag in b"QS":
            if plan is None and not inj.mode:
                plan = (inj.plan_query(batch, start, end, 4, 1.5) if tag == ord("Q")
                        else inj.plan_sync(start, 4, 1.5))  # fmt: skip
            elif tag == ord("Q"):
                inj.unplanned_query(batch, start, end)
            else:
                inj.unplanned_sync()
        elif tag in b"PB" and plan is None and not inj.mode:
            plan = inj.plan_extended(tag, batch, start, end, 4, 1.5)
        inj.session.frontend_message(tag, batch[start:end])
    if plan is not None:
        inj.apply(batch, plan)


def ext(sql: str) -> tuple:
    return m.Parse("", sql), m.Bind("", ""), m.Execute(""), m.Sync()


@pytest.mark.parametrize(("tx", "batch", "unmarked"), [
    # pipelined: a write's segment behind a Sync still in flight
    ("I", (*ext("SELECT 1"), *ext("INSERT INTO t VALUES (1)")), 2),
    ("I", (*ext("SELECT 1"), *ext("SELECT 2")), 0),
    # a COMMIT behind other requests of its own segment, in a block
    ("T", (m.Parse("", "UPDATE t SET v = 1"), m.Bind("", ""), m.Execute(""),
           m.Parse("", "COMMIT"), m.Bind("", ""), m.Execute(""), m.Sync()), 1),
    # BEGIN ... COMMIT in one segment
    ("I", (m.Parse("", "BEGIN"), m.Bind("", ""), m.Execute(""), m.Parse("", "INSERT INTO t VALUES (1)"),
           m.Bind("", ""), m.Execute(""), m.Parse("", "COMMIT"), m.Bind("", ""), m.Execute(""), m.Sync()), 1),
    # a COMMIT first in its segment gets a marker before it (pgbench -M extended): not counted
    ("T", ext("END"), 0),
    # an autocommit write alone gets its marker (EXT_TAIL): not counted
    ("I", ext("INSERT INTO t VALUES (1)"), 0),
])  # fmt: skip
def test_extended_segments_that_commit_unmarked_are_counted(tx, batch, unmarked):
    inj = Injector(session_in(tx), 7, 3, counters())
    relayed(inj, wire(*batch))
    assert inj.unmarked == unmarked
