"""connmgr.auth: SCRAM-SHA-256 (both sides), MD5, SASLprep, the users file.

Pure tests first; at the end one integration test against a real PostgreSQL (the run's
server binaries, through connmgr.embedded.clusters): our client against the real backend,
and libpq (psycopg) against our server using the verifier the backend stored.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import socket
import struct
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from connmgr.auth import (
    AuthError,
    ScramClient,
    ScramServer,
    ScramVerifier,
    UserSecret,
    UsersFileError,
    load_users_file,
    md5_check,
    md5_hash,
    md5_response,
    parse_users_text,
    saslprep,
    scram_server_for,
    secret_from_rolpassword,
)
from connmgr.auth import scram as scram_mod
from connmgr.auth.md5 import is_md5_hash
from connmgr.embedded.clusters import Cluster

# --------------------------------------------------------------------------- RFC 7677

RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_rfc7677_client_side():
    client = ScramClient(password="pencil", nonce=RFC_CLIENT_NONCE, user="user")
    assert client.initial() == ("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    assert client.handle_continue(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert client.handle_final(RFC_SERVER_FINAL) is None
    assert client.done


def test_rfc7677_server_side():
    verifier = ScramVerifier.from_password("pencil", salt=RFC_SALT, iterations=4096)
    server = ScramServer("user", verifier, nonce=RFC_SERVER_NONCE)
    assert server.client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.done
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    assert server.client_key == hmac.digest(salted, b"Client Key", "sha256")


def test_rfc7677_server_rejects_tampered_proof():
    verifier = ScramVerifier.from_password("pencil", salt=RFC_SALT)
    server = ScramServer("user", verifier, nonce=RFC_SERVER_NONCE)
    server.client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    bad = RFC_CLIENT_FINAL.replace(b"p=dHzb", b"p=dHzc")
    with pytest.raises(AuthError) as e:
        server.client_final(bad)
    assert e.value.sqlstate == "28P01"
    assert server.client_key is None


# --------------------------------------------------------------------------- round trips


def _exchange(client: ScramClient, server: ScramServer) -> None:
    mech, first = client.initial()
    final = client.handle_continue(server.client_first(mech, first))
    client.handle_final(server.client_final(final))


@pytest.mark.parametrize("password", ["secret", "pässwörd", "a\u00a0b", "\ue000bad", "\x07ctl"])
def test_round_trip(password):
    verifier = ScramVerifier.from_password(password, iterations=64)
    server = ScramServer("alice", verifier)
    client = ScramClient(password=password)
    _exchange(client, server)
    assert client.done and server.done
    salted = hashlib.pbkdf2_hmac(
        "sha256", saslprep(password).encode(), verifier.salt, verifier.iterations
    )
    assert server.client_key == hmac.digest(salted, b"Client Key", "sha256")


def test_libpq_style_client_first_without_user_name():
    client = ScramClient(password="x", nonce="abc")
    assert client.initial() == ("SCRAM-SHA-256", b"n,,n=,r=abc")


def test_client_escapes_user_name():
    client = ScramClient(password="x", nonce="abc", user="a=b,c")
    assert client.initial()[1] == b"n,,n=a=3Db=2Cc,r=abc"


def test_server_accepts_y_flag_and_checks_its_binding():
    verifier = ScramVerifier.from_password("pw", iterations=16)
    server = ScramServer("u", verifier, nonce="SRV")
    server.client_first("SCRAM-SHA-256", b"y,,n=,r=CLI")
    client_key = hmac.digest(
        hashlib.pbkdf2_hmac("sha256", b"pw", verifier.salt, 16), b"Client Key", "sha256"
    )
    without_proof = "c=eSws,r=CLISRV"
    auth = f"n=,r=CLI,r=CLISRV,s={base64.b64encode(verifier.salt).decode()},i=16,{without_proof}"
    sig = hmac.digest(hashlib.sha256(client_key).digest(), auth.encode(), "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    out = server.client_final(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())
    assert out.startswith(b"v=")


def test_wrong_password_is_28p01():
    verifier = ScramVerifier.from_password("right", iterations=32)
    server = ScramServer("alice", verifier)
    client = ScramClient(password="wrong")
    mech, first = client.initial()
    final = client.handle_continue(server.client_first(mech, first))
    with pytest.raises(AuthError) as e:
        server.client_final(final)
    assert e.value.sqlstate == "28P01"
    assert str(e.value) == 'password authentication failed for user "alice"'
    assert "wrong" not in repr(e.value)
    assert server.client_key is None
    with pytest.raises(RuntimeError):  # the exchange is over
        server.client_final(final)


def test_out_of_order_calls_are_local_errors():
    server = ScramServer("u", None)
    with pytest.raises(RuntimeError, match="client_final"):
        server.client_final(b"c=biws,r=x,p=AAAA")
    client = ScramClient(password="x")
    with pytest.raises(RuntimeError):
        client.handle_continue(b"r=x,s=AAAA,i=1")
    client.initial()
    with pytest.raises(RuntimeError):
        client.initial()
    with pytest.raises(RuntimeError):
        client.handle_final(b"v=AAAA")


# --------------------------------------------------------------------------- malformed input

_PV, _NS = "08P01", "0A000"


@pytest.mark.parametrize(
    ("mechanism", "data", "sqlstate", "text"),
    [
        ("SCRAM-SHA-256-PLUS", b"n,,n=,r=abc", _PV, "invalid SASL authentication mechanism"),
        ("MD5", b"n,,n=,r=abc", _PV, "invalid SASL authentication mechanism"),
        ("SCRAM-SHA-256", b"", _PV, "The message is empty."),
        ("SCRAM-SHA-256", b"n,,n=,r=abc\x00", _PV, "length does not match"),
        ("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc", _PV, "includes channel binding"),
        ("SCRAM-SHA-256", b"x,,n=,r=abc", _PV, 'Unexpected channel-binding flag "x"'),
        ("SCRAM-SHA-256", b"n", _PV, "Comma expected, but found end of message"),
        ("SCRAM-SHA-256", b"n,a=bob,n=,r=abc", _NS, "authorization identity"),
        ("SCRAM-SHA-256", b"n,x,n=,r=abc", _PV, 'Unexpected attribute "x"'),
        ("SCRAM-SHA-256", b"n,,m=ext,n=,r=abc", _NS, "unsupported SCRAM extension"),
        ("SCRAM-SHA-256", b"n,,r=abc", _PV, 'Expected attribute "n" but found "r"'),
        ("SCRAM-SHA-256", b"n,,n=", _PV, 'Expected attribute "r" but found end of message'),
        ("SCRAM-SHA-256", b"n,,n,r=abc", _PV, 'Expected character "=" for attribute "n"'),
        ("SCRAM-SHA-256", b"n,,n=,r=", _PV, "non-printable characters in SCRAM nonce"),
        ("SCRAM-SHA-256", b"n,,n=,r=a b", _PV, "non-printable characters in SCRAM nonce"),
        ("SCRAM-SHA-256", b"n,,n=,r=ab\xc3\xa9", _PV, "non-printable characters in SCRAM nonce"),
        ("SCRAM-SHA-256", b"n,,n=,r=abc,1=x", _PV, 'invalid character "1"'),
    ],
)
def test_malformed_client_first(mechanism, data, sqlstate, text):
    server = ScramServer("u", ScramVerifier.from_password("pw", iterations=16))
    with pytest.raises(AuthError) as e:
        server.client_first(mechanism, data)
    assert e.value.sqlstate == sqlstate
    assert text in f"{e.value} {e.value.detail}"


def test_client_first_extensions_are_ignored():
    server = ScramServer("u", ScramVerifier.from_password("pw", iterations=16), nonce="S")
    assert server.client_first("SCRAM-SHA-256", b"n,,n=whoever,r=C,x=ext").startswith(b"r=CS,")


def _server_after_first() -> ScramServer:
    server = ScramServer("u", ScramVerifier.from_password("pw", iterations=16), nonce="SRV")
    server.client_first("SCRAM-SHA-256", b"n,,n=,r=CLI")
    return server


_PROOF = base64.b64encode(b"\x01" * 32)


@pytest.mark.parametrize(
    ("data", "sqlstate", "text"),
    [
        (b"", _PV, "The message is empty."),
        (b"r=CLISRV,p=" + _PROOF, _PV, 'Expected attribute "c" but found "r"'),
        (b"c=eSws,r=CLISRV,p=" + _PROOF, _PV, "unexpected SCRAM channel-binding attribute"),
        (b"c=biws,r=CLIXXX,p=" + _PROOF, _PV, "Nonce does not match."),
        (b"c=biws,r=CLI,p=" + _PROOF, _PV, "Nonce does not match."),
        (b"c=biws,r=CLISRV,p=!!!!", _PV, "Malformed proof"),
        (b"c=biws,r=CLISRV,p=" + base64.b64encode(b"x" * 31), _PV, "Malformed proof"),
        (b"c=biws,r=CLISRV,p=" + _PROOF + b",x=1", _PV, "Garbage found at the end"),
        (b"c=biws,r=CLISRV,p=" + _PROOF + b",", _PV, "Garbage found at the end"),
        (b"c=biws,r=CLISRV", _PV, "Attribute expected, but found end of client-final-message"),
        (b"c=biws,r=CLISRV,p=" + _PROOF, "28P01", "password authentication failed"),
        (b"c=biws,r=CLISRV,x=ext,p=" + _PROOF, "28P01", "password authentication failed"),
    ],
)
def test_malformed_client_final(data, sqlstate, text):
    server = _server_after_first()
    with pytest.raises(AuthError) as e:
        server.client_final(data)
    assert e.value.sqlstate == sqlstate
    assert text in f"{e.value} {e.value.detail}"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_garbage_only_raises_auth_error(first, final):
    """Whatever a client sends, the server answers with AuthError, never a crash."""
    server = ScramServer("u", ScramVerifier.from_password("pw", iterations=4))
    try:
        server.client_first("SCRAM-SHA-256", first)
    except AuthError:
        return
    with pytest.raises(AuthError):
        server.client_final(final)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_client_garbage_only_raises_auth_error(first, final):
    """Whatever a backend sends, the client raises AuthError, never a crash."""
    client = ScramClient(password="pw", nonce="C", max_iterations=64)
    client.initial()
    try:
        client.handle_continue(b"r=C" + first)
    except AuthError:
        return
    with pytest.raises(AuthError):
        client.handle_final(final)


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_round_trip_property(password, other):
    verifier = ScramVerifier.from_password(password, iterations=2)
    _exchange(ScramClient(password=password), ScramServer("u", verifier))
    if saslprep(other) != saslprep(password):
        with pytest.raises(AuthError) as e:
            _exchange(ScramClient(password=other), ScramServer("u", verifier))
        assert e.value.sqlstate == "28P01"


# --------------------------------------------------------------------------- client errors


def _client_after_initial(**kw) -> ScramClient:
    client = ScramClient(password="pw", nonce="CLI", **kw)
    client.initial()
    return client


@pytest.mark.parametrize(
    ("server_first", "sqlstate", "text"),
    [
        (b"r=XYZSRV,s=AAAA,i=4096", _PV, "nonce mismatch"),
        (b"r=CLI,s=AAAA,i=4096", _PV, "nonce mismatch"),  # server added nothing
        (b"r=CLI SRV,s=AAAA,i=4096", _PV, "nonce mismatch"),
        (b"r=CLISRV,s=!!!,i=4096", _PV, "Invalid salt"),
        (b"r=CLISRV,s=,i=4096", _PV, "Invalid salt"),
        (b"r=CLISRV,s=AAAA,i=0", _PV, "outside 1..10000000"),
        (b"r=CLISRV,s=AAAA,i=10000001", _PV, "outside 1..10000000"),
        (b"r=CLISRV,s=AAAA,i=-5", _PV, "Invalid iteration count"),
        (b"r=CLISRV,s=AAAA,i=4k", _PV, "Invalid iteration count"),
        (b"r=CLISRV,i=4096", _PV, 'Expected attribute "s" but found "i"'),
        (b"m=ext,r=CLISRV,s=AAAA,i=1", _NS, "unsupported SCRAM extension"),
        (b"", _PV, "empty"),
    ],
)
def test_client_rejects_bad_server_first(server_first, sqlstate, text):
    client = _client_after_initial()
    with pytest.raises(AuthError) as e:
        client.handle_continue(server_first)
    assert e.value.sqlstate == sqlstate
    assert text in f"{e.value} {e.value.detail}"


def test_client_iteration_cap_is_configurable():
    client = _client_after_initial(max_iterations=100)
    with pytest.raises(AuthError, match="malformed"):
        client.handle_continue(b"r=CLISRV,s=AAAA,i=101")


@pytest.mark.parametrize(
    ("server_final", "sqlstate", "text"),
    [
        (b"e=invalid-proof", "28P01", "invalid proof"),
        (b"e=other-error", "28000", "other-error"),
        (b"v=" + base64.b64encode(b"\x00" * 32), "28000", "incorrect server signature"),
        (b"v=abc", _PV, "Invalid server signature"),
        (b"x=1", _PV, 'Expected attribute "v"'),
    ],
)
def test_client_rejects_bad_server_final(server_final, sqlstate, text):
    client = _client_after_initial()
    client.handle_continue(b"r=CLISRV,s=AAAA,i=16")
    with pytest.raises(AuthError) as e:
        client.handle_final(server_final)
    assert e.value.sqlstate == sqlstate
    assert text in f"{e.value} {e.value.detail}"
    assert not client.done


def test_client_constructor_checks():
    with pytest.raises(ValueError):
        ScramClient()
    with pytest.raises(ValueError):
        ScramClient(password="x", client_key=b"k" * 32, server_key=b"k" * 32)
    with pytest.raises(ValueError):
        ScramClient(client_key=b"k" * 32)
    with pytest.raises(ValueError):
        ScramClient(client_key=b"k" * 31, server_key=b"k" * 32)
    with pytest.raises(ValueError):
        ScramClient(password="x", nonce="has,comma")
    with pytest.raises(ValueError):
        ScramServer("u", None, nonce="")


def test_pbkdf2_is_cached():
    salt = os.urandom(16)
    before = len(scram_mod._cache)
    ScramVerifier.from_password("cache me", salt=salt, iterations=1000)
    key = next(reversed(scram_mod._cache))
    assert len(scram_mod._cache) in (before + 1, scram_mod._CACHE_SIZE)
    client = ScramClient(password="cache me", nonce="C")
    client.initial()
    client.handle_continue(b"r=CS,s=" + base64.b64encode(salt) + b",i=1000")
    assert next(reversed(scram_mod._cache)) == key  # a hit, moved to the end, not a new entry
    assert all(b"cache me" not in k[0] for k in scram_mod._cache)


# --------------------------------------------------------------------------- unknown users


def test_unknown_user_gets_a_normal_looking_exchange_and_fails_28p01():
    server = ScramServer("ghost", None, nonce="SRV")
    assert server.verifier is None
    client = ScramClient(password="whatever", nonce="CLI")
    mech, first = client.initial()
    server_first = server.client_first(mech, first).decode()
    parts = dict(p.split("=", 1) for p in server_first.split(","))
    assert list(parts) == ["r", "s", "i"]
    assert parts["r"] == "CLISRV"
    assert len(base64.b64decode(parts["s"])) == 16
    assert parts["i"] == "4096"
    final = client.handle_continue(server_first.encode())
    with pytest.raises(AuthError) as e:
        server.client_final(final)
    assert e.value.sqlstate == "28P01"
    assert str(e.value) == 'password authentication failed for user "ghost"'


def _server_first_salt(server: ScramServer) -> bytes:
    out = server.client_first("SCRAM-SHA-256", b"n,,n=,r=C").decode()
    return base64.b64decode(out.split(",")[1][2:])


def test_mock_salt_is_deterministic_per_user_and_key():
    assert _server_first_salt(ScramServer("ghost", None)) == _server_first_salt(
        ScramServer("ghost", None)
    )
    assert _server_first_salt(ScramServer("ghost", None)) != _server_first_salt(
        ScramServer("spook", None)
    )
    key = b"k" * 32
    a = _server_first_salt(ScramServer("ghost", None, mock_key=key))
    assert a == _server_first_salt(ScramServer("ghost", None, mock_key=key))
    assert a == scram_mod.derived_salt("ghost", key=key)
    assert a != _server_first_salt(ScramServer("ghost", None))


# --------------------------------------------------------------------------- pass-through


def test_pass_through_client_key():
    verifier = ScramVerifier.from_password("hunter2", iterations=128)
    front = ScramServer("bob", verifier)
    client = ScramClient(password="hunter2")
    _exchange(client, front)
    salted = hashlib.pbkdf2_hmac("sha256", b"hunter2", verifier.salt, 128)
    assert front.client_key == hmac.digest(salted, b"Client Key", "sha256")

    # connmgr logs in to a backend holding the same verifier, without the password.
    relay = ScramClient(client_key=front.client_key, server_key=front.verifier.server_key)
    backend = ScramServer("bob", ScramVerifier.parse(verifier.to_text()))
    _exchange(relay, backend)
    assert relay.done and backend.done

    # A backend with another verifier (another salt) for the same password refuses it.
    other = ScramVerifier.from_password("hunter2", iterations=128)
    relay = ScramClient(client_key=front.client_key, server_key=front.verifier.server_key)
    with pytest.raises(AuthError) as e:
        _exchange(relay, ScramServer("bob", other))
    assert e.value.sqlstate == "28P01"


# --------------------------------------------------------------------------- verifier text


def test_verifier_text_round_trip():
    v = ScramVerifier.from_password("pencil", salt=RFC_SALT, iterations=4096)
    text = v.to_text()
    assert text.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert ScramVerifier.parse(text) == v
    assert v.check_password("pencil") and not v.check_password("pencil!")
    assert "stored_key" not in repr(v) and "server_key" not in repr(v)
    with pytest.raises(AttributeError):
        v.iterations = 1  # type: ignore[misc]


_K = base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("md5abc", "does not start with 'SCRAM-SHA-256$'"),
        ("scram-sha-256$4096:AAAA$" + _K + ":" + _K, "does not start with"),
        ("SCRAM-SHA-256$4096:AAAA", "expected 'SCRAM-SHA-256$<iterations>"),
        ("SCRAM-SHA-256$4096:AAAA$" + _K + ":" + _K + "$x", "expected 'SCRAM-SHA-256$"),
        ("SCRAM-SHA-256$4096$" + _K + ":" + _K, "expected '<iterations>:<salt>'"),
        ("SCRAM-SHA-256$4096:AAAA$" + _K, "expected '<StoredKey>:<ServerKey>'"),
        ("SCRAM-SHA-256$0:AAAA$" + _K + ":" + _K, "not a positive integer"),
        ("SCRAM-SHA-256$x:AAAA$" + _K + ":" + _K, "not a positive integer"),
        ("SCRAM-SHA-256$-1:AAAA$" + _K + ":" + _K, "not a positive integer"),
        ("SCRAM-SHA-256$4096:A!AA$" + _K + ":" + _K, "salt is not valid"),
        ("SCRAM-SHA-256$4096:$" + _K + ":" + _K, "salt is not valid"),
        ("SCRAM-SHA-256$4096:AAAA$abc:" + _K, "StoredKey is not valid base64"),
        ("SCRAM-SHA-256$4096:AAAA$" + _K + ":" + _K[:-4], "ServerKey must decode to 32 bytes"),
    ],
)
def test_verifier_parse_errors(text, reason):
    with pytest.raises(ValueError) as e:
        ScramVerifier.parse(text)
    assert reason in str(e.value)
    assert _K not in str(e.value)


def test_verifier_field_checks():
    with pytest.raises(ValueError):
        ScramVerifier(0, b"s", b"k" * 32, b"k" * 32)
    with pytest.raises(ValueError):
        ScramVerifier(1, b"", b"k" * 32, b"k" * 32)
    with pytest.raises(ValueError):
        ScramVerifier(1, b"s", b"k" * 31, b"k" * 32)
    with pytest.raises(ValueError):
        ScramVerifier.from_password("x", iterations=0)


# --------------------------------------------------------------------------- SASLprep


@pytest.mark.parametrize(
    ("raw", "prepared"),
    [
        ("user", "user"),  # RFC 4013 section 3 examples
        ("USER", "USER"),
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("\u0007", "\u0007"),  # prohibited, but pure ASCII: Postgres keeps it as is
        ("\u0627\u0031", "\u0627\u0031"),  # bidi violation: unchanged
        ("a\u00a0b", "a b"),  # non-ASCII spaces become U+0020
        ("a\u2003b\u3000c", "a b c"),
        ("a\u200bb", "a b"),  # U+200B is in C.1.2 too; Postgres maps it to a space first
        ("\ufb01x", "fix"),  # ligature, NFKC
        ("p\u00e4ss", "p\u00e4ss"),
        ("pa\u0308ss", "p\u00e4ss"),  # NFKC composes
        ("\ue000abc", "\ue000abc"),  # private use (C.3): unchanged
        ("abc\ufffd", "abc\ufffd"),  # C.6: unchanged
        ("x\u0221", "x\u0221"),  # unassigned in Unicode 3.2: unchanged
        ("\u00ad", "\u00ad"),  # empty after mapping: unchanged
        ("\u0627\u0628", "\u0627\u0628"),  # RandALCat only: fine
        ("\u0627a\u0628", "\u0627a\u0628"),  # RandALCat with LCat: unchanged
        ("\u0627\u0628a", "\u0627\u0628a"),  # RandALCat not last: unchanged
        ("\udc80x", "\udc80x"),  # lone surrogate (C.5): unchanged
    ],
)
def test_saslprep(raw, prepared):
    assert saslprep(raw) == prepared


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_saslprep_never_raises(s):
    assert isinstance(saslprep(s), str)


# --------------------------------------------------------------------------- md5


def test_md5_hash_known_vector():
    assert md5_hash("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"


def test_md5_response_and_check():
    salt = b"\x01\x02\x03\x04"
    expected = "md5" + hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + salt).hexdigest()
    assert md5_response("postgres", "postgres", salt) == expected
    assert md5_response("md53175bce1d3201d16594cebf9d7eb3f9d", "postgres", salt) == expected
    assert md5_check("postgres", "postgres", salt, expected)
    assert md5_check("md53175bce1d3201d16594cebf9d7eb3f9d", "postgres", salt, expected)
    assert not md5_check("postgres", "postgres", b"\x01\x02\x03\x05", expected)
    assert not md5_check("postgres", "other", salt, expected)
    assert not md5_check("postgres", "postgres", salt, "md5" + "0" * 32)
    assert not md5_check("postgres", "postgres", salt, "n\u00e4h")  # non-ASCII: no crash
    assert not md5_check("", "postgres", salt, md5_response("", "postgres", salt))
    with pytest.raises(ValueError):
        md5_response("x", "u", b"123")


def test_is_md5_hash():
    assert is_md5_hash("md53175bce1d3201d16594cebf9d7eb3f9d")
    assert not is_md5_hash("md53175BCE1d3201d16594cebf9d7eb3f9d")  # Postgres: lowercase only
    assert not is_md5_hash("md53175bce1d3201d16594cebf9d7eb3f9")
    assert not is_md5_hash("postgres")


# --------------------------------------------------------------------------- users file

_VERIFIER_TEXT = ScramVerifier.from_password("pencil", salt=RFC_SALT).to_text()

USERS_TEXT = "\n".join(
    [
        "\ufeff; PgBouncer style users file",
        "# another comment",
        '"alice" "plain pass"',
        "",
        '  "bob"\t"md53175bce1d3201d16594cebf9d7eb3f9d"',
        f'"carol" "{_VERIFIER_TEXT}"',
        '"say ""hi""" "pa""ss" "ignored third column"\r',
        '"dave" "" trailing words are ignored too',
        "",
    ]
)


def test_parse_users_text():
    users = parse_users_text(USERS_TEXT)
    assert list(users) == ["alice", "bob", "carol", 'say "hi"', "dave"]
    assert users["alice"] == UserSecret("alice", "plain", "plain pass")
    assert users["bob"].kind == "md5"
    assert users["carol"].kind == "scram"
    assert users['say "hi"'].value == 'pa"ss'
    assert users["dave"].value == ""
    assert "plain pass" not in repr(users["alice"])


def test_users_file_errors_have_exact_text(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text('"a" "b"\n\n"c"\n')
    with pytest.raises(UsersFileError) as e:
        load_users_file(path)
    assert str(e.value) == f"users file {path} line 3: expected two quoted strings"
    assert (e.value.path, e.value.line_no) == (str(path), 3)


@pytest.mark.parametrize(
    ("text", "line_no", "reason"),
    [
        ("alice bob", 1, "expected two quoted strings"),
        ('"alice"', 1, "expected two quoted strings"),
        ('\n\n"alice" bob', 3, "expected two quoted strings"),
        ('"alice" "bob', 1, "unterminated quoted secret"),
        ('"alice "bob"', 1, "expected two quoted strings separated by blanks"),
        ('"alice', 1, "unterminated quoted user name"),
        ('"alice""bob"', 1, "expected two quoted strings"),  # one string: alice"bob
        ('"alice"x "bob"', 1, "expected two quoted strings separated by blanks"),
        ('"" "x"', 1, "empty user name"),
        ('"a" "x"\n; c\n"a" "y"', 3, 'duplicate user "a" (first on line 1)'),
        ('"a" "SCRAM-SHA-256$4096:AAAA"', 1, 'user "a": SCRAM verifier: expected'),
    ],
)
def test_users_text_errors(text, line_no, reason):
    with pytest.raises(UsersFileError) as e:
        parse_users_text(text, source="/x/y.txt")
    assert e.value.line_no == line_no
    assert str(e.value).startswith(f"users file /x/y.txt line {line_no}: {reason}")


def test_users_file_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "users.txt"
    path.write_bytes(b'"a" "b"\n"c" "\xff"\n')
    with pytest.raises(UsersFileError, match="line 2: not valid UTF-8"):
        load_users_file(path)
    with pytest.raises(OSError):
        load_users_file(tmp_path / "missing.txt")


def test_what_each_secret_can_authenticate():
    plain = UserSecret.from_secret("u", "pw")
    md5 = UserSecret.from_secret("u", md5_hash("u", "pw"))
    scram = UserSecret.from_secret("u", _VERIFIER_TEXT)
    empty = UserSecret.from_secret("u", "")
    assert plain.client_methods() == ("scram-sha-256", "md5")
    assert md5.client_methods() == ("md5",)
    assert scram.client_methods() == ("scram-sha-256",)
    assert empty.client_methods() == ()
    # configured md5 with a SCRAM verifier runs SCRAM, like pg_hba.conf "md5"
    assert scram.method_for("md5") == "scram-sha-256"
    assert md5.method_for("scram-sha-256") == "scram-sha-256"  # runs, and fails
    assert plain.method_for("md5") == "md5"

    salt = b"abcd"
    assert plain.check_md5(salt, md5_response("pw", "u", salt))
    assert md5.check_md5(salt, md5_response("pw", "u", salt))
    assert not scram.check_md5(salt, md5_response("pencil", "u", salt))
    assert not empty.check_md5(salt, md5_response("", "u", salt))

    assert scram.verifier() == ScramVerifier.parse(_VERIFIER_TEXT)
    v = plain.verifier()
    assert v == plain.verifier()  # stable salt: the PBKDF2 cache is hit on every login
    assert v.check_password("pw")
    with pytest.raises(ValueError):
        md5.verifier()
    with pytest.raises(ValueError):
        empty.verifier()


@pytest.mark.parametrize("secret", ["pw", "SCRAM"])
def test_scram_server_for_known_users(secret):
    s = UserSecret.from_secret(
        "u", "pw" if secret == "pw" else ScramVerifier.from_password("pw").to_text()
    )
    server = scram_server_for("u", s)
    _exchange(ScramClient(password="pw"), server)
    assert server.done and server.client_key is not None


@pytest.mark.parametrize("secret", [None, UserSecret.from_secret("u", md5_hash("u", "pw"))])
def test_scram_server_for_users_that_cannot_do_scram(secret):
    server = scram_server_for("u", secret)
    assert server.verifier is None
    with pytest.raises(AuthError) as e:
        _exchange(ScramClient(password="pw"), server)
    assert e.value.sqlstate == "28P01"


def test_plaintext_user_and_unknown_user_show_the_same_salt():
    key = b"m" * 32
    known = scram_server_for("u", UserSecret.from_secret("u", "pw"), mock_key=key)
    unknown = scram_server_for("u", None, mock_key=key)
    assert _server_first_salt(known) == _server_first_salt(unknown)


def test_secret_from_rolpassword():
    assert secret_from_rolpassword("u", None) is None
    assert secret_from_rolpassword("u", "") is None
    assert secret_from_rolpassword("u", _VERIFIER_TEXT).kind == "scram"
    assert secret_from_rolpassword("u", md5_hash("u", "x")).kind == "md5"
    with pytest.raises(ValueError):
        secret_from_rolpassword("u", "SCRAM-SHA-256$broken")
    with pytest.raises(ValueError):
        UserSecret("u", "md5", "md5nothex")


def test_auth_error_defaults():
    e = AuthError("nope")
    assert e.sqlstate == "28P01" and e.detail is None and str(e) == "nope"


# =========================================================================== integration

SCRAM_PW = "pencil"
MD5_PW = "md5-secret"
UNI_PW = "P\u00e4ss\u00a0w\u00f6rd\ufb01\u00ad"  # NBSP -> space, ligature -> fi, SHY -> gone
ODD_PW = "odd\ue000pw"  # private use: SASLprep refuses, both sides hash it unchanged


@contextlib.contextmanager
def _auth_cluster(pg_base_dir, pg_bindir) -> Iterator[Cluster]:
    """A throwaway Postgres (the run's server binaries) on 127.0.0.1: md5 for md5_user,
    scram-sha-256 for everyone else; always stopped."""
    cluster = Cluster.create(pg_base_dir, f"auth-{uuid.uuid4().hex[:8]}", bindir=pg_bindir,
                             hba_extra=["host all md5_user 127.0.0.1/32 md5"])  # fmt: skip
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop(mode="immediate")


# Just enough of the v3 protocol, over blocking sockets, for the startup and auth phase.


def _msg(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def _auth(code: int, data: bytes = b"") -> bytes:
    return _msg(b"R", struct.pack("!I", code) + data)


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return buf


def _read_msg(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _exactly(sock, 5)
    return head[:1], _exactly(sock, struct.unpack("!I", head[1:])[0] - 4)


def _error_fields(body: bytes) -> dict[str, str]:
    return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}


def _startup(user: str) -> bytes:
    params = f"user\0{user}\0database\0postgres\0\0".encode()
    return struct.pack("!II", len(params) + 8, 196608) + params


def _login(port: int, user: str, *, scram: ScramClient | None = None, md5: str | None = None):
    """Log in to the real backend by hand; return "ok" or the ErrorResponse's fields."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_startup(user))
        kind, body = _read_msg(sock)
        assert kind == b"R", (kind, body)
        code = struct.unpack("!I", body[:4])[0]
        if scram is not None:
            assert code == 10, code  # AuthenticationSASL
            assert b"SCRAM-SHA-256\0" in body[4:]
            mech, first = scram.initial()
            sock.sendall(_msg(b"p", mech.encode() + b"\0" + struct.pack("!i", len(first)) + first))
            kind, body = _read_msg(sock)
            if kind == b"E":
                return _error_fields(body)
            assert (kind, struct.unpack("!I", body[:4])[0]) == (b"R", 11)  # SASLContinue
            sock.sendall(_msg(b"p", scram.handle_continue(body[4:])))
            kind, body = _read_msg(sock)
            if kind == b"E":
                return _error_fields(body)
            assert (kind, struct.unpack("!I", body[:4])[0]) == (b"R", 12)  # SASLFinal
            scram.handle_final(body[4:])
        else:
            assert md5 is not None and code == 5, code  # AuthenticationMD5Password
            sock.sendall(_msg(b"p", md5_response(md5, user, body[4:8]).encode() + b"\0"))
        kind, body = _read_msg(sock)
        if kind == b"E":
            return _error_fields(body)
        assert (kind, body) == (b"R", b"\0\0\0\0"), (kind, body)  # AuthenticationOk
        while kind != b"Z":
            kind, body = _read_msg(sock)
            assert kind != b"E", _error_fields(body)
        sock.sendall(_msg(b"X", b""))
        return "ok"


class _TinyScramServer:
    """Accepts connections in a thread and speaks startup + SCRAM with our ScramServer."""

    def __init__(self, verifiers: dict[str, ScramVerifier]) -> None:
        self.verifiers = verifiers
        self.results: list[tuple[str, bytes | None, AuthError | None]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _TinyScramServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.listener.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    self._serve(conn)
                except (ConnectionError, TimeoutError):
                    pass

    def _serve(self, conn: socket.socket) -> None:
        while True:
            (length,) = struct.unpack("!I", _exactly(conn, 4))
            body = _exactly(conn, length - 4)
            (code,) = struct.unpack("!I", body[:4])
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                conn.sendall(b"N")
                continue
            assert code == 196608, code
            items = body[4:].split(b"\0")
            params = dict(zip(items[::2], items[1::2], strict=False))
            break
        user = params[b"user"].decode()
        server = ScramServer(user, self.verifiers.get(user))
        conn.sendall(_auth(10, b"".join(m.encode() + b"\0" for m in server.mechanisms) + b"\0"))
        try:
            kind, body = _read_msg(conn)
            assert kind == b"p"
            mech, rest = body.split(b"\0", 1)
            (n,) = struct.unpack("!i", rest[:4])
            conn.sendall(_auth(11, server.client_first(mech.decode(), rest[4 : 4 + n])))
            kind, body = _read_msg(conn)
            assert kind == b"p"
            conn.sendall(_auth(12, server.client_final(body)))
        except AuthError as e:
            fields = [b"SFATAL", b"VFATAL", b"C" + e.sqlstate.encode(), b"M" + str(e).encode()]
            if e.detail:
                fields.append(b"D" + e.detail.encode())
            conn.sendall(_msg(b"E", b"\0".join(fields) + b"\0\0"))
            self.results.append((user, None, e))
            return
        self.results.append((user, server.client_key, None))
        conn.sendall(
            _auth(0)
            + b"".join(
                _msg(b"S", k + b"\0" + v + b"\0")
                for k, v in [
                    (b"server_version", b"15.0"),
                    (b"server_encoding", b"UTF8"),
                    (b"client_encoding", b"UTF8"),
                    (b"DateStyle", b"ISO, MDY"),
                    (b"integer_datetimes", b"on"),
                    (b"standard_conforming_strings", b"on"),
                    (b"TimeZone", b"UTC"),
                ]
            )
            + _msg(b"K", struct.pack("!II", 1234, 5678))
            + _msg(b"Z", b"I")
        )
        with contextlib.suppress(ConnectionError, TimeoutError):
            _read_msg(conn)  # Terminate, or EOF


def _create_role(role: str, password: str) -> sql.Composed:
    # CREATE ROLE takes no bind parameters: quote the password client-side.
    return sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(password)
    )


def _libpq_connect(port: int, user: str, password: str) -> None:
    psycopg.connect(
        host="127.0.0.1", port=port, user=user, password=password, dbname="postgres",
        sslmode="disable", gssencmode="disable", connect_timeout=10,
    ).close()  # fmt: skip


def test_against_real_postgres(pg_base_dir, pg_bindir):
    with _auth_cluster(pg_base_dir, pg_bindir) as cluster:
        port = cluster.port
        with cluster.connect() as admin:
            admin.execute("SET password_encryption = 'scram-sha-256'")
            for role, pw in (("scram_user", SCRAM_PW), ("uni_user", UNI_PW), ("odd_user", ODD_PW)):
                admin.execute(_create_role(role, pw))
            admin.execute("SET password_encryption = 'md5'")
            admin.execute(_create_role("md5_user", MD5_PW))
            rows = admin.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolcanlogin")
            stored = {name: secret_from_rolpassword(name, pw) for name, pw in rows.fetchall()}

        # 1. our ScramClient against the real backend's SCRAM exchange
        assert _login(port, "scram_user", scram=ScramClient(password=SCRAM_PW)) == "ok"
        err = _login(port, "scram_user", scram=ScramClient(password="nope"))
        assert err["C"] == "28P01", err
        assert err["M"] == 'password authentication failed for user "scram_user"'
        # SASLprep agrees with the backend's, for a mapped and for a refused password
        assert _login(port, "uni_user", scram=ScramClient(password=UNI_PW)) == "ok"
        assert _login(port, "uni_user", scram=ScramClient(password="Päss wördfi")) == "ok"
        assert _login(port, "odd_user", scram=ScramClient(password=ODD_PW)) == "ok"

        # 2. md5 against a role whose password is stored as md5, from plaintext and hash
        assert stored["md5_user"].kind == "md5"
        assert stored["md5_user"].value == md5_hash("md5_user", MD5_PW)
        assert _login(port, "md5_user", md5=MD5_PW) == "ok"
        assert _login(port, "md5_user", md5=stored["md5_user"].value) == "ok"
        assert _login(port, "md5_user", md5="wrong")["C"] == "28P01"

        # 3. the backend's rolpassword parses, and from_password with its salt reproduces it
        verifiers = {}
        for role, pw in (("scram_user", SCRAM_PW), ("uni_user", UNI_PW), ("odd_user", ODD_PW)):
            assert stored[role].kind == "scram"
            v = ScramVerifier.parse(stored[role].value)
            assert v.to_text() == stored[role].value
            assert ScramVerifier.from_password(pw, salt=v.salt, iterations=v.iterations) == v
            verifiers[role] = v

        # 4. libpq (psycopg) against our ScramServer holding the backend's verifiers
        with _TinyScramServer(verifiers) as tiny:
            _libpq_connect(tiny.port, "scram_user", SCRAM_PW)
            _libpq_connect(tiny.port, "uni_user", UNI_PW)
            _libpq_connect(tiny.port, "odd_user", ODD_PW)
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                _libpq_connect(tiny.port, "scram_user", "nope")
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                _libpq_connect(tiny.port, "nobody", "x")  # unknown user: mock exchange
        results = tiny.results
        assert [(u, e is None) for u, _, e in results] == [
            ("scram_user", True), ("uni_user", True), ("odd_user", True),
            ("scram_user", False), ("nobody", False),
        ]  # fmt: skip
        assert all(e.sqlstate == "28P01" for _, _, e in results if e is not None)

        # 5. pass-through: the ClientKey libpq proved to us logs connmgr in to the backend
        for user, client_key, _ in results[:3]:
            relay = ScramClient(client_key=client_key, server_key=verifiers[user].server_key)
            assert _login(port, user, scram=relay) == "ok"
