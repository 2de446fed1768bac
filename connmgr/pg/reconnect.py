"""The bookkeeping of a task that keeps a connection (or a round of work) going through
outages: the redo monitor, the poster queue, the sequence sync.

The first failure of an outage is a WARNING, the failures after it are only counted, the
recovery is INFO with their number -- one line each way per outage, not one a second.
:meth:`Outage.attempt` runs one connection under a cancel scope that :meth:`Outage.restart`
ends at once (the server changed: reconnect now), and :meth:`Outage.back_off` sleeps
between attempts under that same kind of scope.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import trio

__all__ = ["Outage"]


class Outage:
    """See the module docstring. ``what`` starts each log line; ``retrying`` says what
    happens during the outage, ``again`` what the recovery line says works again."""

    def __init__(self, log: logging.Logger, what: str, *, retrying: str = "retrying every 1 s",
                 again: str = "connected again", backoff: float = 1.0) -> None:  # fmt: skip
        self.log = log
        self.what = what
        self.retrying = retrying
        self.again = again
        self.backoff = backoff
        #: failures since the last success
        self.failed = 0
        self._scope: trio.CancelScope | None = None

    def failure(self, reason: object) -> None:
        if not self.failed:
            self.log.warning("%s: %s; %s", self.what, reason, self.retrying)
        self.failed += 1

    def success(self) -> None:
        if self.failed:
            self.log.info("%s: %s after %d failed attempt(s)", self.what, self.again, self.failed)
            self.failed = 0

    @contextlib.contextmanager
    def attempt(self) -> Iterator[trio.CancelScope]:
        """One connection's life; :meth:`restart` cancels it (check ``cancelled_caught``)."""
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                yield scope
            finally:
                self._scope = None

    async def back_off(self) -> None:
        """Wait before the next attempt; :meth:`restart` ends the wait too."""
        with self.attempt():
            await trio.sleep(self.backoff)

    def restart(self) -> None:
        """End the current attempt or back-off now: the next attempt starts at once."""
        if self._scope is not None:
            self._scope.cancel()
