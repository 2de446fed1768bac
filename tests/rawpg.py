"""A tiny blocking client for the PostgreSQL v3 wire protocol, for tests that must send
exact bytes and see exact replies (libpq hides the ErrorResponse of a failed connect, and
never sends garbage on purpose).

    with RawPg.connect(cm.host, cm.port) as c:
        msgs = c.login("postgres", "app", password="postgres")   # up to ReadyForQuery
        c.send(b"Q" + struct.pack("!I", 2))                      # anything at all
        msgs = c.read_until_close()                              # every reply, then EOF
        assert error_of(msgs).sqlstate == "08P01"

Every read has a socket timeout (``timeout``, 5 s by default): a reply that never comes
fails the test with :class:`socket.timeout` (``TimeoutError``) instead of hanging it. EOF
and a connection reset both count as "the peer closed"; what was received before stays
readable. Authentication: trust, cleartext, MD5 and SCRAM-SHA-256 (written here from
RFC 5802/7677, independent of connmgr's own implementation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
import time
from dataclasses import dataclass

from shadow import messages as m

__all__ = ["DEFAULT_TIMEOUT", "Msg", "RawPg", "error_of", "errors_in"]

DEFAULT_TIMEOUT = 5.0
_HEADER = struct.Struct("!cI")

# Authentication request codes (the int32 at the start of an 'R' body).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class Msg:
    """One backend message as received: ``tag`` is its type character, ``body`` the bytes
    after the length word."""

    tag: str
    body: bytes

    @property
    def raw(self) -> bytes:
        return self.tag.encode("latin-1") + struct.pack("!I", len(self.body) + 4) + self.body

    @property
    def fields(self) -> dict[str, str]:
        """ErrorResponse/NoticeResponse fields by code (``C`` SQLSTATE, ``M`` message ...)."""
        assert self.tag in "EN", f"{self.tag!r} message has no fields"
        return dict(m.decode_backend(ord(self.tag), self.body).fields)

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str | None:
        f = self.fields
        return f.get("V") or f.get("S")

    @property
    def auth_code(self) -> int:
        assert self.tag == "R", f"{self.tag!r} is not an Authentication message"
        return struct.unpack_from("!I", self.body)[0]

    @property
    def status(self) -> str:
        """ReadyForQuery's transaction status (I, T or E)."""
        assert self.tag == "Z", f"{self.tag!r} is not ReadyForQuery"
        return chr(self.body[0])

    def decoded(self) -> object:
        return m.decode_backend(ord(self.tag), self.body)

    def __repr__(self) -> str:
        if self.tag in "EN":
            return f"Msg({self.tag!r}, {self.fields})"
        return f"Msg({self.tag!r}, {self.body[:60]!r})"


def errors_in(msgs: list[Msg]) -> list[Msg]:
    return [x for x in msgs if x.tag == "E"]


def error_of(msgs: list[Msg]) -> Msg:
    """The one ErrorResponse in ``msgs`` (AssertionError if there is none or several)."""
    errs = errors_in(msgs)
    assert len(errs) == 1, f"expected exactly one ErrorResponse, got {msgs!r}"
    return errs[0]


class RawPg:
    """One blocking TCP connection speaking raw protocol. See the module docstring."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        self._buf = bytearray()
        self.eof = False  # the peer closed (or reset) the connection

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> RawPg:
        """Open a TCP connection; raises OSError (e.g. ConnectionRefusedError)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout)

    # ------------------------------------------------------------------ bytes

    def send(self, data: bytes) -> None:
        """Send ``data`` as is."""
        self.sock.sendall(data)

    def send_quietly(self, data: bytes) -> bool:
        """Send ``data``; False if the peer already closed (EPIPE / ECONNRESET)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _fill(self) -> bool:
        """Receive more bytes into the buffer; False at EOF. Raises TimeoutError."""
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._buf += chunk
        return True

    def peek(self, n: int) -> bytes | None:
        """The next ``n`` bytes without consuming them, or None if the peer closed first."""
        while len(self._buf) < n:
            if not self._fill():
                return None
        return bytes(self._buf[:n])

    def read_exact(self, n: int) -> bytes | None:
        """``n`` bytes, or None if the peer closed first."""
        while len(self._buf) < n:
            if not self._fill():
                return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    # ------------------------------------------------------------------ messages

    def read_message(self) -> Msg | None:
        """The next typed message, or None at EOF (a partial message at EOF is an error)."""
        head = self.read_exact(5)
        if head is None:
            assert not self._buf, f"peer closed inside a message header: {bytes(self._buf)!r}"
            return None
        tag, length = _HEADER.unpack(head)
        assert length >= 4, f"nonsense length {length} from the server"
        body = self.read_exact(length - 4)
        assert body is not None, f"peer closed inside a {tag!r} message"
        return Msg(tag.decode("latin-1"), body)

    def read_until_ready(self) -> list[Msg]:
        """Messages up to and including ReadyForQuery. If the peer closes first, returns
        what came (so the caller can assert on the ErrorResponse)."""
        out: list[Msg] = []
        while True:
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)
            if msg.tag == "Z":
                return out

    def read_until_close(self, timeout: float | None = None) -> list[Msg]:
        """Every message until the peer closes. Fails (AssertionError) if it is still open
        after ``timeout`` seconds (default: the connection's timeout)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out: list[Msg] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"connection still open after {timeout or self.timeout}s; got {out!r}"
                )
            self.sock.settimeout(left)
            try:
                msg = self.read_message()
            except TimeoutError:
                raise AssertionError(
                    f"connection still open after {timeout or self.timeout}s; got {out!r}"
                ) from None
            finally:
                self.sock.settimeout(self.timeout)
            if msg is None:
                return out
            out.append(msg)

    def query(self, sql: str) -> list[Msg]:
        """Send a simple Query; return the replies up to ReadyForQuery."""
        self.send(m.query(sql))
        return self.read_until_ready()

    # ------------------------------------------------------------------ startup

    def send_startup(self, params: dict[str, str], protocol: int = m.PROTOCOL_3_0) -> None:
        self.send(m.startup_message(params, protocol))

    def login(
        self, user: str, database: str = "app", password: str | None = None, **params: str
    ) -> list[Msg]:
        """StartupMessage plus whatever authentication is asked for; returns every message
        up to ReadyForQuery, or up to the close if the server refuses (then the last one is
        normally the ErrorResponse). Raises AssertionError if a password is needed and
        ``password`` is None."""
        self.send_startup({"user": user, "database": database, **params})
        return self.authenticate(user, password)

    def authenticate(self, user: str, password: str | None) -> list[Msg]:
        """Answer Authentication requests, then read up to ReadyForQuery (see login)."""
        out: list[Msg] = []
        scram: _Scram | None = None
        while True:
            msg = self.read_message()
            if msg is None:
                return out
            out.append(msg)
            if msg.tag == "Z" or msg.tag == "E":
                if msg.tag == "E":
                    out.extend(self.read_until_close())
                return out
            if msg.tag != "R":
                continue
            code = msg.auth_code
            if code == AUTH_OK:
                continue
            assert password is not None, (
                f"server asks for a password (auth code {code}) and we have none"
            )
            if code == AUTH_CLEARTEXT:
                self.send(m.password_message(password))
            elif code == AUTH_MD5:
                salt = msg.body[4:8]
                inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
                self.send(
                    m.password_message("md5" + hashlib.md5(inner.encode() + salt).hexdigest())
                )
            elif code == AUTH_SASL:
                mechanisms = [x.decode() for x in msg.body[4:].split(b"\0") if x]
                assert "SCRAM-SHA-256" in mechanisms, mechanisms
                scram = _Scram(password)
                self.send(m.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
            elif code == AUTH_SASL_CONTINUE:
                assert scram is not None
                self.send(m.sasl_response(scram.client_final(msg.body[4:])))
            elif code == AUTH_SASL_FINAL:
                assert scram is not None
                scram.verify_server_final(msg.body[4:])
            else:
                raise AssertionError(f"unsupported authentication request {code}")

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPg:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Scram:
    """Client side of SCRAM-SHA-256 without channel binding (RFC 5802, 7677). The user
    name in the exchange is empty, as libpq sends it (Postgres uses the startup user)."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def client_first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce), "server nonce does not extend ours"
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password, base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, data: bytes) -> None:
        text = data.decode()
        assert text.startswith("v="), f"server final message {text!r}"
        assert base64.b64decode(text[2:]) == self.server_signature, "server signature mismatch"
