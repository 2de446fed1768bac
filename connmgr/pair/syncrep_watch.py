"""Commits that wait for the synchronous standby too long: say so, with the likely cause.

With the pair set up right, a commit waits in ``SyncRep`` for a few milliseconds. When the
secondary stops applying -- its subscription is not connected, its apply worker fails on a
table or column it lacks, waits for a lock, or (a new table) waits for the secondary
connmgr to replay the DDL -- every writing transaction of the primary hangs there, and
Postgres says nothing to the client. :class:`SyncRepWatch` looks once a ``interval`` at the
primary's ``pg_stat_activity`` and ``pg_stat_replication`` on a session of connmgr's own,
logs one WARNING per episode when a commit has waited longer than ``after`` seconds
(naming the likely cause), INFO when it ends, and keeps the figures for the metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import trio

from shadow import messages as m

log = logging.getLogger("connmgr.syncrep")

_QUERY = m.query(
    "SELECT count(*), COALESCE(max(EXTRACT(epoch FROM pg_catalog.now() - query_start)), 0)::float8,"
    " pg_catalog.current_setting('synchronous_standby_names'),"
    " (SELECT pg_catalog.string_agg(application_name || ' ' || sync_state, ', ') FROM pg_catalog.pg_stat_replication)"
    " FROM pg_catalog.pg_stat_activity WHERE wait_event = 'SyncRep'"
)


def likely_cause(standby_names: str, replication: str) -> str:
    """What most likely holds commits in SyncRep, from the setting and the walsenders."""
    if not replication:
        return (f"no standby is connected (synchronous_standby_names = {standby_names!r}): the secondary's"
                " subscription is down or disabled")  # fmt: skip
    if re.search(r"\b(sync|quorum)\b", replication) is None:  # ("async" is not synchronous)
        return f"no connected standby is synchronous ({replication})"
    return ("the secondary's apply worker does not apply (look at the secondary's server log: a table or"
            " column it lacks, a lock it waits for, or DDL the secondary connmgr has not replayed --"
            " is it running, with [poster] dbname = this database?)")  # fmt: skip


class SyncRepWatch:
    """``open_session()`` opens a session on the primary (connmgr's own credentials)."""

    def __init__(self, open_session: Callable[[], Awaitable], *, interval: float = 1.0, after: float = 3.0) -> None:
        self.open_session = open_session
        self.interval = interval
        self.after = after
        #: commits waiting in SyncRep at the last look, and the longest wait (seconds)
        self.waiting = 0
        self.longest = 0.0
        #: episodes of a commit waiting longer than ``after``
        self.episodes = 0
        self._warned = False

    def observe(self, waiting: int, longest: float, standby_names: str, replication: str) -> None:
        """One look's figures: log the start and the end of an episode."""
        self.waiting, self.longest = waiting, longest
        if waiting and longest >= self.after:
            if not self._warned:
                self._warned = True
                self.episodes += 1
                log.warning("%d commit(s) have waited for the synchronous standby for up to %.1f s: %s",
                            waiting, longest, likely_cause(standby_names, replication))  # fmt: skip
        elif self._warned and not waiting:
            self._warned = False
            log.info("no commit waits for the synchronous standby any more")

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Look every ``interval`` s until cancelled; a lost session is reopened."""
        task_status.started()
        session = None
        while True:
            try:
                if session is None:
                    session = await self.open_session()
                ((n, longest, names, repl),) = await session.query_rows(_QUERY)
                self.observe(int(n), float(longest), (names or b"").decode(), (repl or b"").decode())
            except Exception as e:  # noqa: BLE001 - the server gone or refusing, a stream broken: look again later
                log.debug("SyncRep watch: %s", e)
                if session is not None:
                    session.close()
                session = None
            await trio.sleep(self.interval)
