"""Opening a session on a backend Postgres server with connmgr's own credentials.

:func:`open_backend` connects, negotiates TLS if configured, sends the StartupMessage built
from the client's parameters, answers whatever authentication the server asks for
(trust, cleartext, md5, SCRAM-SHA-256 -- with a password, an md5 hash, or SCRAM keys
recovered from the client's own exchange) and reads up to the first ReadyForQuery. The
result, :class:`BackendSession`, holds the stream, the framer positioned after the
handshake, the server's ParameterStatus values and its cancel key.

Errors: :class:`~connmgr.errors.BackendUnavailable` (08006, naming the server) when it
cannot be reached; :class:`~connmgr.errors.BackendRejected` carrying the server's own
ErrorResponse, to be forwarded to the client unchanged, when it refuses the session.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from connmgr.auth.md5 import md5_response
from connmgr.auth.scram import AuthError, ScramClient
from connmgr.errors import BackendRejected, BackendUnavailable, ClientError
from connmgr.pg.transport import FastSocketStream, close_now
from connmgr.pg.wire import MessageReader, PeerClosed
from shadow import messages as m
from shadow.framing import Framer
from shadow.messages import BackendTag

__all__ = ["BackendServer", "BackendSession", "Credentials", "Route", "open_backend", "open_own_session", "send_cancel"]


@dataclass(frozen=True, slots=True)
class BackendServer:
    """Where a backend is and how to reach it."""

    name: str
    host: str
    port: int
    connect_timeout: float = 5.0
    tls: str = "disable"  # disable | prefer | require | verify-ca | verify-full
    tls_ca_file: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Route:
    """The server new sessions log in to: the primary. A failover moves it to the
    secondary (:meth:`move`); whoever must follow (the redo monitor) subscribes with
    :meth:`on_move`."""

    def __init__(self, server: BackendServer) -> None:
        self.server = server
        self._followers: list[Callable[[BackendServer], None]] = []

    def on_move(self, follower: Callable[[BackendServer], None]) -> None:
        self._followers.append(follower)

    def move(self, server: BackendServer) -> None:
        self.server = server
        for follower in self._followers:
            follower(server)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What connmgr can prove to a backend for one user. Any field may be empty."""

    password: str | None = field(default=None, repr=False)
    md5_hash: str | None = field(default=None, repr=False)
    scram_keys: tuple[bytes, bytes] | None = field(default=None, repr=False)  # (ClientKey, ServerKey)


@dataclass(slots=True)
class BackendSession:
    server: BackendServer
    stream: trio.abc.Stream
    framer: Framer
    pid: int
    secret: int | bytes
    parameters: dict[str, str]
    #: original bytes of the post-authentication messages the client must see
    #: (ParameterStatus, NoticeResponse), in order; BackendKeyData and ReadyForQuery excluded
    welcome: list[bytes]
    #: bytes read after ReadyForQuery (normally none)
    leftover: bytes = b""

    def close(self) -> None:
        close_now(self.stream)

    async def query_rows(self, request: bytes) -> list[tuple[bytes | None, ...]]:
        """Send ``request`` (a Query, or Parse/Bind/Execute/Sync) on this otherwise idle
        session and return the DataRow values up to ReadyForQuery. Raises
        :class:`~connmgr.errors.ClientError` with the server's SQLSTATE if it failed, and
        :class:`~connmgr.pg.wire.PeerClosed` if the server went away."""
        await self.stream.send_all(request)
        reader = MessageReader(self.stream, self.framer, f'server "{self.server.name}"')
        rows: list[tuple[bytes | None, ...]] = []
        error = None
        while True:
            tag, body = await reader.read()
            if tag == BackendTag.DATA_ROW:
                rows.append(m.decode_backend(tag, body).values)
            elif tag == BackendTag.ERROR_RESPONSE:
                error = m.decode_backend(tag, body)
            elif tag == BackendTag.READY_FOR_QUERY:
                break
        if error is not None:
            raise ClientError(error.message or "query failed", sqlstate=error.sqlstate or "XX000")
        return rows


def _unavailable(server: BackendServer, why: str) -> BackendUnavailable:
    return BackendUnavailable(
        f'could not connect to server "{server.name}" at {server.address}: {why}',
        hint="Check that the server is running and accepting TCP connections.",
    )


async def _connect(server: BackendServer) -> FastSocketStream:
    try:
        with trio.fail_after(server.connect_timeout):
            stream = await trio.open_tcp_stream(server.host, server.port)
    except trio.TooSlowError:
        raise _unavailable(server, f"timed out after {server.connect_timeout:g}s") from None
    except OSError as e:
        raise _unavailable(server, e.strerror or str(e)) from None
    return FastSocketStream.from_trio(stream.socket)


def _ssl_context(server: BackendServer) -> ssl.SSLContext:
    if server.tls in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=server.tls_ca_file or None)
        ctx.check_hostname = server.tls == "verify-full"
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _negotiate_tls(server: BackendServer, raw: FastSocketStream) -> trio.abc.Stream:
    if server.tls == "disable":
        return raw
    await raw.send_all(m.ssl_request())
    answer = await raw.receive_some(1)
    if answer == b"S":
        stream = trio.SSLStream(raw, _ssl_context(server), server_hostname=server.host)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            raise _unavailable(server, f"TLS handshake failed: {e}") from None
        return stream
    if answer == b"N" and server.tls == "prefer":
        return raw
    if answer == b"N":
        raise _unavailable(server, "server does not support TLS, and [primary] tls requires it")
    raise _unavailable(server, f"unexpected answer {answer!r} to SSLRequest")


async def open_backend(
    server: BackendServer,
    params: Mapping[str, str] | Sequence[tuple[str, str]],
    credentials: Credentials,
    *,
    max_message_size: int,
) -> BackendSession:
    """Open and authenticate a session on ``server`` with startup ``params`` (a mapping,
    or (name, value) pairs sent in order, repeats included, as a client sent them).

    ``params`` must hold ``user`` (and usually ``database``). Returns a ready
    :class:`BackendSession`; raises BackendUnavailable or BackendRejected.
    """
    user = (params if isinstance(params, Mapping) else dict(params))["user"]
    raw = await _connect(server)
    try:
        stream = await _negotiate_tls(server, raw)
        reader = MessageReader(stream, Framer(max_message_size=max_message_size), f'server "{server.name}"')
        await stream.send_all(m.startup_message(params))
        await _authenticate(server, stream, reader, user, credentials)
        return await _read_welcome(server, stream, reader)
    except PeerClosed:
        raw.close()
        raise _unavailable(server, "server closed the connection during startup") from None
    except trio.BrokenResourceError as e:
        raw.close()
        raise _unavailable(server, f"connection lost during startup: {e}") from None
    except BaseException:
        raw.close()
        raise


def _rejected(body: bytes) -> BackendRejected:
    err = m.decode_backend(BackendTag.ERROR_RESPONSE, body)
    raw = bytes([BackendTag.ERROR_RESPONSE]) + (len(body) + 4).to_bytes(4, "big") + body
    return BackendRejected(raw, err.message or "server refused the session", err.sqlstate or "XX000")


async def _authenticate(
    server: BackendServer,
    stream: trio.abc.Stream,
    reader: MessageReader,
    user: str,
    creds: Credentials,
) -> None:
    scram: ScramClient | None = None
    while True:
        tag, body = await reader.read()
        if tag == BackendTag.ERROR_RESPONSE:
            raise _rejected(body)
        if tag == BackendTag.NEGOTIATE_PROTOCOL_VERSION:
            continue
        if tag != BackendTag.AUTHENTICATION:
            raise _unavailable(server, f"unexpected message {chr(tag)!r} during authentication")
        msg = m.decode_backend(tag, body)
        if isinstance(msg, m.AuthenticationOk):
            return
        if isinstance(msg, m.AuthenticationCleartextPassword):
            if creds.password is None:
                raise _no_credentials(server, user, "a password")
            await stream.send_all(m.password_message(creds.password))
        elif isinstance(msg, m.AuthenticationMD5Password):
            secret = creds.password if creds.password is not None else creds.md5_hash
            if secret is None:
                raise _no_credentials(server, user, "an md5 password")
            await stream.send_all(m.password_message(md5_response(secret, user, msg.salt)))
        elif isinstance(msg, m.AuthenticationSASL):
            if "SCRAM-SHA-256" not in msg.mechanisms:
                raise _unavailable(server, f"unsupported SASL mechanisms {', '.join(msg.mechanisms)}")
            if creds.password is not None:
                scram = ScramClient(password=creds.password)
            elif creds.scram_keys is not None:
                scram = ScramClient(client_key=creds.scram_keys[0], server_key=creds.scram_keys[1])
            else:
                raise _no_credentials(server, user, "a SCRAM secret")
            mechanism, first = scram.initial()
            await stream.send_all(m.sasl_initial_response(mechanism, first))
        elif isinstance(msg, m.AuthenticationSASLContinue) and scram is not None:
            try:
                await stream.send_all(m.sasl_response(scram.handle_continue(msg.data)))
            except AuthError as e:
                raise _unavailable(server, f"SCRAM exchange failed: {e}") from None
        elif isinstance(msg, m.AuthenticationSASLFinal) and scram is not None:
            try:
                scram.handle_final(msg.data)
            except AuthError as e:
                raise _unavailable(server, f"server failed SCRAM verification: {e}") from None
        else:
            raise _unavailable(server, f"unsupported authentication request {type(msg).__name__}")


def _no_credentials(server: BackendServer, user: str, what: str) -> ClientError:
    return ClientError(
        f'server "{server.name}" asks for {what} for user "{user}", and connmgr has none',
        sqlstate="28P01",
        hint="Give connmgr the user's secret: [auth] users_file or auth_query, or [primary] password.",
    )


async def _read_welcome(server: BackendServer, stream: trio.abc.Stream, reader: MessageReader) -> BackendSession:
    params: dict[str, str] = {}
    welcome: list[bytes] = []
    pid, secret = 0, 0
    while True:
        tag, body, raw = await reader.read_raw()
        if tag == BackendTag.READY_FOR_QUERY:
            return BackendSession(
                server, stream, reader.framer, pid, secret, params, welcome, reader.take_buffered()
            )
        if tag == BackendTag.ERROR_RESPONSE:
            raise _rejected(body)
        if tag == BackendTag.BACKEND_KEY_DATA:
            key = m.decode_backend(tag, body)
            pid, secret = key.pid, key.secret
            continue
        if tag == BackendTag.PARAMETER_STATUS:
            ps = m.decode_backend(tag, body)
            params[ps.name] = ps.value
        welcome.append(raw)



async def open_own_session(server: BackendServer, user: str, password: str, database: str,
                           purpose: str) -> BackendSession:  # fmt: skip
    """A session of connmgr's own (not a client's) on ``server``, named ``purpose`` in
    pg_stat_activity. Raises as :func:`open_backend`."""
    params = {"user": user, "database": database, "application_name": purpose}
    return await open_backend(server, params, Credentials(password=password or None), max_message_size=1 << 20)

async def send_cancel(server: BackendServer, pid: int, secret: int | bytes) -> None:
    """Deliver a CancelRequest for backend ``pid`` to ``server``. Errors are swallowed:
    like Postgres, a cancel is best effort and the requester gets no answer."""
    try:
        with trio.move_on_after(server.connect_timeout):
            stream = await trio.open_tcp_stream(server.host, server.port)
            try:
                await stream.send_all(m.cancel_request(pid, secret))
                with trio.move_on_after(1):
                    await stream.receive_some(1)  # server closes when done
            finally:
                await stream.aclose()
    except OSError:
        pass
