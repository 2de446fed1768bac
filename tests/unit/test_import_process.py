"""The secondary's import process framing mirrored records: a message may span records,
one too long to keep drops its session from the queue (and only it), and after a Resync
the sessions already open are not framed again from the middle of a message."""

from __future__ import annotations

from connmgr.pair.import_process import ImportProcess
from replay.mirror_protocol import Data, Resync, SessionOpened
from shadow import messages as m

OVER = 64 << 10
STARTUP = (("user", "u"), ("database", "postgres"))


def data(sid: int, offset: int, payload: bytes, direction: str = "c") -> Data:
    return Data(1, sid, direction, 0, offset, payload)


def held(imp: ImportProcess, sid: int) -> list:
    """The client messages the queue holds for session ``sid``."""
    return [x for t in imp.queue.open_transactions(sid) for x in t.requests] + imp.queue.pipelined_requests(sid)


def replies() -> bytes:
    return m.CommandComplete("SELECT 1").encode() + m.ReadyForQuery("I").encode()


def test_a_message_split_across_records_is_queued_once_at_its_offset():
    imp = ImportProcess(max_buffered_message=OVER)
    query = m.Query("SELECT 1").encode()
    imp.on_records([SessionOpened(1, 1, STARTUP), data(1, 100, query[:6]), data(1, 106, query[6:])])
    (msg,) = held(imp, 1)
    assert (msg.offset, msg.raw) == (100, query)
    imp.on_records([data(1, 0, replies(), "b")])
    assert held(imp, 1) == [] and imp.import_errors == 0  # answered: a read leaves at once


def test_a_message_too_long_to_keep_drops_its_session_only():
    imp = ImportProcess(max_buffered_message=OVER)
    big = m.Query("SET application_name = '" + "x" * (2 * OVER) + "'").encode()
    small = m.Query("SELECT 1").encode()
    records = [SessionOpened(1, 1, STARTUP), SessionOpened(2, 2, STARTUP)]
    records += [data(1, i, big[i:i + 10_000]) for i in range(0, len(big), 10_000)]
    records += [data(1, len(big), small), data(2, 0, small)]
    imp.on_records(records)
    assert imp.not_replayable == {1}
    assert imp.queue.stats.overflows == 1
    assert imp.session_state[1].not_movable  # its head was a SET: the rest was never seen
    assert [x.raw for x in held(imp, 2)] == [small]
    assert imp.import_errors == 0


def test_after_a_resync_the_sessions_open_before_it_are_not_framed_mid_message():
    imp = ImportProcess(max_buffered_message=OVER)
    big = m.Query("SELECT '" + "y" * (2 * OVER) + "'").encode()
    imp.on_records([SessionOpened(1, 1, STARTUP), data(1, 0, big[:20_000])])
    # history lost: the next record of session 1 starts in the middle of its long Query
    imp.on_records([Resync(5), data(1, 60_000, big[60_000:]), SessionOpened(6, 2, STARTUP),
                    data(2, 0, m.Query("SELECT 2").encode())])  # fmt: skip
    assert imp.import_errors == 0
    assert held(imp, 1) == []
    assert [x.raw for x in held(imp, 2)] == [m.Query("SELECT 2").encode()]


def test_the_rows_of_a_result_are_held_as_one_message_with_every_byte_counted():
    imp = ImportProcess(max_buffered_message=OVER)
    query = m.Query("SELECT g FROM generate_series(1, 1000) g").encode()
    rows = b"".join(m.DataRow([str(i).encode()]).encode() for i in range(1000))
    head = m.RowDescription([m.FieldDescription("g", 0, 0, 23, 4, -1, 0)]).encode()
    reply = head + rows + m.CommandComplete("SELECT 1000").encode()
    imp.on_records([SessionOpened(1, 1, STARTUP), data(1, 0, query)])
    # the reply in records cut mid-row, as the mirror may cut it
    imp.on_records([data(1, i, reply[i:i + 777], "b") for i in range(0, len(reply), 777)])
    (txn,) = imp.queue.open_transactions(1)
    kinds = [chr(x.tag) for x in txn.responses]
    assert kinds[0] == "T" and kinds[-1] == "C" and set(kinds[1:-1]) == {"D"}
    assert len(kinds) < 1000 // 5  # every record's rows as one (777-byte records: a few rows each)
    assert b"".join(x.raw for x in txn.responses) == reply  # every byte held, in order, at its offset
    assert [x.offset for x in txn.responses] == [sum(len(y.raw) for y in txn.responses[:i])
                                                  for i in range(len(txn.responses))]
    assert txn.nbytes == len(query) + len(reply)
    imp.on_records([data(1, len(reply), m.ReadyForQuery("I").encode(), "b")])
    assert imp.queue.open_transactions(1) == [] and imp.import_errors == 0
