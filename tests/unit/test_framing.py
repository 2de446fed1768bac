"""Framer: splitting one direction of a v3 stream into messages, byte-exact."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadow.errors import RemoteProtocolError
from shadow.framing import (
    MAX_STARTUP_PACKET_SIZE,
    PQ_LARGE_MESSAGE_LIMIT,
    PQ_SMALL_MESSAGE_LIMIT,
    STREAM_HEAD,
    STREAM_HEAD_SIZE,
    STREAM_LAST,
    Framer,
)


def typed(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def untyped(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


STARTUP = untyped(struct.pack("!I", 196608) + b"user\0u\0\0")
SSL_REQUEST = untyped(struct.pack("!I", 80877103))
STREAM = typed(b"Q", b"select 1\0") + typed(b"S", b"") + typed(b"X", b"")


def run(framer: Framer, chunks: list[bytes]) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Feed ``chunks``; return (concatenated passthrough bytes, [(tag, body), ...])."""
    out = bytearray()
    messages = []
    for chunk in chunks:
        buf, frames = framer.feed(chunk)
        out += buf
        messages += [(tag, bytes(buf[start:end])) for tag, start, end in frames]
    return bytes(out), messages


def byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --------------------------------------------------------------------------- typed framing


def test_whole_buffer_is_returned_without_copy() -> None:
    framer = Framer()
    buf, frames = framer.feed(STREAM)
    assert buf is STREAM
    assert [(t, STREAM[s:e]) for t, s, e in frames] == [
        (ord("Q"), b"select 1\0"),
        (ord("S"), b""),
        (ord("X"), b""),
    ]
    assert framer.pending_bytes == 0


def test_byte_at_a_time_gives_the_same_messages() -> None:
    whole = run(Framer(), [STREAM])
    assert run(Framer(), byte_at_a_time(STREAM)) == whole
    assert whole[0] == STREAM


def test_partial_message_is_held_back() -> None:
    framer = Framer()
    first = typed(b"Q", b"select 1\0")
    buf, frames = framer.feed(first + b"S\0\0")
    assert buf == first and len(frames) == 1
    assert framer.pending_bytes == 3
    buf, frames = framer.feed(b"\0\x04")
    assert buf == b"S\0\0\0\x04" and frames == [(ord("S"), 5, 5)]
    assert framer.pending_bytes == 0


def test_empty_feed_returns_nothing() -> None:
    assert Framer().feed(b"") == (b"", [])


@pytest.mark.parametrize(
    "header",
    [
        b"Q\0\0\0\x00",  # 0: shorter than the length word itself
        b"Q\0\0\0\x03",
        b"Q\xff\xff\xff\xfb",  # -5 as int32
        b"Q\x7f\xff\xff\xff",  # 2 GB
    ],
    ids=["zero", "three", "negative", "huge"],
)
def test_bad_length_is_rejected_from_the_header_alone(header: bytes) -> None:
    framer = Framer(max_message_size=1 << 20)
    with pytest.raises(RemoteProtocolError) as info:
        framer.feed(header)  # no body sent: nothing is buffered first
    assert info.value.sqlstate == "08P01"
    assert "'Q'" in info.value.message


def test_over_max_message_size_is_rejected_before_the_body_arrives() -> None:
    framer = Framer(max_message_size=100)
    framer.feed(typed(b"d", b"x" * 96))  # exactly at the limit: fine
    with pytest.raises(RemoteProtocolError, match="over the maximum of 100 bytes"):
        framer.feed(b"d" + struct.pack("!I", 101))


def test_bad_length_split_across_reads_is_still_rejected() -> None:
    framer = Framer(max_message_size=100)
    for b in b"Q\0\0":
        assert framer.feed(bytes([b])) == (b"", [])
    with pytest.raises(RemoteProtocolError):
        framer.feed(b"\x10\x00")


def test_feed_eof_mid_message_raises() -> None:
    framer = Framer()
    framer.feed(b"Q\0\0\0\x10sel")
    with pytest.raises(RemoteProtocolError, match="middle of a message") as info:
        framer.feed_eof()
    assert info.value.sqlstate == "08P01"


def test_feed_eof_between_messages_is_clean() -> None:
    framer = Framer()
    buf, frames = framer.feed(STREAM)
    assert bytes(buf) == STREAM and frames
    framer.feed_eof()  # raises if anything were left over
    assert framer.pending_bytes == 0


# ------------------------------------------------------------------------- untyped framing


def test_startup_phase_yields_one_message_per_call() -> None:
    framer = Framer(typed=False)
    data = SSL_REQUEST + STARTUP + STREAM
    buf, frames = framer.feed(data)
    assert buf == SSL_REQUEST and frames == [(0, 4, 8)]
    buf, frames = framer.feed(b"")  # still untyped: the StartupMessage
    assert buf == STARTUP and frames == [(0, 4, len(STARTUP))]
    assert framer.pending_bytes == len(STREAM)
    framer.switch_to_typed()
    assert framer.typed
    buf, frames = framer.feed(b"")
    assert buf == STREAM and [t for t, _, _ in frames] == [ord("Q"), ord("S"), ord("X")]


def test_startup_byte_at_a_time() -> None:
    framer = Framer(typed=False)
    out, messages = run(framer, byte_at_a_time(STARTUP))
    assert out == STARTUP
    assert messages == [(0, STARTUP[4:])]


@pytest.mark.parametrize("length", [0, 4, 7, MAX_STARTUP_PACKET_SIZE + 5, 0xFFFFFFFF])
def test_bad_startup_length_is_rejected(length: int) -> None:
    framer = Framer(typed=False)
    with pytest.raises(RemoteProtocolError, match="invalid length of startup packet") as info:
        framer.feed(struct.pack("!I", length))
    assert info.value.sqlstate == "08P01"


def test_startup_packet_at_the_limit_is_accepted() -> None:
    """Postgres's limit is on the body (MAX_STARTUP_PACKET_LENGTH), the length field aside."""
    body = struct.pack("!I", 196608) + b"user\0" + b"u" * (MAX_STARTUP_PACKET_SIZE - 11) + b"\0\0"
    packet = untyped(body)
    assert len(packet) == MAX_STARTUP_PACKET_SIZE + 4
    assert Framer(typed=False).feed(packet)[1] == [(0, 4, MAX_STARTUP_PACKET_SIZE + 4)]


@pytest.mark.parametrize("tag, limit", [
    (b"S", PQ_SMALL_MESSAGE_LIMIT), (b"X", PQ_SMALL_MESSAGE_LIMIT), (b"E", PQ_SMALL_MESSAGE_LIMIT),
    (b"C", PQ_SMALL_MESSAGE_LIMIT), (b"D", PQ_SMALL_MESSAGE_LIMIT), (b"H", PQ_SMALL_MESSAGE_LIMIT),
    (b"c", PQ_SMALL_MESSAGE_LIMIT), (b"f", PQ_SMALL_MESSAGE_LIMIT), (b"p", 65535),
    (b"Q", PQ_LARGE_MESSAGE_LIMIT), (b"P", PQ_LARGE_MESSAGE_LIMIT), (b"B", PQ_LARGE_MESSAGE_LIMIT),
    (b"d", PQ_LARGE_MESSAGE_LIMIT), (b"F", PQ_LARGE_MESSAGE_LIMIT),
])  # fmt: skip
def test_a_client_gets_postgres_limits_per_message_type(tag: bytes, limit: int) -> None:
    """What postgres.c's SocketBackend allows each type (length field included): the header
    at the limit waits for its body, one byte over is refused before any body is read."""
    at = tag + struct.pack("!I", limit)
    assert Framer(frontend=True).feed(at) == (b"", [])
    with pytest.raises(RemoteProtocolError, match="invalid message length") as info:
        Framer(frontend=True).feed(tag + struct.pack("!I", limit + 1))
    assert info.value.sqlstate == "08P01"
    # the backend's direction keeps the one configured limit (a DataRow may be long)
    assert Framer().feed(b"D" + struct.pack("!I", PQ_SMALL_MESSAGE_LIMIT + 1)) == (b"", [])


def test_the_configured_maximum_caps_every_type() -> None:
    with pytest.raises(RemoteProtocolError, match="over the maximum of 2000 bytes .max_message_size."):
        Framer(frontend=True, max_message_size=2000).feed(b"S" + struct.pack("!I", 2001))
    with pytest.raises(RemoteProtocolError, match="Postgres's limit for this type"):
        Framer(frontend=True).feed(b"S" + struct.pack("!I", PQ_SMALL_MESSAGE_LIMIT + 1))


# ---------------------------------------------------------------------- chunking invariance

raw_messages = st.lists(
    st.tuples(st.sampled_from(b"QPBDESdcXZCTN12"), st.binary(max_size=40)), max_size=20
)


@given(raw_messages, st.data())
def test_any_chunking_gives_the_same_frames_and_bytes(
    messages: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(typed(bytes([t]), body) for t, body in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    expected = (stream, list(messages))
    assert run(Framer(), [stream]) == expected
    assert run(Framer(), byte_at_a_time(stream)) == expected
    assert run(Framer(), chunks) == expected


# ------------------------------------------------------------------ streaming

OVER = STREAM_HEAD_SIZE + 5  # the smallest threshold: messages longer than this stream


def streamed_run(framer: Framer, chunks: list[bytes]) -> tuple[bytes, list[tuple[int, bytes]], int]:
    """Like run(), with streamed parts joined back into whole bodies; also returns the
    most bytes the framer held back at once."""
    out = bytearray()
    messages: list[tuple[int, bytes]] = []
    partial: bytearray | None = None
    held = 0
    for chunk in chunks:
        buf, frames = framer.feed(chunk)
        held = max(held, framer.pending_bytes)
        out += buf
        covered = 0
        for tag, start, end in frames:
            covered += end - start + (5 if tag <= 0xFF or tag & STREAM_HEAD else 0)
            if tag <= 0xFF:
                assert partial is None, "a whole message inside a streamed one"
                messages.append((tag, bytes(buf[start:end])))
            elif tag & STREAM_HEAD:
                assert partial is None and end - start >= STREAM_HEAD_SIZE
                partial, ptag = bytearray(buf[start:end]), tag & 0xFF
            else:
                assert partial is not None and tag & 0xFF == ptag
                partial += buf[start:end]
                if tag & STREAM_LAST:
                    messages.append((ptag, bytes(partial)))
                    partial = None
        assert covered == len(buf), "every byte handed back belongs to exactly one frame"
    assert partial is None and not framer.streaming
    return bytes(out), messages, held


def test_a_long_query_streams_in_parts_and_the_framer_holds_only_its_head() -> None:
    body = b"insert into t values ('" + b"x" * 300_000 + b"')\0"
    stream = typed(b"Q", body) + typed(b"S", b"")
    framer = Framer(frontend=True)
    framer.stream(OVER, b"QPBFd")
    chunks = [stream[i:i + 1000] for i in range(0, len(stream), 1000)]
    out, messages, held = streamed_run(framer, chunks)
    assert out == stream
    assert messages == [(ord("Q"), body), (ord("S"), b"")]
    assert held <= 5 + STREAM_HEAD_SIZE + 1000


def test_a_type_that_does_not_stream_is_held_whole() -> None:
    body = b"E" * 100_000
    framer = Framer()
    framer.stream(OVER, b"Dd")
    buf, frames = framer.feed(typed(b"E", body)[:50_000])
    assert (buf, frames) == (b"", []) and framer.pending_bytes == 50_000


def test_eof_in_the_middle_of_a_streamed_message_is_an_error() -> None:
    framer = Framer(frontend=True)
    framer.stream(OVER, b"Q")
    framer.feed(typed(b"Q", b"y" * 20_000 + b"\0")[:10_000])
    assert framer.streaming
    with pytest.raises(RemoteProtocolError, match="streamed 'Q' message"):
        framer.feed_eof()


def test_a_too_small_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        Framer().stream(100, b"Q")


@given(
    st.lists(st.tuples(st.sampled_from(b"QPBDdS"), st.integers(0, 3 * OVER)), min_size=1, max_size=8),
    st.data(),
)
def test_streaming_any_chunking_gives_the_same_messages_and_bytes(specs, data) -> None:
    stream = b"".join(typed(bytes([tag]), bytes([tag]) * n) for tag, n in specs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    framer = Framer()
    framer.stream(OVER, b"QPBd")
    out, messages, held = streamed_run(framer, chunks)
    assert out == stream
    assert messages == [(tag, bytes([tag]) * n) for tag, n in specs]
    whole = max((n + 5 for tag, n in specs if tag not in b"QPBd"), default=0)  # held whole, by design
    assert held <= max(OVER, 5 + STREAM_HEAD_SIZE, whole) + max(map(len, chunks))
