"""The control channel between the supervisor and one worker: JSON objects, each behind a
4-byte big-endian length, over a Unix socket pair.

A frame is a request (``{"id": n, "op": ...}``, answered by exactly one reply
``{"re": n, ...}``, or ``{"re": n, "error": text}`` when the handler failed) or a
notification (``{"op": ...}`` with no ``id``, never answered). :class:`Channel` is the
trio end of it; :func:`encode` and :class:`Decoder` are the framing, free of I/O.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("connmgr.workers")

__all__ = ["Channel", "ControlError", "Decoder", "encode", "MAX_FRAME"]

#: the longest frame either end accepts (a worker's metrics text is the longest, ~100 KiB)
MAX_FRAME = 16 << 20

_LENGTH = struct.Struct(">I")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]
#: an op handled in the reading task itself, in the order the frames came (see Channel.run)
InlineHandler = Callable[[dict[str, Any]], dict[str, Any] | None]


class ControlError(Exception):
    """The other end sent a malformed frame, closed the channel, or answered an error.
    Internal: between connmgr's own processes, never sent to a client."""


def encode(obj: dict[str, Any]) -> bytes:
    """One frame holding ``obj``."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ControlError(f"control frame of {len(body)} bytes is over the limit of {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


class Decoder:
    """Bytes in (:meth:`feed`), whole objects out; raises :class:`ControlError` on a length
    over :data:`MAX_FRAME` or a body that is not a JSON object."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        out = []
        while len(self._buffer) >= 4:
            (n,) = _LENGTH.unpack_from(self._buffer)
            if n > MAX_FRAME:
                raise ControlError(f"control frame announces {n} bytes, over the limit of {MAX_FRAME}")
            if len(self._buffer) < 4 + n:
                break
            body = bytes(self._buffer[4:4 + n])
            del self._buffer[:4 + n]
            try:
                obj = json.loads(body)
            except ValueError as e:
                raise ControlError(f"control frame is not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ControlError(f"control frame is not an object: {type(obj).__name__}")
            out.append(obj)
        return out

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet whole."""
        return len(self._buffer)


def _check_args(op: str, args: dict[str, Any]) -> None:
    """``id`` and ``re`` are keys of the frame itself: an argument of that name would
    turn a notification into a request, or send a reply nobody waits for."""
    clash = {"id", "re"} & args.keys()
    if clash:
        raise ValueError(f"control {op}: {', '.join(sorted(clash))} is a key of the frame itself, not an argument")


class Channel:
    """One end of a control connection. :meth:`run` reads frames until EOF: replies wake
    their :meth:`call`, requests and notifications go to the handler (each in a task of
    its own, so a slow one holds up nothing else) -- or, for the ops given as ``inline``,
    to a synchronous handler called at once, so they take effect in the order they were
    sent (trio runs tasks started together in no fixed order)."""

    def __init__(self, stream: trio.abc.Stream, name: str) -> None:
        self.stream = stream
        #: for log lines ("worker 3")
        self.name = name
        self._decoder = Decoder()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list]] = {}
        self._send_lock = trio.StrictFIFOLock()
        self.closed = False

    async def receive(self) -> dict[str, Any]:
        """The next frame, read directly (before :meth:`run`: the worker's first frame)."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ControlError(f"{self.name}: control channel closed")
            frames = self._decoder.feed(data)
            if len(frames) > 1:
                raise ControlError(f"{self.name}: more than one frame before the channel runs")
            if frames:
                return frames[0]

    async def send(self, obj: dict[str, Any]) -> None:
        frame = encode(obj)
        async with self._send_lock:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise ControlError(f"{self.name}: control channel closed") from e

    async def notify(self, op: str, **args: Any) -> None:
        """Send a notification (no reply)."""
        _check_args(op, args)
        await self.send({"op": op, **args})

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send a request and return its reply; :class:`ControlError` if the other end
        answers an error or the channel closes first. The caller bounds the wait."""
        _check_args(op, args)
        if self.closed:
            raise ControlError(f"{self.name}: control channel closed")
        ident = next(self._ids)
        done, box = self._waiting[ident] = (trio.Event(), [])
        try:
            await self.send({"id": ident, "op": op, **args})
            await done.wait()
        finally:
            self._waiting.pop(ident, None)
        if not box:
            raise ControlError(f"{self.name}: control channel closed before it answered {op}")
        reply = box[0]
        if "error" in reply:
            raise ControlError(f"{self.name}: {op}: {reply['error']}")
        return reply

    async def run(self, handler: Handler, inline: dict[str, InlineHandler] | None = None) -> None:
        """Read until EOF (or a malformed frame: :class:`ControlError`). Calls still
        waiting when it ends fail with :class:`ControlError`."""
        inline = inline or {}
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data = await self.stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        nursery.cancel_scope.cancel()
                        return
                    for frame in self._decoder.feed(data):
                        if "re" in frame:
                            waiting = self._waiting.get(frame["re"])
                            if waiting is not None:
                                waiting[1].append(frame)
                                waiting[0].set()
                        elif frame.get("op") in inline:
                            self._answer_inline(nursery, inline[frame["op"]], frame)
                        elif isinstance(frame.get("op"), str):
                            nursery.start_soon(self._answer, handler, frame)
                        else:
                            raise ControlError(f"{self.name}: control frame with neither op nor re: {frame!r:.200}")
        finally:
            self.closed = True
            for done, _box in list(self._waiting.values()):
                done.set()

    def _answer_inline(self, nursery: trio.Nursery, handler: InlineHandler, frame: dict[str, Any]) -> None:
        try:
            reply = handler(frame) or {}
        except Exception as e:  # noqa: BLE001 - the asker gets the error; this end goes on
            reply = self._failed(frame, e)
        if frame.get("id") is not None and reply is not None:
            nursery.start_soon(self._reply, frame["id"], reply)

    def _failed(self, frame: dict[str, Any], e: Exception) -> dict[str, Any] | None:
        """The reply to a request whose handler raised ``e`` (None for a notification: logged)."""
        if frame.get("id") is None:
            log.exception("%s: control notification %s failed", self.name, frame.get("op"), exc_info=e)
            return None
        return {"error": f"{type(e).__name__}: {e}"}

    async def _reply(self, ident: int, reply: dict[str, Any]) -> None:
        try:
            await self.send({"re": ident, **reply})
        except ControlError:
            pass

    async def _answer(self, handler: Handler, frame: dict[str, Any]) -> None:
        try:
            reply = await handler(frame) or {}
        except Exception as e:  # noqa: BLE001 - the asker gets the error; this end goes on
            reply = self._failed(frame, e)
        if frame.get("id") is not None and reply is not None:
            await self._reply(frame["id"], reply)
