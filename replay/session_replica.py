"""Host B's copy of one mirrored session: what a host takeover needs to continue it (sans-IO).

How it works
------------
When the database dies, the primary connmgr moves its own sessions: it has each one's
protocol shadow, the open transaction's bytes (:mod:`replay.journal`), the SQL-level state
(:mod:`replay.session_recorder`) and its relay's counters. When the whole host dies, all of
that dies with it, and host B must have its own. It builds them here from the mirror
stream, message for message as host A's relay did (``connmgr/proxy/relay.py``,
``Upstream.process`` and ``Downstream.process`` in journal mode): the mirror carries the
client's bytes as the client sent them and the server's bytes as the client received them
(connmgr's own statements and replies already taken out), so the same shadow fed the same
messages reaches the same state. A test compares the two on a live pair
(``tests/integration/test_session_replica.py``).

What a replica keeps, beside the shadow, the journal and the recorder (shared with the
import process):

* ``transactions``: transactions ended (ReadyForQuery 'I'), which numbers the open one for
  the marker rows; ``rolled_back`` for the recorder's end of transaction;
* ``unmarked``: requests in flight that may commit without a marker (the primary says so in
  an :class:`~replay.mirror_protocol.Unmarked` record before the batch; one is answered per
  ReadyForQuery, as on the primary);
* ``stash``: server bytes the primary holds back from the client until an autocommit
  write's commit (mirror direction ``h``): the replies a takeover delivers if that write
  committed;
* the **tail** of the server stream (raw bytes, partial messages too) from
  ``tail_start``, bounded: the bytes the client may not have acknowledged yet, which host
  B sends again first;
* ``problem``: the first reason the session cannot move any more (a message streamed
  past [server] max_buffered_message, a gap in the mirror, the shadow losing track).

Batches must come in stream order per direction; each carries its stream offset and a
batch that does not start where the last ended marks the replica lost.
"""

from __future__ import annotations

from replay.journal import Journal
from replay.session_recorder import SessionRecorder
from shadow.errors import RemoteProtocolError
from shadow.session import SessionState

__all__ = ["SessionReplica", "parse_address"]

_Q, _S, _F, _D, _Z, _E, _CC, _I = (ord(c) for c in "QSFDZECI")
_c, _f, _d = ord("c"), ord("f"), ord("d")


def parse_address(text: str | None) -> tuple[str, int] | None:
    """``host:port`` (or ``[v6]:port``) -> (host, port); None if absent or malformed."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class SessionReplica:
    """See the module docstring. ``params``: the SessionOpened parameters (the client's
    start-up parameters and the primary's own: peer, local, origin, markers, virtual_pid,
    cancel_secret)."""

    def __init__(self, session_id: int, params: dict[str, str], recorder: SessionRecorder | None = None, *,
                 max_replay_bytes: int = 8 << 20, max_tail: int = 8 << 20) -> None:  # fmt: skip
        self.session_id = session_id
        self.params = params
        self.peer = parse_address(params.get("peer"))
        self.local = parse_address(params.get("local"))
        self.origin = int(params.get("origin") or 0)
        self.markers = params.get("markers") == "1"
        #: a TLS session: the mirror carries its plaintext, whose offsets are not the TCP
        #: stream's (host B cannot continue it, only close it: connmgr/host/takeover.py)
        self.tls = params.get("tls") == "1"
        self.user = params.get("user", "")
        self.database = params.get("database") or self.user
        vpid, secret = params.get("virtual_pid", ""), params.get("cancel_secret", "")
        self.key = (int(vpid), int(secret)) if vpid.isdigit() and secret.isdigit() else None
        self.session = SessionState.joined()
        self.journal = Journal(max_replay_bytes)
        self.recorder = recorder if recorder is not None else SessionRecorder()
        self.transactions = 0
        self.rolled_back = False
        self.unmarked = 0
        self.marker_seq = 0
        self.stash = bytearray()
        self.tracking = True
        self.problem: str | None = None
        #: where the processed (whole-message) bytes of each direction end, and where the
        #: raw bytes mirrored so far end; they start where the relay started (after the
        #: start-up: the mirror carries nothing before it); None: not known
        c0, b0 = params.get("client_offset", ""), params.get("server_offset", "")
        self.client_end: int | None = int(c0) if c0.isdigit() else None
        self.server_end: int | None = int(b0) if b0.isdigit() else None
        self.client_raw_end: int | None = self.client_end
        self.server_raw_end: int | None = self.server_end
        #: the mirror version of the last client batch (orders commits in flight across
        #: sessions: the one sent first resolves first)
        self.client_version = 0
        self.max_tail = max_tail
        self.tail = bytearray()
        self.tail_start = 0

    # ------------------------------------------------------------------ feeding

    def lose(self, reason: str) -> None:
        """From now on the session cannot move (the first reason is kept)."""
        if self.problem is None:
            self.problem = reason

    def client_raw(self, offset: int, size: int) -> None:
        """Raw client bytes [offset, offset + size) were mirrored (framing happens apart)."""
        if self.client_raw_end is not None and offset != self.client_raw_end:
            self.lose(f"client stream gap in the mirror at {self.client_raw_end} (next batch at {offset})")
        self.client_raw_end = offset + size

    def server_raw(self, offset: int, payload: bytes | bytearray) -> None:
        """Raw server bytes as mirrored: kept in the bounded tail."""
        if self.server_raw_end is not None and offset != self.server_raw_end:
            self.lose(f"server stream gap in the mirror at {self.server_raw_end} (next batch at {offset})")
            self.tail = bytearray()
        if not self.tail:
            self.tail_start = offset
        self.tail += payload
        self.server_raw_end = offset + len(payload)
        over = len(self.tail) - self.max_tail
        if over > 0:
            del self.tail[:over]
            self.tail_start += over

    def server_bytes(self, start: int, end: int) -> bytes | None:
        """Server stream bytes [start, end) from the tail, None if not all are kept."""
        if start < self.tail_start or end > self.tail_start + len(self.tail):
            return None
        return bytes(self.tail[start - self.tail_start:end - self.tail_start])

    def unmarked_requests(self, count: int) -> None:
        self.unmarked += count

    def marker(self, seq: int) -> None:
        self.marker_seq = seq

    def held(self, payload: bytes | bytearray) -> None:
        self.stash += payload

    def client_batch(self, offset: int, buf: bytes | bytearray, frames: list) -> None:
        """Whole client messages ``frames`` of ``buf``, whose first byte is at ``offset``."""
        if self.client_end is not None and offset != self.client_end:
            self.lose(f"client messages out of order at {self.client_end} (batch at {offset})")
        self.client_end = offset + len(buf)
        syncs = None
        track = self.tracking
        shadow = self.session
        for tag, start, end in frames:
            if tag == _d or tag > 0xFF:
                continue
            if tag == _Q or tag == _S or tag == _F:
                if syncs is None:
                    syncs = []
                syncs.append(end)
            elif tag == _c or tag == _f:
                if syncs is None:
                    syncs = []
                syncs.append(-end)
            if track:
                try:
                    shadow.frontend_message(tag, buf[start:end])
                except RemoteProtocolError as e:
                    self._untrack("client", e)
                    track = False
        self.journal.client(buf, syncs)

    def server_batch(self, offset: int, buf: bytes | bytearray, frames: list) -> None:
        """Whole server messages as the client received them."""
        if self.server_end is not None and offset != self.server_end:
            self.lose(f"server messages out of order at {self.server_end} (batch at {offset})")
        self.server_end = offset + len(buf)
        self.stash = bytearray()  # what was held has been released into this stream
        readies = None
        track = self.tracking
        shadow = self.session
        for tag, start, end in frames:
            if tag == _D or tag > 0xFF:
                continue
            if tag == _E:
                self.rolled_back = True
            elif tag == _CC and buf.startswith(b"ROLLBACK", start):
                self.rolled_back = True
            elif tag == _Z:
                if readies is None:
                    readies = []
                readies.append((end, buf[start]))
                if self.unmarked:
                    self.unmarked -= 1
                if buf[start] == _I:
                    self.transactions += 1
                    self.rolled_back = False
            if track:
                try:
                    shadow.backend_message(tag, buf[start:end])
                except RemoteProtocolError as e:
                    self._untrack("server", e)
                    track = False
        self.journal.server(buf, readies)

    def _untrack(self, direction: str, e: RemoteProtocolError) -> None:
        self.tracking = False
        self.lose(f"the protocol shadow lost track of the {direction} stream: {e.message}")
