"""The policy store's cycle (seed 001 Fig. 5-6; the decisions are
shadow/policy/activation.py's): every connmgr reads the store in the primary database at
each activation time, the first of a new cycle moves it on under the sync row's lock, each
stages (fetches, validates, compiles) the versions named there and records whether it
could, and all switch to the approved version at the activation time, each in its own
clock corrected by its measured offset to the store's.

A store that does not exist (no ``connmgr.policy_sync``: nothing was ever pushed) is
looked for again every ``[policy] store_poll`` seconds. A store that cannot be read keeps
the version in use, with a warning; read again, the version in effect by then is taken at
once. A store read from a standby (a secondary connmgr in front of the replica) is
followed, not written: that connmgr stages and switches as the others, but takes no part
in the approval (its staging failures are logged here only).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable

import trio

from connmgr.errors import ClientError
from connmgr.pg.backend import BackendSession
from connmgr.pg.wire import PeerClosed
from shadow import messages
from shadow.errors import RemoteProtocolError
from shadow.policy.activation import (
    MAINTENANCE_SQL,
    MEMBER_LIVES,
    SYNC_COLUMNS,
    ClockOffset,
    Sync,
    Version,
    advance,
    in_effect,
    maintenance_ack_sql,
    member_sql,
    parse_sync,
    staging_sql,
    sync_update_sql,
)
from shadow.policy.rules import PolicyError, parse_policy

log = logging.getLogger("connmgr.policy")

__all__ = ["PolicySync", "default_member"]

_PROBE = ("SELECT extract(epoch FROM clock_timestamp())::text, to_regclass('connmgr.policy_sync') IS NOT NULL,"
          " pg_is_in_recovery()")  # fmt: skip
#: round trips sampled per cycle for the clock offset
_SAMPLES = 3


def default_member() -> str:
    """This connmgr's name in the store: host, process and a token (two connmgrs may share
    a process: the embedded pair); a restarted one is a new member, the old one stops
    counting after three intervals."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class PolicySync:
    """Runs the cycle for ``runtime`` (connmgr/proxy/policy.py: ``activate``, ``prepare``,
    ``ready``). ``open_session(database, purpose)`` opens connmgr's own session on the
    primary; ``clock`` is this connmgr's wall clock (seconds since the epoch)."""

    def __init__(self, runtime, open_session: Callable[[str, str], Awaitable[BackendSession]], *, database: str,
                 member: str, poll: float, timeout: float, maintenance_poll: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.runtime = runtime
        self.open_session = open_session
        self.database = database
        self.member = member
        self.poll = poll
        self.maintenance_poll = maintenance_poll
        self.timeout = timeout
        #: the store's objects under maintenance held here (acknowledged in policy_members)
        self.maintained: tuple[str, ...] = ()
        self.clock = clock
        self.offset = ClockOffset()
        self.started = clock()
        #: the store as last read (None: none found, or never read)
        self.sync: Sync | None = None
        self.exists = False
        self.standby = False
        #: versions staged here: number -> Version, or the PolicyError text it failed with
        self.staged: dict[int, Version | str] = {}
        #: cycles run, and those that failed (the store unreadable)
        self.cycles = 0
        self.failures = 0
        self.last_error = ""
        #: the version approved to switch to, and when (our clock)
        self.pending: tuple[Version, float] | None = None
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Cycle until cancelled; switch at each approved version's activation time;
        follow the store's objects under maintenance. Logins wait for the first cycle
        (``runtime.ready``): a connmgr starts with the version in effect, if the store can
        be read."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._maintenance)
            await self._cycles()

    async def _maintenance(self) -> None:
        """Every ``maintenance_poll`` seconds while the store exists: its objects under
        maintenance applied here, and acknowledged in this connmgr's member row (``connmgr
        maintenance --store`` waits for every live member's). One session, kept open."""
        warned = 0.0
        while True:
            if not self.exists:
                await trio.sleep(self.maintenance_poll)
                continue
            session = None
            try:
                with trio.fail_after(self.timeout):
                    session = await self.open_session(self.database, "connmgr policy maintenance")
                acked = None
                while self.exists:
                    with trio.fail_after(self.timeout):
                        rows = await session.query_rows(messages.query(MAINTENANCE_SQL))
                        self.maintained = self.runtime.from_store(
                            [tuple(v.decode("utf-8", "replace") for v in row) for row in rows])  # fmt: skip
                        if self.maintained != acked and not self.standby:
                            await session.query_rows(messages.query(maintenance_ack_sql(self.member, self.maintained)))
                            acked = self.maintained
                    await trio.sleep(self.maintenance_poll)
            except Exception as e:  # noqa: BLE001 - never the app's end: said, then tried again
                if time.monotonic() - warned > 60:
                    warned = time.monotonic()
                    log.warning("policy store (database %r): cannot read the objects under maintenance (%s);"
                                " trying again", self.database, _why(e), exc_info=not _expected(e))  # fmt: skip
                await trio.sleep(self.poll)
            finally:
                if session is not None:
                    session.close()

    async def _cycles(self) -> None:
        warned = 0.0
        while True:
            try:
                with trio.fail_after(self.timeout):
                    wake = await self.cycle()
                self.last_error = ""
                self.runtime.ready.set()
            except Exception as e:  # noqa: BLE001 - never the app's end: said, then tried again
                self.failures += 1
                self.last_error = _why(e)
                wake = self.clock() + self.poll
                if time.monotonic() - warned > 60:
                    warned = time.monotonic()
                    log.warning("policy store (database %r): cannot read it (%s); %s stays in use, trying again",
                                self.database, self.last_error, self.runtime.active.label,
                                exc_info=not _expected(e))  # fmt: skip
                if not self.runtime.required:
                    self.runtime.ready.set()
            await trio.sleep_until(trio.current_time() + max(0.0, wake - self.clock()))

    def _arm(self, version: Version, at: float) -> None:
        """Switch to ``version`` at ``at`` (our clock), in a task of its own: a cycle that
        is slow then does not delay it (seed 001 Fig. 6)."""
        if self.pending is not None and self.pending[0] is version:
            return
        self.pending = (version, at)
        if self._nursery is not None:
            self._nursery.start_soon(self._switch, version, at)

    async def _switch(self, version: Version, at: float) -> None:
        await trio.sleep_until(trio.current_time() + max(0.0, at - self.clock()))
        if self.pending is not None and self.pending[0] is version:
            self.pending = None
            active = self.runtime.active.number
            if active is None or (version.number or 0) > active:
                self.runtime.activate(version)

    # ------------------------------------------------------------------ one cycle

    async def cycle(self) -> float:
        """One cycle (module docstring); returns when the next is due, in our clock."""
        session = await self.open_session(self.database, "connmgr policy store")
        try:
            for _ in range(_SAMPLES):
                sent = self.clock()
                ((server, exists, standby),) = await session.query_rows(messages.query(_PROBE))
                self.offset.sample(sent, float(server), self.clock())
            self.cycles += 1
            self.exists, self.standby = exists == b"t", standby == b"t"
            if not self.exists:
                self.sync = None
                return self.clock() + self.poll
            sync = await (self._follow(session) if self.standby else self._lead(session))
            if sync is None:
                return self.clock() + self.poll
            self.sync = sync
            effective = in_effect(sync, self.store_now())
            for number in dict.fromkeys(n for n in (effective, sync.next, sync.staged) if n is not None):
                await self._stage(session, number, record=number == sync.staged and not self.standby)
        finally:
            session.close()
        self._schedule(sync)
        keep = {sync.next, sync.staged, in_effect(sync, self.store_now()), self.runtime.active.number}
        for number in [n for n in self.staged if n not in keep]:  # (versions out of play: let go)
            del self.staged[number]
        # (the activation time passed but nobody moved it on yet -- a follower, or a
        # replica behind -- : looked at again soon, not in a spin)
        return max(sync.activation - self.offset.offset, self.clock() + (0.01 if not self.standby else 0.2))

    def store_now(self) -> float:
        """The store's clock now, as we estimate it."""
        return self.clock() + self.offset.offset

    async def _lead(self, session: BackendSession) -> Sync | None:
        """Steps 220-232: under the sync row's lock, move it on if this is the first
        connmgr past its activation time; record this connmgr as a member."""
        rows = await session.query_rows(messages.query(
            f"BEGIN; SELECT {SYNC_COLUMNS}, extract(epoch FROM clock_timestamp())::text"
            " FROM connmgr.policy_sync FOR UPDATE"))  # fmt: skip
        # (on any error the caller closes the session: the transaction, and its lock, end with it)
        if not rows:
            return None
        sync, now = parse_sync(rows[0][:7]), float(rows[0][7])
        if now >= sync.activation:
            moved = await self._advance(session, sync, now)
            if moved is not None:
                await session.query_rows(messages.query(sync_update_sql(moved)))
                self._report(sync, moved)
                sync = moved
        await session.query_rows(messages.query(member_sql(self.member, self.runtime.active.number, self.started,
                                                           self.maintained)))  # fmt: skip
        await session.query_rows(messages.query("COMMIT"))
        return sync

    async def _advance(self, session: BackendSession, sync: Sync, now: float) -> Sync | None:
        (newest,), = await session.query_rows(messages.query("SELECT max(version) FROM connmgr.policy_versions"))
        staging: dict[str, tuple[bool, str]] = {}
        if sync.staged is not None:
            for member, ok, error in await session.query_rows(messages.query(
                    f"SELECT member, ok, error FROM connmgr.policy_staging WHERE version = {int(sync.staged)}")):  # fmt: skip
                staging[member.decode()] = (ok == b"t", (error or b"").decode("utf-8", "replace"))
        members = frozenset(m.decode() for (m,) in await session.query_rows(messages.query(
            "SELECT member FROM connmgr.policy_members"
            f" WHERE seen >= {now!r} - {MEMBER_LIVES!r} * {sync.interval!r}")))  # fmt: skip
        return advance(sync, now, None if newest is None else int(newest), staging, members)

    async def _follow(self, session: BackendSession) -> Sync | None:
        rows = await session.query_rows(messages.query(f"SELECT {SYNC_COLUMNS} FROM connmgr.policy_sync"))
        return parse_sync(rows[0]) if rows else None

    def _report(self, before: Sync, after: Sync) -> None:
        if after.next is not None and after.next != before.next:
            log.warning("policy version %d: staged by every connmgr; all activate it at %s (store clock)",
                        after.next, _when(after.activation))  # fmt: skip
        if after.failed is not None and after.failed != before.failed:
            log.error("policy version %d is refused: it could not be staged everywhere (%s); it is activated"
                      " nowhere", after.failed, after.failure)  # fmt: skip
        if after.staged is not None and after.staged != before.staged:
            log.info("policy version %d: staged by every connmgr until %s", after.staged, _when(after.activation))

    async def _stage(self, session: BackendSession, number: int, record: bool) -> None:
        """Step 234: fetch, validate and compile version ``number`` (once), record the result."""
        if number not in self.staged:
            rows = await session.query_rows(messages.query(
                f"SELECT body FROM connmgr.policy_versions WHERE version = {int(number)}"))  # fmt: skip
            try:
                if not rows:
                    raise PolicyError(f"policy version {number} is not in connmgr.policy_versions")
                policy = parse_policy(rows[0][0].decode("utf-8", "replace"), f"policy version {number}")
                await self.runtime.prepare(policy)
                self.staged[number] = Version(number, policy)
            except PolicyError as e:
                self.staged[number] = str(e)
                log.error("policy version %d cannot be staged here: %s", number, e)
            except (ClientError, OSError, PeerClosed, trio.TooSlowError, trio.BrokenResourceError,
                    trio.ClosedResourceError, RemoteProtocolError) as e:  # fmt: skip
                error = f"policy version {number}: a catalog it needs cannot be read here: {_why(e)}"
                log.error("%s", error)
                if not record:  # (approved or in effect: tried again at the next cycle)
                    return
                self.staged[number] = error  # (being staged: refused everywhere, and why said)
        if record:
            staged = self.staged[number]
            error = staged if isinstance(staged, str) else ""
            await session.query_rows(messages.query(staging_sql(number, self.member, not error, error)))

    def _schedule(self, sync: Sync) -> None:
        """Take the version in effect now at once if we are behind (a start, a store lost
        and found again); arm the switch to the approved one at its activation time."""
        active = self.runtime.active.number
        effective = in_effect(sync, self.store_now())
        if effective is not None and (active is None or effective > active):
            staged = self.staged.get(effective)
            if isinstance(staged, Version):
                self.runtime.activate(staged)
                active = effective
            else:
                log.error("policy version %d is in effect in the fleet but cannot be used here (%s); %s stays",
                          effective, staged, self.runtime.active.label)  # fmt: skip
        if sync.next is not None and (active is None or sync.next > active):
            staged = self.staged.get(sync.next)
            if isinstance(staged, Version):
                self._arm(staged, sync.activation - self.offset.offset)
            else:
                log.error("policy version %d activates at %s everywhere but cannot be used here (%s)", sync.next,
                          _when(sync.activation), staged)  # fmt: skip

    def describe(self) -> list[tuple[str, str]]:
        """(setting, value) rows for the admin console's SHOW POLICY."""
        sync = self.sync
        rows = [("in use", self.runtime.active.label), ("member", self.member),
                ("store", f"database {self.database!r}: " + ("not created (nothing pushed)" if not self.exists else
                                                             "standby (followed)" if self.standby else "primary")),
                ("clock offset", f"{self.offset.offset * 1000:+.3f} ms (± {self.offset.error * 1000:.3f} ms)"
                 if self.offset.known else "not measured"),
                ("cycles", f"{self.cycles} ({self.failures} failed)")]  # fmt: skip
        if self.last_error:
            rows.append(("last error", self.last_error))
        if sync is not None:
            rows += [("store active", str(in_effect(sync, self.store_now()))), ("next", str(sync.next)),
                     ("staged", str(sync.staged)), ("activation", _when(sync.activation)),
                     ("interval", f"{sync.interval:g} s")]  # fmt: skip
            if sync.failed is not None:
                rows.append(("refused", f"version {sync.failed}: {sync.failure}"))
        if self.pending is not None:
            rows.append(("switch", f"to version {self.pending[0].number} in {self.pending[1] - self.clock():.3f} s"))
        return rows


def _expected(e: BaseException) -> bool:
    """An error of the store's reach (said in one line), not a bug (logged with its trace)."""
    return isinstance(e, ClientError | OSError | PeerClosed | trio.TooSlowError | trio.BrokenResourceError
                      | trio.ClosedResourceError | RemoteProtocolError)  # fmt: skip


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d} UTC"
