"""Every message of the Postgres v3 protocol as an immutable record, with its codec.

How it works
------------
Each message is a frozen, slotted dataclass whose ``encode()`` returns the complete message:
type byte, ``int32`` length and body (startup-phase messages have no type byte). Three
decoders turn a body -- the bytes after the length word, as :class:`~shadow.framing.Framer`
delimits them -- back into a record:

* :func:`decode_startup` for the untyped startup packets (StartupMessage, SSLRequest,
  GSSENCRequest, CancelRequest);
* :func:`decode_frontend` and :func:`decode_backend` for typed messages. There are two
  because type bytes collide: ``D`` is Describe from the client but DataRow from the
  server, and ``C``, ``E``, ``S``, ``H`` likewise differ by direction (``d`` and ``c``,
  CopyData and CopyDone, are the same message both ways).

A type byte neither decoder knows becomes :class:`Unknown`, whose ``encode()`` gives back
the original bytes: unknown messages pass through, they are never an error here.

Decoding is strict. Every decoder reads through a bounded :class:`Reader` that refuses to
read past the body and insists the body is consumed exactly; truncation, a missing NUL, a
negative length, trailing bytes, invalid UTF-8 or an illegal enumerated value raise
:class:`~shadow.errors.RemoteProtocolError` (SQLSTATE 08P01) whose text names the message
and the fault, never the data (bodies carry passwords and SQL literals). Encoding is
checked too: a value that cannot be put on the wire (a NUL inside a string, a count that
does not fit its 16 bits) raises :class:`~shadow.errors.LocalProtocolError`.

Integer conventions follow the server: element counts are unsigned 16-bit (a Bind may
carry 65535 parameters), object ids are unsigned 32-bit, value lengths are signed 32-bit
with -1 meaning NULL, format codes are signed 16-bit and are *not* range-checked in
frontend messages (the server answers a bad one with an ordinary ERROR, so the proxy must
let it through).

The decoders the proxy calls for every message (ReadyForQuery, CommandComplete,
ErrorResponse/NoticeResponse, ParameterStatus) are written by hand around ``bytes.find`` and
``bytes.split`` instead of the Reader, and the bodiless messages decode to shared instances.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from struct import Struct
from struct import error as StructError
from typing import ClassVar, Literal

from shadow.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    # type bytes and protocol codes
    "FrontendTag",
    "BackendTag",
    "PROTOCOL_3_0",
    "SSL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "CANCEL_REQUEST_CODE",
    "NULL_LENGTH",
    "Reader",
    # startup phase
    "StartupMessage",
    "SSLRequest",
    "GSSENCRequest",
    "CancelRequest",
    # frontend
    "Query",
    "Parse",
    "Bind",
    "Describe",
    "Execute",
    "Close",
    "Sync",
    "Flush",
    "Terminate",
    "CopyData",
    "CopyDone",
    "CopyFail",
    "FunctionCall",
    "PasswordMessage",
    "Unknown",
    # backend
    "Authentication",
    "AuthenticationOk",
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendKeyData",
    "BindComplete",
    "CloseComplete",
    "CommandComplete",
    "CopyInResponse",
    "CopyOutResponse",
    "CopyBothResponse",
    "DataRow",
    "EmptyQueryResponse",
    "ErrorResponse",
    "NoticeResponse",
    "FunctionCallResponse",
    "NegotiateProtocolVersion",
    "NoData",
    "NotificationResponse",
    "ParameterDescription",
    "ParameterStatus",
    "ParseComplete",
    "PortalSuspended",
    "ReadyForQuery",
    "FieldDescription",
    "RowDescription",
    # decoders and helpers
    "decode_startup",
    "decode_frontend",
    "decode_backend",
    "parse_password",
    "parse_sasl_initial_response",
    # convenience encoders
    "error_response",
    "notice_response",
    "ready_for_query",
    "authentication_ok",
    "parameter_status",
    "backend_key_data",
    "command_complete",
    "row_description",
    "data_row",
    "empty_query_response",
    "startup_message",
    "ssl_request",
    "gssenc_request",
    "cancel_request",
    "password_message",
    "sasl_initial_response",
    "sasl_response",
    "query",
    "sync",
    "terminate",
]

Body = bytes | bytearray | memoryview

#: Protocol version 3.0 as sent in a StartupMessage (major in the high 16 bits).
PROTOCOL_3_0 = 3 << 16
#: Codes in the protocol-version slot of the special startup packets (1234.5679 etc.).
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
#: Value length meaning SQL NULL (DataRow, Bind, FunctionCall, FunctionCallResponse).
NULL_LENGTH = -1
#: Newest protocol minor version we know of (3.2, PostgreSQL 18); decoding accepts any 3.x.
_NEWEST_MINOR = 2
#: Protocol 3.2 allows cancel keys of up to 256 bytes (3.0 keys are exactly 4).
_MAX_CANCEL_KEY = 256


class FrontendTag(enum.IntEnum):
    """Type bytes of messages a client sends (compare with the ``int`` tag of a frame)."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    #: PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share it.
    PASSWORD = ord("p")
    PARSE = ord("P")
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BackendTag(enum.IntEnum):
    """Type bytes of messages a server sends."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    COPY_BOTH_RESPONSE = ord("W")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


# --------------------------------------------------------------------------- wire primitives

_I8 = Struct("!b")
_I16 = Struct("!h")
_U16 = Struct("!H")
_I32 = Struct("!i")
_U32 = Struct("!I")
_HEADER = Struct("!BI")
_ALLOWED_BYTE_SEQUENCES = (bytes, bytearray, memoryview)


class Reader:
    """A bounded, forward-only reader over one message body.

    Every ``read_*`` method raises :class:`RemoteProtocolError` ("malformed <what>: ...")
    instead of reading past the end; :meth:`finish` raises if bytes are left over. The
    ``field`` arguments only name the field in those error texts.
    """

    __slots__ = ("_buf", "_pos", "_what")

    def __init__(self, body: Body, what: str) -> None:
        self._buf = body if type(body) is bytes else bytes(body)
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self._buf) - self._pos

    def error(self, problem: str) -> RemoteProtocolError:
        """Return (not raise) the error for ``problem`` in this message."""
        return RemoteProtocolError(f"malformed {self._what}: {problem}")

    def _advance(self, n: int, field: str) -> int:
        pos = self._pos
        if pos + n > len(self._buf):
            left = len(self._buf) - pos
            if left == 0:
                raise self.error(f"message ends before {field}")
            raise self.error(
                f"message ends inside {field} ({n} bytes needed at offset {pos}, {left} left)"
            )
        self._pos = pos + n
        return pos

    def read_int8(self, field: str) -> int:
        return _I8.unpack_from(self._buf, self._advance(1, field))[0]

    def read_byte(self, field: str) -> int:
        """One unsigned byte."""
        return self._buf[self._advance(1, field)]

    def read_int16(self, field: str) -> int:
        return _I16.unpack_from(self._buf, self._advance(2, field))[0]

    def read_uint16(self, field: str) -> int:
        return _U16.unpack_from(self._buf, self._advance(2, field))[0]

    def read_int32(self, field: str) -> int:
        return _I32.unpack_from(self._buf, self._advance(4, field))[0]

    def read_uint32(self, field: str) -> int:
        return _U32.unpack_from(self._buf, self._advance(4, field))[0]

    def read_bytes(self, n: int, field: str) -> bytes:
        """Exactly ``n`` bytes; a negative ``n`` is a malformed length."""
        if n < 0:
            raise self.error(f"{field} length {n} is invalid")
        pos = self._advance(n, field)
        return self._buf[pos : pos + n]

    def read_rest(self) -> bytes:
        """Everything not read yet (possibly ``b""``)."""
        pos = self._pos
        self._pos = len(self._buf)
        return self._buf[pos:]

    def read_cstring(self, field: str, errors: str = "strict") -> str:
        """A NUL-terminated UTF-8 string, without its NUL. ``errors="surrogateescape"``
        keeps bytes that are not UTF-8 (they encode back to themselves)."""
        buf = self._buf
        pos = self._pos
        end = buf.find(0, pos)
        if end < 0:
            if pos >= len(buf):
                raise self.error(f"message ends before {field}")
            raise self.error(f"{field} is missing its NUL terminator")
        self._pos = end + 1
        try:
            return buf[pos:end].decode("utf-8", errors)
        except UnicodeDecodeError as exc:
            raise self.error(f"{field} is not valid UTF-8 (bad byte at offset {pos + exc.start})")

    def read_value(self, field: str) -> bytes | None:
        """An ``int32`` length (-1 = NULL) followed by that many bytes."""
        n = self.read_int32(f"length of {field}")
        if n == NULL_LENGTH:
            return None
        if n < 0:
            raise self.error(f"{field} length {n} is invalid")
        return self.read_bytes(n, field)

    def finish(self) -> None:
        """Raise unless the whole body has been read."""
        extra = len(self._buf) - self._pos
        if extra:
            raise self.error(f"{extra} unexpected bytes after the last field")


def _typed(tag: int, body: bytes) -> bytes:
    if len(body) > 0x7FFFFFFB:
        raise LocalProtocolError(f"message body of {len(body)} bytes is too long to encode")
    return _HEADER.pack(tag, len(body) + 4) + body


def _cstr(value: str, what: str, errors: str = "strict") -> bytes:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a str, not {type(value).__name__}")
    try:
        raw = value.encode("utf-8", errors)
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} cannot be encoded as UTF-8")
    if 0 in raw:
        raise LocalProtocolError(f"{what} contains a NUL character")
    return raw + b"\0"


def _raw(value: Body, what: str) -> bytes:
    if not isinstance(value, _ALLOWED_BYTE_SEQUENCES):
        raise LocalProtocolError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


def _pack(st: Struct, value: int, what: str) -> bytes:
    try:
        return st.pack(value)
    except StructError:
        raise LocalProtocolError(f"{what} {value!r} does not fit the wire format")


def _count(n: int, what: str) -> bytes:
    return _pack(_U16, n, f"number of {what}")


def _int16s(values: Iterable[int], what: str) -> bytes:
    values = tuple(values)
    return _count(len(values), what) + b"".join(_pack(_I16, v, what) for v in values)


def _values(values: Iterable[bytes | None], what: str) -> bytes:
    values = tuple(values)
    parts = [_count(len(values), what)]
    for v in values:
        if v is None:
            parts.append(_I32.pack(NULL_LENGTH))
        else:
            v = _raw(v, what)
            parts.append(_pack(_I32, len(v), f"length of {what}"))
            parts.append(v)
    return b"".join(parts)


def _kind(kind: str, what: str) -> bytes:
    if kind not in ("S", "P"):
        raise LocalProtocolError(f"{what} kind must be 'S' or 'P', not {kind!r}")
    return kind.encode()


def _read_int16s(r: Reader, what: str) -> tuple[int, ...]:
    n = r.read_uint16(f"number of {what}s")
    return tuple(r.read_int16(f"{what} {i}") for i in range(1, n + 1))


def _read_values(r: Reader, what: str) -> tuple[bytes | None, ...]:
    n = r.read_uint16(f"number of {what}s")
    return tuple(r.read_value(f"{what} {i}") for i in range(1, n + 1))


def _require_empty(body: Body, what: str) -> None:
    if len(body):
        raise RemoteProtocolError(f"malformed {what}: {len(body)} unexpected bytes in its body")


# ----------------------------------------------------------------------- startup-phase messages


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first packet of a normal connection. ``protocol_version`` is
    ``major << 16 | minor`` (:data:`PROTOCOL_3_0` = 196608); ``parameters`` keeps the
    client's order (a repeated name keeps its first position and its last value).
    ``pairs`` is every (name, value) as sent, repeats included, which is what
    :meth:`encode` writes when given: Postgres applies them in order and decides.
    Names and values are decoded with ``surrogateescape``: bytes that are not UTF-8 are
    kept and encoded back unchanged (Postgres takes them as bytes too)."""

    protocol_version: int
    parameters: dict[str, str]
    pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.pairs:  # built from a mapping: one pair per name
            object.__setattr__(self, "pairs", tuple(self.parameters.items()))

    @property
    def major(self) -> int:
        return self.protocol_version >> 16

    @property
    def minor(self) -> int:
        return self.protocol_version & 0xFFFF

    def encode(self) -> bytes:
        parts = [_pack(_U32, self.protocol_version, "protocol version")]
        for name, value in self.pairs:
            if not name:
                raise LocalProtocolError("a startup parameter name must not be empty")
            parts.append(_cstr(name, "startup parameter name", "surrogateescape"))
            parts.append(_cstr(value, f"value of startup parameter {name!r}", "surrogateescape"))
        parts.append(b"\0")
        body = b"".join(parts)
        return _U32.pack(len(body) + 4) + body


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _U32.pack(8) + _U32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _U32.pack(8) + _U32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Sent on a fresh connection. ``secret`` is an ``int`` (uint32) for the 4-byte keys of
    protocol 3.0, ``bytes`` for the longer keys protocol 3.2 allows."""

    pid: int
    secret: int | bytes

    def encode(self) -> bytes:
        body = _U32.pack(CANCEL_REQUEST_CODE) + _pack(_I32, self.pid, "process id")
        body += _encode_secret(self.secret)
        return _U32.pack(len(body) + 4) + body


def _encode_secret(secret: int | bytes) -> bytes:
    if isinstance(secret, int):
        return _pack(_U32, secret, "secret key")
    key = _raw(secret, "secret key")
    if not 4 <= len(key) <= _MAX_CANCEL_KEY:
        raise LocalProtocolError(f"secret key of {len(key)} bytes (must be 4 to 256)")
    return key


def _decode_secret(r: Reader) -> int | bytes:
    n = r.remaining
    if n == 4:
        return r.read_uint32("secret key")
    if not 4 <= n <= _MAX_CANCEL_KEY:
        raise r.error(f"secret key of {n} bytes (must be 4 to {_MAX_CANCEL_KEY})")
    return r.read_rest()


def decode_startup(body: Body) -> StartupMessage | SSLRequest | GSSENCRequest | CancelRequest:
    """Decode an untyped startup-phase packet (``body`` = the bytes after its length).

    Returns the request. Raises :class:`RemoteProtocolError`: SQLSTATE 08P01 for a malformed
    packet, 0A000 for a protocol major version other than 3, 28000 for a StartupMessage
    without a ``user``. A minor version above 0 (with ``_pq_.`` options) is decoded as is;
    answering it with NegotiateProtocolVersion is the caller's decision.
    """
    r = Reader(body, "startup packet")
    code = r.read_uint32("protocol version")
    if code == SSL_REQUEST_CODE:
        r.finish()
        return _SSL_REQUEST
    if code == GSSENC_REQUEST_CODE:
        r.finish()
        return _GSSENC_REQUEST
    if code == CANCEL_REQUEST_CODE:
        pid = r.read_int32("process id")
        return CancelRequest(pid, _decode_secret(r))
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise RemoteProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to"
            f" 3.{_NEWEST_MINOR}",
            sqlstate="0A000",
        )
    params: dict[str, str] = {}
    pairs = []
    while True:
        name = r.read_cstring("startup parameter name", "surrogateescape")
        if not name:
            break
        value = r.read_cstring(f"value of startup parameter {name!r}", "surrogateescape")
        params[name] = value
        pairs.append((name, value))
    r.finish()
    if not params.get("user"):
        raise RemoteProtocolError(
            "no PostgreSQL user name specified in startup packet", sqlstate="28000"
        )
    return StartupMessage(code, params, tuple(pairs))


_SSL_REQUEST = SSLRequest()
_GSSENC_REQUEST = GSSENCRequest()


# --------------------------------------------------------------------------- frontend messages


@dataclass(frozen=True, slots=True)
class Query:
    TAG: ClassVar[int] = FrontendTag.QUERY
    sql: str

    def encode(self) -> bytes:
        return _typed(self.TAG, _cstr(self.sql, "query string"))


@dataclass(frozen=True, slots=True)
class Parse:
    TAG: ClassVar[int] = FrontendTag.PARSE
    name: str
    query: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        types = tuple(self.param_types)
        body = b"".join(
            (
                _cstr(self.name, "statement name"),
                _cstr(self.query, "query string"),
                _count(len(types), "parameter types"),
                *(_pack(_U32, t, "parameter type oid") for t in types),
            )
        )
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class Bind:
    TAG: ClassVar[int] = FrontendTag.BIND
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        body = b"".join(
            (
                _cstr(self.portal, "portal name"),
                _cstr(self.statement, "statement name"),
                _int16s(self.param_formats, "parameter format codes"),
                _values(self.params, "parameters"),
                _int16s(self.result_formats, "result format codes"),
            )
        )
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class Describe:
    """``kind`` is ``'S'`` (prepared statement) or ``'P'`` (portal)."""

    TAG: ClassVar[int] = FrontendTag.DESCRIBE
    kind: Literal["S", "P"]
    name: str

    def encode(self) -> bytes:
        return _typed(self.TAG, _kind(self.kind, "Describe") + _cstr(self.name, "name"))


@dataclass(frozen=True, slots=True)
class Execute:
    """``max_rows`` 0 means no limit."""

    TAG: ClassVar[int] = FrontendTag.EXECUTE
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        body = _cstr(self.portal, "portal name") + _pack(_I32, self.max_rows, "row limit")
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class Close:
    """``kind`` is ``'S'`` (prepared statement) or ``'P'`` (portal)."""

    TAG: ClassVar[int] = FrontendTag.CLOSE
    kind: Literal["S", "P"]
    name: str

    def encode(self) -> bytes:
        return _typed(self.TAG, _kind(self.kind, "Close") + _cstr(self.name, "name"))


@dataclass(frozen=True, slots=True)
class Sync:
    TAG: ClassVar[int] = FrontendTag.SYNC

    def encode(self) -> bytes:
        return b"S\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class Flush:
    TAG: ClassVar[int] = FrontendTag.FLUSH

    def encode(self) -> bytes:
        return b"H\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class Terminate:
    TAG: ClassVar[int] = FrontendTag.TERMINATE

    def encode(self) -> bytes:
        return b"X\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class CopyData:
    """Sent by both sides; the decoders of both directions return it."""

    TAG: ClassVar[int] = FrontendTag.COPY_DATA
    data: bytes

    def encode(self) -> bytes:
        return _typed(self.TAG, _raw(self.data, "copy data"))


@dataclass(frozen=True, slots=True)
class CopyDone:
    """Sent by both sides."""

    TAG: ClassVar[int] = FrontendTag.COPY_DONE

    def encode(self) -> bytes:
        return b"c\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class CopyFail:
    TAG: ClassVar[int] = FrontendTag.COPY_FAIL
    message: str

    def encode(self) -> bytes:
        return _typed(self.TAG, _cstr(self.message, "error message"))


@dataclass(frozen=True, slots=True)
class FunctionCall:
    TAG: ClassVar[int] = FrontendTag.FUNCTION_CALL
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def encode(self) -> bytes:
        body = b"".join(
            (
                _pack(_U32, self.function_oid, "function oid"),
                _int16s(self.arg_formats, "argument format codes"),
                _values(self.args, "arguments"),
                _pack(_I16, self.result_format, "result format code"),
            )
        )
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """Any ``p`` message, undecoded: PasswordMessage, SASLInitialResponse, SASLResponse or
    GSSResponse look alike on the wire and only the authentication exchange tells them
    apart. Use :func:`parse_password` or :func:`parse_sasl_initial_response` on ``data``."""

    TAG: ClassVar[int] = FrontendTag.PASSWORD
    data: bytes = field(repr=False)

    def encode(self) -> bytes:
        return _typed(self.TAG, _raw(self.data, "password message"))


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message of a type this module does not know (either direction); passed through."""

    tag: int
    body: bytes

    def encode(self) -> bytes:
        if not 0 < self.tag < 256:
            raise LocalProtocolError(f"message type {self.tag} is not a byte")
        return _typed(self.tag, _raw(self.body, "message body"))


def parse_password(data: Body) -> str:
    """Return the password (or ``md5...`` hash) of a PasswordMessage's ``data``.

    Raises :class:`RemoteProtocolError` if it is not one NUL-terminated UTF-8 string.
    """
    r = Reader(data, "PasswordMessage")
    password = r.read_cstring("password")
    r.finish()
    return password


def parse_sasl_initial_response(data: Body) -> tuple[str, bytes | None]:
    """Return ``(mechanism, initial_response)`` of a SASLInitialResponse's ``data``;
    ``initial_response`` is None when the client sent length -1.

    Raises :class:`RemoteProtocolError` if ``data`` is malformed.
    """
    r = Reader(data, "SASLInitialResponse message")
    mechanism = r.read_cstring("mechanism name")
    response = r.read_value("initial response")
    r.finish()
    return mechanism, response


def _dec_query(body: Body) -> Query:
    r = Reader(body, "Query message")
    sql = r.read_cstring("query string")
    r.finish()
    return Query(sql)


def _dec_parse(body: Body) -> Parse:
    r = Reader(body, "Parse message")
    name = r.read_cstring("statement name")
    sql = r.read_cstring("query string")
    n = r.read_uint16("number of parameter types")
    types = tuple(r.read_uint32(f"type of parameter {i}") for i in range(1, n + 1))
    r.finish()
    return Parse(name, sql, types)


def _dec_bind(body: Body) -> Bind:
    r = Reader(body, "Bind message")
    portal = r.read_cstring("portal name")
    statement = r.read_cstring("statement name")
    param_formats = _read_int16s(r, "parameter format code")
    params = _read_values(r, "parameter")
    result_formats = _read_int16s(r, "result format code")
    r.finish()
    return Bind(portal, statement, param_formats, params, result_formats)


def _dec_kind(r: Reader, what: str) -> Literal["S", "P"]:
    kind = r.read_byte(f"{what} kind")
    if kind == 0x53:
        return "S"
    if kind == 0x50:
        return "P"
    raise r.error(f"{what} kind {_show_byte(kind)} is neither 'S' nor 'P'")


def _dec_describe(body: Body) -> Describe:
    r = Reader(body, "Describe message")
    kind = _dec_kind(r, "Describe")
    name = r.read_cstring("name")
    r.finish()
    return Describe(kind, name)


def _dec_close(body: Body) -> Close:
    r = Reader(body, "Close message")
    kind = _dec_kind(r, "Close")
    name = r.read_cstring("name")
    r.finish()
    return Close(kind, name)


def _dec_execute(body: Body) -> Execute:
    r = Reader(body, "Execute message")
    portal = r.read_cstring("portal name")
    max_rows = r.read_int32("row limit")
    r.finish()
    return Execute(portal, max_rows)


def _dec_copy_fail(body: Body) -> CopyFail:
    r = Reader(body, "CopyFail message")
    message = r.read_cstring("error message")
    r.finish()
    return CopyFail(message)


def _dec_function_call(body: Body) -> FunctionCall:
    r = Reader(body, "FunctionCall message")
    oid = r.read_uint32("function oid")
    arg_formats = _read_int16s(r, "argument format code")
    args = _read_values(r, "argument")
    result_format = r.read_int16("result format code")
    r.finish()
    return FunctionCall(oid, arg_formats, args, result_format)


def _empty_decoder(instance: object, what: str) -> Callable[[Body], object]:
    def decode(body: Body) -> object:
        if len(body):
            _require_empty(body, what)
        return instance

    return decode


def _dec_copy_data(body: Body) -> CopyData:
    return CopyData(bytes(body))


_FRONTEND_DECODERS: dict[int, Callable[[Body], object]] = {
    FrontendTag.QUERY: _dec_query,
    FrontendTag.PARSE: _dec_parse,
    FrontendTag.BIND: _dec_bind,
    FrontendTag.DESCRIBE: _dec_describe,
    FrontendTag.EXECUTE: _dec_execute,
    FrontendTag.CLOSE: _dec_close,
    FrontendTag.SYNC: _empty_decoder(Sync(), "Sync message"),
    FrontendTag.FLUSH: _empty_decoder(Flush(), "Flush message"),
    FrontendTag.TERMINATE: _empty_decoder(Terminate(), "Terminate message"),
    FrontendTag.COPY_DATA: _dec_copy_data,
    FrontendTag.COPY_DONE: _empty_decoder(CopyDone(), "CopyDone message"),
    FrontendTag.COPY_FAIL: _dec_copy_fail,
    FrontendTag.FUNCTION_CALL: _dec_function_call,
    FrontendTag.PASSWORD: lambda body: PasswordMessage(bytes(body)),
}


def decode_frontend(tag: int, body: Body) -> object:
    """Decode the body of a typed message sent by a client.

    Returns the message record, or :class:`Unknown` for a type byte that is not a frontend
    message. Raises :class:`RemoteProtocolError` (08P01) if the body is malformed.
    """
    decoder = _FRONTEND_DECODERS.get(tag)
    if decoder is None:
        return Unknown(tag, bytes(body))
    return decoder(body)


# ---------------------------------------------------------------------------- backend messages


@dataclass(frozen=True, slots=True)
class Authentication:
    """An authentication request with no class of its own: KerberosV5 (2), GSS (7),
    GSSContinue (8, ``data`` = GSSAPI data), SSPI (9) or a code we do not know."""

    TAG: ClassVar[int] = BackendTag.AUTHENTICATION
    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return _typed(
            self.TAG, _pack(_I32, self.code, "authentication code") + _raw(self.data, "data")
        )


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    TAG: ClassVar[int] = BackendTag.AUTHENTICATION

    def encode(self) -> bytes:
        return b"R\0\0\0\x08\0\0\0\0"


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    TAG: ClassVar[int] = BackendTag.AUTHENTICATION

    def encode(self) -> bytes:
        return b"R\0\0\0\x08\0\0\0\x03"


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    TAG: ClassVar[int] = BackendTag.AUTHENTICATION
    salt: bytes

    def encode(self) -> bytes:
        salt = _raw(self.salt, "salt")
        if len(salt) != 4:
            raise LocalProtocolError(f"MD5 salt must be 4 bytes, not {len(salt)}")
        return _typed(self.TAG, _I32.pack(5) + salt)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    TAG: ClassVar[int] = BackendTag.AUTHENTICATION
    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        parts = [_I32.pack(10)]
        for m in self.mechanisms:
            if not m:
                raise LocalProtocolError("a SASL mechanism name must not be empty")
            parts.append(_cstr(m, "SASL mechanism name"))
        parts.append(b"\0")
        return _typed(self.TAG, b"".join(parts))


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    TAG: ClassVar[int] = BackendTag.AUTHENTICATION
    data: bytes

    def encode(self) -> bytes:
        return _typed(self.TAG, _I32.pack(11) + _raw(self.data, "SASL data"))


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    TAG: ClassVar[int] = BackendTag.AUTHENTICATION
    data: bytes

    def encode(self) -> bytes:
        return _typed(self.TAG, _I32.pack(12) + _raw(self.data, "SASL data"))


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """``secret`` is an ``int`` (uint32) for a 4-byte key (protocol 3.0), ``bytes`` for
    the longer keys of protocol 3.2."""

    TAG: ClassVar[int] = BackendTag.BACKEND_KEY_DATA
    pid: int
    secret: int | bytes

    def encode(self) -> bytes:
        body = _pack(_I32, self.pid, "process id") + _encode_secret(self.secret)
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class BindComplete:
    TAG: ClassVar[int] = BackendTag.BIND_COMPLETE

    def encode(self) -> bytes:
        return b"2\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class CloseComplete:
    TAG: ClassVar[int] = BackendTag.CLOSE_COMPLETE

    def encode(self) -> bytes:
        return b"3\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class CommandComplete:
    """``tag`` is the command tag, e.g. ``"SELECT 3"``, ``"INSERT 0 1"``, ``"COMMIT"``."""

    TAG: ClassVar[int] = BackendTag.COMMAND_COMPLETE
    tag: str

    def encode(self) -> bytes:
        return _typed(self.TAG, _cstr(self.tag, "command tag"))


@dataclass(frozen=True, slots=True)
class _CopyResponse:
    """``format`` 0 = text, 1 = binary; one format code (0/1) per column."""

    TAG: ClassVar[int]
    format: int
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        if self.format not in (0, 1):
            raise LocalProtocolError(f"copy format must be 0 or 1, not {self.format!r}")
        if any(f not in (0, 1) for f in self.column_formats):
            raise LocalProtocolError("copy column format codes must be 0 or 1")
        body = bytes((self.format,)) + _int16s(self.column_formats, "column format codes")
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    TAG: ClassVar[int] = BackendTag.COPY_IN_RESPONSE


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    TAG: ClassVar[int] = BackendTag.COPY_OUT_RESPONSE


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    TAG: ClassVar[int] = BackendTag.COPY_BOTH_RESPONSE


@dataclass(frozen=True, slots=True)
class DataRow:
    """One row; ``None`` is SQL NULL. Values are the raw text or binary representations."""

    TAG: ClassVar[int] = BackendTag.DATA_ROW
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        return _typed(self.TAG, _values(self.values, "columns"))


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    TAG: ClassVar[int] = BackendTag.EMPTY_QUERY_RESPONSE

    def encode(self) -> bytes:
        return b"I\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class _Fields:
    """ErrorResponse / NoticeResponse: ``fields`` maps a one-letter field code to its text
    (S severity, V non-localized severity, C SQLSTATE, M message, D detail, H hint, ...)."""

    TAG: ClassVar[int]
    fields: dict[str, str]

    @property
    def severity(self) -> str | None:
        """The non-localized severity (``V``), else the localized one (``S``)."""
        f = self.fields
        return f.get("V") or f.get("S")

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str | None:
        return self.fields.get("M")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")

    def encode(self) -> bytes:
        parts = []
        for code, value in self.fields.items():
            if not isinstance(code, str) or len(code) != 1 or not 0 < ord(code) < 256:
                raise LocalProtocolError(f"field code {code!r} is not a single non-NUL byte")
            parts.append(code.encode("latin-1"))
            parts.append(_cstr(value, f"field {code!r}"))
        parts.append(b"\0")
        return _typed(self.TAG, b"".join(parts))


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    TAG: ClassVar[int] = BackendTag.ERROR_RESPONSE


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    TAG: ClassVar[int] = BackendTag.NOTICE_RESPONSE


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    """``value`` is None for a NULL result."""

    TAG: ClassVar[int] = BackendTag.FUNCTION_CALL_RESPONSE
    value: bytes | None

    def encode(self) -> bytes:
        if self.value is None:
            return _typed(self.TAG, _I32.pack(NULL_LENGTH))
        v = _raw(self.value, "function result")
        return _typed(self.TAG, _I32.pack(len(v)) + v)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    TAG: ClassVar[int] = BackendTag.NEGOTIATE_PROTOCOL_VERSION
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        options = tuple(self.unrecognized)
        body = b"".join(
            (
                _pack(_I32, self.newest_minor, "minor version"),
                _I32.pack(len(options)),
                *(_cstr(o, "option name", "surrogateescape") for o in options),  # as the client sent them
            )
        )
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class NoData:
    TAG: ClassVar[int] = BackendTag.NO_DATA

    def encode(self) -> bytes:
        return b"n\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    TAG: ClassVar[int] = BackendTag.NOTIFICATION_RESPONSE
    pid: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        body = b"".join(
            (
                _pack(_I32, self.pid, "process id"),
                _cstr(self.channel, "channel name"),
                _cstr(self.payload, "payload"),
            )
        )
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    TAG: ClassVar[int] = BackendTag.PARAMETER_DESCRIPTION
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        oids = tuple(self.type_oids)
        body = _count(len(oids), "parameters") + b"".join(_pack(_U32, o, "type oid") for o in oids)
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    TAG: ClassVar[int] = BackendTag.PARAMETER_STATUS
    name: str
    value: str

    def encode(self) -> bytes:
        body = _cstr(self.name, "parameter name") + _cstr(self.value, "parameter value")
        return _typed(self.TAG, body)


@dataclass(frozen=True, slots=True)
class ParseComplete:
    TAG: ClassVar[int] = BackendTag.PARSE_COMPLETE

    def encode(self) -> bytes:
        return b"1\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    TAG: ClassVar[int] = BackendTag.PORTAL_SUSPENDED

    def encode(self) -> bytes:
        return b"s\0\0\0\x04"


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """``status``: ``'I'`` idle, ``'T'`` in a transaction block, ``'E'`` in a failed one."""

    TAG: ClassVar[int] = BackendTag.READY_FOR_QUERY
    status: Literal["I", "T", "E"]

    def encode(self) -> bytes:
        return ready_for_query(self.status)


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 25
    type_size: int = -1
    type_modifier: int = -1
    format_code: int = 0

    def _encode(self) -> bytes:
        return b"".join(
            (
                _cstr(self.name, "column name"),
                _pack(_U32, self.table_oid, "table oid"),
                _pack(_I16, self.column_number, "column number"),
                _pack(_U32, self.type_oid, "type oid"),
                _pack(_I16, self.type_size, "type size"),
                _pack(_I32, self.type_modifier, "type modifier"),
                _pack(_I16, self.format_code, "format code"),
            )
        )


@dataclass(frozen=True, slots=True)
class RowDescription:
    TAG: ClassVar[int] = BackendTag.ROW_DESCRIPTION
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        fields = tuple(self.fields)
        body = _count(len(fields), "columns") + b"".join(f._encode() for f in fields)
        return _typed(self.TAG, body)


_AUTH_OK = AuthenticationOk()
_AUTH_CLEARTEXT = AuthenticationCleartextPassword()


def _dec_authentication(body: Body) -> object:
    r = Reader(body, "Authentication message")
    code = r.read_int32("authentication code")
    if code == 0:
        r.finish()
        return _AUTH_OK
    if code == 3:
        r.finish()
        return _AUTH_CLEARTEXT
    if code == 5:
        salt = r.read_bytes(4, "MD5 salt")
        r.finish()
        return AuthenticationMD5Password(salt)
    if code == 10:
        mechanisms = []
        while True:
            m = r.read_cstring("SASL mechanism name")
            if not m:
                break
            mechanisms.append(m)
        r.finish()
        return AuthenticationSASL(tuple(mechanisms))
    if code == 11:
        return AuthenticationSASLContinue(r.read_rest())
    if code == 12:
        return AuthenticationSASLFinal(r.read_rest())
    return Authentication(code, r.read_rest())


def _dec_backend_key_data(body: Body) -> BackendKeyData:
    r = Reader(body, "BackendKeyData message")
    pid = r.read_int32("process id")
    return BackendKeyData(pid, _decode_secret(r))


def _dec_command_complete(body: Body) -> CommandComplete:
    b = body if type(body) is bytes else bytes(body)
    end = b.find(0)
    if end != len(b) - 1 or end < 0:
        raise RemoteProtocolError(
            "malformed CommandComplete message: "
            + (
                "command tag is missing its NUL terminator"
                if end < 0
                else f"{len(b) - end - 1} unexpected bytes after the command tag"
            )
        )
    try:
        return CommandComplete(b[:end].decode())
    except UnicodeDecodeError:
        raise RemoteProtocolError(
            "malformed CommandComplete message: command tag is not valid UTF-8"
        )


def _copy_response_decoder(cls: type[_CopyResponse], what: str) -> Callable[[Body], object]:
    def decode(body: Body) -> _CopyResponse:
        r = Reader(body, what)
        fmt = r.read_int8("copy format")
        if fmt not in (0, 1):
            raise r.error(f"copy format {fmt} is neither 0 (text) nor 1 (binary)")
        formats = _read_int16s(r, "column format code")
        r.finish()
        for i, f in enumerate(formats, 1):
            if f not in (0, 1):
                raise r.error(f"column {i} format code {f} is neither 0 nor 1")
        return cls(fmt, formats)

    return decode


def _dec_data_row(body: Body) -> DataRow:
    r = Reader(body, "DataRow message")
    values = _read_values(r, "column")
    r.finish()
    return DataRow(values)


def _split_fields(body: Body, what: str) -> dict[str, str]:
    b = body if type(body) is bytes else bytes(body)
    if not b or b[-1] != 0:
        raise RemoteProtocolError(
            f"malformed {what}: "
            + ("message ends before the field list terminator" if b else "empty body")
        )
    parts = b[:-1].split(b"\0")
    last = parts.pop()
    fields: dict[str, str] = {}
    for part in parts:
        if not part:
            raise RemoteProtocolError(f"malformed {what}: unexpected bytes after the field list")
        code = chr(part[0])
        try:
            fields[code] = part[1:].decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"malformed {what}: field {code!r} is not valid UTF-8")
    if last:
        raise RemoteProtocolError(f"malformed {what}: field list is missing its terminator")
    return fields


def _dec_error_response(body: Body) -> ErrorResponse:
    return ErrorResponse(_split_fields(body, "ErrorResponse message"))


def _dec_notice_response(body: Body) -> NoticeResponse:
    return NoticeResponse(_split_fields(body, "NoticeResponse message"))


def _dec_function_call_response(body: Body) -> FunctionCallResponse:
    r = Reader(body, "FunctionCallResponse message")
    value = r.read_value("result value")
    r.finish()
    return FunctionCallResponse(value)


def _dec_negotiate(body: Body) -> NegotiateProtocolVersion:
    r = Reader(body, "NegotiateProtocolVersion message")
    newest = r.read_int32("newest minor version")
    n = r.read_int32("number of unrecognized options")
    if n < 0:
        raise r.error(f"number of unrecognized options {n} is negative")
    options = tuple(r.read_cstring(f"option name {i}") for i in range(1, n + 1))
    r.finish()
    return NegotiateProtocolVersion(newest, options)


def _dec_notification(body: Body) -> NotificationResponse:
    r = Reader(body, "NotificationResponse message")
    pid = r.read_int32("process id")
    channel = r.read_cstring("channel name")
    payload = r.read_cstring("payload")
    r.finish()
    return NotificationResponse(pid, channel, payload)


def _dec_parameter_description(body: Body) -> ParameterDescription:
    r = Reader(body, "ParameterDescription message")
    n = r.read_uint16("number of parameters")
    oids = tuple(r.read_uint32(f"type of parameter {i}") for i in range(1, n + 1))
    r.finish()
    return ParameterDescription(oids)


def _dec_parameter_status(body: Body) -> ParameterStatus:
    b = body if type(body) is bytes else bytes(body)
    parts = b.split(b"\0")
    if len(parts) != 3 or parts[2]:
        if len(parts) < 3:
            problem = "missing NUL terminator" + ("s" if len(parts) == 1 else "")
        elif parts[-1]:
            problem = "parameter value is missing its NUL terminator"
        else:
            problem = "unexpected bytes after the parameter value"
        raise RemoteProtocolError(f"malformed ParameterStatus message: {problem}")
    try:
        return ParameterStatus(parts[0].decode(), parts[1].decode())
    except UnicodeDecodeError:
        raise RemoteProtocolError("malformed ParameterStatus message: not valid UTF-8")


def _dec_ready_for_query(body: Body) -> ReadyForQuery:
    if len(body) == 1:
        msg = _READY_BY_BYTE.get(body[0])
        if msg is not None:
            return msg
        raise RemoteProtocolError(
            f"malformed ReadyForQuery message: transaction status {_show_byte(body[0])}"
            " is not 'I', 'T' or 'E'"
        )
    raise RemoteProtocolError(
        f"malformed ReadyForQuery message: body is {len(body)} bytes, expected 1"
    )


_READY_BY_BYTE = {ord(s): ReadyForQuery(s) for s in "ITE"}


def _dec_row_description(body: Body) -> RowDescription:
    r = Reader(body, "RowDescription message")
    n = r.read_uint16("number of columns")
    fields = []
    for i in range(1, n + 1):
        name = r.read_cstring(f"name of column {i}")
        fields.append(
            FieldDescription(
                name,
                r.read_uint32(f"table oid of column {i}"),
                r.read_int16(f"column number of column {i}"),
                r.read_uint32(f"type oid of column {i}"),
                r.read_int16(f"type size of column {i}"),
                r.read_int32(f"type modifier of column {i}"),
                r.read_int16(f"format code of column {i}"),
            )
        )
    r.finish()
    return RowDescription(tuple(fields))


_BACKEND_DECODERS: dict[int, Callable[[Body], object]] = {
    BackendTag.AUTHENTICATION: _dec_authentication,
    BackendTag.BACKEND_KEY_DATA: _dec_backend_key_data,
    BackendTag.BIND_COMPLETE: _empty_decoder(BindComplete(), "BindComplete message"),
    BackendTag.CLOSE_COMPLETE: _empty_decoder(CloseComplete(), "CloseComplete message"),
    BackendTag.COMMAND_COMPLETE: _dec_command_complete,
    BackendTag.COPY_DATA: _dec_copy_data,
    BackendTag.COPY_DONE: _empty_decoder(CopyDone(), "CopyDone message"),
    BackendTag.COPY_IN_RESPONSE: _copy_response_decoder(CopyInResponse, "CopyInResponse message"),
    BackendTag.COPY_OUT_RESPONSE: _copy_response_decoder(
        CopyOutResponse, "CopyOutResponse message"
    ),
    BackendTag.COPY_BOTH_RESPONSE: _copy_response_decoder(
        CopyBothResponse, "CopyBothResponse message"
    ),
    BackendTag.DATA_ROW: _dec_data_row,
    BackendTag.EMPTY_QUERY_RESPONSE: _empty_decoder(
        EmptyQueryResponse(), "EmptyQueryResponse message"
    ),
    BackendTag.ERROR_RESPONSE: _dec_error_response,
    BackendTag.FUNCTION_CALL_RESPONSE: _dec_function_call_response,
    BackendTag.NEGOTIATE_PROTOCOL_VERSION: _dec_negotiate,
    BackendTag.NO_DATA: _empty_decoder(NoData(), "NoData message"),
    BackendTag.NOTICE_RESPONSE: _dec_notice_response,
    BackendTag.NOTIFICATION_RESPONSE: _dec_notification,
    BackendTag.PARAMETER_DESCRIPTION: _dec_parameter_description,
    BackendTag.PARAMETER_STATUS: _dec_parameter_status,
    BackendTag.PARSE_COMPLETE: _empty_decoder(ParseComplete(), "ParseComplete message"),
    BackendTag.PORTAL_SUSPENDED: _empty_decoder(PortalSuspended(), "PortalSuspended message"),
    BackendTag.READY_FOR_QUERY: _dec_ready_for_query,
    BackendTag.ROW_DESCRIPTION: _dec_row_description,
}


def decode_backend(tag: int, body: Body) -> object:
    """Decode the body of a typed message sent by a server.

    Returns the message record, or :class:`Unknown` for a type byte that is not a backend
    message. Raises :class:`RemoteProtocolError` (08P01) if the body is malformed.
    """
    decoder = _BACKEND_DECODERS.get(tag)
    if decoder is None:
        return Unknown(tag, bytes(body))
    return decoder(body)


def _show_byte(b: int) -> str:
    return repr(chr(b)) if 32 <= b < 127 else f"0x{b:02x}"


# ------------------------------------------------------------------------ convenience encoders

_ERROR_SEVERITIES = frozenset({"ERROR", "FATAL", "PANIC"})
_NOTICE_SEVERITIES = frozenset({"WARNING", "NOTICE", "DEBUG", "INFO", "LOG"})


def _check_sqlstate(sqlstate: str) -> None:
    if not (
        isinstance(sqlstate, str)
        and len(sqlstate) == 5
        and all(c.isascii() and (c.isdigit() or c.isupper()) for c in sqlstate)
    ):
        raise LocalProtocolError(f"SQLSTATE {sqlstate!r} is not five digits or capitals")


def printable(text: str) -> str:
    """``text`` safe to encode as UTF-8: bytes a client sent that are not UTF-8 (kept as
    lone surrogates by ``surrogateescape``, e.g. in a startup parameter) become ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fields(
    sqlstate: str, message: str, severity: str, detail: str | None, hint: str | None
) -> dict[str, str]:
    _check_sqlstate(sqlstate)
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": printable(message)}
    if detail is not None:
        fields["D"] = printable(detail)
    if hint is not None:
        fields["H"] = printable(hint)
    return fields


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "FATAL",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """Return an encoded ErrorResponse with fields S, V, C, M and optional D, H.

    Raises :class:`LocalProtocolError` for a malformed SQLSTATE, a severity that is not
    ERROR/FATAL/PANIC, or a string containing NUL.
    """
    if severity not in _ERROR_SEVERITIES:
        raise LocalProtocolError(f"error severity {severity!r} is not ERROR, FATAL or PANIC")
    return ErrorResponse(_fields(sqlstate, message, severity, detail, hint)).encode()


def notice_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "NOTICE",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """Return an encoded NoticeResponse (severity WARNING, NOTICE, DEBUG, INFO or LOG).

    Raises :class:`LocalProtocolError` like :func:`error_response`.
    """
    if severity not in _NOTICE_SEVERITIES:
        raise LocalProtocolError(f"notice severity {severity!r} is not a notice severity")
    return NoticeResponse(_fields(sqlstate, message, severity, detail, hint)).encode()


_READY_BYTES = {s: b"Z\0\0\0\x05" + s.encode() for s in "ITE"}


def ready_for_query(status: str) -> bytes:
    """Return an encoded ReadyForQuery. Raises :class:`LocalProtocolError` unless
    ``status`` is ``'I'``, ``'T'`` or ``'E'``."""
    try:
        return _READY_BYTES[status]
    except (KeyError, TypeError):
        raise LocalProtocolError(f"transaction status {status!r} is not 'I', 'T' or 'E'")


def authentication_ok() -> bytes:
    """Return an encoded AuthenticationOk."""
    return _AUTH_OK.encode()


def parameter_status(name: str, value: str) -> bytes:
    """Return an encoded ParameterStatus. Raises :class:`LocalProtocolError` on NUL."""
    return ParameterStatus(name, value).encode()


def backend_key_data(pid: int, secret: int | bytes) -> bytes:
    """Return an encoded BackendKeyData. Raises :class:`LocalProtocolError` if out of range."""
    return BackendKeyData(pid, secret).encode()


def command_complete(tag: str) -> bytes:
    """Return an encoded CommandComplete. Raises :class:`LocalProtocolError` on NUL."""
    return CommandComplete(tag).encode()


def row_description(names: Iterable[str]) -> bytes:
    """Return an encoded RowDescription of text columns (type ``text``, oid 25)."""
    return RowDescription(tuple(FieldDescription(n) for n in names)).encode()


def data_row(values: Iterable[str | bytes | None]) -> bytes:
    """Return an encoded DataRow; a ``str`` is sent as UTF-8 (bytes a client sent that are
    not UTF-8 as ``\\xNN``, see :func:`printable`), ``None`` as NULL."""
    return DataRow(tuple(printable(v).encode() if isinstance(v, str) else v for v in values)).encode()


def empty_query_response() -> bytes:
    """Return an encoded EmptyQueryResponse."""
    return b"I\0\0\0\x04"


def startup_message(params: Mapping[str, str] | Iterable[tuple[str, str]],
                    protocol_version: int = PROTOCOL_3_0) -> bytes:  # fmt: skip
    """Return an encoded (untyped) StartupMessage of ``params`` (a mapping, or (name,
    value) pairs in order, repeats included). Raises :class:`LocalProtocolError` for an
    empty name or a NUL in a name or value."""
    pairs = tuple(params.items() if isinstance(params, Mapping) else params)
    return StartupMessage(protocol_version, dict(pairs), pairs).encode()


def ssl_request() -> bytes:
    """Return an encoded SSLRequest."""
    return _SSL_REQUEST.encode()


def gssenc_request() -> bytes:
    """Return an encoded GSSENCRequest."""
    return _GSSENC_REQUEST.encode()


def cancel_request(pid: int, secret: int | bytes) -> bytes:
    """Return an encoded CancelRequest. Raises :class:`LocalProtocolError` if out of range."""
    return CancelRequest(pid, secret).encode()


def password_message(password: str) -> bytes:
    """Return an encoded PasswordMessage carrying ``password`` (cleartext or ``md5...``).
    Raises :class:`LocalProtocolError` on NUL."""
    return PasswordMessage(_cstr(password, "password")).encode()


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    """Return an encoded SASLInitialResponse (``data`` None = no initial response)."""
    if data is None:
        value = _I32.pack(NULL_LENGTH)
    else:
        data = _raw(data, "SASL data")
        value = _I32.pack(len(data)) + data
    return PasswordMessage(_cstr(mechanism, "mechanism name") + value).encode()


def sasl_response(data: bytes) -> bytes:
    """Return an encoded SASLResponse."""
    return PasswordMessage(_raw(data, "SASL data")).encode()


def query(sql: str) -> bytes:
    """Return an encoded Query. Raises :class:`LocalProtocolError` on NUL."""
    return Query(sql).encode()


def sync() -> bytes:
    """Return an encoded Sync."""
    return b"S\0\0\0\x04"


def terminate() -> bytes:
    """Return an encoded Terminate."""
    return b"X\0\0\0\x04"
