"""Synchronized activation of policy versions (seed 001, Fig. 5-7): every connmgr of a
fleet switches to a new policy version at one scheduled instant, and a version that any
of them cannot use is activated by none. No I/O: rows in, decisions and SQL out; the
cycle itself runs in connmgr/proxy/policy_sync.py.

How it works
------------
The store is three tables in the primary database (``STORE_DDL``; replicated, so it
survives a failover):

* ``connmgr.policy_versions`` -- every version pushed (``connmgr policy push FILE``): a
  number (the largest + 1, taken under the sync row's lock: no sequence, which logical
  replication would not carry to the secondary) and the TOML text. The newest is the
  *production* data of the seed.
* ``connmgr.policy_sync`` -- one row: the version ``active`` now, the version ``next``
  (approved: every connmgr staged it) that becomes active at ``activation``, the version
  ``staged`` (being fetched, validated and compiled by every connmgr this cycle), the
  ``interval`` between two activations, and the last version refused (``failed``, why).
* ``connmgr.policy_staging`` -- per version and connmgr: staged or not, and why not;
  ``connmgr.policy_members`` -- every connmgr, when it last took part, and the objects it
  holds statements on;
* ``connmgr.policy_maintenance`` -- objects under maintenance fleet-wide (each connmgr
  reads it every ``[policy] maintenance_poll`` seconds, not at the activation times: a
  maintenance begins when every connmgr holds it, which ``connmgr maintenance --store``
  waits for).

A *cycle* of each connmgr (the seed's step 220-236), at every activation time (its own
clock, corrected by its measured offset to the store's clock) and at start:

1. lock the sync row (``SELECT ... FOR UPDATE``) and read the store's clock (220-222);
2. if the activation time has passed (224), this connmgr is the first of the new cycle:
   :func:`advance` -- ``next`` becomes ``active``; ``staged`` becomes ``next`` if every
   live member staged it, stays staged if some have not reported yet, and is *refused* if
   any failed (reported in ``failed``/``failure``, activated nowhere); the newest version
   pushed becomes ``staged``; the activation time moves on by the interval (226-230);
3. record this connmgr as a member; commit (232);
4. fetch, validate and compile ``staged`` and ``next`` (234) and record the result;
5. at the activation time, switch to ``next`` (236, Fig. 6).

So a version pushed now is staged in the next cycle, approved in the one after, and
active one interval later: between two and three intervals. It can never be active on
one connmgr and not on another because the decision to activate it (``next``) is made
only after every live member said it holds it compiled, and before the instant they all
switch. A connmgr that starts (or reads the store again after losing it) takes the
version in effect at once (:func:`in_effect`).

Clock offsets: each cycle samples the store's ``clock_timestamp()`` a few times;
:class:`ClockOffset` keeps the sample with the shortest round trip (its error is at most
half of it) and gives ``offset = server - (sent + received) / 2``; a local deadline is
``activation - offset``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from shadow.policy.rules import Policy
from shadow.sqltext import quote_literal

__all__ = ["INTERVAL_MAX", "INTERVAL_MIN", "MAINTENANCE_SQL", "MEMBER_LIVES", "STORE_DDL", "SYNC_COLUMNS", "ClockOffset", "Sync", "Version", "advance", "in_effect",
           "member_sql", "maintenance_ack_sql", "parse_sync", "staging_sql", "sync_update_sql"]  # fmt: skip

#: the store's tables (``connmgr policy push`` creates them; connmgr only reads and updates)
STORE_DDL = """
CREATE SCHEMA IF NOT EXISTS connmgr;
CREATE TABLE IF NOT EXISTS connmgr.policy_versions (
    version bigint PRIMARY KEY,
    body text NOT NULL,
    pushed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    pushed_by text NOT NULL DEFAULT current_user,
    note text NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS connmgr.policy_sync (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    active bigint, next bigint, staged bigint,
    activation double precision NOT NULL,
    "interval" double precision NOT NULL CHECK ("interval" >= 0.5 AND "interval" <= 86400),
    failed bigint, failure text NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS connmgr.policy_staging (
    version bigint NOT NULL, member text NOT NULL, ok boolean NOT NULL, error text NOT NULL DEFAULT '',
    at double precision NOT NULL, PRIMARY KEY (version, member));
CREATE TABLE IF NOT EXISTS connmgr.policy_members (
    member text PRIMARY KEY, seen double precision NOT NULL, active bigint, started double precision NOT NULL,
    maintenance text NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS connmgr.policy_maintenance (
    object text PRIMARY KEY, by text NOT NULL, since double precision NOT NULL);
"""

#: the objects under maintenance in the store (``connmgr maintenance begin OBJECT --store``)
MAINTENANCE_SQL = "SELECT object, by FROM connmgr.policy_maintenance ORDER BY since, object"

#: the sync row's columns, in the order :func:`parse_sync` reads them
SYNC_COLUMNS = 'active, next, staged, activation, "interval", failed, failure'

#: members not seen for this many intervals no longer count (a stopped connmgr)
MEMBER_LIVES = 3.0


@dataclass(frozen=True, slots=True, eq=False)
class Version:
    """A policy version as a connmgr uses it: its number in the store (None: the
    ``[policy] file``, or no policy) and the policy compiled. A guard compares the one in
    use with its own by identity (shadow/policy/guard.py)."""

    number: int | None
    policy: Policy

    @property
    def label(self) -> str:
        return "none" if self.number is None and not self.policy.classes else (
            self.policy.source if self.number is None else f"version {self.number}")


@dataclass(frozen=True, slots=True)
class Sync:
    """The sync row. Times are the store's clock, seconds since the epoch."""

    active: int | None
    next: int | None
    staged: int | None
    activation: float
    interval: float
    failed: int | None = None
    failure: str = ""


def _int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


#: the interval's bounds (seconds; the table checks them too)
INTERVAL_MIN, INTERVAL_MAX = 0.5, 86400.0


def parse_sync(row: tuple) -> Sync:
    """The sync row from its text values (:data:`SYNC_COLUMNS`); ValueError for one that
    cannot be used (an interval out of bounds, an activation time not finite)."""
    active, next_, staged, activation, interval, failed, failure = row
    sync = Sync(_int(active), _int(next_), _int(staged), float(activation), float(interval), _int(failed),
                (failure or b"").decode("utf-8", "replace"))  # fmt: skip
    if not INTERVAL_MIN <= sync.interval <= INTERVAL_MAX or not math.isfinite(sync.activation):
        raise ValueError(f"connmgr.policy_sync: interval {sync.interval!r} (must be {INTERVAL_MIN:g} to"
                         f" {INTERVAL_MAX:g} s) or activation {sync.activation!r} cannot be used")  # fmt: skip
    return sync


def in_effect(sync: Sync, now: float) -> int | None:
    """The version every connmgr uses at ``now`` (the store's clock)."""
    if sync.next is not None and now >= sync.activation:
        return sync.next
    return sync.active


def advance(sync: Sync, now: float, newest: int | None, staging: dict[str, tuple[bool, str]],
            members: frozenset[str]) -> Sync | None:  # fmt: skip
    """The sync row after the first cycle past ``sync.activation`` (None: it has not
    passed, nothing to do). ``newest`` is the newest version pushed; ``staging`` the
    results recorded for ``sync.staged`` (member -> (ok, error)); ``members`` the live
    members (seen within :data:`MEMBER_LIVES` intervals)."""
    if now < sync.activation:
        return None
    active = in_effect(sync, now)
    next_ = None
    staged = sync.staged
    failed, failure = sync.failed, sync.failure
    if staged is not None:
        bad = sorted((member, error) for member, (ok, error) in staging.items() if not ok)
        if bad:  # one connmgr cannot use it: no connmgr will
            failed, staged = staged, None
            failure = "; ".join(f"{member}: {error}" for member, error in bad)
        elif members and members <= staging.keys():
            next_, staged = staged, None
        # (else some live member has not staged it yet: it stays staged another cycle)
    known = max((v for v in (active, next_, staged, failed) if v is not None), default=0)
    if newest is not None and newest > known:
        staged = newest  # (a newer one replaces one still staging: its results start afresh)
    # the next activation on the grid of the previous ones, after now
    steps = math.floor((now - sync.activation) / sync.interval) + 1
    return replace(sync, active=active, next=next_, staged=staged, activation=sync.activation + steps * sync.interval,
                   failed=failed, failure=failure)  # fmt: skip


def _sql_int(value: int | None) -> str:
    return "NULL" if value is None else str(int(value))


def sync_update_sql(sync: Sync) -> str:
    """The UPDATE that stores ``sync``."""
    return (f"UPDATE connmgr.policy_sync SET active = {_sql_int(sync.active)}, next = {_sql_int(sync.next)},"
            f" staged = {_sql_int(sync.staged)}, activation = {sync.activation!r}, failed = {_sql_int(sync.failed)},"
            f" failure = {quote_literal(sync.failure[:2000])}")  # fmt: skip


def staging_sql(version: int, member: str, ok: bool, error: str) -> str:
    """Record that ``member`` staged ``version`` (or why it could not)."""
    return ("INSERT INTO connmgr.policy_staging (version, member, ok, error, at) VALUES"
            f" ({int(version)}, {quote_literal(member)}, {'true' if ok else 'false'}, {quote_literal(error[:1000])},"
            " extract(epoch FROM clock_timestamp())) ON CONFLICT (version, member) DO UPDATE SET ok = excluded.ok,"
            " error = excluded.error, at = excluded.at")  # fmt: skip


def member_sql(member: str, active: int | None, started: float, maintained: tuple[str, ...] = ()) -> str:
    """Record that ``member`` takes part now, using ``active``, holding statements on
    ``maintained``."""
    return ("INSERT INTO connmgr.policy_members (member, seen, active, started, maintenance) VALUES"
            f" ({quote_literal(member)}, extract(epoch FROM clock_timestamp()), {_sql_int(active)}, {started!r},"
            f" {quote_literal(chr(10).join(maintained))}) ON CONFLICT (member) DO UPDATE SET seen = excluded.seen,"
            " active = excluded.active, started = excluded.started, maintenance = excluded.maintenance")  # fmt: skip


def maintenance_ack_sql(member: str, objects: tuple[str, ...]) -> str:
    """Record the objects ``member`` holds statements on now (one per line)."""
    return (f"UPDATE connmgr.policy_members SET maintenance = {quote_literal(chr(10).join(objects))}"
            f" WHERE member = {quote_literal(member)}")  # fmt: skip


class ClockOffset:
    """The store's clock minus ours, from round trips (``sample(sent, server, received)``,
    all seconds since the epoch): the sample with the shortest round trip among the last
    ``keep`` wins (its error is at most half its round trip)."""

    __slots__ = ("_samples", "keep")

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self._samples: list[tuple[float, float]] = []  # (round trip, offset)

    def sample(self, sent: float, server: float, received: float) -> None:
        if received < sent:
            return  # (our clock stepped back meanwhile: the sample means nothing)
        self._samples.append((received - sent, server - (sent + received) / 2))
        del self._samples[:-self.keep]

    @property
    def known(self) -> bool:
        return bool(self._samples)

    @property
    def offset(self) -> float:
        """Seconds to add to our clock to read the store's (0 before any sample)."""
        return min(self._samples)[1] if self._samples else 0.0

    @property
    def error(self) -> float:
        """The most the offset can be wrong by: half the best round trip."""
        return min(self._samples)[0] / 2 if self._samples else math.inf
