"""Authenticating clients at connmgr, and deciding what connmgr proves to the backend.

connmgr terminates authentication: the client proves itself to connmgr (trust, md5 or
SCRAM-SHA-256, against a users file or secrets fetched with an auth query), and connmgr
then logs in to the backend with :class:`~connmgr.pg.backend.Credentials` derived from what it
knows -- the plaintext password or md5 hash from the users file, or, for SCRAM, the
ClientKey recovered from the client's own proof (SCRAM pass-through, valid while the
backend holds the same verifier). Because connmgr holds those credentials, it can open the
session again on another server later (failover) without asking the client.

``[primary] user/password`` override all of this: every backend session logs in as that
user with that password.
"""

from __future__ import annotations

import logging
import os
import time

import trio

from connmgr.auth.scram import AuthError, ScramServer
from connmgr.auth.users import (
    UserSecret,
    load_users_file,
    scram_server_for,
    secret_from_rolpassword,
)
from connmgr.config import DEFAULT_AUTH_QUERY, Config
from connmgr.errors import ClientError
from connmgr.pg.backend import BackendServer, Credentials, open_backend
from connmgr.pg.wire import MessageReader
from shadow import messages as m
from shadow.messages import FrontendTag

log = logging.getLogger("connmgr.auth")

AUTH_QUERY_CACHE_SECONDS = 30.0


class SecretStore:
    """Where client secrets come from: the users file, else the auth query (cached)."""

    def __init__(self, config: Config, server: BackendServer) -> None:
        self.config = config
        self.server = server
        self.users: dict[str, UserSecret] = {}
        self._cache: dict[str, tuple[float, UserSecret | None]] = {}
        self.mock_key = config.auth.mock_key.encode() or os.urandom(32)
        self.reload()

    def reload(self) -> None:
        """(Re)read the users file; raises UsersFileError or OSError."""
        if self.config.auth.users_file:
            self.users = load_users_file(self.config.auth.users_file)

    async def lookup(self, user: str) -> UserSecret | None:
        secret = self.users.get(user)
        if secret is not None or not self.config.auth.auth_query:
            return secret
        now = time.monotonic()
        hit = self._cache.get(user)
        if hit is not None and now - hit[0] < AUTH_QUERY_CACHE_SECONDS:
            return hit[1]
        secret = await self._query(user)
        self._cache[user] = (now, secret)
        return secret

    async def _query(self, user: str) -> UserSecret | None:
        a = self.config.auth
        params = {"user": a.auth_user, "database": a.auth_dbname, "application_name": "connmgr auth_query"}
        session = await open_backend(
            self.server, params, Credentials(password=a.auth_password or None), max_message_size=1 << 20
        )
        try:
            rows = await _run_one_param_query(session, a.auth_query or DEFAULT_AUTH_QUERY, user)
        finally:
            await session.stream.send_all(m.terminate())
            session.close()
        if not rows:
            return None
        name, passwd = rows[0][0], rows[0][1]
        return secret_from_rolpassword((name or b"").decode(), passwd.decode() if passwd else None)


async def _run_one_param_query(session, sql: str, arg: str) -> list[tuple[bytes | None, ...]]:
    request = (
        m.Parse("", sql, ()).encode()
        + m.Bind("", "", (), (arg.encode("utf-8", "surrogateescape"),), ()).encode()  # the bytes the client sent
        + m.Execute("", 0).encode()
        + m.sync()
    )
    try:
        return await session.query_rows(request)
    except ClientError as e:
        raise ClientError(f"auth_query failed: {e.message}", sqlstate="28000") from None


def _password_failed(user: str) -> ClientError:
    return ClientError(f'password authentication failed for user "{user}"', sqlstate="28P01")


async def _read_password(reader: MessageReader) -> bytes:
    tag, body = await reader.read()
    if tag != FrontendTag.PASSWORD:
        raise ClientError(
            f"expected password response, got message type {chr(tag)!r}", sqlstate="08P01"
        )
    return body


async def authenticate_client(
    config: Config,
    store: SecretStore,
    stream: trio.abc.Stream,
    reader: MessageReader,
    user: str,
) -> Credentials:
    """Run the configured authentication with the client on ``stream``.

    Sends the Authentication requests (not AuthenticationOk: that follows once the backend
    accepted the session). Returns the credentials for the backend login. Raises
    :class:`ClientError` (28P01 wrong password, 28000 no usable secret, 08P01 garbage).
    """
    forced = config.primary.password or None
    method = config.auth_type
    if method == "trust":
        secret = store.users.get(user)
        return _credentials(config, secret, None)

    secret = await store.lookup(user)
    chosen = secret.method_for(method) if secret is not None else method
    if chosen == "md5":
        salt = os.urandom(4)
        await stream.send_all(m.AuthenticationMD5Password(salt).encode())
        data = await _read_password(reader)
        if not data.endswith(b"\0") or b"\0" in data[:-1]:
            raise ClientError("invalid password packet size", sqlstate="08P01")
        try:
            response = data[:-1].decode()
        except UnicodeDecodeError:  # cannot match any md5 response: a wrong password
            raise _password_failed(user) from None
        if secret is None or not secret.check_md5(salt, response):
            raise _password_failed(user)
        return _credentials(config, secret, None)

    scram: ScramServer = scram_server_for(user, secret, mock_key=store.mock_key)
    await stream.send_all(m.AuthenticationSASL(tuple(scram.mechanisms)).encode())
    try:
        mechanism, first = m.parse_sasl_initial_response(await _read_password(reader))
        if first is None:  # the client sends its first message in the next SASLResponse
            await stream.send_all(m.AuthenticationSASLContinue(b"").encode())
            first = await _read_password(reader)
        server_first = scram.client_first(mechanism, first)
        await stream.send_all(m.AuthenticationSASLContinue(server_first).encode())
        server_final = scram.client_final(await _read_password(reader))
    except AuthError as e:
        raise ClientError(str(e), sqlstate=e.sqlstate, detail=getattr(e, "detail", None)) from None
    await stream.send_all(m.AuthenticationSASLFinal(server_final).encode())
    keys = None
    if forced is None and scram.client_key is not None and scram.verifier is not None:
        keys = (scram.client_key, scram.verifier.server_key)
    return _credentials(config, secret, keys)


def _credentials(config: Config, secret: UserSecret | None, scram_keys) -> Credentials:
    if config.primary.password:
        return Credentials(password=config.primary.password)
    if secret is None:
        return Credentials(scram_keys=scram_keys)
    if secret.kind == "plain":
        return Credentials(password=secret.value)
    if secret.kind == "md5":
        return Credentials(md5_hash=secret.value)
    return Credentials(scram_keys=scram_keys)
