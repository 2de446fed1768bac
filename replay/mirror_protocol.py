# cython: annotation_typing=False
"""The mirror stream between the primary and the secondary connmgr, sans-IO (seed 003).

How it works
------------
The primary connmgr turns what its sessions do into *records* with consecutive version
numbers: :class:`SessionOpened`, :class:`Data` (a batch of complete protocol messages of
one session in one direction, with the LSN tag and the byte offset of its first byte in
that direction of the client's TCP stream), :class:`Marker` (a purge marker was embedded
in transaction ``seq`` of a session), :class:`SessionClosed` and :class:`Topology` (the
pair turned around after a failover). Unversioned control records travel beside them: :class:`Hello`/:class:`HelloAck` when the link (re)connects,
:class:`Heartbeat` (carrying the latest version, so a loss at the very end is noticed),
:class:`Ack` (the secondary has every version up to N), :class:`AckRequest` (two-phase:
acknowledge version N as soon as you have it) and :class:`DeltaRequest`.

:class:`MirrorSender` keeps every unacknowledged record in a buffer bounded in bytes, so a
gap or a reconnect is repaired by resending the *delta* from the buffer. When the buffer
would overflow (the secondary is slow or gone), the oldest unacknowledged records are
dropped and the sender remembers that history before ``lost_below`` is gone: a delta that
needs it is answered with :class:`Resync`, after which the secondary trusts no session's
past (every session becomes non-replayable until it is next idle, when it has no open
transaction to lose). That is the written policy for a slow or absent secondary; the
caller (``connmgr/pair/mirror.py``) also degrades two-phase to one-phase and says so.

:class:`MirrorReceiver` delivers versioned records strictly in order, exactly once:
duplicates (after a resend) are dropped, records after a gap are held (bounded) while a
single :class:`DeltaRequest` for the missing version goes out.

Wire format: one byte kind, a uint32 body length, the body; integers big-endian. A
connmgr talks to a connmgr of the same version; a nonsense frame is a
:class:`MirrorProtocolError` and the link is reset (the delta repairs what was in flight).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from struct import Struct

__all__ = [
    "Ack", "AckRequest", "Data", "DeltaRequest", "Heartbeat", "Hello", "HelloAck", "Marker",
    "MirrorDecoder", "MirrorProtocolError", "MirrorReceiver", "MirrorSender", "Resync",
    "SessionClosed", "SessionOpened", "Topology", "Unmarked", "encode",
]

_HEAD = Struct("!BI")
_U64 = Struct("!Q")
_DATA = Struct("!QIBQQ")  # version, session, direction, lsn, offset
_DATA_HEAD = Struct("!BIQIBQQ")  # frame head + Data fields, packed in one go
_DIRECTION = {"c": 0x63, "b": 0x62, "h": 0x68}
_MARK = Struct("!QII")  # version, session, seq
_SESS = Struct("!QI")  # version, session
_BEAT = Struct("!QQQ")  # latest version, lsn, time_us
_HELLO = Struct("!Q")  # epoch
_HACK = Struct("!QQ")  # epoch, next version wanted

MAX_FRAME = 64 << 20


class MirrorProtocolError(Exception):
    """The peer sent something that is not the mirror protocol. Internal to the link
    between two connmgrs: the link is dropped and made again; no client sees it."""


@dataclass(frozen=True, slots=True)
class SessionOpened:
    version: int
    session_id: int
    params: tuple[tuple[str, str], ...]


# The records made per relayed batch (Data, Marker, Unmarked) are read-only by convention,
# not frozen: a frozen dataclass's generated __init__ costs several times a written one,
# which is compiled with the module (see MirroredMessage in replay/import_queue.py).


@dataclass(slots=True, init=False)
class Data:
    version: int
    session_id: int
    direction: str  # "c" client -> server, "b" server -> client, "h" held back from the client
    lsn: int
    offset: int
    payload: bytes

    def __init__(self, version: int, session_id: int, direction: str, lsn: int, offset: int,
                 payload: bytes) -> None:  # fmt: skip
        self.version = version
        self.session_id = session_id
        self.direction = direction
        self.lsn = lsn
        self.offset = offset
        self.payload = payload


@dataclass(slots=True, init=False)
class Marker:
    version: int
    session_id: int
    seq: int

    def __init__(self, version: int, session_id: int, seq: int) -> None:
        self.version = version
        self.session_id = session_id
        self.seq = seq


@dataclass(slots=True, init=False)
class Unmarked:
    version: int
    session_id: int
    count: int

    def __init__(self, version: int, session_id: int, count: int) -> None:
        self.version = version
        self.session_id = session_id
        self.count = count


@dataclass(frozen=True, slots=True)
class SessionClosed:
    version: int
    session_id: int


@dataclass(frozen=True, slots=True)
class Topology:
    """The pair turned around (a failover, then a re-seed): ``primary`` is the database
    the sessions are on now and ``secondary`` the one that follows it (``host:port``
    each). The secondary connmgr reads its poster queue from the first and keeps the
    second's sequences ahead and its DDL applied. In order with the session records:
    every session mirrored after it is on the new primary."""

    version: int
    primary: str
    secondary: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    latest_version: int
    lsn: int
    time_us: int


@dataclass(frozen=True, slots=True)
class Hello:
    epoch: int
    node: str


@dataclass(frozen=True, slots=True)
class HelloAck:
    epoch: int
    next_version: int


@dataclass(frozen=True, slots=True)
class Ack:
    version: int


@dataclass(frozen=True, slots=True)
class AckRequest:
    """Two-phase: the primary holds a commit's acknowledgement until ``version`` is
    acknowledged; the secondary acks as soon as it has it (no coalescing delay)."""

    version: int


@dataclass(frozen=True, slots=True)
class DeltaRequest:
    from_version: int


@dataclass(frozen=True, slots=True)
class Resync:
    """The history the secondary asked for is gone; ``next_version`` is where it resumes."""

    next_version: int


Versioned = SessionOpened | Data | Marker | Unmarked | SessionClosed | Topology
_VERSIONED = (Data, Marker, Unmarked, SessionOpened, SessionClosed, Topology)  # for isinstance, built once
Record = Versioned | Heartbeat | Hello | HelloAck | Ack | AckRequest | DeltaRequest | Resync


def _frame(kind: bytes, body: bytes) -> bytes:
    return _HEAD.pack(kind[0], len(body)) + body


def _strings(items: tuple[tuple[str, str], ...]) -> bytes:
    out = bytearray()
    for k, v in items:
        for s in (k, v):
            b = s.encode("utf-8", "surrogateescape")  # startup values Postgres took as bytes
            if b"\0" in b:
                raise ValueError("NUL in a session parameter")
            out += b + b"\0"
    return bytes(out)


def encode(rec: Record) -> bytes:
    """The wire bytes of one record."""
    match rec:
        case Data():
            d = rec.direction.encode()
            return _frame(b"M", _DATA.pack(rec.version, rec.session_id, d[0], rec.lsn, rec.offset) + rec.payload)
        case SessionOpened():
            return _frame(b"S", _SESS.pack(rec.version, rec.session_id) + _strings(rec.params))
        case Marker():
            return _frame(b"K", _MARK.pack(rec.version, rec.session_id, rec.seq))
        case Unmarked():
            return _frame(b"U", _MARK.pack(rec.version, rec.session_id, rec.count))
        case SessionClosed():
            return _frame(b"X", _SESS.pack(rec.version, rec.session_id))
        case Topology():
            return _frame(b"T", _U64.pack(rec.version) + _strings(((rec.primary, rec.secondary),)))
        case Heartbeat():
            return _frame(b"H", _BEAT.pack(rec.latest_version, rec.lsn, rec.time_us))
        case Hello():
            return _frame(b"I", _HELLO.pack(rec.epoch) + rec.node.encode())
        case HelloAck():
            return _frame(b"i", _HACK.pack(rec.epoch, rec.next_version))
        case Ack():
            return _frame(b"A", _U64.pack(rec.version))
        case DeltaRequest():
            return _frame(b"R", _U64.pack(rec.from_version))
        case AckRequest():
            return _frame(b"Q", _U64.pack(rec.version))
        case Resync():
            return _frame(b"Y", _U64.pack(rec.next_version))
    raise TypeError(f"not a mirror record: {rec!r}")


def _decode(kind: int, body: bytes) -> Record:
    try:
        if kind == 0x4D:  # M
            version, session, direction, lsn, offset = _DATA.unpack_from(body)
            if direction not in (0x63, 0x62, 0x68):
                raise MirrorProtocolError(f"Data record with direction {direction:#x}")
            return Data(version, session, chr(direction), lsn, offset, body[_DATA.size:])
        if kind == 0x53:  # S
            version, session = _SESS.unpack_from(body)
            parts = body[_SESS.size:].split(b"\0")
            if parts[-1] != b"" or len(parts) % 2 != 1:
                raise MirrorProtocolError("SessionOpened parameters are not NUL-terminated pairs")
            texts = [p.decode("utf-8", "surrogateescape") for p in parts[:-1]]
            return SessionOpened(version, session, tuple(zip(texts[::2], texts[1::2], strict=True)))
        if kind == 0x4B:  # K
            return Marker(*_exact(_MARK, body))
        if kind == 0x55:  # U
            return Unmarked(*_exact(_MARK, body))
        if kind == 0x58:  # X
            return SessionClosed(*_exact(_SESS, body))
        if kind == 0x54:  # T
            (version,) = _U64.unpack_from(body)
            parts = body[_U64.size:].split(b"\0")
            if len(parts) != 3 or parts[2] != b"":
                raise MirrorProtocolError("Topology record is not two NUL-terminated addresses")
            return Topology(version, parts[0].decode(), parts[1].decode())
        if kind == 0x48:  # H
            return Heartbeat(*_exact(_BEAT, body))
        if kind == 0x49:  # I
            (epoch,) = _HELLO.unpack_from(body)
            return Hello(epoch, body[_HELLO.size:].decode())
        if kind == 0x69:  # i
            return HelloAck(*_exact(_HACK, body))
        if kind == 0x41:  # A
            return Ack(*_exact(_U64, body))
        if kind == 0x52:  # R
            return DeltaRequest(*_exact(_U64, body))
        if kind == 0x51:  # Q
            return AckRequest(*_exact(_U64, body))
        if kind == 0x59:  # Y
            return Resync(*_exact(_U64, body))
    except (ValueError, UnicodeDecodeError) as e:  # struct.error is a ValueError
        raise MirrorProtocolError(f"malformed mirror record {chr(kind)!r}: {e}") from None
    raise MirrorProtocolError(f"unknown mirror record kind {kind:#x}")


def _exact(st: Struct, body: bytes) -> tuple:
    if len(body) != st.size:
        raise MirrorProtocolError(f"record body of {len(body)} bytes, expected {st.size}")
    return st.unpack(body)


class MirrorDecoder:
    """Cuts a byte stream into records. ``feed(data)`` returns the complete ones."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Record]:
        buf = self._buf
        buf += data
        out: list[Record] = []
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            kind, length = _HEAD.unpack_from(buf, pos)
            if length > self.max_frame:
                raise MirrorProtocolError(f"mirror frame of {length} bytes is over {self.max_frame}")
            end = pos + 5 + length
            if end > n:
                break
            out.append(_decode(kind, bytes(buf[pos + 5:end])))
            pos = end
        del buf[:pos]
        return out


class MirrorSender:
    """The primary's side: assigns versions, keeps the unacknowledged delta (bounded)."""

    def __init__(self, epoch: int, *, max_buffer_bytes: int = 64 << 20) -> None:
        self.epoch = epoch
        self.max_buffer_bytes = max_buffer_bytes
        self.latest_version = 0
        self.acked_version = 0
        #: versions below this were dropped unacknowledged (buffer overflow)
        self.lost_below = 1
        self.overflows = 0
        self.resyncs_sent = 0
        self._buffer: deque[tuple[int, bytes]] = deque()
        self.buffered_bytes = 0

    def _next(self) -> int:
        self.latest_version += 1
        return self.latest_version

    def _keep(self, version: int, wire: bytes) -> bytes:
        self._buffer.append((version, wire))
        self.buffered_bytes += len(wire)
        while self.buffered_bytes > self.max_buffer_bytes and self._buffer:
            v, w = self._buffer.popleft()
            self.buffered_bytes -= len(w)
            self.lost_below = v + 1
            self.overflows += 1
        return wire

    def session_opened(self, session_id: int, params: dict[str, str]) -> bytes:
        v = self._next()
        return self._keep(v, encode(SessionOpened(v, session_id, tuple(params.items()))))

    def data(self, session_id: int, direction: str, lsn: int, offset: int, payload: bytes) -> bytes:
        """Encode a Data record (the hot path: straight to bytes, no record object)."""
        v = self._next()
        wire = _DATA_HEAD.pack(0x4D, _DATA.size + len(payload), v, session_id, _DIRECTION[direction], lsn, offset) + payload
        return self._keep(v, wire)

    def marker(self, session_id: int, seq: int) -> bytes:
        v = self._next()
        return self._keep(v, encode(Marker(v, session_id, seq)))

    def unmarked(self, session_id: int, count: int) -> bytes:
        v = self._next()
        return self._keep(v, encode(Unmarked(v, session_id, count)))

    def session_closed(self, session_id: int) -> bytes:
        v = self._next()
        return self._keep(v, encode(SessionClosed(v, session_id)))

    def topology(self, primary: str, secondary: str) -> bytes:
        v = self._next()
        return self._keep(v, encode(Topology(v, primary, secondary)))

    def heartbeat(self, lsn: int, time_us: int) -> bytes:
        return encode(Heartbeat(self.latest_version, lsn, time_us))

    def ack_request(self, version: int) -> bytes:
        return encode(AckRequest(version))

    def hello(self, node: str) -> bytes:
        return encode(Hello(self.epoch, node))

    def on_ack(self, version: int) -> None:
        """The secondary has everything up to ``version``: drop it from the buffer."""
        if version > self.latest_version:
            raise MirrorProtocolError(f"ack of version {version}, but only {self.latest_version} were sent")
        if version <= self.acked_version:
            return
        self.acked_version = version
        buf = self._buffer
        while buf and buf[0][0] <= version:
            self.buffered_bytes -= len(buf.popleft()[1])

    def delta(self, from_version: int) -> bytes:
        """The records from ``from_version`` on, or a Resync if that history is gone."""
        if from_version < self.lost_below:
            first = self._buffer[0][0] if self._buffer else self.latest_version + 1
            return encode(Resync(first)) + b"".join(w for _v, w in self._buffer)
        return b"".join(w for v, w in self._buffer if v >= from_version)

    def on_hello_ack(self, ack: HelloAck) -> bytes:
        """After (re)connecting: the secondary says what it has; resend the rest."""
        if ack.epoch != self.epoch:
            # The secondary knew an earlier incarnation of us: everything it needs is new.
            return self.delta(1)
        if ack.next_version <= self.acked_version:
            # It acknowledged more than it has now (a restarted secondary): what it lost
            # is no longer buffered, so it must resync from what is.
            first = self._buffer[0][0] if self._buffer else self.latest_version + 1
            self.resyncs_sent += 1
            return encode(Resync(first)) + b"".join(w for _v, w in self._buffer)
        self.on_ack(min(ack.next_version - 1, self.latest_version))
        return self.delta(ack.next_version)


class MirrorReceiver:
    """The secondary's side: in-order, exactly-once delivery of versioned records."""

    def __init__(self, *, max_held: int = 100_000) -> None:
        self.epoch: int | None = None
        self.expected = 1
        self.max_held = max_held
        self._held: dict[int, Versioned] = {}
        self._asked_for: int | None = None
        self.duplicates = 0
        self.gaps = 0
        self.resyncs = 0
        #: highest version the primary asked to be acknowledged at once (AckRequest)
        self.ack_wanted = 0

    def on_hello(self, hello: Hello) -> HelloAck:
        if hello.epoch != self.epoch:  # a new primary incarnation: its versions start at 1
            if self.epoch is not None:
                self.resyncs += 1
            self.epoch = hello.epoch
            self.expected = 1
            self._held.clear()
        self._asked_for = None
        return HelloAck(hello.epoch, self.expected)

    @property
    def acked(self) -> int:
        return self.expected - 1

    def on_record(self, rec: Record) -> tuple[list[Versioned | Resync], list[Record]]:
        """Returns (records to deliver, in order; control records to send back). A
        delivered :class:`Resync` means history before it was lost: trust no session's
        past (see the module docstring)."""
        if not isinstance(rec, _VERSIONED):
            if isinstance(rec, Heartbeat):
                if rec.latest_version >= self.expected:
                    return [], self._ask(self.expected)
                return [], []
            if isinstance(rec, AckRequest):
                self.ack_wanted = max(self.ack_wanted, rec.version)
                return [], []
            if isinstance(rec, Resync):
                self.resyncs += 1
                self.expected = rec.next_version
                self._held = {v: r for v, r in self._held.items() if v >= self.expected}
                self._asked_for = None
                return [rec], []
            raise MirrorProtocolError(f"unexpected {type(rec).__name__} on the secondary side")
        v = rec.version
        if v < self.expected or v in self._held:
            self.duplicates += 1
            return [], []
        if v > self.expected:
            if len(self._held) >= self.max_held:
                raise MirrorProtocolError("too many records held behind a gap")
            self._held[v] = rec
            return [], self._ask(self.expected)
        out: list[Versioned | Resync] = [rec]
        self.expected += 1
        held = self._held
        while self.expected in held:
            out.append(held.pop(self.expected))
            self.expected += 1
        if self._asked_for is not None and self._asked_for < self.expected:
            self._asked_for = None
        return out, []

    def _ask(self, version: int) -> list[Record]:
        if self._asked_for == version:
            return []  # already asked; the delta is on its way
        self.gaps += 1
        self._asked_for = version
        return [DeltaRequest(version)]

