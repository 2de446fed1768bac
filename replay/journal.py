"""What a session would have to replay: the open transaction's bytes in both directions
(sans-IO).

The primary connmgr keeps, for every session, the client's messages since the last
ReadyForQuery 'I' the client received and the server's replies the client has received
since then. That is exactly what a move to another server needs: the requests to run again
and the replies to compare them with (seed 004 [0088]). At every ReadyForQuery 'I' the
transaction is over and the journal drops what belongs to it, so it holds one transaction
(plus whatever the client pipelined behind it) and costs two buffer appends per batch.

Pairing replies with requests needs no parsing here: every ReadyForQuery answers exactly
one *sync point* -- a Query, a Sync or a FunctionCall -- in order. The relay reports where
each sync point ends in the client's stream (:meth:`Journal.client`) and each
ReadyForQuery's status (:meth:`Journal.server`); at an 'I' the requests up to that sync
point and the replies up to that ReadyForQuery are cut off.

A transaction larger than ``limit`` bytes (requests plus replies) is not kept: the journal
says :attr:`Journal.overflow` until the transaction ends, and such a transaction cannot be
replayed (the move rolls it back with a retryable error).
"""

from __future__ import annotations

from collections import deque

__all__ = ["Journal"]


class Journal:
    """See the module docstring."""

    __slots__ = ("requests", "replies", "limit", "overflow", "_base", "_total", "_syncs", "_answered_end")

    def __init__(self, limit: int = 8 << 20) -> None:
        #: the client's messages since the last transaction end, as sent
        self.requests = bytearray()
        #: the server's messages the client received since then (connmgr's own removed)
        self.replies = bytearray()
        self.limit = limit
        self.overflow = False
        self._base = 0  # stream position of requests[0]
        self._total = 0  # stream position after the last client byte seen
        self._syncs: deque[int] = deque()  # stream positions just after each unanswered sync point
        self._answered_end = 0  # stream position after the last answered sync point

    def client(self, buf: bytes | bytearray | memoryview, sync_ends: list[int] | None) -> None:
        """The client sent ``buf``; ``sync_ends`` are the offsets in ``buf`` just after each
        Query, Sync or FunctionCall in it (None: there are none); a negative one is the end
        of a CopyDone or CopyFail, which extends the COPY's Query to there."""
        total = self._total
        if sync_ends:
            for end in sync_ends:
                if end >= 0:
                    self._syncs.append(total + end)
                elif self._syncs:  # CopyDone/CopyFail: the running COPY's request ends here
                    self._syncs[-1] = total - end
        self._total = total + len(buf)
        if not self.overflow:
            self.requests += buf
            if len(self.requests) + len(self.replies) > self.limit:
                self._overflowed()

    def server(self, buf: bytes | bytearray | memoryview, readies: list[tuple[int, int]] | None) -> None:
        """The client received ``buf``; ``readies`` are (offset just after, status byte) of
        each ReadyForQuery in it (None: there are none)."""
        if not readies:
            if not self.overflow:
                self.replies += buf
                if len(self.requests) + len(self.replies) > self.limit:
                    self._overflowed()
            return
        cut = -1
        for end, status in readies:
            sync_end = self._syncs.popleft() if self._syncs else self._total
            self._answered_end = sync_end
            if status == 73:  # 'I': the transaction is over
                cut = end
                self._cut_requests(sync_end)
        if cut < 0:
            if not self.overflow:
                self.replies += buf
            return
        self.replies = bytearray(buf[cut:])
        if self.overflow and not self._syncs and self._base == self._total:
            self.overflow = False
            self.requests = bytearray()

    def _cut_requests(self, position: int) -> None:
        if not self.overflow:
            del self.requests[: position - self._base]
        self._base = position

    def _overflowed(self) -> None:
        self.overflow = True
        self.requests = bytearray()
        self.replies = bytearray()

    @property
    def sync_ends(self) -> list[int]:
        """Offsets in :attr:`requests` just after each unanswered sync point."""
        base = self._base
        return [p - base for p in self._syncs]

    @property
    def answered(self) -> int:
        """Bytes at the start of :attr:`requests` whose replies the client has in full
        (every sync point in them answered)."""
        return max(0, self._answered_end - self._base)
