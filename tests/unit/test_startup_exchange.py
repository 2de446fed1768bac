"""replay/startup_exchange.py and connmgr.auth.scram.recover_client_key: host B recovers
a SCRAM client's ClientKey from the start of its connection as the frames showed it."""

from __future__ import annotations

import pytest

from connmgr.auth.scram import ScramClient, ScramServer, ScramVerifier, recover_client_key
from replay.startup_exchange import sasl_exchange
from shadow import messages as m

VERIFIER = ScramVerifier.from_password("s3cret", iterations=4096)


def conversation(*, ssl_refused: bool = False, first_apart: bool = False) -> tuple[bytes, bytes, bytes]:
    """A real exchange between a client and a server that checks it, as bytes on the
    wire: (client stream, server stream, the ClientKey the server recovered)."""
    client, server = ScramClient(password="s3cret"), ScramServer("alice", VERIFIER)
    c, s = bytearray(), bytearray()
    if ssl_refused:
        c += (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
        s += b"N"
    c += m.startup_message({"user": "alice", "database": "app"})
    s += m.AuthenticationSASL(("SCRAM-SHA-256",)).encode()
    mechanism, first = client.initial()
    if first_apart:
        c += m.sasl_initial_response(mechanism, None)
        s += m.AuthenticationSASLContinue(b"").encode()
        c += m.sasl_response(first)
    else:
        c += m.sasl_initial_response(mechanism, first)
    server_first = server.client_first(mechanism, first)
    s += m.AuthenticationSASLContinue(server_first).encode()
    final = client.handle_continue(server_first)
    c += m.sasl_response(final)
    s += m.AuthenticationSASLFinal(server.client_final(final)).encode() + m.AuthenticationOk().encode()
    c += m.query("SELECT 1")  # the session goes on: not part of the exchange
    return bytes(c), bytes(s), server.client_key


@pytest.mark.parametrize("variant", [{}, {"ssl_refused": True}, {"first_apart": True}])
def test_the_client_key_comes_back_from_the_frames(variant):
    c, s, key = conversation(**variant)
    ex = sasl_exchange(c, s)
    assert ex is not None and ex.mechanism == "SCRAM-SHA-256"
    assert recover_client_key("alice", VERIFIER, ex.mechanism, ex.client_first, ex.server_first,
                              ex.client_final) == key  # fmt: skip


def test_another_verifier_or_a_tampered_proof_gives_nothing():
    c, s, _key = conversation()
    ex = sasl_exchange(c, s)
    other = ScramVerifier.from_password("s3cret", iterations=4096)  # another salt
    assert recover_client_key("alice", other, ex.mechanism, ex.client_first, ex.server_first, ex.client_final) is None
    proof_at = ex.client_final.index(b",p=") + 3
    tampered = ex.client_final[:proof_at] + (b"A" if ex.client_final[proof_at:proof_at + 1] != b"A" else b"B") \
        + ex.client_final[proof_at + 1:]  # fmt: skip
    assert recover_client_key("alice", VERIFIER, ex.mechanism, ex.client_first, ex.server_first, tampered) is None


def test_what_is_not_plain_scram_gives_nothing():
    c, s, _key = conversation()
    assert sasl_exchange(c[:40], s) is None  # cut short
    tls = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    assert sasl_exchange(tls + c, b"S" + s) is None  # TLS accepted: encrypted from here
    md5 = m.startup_message({"user": "alice"}) + b"p\0\0\0\x28md5" + b"0" * 32 + b"\0"
    assert sasl_exchange(md5, b"R\0\0\0\x0c\0\0\0\x05salt") is None
