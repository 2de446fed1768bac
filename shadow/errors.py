"""Errors of the protocol shadow, split by blame (as in h11).

* :class:`RemoteProtocolError` -- the peer sent something that is not the v3 protocol
  (nonsense length, truncated body, a message that is illegal in the current state).
  The connection manager answers it with an ErrorResponse carrying ``sqlstate`` (08P01 by
  default) to that client alone and closes that connection.
* :class:`LocalProtocolError` -- our own code asked the shadow to do something illegal
  (encode a malformed message, drive a state machine the wrong way). A bug, never the
  client's fault.

Both carry the SQLSTATE a Postgres client should see, so the caller never has to map them.
"""

from __future__ import annotations

PROTOCOL_VIOLATION = "08P01"
INTERNAL_ERROR = "XX000"


class ProtocolError(Exception):
    """Base class. ``sqlstate`` is what a client should be told."""

    sqlstate: str = PROTOCOL_VIOLATION

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        if sqlstate is not None:
            self.sqlstate = sqlstate

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol. Default SQLSTATE 08P01 (protocol_violation)."""

    sqlstate = PROTOCOL_VIOLATION


class LocalProtocolError(ProtocolError):
    """We misused the shadow (a bug in connmgr). SQLSTATE XX000 (internal_error)."""

    sqlstate = INTERNAL_ERROR
