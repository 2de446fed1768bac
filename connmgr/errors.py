"""The few error types of the connection manager.

Every error a client can be told about carries the SQLSTATE and severity Postgres would use,
so the code that catches it only has to encode it (:meth:`ClientError.to_message`) and
close. Messages never contain passwords or startup secrets.
"""

from __future__ import annotations

from shadow import messages


class ClientError(Exception):
    """An error to report to one client as an ErrorResponse with ``sqlstate`` (XX000
    internal_error unless given), then close its connection."""

    sqlstate = "XX000"
    severity = "FATAL"

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        severity: str | None = None,
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        if sqlstate is not None:
            self.sqlstate = sqlstate
        if severity is not None:
            self.severity = severity
        self.detail = detail
        self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0])

    def to_message(self) -> bytes:
        """The ErrorResponse bytes for this error."""
        return messages.error_response(
            self.sqlstate, self.message, severity=self.severity, detail=self.detail, hint=self.hint
        )


class BackendUnavailable(ClientError):
    """The backend server cannot be reached or was lost (08006 connection_failure)."""

    sqlstate = "08006"


class BackendRejected(ClientError):
    """The backend answered the startup with an ErrorResponse; ``raw`` is that message,
    forwarded to the client byte for byte (its SQLSTATE is the server's)."""

    def __init__(self, raw: bytes, message: str, sqlstate: str) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.raw = raw

    def to_message(self) -> bytes:
        return self.raw


class TooManyClients(ClientError):
    """Over ``[server] max_clients`` (53300 too_many_connections, as Postgres says it)."""

    sqlstate = "53300"


class AdminShutdown(ClientError):
    """connmgr is shutting down (57P01 admin_shutdown)."""

    sqlstate = "57P01"


class ConfigError(Exception):
    """The configuration is wrong; the message names the key. Internal: reported at
    start-up (or by ``connmgr check``), never to a client."""


class BackendLost(ClientError):
    """The session's backend went away (EOF, a failed send, or a FATAL 57P01/57P02/57P03
    that connmgr held back from the client) while failover is configured: the session may
    move to the secondary. ``raw`` is the server's FATAL ErrorResponse, if it sent one;
    if the session does not move, the client gets that (or this error's own message)."""

    sqlstate = "08006"

    def __init__(self, message: str, *, raw: bytes | None = None, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.raw = raw

    def to_message(self) -> bytes:
        return self.raw if self.raw is not None else super().to_message()
