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
    """The peer violated the protocol. Default SQLSTATE 08P01 (protocol_violation).

    ``before`` holds what the same input held *before* the violation, when that is
    known: the original bytes and frames of the complete messages ahead of a nonsense
    length (:meth:`shadow.framing.Framer.feed`). Postgres answers those first, so connmgr
    relays them before it reports the violation."""

    sqlstate = PROTOCOL_VIOLATION

    def __init__(self, message: str, *, sqlstate: str | None = None, before: tuple[bytes, list] = (b"", [])) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.before = before


class LocalProtocolError(ProtocolError):
    """We misused the shadow (a bug in connmgr). SQLSTATE XX000 (internal_error)."""

    sqlstate = INTERNAL_ERROR
