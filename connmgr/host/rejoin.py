"""After a host takeover: the host left behind joins the pair again, as its secondary
(issue 14, step 7).

Host B's connmgr took over: its database stands alone (its subscriptions disabled by
:func:`~connmgr.failover.controller.point_of_failure`, kept here as :attr:`Rejoin.subscriptions`),
the primary record in etcd names it, and it serves as the primary. Its mirror link to
``[mirror] peer`` runs from the takeover on (connmgr/app.py), waiting for a secondary.

Host A, once back, holds what its database held when it died -- possibly commits never
acknowledged (replayed on host B, or ended with 08006). Its connmgr does not lead (the
primary record names host B). It joins as the secondary in two steps:

1. ``RESEED`` on host B's admin console (``connmgr reseed``) runs :meth:`Rejoin.reseed`:
   host A's database (host B's ``[poster]`` address: where host B read the primary's
   changes) is made the subscriber of host B's, with the database failover's machinery
   (:mod:`connmgr.failover.reseed`), always with a copy, and its sequences are set ahead.
   Both databases take the ``[failover]`` user, as for the database failover.
2. host A's connmgr starts with a secondary's configuration (``[mirror] listen``, the
   ``[poster]`` on host B's database, ``[host]`` with the copies of host B's frames): it
   follows host B's mirror and campaigns as host B's successor.

The pair then takes a second host failure, the other way. Sessions that moved at the first
takeover are not mirrored (the new secondary never saw their TCP handshake nor their
log-in, so it could not rebuild them): a second host failure does not move them.
"""

from __future__ import annotations

import logging
import time

import trio

from connmgr.config import Config
from connmgr.errors import ClientError
from connmgr.failover import reseed as reseeding
from connmgr.pg.backend import BackendServer, BackendSession, Credentials, open_backend
from connmgr.pg.wire import PeerClosed

log = logging.getLogger("connmgr.host")

__all__ = ["Rejoin", "RejoinError"]


class RejoinError(Exception):
    """The left-behind database could not be re-seeded (the message says why). Internal:
    the admin console's RESEED answers it with SQLSTATE 55000."""


class Rejoin:
    """See the module docstring. ``config`` is host B's (the secondary's, now the primary's)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        timeout = config.primary.connect_timeout
        #: the database left behind (where this connmgr read the primary's changes)
        self.old = BackendServer("left-behind primary", config.poster.host, config.poster.port, timeout)
        #: this host's database, the primary since the takeover
        self.new = BackendServer("new primary", config.primary.host, config.primary.port, timeout)
        #: the subscriptions the takeover stopped (set by the takeover; empty before it)
        self.subscriptions: list[reseeding.Subscription] = []
        self.sync_names: str | None = None
        self.running = False
        self.reseeds = 0
        #: (seconds from the start of the last re-seed, what happened)
        self.timeline: list[tuple[float, str]] = []
        self._started = 0.0

    def note(self, text: str) -> None:
        self.timeline.append((time.monotonic() - self._started, text))
        log.warning("rejoin: %s", text)

    async def _admin(self, database: str, purpose: str, server: BackendServer) -> BackendSession:
        f = self.config.failover
        params = {"user": f.user, "database": database, "application_name": purpose}
        return await open_backend(server, params, Credentials(password=f.password or None), max_message_size=1 << 24)

    async def reseed(self) -> None:
        """Make the left-behind database the subscriber of this host's (see the module
        docstring). Raises :class:`RejoinError` with the reason; idempotent, so a re-seed
        that failed half-way is simply run again."""
        if not self.subscriptions:
            raise RejoinError("nothing to re-seed: this connmgr has not taken over from another host")
        if self.running:
            raise RejoinError("a re-seed is already running")
        cfg = self.config.failover
        old, new = self.old, self.new
        self.running = True
        self.timeline, self._started = [], time.monotonic()
        try:
            self.note(f"re-seeding {old.address} (left behind by the host takeover) as the secondary of"
                      f" {new.address}, with a copy of the data: it may hold commits never acknowledged")  # fmt: skip
            with trio.fail_after(cfg.reseed_timeout + 30):
                self.sync_names, moved = await reseeding.reseed_and_sync(
                    lambda db, purpose: self._admin(db, purpose, old), lambda db, purpose: self._admin(db, purpose, new),
                    self.subscriptions, copy=True, sync_names=self.sync_names, timeout=cfg.reseed_timeout,
                    connect=lambda db: reseeding.conninfo(new.host, new.port, cfg.user, cfg.password, db),
                    note=self.note,
                )  # fmt: skip
        except Exception as e:  # a server refusing or gone, a timeout -- or a bug: it costs the re-seed only
            why = str(e) or type(e).__name__
            if not isinstance(e, reseeding.ReseedError | ClientError | OSError | PeerClosed | trio.TooSlowError):
                log.exception("rejoin: re-seed failed")
            self.note(f"re-seed failed: {why}")
            raise RejoinError(f"re-seed failed: {why}") from None
        finally:
            self.running = False
        self.reseeds += 1
        self.note(f"{moved} sequence(s) of the new secondary set ahead; start its connmgr as the secondary"
                  f" ([mirror] listen = {self.config.mirror.peer or 'the address of this connmgr [mirror] peer'})")  # fmt: skip
