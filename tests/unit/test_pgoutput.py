"""replay.lsn and replay.pgoutput: LSN text, the replication and pgoutput codecs, and the
poster-record assembler -- all from hand-built bytes (struct.pack per the Postgres docs,
"Streaming Replication Protocol" and "Logical Replication Message Formats")."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replay.lsn import format_lsn, parse_lsn
from replay.pgoutput import (
    PG_EPOCH_UNIX_SECONDS,
    UNCHANGED,
    Begin,
    Binary,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    NonTransactionalMessage,
    Origin,
    PgoutputError,
    PosterRecord,
    PrimaryKeepalive,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    TransactionAssembler,
    Truncate,
    Type,
    UnknownMessage,
    Update,
    XLogData,
    decode_pgoutput,
    decode_replication,
    pg_timestamp_from_unix,
    standby_status_update,
    unix_from_pg_timestamp,
)
from shadow.errors import RemoteProtocolError

# ------------------------------------------------------------------ byte builders


def u8(v: int) -> bytes:
    return struct.pack("!B", v)


def i16(v: int) -> bytes:
    return struct.pack("!h", v)


def i32(v: int) -> bytes:
    return struct.pack("!i", v)


def u32(v: int) -> bytes:
    return struct.pack("!I", v)


def u64(v: int) -> bytes:
    return struct.pack("!Q", v)


def i64(v: int) -> bytes:
    return struct.pack("!q", v)


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def tup(*values) -> bytes:
    out = i16(len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        elif isinstance(v, Binary):
            out += b"b" + i32(len(v.data)) + v.data
        else:
            out += b"t" + i32(len(v)) + v
    return out


def sx(xid: int | None) -> bytes:
    """The xid a message carries inside a stream block (nothing outside)."""
    return b"" if xid is None else u32(xid)


def begin(final_lsn: int, xid: int, ts: int = 1000) -> bytes:
    return b"B" + u64(final_lsn) + i64(ts) + u32(xid)


def commit(commit_lsn: int, end_lsn: int, ts: int = 1000, flags: int = 0) -> bytes:
    return b"C" + u8(flags) + u64(commit_lsn) + u64(end_lsn) + i64(ts)


def relation(oid: int, ns: str, name: str, cols=(("id", 23, -1, 1),), ident: bytes = b"d", xid=None) -> bytes:
    out = b"R" + sx(xid) + u32(oid) + cstr(ns) + cstr(name) + ident + i16(len(cols))
    for cname, typ, mod, flags in cols:
        out += u8(flags) + cstr(cname) + u32(typ) + i32(mod)
    return out


def insert(oid: int, *values, xid=None) -> bytes:
    return b"I" + sx(xid) + u32(oid) + b"N" + tup(*values)


def message(prefix: str, content: bytes, lsn: int = 0x500, transactional: bool = True, xid=None) -> bytes:
    return b"M" + sx(xid) + u8(int(transactional)) + u64(lsn) + cstr(prefix) + i32(len(content)) + content


def stream_start(xid: int, first: bool = True) -> bytes:
    return b"S" + u32(xid) + u8(int(first))


def stream_commit(xid: int, commit_lsn: int, end_lsn: int, ts: int = 7) -> bytes:
    return b"c" + u32(xid) + u8(0) + u64(commit_lsn) + u64(end_lsn) + i64(ts)


def stream_abort(xid: int, subxid: int) -> bytes:
    return b"A" + u32(xid) + u32(subxid)


def w(wal_start: int, data: bytes) -> XLogData:
    return XLogData(wal_start, wal_start, 0, data)


# ------------------------------------------------------------------------------ LSN


@pytest.mark.parametrize(
    "text, value",
    [("0/0", 0), ("16/B374D848", 0x16_B374D848), ("0/1", 1), ("1/0", 1 << 32),
     ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1), ("a/b", 0xA_0000000B), ("00000001/000000FF", 0x1_000000FF)],
)  # fmt: skip
def test_parse_lsn(text, value):
    assert parse_lsn(text) == value


@pytest.mark.parametrize(
    "value, text", [(0, "0/0"), (0x16_B374D848, "16/B374D848"), (0xA_0000000B, "A/B"), ((1 << 64) - 1, "FFFFFFFF/FFFFFFFF")]
)
def test_format_lsn(value, text):
    assert format_lsn(value) == text


@pytest.mark.parametrize(
    "garbage",
    ["", "0", "1/", "/1", "0x1/2", "1/0x2", " 1/2", "1/2 ", "+1/2", "-1/2", "1_0/2", "1/2/3",
     "123456789/0", "0/123456789", "g/0", "1 /2", "\uff11/2", "1\n/2", "1/2\n"],
)  # fmt: skip
def test_parse_lsn_rejects_garbage(garbage):
    with pytest.raises(ValueError, match="invalid LSN"):
        parse_lsn(garbage)


@pytest.mark.parametrize("bad", [-1, 1 << 64, True, 1.5, "0/0", None])
def test_format_lsn_rejects_non_lsns(bad):
    with pytest.raises(ValueError):
        format_lsn(bad)


def test_parse_lsn_rejects_non_strings():
    with pytest.raises(ValueError):
        parse_lsn(b"0/0")  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_lsn_int_round_trip(value):
    assert parse_lsn(format_lsn(value)) == value


@given(st.from_regex(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", fullmatch=True))
def test_lsn_text_round_trip_normalises(text):
    hi, lo = text.split("/")
    assert format_lsn(parse_lsn(text)) == f"{int(hi, 16):X}/{int(lo, 16):X}"


# --------------------------------------------------------------- replication messages


def test_decode_xlogdata():
    body = b"w" + u64(0x10) + u64(0x20) + i64(-5) + b"payload"
    assert decode_replication(body) == XLogData(0x10, 0x20, -5, b"payload")
    assert decode_replication(memoryview(body)) == XLogData(0x10, 0x20, -5, b"payload")
    assert decode_replication(b"w" + u64(1) + u64(2) + i64(3)) == XLogData(1, 2, 3, b"")


def test_decode_keepalive():
    assert decode_replication(b"k" + u64(0xABC) + i64(99) + u8(1)) == PrimaryKeepalive(0xABC, 99, True)
    assert decode_replication(b"k" + u64(0) + i64(0) + u8(0)) == PrimaryKeepalive(0, 0, False)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "empty CopyData"),
        (b"x123", "unexpected replication message type 'x'"),
        (b"\x00", "unexpected replication message type 0x00"),
        (b"w" + u64(1) + u64(2), "malformed XLogData message: message ends before send time"),
        (b"w" + u64(1) + b"\0\0", "message ends inside WAL end"),
        (b"k" + u64(1) + i64(2), "malformed primary keepalive message: message ends before reply-requested flag"),
        (b"k" + u64(1) + i64(2) + u8(2), "reply-requested flag is 2"),
        (b"k" + u64(1) + i64(2) + u8(0) + b"z", "1 unexpected bytes after the last field"),
    ],
)
def test_decode_replication_rejects(body, fragment):
    with pytest.raises(PgoutputError, match=fragment.replace("(", r"\(")) as info:
        decode_replication(body)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RemoteProtocolError)
    assert info.value.sqlstate == "08P01"


def test_standby_status_update_is_a_complete_copydata():
    msg = standby_status_update(0x30, 0x20, 0x10, 12345, reply_requested=True)
    payload = b"r" + u64(0x30) + u64(0x20) + u64(0x10) + i64(12345) + u8(1)
    assert msg == b"d" + u32(len(payload) + 4) + payload
    assert standby_status_update(1, 1, 1, 0)[-1] == 0


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_standby_status_update_rejects_bad_positions(bad):
    with pytest.raises(ValueError, match="flushed position"):
        standby_status_update(0, bad, 0, 0)


def test_postgres_epoch():
    assert PG_EPOCH_UNIX_SECONDS == 946684800
    assert pg_timestamp_from_unix(946684800) == 0
    assert pg_timestamp_from_unix(946684801.5) == 1_500_000
    assert unix_from_pg_timestamp(0) == 946684800.0
    assert unix_from_pg_timestamp(pg_timestamp_from_unix(1_700_000_000.25)) == 1_700_000_000.25


# --------------------------------------------------------------- pgoutput messages


def test_decode_begin_commit_origin():
    assert decode_pgoutput(begin(0x1234, 77, ts=55)) == Begin(0x1234, 55, 77)
    assert decode_pgoutput(commit(0x1234, 0x1260, ts=55)) == Commit(0, 0x1234, 0x1260, 55)
    assert decode_pgoutput(b"O" + u64(0x99) + cstr("pg_16400")) == Origin(0x99, "pg_16400")


def test_decode_relation():
    data = relation(16384, "public", "accounts",
                    cols=(("id", 23, -1, 1), ("name", 1043, 36, 0)), ident=b"f")  # fmt: skip
    rel = decode_pgoutput(data)
    assert rel == Relation(16384, "public", "accounts", "f",
                           (Column(1, "id", 23, -1), Column(0, "name", 1043, 36)))  # fmt: skip
    assert rel.qualified_name == "public.accounts"
    assert [c.is_key for c in rel.columns] == [True, False]
    assert decode_pgoutput(relation(1, "", "pg_x", cols=())).qualified_name == "pg_catalog.pg_x"
    assert decode_pgoutput(relation(1, "s", "t", xid=900), in_stream=True).xid == 900


def test_decode_type():
    assert decode_pgoutput(b"Y" + u32(16500) + cstr("public") + cstr("mood")) == Type(16500, "public", "mood")
    assert decode_pgoutput(b"Y" + u32(5) + u32(16500) + cstr("s") + cstr("t"), in_stream=True) == Type(16500, "s", "t", 5)


def test_decode_insert_with_every_kind_of_value():
    data = insert(16384, b"42", None, UNCHANGED, Binary(b"\x00\x01"), b"")
    assert decode_pgoutput(data) == Insert(16384, (b"42", None, UNCHANGED, Binary(b"\x00\x01"), b""))
    assert decode_pgoutput(insert(7, b"1", xid=31), in_stream=True) == Insert(7, (b"1",), 31)
    assert decode_pgoutput(b"I" + u32(7) + b"N" + i16(0)) == Insert(7, ())


def test_decode_update_variants():
    new = tup(b"1", b"new")
    assert decode_pgoutput(b"U" + u32(9) + b"N" + new) == Update(9, (b"1", b"new"))
    assert decode_pgoutput(b"U" + u32(9) + b"K" + tup(b"1", None) + b"N" + new) == Update(
        9, (b"1", b"new"), (b"1", None), "K"
    )
    assert decode_pgoutput(b"U" + u32(9) + b"O" + tup(b"1", b"old") + b"N" + new) == Update(
        9, (b"1", b"new"), (b"1", b"old"), "O"
    )
    streamed = decode_pgoutput(b"U" + u32(3) + u32(9) + b"N" + new, in_stream=True)
    assert streamed.xid == 3 and streamed.old is None


def test_decode_delete_variants():
    assert decode_pgoutput(b"D" + u32(9) + b"K" + tup(b"1")) == Delete(9, (b"1",), "K")
    assert decode_pgoutput(b"D" + u32(9) + b"O" + tup(b"1", b"x")) == Delete(9, (b"1", b"x"), "O")
    assert decode_pgoutput(b"D" + u32(4) + u32(9) + b"K" + tup(b"1"), in_stream=True).xid == 4


def test_decode_truncate():
    data = b"T" + i32(2) + u8(3) + u32(100) + u32(200)
    assert decode_pgoutput(data) == Truncate(3, (100, 200))
    assert decode_pgoutput(b"T" + u32(8) + i32(1) + u8(0) + u32(5), in_stream=True) == Truncate(0, (5,), 8)


def test_decode_logical_decoding_messages():
    assert decode_pgoutput(message("connmgr", b"s1:t1", lsn=0x77)) == Message(True, 0x77, "connmgr", b"s1:t1")
    assert decode_pgoutput(message("p", b"\x00\xff", transactional=False)) == Message(False, 0x500, "p", b"\x00\xff")
    assert decode_pgoutput(message("p", b"", xid=12), in_stream=True) == Message(True, 0x500, "p", b"", 12)


def test_decode_stream_messages():
    assert decode_pgoutput(stream_start(500, first=True)) == StreamStart(500, True)
    assert decode_pgoutput(stream_start(500, first=False)) == StreamStart(500, False)
    # stream control messages carry no extra xid, in a stream block or not
    assert decode_pgoutput(b"E", in_stream=True) == StreamStop()
    assert decode_pgoutput(stream_commit(500, 0x10, 0x18, ts=3)) == StreamCommit(500, 0, 0x10, 0x18, 3)
    assert decode_pgoutput(stream_abort(500, 501)) == StreamAbort(500, 501)
    v4 = stream_abort(500, 500) + u64(0x40) + i64(8)
    assert decode_pgoutput(v4) == StreamAbort(500, 500, 0x40, 8)


def test_unknown_message_type_is_kept():
    assert decode_pgoutput(b"P\x01\x02") == UnknownMessage(ord("P"), b"\x01\x02")


MALFORMED = [
    (b"", False, "malformed pgoutput message: empty"),
    (b"B" + u64(1) + i64(2), False, "malformed pgoutput Begin message: message ends before xid"),
    (begin(1, 2) + b"!", False, "Begin message: 1 unexpected bytes after the last field"),
    (commit(1, 2)[:-3], False, "Commit message: message ends inside commit time"),
    (b"O" + u64(1) + b"origin", False, "origin name is missing its NUL terminator"),
    (relation(1, "public", "t", ident=b"x"), False, "replica identity is 'x'"),
    (b"R" + u32(1) + cstr("s") + cstr("t") + b"d" + i16(-1), False, "column count is -1"),
    (b"R" + u32(1) + cstr("s") + b"\xff\xfe\0" + b"d" + i16(0), False, "relation name is not valid UTF-8"),
    (relation(1, "s", "t", cols=(("a", 23, -1, 0),))[:-2], False, "ends inside type modifier of column 1"),
    (b"I" + u32(1) + b"X" + tup(b"1"), False, "new tuple marker is 'X', not 'N'"),
    (b"I" + u32(1) + b"N" + i16(1) + b"q", False, "column 1 of the new tuple has kind 'q'"),
    (b"I" + u32(1) + b"N" + i16(2) + b"n", False, "message ends before kind of column 2 of the new tuple"),
    (b"I" + u32(1) + b"N" + i16(1) + b"t" + i32(-1), False, "length of column 1 of the new tuple is -1"),
    (b"I" + u32(1) + b"N" + i16(1) + b"t" + i32(10) + b"abc", False, "ends inside value of column 1"),
    (b"I" + u32(1) + b"N" + i16(-2), False, "column count of the new tuple is -2"),
    (b"I" + u32(1) + b"N" + tup(b"1") + b"\0", False, "1 unexpected bytes after the last field"),
    (b"U" + u32(1) + b"Z" + tup(b"1"), False, "tuple marker is 'Z' (not 'K', 'O' or 'N')"),
    (b"U" + u32(1) + b"K" + tup(b"1") + b"K" + tup(b"1"), False, "new tuple marker is 'K', not 'N'"),
    (b"D" + u32(1) + b"N" + tup(b"1"), False, "old tuple marker is 'N' (not 'K' or 'O')"),
    (b"T" + i32(2) + u8(0) + u32(1), False, "relation count is 2 but 4 bytes of oids follow"),
    (b"T" + i32(-1) + u8(0), False, "relation count is -1"),
    (message("p", b"x")[:-1], False, "message ends before content"),
    (b"M" + u8(2) + u64(0) + cstr("p") + i32(0), False, "flags are 2, not 0 or 1"),
    (b"M" + u8(1) + u64(0) + cstr("p") + i32(-5), False, "content length is -5"),
    (b"S" + u32(1) + u8(7), False, "first-segment flag is 7"),
    (b"E" + b"\0", False, "Stream Stop message: 1 unexpected bytes"),
    (b"A" + u32(1) + u32(2) + u64(3), False, "Stream Abort message: message ends before abort time"),
    (insert(7, b"1"), True, "new tuple marker is 0x00"),  # a stream xid is missing
    (b"I" + u32(1), False, "message ends before new tuple marker"),
]


@pytest.mark.parametrize("data, in_stream, fragment", MALFORMED)
def test_malformed_pgoutput(data, in_stream, fragment):
    with pytest.raises(PgoutputError) as info:
        decode_pgoutput(data, in_stream=in_stream)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@given(st.binary(max_size=64), st.booleans())
def test_decode_pgoutput_fails_only_with_pgoutput_error(data, in_stream):
    """Any bytes either decode to a message or raise PgoutputError with a message --
    never another exception (which would fail this test)."""
    try:
        assert decode_pgoutput(data, in_stream=in_stream) is not None
    except PgoutputError as e:
        assert str(e)


@given(st.sampled_from(b"BCORYIUDTMSEcA"), st.binary(max_size=48), st.booleans())
def test_decode_known_types_fails_only_with_pgoutput_error(tag, rest, in_stream):
    try:
        assert decode_pgoutput(bytes([tag]) + rest, in_stream=in_stream) is not None
    except PgoutputError as e:
        assert str(e)


# ---------------------------------------------------------------------- assembler


def feed_all(asm: TransactionAssembler, items: list[tuple[int, bytes]]) -> list:
    out = []
    for lsn, data in items:
        out.extend(asm.feed(w(lsn, data)))
    return out


def test_one_transaction_becomes_one_poster_record():
    asm = TransactionAssembler()
    out = feed_all(asm, [
        (0x100, begin(0x400, xid=731, ts=99)),
        (0x100, relation(16384, "public", "t")),
        (0x100, insert(16384, b"1")),
        (0x180, insert(16384, b"2")),
        (0x200, message("connmgr", b"s1:t1", lsn=0x280)),
        (0x300, insert(16384, b"3")),
        (0x440, commit(0x400, 0x440, ts=99)),
    ])  # fmt: skip
    assert out == [PosterRecord(
        xid=731, first_lsn=0x100, commit_lsn=0x400, end_lsn=0x440, commit_time_us=99,
        change_lsns=(0x100, 0x180, 0x300), n_changes=3, relations=("public.t",),
        messages=(("connmgr", b"s1:t1"),),
    )]  # fmt: skip
    assert out[0].confirm_lsn == 0x440
    assert asm.confirmed_lsn == 0x440
    assert not asm.in_transaction
    assert asm.relations[16384].name == "t"


def test_relations_in_order_of_first_change_and_truncate_counts():
    asm = TransactionAssembler()
    out = feed_all(asm, [
        (0x10, begin(0x90, xid=5)),
        (0x10, relation(1, "public", "b")),
        (0x10, relation(2, "app", "a")),
        (0x10, insert(1, b"1")),
        (0x20, b"U" + u32(2) + b"N" + tup(b"1")),
        (0x30, b"D" + u32(1) + b"K" + tup(b"1")),
        (0x40, b"T" + i32(2) + u8(0) + u32(2) + u32(1)),
        (0x50, b"O" + u64(0x77) + cstr("node_a")),
        (0xA0, commit(0x90, 0xA0)),
    ])  # fmt: skip
    (rec,) = out
    assert rec.relations == ("public.b", "app.a")
    assert rec.n_changes == 4 and rec.change_lsns == (0x10, 0x20, 0x30, 0x40)
    assert rec.origin == "node_a" and rec.messages == ()


def test_transactions_in_a_row_and_non_transactional_messages():
    asm = TransactionAssembler()
    out = feed_all(asm, [
        (0x500, message("beat", b"1", lsn=0x500, transactional=False)),
        (0x600, begin(0x700, xid=1)),
        (0x600, message("m", b"only a message", lsn=0x600)),
        (0x740, commit(0x700, 0x740)),
        (0x800, begin(0x900, xid=2)),
        (0x800, relation(3, "public", "t")),
        (0x800, insert(3, None)),
        (0x940, commit(0x900, 0x940)),
    ])  # fmt: skip
    assert [type(x) for x in out] == [NonTransactionalMessage, PosterRecord, PosterRecord]
    assert out[0] == NonTransactionalMessage(0x500, "beat", b"1")
    assert out[0].confirm_lsn == 0x501
    assert out[1].xid == 1 and out[1].n_changes == 0 and out[1].messages == (("m", b"only a message"),)
    assert out[2].xid == 2 and out[2].change_lsns == (0x800,)
    assert asm.confirmed_lsn == 0x940


def test_change_lsns_are_capped_but_counted():
    asm = TransactionAssembler(max_change_lsns=5)
    items = [(0x10, begin(0xFFFF, xid=9)), (0x10, relation(1, "public", "big"))]
    items += [(0x100 + i, insert(1, b"x")) for i in range(20)]
    items += [(0xFFFF + 0x30, commit(0xFFFF, 0xFFFF + 0x30))]
    (rec,) = feed_all(asm, items)
    assert rec.n_changes == 20
    assert rec.change_lsns == (0x100, 0x101, 0x102, 0x103, 0x104)
    assert rec.truncated


def test_a_huge_transaction_keeps_memory_flat():
    asm = TransactionAssembler(max_change_lsns=100)
    asm.feed(w(1, begin(10**9, xid=1)))
    asm.feed(w(1, relation(1, "public", "t")))
    row = insert(1, b"x" * 100)
    for i in range(50_000):
        asm.feed(w(100 + i, row))
    tx = asm._tx
    assert tx is not None and tx.n_changes == 50_000 and len(tx.change_lsns) == 100
    (rec,) = asm.feed(w(10**9 + 40, commit(10**9, 10**9 + 40)))
    assert rec.n_changes == 50_000 and len(rec.change_lsns) == 100 and rec.truncated


def test_messages_are_capped_by_count_and_bytes():
    asm = TransactionAssembler(max_messages=2, max_message_bytes=10)
    (rec,) = feed_all(asm, [
        (1, begin(0x50, xid=1)),
        (2, message("a", b"12345")),
        (3, message("b", b"123456")),  # would make 11 bytes: dropped
        (4, message("c", b"12345")),
        (5, message("d", b"")),  # third message: dropped
        (0x60, commit(0x50, 0x60)),
    ])  # fmt: skip
    assert rec.messages == (("a", b"12345"), ("c", b"12345"))
    assert rec.truncated


ILLEGAL = [
    ([insert(1, b"1")], "unexpected pgoutput Insert in state IDLE"),
    ([commit(1, 2)], "unexpected pgoutput Commit in state IDLE"),
    ([message("p", b"x")], "unexpected pgoutput Message in state IDLE"),
    ([b"E"], "unexpected pgoutput StreamStop in state IDLE"),
    ([begin(9, 1), begin(9, 2)], "unexpected pgoutput Begin in state IN_TX"),
    ([begin(9, 1), stream_start(3)], "unexpected pgoutput StreamStart in state IN_TX"),
    ([begin(9, 1), b"P\x00"], "unexpected pgoutput message of unknown type 'P' in state IN_TX"),
    ([begin(9, 1), insert(77, b"1")], "Insert for relation 77, which no Relation message described"),
    ([begin(9, 1), commit(8, 10)], "Commit of transaction 1 at LSN 0x8, but its Begin announced 0x9"),
    ([stream_start(3), commit(9, 10)], "unexpected pgoutput Commit in state IN_STREAM"),
    ([stream_commit(3, 9, 10)], "Stream Commit of transaction 3, which never streamed"),
    ([b""], "empty XLogData"),
    ([begin(9, 1), b"I\x00"], "malformed pgoutput Insert message: message ends inside relation oid"),
]


@pytest.mark.parametrize("datas, fragment", ILLEGAL)
def test_illegal_sequences(datas, fragment):
    asm = TransactionAssembler()
    with pytest.raises(PgoutputError) as info:
        for i, data in enumerate(datas):
            asm.feed(w(i, data))
    assert fragment in str(info.value)


def test_relation_and_type_messages_anywhere_update_the_caches():
    asm = TransactionAssembler()
    assert asm.feed(w(1, relation(1, "public", "t"))) == []
    assert asm.feed(w(1, b"Y" + u32(600) + cstr("public") + cstr("mood"))) == []
    assert asm.relations[1].qualified_name == "public.t" and asm.types[600].name == "mood"
    # a newer Relation for the same oid (ALTER TABLE ... RENAME) replaces the cached one
    asm.feed(w(2, relation(1, "public", "t2")))
    (rec,) = feed_all(asm, [(3, begin(9, 1)), (3, insert(1, b"1")), (10, commit(9, 10))])
    assert rec.relations == ("public.t2",)


# ------------------------------------------------------------- streamed transactions


def test_streamed_transaction_becomes_one_record_at_stream_commit():
    asm = TransactionAssembler()
    out = feed_all(asm, [
        (0x100, stream_start(600, first=True)),
        (0x100, relation(1, "public", "t", xid=600)),
        (0x100, insert(1, b"1", xid=600)),
        (0x110, message("connmgr", b"s2:t9", xid=600)),
        (0x120, b"E"),
        # a small transaction commits while the big one is still in progress
        (0x130, begin(0x150, xid=601)),
        (0x130, insert(1, b"2")),
        (0x160, commit(0x150, 0x160)),
        (0x170, stream_start(600, first=False)),
        (0x170, insert(1, b"3", xid=600)),
        (0x180, b"E"),
        (0x200, stream_commit(600, 0x1F0, 0x200, ts=4)),
    ])  # fmt: skip
    assert [r.xid for r in out] == [601, 600]
    small, big = out
    assert not small.streamed and small.change_lsns == (0x130,)
    assert big == PosterRecord(
        xid=600, first_lsn=0x100, commit_lsn=0x1F0, end_lsn=0x200, commit_time_us=4,
        change_lsns=(0x100, 0x170), n_changes=2, relations=("public.t",),
        messages=(("connmgr", b"s2:t9"),), streamed=True,
    )  # fmt: skip
    assert not asm.in_transaction


def test_stream_abort_of_the_whole_transaction_emits_nothing():
    asm = TransactionAssembler()
    out = feed_all(asm, [
        (0x100, stream_start(600)),
        (0x100, relation(1, "public", "t", xid=600)),
        (0x100, insert(1, b"1", xid=600)),
        (0x120, b"E"),
    ])  # fmt: skip
    assert out == [] and asm.in_transaction
    assert asm.feed(w(0x130, stream_abort(600, 600))) == []
    assert not asm.in_transaction
    with pytest.raises(PgoutputError, match="never streamed"):
        asm.feed(w(0x140, stream_commit(600, 0x1, 0x2)))


def test_stream_abort_of_a_subtransaction_rewinds_to_its_first_change():
    asm = TransactionAssembler()
    out = feed_all(asm, [
        (0x100, stream_start(600)),
        (0x100, relation(1, "public", "a", xid=600)),
        (0x100, relation(2, "public", "b", xid=600)),
        (0x100, insert(1, b"1", xid=600)),
        (0x110, insert(2, b"1", xid=601)),  # SAVEPOINT s1
        (0x118, message("m", b"sub", xid=601)),
        (0x120, insert(2, b"2", xid=602)),  # SAVEPOINT s2 inside s1
        (0x128, b"E"),
        (0x130, stream_abort(600, 601)),  # ROLLBACK TO s1: s1 and s2 go
        (0x140, stream_start(600, first=False)),
        (0x140, insert(1, b"2", xid=600)),
        (0x150, insert(2, b"3", xid=603)),  # a later subtransaction that commits
        (0x158, b"E"),
        (0x170, stream_commit(600, 0x160, 0x170)),
    ])  # fmt: skip
    (rec,) = out
    assert rec.n_changes == 3
    assert rec.change_lsns == (0x100, 0x140, 0x150)
    assert rec.relations == ("public.a", "public.b")
    assert rec.messages == ()


def test_stream_abort_for_an_unknown_transaction_is_ignored():
    asm = TransactionAssembler()
    assert asm.feed(w(1, stream_abort(5, 6))) == []
    assert not asm.in_transaction


def test_unchanged_is_a_singleton_and_values_compare():
    import copy
    import pickle

    from replay.pgoutput import Unchanged

    assert Unchanged() is UNCHANGED and repr(UNCHANGED) == "UNCHANGED"
    assert copy.deepcopy(UNCHANGED) is UNCHANGED and pickle.loads(pickle.dumps(UNCHANGED)) is UNCHANGED
    assert Binary(b"\x01") == Binary(b"\x01") != b"\x01"
