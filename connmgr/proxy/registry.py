"""The live client connections of one connmgr, and the names clients know them by.

A client learns its session's identity from BackendKeyData. connmgr hands out a *virtual*
key instead of the backend's (:meth:`Registry.register_key`): the session may move to
another server (failover), and a CancelRequest must come to connmgr, which routes it to
whichever backend the session is on now (:meth:`Registry.cancel`). The same virtual pid
replaces the real one in NotificationResponse (:attr:`Registry.virtual_pids`), so
``notify.pid == conn.info.backend_pid`` holds as it does direct.

The registry holds connections by duck type: it uses ``id``, ``key``, ``backend`` and
``stats`` of what it is given (a :class:`~connmgr.proxy.client.ClientConnection`).
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator

from connmgr.metrics import Metrics
from connmgr.pg.backend import BackendSession, send_cancel

log = logging.getLogger("connmgr")

__all__ = ["Registry", "WORKER_SHIFT"]

#: with [server] workers > 1, a virtual pid is ``worker << WORKER_SHIFT | n``: any worker
#: that receives a CancelRequest knows whose key it is (64 workers stay below 2**30)
WORKER_SHIFT = 24

#: connection ids of a single process (shared by every connmgr in it: the tests' pairs)
_ids = itertools.count(1)


class Registry:
    """See the module docstring."""

    def __init__(self, metrics: Metrics, worker: int = 0, workers: int = 1,
                 forward: Callable[[int, int, int], Awaitable[None]] | None = None) -> None:  # fmt: skip
        self.metrics = metrics
        #: this process's number among ``workers`` ([server] workers; connmgr/workers/):
        #: with more than one, it is the top bits of every virtual pid handed out here
        self.worker = worker
        self.workers = workers
        #: ``forward(worker, pid, secret)``: a cancel key of another worker, sent to it
        self.forward = forward
        #: connection id -> connection, while it lives
        self.clients: dict[int, object] = {}
        #: virtual (pid, secret) -> connection
        self.keys: dict[tuple[int, int], object] = {}
        #: (server address, real backend pid) -> virtual pid, for NotificationResponse
        self.virtual_pids: dict[tuple[str, int], int] = {}
        self._next_pid = 10_000 + secrets.randbelow(50_000)
        self._pid_top = (worker << WORKER_SHIFT) if workers > 1 else 0
        self._pid_limit = (1 << WORKER_SHIFT) - 1 if workers > 1 else 2**31 - 1
        self._next_id = 0

    def new_id(self) -> int:
        """A number for a new connection. It names the session in logs, in the console and
        on the mirror (where the secondary keys its import queue by it), so with workers it
        must be unique across all of them: ``worker << WORKER_SHIFT | n``, ``n`` wrapping
        within the worker's range and skipping the ids still alive."""
        if self.workers <= 1:
            return next(_ids)
        while True:
            self._next_id = self._next_id + 1 if self._next_id < self._pid_limit else 1
            ident = self._pid_top | self._next_id
            if ident not in self.clients:
                return ident

    def __len__(self) -> int:
        return len(self.clients)

    def __iter__(self) -> Iterator:
        """The connections alive now (a snapshot: safe while they come and go)."""
        return iter(list(self.clients.values()))

    def add(self, conn) -> None:
        self.clients[conn.id] = conn

    def register_key(self, conn) -> tuple[int, int]:
        """A virtual (pid, secret) for ``conn``'s BackendKeyData, unique while it lives."""
        self._next_pid = self._next_pid + 1 if self._next_pid < self._pid_limit else 10_000
        key = (self._pid_top | self._next_pid, secrets.randbits(32))
        self.keys[key] = conn
        if conn.backend is not None:
            self.virtual_pids[(conn.backend.server.address, conn.backend.pid)] = key[0]
        return key

    def rebind(self, conn, old: BackendSession | None, new: BackendSession | None) -> None:
        """``conn`` left backend ``old`` (if any) for ``new`` (if any, a failover moved it):
        notifications from ``new`` carry the session's virtual pid."""
        if old is not None:
            self.virtual_pids.pop((old.server.address, old.pid), None)
        if new is not None and conn.key is not None:
            self.virtual_pids[(new.server.address, new.pid)] = conn.key[0]

    def forget(self, conn) -> None:
        """``conn`` has ended: its key and pid mapping go, its counters are added up (once)."""
        if self.clients.pop(conn.id, None) is None:
            return
        if conn.key is not None:
            self.keys.pop(conn.key, None)
        if conn.backend is not None:
            self.virtual_pids.pop((conn.backend.server.address, conn.backend.pid), None)
        self.metrics.connection_closed(conn.stats)

    async def cancel(self, pid: int, secret: int | bytes) -> None:
        """Route a client's CancelRequest to the backend session its key belongs to now
        (an unknown key is logged and ignored, as Postgres does). With workers, a key
        another worker handed out goes to that worker."""
        owner = pid >> WORKER_SHIFT if self.workers > 1 else self.worker
        if owner != self.worker and self.forward is not None and owner < self.workers and isinstance(secret, int):
            self.metrics.cancels_forwarded += 1
            await self.forward(owner, pid, secret)
            return
        conn = self.keys.get((pid, secret)) if isinstance(secret, int) else None
        if conn is None or conn.backend is None:
            log.info("cancel request for unknown key (pid %d) ignored", pid)
            return
        self.metrics.cancels += 1
        b = conn.backend
        await send_cancel(b.server, b.pid, b.secret)
