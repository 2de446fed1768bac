"""Keeping the secondary's sequences ahead of the primary's.

PostgreSQL 15 logical replication does not carry sequences: rows reach the secondary with
their keys, but its sequences (``serial``, identity columns, standalone ones) stay where
they were. After a switch, an insert there would draw a key the primary already used.
:class:`SequenceSync` runs on the secondary connmgr and closes that gap continuously.

Policy: a lead
    Every ``interval`` seconds one round reads ``pg_sequences`` on both servers. A secondary
    sequence that is not comfortably ahead -- fewer than ``lead // 2`` increments past the
    primary's ``last_value`` -- is set ``lead`` increments past it (``setval(..., true)``;
    the mirror image for a descending sequence; clamped to the secondary's bounds). Like
    Postgres's own ``SEQ_LOG_VALS`` (the 32 values it WAL-logs ahead, skipped after a
    crash), the lead trades a gap in the key space for not having to write on every draw:
    the secondary is never behind, even between two rounds, as long as the primary draws
    fewer than ``lead / 2`` values of one sequence per interval (plus a round trip).
    At failover a final pass is not possible, since the primary is gone, so the lead *is*
    the guarantee: size it to the peak draw rate times the interval, doubled.

Never lower
    A round only moves a secondary sequence forward. The setval reads the sequence in the
    same statement, ``setval(s, GREATEST(target, last_value), true) FROM s`` (``LEAST``
    when descending), so it cannot lower it even when ``pg_sequences`` shows NULL for a
    sequence that was set with ``is_called = false``, or when the sequence moved between
    the read and the write.

What a round looks at
    Sequences of the primary that the secondary lacks are counted (:attr:`SequenceSync.missing`)
    and logged once per name. A never-used primary sequence (``last_value`` NULL) counts
    as having handed out nothing, ``start_value - increment``, so the secondary gets its
    lead before the first draw. ``pg_sequences`` also shows NULL for a sequence the user
    may not read: such sequences are counted in :attr:`SequenceSync.unreadable` and logged,
    not mistaken for unused ones. The user needs SELECT on every sequence of the primary
    (e.g. ``pg_read_all_data``) and SELECT and UPDATE on the secondary's (e.g.
    ``pg_read_all_data`` and ``pg_write_all_data``). One instance covers one database.
    Cycling sequences are not kept apart: once the primary wraps, "ahead" has no meaning.

All setvals of a round go in one Query message (one round trip). ``setval`` is not
transactional, so if one of them fails, those before it stay done.

:func:`plan` is the pure part (rows in, setvals out) and does no I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from connmgr.errors import BackendRejected, BackendUnavailable, ClientError
from connmgr.pg.reconnect import Outage
from connmgr.pg.wire import PeerClosed
from shadow import messages as m
from shadow.sqltext import quote_ident, quote_literal

if TYPE_CHECKING:
    from connmgr.pg.backend import BackendSession

__all__ = ["Advance", "Plan", "SequenceState", "SequenceSync", "plan", "quote_ident", "quote_literal"]

log = logging.getLogger("connmgr.sequence_sync")

_READ = m.query(
    "SELECT schemaname, sequencename, last_value, increment_by, max_value, min_value,"
    " start_value, pg_catalog.has_sequence_privilege("
    "pg_catalog.format('%I.%I', schemaname, sequencename), 'SELECT,USAGE')"
    " FROM pg_catalog.pg_sequences"
)

Row = tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class SequenceState:
    """One row of ``pg_sequences``."""

    schema: str
    name: str
    last_value: int | None
    increment: int
    max_value: int
    min_value: int
    start_value: int
    readable: bool

    @classmethod
    def from_row(cls, row: Row) -> SequenceState:
        schema, name, last, inc, hi, lo, start, readable = row
        if None in (schema, name, inc, hi, lo, start):
            raise ValueError(f"unexpected NULL in a pg_sequences row {row!r}")
        return cls(schema.decode(), name.decode(), None if last is None else int(last), int(inc),
                   int(hi), int(lo), int(start), readable == b"t")  # fmt: skip

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


@dataclass(frozen=True, slots=True)
class Advance:
    """A setval to run on the secondary: ``qualified`` sequence to ``target`` or beyond."""

    qualified: str
    target: int
    descending: bool

    def sql(self) -> str:
        """One statement returning (value set, last_value before, is_called before)."""
        bound = "LEAST" if self.descending else "GREATEST"
        return (f"SELECT pg_catalog.setval({quote_literal(self.qualified)}::pg_catalog.regclass,"
                f" {bound}({self.target}, last_value), true), last_value, is_called"
                f" FROM {self.qualified}")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    advances: tuple[Advance, ...]
    missing: tuple[str, ...]  # qualified names of primary sequences the secondary lacks
    unreadable: tuple[str, ...]  # qualified names the primary would not show
    #: the smallest lead (in increments) any secondary sequence had over the primary's
    #: before this round moved it; negative: it was behind (None: no sequence compared)
    min_margin: int | None = None


def plan(primary: Sequence[Row], secondary: Sequence[Row], lead: int,
         leads: Mapping[str, int] | None = None) -> Plan:  # fmt: skip
    """Compare the two servers' ``pg_sequences`` rows (as read by :data:`_READ`) and return
    the setvals that bring every secondary sequence ``lead`` increments past the primary
    (``leads``: a larger lead for some qualified names, from their draw rate; see the
    module docstring). Raises ValueError on a malformed row."""
    leads = leads or {}
    min_margin: int | None = None
    theirs = {(s.schema, s.name): s for s in map(SequenceState.from_row, secondary)}
    advances: list[Advance] = []
    missing: list[str] = []
    unreadable: list[str] = []
    for p in sorted(map(SequenceState.from_row, primary), key=lambda s: (s.schema, s.name)):
        s = theirs.get((p.schema, p.name))
        if s is None:
            missing.append(p.qualified)
            continue
        if not p.readable:
            unreadable.append(p.qualified)
            continue
        inc = p.increment
        handed_out = p.last_value if p.last_value is not None else p.start_value - inc
        if s.last_value is not None:
            margin = (s.last_value - handed_out) // inc
            min_margin = margin if min_margin is None else min(min_margin, margin)
        lead = max(lead, leads.get(p.qualified, 0))
        comfortable = handed_out + (lead // 2) * inc
        target = min(max(handed_out + lead * inc, s.min_value), s.max_value)
        cur = s.last_value
        if inc > 0:
            if cur is not None and (cur >= comfortable or cur >= target):
                continue
        elif cur is not None and (cur <= comfortable or cur <= target):
            continue
        advances.append(Advance(p.qualified, target, inc < 0))
    return Plan(tuple(advances), tuple(missing), tuple(unreadable), min_margin)


def draw_leads(before: Mapping[str, tuple[int, float]], now: Sequence[Row], at: float, interval: float,
               lead: int) -> tuple[dict[str, tuple[int, float]], dict[str, int]]:  # fmt: skip
    """The lead each primary sequence needs from its draw rate: ``before`` holds each
    name's (last_value, time) of the previous round. A sequence that drew at ``r``
    increments a second (over at least ``interval``) needs ``2 * r * interval``: "fewer
    than lead / 2 draws per interval" (module docstring). Only leads above ``lead`` are
    returned. Returns (the new ``before``, the leads)."""
    seen: dict[str, tuple[int, float]] = {}
    leads: dict[str, int] = {}
    for st in map(SequenceState.from_row, now):
        if st.last_value is None:
            continue
        seen[st.qualified] = (st.last_value, at)
        prev = before.get(st.qualified)
        if prev is None or at <= prev[1]:
            continue
        drawn = abs(st.last_value - prev[0]) // abs(st.increment)
        need = int(2 * drawn / max(at - prev[1], interval) * interval)
        if need > lead:
            leads[st.qualified] = need
    return seen, leads


class SequenceSync:
    """Keeps one database's sequences on the secondary ahead of the primary's.

    ``open_primary`` and ``open_secondary`` open an authenticated session on each server
    (like ``App._open_redo_session``); ``interval`` is the seconds between rounds, ``lead``
    the increments the secondary is set ahead, ``round_timeout`` the seconds one round may
    take before its sessions are dropped and reopened. Attributes are for metrics.
    """

    def __init__(
        self,
        open_primary: Callable[[], Awaitable[BackendSession]],
        open_secondary: Callable[[], Awaitable[BackendSession]],
        *,
        interval: float = 1.0,
        lead: int = 1000,
        round_timeout: float = 10.0,
    ) -> None:
        if lead < 1:
            raise ValueError(f"lead must be at least 1, not {lead}")
        self.open_primary = open_primary
        self.open_secondary = open_secondary
        self.interval = interval
        self.lead = lead
        self.round_timeout = round_timeout
        #: completed rounds
        self.rounds = 0
        #: setvals that moved a secondary sequence, in total
        self.advanced = 0
        #: failed rounds (a server unreachable or refusing, a query failing, a timeout)
        self.errors = 0
        #: time.time() at the end of the last completed round (0.0 before the first)
        self.last_sync = 0.0
        #: both sessions are open
        self.connected = False
        #: primary sequences the secondary lacks, as of the last round
        self.missing = 0
        #: primary sequences the user may not read, as of the last round
        self.unreadable = 0
        self._primary: BackendSession | None = None
        self._secondary: BackendSession | None = None
        self._warned: dict[str, frozenset[str]] = {}
        #: each primary sequence's (last_value, time) at the last round: its draw rate
        self._drawn: dict[str, tuple[int, float]] = {}
        #: the smallest margin (increments ahead) seen before a round moved a sequence
        self.min_margin: int | None = None
        #: the largest lead the draw rates asked for in the last round
        self.max_lead = lead

    def close(self) -> None:
        """Close both sessions (the next round opens them again)."""
        for session in (self._primary, self._secondary):
            if session is not None:
                session.close()
        self._primary = self._secondary = None
        self.connected = False

    async def sync_once(self) -> int:
        """Run one round (opening the sessions first if need be); return the number of
        secondary sequences it moved forward.

        Raises what opening a session raises, :class:`~connmgr.errors.ClientError` with the
        server's SQLSTATE if a query fails (the sessions stay open), and PeerClosed or
        stream errors if a server goes away (the sessions are closed). Cancelling it closes
        the sessions too: their state is then unknown.
        """
        try:
            if self._primary is None:
                self._primary = await self.open_primary()
            if self._secondary is None:
                self._secondary = await self.open_secondary()
            self.connected = True
            primary = await self._primary.query_rows(_READ)
            secondary = await self._secondary.query_rows(_READ)
            self._drawn, leads = draw_leads(self._drawn, primary, time.monotonic(), self.interval, self.lead)
            p = plan(primary, secondary, self.lead, leads)
            self.max_lead = max(leads.values(), default=self.lead)
            if p.min_margin is not None and self.rounds:  # the first round sets them from scratch
                if self.min_margin is None or p.min_margin < self.min_margin:
                    self.min_margin = p.min_margin
                    if p.min_margin <= 0:
                        log.warning("a sequence of the secondary was not ahead of the primary's (margin %d"
                                    " increments): after a failover before the next round, an insert could"
                                    " draw a key the primary used; raise [poster] sequence_lead or lower"
                                    " sequence_interval", p.min_margin)  # fmt: skip
            moved = 0
            if p.advances:
                request = m.query(";\n".join(a.sql() for a in p.advances))
                for new, old, called in await self._secondary.query_rows(request):
                    if (new, called) != (old, b"t"):
                        moved += 1
        except ClientError as e:
            if isinstance(e, PeerClosed | BackendUnavailable | BackendRejected):
                self.close()
            raise
        except BaseException:
            self.close()
            raise
        self._note("missing on the secondary", p.missing)
        self._note("not readable on the primary (grant SELECT on it)", p.unreadable)
        self.missing, self.unreadable = len(p.missing), len(p.unreadable)
        self.rounds += 1
        self.advanced += moved
        self.last_sync = time.time()
        return moved

    def _note(self, what: str, names: tuple[str, ...]) -> None:
        """Log each name once (again if it went away and came back)."""
        current = frozenset(names)
        for name in sorted(current - self._warned.get(what, frozenset())):
            log.warning("sequence sync: sequence %s is %s; it is not kept ahead", name, what)
        self._warned[what] = current

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run rounds every ``interval`` s until cancelled; never raises anything else.

        ``task_status.started()`` at once. A failed round is retried after 1 s (sessions
        reopened if they were lost); the first failure of an outage is logged as a
        warning, the recovery as info.
        """
        task_status.started()
        outage = Outage(log, "sequence sync", again="working again")
        try:
            while True:
                try:
                    with trio.fail_after(self.round_timeout):
                        await self.sync_once()
                except Exception as e:  # a server refusing or gone, a query failing, TooSlowError
                    self.errors += 1
                    timed_out = isinstance(e, trio.TooSlowError)
                    outage.failure(f"no answer in {self.round_timeout:g} s" if timed_out else e)
                    await outage.back_off()
                    continue
                outage.success()
                await trio.sleep(self.interval)
        finally:
            self.close()


#: every sequence owned by a column (serial, identity) of an ordinary or partitioned table:
#: sequence, table, column, increment, min and max
_OWNED = m.query(
    "SELECT s.oid::regclass::text, c.oid::regclass::text, pg_catalog.quote_ident(a.attname),"
    " q.seqincrement, q.seqmin, q.seqmax"
    " FROM pg_catalog.pg_depend d"
    " JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
    " JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.oid"
    " JOIN pg_catalog.pg_class c ON c.oid = d.refobjid AND c.relkind IN ('r', 'p')"
    " JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid"
    " WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass"
    " AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.deptype IN ('a', 'i')"
)


def past_columns_sql(rows: Sequence[Row], lead: int) -> str:
    """One Query that sets each owned sequence of ``rows`` (from ``_OWNED``) ``lead``
    increments past the largest value (the smallest, descending) in its column, never
    lowering it and clamped to its bounds; each statement returns the sequence's new value."""
    out = []
    for seq, table, column, inc, lo, hi in rows:
        seq_s, table_s, col_s = seq.decode(), table.decode(), column.decode()
        step = int(inc)
        # ascending: max of the column, never lower, at most the maximum; descending: mirrored
        top, ahead, clamp, bound = ("max", "GREATEST", "LEAST", int(hi)) if step > 0 else ("min", "LEAST", "GREATEST", int(lo))
        target = f"(SELECT {top}({col_s})::numeric FROM {table_s}) + {step * lead}"
        value = f"{clamp}({bound}, {ahead}(COALESCE({target}, last_value), last_value))"
        out.append(f"SELECT pg_catalog.setval({quote_literal(seq_s)}, {value}::bigint, true) FROM {seq_s}")
    return ";".join(out)


async def set_past_columns(session: BackendSession, lead: int) -> int:
    """At the point of failure, on the survivor (every committed row is there): set every
    sequence owned by a column past the largest value in its column plus ``lead``
    increments, so no insert after the move draws a key the dead primary handed out.
    Returns how many sequences there are."""
    rows = await session.query_rows(_OWNED)
    if rows:
        await session.query_rows(m.query(past_columns_sql(rows, lead)))
    return len(rows)
