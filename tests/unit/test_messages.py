"""Message codec: bytes <-> records for every v3 message, strictness, and stream invariants."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow import messages as m
from shadow.errors import LocalProtocolError, RemoteProtocolError
from shadow.framing import Framer


def split(encoded: bytes) -> tuple[int, bytes]:
    """(tag, body) of one encoded typed message, checking its length word."""
    (length,) = struct.unpack_from("!I", encoded, 1)
    assert length == len(encoded) - 1
    return encoded[0], encoded[5:]


def startup_body(encoded: bytes) -> bytes:
    (length,) = struct.unpack_from("!I", encoded)
    assert length == len(encoded)
    return encoded[4:]


# ------------------------------------------------------ hand-written bytes, from the docs

FRONTEND_BYTES = [
    (m.Query("SELECT 1"), b"Q\0\0\0\x0dSELECT 1\0"),
    (m.Parse("s1", "SELECT $1", (23,)), b"P\0\0\0\x17s1\0SELECT $1\0\0\x01\0\0\0\x17"),
    (
        m.Bind("p", "s1", (1,), (b"\0\0\0\x2a", None), (0,)),
        b"B\0\0\0\x1fp\0s1\0\0\x01\0\x01\0\x02\0\0\0\x04\0\0\0\x2a\xff\xff\xff\xff\0\x01\0\0",
    ),
    (m.Describe("S", "s1"), b"D\0\0\0\x08Ss1\0"),
    (m.Describe("P", ""), b"D\0\0\0\x06P\0"),
    (m.Execute("", 0), b"E\0\0\0\x09\0\0\0\0\0"),
    (m.Execute("p", 100), b"E\0\0\0\x0ap\0\0\0\0\x64"),
    (m.Close("S", "s1"), b"C\0\0\0\x08Ss1\0"),
    (m.Sync(), b"S\0\0\0\x04"),
    (m.Flush(), b"H\0\0\0\x04"),
    (m.Terminate(), b"X\0\0\0\x04"),
    (m.CopyData(b"1\tx\n"), b"d\0\0\0\x081\tx\n"),
    (m.CopyDone(), b"c\0\0\0\x04"),
    (m.CopyFail("stop"), b"f\0\0\0\x09stop\0"),
    (
        m.FunctionCall(1598, (0,), (b"ab",), 1),
        b"F\0\0\0\x16\0\0\x06\x3e\0\x01\0\0\0\x01\0\0\0\x02ab\0\x01",
    ),
    (m.PasswordMessage(b"secret\0"), b"p\0\0\0\x0bsecret\0"),
]

BACKEND_BYTES = [
    (m.AuthenticationOk(), b"R\0\0\0\x08\0\0\0\0"),
    (m.Authentication(2), b"R\0\0\0\x08\0\0\0\x02"),  # KerberosV5
    (m.AuthenticationCleartextPassword(), b"R\0\0\0\x08\0\0\0\x03"),
    (m.AuthenticationMD5Password(b"salt"), b"R\0\0\0\x0c\0\0\0\x05salt"),
    (m.Authentication(7), b"R\0\0\0\x08\0\0\0\x07"),  # GSS
    (m.Authentication(8, b"tok"), b"R\0\0\0\x0b\0\0\0\x08tok"),  # GSSContinue
    (m.Authentication(9), b"R\0\0\0\x08\0\0\0\x09"),  # SSPI
    (m.AuthenticationSASL(("SCRAM-SHA-256",)), b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"),
    (m.AuthenticationSASLContinue(b"r=abc"), b"R\0\0\0\x0d\0\0\0\x0br=abc"),
    (m.AuthenticationSASLFinal(b"v=xyz"), b"R\0\0\0\x0d\0\0\0\x0cv=xyz"),
    (m.BackendKeyData(1234, 5678), b"K\0\0\0\x0c\0\0\x04\xd2\0\0\x16\x2e"),
    (m.BindComplete(), b"2\0\0\0\x04"),
    (m.CloseComplete(), b"3\0\0\0\x04"),
    (m.CommandComplete("SELECT 1"), b"C\0\0\0\x0dSELECT 1\0"),
    (m.CopyData(b"x"), b"d\0\0\0\x05x"),
    (m.CopyDone(), b"c\0\0\0\x04"),
    (m.CopyInResponse(0, (0, 0)), b"G\0\0\0\x0b\0\0\x02\0\0\0\0"),
    (m.CopyOutResponse(1, (1,)), b"H\0\0\0\x09\x01\0\x01\0\x01"),
    (m.CopyBothResponse(0, ()), b"W\0\0\0\x07\0\0\0"),
    (m.DataRow((b"1", None, b"")), b"D\0\0\0\x13\0\x03\0\0\0\x011\xff\xff\xff\xff\0\0\0\0"),
    (m.EmptyQueryResponse(), b"I\0\0\0\x04"),
    (
        m.ErrorResponse({"S": "ERROR", "V": "ERROR", "C": "42601", "M": "syntax error"}),
        b"E\0\0\0\x28SERROR\0VERROR\0C42601\0Msyntax error\0\0",
    ),
    (m.NoticeResponse({"S": "NOTICE", "M": "hi"}), b"N\0\0\0\x11SNOTICE\0Mhi\0\0"),
    (m.FunctionCallResponse(b"ok"), b"V\0\0\0\x0a\0\0\0\x02ok"),
    (m.FunctionCallResponse(None), b"V\0\0\0\x08\xff\xff\xff\xff"),
    (
        m.NegotiateProtocolVersion(0, ("_pq_.x",)),
        b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0",
    ),
    (m.NoData(), b"n\0\0\0\x04"),
    (m.NotificationResponse(7, "ch", "hi"), b"A\0\0\0\x0e\0\0\0\x07ch\0hi\0"),
    (m.ParameterDescription((23, 25)), b"t\0\0\0\x0e\0\x02\0\0\0\x17\0\0\0\x19"),
    (m.ParameterStatus("TimeZone", "UTC"), b"S\0\0\0\x11TimeZone\0UTC\0"),
    (m.ParseComplete(), b"1\0\0\0\x04"),
    (m.PortalSuspended(), b"s\0\0\0\x04"),
    (m.ReadyForQuery("I"), b"Z\0\0\0\x05I"),
    (m.ReadyForQuery("T"), b"Z\0\0\0\x05T"),
    (m.ReadyForQuery("E"), b"Z\0\0\0\x05E"),
    (
        m.RowDescription((m.FieldDescription("a", 16384, 1, 23, 4, -1, 0),)),
        b"T\0\0\0\x1a\0\x01a\0\0\0\x40\0\0\x01\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
    ),
]

STARTUP_BYTES = [
    (
        m.StartupMessage(m.PROTOCOL_3_0, {"user": "u"}, (("user", "u"),)),
        b"\0\0\0\x10\0\x03\0\0user\0u\0\0",
    ),
    (m.SSLRequest(), b"\0\0\0\x08\x04\xd2\x16\x2f"),
    (m.GSSENCRequest(), b"\0\0\0\x08\x04\xd2\x16\x30"),
    (m.CancelRequest(1234, 5678), b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\x04\xd2\0\0\x16\x2e"),
]


@pytest.mark.parametrize(("msg", "wire"), FRONTEND_BYTES, ids=lambda x: type(x).__name__)
def test_frontend_bytes(msg: object, wire: bytes) -> None:
    assert msg.encode() == wire
    assert m.decode_frontend(*split(wire)) == msg


@pytest.mark.parametrize(("msg", "wire"), BACKEND_BYTES, ids=lambda x: type(x).__name__)
def test_backend_bytes(msg: object, wire: bytes) -> None:
    assert msg.encode() == wire
    assert m.decode_backend(*split(wire)) == msg


@pytest.mark.parametrize(("msg", "wire"), STARTUP_BYTES, ids=lambda x: type(x).__name__)
def test_startup_bytes(msg: object, wire: bytes) -> None:
    assert msg.encode() == wire
    assert m.decode_startup(startup_body(wire)) == msg


def test_colliding_tags_decode_by_direction() -> None:
    front_bodies = {"D": b"S\0", "C": b"S\0", "E": b"\0\0\0\0\0", "S": b"", "H": b""}
    back_bodies = {"D": b"\0\0", "C": b"\0", "E": b"\0", "S": b"\0\0", "H": b"\0\0\0"}
    for tag in "DCESH":
        front = m.decode_frontend(ord(tag), front_bodies[tag])
        back = m.decode_backend(ord(tag), back_bodies[tag])
        assert type(front).__name__ in {"Describe", "Close", "Execute", "Sync", "Flush"}
        assert type(back).__name__ in {
            "DataRow",
            "CommandComplete",
            "ErrorResponse",
            "ParameterStatus",
            "CopyOutResponse",
        }
    assert m.decode_frontend(ord("d"), b"x") == m.decode_backend(ord("d"), b"x")
    assert m.decode_frontend(ord("c"), b"") == m.decode_backend(ord("c"), b"")


def test_tag_enums_compare_as_ints() -> None:
    assert m.BackendTag.READY_FOR_QUERY == ord("Z") == m.ReadyForQuery.TAG
    assert m.FrontendTag.QUERY == ord("Q") == m.Query.TAG
    assert m.FrontendTag.DESCRIBE == m.BackendTag.DATA_ROW  # the same byte, two meanings


def test_decoders_accept_memoryview_and_bytearray() -> None:
    tag, body = split(m.Bind("", "", (), (b"x",), ()).encode())
    assert m.decode_frontend(tag, memoryview(body)) == m.decode_frontend(tag, bytearray(body))
    for wire in (b"Z\0\0\0\x05T", b"C\0\0\0\x0aBEGIN\0", b"S\0\0\0\x08a\0b\0"):
        tag, body = split(wire)
        assert m.decode_backend(tag, memoryview(body)) == m.decode_backend(tag, body)


def test_unknown_types_pass_through() -> None:
    for decode in (m.decode_frontend, m.decode_backend):
        msg = decode(ord("?"), memoryview(b"\x01\x02"))
        assert msg == m.Unknown(ord("?"), b"\x01\x02")
        assert msg.encode() == b"?\0\0\0\x06\x01\x02"
    # frontend-only and backend-only types are unknown in the other direction
    assert m.decode_backend(ord("Q"), b"x\0") == m.Unknown(ord("Q"), b"x\0")
    assert m.decode_frontend(ord("Z"), b"I") == m.Unknown(ord("Z"), b"I")


# ----------------------------------------------------------------------------- startup


def test_startup_keeps_parameter_order_and_reports_version() -> None:
    params = {"user": "u", "database": "d", "application_name": "a", "options": "-c x=1"}
    msg = m.decode_startup(startup_body(m.startup_message(params)))
    assert list(msg.parameters) == list(params)
    assert (msg.major, msg.minor) == (3, 0)


def test_startup_with_newer_minor_and_pq_options_decodes() -> None:
    wire = m.startup_message({"user": "u", "_pq_.foo": "1"}, protocol_version=(3 << 16) | 2)
    msg = m.decode_startup(startup_body(wire))
    assert msg.minor == 2 and msg.parameters["_pq_.foo"] == "1"


def test_startup_without_user_is_28000() -> None:
    for params in ({"database": "d"}, {"user": ""}):
        with pytest.raises(RemoteProtocolError, match="no PostgreSQL user name") as info:
            m.decode_startup(startup_body(m.startup_message(params)))
        assert info.value.sqlstate == "28000"


@pytest.mark.parametrize("version", [(2 << 16), (4 << 16), (1234 << 16) | 5681])
def test_unsupported_protocol_is_0A000(version: int) -> None:
    with pytest.raises(RemoteProtocolError, match="unsupported frontend protocol") as info:
        m.decode_startup(struct.pack("!I", version) + b"user\0u\0\0")
    assert info.value.sqlstate == "0A000"


def test_cancel_request_with_a_long_key() -> None:
    key = bytes(range(32))  # protocol 3.2
    msg = m.decode_startup(startup_body(m.cancel_request(42, key)))
    assert msg == m.CancelRequest(42, key)
    tag, body = split(m.backend_key_data(42, key))
    assert m.decode_backend(tag, body) == m.BackendKeyData(42, key)


# --------------------------------------------------------------------- malformed input

_Q = struct.pack
MALFORMED_STARTUP = [
    (b"", "ends before protocol version"),
    (b"\0\x03", "ends inside protocol version"),
    (_Q("!I", 196608) + b"user\0u\0", "ends before startup parameter name"),
    (_Q("!I", 196608) + b"user\0u", "value of startup parameter 'user' is missing its NUL"),
    (_Q("!I", 196608) + b"user\0u\0\0x", "1 unexpected bytes"),
    (_Q("!I", 80877103) + b"\0", "1 unexpected bytes"),
    (_Q("!I", 80877104) + b"\0", "1 unexpected bytes"),
    (_Q("!I", 80877102) + b"\0\0", "ends inside process id"),
    (_Q("!I", 80877102) + b"\0\0\0\x01\0\0", "secret key of 2 bytes"),
    (_Q("!I", 80877102) + b"\0\0\0\x01" + b"k" * 257, "secret key of 257 bytes"),
]


def test_startup_parameters_reach_the_server_as_sent_repeats_and_bytes_included() -> None:
    """Postgres takes startup values as bytes and applies repeated names in order (a bad
    earlier value fails the login): connmgr keeps both, so Postgres decides."""
    body = _Q("!I", 196608) + b"user\0u\0application_name\0caf\xe9\0DateStyle\0bogus\0DateStyle\0ISO\0\0"
    msg = m.decode_startup(body)
    assert msg.parameters == {"user": "u", "application_name": "caf\udce9", "DateStyle": "ISO"}
    assert [name for name, _ in msg.pairs] == ["user", "application_name", "DateStyle", "DateStyle"]
    assert msg.encode() == _Q("!I", len(body) + 4) + body
    assert m.startup_message(msg.pairs) == msg.encode()


@pytest.mark.parametrize(("body", "problem"), MALFORMED_STARTUP)
def test_malformed_startup(body: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.decode_startup(body)
    assert info.value.sqlstate == "08P01"
    assert "malformed startup packet" in info.value.message
    assert problem in info.value.message


MALFORMED_FRONTEND = [
    ("Q", b"select 1", "Query message: query string is missing its NUL"),
    ("Q", b"", "Query message: message ends before query string"),
    ("Q", b"select 1\0x", "Query message: 1 unexpected bytes"),
    ("Q", b"select \xc3\0", "Query message: query string is not valid UTF-8"),
    ("P", b"s\0select 1\0", "Parse message: message ends before number of parameter types"),
    (
        "P",
        b"s\0select 1\0\0\x02\0\0\0\x17",
        "Parse message: message ends before type of parameter 2",
    ),
    ("P", b"s\0select 1\0\0\x01\0\0", "Parse message: message ends inside type of parameter 1"),
    (
        "B",
        b"\0\0\0\0\0\x02\xff\xff\xff\xff\xff\xff\xff\xfb\0\0",
        "Bind message: parameter 2 length -5 is invalid",
    ),
    ("B", b"\0\0\0\0\0\x01\0\0\0\x09abc", "Bind message: message ends inside parameter 1"),
    ("B", b"\0\0\0\0\0\0", "Bind message: message ends before number of result format codes"),
    ("B", b"\0\0\0\0\0\0\0\0\0", "Bind message: 1 unexpected bytes"),
    ("B", b"p", "Bind message: portal name is missing its NUL"),
    ("D", b"Xs\0", "Describe message: Describe kind 'X' is neither 'S' nor 'P'"),
    ("D", b"", "Describe message: message ends before Describe kind"),
    ("D", b"S", "Describe message: message ends before name"),
    ("C", b"\x00s\0", "Close message: Close kind 0x00 is neither"),
    ("E", b"\0\0\0", "Execute message: message ends inside row limit"),
    ("E", b"\0\0\0\0\0\0", "Execute message: 1 unexpected bytes"),
    ("S", b"\0", "Sync message: 1 unexpected bytes"),
    ("H", b"\0", "Flush message"),
    ("X", b"\0", "Terminate message"),
    ("c", b"x", "CopyDone message"),
    ("f", b"oops", "CopyFail message: error message is missing its NUL"),
    (
        "F",
        b"\0\0\0\x01\0\0\0\x01\xff\xff\xff\xfe\0\0",
        "FunctionCall message: argument 1 length -2 is invalid",
    ),
    ("F", b"\0\0\0\x01\0\0\0\0", "FunctionCall message: message ends before result format code"),
]


@pytest.mark.parametrize(("tag", "body", "problem"), MALFORMED_FRONTEND)
def test_malformed_frontend(tag: str, body: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.decode_frontend(ord(tag), body)
    assert info.value.sqlstate == "08P01"
    assert info.value.message.startswith("malformed ")
    assert problem in info.value.message


MALFORMED_BACKEND = [
    ("R", b"", "Authentication message: message ends before authentication code"),
    ("R", b"\0\0\0\0\0", "Authentication message: 1 unexpected bytes"),
    ("R", b"\0\0\0\x05abc", "Authentication message: message ends inside MD5 salt"),
    (
        "R",
        b"\0\0\0\x0aSCRAM-SHA-256\0",
        "Authentication message: message ends before SASL mechanism name",
    ),
    ("K", b"\0\0\0\x01\0\0", "BackendKeyData message: secret key of 2 bytes"),
    ("2", b"x", "BindComplete message"),
    ("C", b"SELECT 1", "CommandComplete message: command tag is missing its NUL"),
    ("C", b"", "CommandComplete message: command tag is missing its NUL"),
    ("C", b"SELECT 1\0x\0", "CommandComplete message: 2 unexpected bytes"),
    ("C", b"\xff\0", "CommandComplete message: command tag is not valid UTF-8"),
    ("G", b"\x02\0\0", "CopyInResponse message: copy format 2 is neither"),
    ("H", b"\0\0\x02\0\0", "CopyOutResponse message: message ends before column format code 2"),
    ("W", b"\0\0\x01\0\x07", "CopyBothResponse message: column 1 format code 7"),
    ("D", b"\0\x01\xff\xff\xff\xfe", "DataRow message: column 1 length -2 is invalid"),
    ("D", b"\0\x02\0\0\0\0", "DataRow message: message ends before length of column 2"),
    ("D", b"\0\x01\0\0\0\x05abc", "DataRow message: message ends inside column 1"),
    ("D", b"\0\0\0", "DataRow message: 1 unexpected bytes"),
    ("E", b"", "ErrorResponse message: empty body"),
    ("E", b"SERROR\0", "ErrorResponse message: field list is missing its terminator"),
    ("E", b"SERROR", "ErrorResponse message: message ends before the field list terminator"),
    ("E", b"SERROR\0\0x\0", "ErrorResponse message: unexpected bytes after the field list"),
    ("N", b"M\xff\0\0", "NoticeResponse message: field 'M' is not valid UTF-8"),
    ("V", b"\xff\xff\xff\xf0", "FunctionCallResponse message: result value length -16"),
    ("V", b"\0\0\0\x02a", "FunctionCallResponse message: message ends inside result value"),
    (
        "v",
        b"\0\0\0\0\xff\xff\xff\xff",
        "NegotiateProtocolVersion message: number of unrecognized options -1 is negative",
    ),
    (
        "v",
        b"\0\0\0\0\0\0\0\x01",
        "NegotiateProtocolVersion message: message ends before option name 1",
    ),
    ("A", b"\0\0\0\x01ch\0", "NotificationResponse message: message ends before payload"),
    ("t", b"\0\x01\0\0", "ParameterDescription message: message ends inside type of parameter 1"),
    ("S", b"a\0b", "ParameterStatus message: missing NUL terminator"),
    ("S", b"a\0b\0c\0", "ParameterStatus message: unexpected bytes after the parameter value"),
    ("S", b"a\0\xff\0", "ParameterStatus message: not valid UTF-8"),
    ("Z", b"X", "ReadyForQuery message: transaction status 'X' is not 'I', 'T' or 'E'"),
    ("Z", b"", "ReadyForQuery message: body is 0 bytes, expected 1"),
    ("Z", b"II", "ReadyForQuery message: body is 2 bytes"),
    ("T", b"\0\x01a\0\0\0", "RowDescription message: message ends inside table oid of column 1"),
    ("T", b"\0\x01a", "RowDescription message: name of column 1 is missing its NUL"),
    ("n", b"\0", "NoData message"),
]


@pytest.mark.parametrize(("tag", "body", "problem"), MALFORMED_BACKEND)
def test_malformed_backend(tag: str, body: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.decode_backend(ord(tag), body)
    assert info.value.sqlstate == "08P01"
    assert info.value.message.startswith("malformed ")
    assert problem in info.value.message


def test_error_texts_do_not_leak_data() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.decode_startup(struct.pack("!I", 196608) + b"user\0u\0password\0hunter2")
    assert "hunter2" not in info.value.message
    with pytest.raises(RemoteProtocolError) as info:
        m.decode_frontend(ord("Q"), b"select 'hunter2'")
    assert "hunter2" not in info.value.message
    assert "hunter2" not in repr(m.PasswordMessage(b"hunter2\0"))


def test_65535_parameters_are_legal() -> None:
    msg = m.Bind("", "", (), (None,) * 65535, ())
    assert m.decode_frontend(*split(msg.encode())) == msg
    with pytest.raises(LocalProtocolError, match="number of parameters"):
        m.Bind("", "", (), (None,) * 65536, ()).encode()


# --------------------------------------------------------------------------- encoding


BAD_ENCODES = [
    lambda: m.Query("a\0b").encode(),
    lambda: m.Query(b"select").encode(),
    lambda: m.Query("\ud800").encode(),
    lambda: m.Describe("X", "s").encode(),
    lambda: m.Close("", "s").encode(),
    lambda: m.ReadyForQuery("X").encode(),
    lambda: m.ready_for_query("i"),
    lambda: m.Execute("", 1 << 31).encode(),
    lambda: m.Parse("", "select", (-1,)).encode(),
    lambda: m.Bind("", "", (70000,)).encode(),
    lambda: m.Bind("", "", (), ("text",)).encode(),
    lambda: m.AuthenticationMD5Password(b"abc").encode(),
    lambda: m.AuthenticationSASL(("",)).encode(),
    lambda: m.StartupMessage(m.PROTOCOL_3_0, {"": "x"}).encode(),
    lambda: m.startup_message({"user": "a\0"}),
    lambda: m.CancelRequest(1, b"abc").encode(),
    lambda: m.BackendKeyData(1, -1).encode(),
    lambda: m.CopyInResponse(2, ()).encode(),
    lambda: m.CopyOutResponse(0, (3,)).encode(),
    lambda: m.ErrorResponse({"": "x"}).encode(),
    lambda: m.ErrorResponse({"\0": "x"}).encode(),
    lambda: m.error_response("ABC", "x"),
    lambda: m.error_response("08p01", "x"),
    lambda: m.error_response("08P01", "x", severity="NOTICE"),
    lambda: m.notice_response("00000", "x", severity="ERROR"),
    lambda: m.Unknown(0, b"").encode(),
    lambda: m.Unknown(256, b"").encode(),
    lambda: m.RowDescription((m.FieldDescription("a", column_number=1 << 15),)).encode(),
    lambda: m.password_message("pw\0"),
]


@pytest.mark.parametrize("encode", BAD_ENCODES)
def test_encoding_illegal_values_raises_local_error(encode) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode()
    assert info.value.sqlstate == "XX000"


def test_error_response_fields() -> None:
    wire = m.error_response("57P01", "terminating", detail="d", hint="h")
    msg = m.decode_backend(*split(wire))
    assert isinstance(msg, m.ErrorResponse)
    assert msg.fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "57P01",
        "M": "terminating",
        "D": "d",
        "H": "h",
    }
    assert (msg.severity, msg.sqlstate, msg.message, msg.detail, msg.hint) == (
        "FATAL",
        "57P01",
        "terminating",
        "d",
        "h",
    )
    notice = m.decode_backend(*split(m.notice_response("01000", "careful", severity="WARNING")))
    assert isinstance(notice, m.NoticeResponse) and notice.severity == "WARNING"
    assert notice.detail is None and notice.hint is None


def test_severity_falls_back_to_localized_field() -> None:
    assert m.ErrorResponse({"S": "FEHLER"}).severity == "FEHLER"
    assert m.ErrorResponse({"S": "FEHLER", "V": "ERROR"}).severity == "ERROR"


def test_convenience_encoders() -> None:
    assert m.ready_for_query("T") == b"Z\0\0\0\x05T"
    assert m.authentication_ok() == m.AuthenticationOk().encode()
    assert m.decode_backend(*split(m.parameter_status("a", "b"))) == m.ParameterStatus("a", "b")
    assert m.decode_backend(*split(m.backend_key_data(1, 2))) == m.BackendKeyData(1, 2)
    assert m.decode_backend(*split(m.command_complete("SHOW"))) == m.CommandComplete("SHOW")
    rd = m.decode_backend(*split(m.row_description(["a", "b"])))
    assert [f.name for f in rd.fields] == ["a", "b"]
    assert all(f.type_oid == 25 and f.format_code == 0 for f in rd.fields)
    assert m.decode_backend(*split(m.data_row(["é", b"\x01", None]))) == m.DataRow(
        ("é".encode(), b"\x01", None)
    )
    assert m.empty_query_response() == m.EmptyQueryResponse().encode()
    assert m.decode_startup(startup_body(m.ssl_request())) == m.SSLRequest()
    assert m.decode_startup(startup_body(m.gssenc_request())) == m.GSSENCRequest()
    assert m.decode_startup(startup_body(m.cancel_request(5, 6))) == m.CancelRequest(5, 6)
    assert m.decode_frontend(*split(m.query("select"))) == m.Query("select")
    assert m.sync() == m.Sync().encode() and m.terminate() == m.Terminate().encode()


def test_password_helpers() -> None:
    tag, body = split(m.password_message("md5abc"))
    msg = m.decode_frontend(tag, body)
    assert isinstance(msg, m.PasswordMessage)
    assert m.parse_password(msg.data) == "md5abc"
    with pytest.raises(RemoteProtocolError, match="PasswordMessage: 1 unexpected bytes"):
        m.parse_password(b"pw\0x")
    with pytest.raises(RemoteProtocolError, match="password is missing its NUL"):
        m.parse_password(b"pw")


def test_sasl_helpers() -> None:
    _, body = split(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert m.parse_sasl_initial_response(body) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    _, body = split(m.sasl_initial_response("SCRAM-SHA-256", None))
    assert m.parse_sasl_initial_response(body) == ("SCRAM-SHA-256", None)
    _, body = split(m.sasl_response(b"c=biws"))
    assert m.decode_frontend(ord("p"), body) == m.PasswordMessage(b"c=biws")
    with pytest.raises(RemoteProtocolError, match="initial response length -3"):
        m.parse_sasl_initial_response(b"X\0\xff\xff\xff\xfd")
    with pytest.raises(RemoteProtocolError, match="ends inside initial response"):
        m.parse_sasl_initial_response(b"X\0\0\0\0\x05abc")


# ------------------------------------------------------------------- property tests

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
name = text
i16 = st.integers(-(1 << 15), (1 << 15) - 1)
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
u32 = st.integers(0, (1 << 32) - 1)
blob = st.binary(max_size=24)
value = st.none() | blob
small = {"max_size": 5}
kind = st.sampled_from(["S", "P"])
secret = u32 | st.binary(min_size=5, max_size=40)

frontend_messages = st.one_of(
    st.builds(m.Query, text),
    st.builds(m.Parse, name, text, st.lists(u32, **small).map(tuple)),
    st.builds(
        m.Bind,
        name,
        name,
        st.lists(i16, **small).map(tuple),
        st.lists(value, **small).map(tuple),
        st.lists(i16, **small).map(tuple),
    ),
    st.builds(m.Describe, kind, name),
    st.builds(m.Execute, name, i32),
    st.builds(m.Close, kind, name),
    st.just(m.Sync()),
    st.just(m.Flush()),
    st.just(m.Terminate()),
    st.builds(m.CopyData, blob),
    st.just(m.CopyDone()),
    st.builds(m.CopyFail, text),
    st.builds(
        m.FunctionCall,
        u32,
        st.lists(i16, **small).map(tuple),
        st.lists(value, **small).map(tuple),
        i16,
    ),
    st.builds(m.PasswordMessage, blob),
    st.builds(m.Unknown, st.sampled_from(b"!?~yz"), blob),
)

field_desc = st.builds(m.FieldDescription, text, u32, i16, u32, i16, i32, st.sampled_from([0, 1]))
error_fields = st.dictionaries(st.characters(min_codepoint=1, max_codepoint=255), text, max_size=6)
copy_formats = st.lists(st.sampled_from([0, 1]), **small).map(tuple)

backend_messages = st.one_of(
    st.just(m.AuthenticationOk()),
    st.just(m.AuthenticationCleartextPassword()),
    st.builds(m.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.builds(m.AuthenticationSASL, st.lists(text.filter(bool), **small).map(tuple)),
    st.builds(m.AuthenticationSASLContinue, blob),
    st.builds(m.AuthenticationSASLFinal, blob),
    st.builds(m.Authentication, st.sampled_from([2, 7, 8, 9, 13, 99]), blob),
    st.builds(m.BackendKeyData, i32, secret),
    st.just(m.BindComplete()),
    st.just(m.CloseComplete()),
    st.builds(m.CommandComplete, text),
    st.builds(m.CopyData, blob),
    st.just(m.CopyDone()),
    st.builds(m.CopyInResponse, st.sampled_from([0, 1]), copy_formats),
    st.builds(m.CopyOutResponse, st.sampled_from([0, 1]), copy_formats),
    st.builds(m.CopyBothResponse, st.sampled_from([0, 1]), copy_formats),
    st.builds(m.DataRow, st.lists(value, max_size=8).map(tuple)),
    st.just(m.EmptyQueryResponse()),
    st.builds(m.ErrorResponse, error_fields),
    st.builds(m.NoticeResponse, error_fields),
    st.builds(m.FunctionCallResponse, value),
    st.builds(m.NegotiateProtocolVersion, i32, st.lists(text, **small).map(tuple)),
    st.just(m.NoData()),
    st.builds(m.NotificationResponse, i32, text, text),
    st.builds(m.ParameterDescription, st.lists(u32, **small).map(tuple)),
    st.builds(m.ParameterStatus, text, text),
    st.just(m.ParseComplete()),
    st.just(m.PortalSuspended()),
    st.builds(m.ReadyForQuery, st.sampled_from(["I", "T", "E"])),
    st.builds(m.RowDescription, st.lists(field_desc, **small).map(tuple)),
    st.builds(m.Unknown, st.sampled_from(b"!?~yz"), blob),
)

startup_message = st.builds(
    m.StartupMessage,
    st.integers(0, 0xFFFF).map(lambda minor: (3 << 16) | minor),
    st.dictionaries(text.filter(bool), text, max_size=4).map(lambda d: {"user": "u", **d}),
)
startup_messages = st.one_of(
    startup_message,
    st.just(m.SSLRequest()),
    st.just(m.GSSENCRequest()),
    st.builds(m.CancelRequest, i32, secret),
)


@given(frontend_messages)
def test_frontend_round_trip(msg: object) -> None:
    assert m.decode_frontend(*split(msg.encode())) == msg


@given(backend_messages)
def test_backend_round_trip(msg: object) -> None:
    assert m.decode_backend(*split(msg.encode())) == msg


@given(startup_messages)
def test_startup_round_trip(msg: object) -> None:
    assert m.decode_startup(startup_body(msg.encode())) == msg


@given(frontend_messages)
def test_truncated_frontend_bodies_never_decode_silently(msg: object) -> None:
    tag, body = split(msg.encode())
    for cut in range(len(body)):
        try:
            decoded = m.decode_frontend(tag, body[:cut])
        except RemoteProtocolError as exc:
            assert exc.sqlstate == "08P01"
        else:  # only messages whose last field is open-ended can survive a cut
            assert type(decoded) in (m.CopyData, m.PasswordMessage, m.Unknown)


def decode_stream(stream: bytes, chunks: list[bytes], decode, *, startup: bool) -> tuple:
    """Feed ``chunks`` to a Framer the way the proxy does; return (passthrough, messages)."""
    framer = Framer(typed=not startup)
    passthrough = bytearray()
    decoded = []

    def take(buf: bytes, frames: list) -> None:
        passthrough.extend(buf)
        for tag, start, end in frames:
            body = memoryview(buf)[start:end]
            if tag == 0:
                msg = m.decode_startup(body)
                decoded.append(msg)
                if isinstance(msg, m.StartupMessage):
                    framer.switch_to_typed()
                take(*framer.feed(b""))  # what the untyped framer held back
            else:
                decoded.append(decode(tag, body))

    for chunk in chunks:
        take(*framer.feed(chunk))
    framer.feed_eof()
    return bytes(passthrough), decoded


def chunkings(stream: bytes, data: st.DataObject) -> list[list[bytes]]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts"))
    random_chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return [[stream], [stream[i : i + 1] for i in range(len(stream))], random_chunks]


@settings(max_examples=150)
@given(
    st.lists(st.sampled_from([m.SSLRequest(), m.GSSENCRequest()]), max_size=2),
    startup_message,
    st.lists(frontend_messages, max_size=15),
    st.data(),
)
def test_frontend_stream_is_chunking_invariant(negotiation, startup, typed_messages, data) -> None:
    messages = [*negotiation, startup, *typed_messages]
    stream = b"".join(msg.encode() for msg in messages)
    for chunks in chunkings(stream, data):
        assert decode_stream(stream, chunks, m.decode_frontend, startup=True) == (stream, messages)


@settings(max_examples=150)
@given(st.lists(backend_messages, max_size=20), st.data())
def test_backend_stream_is_chunking_invariant(messages, data) -> None:
    stream = b"".join(msg.encode() for msg in messages)
    for chunks in chunkings(stream, data):
        assert decode_stream(stream, chunks, m.decode_backend, startup=False) == (stream, messages)
