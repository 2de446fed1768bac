# cython: annotation_typing=False
"""Message framing for one direction of a Postgres v3 stream.

How it works
------------
The v3 protocol has two framings:

* *untyped* (startup phase, frontend only): ``int32 length`` (counting itself) followed by
  the body. StartupMessage, SSLRequest, GSSENCRequest and CancelRequest look like this.
* *typed* (everything else): one type byte, then ``int32 length`` (counting itself, not the
  type byte), then the body.

:class:`Framer` is fed whatever bytes arrived and hands back the *original bytes* of every
message that is now complete, plus a list of ``(tag, body_start, body_end)`` offsets into
those bytes. The connection manager forwards the bytes as they are and looks only at the
frames it has to decide on; nothing is re-encoded on the passthrough path. Untyped messages
are reported with ``tag == 0``.

The hot path (a chunk holding only complete messages, nothing pending) makes no copy: the
returned buffer *is* the chunk that was fed. A message split across reads is accumulated in
a ``bytearray`` and parsed only when its declared length has arrived, so a large message
costs linear, not quadratic, work.

In untyped mode the framer yields at most one message per call and keeps the rest, because
what follows a startup packet depends on the answer to it (after SSLRequest comes a TLS
handshake, after StartupMessage the typed protocol). The caller switches with
:meth:`Framer.switch_to_typed` and calls ``feed(b"")`` to collect what was held back.

**Streaming.** With ``stream_over`` set, a message of a type in ``stream_types`` whose
declared length exceeds it is not held whole: once its first :data:`STREAM_HEAD_SIZE` body
bytes have arrived it is reported as a *head* frame, ``(STREAM_HEAD | tag, body_start,
end)`` over the body bytes at hand, and every later chunk of it as ``(STREAM_MORE | tag,
start, end)``, the one that completes it as ``(STREAM_LAST | tag, start, end)``; these
chunk frames have no header in ``buf``. So the framer never holds more than ``stream_over``
bytes of one message (plus one read), whatever the message's length. A message that
arrived whole in one feed is reported whole, as usual. Callers look at the head (a Query's
first words, a Parse's or Bind's names) and forward the rest as it comes.

Lengths are checked before any body is buffered: a length below the minimum or above the
maximum is a :class:`~shadow.errors.RemoteProtocolError` (SQLSTATE 08P01), so a peer cannot
make us allocate memory by announcing a huge message. What a client sends (``frontend=True``)
gets Postgres's own limits per message type (``SocketBackend`` in postgres.c): 10,000 bytes
for the short types (Close, Describe, Execute, Flush, Sync, Terminate, CopyDone, CopyFail),
65,535 for a password or SASL message (``PG_MAX_AUTH_TOKEN_LENGTH``), just under 1 GiB for
the rest (``PQ_LARGE_MESSAGE_LIMIT``), each capped by ``max_message_size``; a startup
packet's body may hold 10,000 bytes (``MAX_STARTUP_PACKET_LENGTH``), its length field aside.
"""

from __future__ import annotations

from struct import Struct

from shadow.errors import RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "STREAM_HEAD",
    "STREAM_HEAD_SIZE",
    "STREAM_LAST",
    "STREAM_MORE",
    "STREAM_PART",
    "MAX_STARTUP_PACKET_SIZE",
    "PQ_LARGE_MESSAGE_LIMIT",
    "PQ_SMALL_MESSAGE_LIMIT",
    "Frame",
    "Framer",
]

#: Postgres's limits on a client's message, its length field included (libpq/pqcomm.h:
#: MaxAllocSize - 1, and 10,000 for the types that are never long)
PQ_LARGE_MESSAGE_LIMIT = 0x3FFFFFFF - 1
PQ_SMALL_MESSAGE_LIMIT = 10000
#: PG_MAX_AUTH_TOKEN_LENGTH: a password, SASLInitialResponse or SASLResponse message
PG_MAX_AUTH_TOKEN_LENGTH = 65535
#: the frontend types Postgres reads with the small limit
_SMALL_TYPES = b"CDEHSXcf"
#: by default no message may be longer than Postgres would take from a client
DEFAULT_MAX_MESSAGE_SIZE = PQ_LARGE_MESSAGE_LIMIT
#: Postgres's MAX_STARTUP_PACKET_LENGTH: the startup packet's body, its length field aside
MAX_STARTUP_PACKET_SIZE = 10000

#: flags or'ed into a frame's tag for the parts of a streamed message (module docstring)
STREAM_HEAD = 0x100
STREAM_MORE = 0x200
STREAM_LAST = 0x400
#: any of them: ``tag > 0xFF`` tells a part from a whole message
STREAM_PART = STREAM_HEAD | STREAM_MORE | STREAM_LAST
#: body bytes a streamed message's head frame holds at least (names, first words)
STREAM_HEAD_SIZE = 4096

_INT32 = Struct("!I")
_unpack_int32 = _INT32.unpack_from

#: ``(tag, body_start, body_end)``; ``tag`` is the type byte, or 0 for an untyped message.
Frame = tuple[int, int, int]


class Framer:
    """Incremental splitter of one direction of a v3 stream. See the module docstring."""

    __slots__ = ("max_message_size", "max_startup_size", "frontend", "_limits", "_typed", "_pending", "_need",
                 "stream_over", "_stream_types", "_stream_tag", "_stream_left")  # fmt: skip

    def __init__(
        self,
        *,
        typed: bool = True,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_startup_size: int = MAX_STARTUP_PACKET_SIZE,
        frontend: bool = False,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_startup_size = max_startup_size
        #: what a client sends: Postgres's limit per type (module docstring)
        self.frontend = frontend
        #: the longest message of each type byte, its length field included
        self._limits = [max_message_size] * 256
        if frontend:
            for tag in _SMALL_TYPES:
                self._limits[tag] = min(max_message_size, PQ_SMALL_MESSAGE_LIMIT)
            self._limits[ord("p")] = min(max_message_size, PG_MAX_AUTH_TOKEN_LENGTH)
        self._typed = typed
        self._pending = bytearray()
        # bytes the pending buffer must hold before parsing is worth trying again
        self._need = 0
        #: messages longer than this (length field included) stream; 0: none do
        self.stream_over = 0
        self._stream_types = b""
        # the type of the message being streamed, and how many of its bytes are to come
        self._stream_tag = 0
        self._stream_left = 0

    def stream(self, over: int, types: bytes) -> None:
        """Stream messages of ``types`` longer than ``over`` bytes (module docstring);
        ``over`` 0 turns streaming off. Takes effect from the next message."""
        if over and over < STREAM_HEAD_SIZE + 5:
            raise ValueError(f"stream_over must be at least {STREAM_HEAD_SIZE + 5} bytes, got {over}")
        self.stream_over = over
        self._stream_types = types if over else b""

    @property
    def streaming(self) -> bool:
        """In the middle of a streamed message (its head was reported, not its end)."""
        return self._stream_left > 0

    @property
    def typed(self) -> bool:
        return self._typed

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not yet form a complete message."""
        return len(self._pending)

    def switch_to_typed(self) -> None:
        """Leave the startup phase; call ``feed(b"")`` next to get held-back messages."""
        self._typed = True
        self._need = 0

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        """Add ``data``; return ``(buf, frames)`` for every message now complete.

        ``buf`` holds the original bytes of those messages, back to back; each frame is
        ``(tag, body_start, body_end)`` indexing ``buf``. Returns ``(b"", [])`` when no
        message is complete yet. Raises :class:`RemoteProtocolError` on a nonsense length;
        its ``before`` holds ``(buf, frames)`` of the complete messages ahead of it (the
        framer is then unusable: the stream cannot be cut into messages any more).
        """
        frames: list[Frame] = []
        pos = 0
        if self._stream_left:  # the next bytes continue a streamed message
            if not data:
                return b"", []
            pos = min(len(data), self._stream_left)
            self._stream_left -= pos
            frames.append(((STREAM_MORE if self._stream_left else STREAM_LAST) | self._stream_tag, 0, pos))
            if pos == len(data):
                return data, frames
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < self._need:
                return b"", []
            data = bytes(pending)
            pending.clear()
        elif not data:
            return b"", []

        n = len(data)
        need = 0
        if self._typed:
            limits = self._limits
            if type(data) is bytes:  # the hot path: cut what is complete in one call
                pos = _complete_messages(data, pos, n, limits, frames)
            append = frames.append
            stream_over = self.stream_over or 1 << 32  # (no message is that long)
            while n - pos >= 5:
                (length,) = _unpack_int32(data, pos + 1)
                if length < 4 or length > limits[data[pos]]:
                    error = _bad_length(data[pos], length, limits[data[pos]], self.max_message_size)
                    error.before = (data[:pos], frames)  # complete messages ahead of it
                    raise error
                end = pos + 1 + length
                if end > n:
                    if length > stream_over and data[pos] in self._stream_types:
                        if n - pos >= 5 + STREAM_HEAD_SIZE:
                            append((STREAM_HEAD | data[pos], pos + 5, n))
                            self._stream_tag = data[pos]
                            self._stream_left = end - n
                            pos = n
                            break
                        need = 5 + STREAM_HEAD_SIZE
                    else:
                        need = end - pos
                    break
                append((data[pos], pos + 5, end))
                pos = end
            else:
                need = 5
        else:
            if n - pos >= 4:
                (length,) = _unpack_int32(data, pos)
                if length < 8 or length - 4 > self.max_startup_size:
                    raise RemoteProtocolError(
                        f"invalid length of startup packet: {_signed(length)}"
                        f" (must be between 8 and {self.max_startup_size + 4})"
                    )
                end = pos + length
                if end <= n:
                    frames.append((0, pos + 4, end))
                    pos = end
                else:
                    need = length
            else:
                need = 4

        if pos == n:
            return data, frames
        self._pending += memoryview(data)[pos:]
        self._need = need
        return data[:pos], frames

    def take_pending(self) -> bytes:
        """Remove and return the bytes of an incomplete message held back (b"" if none),
        e.g. to put complete messages ahead of it and feed both again, in order. Not in
        the middle of a streamed message: its head has gone already."""
        assert not self._stream_left, "take_pending() in the middle of a streamed message"
        pending = bytes(self._pending)
        self._pending = bytearray()
        self._need = 0
        return pending

    def feed_eof(self) -> None:
        """The peer closed its side. Raises if it stopped in the middle of a message."""
        if self._pending:
            raise RemoteProtocolError(
                f"connection closed in the middle of a message"
                f" ({len(self._pending)} bytes of an incomplete message received)"
            )
        if self._stream_left:
            raise RemoteProtocolError(
                f"connection closed in the middle of a message ({self._stream_left} bytes of a streamed"
                f" {chr(self._stream_tag)!r} message not received)"
            )


def _complete_messages(data: bytes, pos: int, n: int, limits: list, frames: list) -> int:
    """Append the frames of the complete, well-formed typed messages of ``data[pos:n]`` to
    ``frames``; return where the first one that is not starts (``n`` if none). What is
    there -- a bad length, a partial or streamed message -- is left to :meth:`Framer.feed`.
    Compiled with C types (framing.pxd): the relay's per-message cost."""
    while n - pos >= 5:
        length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
        tag = data[pos]
        if length < 4 or length > limits[tag]:
            return pos
        end = pos + 1 + length
        if end > n:
            return pos
        frames.append((tag, pos + 5, end))
        pos = end
    return pos


def _signed(n: int) -> int:
    return n - (1 << 32) if n >= 1 << 31 else n


def _bad_length(tag: int, length: int, limit: int, configured: int) -> RemoteProtocolError:
    what = repr(chr(tag)) if 32 <= tag < 127 else f"0x{tag:02x}"
    length = _signed(length)  # the wire field is a signed int32
    if length < 4:
        return RemoteProtocolError(f"invalid message length {length} for message type {what}")
    whose = "max_message_size" if limit == configured else "Postgres's limit for this type"
    return RemoteProtocolError(
        f"invalid message length: message of type {what} is {length} bytes long, over the maximum"
        f" of {limit} bytes ({whose})"
    )
