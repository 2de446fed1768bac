"""Authentication without I/O: SCRAM-SHA-256 and MD5 for both sides, and the users file.

connmgr plays the server toward clients (trust, md5, SCRAM-SHA-256) and the client
toward backends (trust, cleartext, md5, SCRAM-SHA-256, or SCRAM pass-through with the
ClientKey a client proved). The connection code feeds message payloads into these
objects and sends what they return; every failure is an `AuthError` carrying the
SQLSTATE and a message safe to show the client.
"""

from connmgr.auth.md5 import is_md5_hash, md5_check, md5_hash, md5_response
from connmgr.auth.scram import (
    MECHANISM,
    AuthError,
    ScramClient,
    ScramServer,
    ScramVerifier,
    derived_salt,
    saslprep,
)
from connmgr.auth.users import (
    AuthMethod,
    UserSecret,
    UsersFileError,
    load_users_file,
    parse_users_text,
    scram_server_for,
    secret_from_rolpassword,
)

__all__ = [
    "MECHANISM",
    "AuthError",
    "AuthMethod",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "UserSecret",
    "UsersFileError",
    "derived_salt",
    "is_md5_hash",
    "load_users_file",
    "md5_check",
    "md5_hash",
    "md5_response",
    "parse_users_text",
    "saslprep",
    "scram_server_for",
    "secret_from_rolpassword",
]
