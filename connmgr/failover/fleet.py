"""The failover of a connmgr with ``[server] workers = N``: one decision for every worker.

Each worker holds its own clients' sockets and moves its own sessions, but what the pair
decides must be decided once. Two workers probing the primary a moment apart could reach
different answers, and one would go on writing to a primary the other had left: lost
writes. And the order of a move (:mod:`connmgr.failover.replay_order`) is an order over
all sessions, whichever worker holds them: a session may have read rows that another
worker's session committed on the primary only.

So the supervisor holds the pair's :class:`~connmgr.failover.controller.Failover`, the
*coordinator*: the probe, the point of failure, the switchover's fence, the re-seed, the
fail-back, and the :class:`~connmgr.failover.replay_order.ReplayOrder` of every session.
Each worker's Failover is a *member* of it (:class:`Member`):

* A member that sees a sign of the primary's death freezes its own sessions at once, sets
  the shared :class:`FreezeFlag` (every worker's relays hold the primary's replies from
  their next read on, with no message on the way: ``Relay.freezing``) and tells the
  coordinator (``failover.suspect``). Suspicions that come while a decision runs join it.
* Every phase change of the coordinator goes to every worker, in order
  (``failover.event``, :meth:`Coordinator.fired`), and each member follows it
  (:meth:`~connmgr.failover.controller.Failover.follow`): SUSPECT freezes, MOVED moves
  with the committers of all workers in the order their commits were sent, ALIVE thaws,
  SWITCHOVER pauses client input, REARMED arms again the other way round.
* The coordinator asks the members what only they know: their sessions with a commit in
  flight (``failover.gather``), a switchover's drain (``failover.drain``), whether
  sessions are still moving (``failover.moving``).
* A member's moving sessions take their turns in the coordinator's order
  (:class:`RemoteOrder`, ``order.*``).
* SWITCHOVER and RESEED on a worker's console run on the coordinator.

A worker started while the pair is failed over gets the coordinator's servers and phase
with its configuration (:meth:`Coordinator.worker_state`).

Both clocks that order commits (``time.perf_counter`` of the marker, in each worker) are
Linux's CLOCK_MONOTONIC, one clock for every process of the machine.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from connmgr.failover.phases import FailoverError, FailoverEvent
from connmgr.workers.control import ControlError

log = logging.getLogger("connmgr.failover")

__all__ = ["Coordinator", "FreezeFlag", "Member", "RemoteOrder"]


class FreezeFlag:
    """One byte of memory the supervisor and its workers share (a memfd each worker
    inherits): while it is set, every worker's relays hold what the primary sends."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, mmap.PAGESIZE)

    @classmethod
    def create(cls) -> FreezeFlag:
        fd = os.memfd_create("connmgr-freeze")
        os.ftruncate(fd, mmap.PAGESIZE)
        return cls(fd)

    def set(self) -> None:
        self._map[0] = 1

    def clear(self) -> None:
        self._map[0] = 0

    @property
    def is_set(self) -> bool:
        return self._map[0] != 0

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


# ---------------------------------------------------------------------- worker side


class RemoteOrder:
    """A member's view of the coordinator's ReplayOrder: the same calls as
    :class:`~connmgr.failover.replay_order.ReplayOrder`, answered by the coordinator.
    ``committers`` are this worker's sessions with a commit in flight (set by MOVED)."""

    def __init__(self, member: Member, bound: float) -> None:
        self.member = member
        #: no call waits longer (the coordinator bounds its own waits; this bounds a
        #: coordinator that does not answer)
        self.bound = bound
        self.committers: set[int] = set()
        self.commits_settled_event = trio.Event()
        self.prefixes_done_event = trio.Event()

    def is_committer(self, conn_id: int) -> bool:
        return conn_id in self.committers

    async def committer_turn(self, conn_id: int) -> None:
        await self.member.ask("order.turn", self.bound, session=conn_id)

    def commit_settled(self, conn_id: int) -> None:
        self.committers.discard(conn_id)
        self.member.tell("order.settled", session=conn_id)

    async def commits_settled(self) -> None:
        await self.member.ask("order.commits_settled", self.bound)
        self.commits_settled_event.set()

    def prefix_replayed(self, conn_id: int) -> None:
        self.member.tell("order.prefix", session=conn_id)

    async def prefixes_replayed(self, conn_id: int) -> None:
        # (one request: the prefix counts before the wait, whatever order frames run in)
        await self.member.ask("order.replays_done", self.bound, prefix=conn_id)
        self.commits_settled_event.set()
        self.prefixes_done_event.set()

    async def replays_done(self) -> None:
        await self.member.ask("order.replays_done", self.bound)
        self.commits_settled_event.set()
        self.prefixes_done_event.set()


class Member:
    """A worker's link to the coordinator. ``call(op, **args)`` asks the supervisor and
    returns its reply (raising if it answers an error or is gone); ``notify_soon(op,
    **args)`` tells it, in the background, in order; ``flag`` is the shared freeze flag."""

    def __init__(self, call: Callable[..., Awaitable[dict[str, Any]]], notify_soon: Callable[..., None],
                 flag: FreezeFlag) -> None:  # fmt: skip
        self.call = call
        self.tell = notify_soon
        self.flag = flag
        self.failover = None  #: the Failover (connmgr/failover/controller.py) it serves

    def suspect(self, why: str) -> None:
        """This worker saw a sign of the primary's death (its own sessions are frozen):
        freeze every worker's, and have the coordinator decide."""
        self.flag.set()
        self.tell("failover.suspect", why=why)

    async def ask(self, op: str, bound: float, **args: Any) -> dict[str, Any]:
        """``op`` asked of the coordinator, waiting at most ``bound`` seconds ({} then)."""
        with trio.move_on_after(bound):
            return await self.call(op, **args)
        log.warning("failover: the coordinator did not answer %s within %gs; going on", op, bound)
        return {}

    # what the coordinator sends (connmgr/app.py registers them on the control link)

    def inline_handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]]:
        f = self.failover

        def event(frame: dict[str, Any]) -> None:
            f.follow(FailoverEvent(frame["event"]), frame.get("details") or {})

        def gather(_frame: dict[str, Any]) -> dict[str, Any]:
            committers, others = f.gather()
            return {"committers": committers, "others": others}

        def moving(_frame: dict[str, Any]) -> dict[str, Any]:
            return {"moving": f.moving}

        return {"failover.event": event, "failover.gather": gather, "failover.moving": moving}

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]]:
        f = self.failover

        async def drain(frame: dict[str, Any]) -> dict[str, Any]:
            relays = await f.drain_local(float(frame["timeout"]))
            return {"quiet": len(relays), "stuck": sorted(f.stuck)}

        return {"failover.drain": drain}


# ---------------------------------------------------------------------- supervisor side


class Coordinator:
    """The supervisor's side: it owns the fleet's :class:`Failover` (``failover``, built
    by the supervisor with ``members=`` this) and reaches the workers through
    ``send(worker, frame)`` (a notification, in order), ``call(worker, op, within,
    **args)`` (a reply, or ControlError/TooSlowError after ``within`` seconds) and
    ``running(ready)`` (the workers that get events: every one started with a spec; with
    ``ready``, those serving clients, which are asked about their sessions)."""

    def __init__(self, send: Callable[[int, dict[str, Any]], Awaitable[None]],
                 call: Callable[..., Awaitable[dict[str, Any]]], running: Callable[[bool], list[int]],
                 flag: FreezeFlag) -> None:  # fmt: skip
        self.send = send
        self.call = call
        self.running = running
        self.flag = flag
        self.failover = None  #: the Failover (connmgr/failover/controller.py) it serves
        #: events to send to every worker, in order (see :meth:`fired`)
        self._outbox: list[dict[str, Any]] = []
        self._wake = trio.Event()
        self._sent = trio.Event()
        self._sent.set()

    # hooks the fleet's Failover calls

    def fired(self, event: FailoverEvent, details: dict[str, Any]) -> None:
        """The coordinator's phase changed: every worker follows, in order. The freeze flag
        is set when a decision begins and cleared before the workers hear it ended (a
        worker that sees the flag afterwards sees a new suspicion)."""
        if event in (FailoverEvent.SUSPECT, FailoverEvent.FENCED):
            self.flag.set()
        elif event in (FailoverEvent.ALIVE, FailoverEvent.FAILED, FailoverEvent.ABANDONED, FailoverEvent.REARMED):
            self.flag.clear()
        self._outbox.append({"op": "failover.event", "event": str(event), "details": details})
        if self._sent.is_set():  # (an unset one stays: whoever waits on it is woken once all are sent)
            self._sent = trio.Event()
        self._wake.set()

    async def sent(self) -> None:
        """Wait until every event so far has been sent (a request after it then finds
        every worker in the phase the events left it in)."""
        await self._sent.wait()

    async def gather(self) -> tuple[list[int], list[int]]:
        """Every worker's sessions with a commit in flight, merged in the order their
        commits were sent, and the others."""
        await self.sent()
        replies = await self._ask_all("failover.gather", 5.0)
        committers: list[tuple[float, int]] = []
        others: list[int] = []
        for reply in replies.values():
            committers.extend((float(at), int(i)) for at, i in reply["committers"])
            others.extend(int(i) for i in reply["others"])
        return [i for _at, i in sorted(committers)], others

    async def drain(self, timeout: float) -> tuple[int, list[int]]:
        """A switchover's drain in every worker at once: (quiet sessions, sessions ended
        while waiting for locks). Raises what a worker's drain raised."""
        await self.sent()
        replies: dict[int, dict[str, Any]] = {}
        errors: list[str] = []

        async def one(index: int) -> None:
            try:
                replies[index] = await self.call(index, "failover.drain", timeout + 5.0, timeout=timeout)
            except ControlError as e:  # (its text names the worker)
                errors.append(str(e))
            except trio.TooSlowError:
                errors.append(f"worker {index}: no answer within {timeout + 5.0:g}s")

        async with trio.open_nursery() as nursery:
            for index in self.running(True):
                nursery.start_soon(one, index)
        if errors:
            raise FailoverError("; ".join(errors))
        return sum(r["quiet"] for r in replies.values()), sorted(i for r in replies.values() for i in r["stuck"])

    async def moving(self) -> int:
        """Sessions still moving, in every worker."""
        await self.sent()
        return sum(int(r["moving"]) for r in (await self._ask_all("failover.moving", 5.0)).values())

    async def _ask_all(self, op: str, timeout: float) -> dict[int, dict[str, Any]]:
        replies: dict[int, dict[str, Any]] = {}

        async def one(index: int) -> None:
            try:
                replies[index] = await self.call(index, op, timeout)
            except Exception as e:  # noqa: BLE001 - a worker gone or mute is left out; the rest go on
                log.warning("failover: worker %d did not answer %s: %s", index, op, e or type(e).__name__)

        async with trio.open_nursery() as nursery:
            for index in self.running(True):
                nursery.start_soon(one, index)
        return replies

    # the events' sender

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Send the events, in order, to every running worker (each send bounded: a worker
        that does not read is left behind, and restarted workers start from
        :meth:`worker_state`)."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._outbox:
                frame = self._outbox.pop(0)
                for index in self.running(False):
                    with trio.move_on_after(5.0):
                        try:
                            await self.send(index, frame)
                        except Exception as e:  # noqa: BLE001 - a worker that is gone misses it
                            log.warning("failover: worker %d missed %s: %s", index, frame["event"], e)
            self._sent.set()

    # what the workers ask

    def inline_handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]]:
        f = self.failover

        def suspect(frame: dict[str, Any]) -> None:
            f.freeze_fleet(str(frame.get("why", "a worker suspects the primary")))

        def settled(frame: dict[str, Any]) -> None:
            f.order.commit_settled(int(frame["session"]))

        def prefix(frame: dict[str, Any]) -> None:
            f.order.prefix_replayed(int(frame["session"]))

        return {"failover.suspect": suspect, "order.settled": settled, "order.prefix": prefix}

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]]:
        f = self.failover

        async def turn(frame: dict[str, Any]) -> None:
            await f.order.committer_turn(int(frame["session"]))

        async def commits_settled(_frame: dict[str, Any]) -> None:
            await f.order.commits_settled()

        async def replays_done(frame: dict[str, Any]) -> None:
            if "prefix" in frame:
                f.order.prefix_replayed(int(frame["prefix"]))
            await f.order.replays_done()

        async def switchover(frame: dict[str, Any]) -> dict[str, Any]:
            try:
                await f.switchover(float(frame["timeout"]))
            except FailoverError as e:
                return {"failed": str(e), "timeline": f.timeline}
            return {"timeline": f.timeline}

        async def reseed(_frame: dict[str, Any]) -> dict[str, Any]:
            start = len(f.timeline)
            try:
                await f.reseed()
            except FailoverError as e:
                return {"failed": str(e), "timeline": f.timeline[start:]}
            return {"timeline": f.timeline[start:]}

        return {"order.turn": turn, "order.commits_settled": commits_settled, "order.replays_done": replays_done,
                "failover.switchover": switchover, "failover.reseed": reseed}  # fmt: skip

    # a worker that starts

    def worker_state(self) -> dict[str, Any]:
        """What a worker started now must know: the servers as the coordinator has them
        (its [primary] and [failover] secondary) and, after a move, the old primary."""
        f = self.failover
        state: dict[str, Any] = {"primary": _hostport(f.route.server), "secondary": _hostport(f.server),
                                 "phase": str(f.phase)}  # fmt: skip
        if f.previous is not None:
            state["previous"] = _hostport(f.previous)
        return state


def _hostport(server) -> list:
    return [server.host, server.port]
