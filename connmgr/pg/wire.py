"""Whole-message reads for the startup and authentication phases.

The relay hot path works on chunks (see :mod:`connmgr.proxy.relay`); the handshakes before it
need "the next message", one at a time. :class:`MessageReader` wraps a stream and a
:class:`~shadow.framing.Framer` and hands out ``(tag, body)`` pairs. Whatever it has read
beyond the handshake (a client may pipeline its first query behind the password) is handed
over to the relay with :meth:`MessageReader.take_buffered` so nothing is lost.
"""

from __future__ import annotations

from collections import deque

import trio

from connmgr.errors import ClientError
from shadow.framing import Framer

Stream = trio.abc.Stream


class PeerClosed(ClientError):
    """The peer closed the connection in the middle of a handshake (SQLSTATE 08006, for
    the log: there is nobody left to tell)."""

    sqlstate = "08006"


class MessageReader:
    __slots__ = ("stream", "framer", "_ready", "what")

    def __init__(self, stream: Stream, framer: Framer, what: str) -> None:
        self.stream = stream
        self.framer = framer
        self.what = what
        self._ready: deque[tuple[int, bytes, bytes]] = deque()

    async def read(self) -> tuple[int, bytes]:
        """Return the next ``(tag, body)``; tag 0 for an untyped startup packet.

        Raises :class:`PeerClosed` at EOF and ``RemoteProtocolError`` on garbage.
        """
        tag, body, _raw = await self.read_raw()
        return tag, body

    async def read_raw(self) -> tuple[int, bytes, bytes]:
        """Like :meth:`read` but also returns the message's original bytes."""
        while not self._ready:
            data = await self.stream.receive_some()
            if not data:
                self.framer.feed_eof()
                raise PeerClosed(f"{self.what} closed the connection during the handshake")
            self._absorb(data)
        return self._ready.popleft()

    def switch_to_typed(self) -> None:
        """Leave the untyped startup phase; messages held back are framed now."""
        self.framer.switch_to_typed()
        self._absorb(b"")

    def _absorb(self, data: bytes) -> None:
        buf, frames = self.framer.feed(data)
        for tag, start, end in frames:
            head = start - (5 if tag else 4)
            self._ready.append((tag, bytes(buf[start:end]), bytes(buf[head:end])))

    @property
    def has_buffered(self) -> bool:
        return bool(self._ready) or self.framer.pending_bytes > 0

    def take_buffered(self) -> bytes:
        """Original bytes of complete messages read but not yet consumed (the framer keeps
        any partial one). Used to hand over to the relay."""
        out = b"".join(raw for _t, _b, raw in self._ready)
        self._ready.clear()
        return out
