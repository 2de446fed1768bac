"""Failover: the decision to leave the primary database, and the point of failure.

The primary connmgr holds every client's socket, so it runs the move (seed 004 Fig. 3, 7,
9). This module is the part shared by all sessions; the per-session part is
:mod:`connmgr.failover.session_move`.

1. **Detect.** Three signals start a decision: a session's backend connection broke or
   sent a FATAL 57P01/57P02/57P03 (held back from the client, :mod:`connmgr.proxy.relay`), the redo
   monitor's samples went stale for ``detect_timeout``, or an explicit switchover. The
   decision is one probe: a fresh connection to the primary, bounded by
   ``detect_timeout``. If it is answered, the primary is alive and nothing moves (a session
   whose backend was terminated gets the server's own error, as without a pair).

   **Freeze.** From the first signal until the decision, nothing more the primary sends
   reaches a client (:meth:`Failover.freeze`). A dying Postgres does not die at once:
   each backend notices the postmaster's death at its next wait. One that dies first
   releases its locks, and a backend that was waiting for them goes on and answers its
   client -- from a state in which the dead one's transaction never existed, which the
   secondary (where that transaction is replayed) will not reproduce. So replies read
   after the first signal are kept aside, unprocessed: if the primary is alive after all
   they are delivered; if it is gone they are dropped and produced again by the replay,
   unless the session's transaction committed on the secondary (they are then delivered
   before its acknowledgement, see :mod:`connmgr.failover.session_move`).
2. **Point of failure** (seed 004 [0087]). Every enabled subscription on the secondary is
   disabled and connmgr waits for its apply worker to exit. Whatever the worker had
   applied is then final, and a restarted old primary can never feed it again. It is safe
   at any moment: a transaction the worker had received but not applied was never
   acknowledged to its client (the subscription is a synchronous standby), so it is
   replayed instead.
3. **The truth about interrupted commits**: the marker rows of this connmgr's sessions,
   read once per database after step 2 (:meth:`Failover.committed_seq`). "Session s has
   seq >= n" means its transaction n committed (``replay/markers.py``).
4. From then on new sessions go to the secondary, and every session whose backend is lost
   moves there (:mod:`connmgr.failover.session_move`).
5. **Fail-back** (``[failover] failback``). Once the old primary answers again it is
   re-seeded as the secondary of the new one (:mod:`connmgr.failover.reseed`; without a copy after
   a switchover, whose point of failure made the slots for it), and failover is armed
   again the other way round; ``return`` then switches back over to ``[primary]``,
   ``manual`` waits for the admin's RESEED.

Everything that happens is written to :attr:`Failover.timeline` (seconds since the
suspicion, and what), logged, and exported as metrics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import trio

from connmgr.config import FailoverSection, parse_hostport
from connmgr.errors import ClientError
from connmgr.failover import reseed as reseeding
from connmgr.failover.fleet import Coordinator, Member, RemoteOrder
from connmgr.failover.phases import FailoverError, FailoverEvent, FailoverPhase, next_phase
from connmgr.failover.replay_order import ReplayOrder
from connmgr.pair.sequence_sync import set_past_columns
from connmgr.pg.backend import BackendServer, BackendSession, Credentials, Route, open_backend
from connmgr.pg.redo_monitor import RedoMonitor
from connmgr.pg.wire import PeerClosed
from connmgr.proxy.registry import Registry
from connmgr.workers.control import ControlError
from shadow import messages
from shadow.session import Phase
from shadow.sqltext import quote_ident, quote_literal

log = logging.getLogger("connmgr.failover")

#: how long the apply workers of disabled subscriptions may take to exit
_WORKER_EXIT_TIMEOUT = 10.0
#: how long open transactions wait for the sessions with a commit in flight to move
_COMMIT_SETTLE_TIMEOUT = 5.0
#: a switchover's drain looks for sessions stuck behind paused ones this often
_STUCK_AFTER = 0.05


class Failover:
    """See the module docstring. One per primary connmgr with ``[failover] secondary``."""

    def __init__(self, config: FailoverSection, route: Route, sessions: Registry, *,
                 open_primary: Callable[[str], Awaitable[BackendSession]], origin: int,
                 redo: RedoMonitor | None = None,
                 markers_enabled: Callable[[str], Awaitable[bool]] | None = None,
                 on_rearm: Callable[[str, str], None] | None = None,
                 members: Coordinator | None = None, coordinator: Member | None = None) -> None:  # fmt: skip
        """``route`` is where new sessions log in (moved to the secondary at a failover);
        ``sessions`` the live clients (each with ``relay``, ``session``, ``database``);
        ``open_primary(purpose)`` opens connmgr's own session on the current primary (the
        probe, the fence, the drain); ``origin`` names this connmgr's marker rows;
        ``redo`` is watched for staleness; ``markers_enabled(database)`` says whether a
        session there may be marked; ``on_rearm(primary, secondary)`` tells the secondary
        connmgr that the pair turned around.

        With ``[server] workers`` (connmgr/failover/fleet.py): the supervisor's Failover
        decides for all and reaches the workers through ``members``; a worker's follows
        the ``coordinator``."""
        self.config = config
        #: the supervisor's side of a fleet: every phase change goes to the workers
        self.members = members
        #: a worker's side of a fleet: decisions are the coordinator's
        self.coordinator = coordinator
        if members is not None:
            members.failover = self
        if coordinator is not None:
            coordinator.failover = self
        #: a worker's: set by any worker that suspects the primary (Relay.freezing)
        self.fleet_flag = coordinator.flag if coordinator is not None else None
        self.route = route
        self.sessions = sessions
        self.open_primary = open_primary
        self.origin = origin
        self.redo = redo
        self.markers_enabled = markers_enabled
        self.on_rearm = on_rearm
        host, port = parse_hostport(config.secondary, what="[failover] secondary")
        self.server = BackendServer("secondary", host, port, route.server.connect_timeout)
        #: the server the sessions are on when connmgr starts ([primary]); failback
        #: "return" brings them back there
        self.home = route.server
        self._nursery: trio.Nursery | None = None
        #: after a move: the old primary, until it is re-seeded as the secondary
        self.previous: BackendServer | None = None
        #: the new primary's subscriptions at the point of failure (they change sides)
        self.subscriptions: list[reseeding.Subscription] = []
        #: a planned switchover made the slots for a re-seed without copy
        self.reverse_slots = False
        #: the synchronous_standby_names the pair uses (moved to the new primary)
        self.sync_names: str | None = None
        #: where the failover is (connmgr/failover/phases.py); changed by :meth:`_fire` only
        self.phase = FailoverPhase.ARMED
        #: sessions in move_session() now
        self.moving = 0
        self.timeline: list[tuple[float, str]] = []
        #: every note of every move, kept across moves: (time.monotonic(), text)
        self.journal: list[tuple[float, str]] = []
        self.suspected_at: float | None = None
        self._new_move()
        self._switched: trio.Event | None = None
        # counters (exported by connmgr/ops/prometheus.py)
        self.decisions = 0
        self.false_alarms = 0
        self.sessions_moved = 0
        self.sessions_failed: Counter[str] = Counter()
        self.commits_acknowledged = 0  #: interrupted commits found committed: acknowledged, not replayed
        self.transactions_replayed = 0
        self.replies_compared = 0
        self.transactions_rolled_back: Counter[str] = Counter()  #: 40001 given, by reason
        self.stalls: list[float] = []  #: seconds each moved session waited (backend lost -> live)
        self.freezes = 0
        self.switchovers = 0
        self.switchovers_abandoned = 0
        self.replies_held = 0  #: sessions whose backend sent replies during a freeze
        self.replies_dropped = 0  #: of those, moved sessions whose held replies were dropped (replayed)
        self.reseeds = 0  #: the old primary made the secondary (the pair whole again)
        self.reseed_failures = 0
        self.reseed_copies = 0  #: of the re-seeds, those that copied the data afresh (after a crash)

    def _new_move(self) -> None:
        """The state of one move (from the decision to the re-seed that ends it)."""
        #: the decision could not be completed (the secondary is unusable too)
        self.failed: str | None = None
        self.failed_over_at: float | None = None
        self._deciding: trio.Event | None = None
        #: which session resolves and replays when (connmgr/failover/replay_order.py); a
        #: worker's are the coordinator's
        if self.coordinator is not None:
            self.order = RemoteOrder(self.coordinator, bound=self.config.max_wait)
        else:
            self.order = ReplayOrder(self.note, max_wait=self.config.max_wait, settle_timeout=_COMMIT_SETTLE_TIMEOUT)
        self._committed: dict[str, dict[int, int]] = {}
        self._committed_ready: dict[str, trio.Event] = {}
        #: the server whose replies are held back from clients (see :meth:`freeze`)
        self.frozen: BackendServer | None = None
        self._frozen_links: dict = {}
        self._unfrozen = trio.Event()
        self._rearmed = trio.Event()
        #: sessions a switchover's drain ended while they waited for paused sessions' locks
        self._stuck: set[int] = set()

    # ------------------------------------------------------------------ phase

    def _fire(self, event: FailoverEvent, **details) -> None:
        """Go to the phase ``event`` leads to (PhaseError, naming both, if none). In a
        fleet's coordinator, every worker follows (``details`` go with it)."""
        self.phase = next_phase(self.phase, event)
        if self.members is not None:
            self.members.fired(event, details)

    @property
    def failed_over(self) -> bool:
        """The secondary is the primary: sessions are (being) moved there."""
        return self.phase in (FailoverPhase.MOVED, FailoverPhase.RESEEDING)

    @property
    def switching(self) -> bool:
        """A switchover is pausing client input (new relays start paused)."""
        return self.phase in (FailoverPhase.DRAINING, FailoverPhase.SWITCHING)

    @property
    def reseeding(self) -> bool:
        return self.phase is FailoverPhase.RESEEDING

    # ------------------------------------------------------------------ freeze

    def freeze(self, server: BackendServer, why: str) -> None:
        """A session lost its backend on ``server``: hold back everything that server
        sends from now on (the carriers call :meth:`hold`) and start the decision. Cheap
        and synchronous, so sessions pumped later in the same batch are already held."""
        # (while a switchover drains, a session stuck behind paused ones that the drain
        # ended waits for the switchover's decision instead: see decide)
        if self.phase is not FailoverPhase.ARMED or server is not self.route.server:
            return
        if self.coordinator is not None:  # a worker: every worker freezes, the coordinator decides
            self._begin(why, planned=False)
            self.coordinator.suspect(why)
            return
        if self._nursery is None:
            return
        self._begin(why, planned=False)
        self._nursery.start_soon(self._decide, why, False)

    def freeze_fleet(self, why: str) -> None:
        """The coordinator of a fleet: a worker suspects the primary (it has frozen its
        sessions and set the shared flag); a decision begins unless one runs."""
        if self.phase is FailoverPhase.ARMED and self._nursery is not None:
            self._begin(why, planned=False)
            self._nursery.start_soon(self._decide, why, False)

    def frozen_by_fleet(self) -> BackendServer | None:
        """A worker's relay found the fleet's freeze flag set (another worker suspects
        the primary): this worker freezes too, at once, before the coordinator's SUSPECT
        arrives; it tells the coordinator too (should the worker that set the flag die
        before it could, a decision still comes and ends the freeze). Returns the frozen
        server."""
        if self.phase is FailoverPhase.ARMED and self.coordinator is not None:
            self._begin("another worker suspects the primary", planned=False)
            self.coordinator.suspect("another worker suspects the primary (the shared flag is set)")
        return self.frozen

    def hold(self, relay, link=None) -> None:
        """``relay`` holds replies of the frozen server (``relay.frozen``). An engine
        ``link`` is told the outcome (:meth:`~connmgr.proxy.engine.Link.thaw`, or
        ``Relay.lose``); the trio pumps wait for it (:meth:`frozen_outcome`)."""
        if relay.conn.id not in self._frozen_links:
            self._frozen_links[relay.conn.id] = link
            self.replies_held += 1

    async def frozen_outcome(self) -> bool:
        """For the trio pumps: wait until the decision; True if the server is still
        frozen (failed over: the session must move)."""
        await self._unfrozen.wait()
        return self.frozen is not None

    def _unfreeze(self, failed_over: bool, planned: bool) -> None:
        links, self._frozen_links = self._frozen_links, {}
        if failed_over:
            # every session still on the old primary moves now; its backend is useless
            for conn in self.sessions:
                relay = conn.relay
                if relay is not None and relay.freezer is self and relay.backend.server is self.frozen:
                    if planned:
                        relay.switch("planned switchover")
                    else:
                        relay.lose("the primary is gone")
        else:
            self.frozen = None
            for link in links.values():
                if link is not None:
                    link.thaw()
        self._unfrozen.set()

    # ------------------------------------------------------------------ timeline

    def note(self, what: str) -> None:
        now = time.monotonic()
        if self.suspected_at is None:
            self.suspected_at = now
        self.timeline.append((now - self.suspected_at, what))
        self.journal.append((now, what))
        del self.journal[:-500]
        log.warning("failover: +%.3fs %s", now - self.suspected_at, what)

    # ------------------------------------------------------------------ detection

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Health check: a stale redo monitor (no sample for ``detect_timeout``) starts a
        decision. Sessions report lost backends themselves (:meth:`decide`). After a move,
        the fail-back policy (:meth:`_failback`) until the pair is whole again; then the
        health check of the new primary. Decisions that :meth:`freeze` starts, and the
        marking of moved sessions after a re-seed, run in this task's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    if self.failed_over and self.coordinator is not None:
                        await self._rearmed.wait()  # (the coordinator re-seeds; follow() re-arms)
                    elif self.failed_over:
                        await self._failback()
                    else:
                        await self._health_check()
            finally:
                self._nursery = None

    async def _health_check(self) -> None:
        redo = self.redo
        cfg = self.config
        while not self.failed_over:
            await trio.sleep(cfg.health_interval)
            if redo is None or redo.samples == 0 or self.phase is not FailoverPhase.ARMED:
                continue
            if time.monotonic() - redo.updated_at > cfg.detect_timeout:
                await self.decide("the redo monitor has had no answer for"
                                  f" {time.monotonic() - redo.updated_at:.3f}s")  # fmt: skip

    # ------------------------------------------------------------------ fail-back

    async def _failback(self) -> None:
        """After a move. ``manual``: wait for RESEED. ``stay`` and ``return``: probe the old
        primary every ``reseed_interval``; once it answers, re-seed it as the secondary
        (:meth:`reseed`). ``return`` then switches over back to it as soon as it can."""
        cfg = self.config
        rearmed = self._rearmed
        if cfg.failback == "manual":
            await rearmed.wait()
        else:
            warned = False
            while not rearmed.is_set():
                await trio.sleep(cfg.reseed_interval)
                if self.reseeding or rearmed.is_set() or self.previous is None:
                    continue
                if not await self._answers(self.previous):
                    if not warned:
                        self.note(f"the old primary {self.previous.address} does not answer; it is re-seeded as the"
                                  f" secondary once it does (failback {cfg.failback!r})")  # fmt: skip
                        warned = True
                    continue
                try:
                    await self.reseed()
                except FailoverError:
                    await trio.sleep(max(cfg.reseed_interval, 5.0))  # noted; try again later
        if cfg.failback == "return":
            while self.route.server is not self.home and not self.failed_over:
                try:
                    await self.switchover(cfg.drain_timeout)
                except FailoverError:
                    await trio.sleep(max(cfg.reseed_interval, 5.0))  # noted; try again later

    async def _answers(self, server: BackendServer) -> bool:
        with trio.move_on_after(self.config.detect_timeout + server.connect_timeout):
            try:
                session = await self._admin(self.config.dbname, "connmgr failback probe", server)
            except (ClientError, OSError, PeerClosed, trio.BrokenResourceError):
                return False
            session.close()
            return True
        return False

    async def reseed(self) -> None:
        """Make the old primary the secondary of the new one (:mod:`connmgr.failover.reseed`): without
        a copy after a planned switchover, with one after a crash. Then its sequences are
        brought ahead, the failover is armed again in the other direction and the
        secondary connmgr is told (mirror Topology). Raises FailoverError with the reason.
        (A worker of a fleet has its coordinator do it, for every worker.)"""
        if self.coordinator is not None:
            self.timeline.extend(await self._on_coordinator("failover.reseed", self.config.reseed_timeout + 60))
            return
        old, new = self.previous, self.server
        if not self.failed_over or old is None:
            raise FailoverError("nothing to re-seed: connmgr has not moved to the secondary")
        if self.reseeding:
            raise FailoverError("a re-seed is already running")
        cfg = self.config
        copy = not self.reverse_slots
        self._fire(FailoverEvent.RESEED)
        done = False
        try:
            await self._moves_finished()
            self.note(f"re-seeding the old primary {old.address} as the secondary of {new.address}"
                      f" ({'copy of the data: it may hold commits never acknowledged' if copy else 'no copy'})")
            with trio.fail_after(cfg.reseed_timeout + 30):
                self.sync_names, moved = await reseeding.reseed_and_sync(
                    lambda db, purpose: self._admin(db, purpose, old), lambda db, purpose: self._admin(db, purpose, new),
                    self.subscriptions, copy=copy, sync_names=self.sync_names, timeout=cfg.reseed_timeout,
                    connect=lambda db: reseeding.conninfo(new.host, new.port, cfg.user, cfg.password, db),
                    note=self.note,
                )  # fmt: skip
            done = True
        except Exception as e:  # a server refusing or gone, a timeout -- or a bug: it costs the re-seed only
            self.reseed_failures += 1
            why = str(e) or type(e).__name__
            if not isinstance(e, reseeding.ReseedError | ClientError | OSError | PeerClosed | trio.TooSlowError):
                log.exception("re-seed failed")
            self.note(f"re-seed failed: {why}")
            raise FailoverError(f"re-seed failed: {why}") from None
        finally:
            if not done:
                self._fire(FailoverEvent.RESEED_FAILED)
        self.reseeds += 1
        self.reseed_copies += copy
        self.note(f"{moved} sequence(s) of the new secondary set ahead")
        self._rearm(copy)

    async def _on_coordinator(self, op: str, bound: float, **args) -> list[tuple[float, str]]:
        """A worker's SWITCHOVER or RESEED, run by the coordinator: its timeline, or
        FailoverError with its reason."""
        try:
            with trio.fail_after(bound):
                reply = await self.coordinator.call(op, **args)
        except (ControlError, trio.TooSlowError) as e:
            raise FailoverError(f"the supervisor did not answer: {e or type(e).__name__}") from None
        timeline = [(float(at), str(what)) for at, what in reply.get("timeline", [])]
        if "failed" in reply:
            raise FailoverError(reply["failed"])
        return timeline

    async def _moves_finished(self) -> None:
        """The re-seed re-arms the failover and resets the move's state: every session
        of this move must be on the new primary first (bounded by ``max_wait``)."""
        with trio.move_on_after(self.config.max_wait):
            await self.order.commits_settled_event.wait()
            await self.order.prefixes_done_event.wait()
            while self.moving:
                await trio.sleep(0.01)
        moving = self.moving
        if self.members is not None:  # the coordinator: the workers' sessions
            with trio.move_on_after(self.config.max_wait):
                while moving := await self.members.moving():
                    await trio.sleep(0.05)
        if moving or not self.order.prefixes_done_event.is_set():
            raise reseeding.ReseedError(f"{moving} session(s) are still moving to the new primary")

    def _rearm(self, copy: bool) -> None:
        """The pair is whole again, turned around: the old primary is the secondary (a
        copy of the data was made for it, or not)."""
        new_secondary = self.previous
        primary = self.route.server
        rearmed = self._rearmed
        self.server, self.previous = new_secondary, None
        self.reverse_slots = False
        self._fire(FailoverEvent.REARMED, copy=copy)
        self._new_move()
        if self.on_rearm is not None:
            self.on_rearm(_hostport(primary), _hostport(new_secondary))
        self.note(f"the pair is whole again: {primary.address} is the primary, {new_secondary.address} its"
                  " secondary; failover is armed")  # fmt: skip
        rearmed.set()
        if self._nursery is not None and self.markers_enabled is not None:
            self._nursery.start_soon(self._mark_live_sessions)

    async def _mark_live_sessions(self) -> None:
        """Sessions that moved were not marked (there was no secondary): their commits
        are marked from their next one on, so a later move resolves them too."""
        for conn in self.sessions:
            relay = conn.relay
            if relay is None or relay.markers or relay.backend.server is not self.route.server:
                continue
            if await self.markers_enabled(conn.database) and conn.relay is relay:
                relay.markers = relay.upstream.markers = True

    async def decide(self, why: str, *, planned: bool = False) -> bool:
        """Decide whether the primary is gone (``planned``: a switchover, no probe) and if
        so make the secondary ready. True once failed over. Concurrent callers share one
        decision."""
        phase = self.phase
        if self.failed_over:
            return True
        if phase is FailoverPhase.DRAINING and not planned:
            # a session whose backend the drain ended (stuck behind paused sessions, see
            # _drain): the switchover decides
            await self._switched.wait()
            return self.failed_over
        if phase in (FailoverPhase.DECIDING, FailoverPhase.SWITCHING):
            if self.coordinator is not None:
                return await self._coordinator_decided()
            await self._deciding.wait()
            return self.failed_over
        if self.coordinator is not None:  # a worker: the coordinator decides for all
            self._begin(why, planned)
            self.coordinator.suspect(why)
            return await self._coordinator_decided()
        self._begin(why, planned)
        return await self._decide(why, planned)

    async def _coordinator_decided(self) -> bool:
        """A worker waits for the coordinator's decision (its probe, point of failure and
        the workers' gathering are bounded; this bounds a coordinator that is gone)."""
        deciding = self._deciding
        if deciding is not None:
            with trio.move_on_after(self.config.detect_timeout + 2 * self.config.max_wait):
                await deciding.wait()
        return self.failed_over

    def _begin(self, why: str, planned: bool) -> None:
        """ARMED -> DECIDING, or DRAINING -> SWITCHING: from now on the primary's replies
        are held (see :meth:`freeze`) and callers of :meth:`decide` wait for this one."""
        self._fire(FailoverEvent.FENCED if planned else FailoverEvent.SUSPECT, why=why)
        self._deciding = trio.Event()
        self.decisions += 1
        if not planned:
            self.suspected_at = None  # the timeline starts here (a switchover's started earlier)
        if self.frozen is None:
            self.frozen = self.route.server
            self.freezes += 1
            self._unfrozen = trio.Event()

    async def _decide(self, why: str, planned: bool) -> bool:
        """The decision begun by :meth:`_begin`: probe (unless planned), point of failure,
        then the move. Ends in MOVED, or back in ARMED."""
        try:
            self.note(f"primary suspected: {why}" if not planned else "planned: no probe, the secondary takes over")
            if not planned:
                alive = await self._primary_answers()
                if alive:
                    self.false_alarms += 1
                    self.note("primary answers: no failover")
                    self.suspected_at = None
                    self._fire(FailoverEvent.ALIVE)
                    return False
                self.note("primary does not answer: failing over to the secondary")
            try:
                await self._point_of_failure()
            except (FailoverError, ClientError, OSError, PeerClosed, trio.TooSlowError) as e:
                self.failed = str(e)
                self.note(f"FAILED: the secondary cannot take over: {e}")
                self._fire(FailoverEvent.FAILED, failed=self.failed)
                return False
            if planned:
                await self._prepare_reverse()
            committers = await self._arrange()
            self.failed_over_at = time.monotonic()
            self.previous = self.route.server
            self.route.move(self.server)
            self._fire(FailoverEvent.MOVED, committers=committers, planned=planned)
            self.note("secondary is the primary now; sessions move")
            return True
        finally:
            if self.phase in (FailoverPhase.DECIDING, FailoverPhase.SWITCHING):
                # cut short (cancelled, or a bug): nothing moved
                self._fire(FailoverEvent.FAILED, failed="the decision was cut short")
            event, self._deciding = self._deciding, None
            self._unfreeze(self.failed_over, planned)
            event.set()

    # ------------------------------------------------------------------ a worker of a fleet

    def follow(self, event: FailoverEvent, details: dict) -> None:
        """A worker follows its coordinator's phase change (connmgr/failover/fleet.py),
        with the side effects the coordinator's own change has on sessions: SUSPECT and
        FENCED freeze, MOVED moves, ALIVE and FAILED thaw, SWITCHOVER pauses input,
        ABANDONED resumes it, REARMED arms again. A worker may have begun a decision
        itself (its own sessions' signs, or the shared flag): an event it anticipated
        changes nothing, and one its phase does not take is logged and ignored."""
        E, P = FailoverEvent, FailoverPhase
        phase = self.phase
        planned = bool(details.get("planned"))
        if event is E.SUSPECT and phase is P.ARMED:
            self._begin(str(details.get("why", "the coordinator suspects the primary")), planned=False)
        elif event is E.SWITCHOVER and phase is P.ARMED:
            self.timeline = []
            self.suspected_at = None
            self._stuck.clear()
            self._fire(E.SWITCHOVER)
            self._switched = trio.Event()
            self.note("switchover requested: client input pauses at each session's next request boundary")
        elif event is E.FENCED and phase is P.DRAINING:
            self._begin("switchover", planned=True)
        elif event in (E.ALIVE, E.FAILED) and phase in (P.DECIDING, P.SWITCHING):
            planned = phase is P.SWITCHING
            if event is E.ALIVE:
                self.false_alarms += 1
                self.note("primary answers: no failover")
            else:
                self.failed = str(details.get("failed") or "the secondary could not take over")
                self.note(f"FAILED: {self.failed}")
            self._fire(event)
            self.suspected_at = None
            self._concluded(planned)
        elif event is E.ABANDONED and phase is P.DRAINING:
            self._fire(event)
            self._concluded(planned=True)
        elif event is E.MOVED and phase in (P.ARMED, P.DRAINING, P.DECIDING, P.SWITCHING):
            if phase in (P.ARMED, P.DRAINING):  # (started after the suspicion, or missed it)
                self._begin("the coordinator moved", planned=phase is P.DRAINING)
            mine = {conn.id for conn in self.sessions}
            self.order.committers = {int(i) for i in details.get("committers", ()) if int(i) in mine}
            self.failed_over_at = time.monotonic()
            self.previous = self.route.server
            self.route.move(self.server)
            self._fire(E.MOVED)
            self.note("secondary is the primary now; sessions move")
            if planned:
                self.switchovers += 1
            self._concluded(planned)
        elif event is E.RESEED and phase is P.MOVED:
            self._fire(event)
        elif event is E.RESEED_FAILED and phase is P.RESEEDING:
            self.reseed_failures += 1
            self._fire(event)
        elif event is E.REARMED and phase is P.RESEEDING:
            self.reseeds += 1
            self.reseed_copies += bool(details.get("copy"))
            self._rearm(bool(details.get("copy")))
        elif not (event in (E.SUSPECT, E.FENCED) and phase in (P.DECIDING, P.SWITCHING)):
            log.warning("failover: the coordinator's '%s' does not apply in this worker's phase '%s'; ignored",
                        event, phase)  # fmt: skip

    def adopt(self, state: dict) -> None:
        """A worker started while its coordinator is failed over: its [primary] is the new
        primary already (the supervisor configured it so); it takes the phase and the old
        primary as they are. (The one change of phase not made by an event: the worker
        joins a move made before it existed.)"""
        phase = FailoverPhase(state.get("phase", FailoverPhase.ARMED))
        if phase in (FailoverPhase.MOVED, FailoverPhase.RESEEDING) and state.get("previous"):
            host, port = state["previous"]
            self.previous = BackendServer("old primary", host, int(port), self.route.server.connect_timeout)
            self.failed_over_at = time.monotonic()
            self.phase = phase
            self.note(f"joined the fleet's failover in phase '{phase}' (old primary {self.previous.address})")

    def _concluded(self, planned: bool) -> None:
        """A worker: the coordinator's decision (or switchover) ended; sessions waiting for
        it go on (moved, or thawed where they were)."""
        event, self._deciding = self._deciding, None
        self._unfreeze(self.failed_over, planned)
        if event is not None:
            event.set()
        if planned:
            if not self.failed_over:
                for relay in self._primary_relays():
                    relay.resume_input()
            if self._switched is not None:
                self._switched.set()
                self._switched = None

    async def drain_local(self, timeout: float) -> list:
        """A worker's part of its coordinator's switchover: this worker's sessions drained."""
        return await self._drain(timeout)

    @property
    def stuck(self) -> set[int]:
        """Sessions a switchover's drain ended while they waited for paused sessions' locks."""
        return self._stuck

    # ------------------------------------------------------------------ switchover

    async def switchover(self, drain_timeout: float) -> None:
        """A planned move of every session to the secondary (``SWITCHOVER`` on the admin
        console). Client input stops at each session's next request boundary; once no
        session has a request in flight (within ``drain_timeout``, else the switchover is
        abandoned and everything goes on as before), a synchronous fence commit on the
        primary proves the secondary has applied every commit, and the sessions move as in
        a failover -- open transactions are replayed there, with nothing in flight.
        Raises FailoverError with the reason if it cannot be done. (A worker of a fleet
        has its coordinator do it, for every worker.)"""
        if self.coordinator is not None:
            self.timeline = await self._on_coordinator("failover.switchover", drain_timeout + 3 * self.config.max_wait,
                                                       timeout=drain_timeout)  # fmt: skip
            return
        if self.failed_over:
            raise FailoverError("connmgr has moved to the secondary and the old primary is not re-seeded yet"
                                " (RESEED, or wait for the fail-back policy)")  # fmt: skip
        if self.phase is not FailoverPhase.ARMED:
            raise FailoverError(f"a switchover or failover decision is already running ({self.phase})")
        self.timeline = []
        self.suspected_at = None
        self._stuck.clear()
        self._fire(FailoverEvent.SWITCHOVER)
        self._switched = trio.Event()
        moved = False
        try:
            self.note("switchover requested: client input pauses at each session's next request boundary")
            if self.members is not None:  # the coordinator: every worker drains its sessions
                quiet, stuck_ids = await self.members.drain(drain_timeout)
                self._stuck.update(stuck_ids)
            else:
                quiet = len(await self._drain(drain_timeout))
            stuck = f", {len(self._stuck)} of them ended while waiting for a lock" if self._stuck else ""
            self.note(f"{quiet} session(s) quiet, nothing in flight{stuck}")
            await self._fence()
            self.note("fence committed: the secondary has applied every commit")
            if not await self.decide("switchover", planned=True):
                raise FailoverError(self.failed or "the secondary could not take over")
            moved = True
            self.switchovers += 1
        except (FailoverError, ClientError, OSError, PeerClosed, trio.TooSlowError) as e:
            self.switchovers_abandoned += 1
            self.note(f"switchover abandoned ({e}): sessions go on on the primary")
            raise FailoverError(str(e)) from None
        finally:
            if self.phase is FailoverPhase.DRAINING:
                self._fire(FailoverEvent.ABANDONED)
            if not moved:
                for relay in self._primary_relays():
                    relay.resume_input()
            self._switched.set()
            self._switched = None

    def _primary_relays(self) -> list:
        return [c.relay for c in self.sessions
                if c.relay is not None and c.relay.freezer is self and c.relay.backend.server is self.route.server]  # fmt: skip

    async def _drain(self, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + _STUCK_AFTER
        while True:
            relays = self._primary_relays()
            busy = []
            for relay in relays:
                relay.pause_input()  # again each round: a COPY that started needs its data read
                if not relay.input_quiet():
                    busy.append(relay)
            if not busy:
                return relays
            if time.monotonic() > next_check:
                if await self._end_stuck(busy, relays):
                    return relays
                next_check = time.monotonic() + _STUCK_AFTER
            if time.monotonic() > deadline:
                raise FailoverError(f"session(s) {[r.conn.id for r in busy][:10]} still had requests in flight"
                                    f" after {timeout:g}s")  # fmt: skip
            await trio.sleep(0.002)

    async def _end_stuck(self, busy: list, relays: list) -> bool:
        """Are the busy sessions all waiting for locks that only paused sessions hold
        (directly, or through each other; with workers, sessions idle in their
        transactions count as paused: those of other workers are). They cannot finish
        before those move: end
        their backends on the primary (``pg_terminate_backend`` waits until they are gone,
        their transactions rolled back, nothing of theirs committed) and let them move
        with their requests in flight, which are replayed on the secondary after the
        paused sessions' transactions -- the order they had. True if so."""
        busy_pids = {r.backend.pid: r for r in busy}
        quiet_pids = {r.backend.pid for r in relays if r not in busy}
        with trio.move_on_after(self.config.detect_timeout * 10):
            session = await self.open_primary("connmgr switchover drain")
            try:
                rows = await session.query_rows(messages.query(
                    "SELECT pid, pg_catalog.array_to_string(pg_catalog.pg_blocking_pids(pid), ',')"
                    " FROM pg_catalog.pg_stat_activity WHERE wait_event_type = 'Lock'"
                    f" AND pid IN ({', '.join(str(int(p)) for p in busy_pids)})"
                ))  # fmt: skip
                waiting = {int(pid): {int(b) for b in (blockers or b"").decode().split(",") if b} for pid, blockers in rows}
                if set(waiting) != set(busy_pids):
                    return False
                others = set().union(*waiting.values()) - quiet_pids - set(waiting)
                if others and self.coordinator is not None:
                    # a worker of a fleet: another worker's paused sessions are not in this
                    # one's lists; paused, they are idle in their transactions
                    idle = await session.query_rows(messages.query(
                        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE state = 'idle in transaction'"
                        f" AND pid IN ({', '.join(str(int(p)) for p in others)})"
                    ))  # fmt: skip
                    quiet_pids = quiet_pids | {int(pid) for (pid,) in idle}
                if not all(blockers and blockers <= quiet_pids | set(waiting) for blockers in waiting.values()):
                    return False
                ended = await session.query_rows(messages.query(
                    "SELECT pid, pg_catalog.pg_terminate_backend(pid, 5000) FROM pg_catalog.pg_stat_activity"
                    f" WHERE pid IN ({', '.join(str(p) for p in waiting)})"
                ))  # fmt: skip
            finally:
                session.close()
            if any(ok != b"t" for _pid, ok in ended):
                raise FailoverError(f"backends {sorted(waiting)} waiting for paused sessions' locks did not end")
            self._stuck.update(busy_pids[p].conn.id for p in waiting)
            self.note(f"session(s) {sorted(self._stuck)} waited for locks of paused sessions: their backends"
                      " ended, their requests move with them, after the paused sessions")  # fmt: skip
            return True
        return False

    async def _fence(self) -> None:
        """Commit a transactional logical message on the primary with synchronous_commit
        on (it returns once the secondary, a synchronous standby, has flushed it), then
        check it: every subscription of the secondary has reported a flush position at or
        beyond the message, so it has applied every commit before it. The check does not
        trust the synchronous standby setting (a commit made just after it changed may not
        have waited); if the secondary is behind, it waits for it, within ``max_wait``."""
        with trio.fail_after(self.config.max_wait):
            admin = await self._admin(self.config.dbname, "connmgr switchover fence")
            try:
                names = [n.decode() for (n,) in await admin.query_rows(messages.query(
                    "SELECT subname FROM pg_catalog.pg_subscription WHERE subenabled"))]  # fmt: skip
            finally:
                admin.close()
            if not names:
                raise FailoverError("the secondary has no enabled subscription: it does not follow the primary")
            session = await self.open_primary("connmgr switchover fence")
            try:
                rows = await session.query_rows(messages.query(
                    "BEGIN; SET LOCAL synchronous_commit = on;"
                    " SELECT pg_catalog.pg_logical_emit_message(true, 'connmgr', 'switchover'); COMMIT"
                ))  # fmt: skip
                fence = rows[0][0].decode()
                listed = ", ".join(quote_literal(n) for n in names)
                waited = False
                while True:
                    ((n,),) = await session.query_rows(messages.query(
                        "SELECT count(*) FROM pg_catalog.pg_stat_replication"
                        f" WHERE application_name IN ({listed}) AND flush_lsn >= {quote_literal(fence)}::pg_lsn"
                    ))  # fmt: skip
                    if int(n) >= len(names):
                        break
                    if not waited:
                        self.note(f"fence at {fence}: waiting for the secondary to report it applied (the"
                                  " synchronous commit did not wait for it)")  # fmt: skip
                        waited = True
                    await trio.sleep(0.005)
            finally:
                session.close()

    async def _prepare_reverse(self) -> None:
        """A planned switchover: the old primary holds exactly what the secondary holds
        now. Slots made on the secondary now, before anything is replayed or written there,
        let the old primary be re-seeded later without a copy (connmgr/failover/reseed.py). If they
        cannot be made, the re-seed copies; the move goes on either way."""
        try:
            with trio.fail_after(self.config.detect_timeout * 10):
                made = await reseeding.prepare_slots(lambda db, purpose: self._admin(db, purpose), self.subscriptions)
            self.reverse_slots = True
            self.note(f"slot(s) {made} made on the secondary: the old primary can follow it without a copy")
        except (reseeding.ReseedError, ClientError, OSError, PeerClosed, trio.TooSlowError) as e:
            self.note(f"no slots for a re-seed without copy ({e or type(e).__name__}): the old primary will be"
                      " copied afresh")  # fmt: skip

    # ------------------------------------------------------------------ move order

    async def _arrange(self) -> list[int]:
        """The order of the move (:meth:`gather`, of every worker in a fleet's
        coordinator); returns the committers, in order."""
        if self.members is not None:
            committers, others = await self.members.gather()
        else:
            found, others = self.gather()
            committers = [conn_id for _at, conn_id in sorted(found)]
        # one after the other, in the order their commits were sent
        self.order.arrange(committers, others)
        return committers

    def gather(self) -> tuple[list[tuple[float, int]], list[int]]:
        """Sessions with a marked commit in flight (the marker for their open transaction
        was sent and requests are pending), with when it was sent; and the others.
        Postgres releases a transaction's locks and shows its rows when it commits
        *locally*, before the synchronous standby confirms: another open transaction may
        have read rows of a commit the secondary never received. Those commits are
        replayed first, and every other session's replay waits for them, so it reads what
        it read on the primary."""
        committers = []
        others = []
        for conn in self.sessions:
            relay = conn.relay
            if relay is None:
                continue
            session = conn.session
            # (a COPY still receiving data has not asked to commit yet; a session the
            # switchover's drain ended while it waited for a lock did not commit)
            if session.pending and relay.injector.marker_seq == relay.transactions + 1 \
                    and session.phase is not Phase.COPY_IN and conn.id not in self._stuck:  # fmt: skip
                committers.append((relay.injector.marker_at, conn.id))
            else:
                others.append(conn.id)
        return committers, others

    # the move's order, for the sessions moving (connmgr/failover/session_move.py)

    def is_committer(self, conn_id: int) -> bool:
        return self.order.is_committer(conn_id)

    async def committer_turn(self, conn_id: int) -> None:
        await self.order.committer_turn(conn_id)

    def commit_settled(self, conn_id: int) -> None:
        self.order.commit_settled(conn_id)

    async def commits_settled(self) -> None:
        await self.order.commits_settled()

    def prefix_replayed(self, conn_id: int) -> None:
        self.order.prefix_replayed(conn_id)

    async def prefixes_replayed(self, conn_id: int) -> None:
        await self.order.prefixes_replayed(conn_id)

    async def replays_done(self) -> None:
        await self.order.replays_done()

    async def new_session_ready(self) -> None:
        """A new client session waits for a decision in progress (so it is not sent to a
        dead primary) and, after a failover, for the replays (see :meth:`replays_done`)."""
        for event in (self._switched, self._deciding):
            if event is not None:
                with trio.move_on_after(self.config.max_wait):
                    await event.wait()
        if self.failed_over and not self.order.prefixes_done_event.is_set():
            await self.replays_done()

    async def _primary_answers(self) -> bool:
        """A fresh session on the primary within ``detect_timeout``."""
        with trio.move_on_after(self.config.detect_timeout):
            try:
                session = await self.open_primary("connmgr failover probe")
            except (ClientError, OSError, PeerClosed, trio.BrokenResourceError) as e:
                self.note(f"probe: {e}")
                return False
            session.close()
            return True
        self.note(f"probe: no answer within {self.config.detect_timeout:g}s")
        return False

    # ------------------------------------------------------------------ the secondary

    async def _admin(self, database: str, purpose: str, server: BackendServer | None = None) -> BackendSession:
        """connmgr's own session with the [failover] credentials, on the secondary (or
        ``server``: both databases of the pair take the same superuser)."""
        c = self.config
        params = {"user": c.user, "database": database, "application_name": purpose}
        return await open_backend(server or self.server, params, Credentials(password=c.password or None),
                                  max_message_size=1 << 24)  # fmt: skip

    async def _point_of_failure(self) -> None:
        """Disable every enabled subscription of the secondary and wait for its apply
        worker to exit: what it applied is final."""
        with trio.fail_after(self.config.max_wait):
            self.subscriptions = await point_of_failure(
                lambda db: self._admin(db, "connmgr failover"), self.config.dbname, self.config.sequence_lead,
                self.note)  # fmt: skip

    async def committed_seq(self, database: str, session_id: int) -> int:
        """The number of the last transaction of ``session_id`` that committed on the
        secondary (its marker row), 0 if none. Read once per database after the point of
        failure."""
        ready = self._committed_ready.get(database)
        if ready is None:
            ready = self._committed_ready[database] = trio.Event()
            try:
                admin = await self._admin(database, "connmgr failover markers")
                try:
                    rows = await admin.query_rows(messages.query(
                        f"SELECT session, seq FROM connmgr.markers WHERE origin = {int(self.origin)}"
                    ))  # fmt: skip
                finally:
                    admin.close()
                self._committed[database] = {int(s): int(q) for s, q in rows}
                self.note(f"marker rows of {database}: {len(rows)} session(s)")
            except BaseException:
                del self._committed_ready[database]
                ready.set()
                raise
            ready.set()
        else:
            await ready.wait()
            if database not in self._committed:
                return await self.committed_seq(database, session_id)
        return self._committed[database].get(session_id, 0)


async def point_of_failure(admin: Callable[[str], Awaitable[BackendSession]], dbname: str, sequence_lead: int,
                           note: Callable[[str], None]) -> list[reseeding.Subscription]:  # fmt: skip
    """Make a subscriber database stand alone: disable every enabled subscription, end its
    apply worker and wait until it is gone (what it applied is final), then set every
    column-owned sequence ``sequence_lead`` past its column. ``admin(database)`` opens a
    superuser session there. Returns the subscriptions that were stopped. The database
    failover calls it on the secondary; a host takeover on host B's own database."""
    session = await admin(dbname)
    try:
        rows = await session.query_rows(messages.query(
            "SELECT s.oid, s.subname, d.datname, pg_catalog.array_to_string(s.subpublications, ',')"
            " FROM pg_catalog.pg_subscription s"
            " JOIN pg_catalog.pg_database d ON d.oid = s.subdbid WHERE s.subenabled ORDER BY 1"
        ))  # fmt: skip
    finally:
        session.close()
    for oid, name, database, _pubs in rows:
        sub, db = name.decode(), database.decode()
        session = await admin(db)
        try:
            await session.query_rows(messages.query(f"ALTER SUBSCRIPTION {quote_ident(sub)} DISABLE"))
            # The worker would leave at its next look at the catalog (up to a second
            # with a live primary). Ending it now is equivalent: a transaction it
            # had not applied was not acknowledged to any client, so it is replayed.
            await session.query_rows(messages.query(
                "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_subscription"
                f" WHERE subid = {int(oid)} AND pid IS NOT NULL"
            ))  # fmt: skip
            note(f"subscription {sub} ({db}) disabled")
            deadline = time.monotonic() + _WORKER_EXIT_TIMEOUT
            while True:
                left = await session.query_rows(messages.query(
                    "SELECT count(*) FROM pg_catalog.pg_stat_subscription"
                    f" WHERE subid = {int(oid)} AND pid IS NOT NULL"
                ))  # fmt: skip
                if left == [(b"0",)]:
                    break
                if time.monotonic() > deadline:
                    raise FailoverError(f"the apply worker of subscription {sub} did not stop"
                                        f" within {_WORKER_EXIT_TIMEOUT:g}s")  # fmt: skip
                await trio.sleep(0.01)
            # every committed row is here now: no sequence may hand out a key again
            n = await set_past_columns(session, sequence_lead)
            note(f"{n} column sequence(s) of {db} set past their columns")
        finally:
            session.close()
    note(f"point of failure reached ({len(rows)} subscription(s) stopped)")
    return [reseeding.Subscription(n.decode(), d.decode(), tuple(p.decode().split(","))) for _oid, n, d, p in rows]


def _hostport(server: BackendServer) -> str:
    return f"[{server.host}]:{server.port}" if ":" in server.host else f"{server.host}:{server.port}"
