"""The redo monitor: follows the primary's WAL insert position and publishes it.

One task keeps one session of its own on the primary and asks
``pg_current_wal_insert_lsn()`` every ``interval`` seconds; the value lands in
:attr:`RedoMonitor.lsn`, a plain int the relay reads when it tags a message -- no round trip
and no lock on the client's path.

Freshness and correctness: a tag read at time *t* was measured at most
``interval + one round trip`` before *t*, so it is a *lower bound* of the position at *t*,
and it never goes backwards (a lower value, e.g. from a reconnect to a lagging server, is
ignored). A lower bound is what the start of a transaction's range needs: every WAL record
the transaction writes is inserted after its first message passed connmgr, hence after
the tag. The end of the range (the tag on the acknowledgement) may be below the commit
record by up to one interval, so it is a hint, never the purge decision (see
:mod:`replay.import_queue` and the markers in :mod:`replay`).

Idle: sampling costs a query on the primary and its round trip in connmgr (at 5 ms, about
8% of a core of connmgr while nothing happens). So when ``activity`` (a counter: the mirror's
latest record version) has not moved since the last sample, the next sample waits up to
``idle_interval``; the first record after the pause wakes it (:meth:`RedoMonitor.wake`,
which the mirror link calls when records start to flow), and it samples one ``interval``
after the previous sample at the earliest. The tag of that record is the older sample:
still a lower bound, which is all a tag promises. (It used to look at ``activity`` every
``interval`` during the pause: 200 wakeups a second of an idle connmgr.)

If the primary stops answering, :attr:`RedoMonitor.healthy` turns False after
``stale_after`` seconds and :attr:`RedoMonitor.errors` counts the failures; tags keep the
last value (still a valid lower bound).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from connmgr.pg.reconnect import Outage
from replay.lsn import parse_lsn
from shadow import messages as m

if TYPE_CHECKING:
    from connmgr.pg.backend import BackendSession

log = logging.getLogger("connmgr.redo")

_QUERY = m.query("SELECT pg_catalog.pg_current_wal_insert_lsn()")


class RedoMonitor:
    def __init__(self, *, interval: float = 0.005, stale_after: float = 1.0, idle_interval: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.interval = interval
        #: the longest wait between samples while nothing is mirrored (see the module docstring)
        self.idle_interval = max(interval, idle_interval)
        #: a counter that moves when sessions are active (None: always sample every interval)
        self.activity: Callable[[], int] | None = None
        #: the clock of :attr:`healthy` (trio.current_time in tests)
        self._clock = clock
        self.stale_after = stale_after
        #: the published position (0 until the first answer)
        self.lsn = 0
        self.updated_at = 0.0
        self.samples = 0
        self.errors = 0
        self._outage = Outage(log, "redo monitor", again="sampling again")
        #: set by wake() while _pause waits for activity
        self._idle: trio.Event | None = None

    def retarget(self) -> None:
        """The primary is another server now (a failover): positions start over in its
        WAL, and the current session (on the old one) is dropped at once; ``connect`` opens
        the next one on the new primary."""
        self.lsn = 0
        self._outage.restart()

    @property
    def healthy(self) -> bool:
        """A sample came within ``stale_after`` (never before the first sample)."""
        return self.samples > 0 and self._clock() - self.updated_at < self.stale_after

    def publish(self, lsn: int) -> None:
        """Record a sample; never moves backwards."""
        if lsn > self.lsn:
            self.lsn = lsn
        self.updated_at = self._clock()
        self.samples += 1

    async def run(
        self,
        connect: Callable[[], Awaitable[BackendSession]],
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll until cancelled; ``connect()`` opens a session on the primary. Reconnects
        after failures (1 s back-off). ``task_status.started()`` after the first sample."""
        started = False
        outage = self._outage
        while True:
            session = None
            retargeted = False
            try:
                with outage.attempt() as scope:
                    session = await connect()
                    outage.success()
                    while True:
                        self.publish(await _sample(session))
                        if not started:
                            task_status.started()
                            started = True
                        await self._pause()
                retargeted = scope.cancelled_caught
            except Exception as e:  # the server gone or refusing (ClientError), no value
                self.errors += 1
                outage.failure(e)
            finally:
                if session is not None:
                    session.close()
            if retargeted:
                continue
            if not started:
                task_status.started()
                started = True
            await outage.back_off()  # retarget() ends it too

    def wake(self) -> None:
        """Records flow again: end an idle pause (the next sample comes one ``interval``
        after the previous one at the earliest)."""
        if self._idle is not None:
            self._idle.set()

    async def _pause(self) -> None:
        """Until the next sample: ``interval``, or while nothing moves up to
        ``idle_interval`` (or until :meth:`wake`)."""
        activity = self.activity
        mark = activity() if activity is not None else None
        since = self._clock()
        await trio.sleep(self.interval)
        if activity is None or activity() != mark:
            return
        left = since + self.idle_interval - self._clock()
        if left <= 0:
            return
        self._idle = idle = trio.Event()
        try:
            with trio.move_on_after(left):
                await idle.wait()
        finally:
            self._idle = None


async def _sample(session: BackendSession) -> int:
    rows = await session.query_rows(_QUERY)
    if len(rows) != 1 or rows[0][0] is None:
        raise RuntimeError("pg_current_wal_insert_lsn() returned no value")
    return parse_lsn(rows[0][0].decode())
