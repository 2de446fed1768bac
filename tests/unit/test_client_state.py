"""A client connection's life as one enum with a transition table (connmgr/proxy/client.py)."""

from __future__ import annotations

import pytest

from connmgr.proxy.client import CLIENT_TRANSITIONS, ClientConnection, ClientState


def test_every_state_has_its_transitions_and_closing_is_the_end():
    assert set(CLIENT_TRANSITIONS) == set(ClientState)
    assert CLIENT_TRANSITIONS[ClientState.CLOSING] == frozenset()
    assert all(ClientState.CLOSING in nxt for s, nxt in CLIENT_TRANSITIONS.items() if s is not ClientState.CLOSING)


@pytest.mark.parametrize("path, bad", [
    ([ClientState.ACTIVE], ClientState.ADMIN),
    ([ClientState.ADMIN], ClientState.ACTIVE),
    ([ClientState.CLOSING], ClientState.ACTIVE),
    ([ClientState.ACTIVE, ClientState.CLOSING], ClientState.HANDSHAKE),
])  # fmt: skip
def test_an_illegal_transition_names_both_states(path, bad):
    conn = ClientConnection.__new__(ClientConnection)  # the state machine alone, no stream
    conn.id, conn._state = 7, ClientState.HANDSHAKE
    for state in path:
        conn.state = state
    with pytest.raises(RuntimeError, match=f"client 7: no transition from {path[-1]} to {bad}"):
        conn.state = bad
    assert conn.state is path[-1]
    assert str(ClientState.ACTIVE) == "active"  # what SHOW CLIENTS prints
