"""The import queue: transactions cut from the mirror stream, purged by poster records."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.import_queue import (
    Event,
    IllegalTransition,
    ImportQueue,
    MirroredMessage,
    Outcome,
    QueueOverflow,
    SessionDesync,
    SessionNotReplayable,
    Transaction,
    next_outcome,
)
from shadow import messages as m


@dataclass(frozen=True, slots=True)
class PosterRecord:
    """The shape of a decoded commit from the replication stream (as the poster queue
    will deliver it)."""

    xid: int
    first_lsn: int
    commit_lsn: int
    end_lsn: int
    messages: tuple[tuple[str, bytes], ...] = ()


def commit_record(sid: int, seq: int, *, xid: int = 1000, lsn: int = 0) -> PosterRecord:
    marker = ("connmgr", f"{sid}:{seq}".encode())
    return PosterRecord(xid, lsn, lsn, lsn + 1, (marker,))


RFQ_I, RFQ_T, RFQ_E = (m.ready_for_query(s) for s in "ITE")
ERROR = m.error_response("23505", "duplicate key value", severity="ERROR")
PARSE_OK = m.ParseComplete().encode()
BIND_OK = m.BindComplete().encode()
BIND = m.Bind("", "").encode()
EXECUTE = m.Execute("").encode()
SYNC = m.sync()


def cc(tag: str) -> bytes:
    return m.command_complete(tag)


def parse(sql: str) -> bytes:
    return m.Parse("", sql).encode()


def extended(sql: str) -> tuple[bytes, ...]:
    return (parse(sql), BIND, EXECUTE, SYNC)


class Mirror:
    """One session's mirror stream into a queue: each call sends messages tagged with one
    LSN, as the primary connmgr would."""

    def __init__(self, q: ImportQueue, sid: int) -> None:
        self.q = q
        self.sid = sid
        self.version = 0
        self.offset = {"c": 0, "b": 0}

    def _msg(self, direction: str, raw: bytes, lsn: int, tag: int | None = None) -> MirroredMessage:
        self.version += 1
        msg = MirroredMessage(
            self.sid, self.version, direction, lsn, self.offset[direction],
            raw[0] if tag is None else tag, raw,
        )  # fmt: skip
        self.offset[direction] += len(raw)
        return msg

    def client(self, *raws: bytes, lsn: int, tag: int | None = None) -> None:
        for raw in raws:
            self.q.on_client_message(self._msg("c", raw, lsn, tag))

    def backend(self, *raws: bytes, lsn: int) -> list[Transaction]:
        left: list[Transaction] = []
        for raw in raws:
            left += self.q.on_backend_message(self._msg("b", raw, lsn))
        return left


def raws(msgs: list[MirroredMessage]) -> list[bytes]:
    return [msg.raw for msg in msgs]


def assert_empty(q: ImportQueue) -> None:
    assert q.open_transactions() == []
    assert q.messages == 0 and q.bytes == 0
    assert q.early_records == 0


# --------------------------------------------------------------------------- seed 004


def test_seed_004_figure_8() -> None:
    """[0078]-[0080] literally: P1 at location 5 acknowledged at 18, P2 (the commit) at
    36 acknowledged at 42, O1 and O2 at 10 and 17, and commit C1 inside P2's range. The
    marker in C1 names (session, 1); transaction 1 is purged and P3 remains."""
    q = ImportQueue(range_check=True)
    w = Mirror(q, 7)
    p1 = m.query("BEGIN; INSERT INTO t VALUES (1), (2)")
    w.client(p1, lsn=5)
    assert w.backend(cc("BEGIN"), cc("INSERT 0 2"), RFQ_T, lsn=18) == []  # P1a
    w.client(m.query("COMMIT"), lsn=36)  # P2
    q.on_marker_sent(7, 1)
    [t1] = q.open_transactions()
    assert (t1.seq, t1.outcome, t1.marked) == (1, Outcome.COMMIT_SENT, True)
    assert w.backend(cc("COMMIT"), RFQ_I, lsn=42) == []  # P2a: committed, waits for C1
    assert t1.outcome is Outcome.COMMITTED_ACK
    assert (t1.first_lsn, t1.ack_lsn) == (5, 42)
    # the seed's per-packet ranges can still be read off the transaction
    assert t1.requests[0].lsn <= 10 <= 17 <= t1.responses[2].lsn  # O1, O2 within P1's 5-18
    p3 = m.query("BEGIN; UPDATE t SET x = 3")
    w.client(p3, lsn=50)
    c1 = PosterRecord(xid=700, first_lsn=10, commit_lsn=40, end_lsn=41,
                      messages=(("connmgr", b"7:1"),))  # fmt: skip
    assert t1.requests[1].lsn <= c1.commit_lsn <= t1.ack_lsn  # C1 is within P2's 36-42

    assert q.on_poster_record(c1) == [t1]
    assert (t1.xid, t1.commit_lsn) == (700, 40)
    assert raws(t1.requests) == [p1, m.query("COMMIT")]
    assert raws(t1.responses) == [cc("BEGIN"), cc("INSERT 0 2"), RFQ_T, cc("COMMIT"), RFQ_I]
    [t2] = q.open_transactions()
    assert (t2.seq, t2.first_lsn, t2.outcome) == (2, 50, Outcome.OPEN)
    assert raws(t2.requests) == [p3] and t2.responses == []
    assert (q.messages, q.bytes) == (1, len(p3))
    assert q.stats.purged == 1
    assert (q.stats.unmatched_commits, q.stats.range_ambiguous, q.stats.range_misses) == (0, 0, 0)


def test_eight_sessions_with_overlapping_ranges() -> None:
    """Every session's [first, ack] range overlaps the others', so a commit LSN alone names
    several transactions; the marker names exactly one."""
    q = ImportQueue(range_check=True)
    sessions = [Mirror(q, sid) for sid in range(101, 109)]
    rng = random.Random(8)
    lsn = 100
    commit_lsn: dict[int, int] = {}
    steps = [
        (m.query("BEGIN"), (cc("BEGIN"), RFQ_T)),
        (m.query("INSERT INTO t VALUES (1)"), (cc("INSERT 0 1"), RFQ_T)),
        (m.query("COMMIT"), (cc("COMMIT"), RFQ_I)),
    ]
    for request, replies in steps:
        order = sessions[:]
        rng.shuffle(order)
        for w in order:
            lsn += 3
            w.client(request, lsn=lsn)
            if request == m.query("COMMIT"):
                q.on_marker_sent(w.sid, 1)
                commit_lsn[w.sid] = lsn + 1  # the server commits between request and ack
        rng.shuffle(order)
        for w in order:
            lsn += 3
            assert w.backend(*replies, lsn=lsn) == []
    assert q.transactions == 8
    assert all(t.outcome is Outcome.COMMITTED_ACK for t in q.open_transactions())

    for n, sid in enumerate(sorted(commit_lsn, key=commit_lsn.get)):  # commit order
        before = q.depths()
        [purged] = q.on_poster_record(commit_record(sid, 1, xid=5000 + n, lsn=commit_lsn[sid]))
        assert (purged.session_id, purged.seq, purged.xid) == (sid, 1, 5000 + n)
        after = q.depths()
        assert sid not in after or after[sid] == 0
        assert {k: v for k, v in before.items() if k != sid} == {
            k: v for k, v in after.items() if k != sid
        }
    assert_empty(q)
    assert q.stats.purged == 8
    assert q.stats.range_ambiguous > 0  # ranges alone would not have told them apart


# ---------------------------------------------------------------------- orderings


def test_record_before_the_ack() -> None:
    q = ImportQueue()
    w = Mirror(q, 1)
    w.client(m.query("BEGIN"), lsn=1)
    w.backend(cc("BEGIN"), RFQ_T, lsn=2)
    w.client(m.query("INSERT INTO t VALUES (1)"), lsn=3)
    w.backend(cc("INSERT 0 1"), RFQ_T, lsn=4)
    w.client(m.query("COMMIT"), lsn=5)
    q.on_marker_sent(1, 1)
    # the replication stream is faster than the mirror
    assert q.on_poster_record(commit_record(1, 1, xid=77, lsn=6)) == []
    [t] = q.open_transactions()
    assert (t.outcome, t.xid, t.commit_lsn) == (Outcome.COMMIT_SENT, 77, 6)
    # the client still waits for its answer: the transaction leaves at the ack
    assert w.backend(cc("COMMIT"), RFQ_I, lsn=8) == [t]
    assert t.outcome is Outcome.COMMITTED_ACK and t.ack_lsn == 8
    assert_empty(q)
    assert q.stats.purged == 1


def test_record_before_the_transaction_starts() -> None:
    q = ImportQueue()
    # a record for session 9 arrives before anything of session 9 is mirrored
    assert q.on_poster_record(commit_record(9, 1, xid=5)) == []
    assert q.early_records == 1 and q.stats.early_records == 1
    w = Mirror(q, 9)
    w.client(m.query("INSERT INTO t VALUES (1)"), lsn=10)
    assert q.early_records == 0  # attached when the transaction started
    [t] = q.open_transactions()
    assert (t.xid, t.marked) == (5, True)
    assert w.backend(cc("INSERT 0 1"), RFQ_I, lsn=11) == [t]
    assert t.outcome is Outcome.COMMITTED_ACK
    assert_empty(q)
    # a record for a later transaction of a live session waits as well
    q.on_poster_record(commit_record(9, 3, xid=6))
    w.client(m.query("INSERT INTO t VALUES (2)"), lsn=12)
    q.on_marker_sent(9, 2)
    w.backend(cc("INSERT 0 1"), RFQ_I, lsn=13)
    assert q.depth(9) == 1 and q.early_records == 1
    q.on_poster_record(commit_record(9, 2, xid=7))
    w.client(m.query("INSERT INTO t VALUES (3)"), lsn=14)
    [t3] = w.backend(cc("INSERT 0 1"), RFQ_I, lsn=15)
    assert (t3.seq, t3.xid) == (3, 6)
    assert_empty(q)


def test_early_records_are_bounded() -> None:
    q = ImportQueue(max_early_records=2)
    for sid in (1, 2, 3):
        q.on_poster_record(commit_record(sid, 1))
    assert q.early_records == 2 and q.stats.early_evicted == 1
    q.on_session_closed(2)  # takes its early record with it
    assert q.early_records == 1
    q.on_poster_record(commit_record(2, 1))  # a closed session: stale, not early
    assert q.early_records == 1 and q.stats.stale_markers == 1


def test_marker_notice_ahead_of_the_transaction() -> None:
    q = ImportQueue()
    w = Mirror(q, 4)
    w.client(m.query("SELECT 1"), lsn=1)
    q.on_marker_sent(4, 2)  # transaction 2 has not reached the server yet
    [read_only] = w.backend(cc("SELECT 1"), RFQ_I, lsn=2)
    assert read_only.outcome is Outcome.READ_ONLY
    w.client(m.query("INSERT INTO t VALUES (1)"), lsn=3)
    [t] = q.open_transactions()
    assert (t.seq, t.marked) == (2, True)
    assert w.backend(cc("INSERT 0 1"), RFQ_I, lsn=4) == []
    q.on_marker_sent(4, 1)  # too late: transaction 1 has left
    assert q.stats.late_marker_notices == 1


# ------------------------------------------------------------------------ outcomes


def test_rollback() -> None:
    q = ImportQueue()
    w = Mirror(q, 1)
    w.client(m.query("BEGIN"), lsn=1)
    w.backend(cc("BEGIN"), RFQ_T, lsn=2)
    w.client(m.query("INSERT INTO t VALUES (1)"), lsn=3)
    q.on_marker_sent(1, 1)  # it wrote; the marker goes with the rollback
    w.backend(cc("INSERT 0 1"), RFQ_T, lsn=4)
    w.client(m.query("ROLLBACK"), lsn=5)
    [t] = q.open_transactions()
    assert t.outcome is Outcome.OPEN  # a rollback is not a commit request
    assert w.backend(cc("ROLLBACK"), RFQ_I, lsn=6) == [t]
    assert t.outcome is Outcome.ROLLED_BACK
    assert_empty(q)
    assert q.stats.rollback_purges == 1
    # no record can name it; one that did would be stale
    q.on_poster_record(commit_record(1, 1))
    assert q.stats.stale_markers == 1


def test_failed_transaction_commit_answers_rollback() -> None:
    q = ImportQueue()
    w = Mirror(q, 1)
    w.client(m.query("BEGIN"), lsn=1)
    w.backend(cc("BEGIN"), RFQ_T, lsn=2)
    w.client(m.query("INSERT INTO t VALUES (1)"), lsn=3)
    q.on_marker_sent(1, 1)
    w.backend(ERROR, RFQ_E, lsn=4)
    w.client(m.query("COMMIT"), lsn=5)
    [t] = q.open_transactions()
    assert t.outcome is Outcome.COMMIT_SENT and t.in_block
    assert w.backend(cc("ROLLBACK"), RFQ_I, lsn=6) == [t]  # COMMIT of a failed block
    assert t.outcome is Outcome.ROLLED_BACK
    assert_empty(q)


def test_commit_that_fails_is_a_rollback() -> None:
    """A deferred constraint fails at COMMIT: an ErrorResponse and ReadyForQuery 'I'."""
    q = ImportQueue()
    w = Mirror(q, 1)
    w.client(m.query("BEGIN"), lsn=1)
    w.backend(cc("BEGIN"), RFQ_T, lsn=2)
    w.client(m.query("COMMIT"), lsn=3)
    q.on_marker_sent(1, 1)
    [t] = w.backend(ERROR, RFQ_I, lsn=4)
    assert t.outcome is Outcome.ROLLED_BACK


def test_one_query_with_several_statements() -> None:
    """The commit estimate works on the first statement; the ack decides. An error after
    the COMMIT belongs to a later implicit transaction and does not undo the commit."""
    q = ImportQueue()
    w = Mirror(q, 1)
    w.client(m.query("BEGIN; INSERT INTO t VALUES (1); COMMIT"), lsn=1)
    q.on_marker_sent(1, 1)
    [t1] = q.open_transactions()
    assert t1.outcome is Outcome.OPEN  # it starts with BEGIN
    w.backend(cc("BEGIN"), cc("INSERT 0 1"), cc("COMMIT"), RFQ_I, lsn=2)
    assert t1.outcome is Outcome.COMMITTED_ACK
    w.client(m.query("BEGIN"), lsn=3)
    w.backend(cc("BEGIN"), RFQ_T, lsn=4)
    w.client(m.query("COMMIT; SELECT 1/0"), lsn=5)
    q.on_marker_sent(1, 2)
    assert w.backend(cc("COMMIT"), ERROR, RFQ_I, lsn=6) == []
    t2 = q.open_transactions()[1]
    assert (t2.seq, t2.outcome) == (2, Outcome.COMMITTED_ACK)


def test_read_only() -> None:
    q = ImportQueue()
    w = Mirror(q, 1)
    w.client(m.query("BEGIN"), lsn=1)
    w.backend(cc("BEGIN"), RFQ_T, lsn=2)
    w.client(m.query("SELECT 1"), lsn=3)
    w.backend(m.row_description(["x"]), m.data_row(["1"]), cc("SELECT 1"), RFQ_T, lsn=4)
    w.client(m.query("COMMIT"), lsn=5)
    [t] = w.backend(cc("COMMIT"), RFQ_I, lsn=6)  # no marker: nothing to wait for
    assert t.outcome is Outcome.READ_ONLY
    w.client(m.query("SELECT 2"), lsn=7)
    [t2] = w.backend(cc("SELECT 1"), RFQ_I, lsn=8)  # autocommit, read only
    assert (t2.seq, t2.outcome) == (2, Outcome.READ_ONLY)
    assert_empty(q)
    assert q.stats.read_only_purges == 2


def test_autocommit_writes() -> None:
    q = ImportQueue()
    w = Mirror(q, 1)
    w.client(m.query("INSERT INTO t VALUES (1)"), lsn=1)
    [t1] = q.open_transactions()
    assert t1.outcome is Outcome.COMMIT_SENT  # it commits when it succeeds
    q.on_marker_sent(1, 1)
    assert w.backend(cc("INSERT 0 1"), RFQ_I, lsn=2) == []
    assert t1.outcome is Outcome.COMMITTED_ACK
    w.client(m.query("INSERT INTO t VALUES (1)"), lsn=3)
    q.on_marker_sent(1, 2)
    [t2] = w.backend(ERROR, RFQ_I, lsn=4)  # failed: rolled back, leaves at once
    assert (t2.seq, t2.outcome) == (2, Outcome.ROLLED_BACK)
    assert q.open_transactions() == [t1]
    assert q.on_poster_record(commit_record(1, 1, xid=9)) == [t1]
    assert_empty(q)


def test_prepare_transaction_leaves_at_its_ack() -> None:
    q = ImportQueue()
    w = Mirror(q, 1)
    w.client(m.query("BEGIN"), lsn=1)
    w.backend(cc("BEGIN"), RFQ_T, lsn=2)
    w.client(m.query("PREPARE TRANSACTION 'x'"), lsn=3)
    q.on_marker_sent(1, 1)
    [t] = w.backend(cc("PREPARE TRANSACTION"), RFQ_I, lsn=4)
    assert t.outcome is Outcome.PREPARED
    assert_empty(q)


def test_unmatched_commits_are_counted() -> None:
    q = ImportQueue()
    assert q.on_poster_record(PosterRecord(1, 1, 1, 2)) == []
    assert q.on_poster_record(PosterRecord(2, 3, 3, 4, (("other", b"1:1"),))) == []
    assert q.on_poster_record(PosterRecord(3, 5, 5, 6, (("connmgr", b"nonsense"),))) == []
    assert q.stats.unmatched_commits == 3 and q.stats.bad_markers == 1
    assert q.early_records == 0


# --------------------------------------------------------------------- pipelining


def test_pipelined_extended_protocol() -> None:
    """Three autocommit Parse/Bind/Execute/Sync sent at once, then the replies: each
    Sync's ReadyForQuery 'I' ends one transaction."""
    q = ImportQueue()
    w = Mirror(q, 3)
    sqls = [f"INSERT INTO t VALUES ({i})" for i in range(3)]
    lsn = 0
    for sql in sqls:
        for raw in extended(sql):
            lsn += 1
            w.client(raw, lsn=lsn)
    for seq in (1, 2, 3):
        q.on_marker_sent(3, seq)
    # the server is on the first Sync; the rest belongs to no transaction yet
    [t1] = q.open_transactions()
    assert raws(t1.requests) == list(extended(sqls[0]))
    assert raws(q.pipelined_requests(3)) == list(extended(sqls[1]) + extended(sqls[2]))
    held = []
    for i in range(3):
        assert w.backend(PARSE_OK, BIND_OK, cc("INSERT 0 1"), RFQ_I, lsn=100 + i) == []
        held = q.open_transactions()
        assert len(held) == (i + 2 if i < 2 else 3)
    assert [t.seq for t in held] == [1, 2, 3]
    assert [t.first_lsn for t in held] == [1, 5, 9]
    for t, sql in zip(held, sqls, strict=True):
        assert raws(t.requests) == list(extended(sql))
        assert raws(t.responses) == [PARSE_OK, BIND_OK, cc("INSERT 0 1"), RFQ_I]
        assert t.outcome is Outcome.COMMITTED_ACK
    assert q.pipelined_requests(3) == []
    for seq in (2, 1, 3):
        [t] = q.on_poster_record(commit_record(3, seq, xid=seq))
        assert t.seq == seq
    assert_empty(q)


def test_pipeline_inside_a_block_is_one_transaction() -> None:
    q = ImportQueue()
    w = Mirror(q, 3)
    for sql in ("BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"):
        w.client(*extended(sql), lsn=1)
    q.on_marker_sent(3, 1)
    w.backend(PARSE_OK, BIND_OK, cc("BEGIN"), RFQ_T, lsn=2)
    w.backend(PARSE_OK, BIND_OK, cc("INSERT 0 1"), RFQ_T, lsn=3)
    [t] = q.open_transactions()
    assert t.outcome is Outcome.COMMIT_SENT and len(t.requests) == 12
    assert w.backend(PARSE_OK, BIND_OK, cc("COMMIT"), RFQ_I, lsn=4) == []
    assert (t.seq, t.outcome) == (1, Outcome.COMMITTED_ACK)
    assert q.on_poster_record(commit_record(3, 1)) == [t]
    assert_empty(q)


def test_copy_in_extended_swallows_the_pipelined_sync() -> None:
    """libpq sends Execute+Sync before it knows the statement is a COPY; the server ignores
    that Sync in copy-in and answers the one after CopyDone."""
    q = ImportQueue()
    w = Mirror(q, 5)
    w.client(*extended("COPY t FROM STDIN"), lsn=1)
    w.backend(PARSE_OK, BIND_OK, m.CopyInResponse(0, (0,)).encode(), lsn=2)
    data = m.CopyData(b"1\n").encode()
    w.client(data, data, m.CopyDone().encode(), SYNC, lsn=3)
    w.client(m.query("SELECT 1"), lsn=4)  # pipelined behind the COPY
    q.on_marker_sent(5, 1)
    assert w.backend(cc("COPY 2"), RFQ_I, lsn=5) == []  # committed, waits for its record
    t, t2 = q.open_transactions()  # the SELECT has reached the server: transaction 2
    assert t.outcome is Outcome.COMMITTED_ACK
    assert raws(t.requests) == [*extended("COPY t FROM STDIN"), data, data,
                                m.CopyDone().encode(), SYNC]  # fmt: skip
    assert q.on_poster_record(commit_record(5, 1)) == [t]
    assert (t2.seq, raws(t2.requests)) == (2, [m.query("SELECT 1")])
    assert w.backend(cc("SELECT 1"), RFQ_I, lsn=6) == [t2]
    assert_empty(q)


def test_failed_simple_copy_leaves_no_phantom_transaction() -> None:
    q = ImportQueue()
    w = Mirror(q, 5)
    w.client(m.query("COPY t FROM STDIN"), lsn=1)
    w.backend(m.CopyInResponse(0, (0,)).encode(), lsn=2)
    w.client(m.CopyData(b"x\n").encode(), lsn=3)
    [t] = w.backend(ERROR, RFQ_I, lsn=4)
    assert t.outcome is Outcome.ROLLED_BACK
    # the rest of the copy data was already on its way; the server ignores it
    w.client(m.CopyData(b"y\n").encode(), m.CopyDone().encode(), lsn=5)
    assert_empty(q)
    w.client(m.query("SELECT 1"), lsn=6)
    [t2] = w.backend(cc("SELECT 1"), RFQ_I, lsn=7)
    assert t2.seq == 2 and raws(t2.requests) == [m.query("SELECT 1")]


def test_startup_is_not_a_transaction() -> None:
    q = ImportQueue()
    w = Mirror(q, 6)
    startup = m.startup_message({"user": "alice", "database": "app"})
    w.client(startup, lsn=1, tag=0)
    w.backend(m.AuthenticationMD5Password(b"salt").encode(), lsn=1)
    w.client(m.password_message("secret"), lsn=1)
    w.backend(m.authentication_ok(), m.parameter_status("TimeZone", "UTC"),
              m.backend_key_data(1, 2), RFQ_I, lsn=2)  # fmt: skip
    assert q.open_transactions() == []
    assert raws(q.setup_messages(6)) == [
        startup,
        m.parameter_status("TimeZone", "UTC"),
        m.backend_key_data(1, 2),
    ]  # no password, no Authentication
    w.client(m.query("SELECT 1"), lsn=3)
    [t] = w.backend(cc("SELECT 1"), RFQ_I, lsn=4)
    assert t.seq == 1


def test_session_opened_without_its_start_up_mirrored() -> None:
    q = ImportQueue()
    q.on_session_opened(6)
    w = Mirror(q, 6)
    w.backend(m.parameter_status("TimeZone", "UTC"), RFQ_I, lsn=1)  # the tail of start-up
    w.client(m.query("SELECT 1"), lsn=2)
    assert w.backend(cc("SELECT 1"), RFQ_I, lsn=3)[0].seq == 1
    q.on_session_opened(7)
    v = Mirror(q, 7)
    v.client(m.query("SELECT 1"), lsn=4)  # not even the ReadyForQuery: the request ends it
    assert v.backend(cc("SELECT 1"), RFQ_I, lsn=5)[0].seq == 1
    assert q.open_transactions() == []
    assert q.messages == 1  # session 6's ParameterStatus, kept until it closes
    assert raws(q.setup_messages(6)) == [m.parameter_status("TimeZone", "UTC")]


# ------------------------------------------------------------------ sessions, bounds


def test_session_closed_with_an_open_transaction() -> None:
    q = ImportQueue()
    w = Mirror(q, 1)
    other = Mirror(q, 2)
    other.client(m.query("BEGIN"), lsn=1)
    w.client(m.query("BEGIN"), lsn=1)
    w.backend(cc("BEGIN"), RFQ_T, lsn=2)
    w.client(m.query("INSERT INTO t VALUES (1)"), lsn=3)
    q.on_marker_sent(1, 1)
    [t] = q.on_session_closed(1)
    assert t.outcome is Outcome.OPEN
    assert q.stats.dropped_at_close == 1
    assert q.depths() == {2: 1}
    assert q.messages == 1
    q.on_poster_record(commit_record(1, 1))  # cannot happen; if it did, it is stale
    assert q.stats.stale_markers == 1 and q.early_records == 0


def test_overflow_drops_that_session_alone() -> None:
    q = ImportQueue(max_messages_per_session=5)
    a, b = Mirror(q, 1), Mirror(q, 2)
    b.client(m.query("BEGIN"), lsn=1)
    a.client(m.query("BEGIN"), lsn=1)
    a.backend(cc("BEGIN"), RFQ_T, lsn=2)
    a.client(m.query("INSERT INTO t VALUES (1)"), lsn=3)
    a.backend(cc("INSERT 0 1"), lsn=4)
    with pytest.raises(QueueOverflow) as info:
        a.backend(RFQ_T, lsn=4)  # the sixth message
    err = info.value
    assert isinstance(err, SessionNotReplayable)
    assert (err.session_id, err.sqlstate) == (1, "40001")
    assert "5 messages" in str(err)
    assert not q.is_replayable(1) and q.is_replayable(2)
    assert q.depths() == {2: 1} and q.messages == 1
    # later messages of that session are ignored, not raised again
    a.client(m.query("COMMIT"), lsn=5)
    assert a.backend(cc("COMMIT"), RFQ_I, lsn=6) == []
    assert q.stats.overflows == 1 and q.depths() == {2: 1}
    q.on_session_closed(1)
    assert q.is_replayable(1)


def test_overflow_of_bytes_and_sessions() -> None:
    q = ImportQueue(max_sessions=2, max_bytes_per_session=100, max_total_bytes=150)
    Mirror(q, 1).client(m.query("x" * 60), lsn=1)
    with pytest.raises(QueueOverflow, match="100 bytes"):
        Mirror(q, 1).client(m.query("y" * 60), lsn=2)
    Mirror(q, 2).client(m.query("x" * 60), lsn=1)
    Mirror(q, 3).client(m.query("x" * 60), lsn=1)
    with pytest.raises(QueueOverflow, match="more than 2 sessions"):
        Mirror(q, 4).client(m.query("x"), lsn=1)
    with pytest.raises(QueueOverflow, match="150 bytes in all") as info:
        Mirror(q, 3).client(m.query("z" * 20), lsn=2)  # session 3 crossed the total
    assert info.value.session_id == 3
    assert q.depths() == {2: 1} and q.bytes == len(m.query("x" * 60))


def test_desync_drops_that_session_alone() -> None:
    q = ImportQueue()
    a, b = Mirror(q, 1), Mirror(q, 2)
    b.client(m.query("SELECT 1"), lsn=1)
    a.client(m.query("SELECT 1"), lsn=1)
    a.backend(cc("SELECT 1"), RFQ_I, lsn=2)
    with pytest.raises(SessionDesync, match="no request pending"):
        a.backend(RFQ_I, lsn=3)
    assert not q.is_replayable(1)
    assert [t.session_id for t in q.open_transactions()] == [2]


def test_the_outcome_table() -> None:
    assert next_outcome(Outcome.OPEN, Event.COMMIT_REQUEST) is Outcome.COMMIT_SENT
    assert next_outcome(Outcome.COMMIT_SENT, Event.STILL_OPEN) is Outcome.OPEN
    assert next_outcome(Outcome.COMMIT_SENT, Event.ACK_ROLLBACK) is Outcome.ROLLED_BACK
    assert next_outcome(Outcome.COMMITTED_ACK, Event.RECORD) is Outcome.COMMITTED_ACK
    with pytest.raises(
        IllegalTransition, match="'poster record' is illegal in state 'rolled back'"
    ):
        next_outcome(Outcome.ROLLED_BACK, Event.RECORD)
    with pytest.raises(IllegalTransition) as info:
        next_outcome(Outcome.COMMITTED_ACK, Event.REQUEST)
    assert (info.value.state, info.value.event) == (Outcome.COMMITTED_ACK, Event.REQUEST)
    for state in (Outcome.READ_ONLY, Outcome.ROLLED_BACK, Outcome.PREPARED):
        for event in Event:
            with pytest.raises(IllegalTransition):
                next_outcome(state, event)


# ------------------------------------------------------------------------- property

KINDS = {
    # kind: (outcome, marked, has a commit record)
    "commit": (Outcome.COMMITTED_ACK, True, True),
    "rollback": (Outcome.ROLLED_BACK, True, False),
    "read_only": (Outcome.READ_ONLY, False, False),
    "failed": (Outcome.ROLLED_BACK, True, False),
    "auto_write": (Outcome.COMMITTED_ACK, True, True),
    "auto_read": (Outcome.READ_ONLY, False, False),
    "auto_fail": (Outcome.ROLLED_BACK, True, False),
}


def unit(sql: str, replies: list[bytes], extended_style: bool) -> tuple[list[bytes], list[bytes]]:
    """One request and its replies, in the simple or the extended protocol."""
    if not extended_style:
        return [m.query(sql)], replies
    if sql.startswith("SELECT") and replies == [ERROR, RFQ_E]:  # aborted block: Parse fails
        return list(extended(sql)), replies
    return list(extended(sql)), [PARSE_OK, BIND_OK, *replies]


def script(kind: str, size: int, styles: list[bool]) -> list[tuple[list[bytes], list[bytes]]]:
    style = iter(styles)
    ins = ("INSERT INTO t VALUES (1)", [cc("INSERT 0 1"), RFQ_T])
    sel = ("SELECT 1", [m.row_description(["x"]), m.data_row(["1"]), cc("SELECT 1"), RFQ_T])
    begin = ("BEGIN", [cc("BEGIN"), RFQ_T])
    if kind == "auto_write":
        steps = [("INSERT INTO t VALUES (1)", [cc("INSERT 0 1"), RFQ_I])]
    elif kind == "auto_read":
        steps = [("SELECT 1", [cc("SELECT 1"), RFQ_I])]
    elif kind == "auto_fail":
        steps = [("INSERT INTO t VALUES (1)", [ERROR, RFQ_I])]
    elif kind == "failed":
        aborted = ("SELECT 1", [ERROR, RFQ_E])
        steps = [begin, ("INSERT INTO t VALUES (1)", [ERROR, RFQ_E]), *[aborted] * size,
                 ("COMMIT", [cc("ROLLBACK"), RFQ_I])]  # fmt: skip
    else:
        body = sel if kind == "read_only" else ins
        end = "ROLLBACK" if kind == "rollback" else "COMMIT"
        steps = [begin, *[body] * size, (end, [cc(end), RFQ_I])]
    return [unit(sql, replies, next(style)) for sql, replies in steps]


txn_strategy = st.tuples(
    st.sampled_from(sorted(KINDS)),
    st.integers(0, 2),
    st.lists(st.booleans(), min_size=5, max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(
    sessions=st.lists(st.lists(txn_strategy, max_size=5), min_size=1, max_size=4),
    foreign_commits=st.integers(0, 3),
    rng=st.randoms(use_true_random=False),
)
def test_queue_holds_only_what_is_in_flight(sessions, foreign_commits, rng) -> None:
    """Sessions run random transactions; their messages interleave at random (clients
    pipeline freely, replies follow their requests) and poster records arrive at any time,
    before or after the acks. At every step the queue holds no more transactions than are
    in flight; at the end it is empty and every transaction left once, with its own
    messages and the outcome its kind implies."""
    q = ImportQueue(max_early_records=10_000, range_check=True)
    # per session: client messages, backend events, and per unit the index of its last
    # client message (its replies may flow only after it)
    client: dict[int, list[tuple[bytes, int]]] = {}
    backend: dict[int, list[tuple[str, object, int]]] = {}
    expect: dict[tuple[int, int], tuple[Outcome, list[bytes], list[bytes]]] = {}
    needs_record: set[tuple[int, int]] = set()
    txn_of_unit: dict[tuple[int, int], int] = {}
    for sid, txns in enumerate(sessions, start=1):
        cmsgs: list[tuple[bytes, int]] = []
        bevents: list[tuple[str, object, int]] = []
        unit_no = 0
        for seq, (kind, size, styles) in enumerate(txns, start=1):
            outcome, marked, committed = KINDS[kind]
            units = script(kind, size, styles)
            reqs: list[bytes] = []
            reps: list[bytes] = []
            for i, (requests, replies) in enumerate(units):
                cmsgs += [(raw, unit_no) for raw in requests]
                last = i == len(units) - 1
                for j, raw in enumerate(replies):
                    if last and marked and j == len(replies) - 1:
                        bevents.append(("marker", seq, unit_no))
                    bevents.append(("msg", raw, unit_no))
                txn_of_unit[sid, unit_no] = seq
                reqs += requests
                reps += replies
                unit_no += 1
            expect[sid, seq] = (outcome, reqs, reps)
            if committed:
                needs_record.add((sid, seq))
        client[sid] = cmsgs
        backend[sid] = bevents
    mirrors = {sid: Mirror(q, sid) for sid in client}
    cpos = dict.fromkeys(client, 0)
    bpos = dict.fromkeys(client, 0)
    records = sorted(needs_record) + [None] * foreign_commits
    rng.shuffle(records)
    started: set[tuple[int, int]] = set()
    acked: set[tuple[int, int]] = set()
    recorded: set[tuple[int, int]] = set()
    left: dict[tuple[int, int], Transaction] = {}
    lsn = 0

    def sent_through(sid: int) -> int:
        """Units whose client messages have all been sent."""
        pos = cpos[sid]
        msgs = client[sid]
        if pos == len(msgs):
            return msgs[-1][1] + 1 if msgs else 0
        return msgs[pos][1]  # the unit of the next message is not complete

    def take(purged: list[Transaction]) -> None:
        for t in purged:
            key = (t.session_id, t.seq)
            assert key not in left, f"{key} left twice"
            left[key] = t

    while True:
        actions = []
        for sid in client:
            if cpos[sid] < len(client[sid]):
                actions.append(("c", sid))
            if bpos[sid] < len(backend[sid]) and backend[sid][bpos[sid]][2] < sent_through(sid):
                actions.append(("b", sid))
        if records:
            actions.append(("r", None))
        if not actions:
            break
        what, sid = rng.choice(actions)
        lsn += rng.randint(0, 3)
        if what == "c":
            raw, u = client[sid][cpos[sid]]
            cpos[sid] += 1
            started.add((sid, txn_of_unit[sid, u]))
            mirrors[sid].client(raw, lsn=lsn)
        elif what == "b":
            kind, payload, u = backend[sid][bpos[sid]]
            bpos[sid] += 1
            if kind == "marker":
                q.on_marker_sent(sid, payload)
            else:
                take(mirrors[sid].backend(payload, lsn=lsn))
                if payload == RFQ_I:
                    acked.add((sid, txn_of_unit[sid, u]))
        else:
            key = records.pop()
            if key is None:
                assert q.on_poster_record(PosterRecord(1, lsn, lsn, lsn)) == []
            else:
                recorded.add(key)
                take(q.on_poster_record(commit_record(*key, xid=hash(key) & 0xFFFF, lsn=lsn)))
        done = {k for k in acked if k not in needs_record or k in recorded}
        in_flight = len(started - done)
        assert len(q.open_transactions()) <= in_flight
        assert set(left) <= done

    assert_empty(q)
    assert q.sessions == sum(1 for txns in sessions if txns)
    assert set(left) == set(expect)
    for key, t in left.items():
        outcome, reqs, reps = expect[key]
        assert t.outcome is outcome, key
        assert raws(t.requests) == reqs
        assert raws(t.responses) == reps
        assert (t.xid is not None) == (key in needs_record)
    assert q.stats.unmatched_commits == foreign_commits
    assert q.stats.purged == len(needs_record)
    assert q.stats.stale_markers == q.stats.duplicate_records == q.stats.desyncs == 0
    for sid in client:
        q.on_session_closed(sid)
    assert q.sessions == 0
