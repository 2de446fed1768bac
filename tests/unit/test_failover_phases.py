"""The failover's phase table (connmgr/failover/phases.py): complete, connected, and
loud about what it does not take."""

from __future__ import annotations

import pytest

from connmgr.failover.phases import (
    TRANSITIONS,
    FailoverEvent,
    FailoverPhase,
    PhaseError,
    next_phase,
)

P, E = FailoverPhase, FailoverEvent


def test_a_failure_a_move_and_the_way_back():
    path = [E.SUSPECT, E.MOVED, E.RESEED, E.RESEED_FAILED, E.RESEED, E.REARMED]
    phase, seen = P.ARMED, []
    for event in path:
        phase = next_phase(phase, event)
        seen.append(phase)
    assert seen == [P.DECIDING, P.MOVED, P.RESEEDING, P.MOVED, P.RESEEDING, P.ARMED]


def test_a_switchover_drains_then_decides_without_probe():
    assert next_phase(P.ARMED, E.SWITCHOVER) is P.DRAINING
    assert next_phase(P.DRAINING, E.FENCED) is P.SWITCHING
    assert next_phase(P.SWITCHING, E.MOVED) is P.MOVED
    assert next_phase(P.DRAINING, E.ABANDONED) is P.ARMED
    assert next_phase(P.SWITCHING, E.FAILED) is P.ARMED


@pytest.mark.parametrize("phase", list(P))
@pytest.mark.parametrize("event", list(E))
def test_every_pair_is_a_transition_or_an_error_naming_both(phase, event):
    if event in TRANSITIONS[phase]:
        assert next_phase(phase, event) is TRANSITIONS[phase][event]
        return
    with pytest.raises(PhaseError) as raised:
        next_phase(phase, event)
    assert f"'{event}'" in str(raised.value) and f"'{phase}'" in str(raised.value)
    assert (raised.value.phase, raised.value.event) == (phase, event)


def test_every_phase_is_reached_and_every_phase_leads_back_to_armed():
    def reachable(start):
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()].values():
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert reachable(P.ARMED) == set(P)
    assert all(P.ARMED in reachable(p) for p in P if p is not P.ARMED)
    assert set(TRANSITIONS) == set(P)
