"""A worker's end of the control channel (``connmgr _worker FD``, started by the
supervisor): what the worker asks of the supervisor, and the ops it answers.

The worker's first frame is its spec (:func:`open_link`); then :meth:`WorkerLink.run`
answers the supervisor's requests with the handlers the composition root gives it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from connmgr.workers.control import Channel, ControlError, InlineHandler

log = logging.getLogger("connmgr.workers")

__all__ = ["WorkerLink", "open_link"]


class WorkerLink:
    """Worker ``index`` of ``count``, talking to its supervisor over ``channel``."""

    def __init__(self, channel: Channel, index: int, count: int) -> None:
        self.channel = channel
        self.index = index
        self.count = count
        self._nursery: trio.Nursery | None = None
        #: with the pair's failover: the fleet's freeze flag and the failover's state when
        #: this worker started (connmgr/failover/fleet.py)
        self.flag = None
        self.failover_state: dict[str, Any] = {}

    def notify_soon(self, op: str, **args: Any) -> None:
        """A notification to the supervisor, sent in the background."""
        if self._nursery is not None:
            self._nursery.start_soon(self._notify, op, args)

    async def _notify(self, op: str, args: dict[str, Any]) -> None:
        try:
            await self.channel.notify(op, **args)
        except ControlError as e:
            log.warning("%s not passed to the supervisor: %s", op, e)

    async def forward_cancel(self, owner: int, pid: int, secret: int) -> None:
        """A CancelRequest for worker ``owner``'s session: the supervisor passes it on."""
        try:
            await self.channel.notify("cancel", worker=owner, pid=pid, secret=secret)
        except ControlError as e:
            log.warning("cancel request for worker %d not forwarded: %s", owner, e)

    async def fleet(self, what: str) -> list:
        """Every worker's answer to ``SHOW what`` ([[worker, columns, rows], ...]);
        ControlError if the supervisor cannot be asked. The caller bounds the wait."""
        reply = await self.channel.call("show", what=what)
        return reply["answers"]

    def request_shutdown(self) -> None:
        """The console's SHUTDOWN: the supervisor shuts every worker down."""
        self.notify_soon("shutdown")

    async def ready(self, listen: list[tuple[str, int]]) -> None:
        """Tell the supervisor this worker listens."""
        await self.channel.notify("ready", listen=[list(a) for a in listen])

    async def run(self, handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]],
                  on_lost: Callable[[], None], inline: dict[str, InlineHandler] | None = None, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
        """Answer the supervisor until the channel closes, then call ``on_lost`` (the
        supervisor is gone: the worker shuts down). ``inline`` ops are handled in order
        (:meth:`Channel.run`)."""

        async def handle(frame: dict[str, Any]) -> dict[str, Any] | None:
            handler = handlers.get(frame["op"])
            if handler is None:
                raise ControlError(f"unknown op {frame['op']!r}")
            return await handler(frame)

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self.channel.run(handle, inline)
            except ControlError as e:
                log.error("control channel to the supervisor failed: %s", e)
            log.warning("worker %d: the supervisor is gone; shutting down", self.index)
            on_lost()


async def open_link(fd: int) -> tuple[WorkerLink, dict[str, Any]]:
    """The channel on inherited descriptor ``fd`` and the spec the supervisor sent first:
    ``{"index", "count", "config": {section: {key: value}}, "log_level"}`` and, with the
    pair's failover, ``"freeze_fd"`` and ``"failover_state"`` (connmgr/failover/fleet.py)."""
    sock = socket.socket(fileno=fd)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    channel = Channel(stream, "supervisor")
    spec = await channel.receive()
    if spec.get("op") != "spec":
        raise ControlError(f"expected the worker spec first, got {spec.get('op')!r}")
    channel.name = f"worker {spec['index']}"
    link = WorkerLink(channel, int(spec["index"]), int(spec["count"]))
    if "freeze_fd" in spec:
        from connmgr.failover.fleet import FreezeFlag

        link.flag = FreezeFlag(int(spec["freeze_fd"]))
        link.failover_state = spec.get("failover_state") or {}
    return link, spec
