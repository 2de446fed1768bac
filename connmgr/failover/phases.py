"""The phases of the failover, as one state machine (no I/O).

::

    ARMED ──suspect──▶ DECIDING ──alive / failed──▶ ARMED
      │                   │
      │                   └──moved──▶ MOVED ──reseed──▶ RESEEDING ──rearmed──▶ ARMED
      │                                 ▲                   │
      │                                 └───reseed_failed───┘
      └──switchover──▶ DRAINING ──fenced──▶ SWITCHING ──moved──▶ MOVED
                          │                    │
                          └──abandoned──▶ ARMED ◀──failed──┘

* **ARMED**: the pair is whole; the primary is watched (the redo monitor, lost backends).
* **DECIDING**: a sign of the primary's death; its replies are held from clients while
  one probe decides, then the point of failure is made on the secondary.
* **DRAINING**: a planned switchover pauses client input at request boundaries, then
  commits a fence; **SWITCHING**: its decision, without a probe.
* **MOVED**: the secondary is the primary; sessions move there. The old primary waits to
  be re-seeded (**RESEEDING**), after which the pair is armed the other way round.

:func:`next_phase` is the whole table; an event a phase does not take raises
:class:`PhaseError` naming both.
"""

from __future__ import annotations

import enum

__all__ = ["FailoverError", "FailoverEvent", "FailoverPhase", "PhaseError", "TRANSITIONS", "next_phase"]


class FailoverPhase(enum.StrEnum):
    ARMED = "armed"
    DECIDING = "deciding"
    DRAINING = "draining"
    SWITCHING = "switching"
    MOVED = "moved"
    RESEEDING = "reseeding"


class FailoverEvent(enum.StrEnum):
    SUSPECT = "suspect"  #: a lost backend, a stale redo monitor, a failed login
    SWITCHOVER = "switchover"  #: SWITCHOVER on the admin console, or fail-back "return"
    FENCED = "fenced"  #: the drained switchover's fence commit is applied on the secondary
    ALIVE = "alive"  #: the probe was answered: a false alarm
    FAILED = "failed"  #: the secondary could not be made ready (or the decision was cut short)
    ABANDONED = "abandoned"  #: the switchover's drain or fence did not succeed
    MOVED = "moved"  #: the point of failure is made: the secondary is the primary
    RESEED = "reseed"  #: re-seeding the old primary as the new secondary begins
    RESEED_FAILED = "reseed failed"
    REARMED = "rearmed"  #: the pair is whole again, turned around


P, E = FailoverPhase, FailoverEvent

#: phase -> {event: next phase}
TRANSITIONS: dict[FailoverPhase, dict[FailoverEvent, FailoverPhase]] = {
    P.ARMED: {E.SUSPECT: P.DECIDING, E.SWITCHOVER: P.DRAINING},
    P.DECIDING: {E.ALIVE: P.ARMED, E.FAILED: P.ARMED, E.MOVED: P.MOVED},
    P.DRAINING: {E.FENCED: P.SWITCHING, E.ABANDONED: P.ARMED},
    P.SWITCHING: {E.FAILED: P.ARMED, E.MOVED: P.MOVED},
    P.MOVED: {E.RESEED: P.RESEEDING},
    P.RESEEDING: {E.RESEED_FAILED: P.MOVED, E.REARMED: P.ARMED},
}

del P, E


class FailoverError(Exception):
    """The secondary could not be made ready, or a switchover or re-seed not done (the
    message says why). Internal: a client never gets it as such -- a session waiting for
    its move gets :class:`~connmgr.failover.session_move.NotMovable` (08006), the admin
    console 55000 (object_not_in_prerequisite_state)."""


class PhaseError(RuntimeError):
    """Internal (a bug in connmgr, never a client's doing): an event the phase does not take."""

    def __init__(self, phase: FailoverPhase, event: FailoverEvent) -> None:
        allowed = ", ".join(f"'{e}'" for e in TRANSITIONS[phase]) or "none"
        super().__init__(f"failover: event '{event}' is not allowed in phase '{phase}' (it takes {allowed})")
        self.phase = phase
        self.event = event


def next_phase(phase: FailoverPhase, event: FailoverEvent) -> FailoverPhase:
    """The phase ``event`` leads to from ``phase``; raises :class:`PhaseError` if none."""
    try:
        return TRANSITIONS[phase][event]
    except KeyError:
        raise PhaseError(phase, event) from None
