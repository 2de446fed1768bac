"""Byte streams for the relay hot path.

:class:`FastSocketStream` is a :class:`trio.abc.HalfCloseableStream` over a plain TCP
socket that tries the system call first and waits for readiness only when the kernel says
it would block. trio's own ``SocketStream`` takes two scheduler checkpoints per call even
when data is already there; on a proxy that relays one small message per call that is most
of the cost. To keep trio's fairness guarantee we still take a checkpoint every
``_YIELD_EVERY`` calls that did not block, so a bulk transfer cannot starve other tasks,
and cancellation is delivered at every wait.

TLS connections use ``trio.SSLStream`` over a ``FastSocketStream``; both satisfy the same
``receive_some``/``send_all`` interface, so the relay does not care which it has.
"""

from __future__ import annotations

import errno
import socket as _stdsocket

import trio

__all__ = ["FastSocketStream", "close_now", "open_tcp", "set_nodelay"]

_YIELD_EVERY = 16
_RECV_SIZE = 64 * 1024


def set_nodelay(sock: _stdsocket.socket) -> None:
    try:
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    except OSError:  # not TCP (unix socket)
        pass


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A stream over a connected non-blocking socket. See the module docstring."""

    __slots__ = ("_sock", "_calls", "_closed", "_drained", "received", "sent")

    def __init__(self, sock: _stdsocket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._calls = 0
        # the last recv returned less than asked: the kernel buffer was empty then, so the
        # next recv would almost surely say EAGAIN -- wait for readiness first instead
        self._drained = False
        #: bytes received and sent through this stream object (TCP stream offsets)
        self.received = 0
        self.sent = 0
        self._closed = False
        set_nodelay(self._sock)

    async def _maybe_yield(self) -> None:
        # Fairness only. Shielded: the bytes are already received (or sent), so a cancel
        # delivered here would lose them; cancellation arrives at the next wait instead.
        self._calls += 1
        if self._calls >= _YIELD_EVERY:
            self._calls = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        n = max_bytes or _RECV_SIZE
        sock = self._sock
        if self._drained:
            self._calls = 0
            await trio.lowlevel.wait_readable(sock)
        while True:
            try:
                data = sock.recv(n)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                self._calls = 0
                continue
            except OSError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("stream is closed") from None
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
            self._drained = len(data) < n
            self.received += len(data)
            if not self._drained:
                await self._maybe_yield()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        sock = self._sock
        view = None
        total = len(data)
        self.sent += total
        sent = 0
        while sent < total:
            try:
                if view is None:
                    n = sock.send(data)
                    if n == total:
                        break
                    view = memoryview(data)
                else:
                    n = sock.send(view[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                self._calls = 0
                continue
            except OSError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("stream is closed") from None
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            sent += n
        await self._maybe_yield()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self._sock.shutdown(_stdsocket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise trio.BrokenResourceError(f"shutdown failed: {exc}") from exc

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close at once, without a checkpoint (usable in ``finally`` under cancellation)."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    @classmethod
    def from_trio(cls, sock: trio.socket.SocketType) -> FastSocketStream:
        """Take over the file descriptor of a trio socket (which is left detached)."""
        family, type_, proto = sock.family, sock.type, sock.proto
        return cls(_stdsocket.socket(family, type_, proto, fileno=sock.detach()))

    @property
    def raw_socket(self) -> _stdsocket.socket:
        return self._sock

    def peer(self) -> str:
        try:
            host, port = self._sock.getpeername()[:2]
        except (OSError, ValueError):
            return "?"
        return f"{host}:{port}"


def close_now(stream: trio.abc.Stream) -> None:
    """Close ``stream`` at once, without a checkpoint (usable in ``finally`` under
    cancellation); for a TLS stream, the transport underneath."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()
    elif isinstance(stream, trio.SSLStream):
        close_now(stream.transport_stream)


async def open_tcp(host: str, port: int) -> FastSocketStream:
    """Connect to ``host:port``; returns a :class:`FastSocketStream`.

    Raises ``OSError`` when the connection fails (the caller turns it into 08006).
    """
    stream = await trio.open_tcp_stream(host, port)
    return FastSocketStream.from_trio(stream.socket)
