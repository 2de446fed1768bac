"""The users file and what a stored secret can authenticate.

File format (PgBouncer's ``userlist.txt``, so existing files work)::

    ; comment            # also a comment
    "alice" "plaintext password"
    "bob"   "md5a4b0f7c5d2..."                     (md5 + 32 lowercase hex digits)
    "carol" "SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>"
    "dave" "pa""ss"                                 (a doubled quote is a literal quote)

One entry per line: two double-quoted strings separated by spaces or tabs. As in
PgBouncer, whatever follows the second string on the line is ignored (old pg_auth files
had more columns). Blank lines and lines whose first non-blank character is ``;`` or
``#`` are skipped. Stricter than PgBouncer: a user listed twice is an error, and so is
a secret that starts with ``SCRAM-SHA-256$`` but does not parse.

Which client authentication a secret allows (`UserSecret.client_methods`):

============  =====================  ==========================================
secret        SCRAM-SHA-256          MD5
============  =====================  ==========================================
plaintext     yes (verifier derived) yes
md5 hash      no (impossible)        yes
SCRAM         yes                    no (the password cannot be recovered)
============  =====================  ==========================================

An empty plaintext secret allows nothing (Postgres treats an empty password as none).
When the configured method is md5 but the secret is a SCRAM verifier, Postgres runs
SCRAM instead; when it is scram-sha-256 and the secret cannot do SCRAM, Postgres runs a
mock exchange that fails like a wrong password. `UserSecret.method_for` and
`scram_server_for` encode exactly that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from connmgr.auth.md5 import is_md5_hash, md5_check
from connmgr.auth.scram import (
    DEFAULT_ITERATIONS,
    MECHANISM,
    ScramServer,
    ScramVerifier,
    derived_salt,
)

__all__ = [
    "AuthMethod",
    "SecretKind",
    "UserSecret",
    "UsersFileError",
    "load_users_file",
    "parse_users_text",
    "scram_server_for",
    "secret_from_rolpassword",
]

SecretKind = Literal["plain", "md5", "scram"]
AuthMethod = Literal["md5", "scram-sha-256"]


class UsersFileError(ValueError):
    """A users file that cannot be used; str() is ``users file <path> line <n>: <reason>``.
    Internal: a configuration error, reported at start-up or on reload, never to a client.

    The reason never contains a secret.
    """

    def __init__(self, path: str, line_no: int, reason: str) -> None:
        super().__init__(f"users file {path} line {line_no}: {reason}")
        self.path = path
        self.line_no = line_no
        self.reason = reason


@dataclass(frozen=True, slots=True)
class UserSecret:
    """A user's stored secret: plaintext, an "md5..." hash, or a SCRAM verifier text.

    `value` is left out of repr() so that logging a UserSecret does not leak it.
    """

    user: str
    kind: SecretKind
    value: str = field(repr=False)

    def __post_init__(self) -> None:
        if self.kind == "md5" and not is_md5_hash(self.value):
            raise ValueError("an md5 secret must be 'md5' followed by 32 lowercase hex digits")
        if self.kind == "scram":
            ScramVerifier.parse(self.value)  # raises ValueError with the reason
        if self.kind not in ("plain", "md5", "scram"):
            raise ValueError(f"unknown secret kind {self.kind!r}")

    @classmethod
    def from_secret(cls, user: str, secret: str) -> UserSecret:
        """Classify `secret` the way Postgres does and wrap it.

        "SCRAM-SHA-256$..." is a verifier (ValueError if it does not parse), "md5" with
        32 lowercase hex digits is an md5 hash, anything else is plaintext.
        """
        if secret.startswith(MECHANISM + "$"):
            return cls(user, "scram", secret)
        if is_md5_hash(secret):
            return cls(user, "md5", secret)
        return cls(user, "plain", secret)

    def client_methods(self) -> tuple[AuthMethod, ...]:
        """The client authentication exchanges that can succeed with this secret.

        SCRAM verifier: ("scram-sha-256",). md5 hash: ("md5",). Non-empty plaintext:
        ("scram-sha-256", "md5"). Empty plaintext: ().
        """
        if self.kind == "scram":
            return ("scram-sha-256",)
        if self.kind == "md5":
            return ("md5",)
        return ("scram-sha-256", "md5") if self.value else ()

    def method_for(self, configured: AuthMethod) -> AuthMethod:
        """The exchange to run when the operator configured `configured` (pg_hba rules).

        "md5" with a SCRAM verifier runs SCRAM (Postgres does the same); everything
        else runs what was configured -- if the secret cannot do it, the exchange
        fails as a wrong password would (see `scram_server_for`, `check_md5`).
        """
        if configured == "md5" and self.kind == "scram":
            return "scram-sha-256"
        return configured

    def verifier(
        self, *, mock_key: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        """The SCRAM verifier for this secret.

        For a SCRAM secret, the parsed verifier. For plaintext, one derived with the
        salt `derived_salt(user, key=mock_key)` -- stable per key, so repeated logins
        hit the PBKDF2 cache and look like those of users with stored verifiers (or of
        unknown users). Raises ValueError for an md5 hash or an empty password, which
        cannot do SCRAM.
        """
        if self.kind == "scram":
            return ScramVerifier.parse(self.value)
        if self.kind == "md5":
            raise ValueError("an md5 hash cannot be used for SCRAM authentication")
        if not self.value:
            raise ValueError("an empty password cannot be used for authentication")
        return ScramVerifier.from_password(
            self.value, salt=derived_salt(self.user, key=mock_key), iterations=iterations
        )

    def check_md5(self, salt: bytes, response: str) -> bool:
        """True if a client's MD5 `response` to `salt` matches. Always False for SCRAM
        verifiers and empty passwords."""
        if "md5" not in self.client_methods():
            return False
        return md5_check(self.value, self.user, salt, response)


def scram_server_for(
    user: str,
    secret: UserSecret | None,
    *,
    nonce: str | None = None,
    mock_key: bytes | None = None,
) -> ScramServer:
    """A ScramServer for `user`: real if `secret` can do SCRAM, otherwise a mock exchange
    (unknown user, md5 hash, empty password) that fails with 28P01 at the end."""
    verifier = None
    if secret is not None and "scram-sha-256" in secret.client_methods():
        verifier = secret.verifier(mock_key=mock_key)
    return ScramServer(user, verifier, nonce=nonce, mock_key=mock_key)


def secret_from_rolpassword(user: str, rolpassword: str | None) -> UserSecret | None:
    """Wrap a secret fetched from pg_authid.rolpassword or an auth query.

    None or "" (no password set) gives None. Raises ValueError for a SCRAM text that
    does not parse.
    """
    if not rolpassword:
        return None
    return UserSecret.from_secret(user, rolpassword)


# --------------------------------------------------------------------------- parsing

_BLANK = " \t"


def _quoted(line: str, pos: int, what: str) -> tuple[str, int]:
    """Read a double-quoted string starting at line[pos]; return (value, position after)."""
    if pos >= len(line) or line[pos] != '"':
        raise _LineError("expected two quoted strings")
    out: list[str] = []
    i = pos + 1
    while True:
        j = line.find('"', i)
        if j < 0:
            raise _LineError(f"unterminated quoted {what}")
        out.append(line[i:j])
        if line[j + 1 : j + 2] == '"':  # "" is a literal quote
            out.append('"')
            i = j + 2
            continue
        return "".join(out), j + 1


class _LineError(Exception):
    """Internal: a line's problem, raised as :class:`UsersFileError` with its place."""


def _parse_line(line: str) -> tuple[str, str]:
    pos = len(line) - len(line.lstrip(_BLANK))
    user, pos = _quoted(line, pos, "user name")
    after = len(line) - len(line[pos:].lstrip(_BLANK))
    if after == pos < len(line):
        raise _LineError("expected two quoted strings separated by blanks")
    secret, _ = _quoted(line, after, "secret")
    # Like PgBouncer, ignore whatever follows the secret.
    return user, secret


def parse_users_text(text: str, source: str = "<string>") -> dict[str, UserSecret]:
    """Parse users-file text; return {user name: UserSecret}.

    Raises UsersFileError (naming `source` and the line) for a malformed line, an empty
    user name, a duplicate user or an invalid SCRAM secret.
    """
    users: dict[str, UserSecret] = {}
    first_seen: dict[str, int] = {}
    text = text.removeprefix("\ufeff")
    for line_no, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        stripped = line.strip(_BLANK)
        if not stripped or stripped[0] in ";#":
            continue
        try:
            user, secret = _parse_line(line)
        except _LineError as e:
            raise UsersFileError(source, line_no, str(e)) from None
        if not user:
            raise UsersFileError(source, line_no, "empty user name")
        if user in first_seen:
            raise UsersFileError(
                source, line_no, f'duplicate user "{user}" (first on line {first_seen[user]})'
            )
        try:
            entry = UserSecret.from_secret(user, secret)
        except ValueError as e:
            # ScramVerifier.parse messages name the broken part, never the secret.
            raise UsersFileError(source, line_no, f'user "{user}": {e}') from None
        users[user] = entry
        first_seen[user] = line_no
    return users


def load_users_file(path: str | os.PathLike[str]) -> dict[str, UserSecret]:
    """Read and parse a users file (UTF-8); return {user name: UserSecret}.

    Raises UsersFileError for bad content (including invalid UTF-8, with its line) and
    OSError if the file cannot be read.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        raise UsersFileError(name, line_no, "not valid UTF-8") from None
    return parse_users_text(text, source=name)
