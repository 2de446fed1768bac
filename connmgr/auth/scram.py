"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both sides, without I/O.

How it works
------------
A SCRAM exchange is four messages::

    client-first   n,,n=<user>,r=<client nonce>                   (SASLInitialResponse)
    server-first   r=<client nonce><server nonce>,s=<salt>,i=<n>  (AuthenticationSASLContinue)
    client-final   c=biws,r=<full nonce>,p=<ClientProof>          (SASLResponse)
    server-final   v=<ServerSignature>                            (AuthenticationSASLFinal)

with, for a password P, salt s and iteration count n::

    SaltedPassword  = PBKDF2-HMAC-SHA-256(SASLprep(P), s, n)
    ClientKey       = HMAC(SaltedPassword, "Client Key")
    StoredKey       = SHA-256(ClientKey)
    ServerKey       = HMAC(SaltedPassword, "Server Key")
    AuthMessage     = client-first-bare + "," + server-first + "," + client-final-without-proof
    ClientSignature = HMAC(StoredKey, AuthMessage)
    ClientProof     = ClientKey XOR ClientSignature
    ServerSignature = HMAC(ServerKey, AuthMessage)

The server stores only (s, n, StoredKey, ServerKey) -- a `ScramVerifier`, the text in
``pg_authid.rolpassword``. It checks a proof by recovering ClientKey = ClientProof XOR
ClientSignature and comparing SHA-256(ClientKey) with StoredKey. That recovered ClientKey
is exactly what a client needs to prove itself to *another* server holding the same
verifier, which is how a proxy can pass a client's SCRAM login through to a backend
without ever knowing the password (PgBouncer does the same).

PostgreSQL specifics followed here (src/backend/libpq/auth-scram.c, fe-auth-scram.c,
src/common/saslprep.c):

* the user name inside the SCRAM messages is ignored; libpq sends ``n=`` (empty) and the
  startup packet's user is authoritative;
* a password that is not valid for SASLprep is used as it is (see `saslprep`);
* no channel binding: the proxy advertises only ``SCRAM-SHA-256``, so a gs2 flag ``p``
  is a protocol violation, ``n`` and ``y`` are accepted;
* an unknown user still gets a normal-looking exchange with a salt derived from the
  user name (stable for the process, or for a configured ``mock_key``) and fails at
  the end as a wrong password would, so user names cannot be probed;
* errors: malformed messages are 08P01 protocol_violation, authorization identities and
  mandatory extensions 0A000 feature_not_supported, a wrong proof 28P01
  invalid_password with the text Postgres uses.

Nothing here does I/O: the connection code feeds message payloads in and sends what
comes out. PBKDF2 is the only expensive step (about a millisecond per 4096 iterations);
its result is cached per (password, salt, iterations) in a small process-wide LRU.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
import stringprep
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_ITERATIONS",
    "FEATURE_NOT_SUPPORTED",
    "INVALID_AUTHORIZATION",
    "INVALID_PASSWORD",
    "MAX_ITERATIONS",
    "MECHANISM",
    "PROTOCOL_VIOLATION",
    "AuthError",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "derived_salt",
    "recover_client_key",
    "saslprep",
]

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # Postgres' scram_iterations default
MAX_ITERATIONS = 10_000_000  # refuse more from a server: ~seconds of CPU on our event loop
SALT_LEN = 16  # Postgres' SCRAM_DEFAULT_SALT_LEN
NONCE_RAW_LEN = 18  # Postgres' SCRAM_RAW_NONCE_LEN; base64 makes 24 characters
KEY_LEN = 32  # SHA-256 digest size

# SQLSTATEs used by this package.
PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"

_MALFORMED = "malformed SCRAM message"


class AuthError(Exception):
    """An authentication failure, carrying the SQLSTATE the peer should see.

    ``str(err)`` is the primary message, safe to send to a client in an ErrorResponse
    (it never contains a password, key or proof); ``detail`` is an optional DETAIL line.
    """

    sqlstate: str
    detail: str | None

    def __init__(
        self, message: str, sqlstate: str = INVALID_PASSWORD, *, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail

    @property
    def message(self) -> str:
        return str(self.args[0])

    @classmethod
    def password_failed(cls, user: str) -> AuthError:
        """The error Postgres reports for a wrong password or an unknown user (28P01)."""
        return cls(f'password authentication failed for user "{user}"', INVALID_PASSWORD)

    def __repr__(self) -> str:
        return f"AuthError({self.message!r}, {self.sqlstate!r}, detail={self.detail!r})"


def _malformed(detail: str) -> AuthError:
    return AuthError(_MALFORMED, PROTOCOL_VIOLATION, detail=detail)


# --------------------------------------------------------------------------- SASLprep


def _saslprep_prohibited(ch: str) -> bool:
    # RFC 4013 section 2.3 (C.1.2 is mapped away before this runs) plus A.1 unassigned
    # code points, which Postgres treats as prohibited too (stored-string semantics).
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)
    )


def saslprep(s: str) -> str:
    """Return `s` prepared with SASLprep (RFC 4013) exactly as Postgres' pg_saslprep does.

    Postgres semantics, which both the server and libpq apply to passwords:

    * pure ASCII is returned unchanged (even control characters);
    * non-ASCII spaces (C.1.2) become U+0020, "commonly mapped to nothing" (B.1) are
      removed, the result is NFKC-normalised;
    * if the mapped string is empty, contains a prohibited or unassigned (Unicode 3.2)
      code point, or breaks the bidi rules, the *original* string is returned
      unchanged (Postgres then hashes the raw bytes instead of failing).

    Like Postgres, the prohibition and bidi checks look at the mapped string before
    normalisation. Never raises.
    """
    if s.isascii():
        return s
    mapped: list[str] = []
    for ch in s:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")
        elif stringprep.in_table_b1(ch):
            continue
        else:
            mapped.append(ch)
    if not mapped:
        return s
    if any(_saslprep_prohibited(ch) for ch in mapped):
        return s
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            return s
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return s
    return unicodedata.normalize("NFKC", "".join(mapped))


def _password_bytes(password: str) -> bytes:
    # surrogateescape lets a password that was decoded from non-UTF-8 bytes with
    # surrogateescape reach the hash as its original bytes, as Postgres would use them.
    return saslprep(password).encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- crypto


_CACHE_SIZE = 128
_cache: OrderedDict[tuple[bytes, bytes, int], bytes] = OrderedDict()
_cache_lock = threading.Lock()
# Cache keys hold an HMAC of the password under a per-process key, not the password.
_cache_key_secret = secrets.token_bytes(32)
# Default key for salts derived from user names (mock exchanges, plaintext secrets).
_default_mock_key = secrets.token_bytes(32)


def _salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA-256, memoised in a small LRU (connmgr reconnects often)."""
    key = (hmac.digest(_cache_key_secret, password, "sha256"), salt, iterations)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    value = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    with _cache_lock:
        _cache[key] = value
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _keys_from_salted(salted: bytes) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) from a SaltedPassword."""
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    """Strict base64 decode; None if `text` is not canonical padded base64."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def derived_salt(user: str, *, key: bytes | None = None) -> bytes:
    """A 16-byte salt derived from `user` under `key` (default: a per-process random key).

    Used for the mock exchange of unknown users and for verifiers built from plaintext
    secrets, so both look alike and stay stable for the lifetime of the key. Give every
    connmgr the same configured key to keep them stable across restarts and failovers.
    """
    k = _default_mock_key if key is None else key
    mac = hmac.digest(
        k, b"connmgr scram salt\x00" + user.encode("utf-8", "surrogateescape"), "sha256"
    )
    return mac[:SALT_LEN]


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(NONCE_RAW_LEN))


def _is_printable(s: str) -> bool:
    # RFC 5802 "printable": %x21-2B / %x2D-7E (ASCII without ',' and controls/space).
    return all(0x21 <= ord(c) <= 0x7E and c != "," for c in s)


def _check_nonce_arg(nonce: str) -> str:
    if not nonce or not _is_printable(nonce):
        raise ValueError("a SCRAM nonce must be non-empty printable ASCII without ','")
    return nonce


def _shown(c: str) -> str:
    return c if 0x20 < ord(c) < 0x7F else f"0x{ord(c):02x}"


def _found(c: str) -> str:
    return f'"{_shown(c)}"' if c else "end of message"


# --------------------------------------------------------------------------- verifier


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """A stored SCRAM-SHA-256 secret: what Postgres keeps in pg_authid.rolpassword.

    The keys are omitted from repr(): with a sniffed exchange they let an attacker
    impersonate the server or recover the ClientKey.
    """

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError("SCRAM verifier: iteration count must be at least 1")
        if not self.salt:
            raise ValueError("SCRAM verifier: salt must not be empty")
        if len(self.stored_key) != KEY_LEN or len(self.server_key) != KEY_LEN:
            raise ValueError(f"SCRAM verifier: StoredKey and ServerKey must be {KEY_LEN} bytes")

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64 parts).

        Raises ValueError naming what is wrong; the message never quotes key material.
        """
        prefix = MECHANISM + "$"
        if not text.startswith(prefix):
            raise ValueError("SCRAM verifier: does not start with 'SCRAM-SHA-256$'")
        parts = text[len(prefix) :].split("$")
        if len(parts) != 2:
            raise ValueError(
                "SCRAM verifier: expected 'SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>'"
            )
        iter_salt, keys = (p.split(":") for p in parts)
        if len(iter_salt) != 2:
            raise ValueError(
                "SCRAM verifier: expected '<iterations>:<salt>' after 'SCRAM-SHA-256$'"
            )
        if len(keys) != 2:
            raise ValueError("SCRAM verifier: expected '<StoredKey>:<ServerKey>' after the salt")
        iter_text, salt_text = iter_salt
        if not (iter_text.isascii() and iter_text.isdigit()) or int(iter_text) < 1:
            raise ValueError("SCRAM verifier: iteration count is not a positive integer")
        salt = _unb64(salt_text)
        if not salt:
            raise ValueError("SCRAM verifier: salt is not valid non-empty base64")
        decoded: list[bytes] = []
        for name, part in zip(("StoredKey", "ServerKey"), keys, strict=True):
            raw = _unb64(part)
            if raw is None:
                raise ValueError(f"SCRAM verifier: {name} is not valid base64")
            if len(raw) != KEY_LEN:
                raise ValueError(
                    f"SCRAM verifier: {name} must decode to {KEY_LEN} bytes, got {len(raw)}"
                )
            decoded.append(raw)
        return cls(int(iter_text), salt, decoded[0], decoded[1])

    @classmethod
    def from_password(
        cls, password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        """Build the verifier Postgres would store for `password` (SASLprep applied).

        `salt` defaults to 16 random bytes. Raises ValueError for iterations < 1 or an
        empty salt.
        """
        if iterations < 1:
            raise ValueError("SCRAM verifier: iteration count must be at least 1")
        if salt is None:
            salt = secrets.token_bytes(SALT_LEN)
        if not salt:
            raise ValueError("SCRAM verifier: salt must not be empty")
        client_key, server_key = _keys_from_salted(
            _salted_password(_password_bytes(password), salt, iterations)
        )
        return cls(iterations, salt, _h(client_key), server_key)

    def to_text(self) -> str:
        """The pg_authid.rolpassword text form; `parse` reads it back."""
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    def check_password(self, password: str) -> bool:
        """True if `password` matches this verifier (for cleartext password auth)."""
        salted = _salted_password(_password_bytes(password), self.salt, self.iterations)
        _, server_key = _keys_from_salted(salted)
        return hmac.compare_digest(server_key, self.server_key)


# --------------------------------------------------------------------------- message parsing


class _Reader:
    """Walks one SCRAM message of ``x=value`` attributes separated by commas."""

    __slots__ = ("text", "pos", "what")

    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.pos = 0
        self.what = what

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def attr(self, name: str) -> str:
        """Read ``name=value`` up to the next comma (consumed) or the end."""
        c = self.peek()
        if c != name:
            raise _malformed(f'Expected attribute "{name}" but found {_found(c)} in {self.what}.')
        return self._value(name)

    def any_attr(self) -> tuple[str, str]:
        c = self.peek()
        if not c:
            raise _malformed(f"Attribute expected, but found end of {self.what}.")
        if not ("a" <= c <= "z" or "A" <= c <= "Z"):
            raise _malformed(f'Attribute expected, but found invalid character "{_shown(c)}".')
        return c, self._value(c)

    def _value(self, name: str) -> str:
        if self.text[self.pos + 1 : self.pos + 2] != "=":
            raise _malformed(f'Expected character "=" for attribute "{name}".')
        start = self.pos + 2
        end = self.text.find(",", start)
        if end < 0:
            end = len(self.text)
            self.pos = end
        else:
            self.pos = end + 1
        return self.text[start:end]


def _decode(data: bytes, what: str) -> str:
    if not data:
        raise _malformed("The message is empty.")
    if b"\x00" in data:
        raise _malformed("Message length does not match input length.")
    # surrogateescape keeps arbitrary bytes (e.g. a non-UTF-8 user name) round-trippable,
    # so the AuthMessage is built from exactly the bytes the peer sent.
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _escape_username(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


# --------------------------------------------------------------------------- server


class _ServerState(enum.Enum):
    WAIT_CLIENT_FIRST = "waiting for client-first-message"
    WAIT_CLIENT_FINAL = "waiting for client-final-message"
    DONE = "exchange succeeded"
    FAILED = "exchange failed"


class ScramServer:
    """The server side of one SCRAM-SHA-256 exchange (no channel binding).

    Drive it with the payloads of SASLInitialResponse (`client_first`) and SASLResponse
    (`client_final`); send what they return in AuthenticationSASLContinue and
    AuthenticationSASLFinal, then AuthenticationOk. Any AuthError ends the exchange:
    send an ErrorResponse (FATAL, ``err.sqlstate``, ``str(err)``, ``err.detail``) and
    close. Calling a step out of order raises RuntimeError (a bug in the caller).

    ``verifier=None`` means the user is unknown (or has no SCRAM-capable secret): the
    exchange runs with a mock salt derived from the user name and fails in
    `client_final` with 28P01, indistinguishable from a wrong password.
    """

    mechanisms: tuple[str, ...] = (MECHANISM,)

    def __init__(
        self,
        user: str,
        verifier: ScramVerifier | None,
        *,
        nonce: str | None = None,
        mock_key: bytes | None = None,
    ) -> None:
        self.user = user
        self._doomed = verifier is None
        if verifier is None:
            verifier = ScramVerifier(
                DEFAULT_ITERATIONS,
                derived_salt(user, key=mock_key),
                secrets.token_bytes(KEY_LEN),
                secrets.token_bytes(KEY_LEN),
            )
        self._verifier = verifier
        self._server_nonce = _new_nonce() if nonce is None else _check_nonce_arg(nonce)
        self._state = _ServerState.WAIT_CLIENT_FIRST
        self._gs2_header = ""
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self.client_key: bytes | None = None
        """After a successful exchange: the client's ClientKey (a secret; never log it)."""

    @property
    def verifier(self) -> ScramVerifier | None:
        """The real verifier, or None during a mock exchange."""
        return None if self._doomed else self._verifier

    @property
    def done(self) -> bool:
        return self._state is _ServerState.DONE

    def _expect(self, state: _ServerState, step: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"ScramServer.{step}() called while {self._state.value}")

    def client_first(self, mechanism: str, data: bytes) -> bytes:
        """Read the client-first-message; return the server-first-message.

        Raises AuthError: 08P01 for another mechanism, a malformed message or a
        channel-binding request; 0A000 for an authorization identity or a mandatory
        extension.
        """
        self._expect(_ServerState.WAIT_CLIENT_FIRST, "client_first")
        self._state = _ServerState.FAILED  # until proven otherwise
        if mechanism not in self.mechanisms:
            raise AuthError(
                "client selected an invalid SASL authentication mechanism", PROTOCOL_VIOLATION
            )
        text = _decode(data, "client-first-message")
        flag = text[0]
        if flag == "p":
            raise _malformed(
                "The client selected SCRAM-SHA-256 without channel binding, "
                "but the SCRAM message includes channel binding data."
            )
        if flag not in ("n", "y"):
            raise _malformed(f'Unexpected channel-binding flag "{_shown(flag)}".')
        if text[1:2] != ",":
            raise _malformed(f"Comma expected, but found {_found(text[1:2])}.")
        if text[2:3] == "a":
            raise AuthError(
                "client uses authorization identity, but it is not supported",
                FEATURE_NOT_SUPPORTED,
            )
        if text[2:3] != ",":
            raise _malformed(f"Unexpected attribute {_found(text[2:3])} in client-first-message.")
        self._gs2_header = text[:3]
        bare = _Reader(text[3:], "client-first-message")
        if bare.peek() == "m":
            raise AuthError("client requires an unsupported SCRAM extension", FEATURE_NOT_SUPPORTED)
        bare.attr("n")  # ignored: the startup packet's user name is authoritative
        client_nonce = bare.attr("r")
        if not client_nonce or not _is_printable(client_nonce):
            raise _malformed("non-printable characters in SCRAM nonce")
        while not bare.at_end():  # optional extensions: ignored
            bare.any_attr()
        self._client_first_bare = text[3:]
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self._state = _ServerState.WAIT_CLIENT_FINAL
        return self._server_first.encode("ascii")

    def client_final(self, data: bytes) -> bytes:
        """Read the client-final-message, check the proof; return the server-final-message.

        On success sets `client_key`. Raises AuthError 28P01 for a wrong password or an
        unknown user; 08P01 for a malformed message, a channel-binding mismatch or a
        nonce mismatch.
        """
        self._expect(_ServerState.WAIT_CLIENT_FINAL, "client_final")
        self._state = _ServerState.FAILED
        text = _decode(data, "client-final-message")
        r = _Reader(text, "client-final-message")
        cbind = r.attr("c")
        if cbind != _b64(_encode(self._gs2_header)):
            raise AuthError(
                "unexpected SCRAM channel-binding attribute in client-final-message",
                PROTOCOL_VIOLATION,
            )
        nonce = r.attr("r")
        while r.peek() != "p":  # optional extensions before the proof
            r.any_attr()
        proof_start = r.pos
        proof = _unb64(r.attr("p"))
        if proof is None or len(proof) != KEY_LEN:
            raise _malformed("Malformed proof in client-final-message.")
        if not r.at_end() or text.endswith(","):
            raise _malformed("Garbage found at the end of client-final-message.")
        if not hmac.compare_digest(_encode(nonce), _encode(self._nonce)):
            raise AuthError(
                "invalid SCRAM response", PROTOCOL_VIOLATION, detail="Nonce does not match."
            )

        without_proof = text[: proof_start - 1]  # drop the comma before "p="
        auth_message = _encode(f"{self._client_first_bare},{self._server_first},{without_proof}")
        v = self._verifier
        client_signature = _hmac(v.stored_key, auth_message)
        client_key = _xor(proof, client_signature)
        # Always compute and compare, also when doomed, so timing does not reveal users.
        ok = hmac.compare_digest(_h(client_key), v.stored_key)
        if not ok or self._doomed:
            raise AuthError.password_failed(self.user)
        self.client_key = client_key
        self._state = _ServerState.DONE
        return _encode("v=" + _b64(_hmac(v.server_key, auth_message)))


def recover_client_key(user: str, verifier: ScramVerifier, mechanism: str, client_first: bytes,
                       server_first: bytes, client_final: bytes) -> bytes | None:  # fmt: skip
    """The ClientKey a client proved in an exchange another server ran (a host takeover:
    host A's connmgr answered, host B saw the messages): the exchange is run again here
    with that server's nonce and must give the same server-first message, with
    ``verifier`` (the same as the other server's), and the proof must check. None
    otherwise (another verifier, a failed or forged exchange)."""
    try:
        text = server_first.decode("ascii")
        first = client_first.decode("utf-8")
        client_nonce = first[first.index(",r=") + 3:].split(",", 1)[0] if ",r=" in first else ""
        nonce = text[2:].split(",", 1)[0] if text.startswith("r=") else ""
        if not client_nonce or not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce):
            return None
        server = ScramServer(user, verifier, nonce=nonce[len(client_nonce):])
        if server.client_first(mechanism, client_first) != server_first:
            return None
        server.client_final(client_final)
    except (AuthError, ValueError, UnicodeDecodeError):
        return None
    return server.client_key


# --------------------------------------------------------------------------- client


class _ClientState(enum.Enum):
    INITIAL = "not started"
    WAIT_SERVER_FIRST = "waiting for server-first-message"
    WAIT_SERVER_FINAL = "waiting for server-final-message"
    DONE = "exchange succeeded"
    FAILED = "exchange failed"


class ScramClient:
    """The client side of one SCRAM-SHA-256 exchange, toward a backend.

    Give either a `password`, or `client_key` and `server_key` for pass-through (the
    ClientKey a `ScramServer` recovered and the ServerKey of the same verifier the
    backend holds). Steps: `initial` (mechanism and SASLInitialResponse payload),
    `handle_continue` (AuthenticationSASLContinue payload -> SASLResponse payload),
    `handle_final` (AuthenticationSASLFinal payload). AuthError on a bad server
    message (08P01), a server that fails to prove it knows the secret (28000) or an
    ``e=`` error (28P01 for invalid-proof, otherwise 28000). Out-of-order calls raise
    RuntimeError.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: str | None = None,
        user: str = "",
        max_iterations: int = MAX_ITERATIONS,
    ) -> None:
        if password is not None:
            if client_key is not None or server_key is not None:
                raise ValueError("give either password or client_key and server_key, not both")
        elif client_key is None or server_key is None:
            raise ValueError("give either password or both client_key and server_key")
        elif len(client_key) != KEY_LEN or len(server_key) != KEY_LEN:
            raise ValueError(f"client_key and server_key must be {KEY_LEN} bytes")
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._client_nonce = _new_nonce() if nonce is None else _check_nonce_arg(nonce)
        self._user = user
        self._max_iterations = max_iterations
        self._state = _ClientState.INITIAL
        self._client_first_bare = ""
        self._expected_signature = b""

    def _expect(self, state: _ClientState, step: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"ScramClient.{step}() called while {self._state.value}")

    @property
    def done(self) -> bool:
        return self._state is _ClientState.DONE

    def initial(self) -> tuple[str, bytes]:
        """Return (mechanism, client-first-message) for SASLInitialResponse."""
        self._expect(_ClientState.INITIAL, "initial")
        user = _escape_username(saslprep(self._user))
        self._client_first_bare = f"n={user},r={self._client_nonce}"
        self._state = _ClientState.WAIT_SERVER_FIRST
        return MECHANISM, _encode("n,," + self._client_first_bare)

    def handle_continue(self, data: bytes) -> bytes:
        """Read the server-first-message; return the client-final-message.

        Runs PBKDF2 when built from a password (cached). Raises AuthError 08P01 if the
        message is malformed, the nonce does not extend ours, or the iteration count is
        below 1 or above `max_iterations`.
        """
        self._expect(_ClientState.WAIT_SERVER_FIRST, "handle_continue")
        self._state = _ClientState.FAILED
        text = _decode(data, "server-first-message")
        r = _Reader(text, "server-first-message")
        if r.peek() == "m":
            raise AuthError("server requires an unsupported SCRAM extension", FEATURE_NOT_SUPPORTED)
        nonce = r.attr("r")
        if (
            len(nonce) <= len(self._client_nonce)
            or not nonce.startswith(self._client_nonce)
            or not _is_printable(nonce)
        ):
            raise AuthError("invalid SCRAM response (nonce mismatch)", PROTOCOL_VIOLATION)
        salt = _unb64(r.attr("s"))
        if not salt:
            raise _malformed("Invalid salt in server-first-message.")
        iter_text = r.attr("i")
        if not (iter_text.isascii() and iter_text.isdigit()):
            raise _malformed("Invalid iteration count in server-first-message.")
        iterations = int(iter_text)
        if not 1 <= iterations <= self._max_iterations:
            raise _malformed(
                f"Iteration count {iterations} in server-first-message is outside "
                f"1..{self._max_iterations}."
            )
        while not r.at_end():  # extensions: ignored
            r.any_attr()

        if self._password is not None:
            salted = _salted_password(_password_bytes(self._password), salt, iterations)
            client_key, server_key = _keys_from_salted(salted)
        else:
            assert self._client_key is not None and self._server_key is not None
            client_key, server_key = self._client_key, self._server_key

        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = _encode(f"{self._client_first_bare},{text},{without_proof}")
        client_signature = _hmac(_h(client_key), auth_message)
        proof = _xor(client_key, client_signature)
        self._expected_signature = _hmac(server_key, auth_message)
        self._state = _ClientState.WAIT_SERVER_FINAL
        return _encode(f"{without_proof},p={_b64(proof)}")

    def handle_final(self, data: bytes) -> None:
        """Check the server-final-message. Returns None if the server proved itself.

        Raises AuthError: 28P01 for ``e=invalid-proof`` (our secret is wrong), 28000 for
        another ``e=`` error or a wrong server signature, 08P01 if malformed.
        """
        self._expect(_ClientState.WAIT_SERVER_FINAL, "handle_final")
        self._state = _ClientState.FAILED
        text = _decode(data, "server-final-message")
        r = _Reader(text, "server-final-message")
        if r.peek() == "e":
            reason = r.attr("e")
            if reason == "invalid-proof":
                raise AuthError("SCRAM authentication failed: invalid proof", INVALID_PASSWORD)
            shown = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in reason[:64])
            raise AuthError(
                f"error received from server in SCRAM exchange: {shown}", INVALID_AUTHORIZATION
            )
        signature = _unb64(r.attr("v"))
        if signature is None or len(signature) != KEY_LEN:
            raise _malformed("Invalid server signature in server-final-message.")
        while not r.at_end():  # extensions: ignored
            r.any_attr()
        if not hmac.compare_digest(signature, self._expected_signature):
            raise AuthError("incorrect server signature", INVALID_AUTHORIZATION)
        self._state = _ClientState.DONE
