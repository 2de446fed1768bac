"""The order in which moved sessions resolve their commits and replay (seed 004 [0088]).

Postgres releases a transaction's locks and shows its rows when it commits *locally*,
before the synchronous standby confirms: another open transaction may have read rows of a
commit the survivor never received. So sessions with a commit in flight (*committers*)
move first, one after the other in the order their commits were sent; every other session
replays what its client was answered, and waits until all have done so before it sends
what was still in flight (on the old primary the answered parts of all open transactions
held their locks together; a request in flight may have waited for one of them). A moved
session's client goes on only when every session is back where its client saw it: its
new transactions could otherwise change rows a session still to be replayed had read.

Every wait is bounded (``settle_timeout``, and ``max_wait``): a session that does not
resolve is left behind, noted, and the others go on. The database failover
(:class:`~connmgr.failover.controller.Failover`) and the host takeover
(:mod:`connmgr.host.resume`) each arrange one of these per move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

__all__ = ["ReplayOrder"]


class ReplayOrder:
    """See the module docstring. ``note(text)`` records what happens in the move's timeline."""

    def __init__(self, note: Callable[[str], None], *, max_wait: float, settle_timeout: float = 5.0) -> None:
        self.note = note
        self.max_wait = max_wait
        self.settle_timeout = settle_timeout
        #: sessions whose commit was in flight: they move first
        self.committers: set[int] = set()
        #: committer -> (the committer before it, set when this one has moved)
        self._turns: dict[int, tuple[int | None, trio.Event]] = {}
        self.commits_settled_event = trio.Event()
        #: the other sessions: each replays what its client has been answered, then waits
        #: for all of them before sending what was still in flight
        self.replaying: set[int] = set()
        self.prefixes_done_event = trio.Event()

    def arrange(self, committers: Iterable[int], others: Iterable[int]) -> None:
        """``committers`` in the order their commits were sent; ``others`` in any order."""
        previous = None
        for conn_id in committers:
            self.committers.add(conn_id)
            self._turns[conn_id] = (previous, trio.Event())
            previous = conn_id
        self.replaying.update(others)
        self.note(f"{len(self.committers)} session(s) with a commit in flight move first,"
                  f" {len(self.replaying)} other(s) then")  # fmt: skip
        if not self.committers:
            self.commits_settled_event.set()
        if not self.replaying:
            self.prefixes_done_event.set()

    def is_committer(self, conn_id: int) -> bool:
        return conn_id in self.committers

    async def committer_turn(self, conn_id: int) -> None:
        """Wait (bounded) until the committer before this one has moved."""
        previous, _ = self._turns.get(conn_id, (None, None))
        if previous is not None:
            await self.bounded_wait(self._turns[previous][1])

    def commit_settled(self, conn_id: int) -> None:
        """A session with a commit in flight has moved (or failed to)."""
        turn = self._turns.get(conn_id)
        if turn is not None:
            turn[1].set()
        self.committers.discard(conn_id)
        if not self.committers and not self.commits_settled_event.is_set():
            self.note("every commit in flight is resolved; open transactions replay")
            self.commits_settled_event.set()

    async def commits_settled(self) -> None:
        """Wait (bounded) until every session with a commit in flight has moved."""
        if not await self.bounded_wait(self.commits_settled_event):
            self.note(f"sessions {sorted(self.committers)} did not resolve their commits within"
                      f" {self.settle_timeout:g}s; replaying without them")  # fmt: skip
            self.committers.clear()
            self.commits_settled_event.set()

    def prefix_replayed(self, conn_id: int) -> None:
        """A session has replayed what its client was answered (or gave up)."""
        self.replaying.discard(conn_id)
        if not self.replaying and not self.prefixes_done_event.is_set():
            self.note("every open transaction is back where its client saw it; requests in flight go on")
            self.prefixes_done_event.set()

    async def prefixes_replayed(self, conn_id: int) -> None:
        """Report this session's prefix done and wait (bounded) for everyone else's."""
        self.prefix_replayed(conn_id)
        await self.replays_done()

    async def replays_done(self) -> None:
        """Wait (bounded) until every session has replayed what its client saw."""
        await self.commits_settled()
        if not await self.bounded_wait(self.prefixes_done_event):
            self.note(f"sessions {sorted(self.replaying)} did not finish replaying within"
                      f" {self.settle_timeout:g}s; going on without them")  # fmt: skip
            self.replaying.clear()
            self.prefixes_done_event.set()

    async def bounded_wait(self, event: trio.Event) -> bool:
        """Wait for ``event`` at most ``settle_timeout`` (and ``max_wait``); False if it
        did not come."""
        with trio.move_on_after(min(self.max_wait, self.settle_timeout)):
            await event.wait()
        return event.is_set()
