"""PostgreSQL MD5 password authentication (AuthenticationMD5Password), without I/O.

The stored form is ``"md5" + hex(md5(password + user))``; on the wire the client answers
a 4-byte salt with ``"md5" + hex(md5(hex(md5(password + user)) + salt))``. Knowing the
stored hash is therefore enough to log in -- treat it as a password.

Strings are hashed as UTF-8 (with surrogateescape, so a secret decoded from non-UTF-8
bytes with surrogateescape hashes as its original bytes). Postgres hashes the raw bytes
the client sent, so this matches every client that sends UTF-8.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["is_md5_hash", "md5_check", "md5_hash", "md5_response"]

_HEX = frozenset("0123456789abcdef")


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def is_md5_hash(secret: str) -> bool:
    """True if `secret` is a stored MD5 hash: "md5" and 32 lowercase hex digits.

    Postgres' rule (get_password_type): anything else is a plaintext password or a
    SCRAM verifier.
    """
    return len(secret) == 35 and secret.startswith("md5") and _HEX.issuperset(secret[3:])


def md5_hash(user: str, password: str) -> str:
    """Return the stored form of `password` for `user`: ``"md5" + hex(md5(password + user))``."""
    return "md5" + hashlib.md5(_b(password) + _b(user)).hexdigest()


def md5_response(secret: str, user: str, salt: bytes) -> str:
    """Return the PasswordMessage payload (without the NUL) answering an MD5 challenge.

    `secret` is a plaintext password or a stored "md5..." hash; `salt` is the 4 bytes of
    AuthenticationMD5Password. Raises ValueError if `salt` is not 4 bytes.
    """
    if len(salt) != 4:
        raise ValueError("an MD5 salt is 4 bytes")
    stored = secret if is_md5_hash(secret) else md5_hash(user, secret)
    return "md5" + hashlib.md5(stored[3:].encode("ascii") + salt).hexdigest()


def md5_check(stored: str, user: str, salt: bytes, response: str) -> bool:
    """True if a client's MD5 `response` matches `stored` (plaintext or "md5" hash).

    Constant-time in the response. An empty plaintext `stored` never matches (Postgres
    treats an empty password as no password).
    """
    if not stored:
        return False
    expected = md5_response(stored, user, salt)
    return hmac.compare_digest(expected.encode("ascii"), _b(response))
