"""SessionState: phases, the request FIFO, and what the session learns from the stream."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow import messages as m
from shadow.errors import RemoteProtocolError
from shadow.session import PendingRequest, Phase, SessionState, TxStatus

_UNTYPED = (m.StartupMessage, m.SSLRequest, m.GSSENCRequest, m.CancelRequest)


def wire(msg: object) -> tuple[int, bytes]:
    raw = msg.encode()
    return (0, raw[4:]) if isinstance(msg, _UNTYPED) else (raw[0], raw[5:])


def fe(s: SessionState, *msgs: object) -> None:
    for msg in msgs:
        s.frontend_message(*wire(msg))


def be(s: SessionState, *msgs: object) -> None:
    for msg in msgs:
        s.backend_message(*wire(msg))


def kinds(s: SessionState) -> str:
    return "".join(r.kind for r in s.pending)


STARTUP = m.StartupMessage(m.PROTOCOL_3_0, {"user": "alice", "database": "app"})
OK = m.AuthenticationOk()
RFQ_I, RFQ_T, RFQ_E = (m.ReadyForQuery(s) for s in "ITE")
ROWS = (m.RowDescription((m.FieldDescription("x"),)), m.DataRow((b"1",)), m.DataRow((b"2",)))
ERROR = m.ErrorResponse({"S": "ERROR", "V": "ERROR", "C": "22012", "M": "division by zero"})
FATAL = m.ErrorResponse({"S": "FATAL", "V": "FATAL", "C": "57P01", "M": "terminating"})
NOTICE = m.NoticeResponse({"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": "hi"})
NOTIFY = m.NotificationResponse(99, "chan", "payload")


def connected() -> SessionState:
    s = SessionState()
    fe(s, STARTUP)
    be(s, OK, m.ParameterStatus("client_encoding", "UTF8"), m.BackendKeyData(7, 8), RFQ_I)
    assert s.is_idle()
    return s


# ------------------------------------------------------------------------------ startup


def test_startup_with_password() -> None:
    s = SessionState()
    assert s.phase is Phase.STARTUP and not s.is_idle()
    fe(s, m.SSLRequest())  # answered with a raw byte, then TLS; still startup
    assert s.phase is Phase.STARTUP
    fe(s, STARTUP)
    assert s.phase is Phase.AUTHENTICATING
    assert s.startup_parameters == {"user": "alice", "database": "app"}
    be(s, m.NegotiateProtocolVersion(0, ("_pq_.x",)), m.AuthenticationMD5Password(b"salt"))
    s.frontend_message(*wire(m.PasswordMessage(b"md5abc\0")))
    be(s, OK)
    assert s.phase is Phase.INITIALIZING
    be(s, m.ParameterStatus("server_version", "16.2"), NOTICE, m.BackendKeyData(1234, 5678))
    be(s, m.ParameterStatus("TimeZone", "UTC"), RFQ_I)
    assert s.phase is Phase.READY and s.tx_status is TxStatus.IDLE and s.is_idle()
    assert s.parameters == {"server_version": "16.2", "TimeZone": "UTC"}
    assert (s.backend_pid, s.backend_secret) == (1234, 5678)


def test_scram_exchange() -> None:
    s = SessionState()
    fe(s, STARTUP)
    be(s, m.AuthenticationSASL(("SCRAM-SHA-256",)))
    s.frontend_message(ord("p"), m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x")[5:])
    be(s, m.AuthenticationSASLContinue(b"r=xy,s=c2FsdA==,i=4096"))
    s.frontend_message(ord("p"), m.sasl_response(b"c=biws,r=xy,p=proof")[5:])
    be(s, m.AuthenticationSASLFinal(b"v=sig"), OK, RFQ_I)
    assert s.is_idle()


def test_authentication_failure_closes() -> None:
    s = SessionState()
    fe(s, STARTUP)
    be(s, m.AuthenticationCleartextPassword())
    be(s, m.ErrorResponse({"S": "FATAL", "C": "28P01", "M": "password authentication failed"}))
    assert s.phase is Phase.CLOSED


def test_cancel_request_connection() -> None:
    s = SessionState()
    fe(s, m.CancelRequest(1234, 5678))
    assert s.phase is Phase.CLOSED


def test_startup_errors_carry_their_sqlstate() -> None:
    s = SessionState()
    with pytest.raises(RemoteProtocolError) as info:
        s.frontend_message(0, m.startup_message({"database": "app"})[4:])
    assert info.value.sqlstate == "28000"
    with pytest.raises(RemoteProtocolError) as info:
        s.frontend_message(0, b"\0\x02\0\0user\0u\0\0")
    assert info.value.sqlstate == "0A000"


def test_requests_pipelined_behind_startup_wait_for_their_replies() -> None:
    s = SessionState()
    fe(s, STARTUP, m.Query("select 1"))  # trust auth: no password round trip
    be(s, OK, m.BackendKeyData(1, 2), RFQ_I)  # the first ReadyForQuery ends startup
    assert s.phase is Phase.READY and kinds(s) == "Q"
    be(s, *ROWS, m.CommandComplete("SELECT 2"), RFQ_I)
    assert s.is_idle()


# ------------------------------------------------------------------------- simple query


def test_simple_query() -> None:
    s = connected()
    fe(s, m.Query("select x from t"))
    assert not s.is_idle()
    assert s.pending[0] == PendingRequest("Q", sql="select x from t")
    be(s, *ROWS, m.CommandComplete("SELECT 2"))
    assert kinds(s) == "Q"
    be(s, RFQ_I)
    assert not s.pending and s.is_idle()


def test_multi_statement_query_with_error() -> None:
    s = connected()
    fe(s, m.Query("insert into t values (1); select 1/0; select 2"))
    be(s, m.CommandComplete("INSERT 0 1"), ERROR)
    assert kinds(s) == "Q"
    with pytest.raises(RemoteProtocolError, match="ReadyForQuery after an error"):
        be(s, m.CommandComplete("SELECT 1"))  # nothing runs after the error


def test_empty_query() -> None:
    s = connected()
    fe(s, m.Query(""))
    be(s, m.EmptyQueryResponse(), RFQ_I)
    assert s.is_idle()


def test_transaction_status_follows_ready_for_query() -> None:
    s = connected()
    fe(s, m.Query("begin"))
    be(s, m.CommandComplete("BEGIN"), RFQ_T)
    assert s.tx_status is TxStatus.IN_TRANSACTION and not s.is_idle()
    fe(s, m.Query("select 1/0"))
    be(s, ERROR, RFQ_E)
    assert s.tx_status is TxStatus.FAILED and not s.is_idle()
    fe(s, m.Query("rollback"))
    be(s, m.CommandComplete("ROLLBACK"), RFQ_I)
    assert s.tx_status is TxStatus.IDLE and s.is_idle()


def test_pipelined_simple_queries() -> None:
    s = connected()
    fe(s, m.Query("select 1"), m.Query("select 2"), m.Query("select 3"))
    assert kinds(s) == "QQQ"
    be(s, *ROWS, m.CommandComplete("SELECT 2"), RFQ_I)
    assert [r.sql for r in s.pending] == ["select 2", "select 3"]
    be(s, ERROR, RFQ_I, m.CommandComplete("SELECT 1"), RFQ_I)
    assert s.is_idle()


# ---------------------------------------------------------------------- extended protocol


def test_extended_query() -> None:
    s = connected()
    fe(s, m.Parse("", "select $1", (23,)), m.Bind("", "", (), (b"1",), ()))
    fe(s, m.Describe("P", ""), m.Execute("", 0), m.Sync())
    assert kinds(s) == "PBDES"
    be(s, m.ParseComplete(), m.BindComplete(), ROWS[0])
    assert kinds(s) == "ES"
    be(s, ROWS[1], ROWS[2], m.CommandComplete("SELECT 2"))
    assert kinds(s) == "S" and not s.is_idle()
    be(s, RFQ_I)
    assert s.is_idle()


def test_describe_statement_then_portal() -> None:
    s = connected()
    fe(s, m.Parse("s", "select $1"), m.Describe("S", "s"), m.Describe("P", "nope"), m.Sync())
    be(s, m.ParseComplete(), m.ParameterDescription((23,)), m.NoData())
    assert kinds(s) == "DS"
    with pytest.raises(RemoteProtocolError, match="Describe portal"):
        be(s, m.ParameterDescription((23,)))  # only a statement Describe gets one


def test_execute_suspended_and_resumed() -> None:
    s = connected()
    fe(s, m.Parse("", "select x from t"), m.Bind("", ""), m.Execute("", 1), m.Execute("", 1))
    fe(s, m.Sync())
    be(s, m.ParseComplete(), m.BindComplete(), ROWS[1], m.PortalSuspended())
    assert kinds(s) == "ES"
    be(s, ROWS[2], m.CommandComplete("SELECT 1"), RFQ_I)
    assert s.is_idle()


def test_error_in_pipeline_drops_entries_until_sync() -> None:
    s = connected()
    batch1 = (m.Parse("a", "select 1/0"), m.Bind("", "a"), m.Describe("P", ""), m.Execute(""))
    batch2 = (m.Parse("b", "select 2"), m.Bind("", "b"), m.Execute(""))
    fe(s, *batch1, m.Sync(), *batch2, m.Sync())
    assert kinds(s) == "PBDESPBES"
    be(s, m.ParseComplete(), m.BindComplete(), ERROR)  # Describe fails: Execute is skipped
    assert kinds(s) == "SPBES"
    be(s, NOTICE, RFQ_I)
    assert kinds(s) == "PBES"
    be(s, m.ParseComplete(), m.BindComplete(), ROWS[1], m.CommandComplete("SELECT 1"), RFQ_I)
    assert s.is_idle()
    assert set(s.prepared_statements) == {"a", "b"}


def test_error_before_the_sync_is_sent_skips_what_follows() -> None:
    s = connected()
    fe(s, m.Parse("", "select 1/0"), m.Flush())
    be(s, ERROR)
    assert not s.pending and not s.is_idle()
    fe(s, m.Bind("", ""), m.Execute(""), m.Close("S", "x"))  # discarded by the server
    assert not s.pending
    fe(s, m.Sync(), m.Query("select 1"))
    assert kinds(s) == "SQ"
    be(s, RFQ_I, m.CommandComplete("SELECT 0"), RFQ_I)
    assert s.is_idle()


def test_sync_error_is_followed_by_ready_for_query() -> None:
    s = connected()
    fe(s, m.Parse("", "insert into deferred values (1)"), m.Bind("", ""), m.Execute(""))
    fe(s, m.Sync())
    be(s, m.ParseComplete(), m.BindComplete(), m.CommandComplete("INSERT 0 1"))
    be(s, m.ErrorResponse({"S": "ERROR", "C": "23503", "M": "commit failed"}))  # at commit
    assert kinds(s) == "S"
    be(s, RFQ_I)
    assert s.is_idle()


def test_sync_less_pipeline_is_not_idle() -> None:
    s = connected()
    fe(s, m.Parse("", "select 1"), m.Bind("", ""), m.Execute(""), m.Flush())
    be(s, m.ParseComplete(), m.BindComplete(), ROWS[1], m.CommandComplete("SELECT 1"))
    assert not s.pending
    assert not s.is_idle()  # the server is inside an implicit transaction
    fe(s, m.Sync())
    be(s, RFQ_I)
    assert s.is_idle()


def test_malformed_request_is_queued_and_answered_by_an_error() -> None:
    s = connected()
    s.frontend_message(ord("P"), b"stmt-without-nul")
    fe(s, m.Bind("", "stmt-without-nul"), m.Sync())
    assert s.pending[0] == PendingRequest("P")
    be(s, m.ErrorResponse({"S": "ERROR", "C": "08P01", "M": "invalid string in message"}))
    assert kinds(s) == "S"
    be(s, RFQ_I)
    assert s.is_idle()


# ----------------------------------------------------------------------------------- COPY


def test_copy_in_simple() -> None:
    s = connected()
    fe(s, m.Query("copy t from stdin"))
    be(s, m.CopyInResponse(0, (0,)))
    assert s.phase is Phase.COPY_IN
    fe(s, *(m.CopyData(b"%d\n" % i) for i in range(1000)), m.CopyDone())
    assert kinds(s) == "Qc"  # CopyData is not queued
    be(s, m.CommandComplete("COPY 1000"))
    assert s.phase is Phase.READY and kinds(s) == "Q"
    be(s, RFQ_I)
    assert s.is_idle()


def test_copy_in_with_data_pipelined_before_copy_in_response() -> None:
    s = connected()
    fe(s, m.Query("copy t from stdin"), m.CopyData(b"1\n"), m.CopyDone(), m.Query("select 1"))
    be(s, m.CopyInResponse(0, (0,)), m.CommandComplete("COPY 1"), RFQ_I)
    assert kinds(s) == "Q" and s.pending[0].sql == "select 1"


def test_copy_in_extended_like_libpq() -> None:
    # libpq sends Sync right behind the Execute; the server ignores it during copy-in and
    # libpq sends a second Sync after CopyDone.
    s = connected()
    fe(s, m.Parse("", "copy t from stdin"), m.Bind("", ""), m.Describe("P", ""))
    fe(s, m.Execute(""), m.Sync())
    be(s, m.ParseComplete(), m.BindComplete(), m.NoData(), m.CopyInResponse(0, (0,)))
    assert s.phase is Phase.COPY_IN
    fe(s, m.CopyData(b"1\n"), m.Flush(), m.CopyData(b"2\n"), m.CopyDone(), m.Sync())
    be(s, m.CommandComplete("COPY 2"))
    assert kinds(s) == "S"
    be(s, RFQ_I)
    assert s.is_idle()


def test_copy_fail() -> None:
    s = connected()
    fe(s, m.Query("copy t from stdin"))
    be(s, m.CopyInResponse(0, (0,)))
    fe(s, m.CopyData(b"1\n"), m.CopyFail("client gave up"))
    be(s, m.ErrorResponse({"S": "ERROR", "C": "57014", "M": "COPY from stdin failed"}))
    assert s.phase is Phase.READY and kinds(s) == "Q"
    be(s, RFQ_I)
    assert s.is_idle()


def test_copy_in_error_while_client_still_sends_data_extended() -> None:
    s = connected()
    fe(s, m.Parse("", "copy t from stdin"), m.Bind("", ""), m.Execute(""), m.Sync())
    be(s, m.ParseComplete(), m.BindComplete(), m.CopyInResponse(0, ()))
    fe(s, m.CopyData(b"bad\n"))
    be(s, m.ErrorResponse({"S": "ERROR", "C": "22P02", "M": "invalid input syntax"}))
    assert s.phase is Phase.READY and not s.pending
    fe(s, m.CopyData(b"more\n"), m.CopyDone(), m.Sync())  # late: discarded up to the Sync
    assert kinds(s) == "S"
    be(s, RFQ_I)
    assert s.is_idle()


def test_copy_in_error_simple_with_late_data() -> None:
    s = connected()
    fe(s, m.Query("copy t from stdin"))
    be(s, m.CopyInResponse(0, ()))
    fe(s, m.CopyData(b"bad\n"))
    be(s, m.ErrorResponse({"S": "ERROR", "C": "22P02", "M": "invalid input syntax"}), RFQ_I)
    fe(s, m.CopyData(b"late\n"), m.CopyDone())  # the server ignores these
    assert not s.pending and s.is_idle()


def test_non_copy_message_during_copy_in_is_consumed_by_the_error() -> None:
    s = connected()
    fe(s, m.Query("copy t from stdin"), m.Query("select 1"))
    be(s, m.CopyInResponse(0, ()))
    be(s, m.ErrorResponse({"S": "ERROR", "C": "08P01", "M": "unexpected message type 0x51"}))
    assert kinds(s) == "Q" and s.pending[0].sql == "copy t from stdin"
    be(s, RFQ_I)
    assert s.is_idle()


def test_copy_out_simple_and_extended() -> None:
    s = connected()
    fe(s, m.Query("copy t to stdout"))
    be(s, m.CopyOutResponse(0, (0,)))
    assert s.phase is Phase.COPY_OUT
    be(s, m.CopyData(b"1\n"), NOTICE, m.CopyData(b"2\n"), m.CopyDone())
    assert s.phase is Phase.READY
    be(s, m.CommandComplete("COPY 2"), RFQ_I)
    assert s.is_idle()
    fe(s, m.Parse("", "copy t to stdout"), m.Bind("", ""), m.Execute(""), m.Sync())
    be(s, m.ParseComplete(), m.BindComplete(), m.CopyOutResponse(0, (0,)), m.CopyData(b"1\n"))
    be(s, m.CopyDone(), m.CommandComplete("COPY 1"))
    assert kinds(s) == "S"
    be(s, RFQ_I)
    assert s.is_idle()


def test_copy_out_error() -> None:
    s = connected()
    fe(s, m.Parse("", "copy (select 1/0) to stdout"), m.Bind("", ""), m.Execute(""), m.Sync())
    be(s, m.ParseComplete(), m.BindComplete(), m.CopyOutResponse(0, (0,)), ERROR)
    assert s.phase is Phase.READY and kinds(s) == "S"
    be(s, RFQ_I)
    assert s.is_idle()


def test_copy_both() -> None:
    s = connected()
    fe(s, m.Query("START_REPLICATION SLOT s LOGICAL 0/0"))
    be(s, m.CopyBothResponse(0, ()))
    assert s.phase is Phase.COPY_BOTH
    be(s, m.CopyData(b"w..."))
    fe(s, m.CopyData(b"r..."), m.CopyData(b"r..."), m.CopyDone())
    be(s, m.CopyData(b"w..."), m.CopyDone())
    assert s.phase is Phase.COPY_IN  # the server has finished; the client already has
    be(s, m.CommandComplete("START_REPLICATION"), RFQ_I)
    assert s.is_idle()


def test_stray_copy_messages_outside_copy_are_ignored() -> None:
    s = connected()
    fe(s, m.CopyData(b"x"), m.CopyDone(), m.CopyFail("x"))
    assert s.is_idle()
    fe(s, m.Query("select 1"), m.CopyData(b"x"))
    be(s, m.CommandComplete("SELECT 0"), RFQ_I)
    assert s.is_idle()


def test_copy_completed_before_copy_done_is_illegal() -> None:
    s = connected()
    fe(s, m.Query("copy t from stdin"))
    be(s, m.CopyInResponse(0, ()))
    fe(s, m.CopyData(b"1\n"))
    with pytest.raises(RemoteProtocolError, match="COPY_IN.*before the client sent CopyDone"):
        be(s, m.CommandComplete("COPY 1"))


# -------------------------------------------------------------------------- function call


def test_function_call() -> None:
    s = connected()
    fe(s, m.FunctionCall(1598, (), (), 0))
    be(s, m.FunctionCallResponse(b"0.42"))
    assert kinds(s) == "F"
    be(s, RFQ_I)
    assert s.is_idle()
    fe(s, m.FunctionCall(1, (), (), 0))
    be(s, ERROR, RFQ_I)
    assert s.is_idle()


# ------------------------------------------------------------ prepared statements, portals


def test_prepared_statement_lifecycle() -> None:
    s = connected()
    fe(s, m.Parse("s1", "select 1"), m.Parse("", "select 2"), m.Parse("s2", "select 3"))
    fe(s, m.Sync())
    be(s, m.ParseComplete())
    assert s.prepared_statements == {"s1": "select 1"}
    be(s, m.ParseComplete(), m.ParseComplete(), RFQ_I)
    assert s.prepared_statements == {"s1": "select 1", "s2": "select 3"}  # unnamed not listed
    fe(s, m.Close("S", "s1"), m.Close("S", "never-existed"), m.Sync())
    be(s, m.CloseComplete())
    assert s.prepared_statements == {"s2": "select 3"}
    be(s, m.CloseComplete(), RFQ_I)
    fe(s, m.Query("DEALLOCATE ALL"))
    be(s, m.CommandComplete("DEALLOCATE ALL"), RFQ_I)
    assert s.prepared_statements == {}


def test_failed_parse_does_not_create_a_statement() -> None:
    s = connected()
    fe(s, m.Parse("s1", "selec 1"), m.Sync())
    be(s, ERROR, RFQ_I)
    assert s.prepared_statements == {}


def test_discard_all_and_deallocate_name() -> None:
    s = connected()
    fe(s, m.Parse("a", "select 1"), m.Parse("b", "select 2"), m.Parse("Cc", "select 3"))
    fe(s, m.Parse('we"ird', "select 4"), m.Sync())
    be(s, *(m.ParseComplete(),) * 4, RFQ_I)
    fe(s, m.Query('deallocate a; DEALLOCATE PREPARE "we""ird"'))
    be(s, m.CommandComplete("DEALLOCATE"), m.CommandComplete("DEALLOCATE"), RFQ_I)
    assert set(s.prepared_statements) == {"b", "Cc"}
    fe(s, m.Parse("", "deallocate b"), m.Bind("", ""), m.Execute(""), m.Sync())
    be(s, m.ParseComplete(), m.BindComplete(), m.CommandComplete("DEALLOCATE"), RFQ_I)
    assert set(s.prepared_statements) == {"Cc"}
    fe(s, m.Query("DISCARD ALL"))
    be(s, m.CommandComplete("DISCARD ALL"), RFQ_I)
    assert s.prepared_statements == {}


def test_portals_and_request_sql() -> None:
    s = connected()
    fe(s, m.Query("begin"))
    be(s, m.CommandComplete("BEGIN"), RFQ_T)
    fe(s, m.Parse("s", "select * from t"), m.Bind("cur", "s"), m.Execute("cur", 10), m.Sync())
    be(s, m.ParseComplete())
    assert s.request_sql(s.pending[0]) == "select * from t"  # the Bind
    be(s, m.BindComplete())
    assert s.portals == {"cur": "select * from t"}
    assert s.request_sql(s.pending[0]) == "select * from t"  # the Execute
    be(s, ROWS[1], m.PortalSuspended(), RFQ_T)
    assert "cur" in s.portals  # portals live until the transaction ends
    fe(s, m.Close("P", "cur"), m.Sync())
    be(s, m.CloseComplete(), RFQ_T)
    assert s.portals == {}
    fe(s, m.Bind("c2", "s"), m.Sync(), m.Query("commit"))
    be(s, m.BindComplete(), RFQ_T, m.CommandComplete("COMMIT"), RFQ_I)
    assert s.portals == {} and s.prepared_statements == {"s": "select * from t"}


# ----------------------------------------------------------- asynchronous server messages


def test_async_messages_do_not_disturb_the_fifo() -> None:
    s = connected()
    fe(s, m.Parse("", "select 1"), m.Bind("", ""), m.Execute(""), m.Sync())
    for reply in (m.ParseComplete(), m.BindComplete(), ROWS[1], m.CommandComplete("SELECT 1")):
        before = kinds(s)
        be(s, NOTICE, NOTIFY, m.ParameterStatus("application_name", "x"))
        assert kinds(s) == before
        be(s, reply)
    be(s, NOTIFY, RFQ_I, NOTIFY, NOTICE)
    assert s.is_idle() and s.parameters["application_name"] == "x"


# ------------------------------------------------------------------ termination, closing


def test_terminate_after_pending_replies() -> None:
    s = connected()
    fe(s, m.Query("select 1"), m.Terminate())
    assert s.phase is Phase.READY
    be(s, m.CommandComplete("SELECT 0"), RFQ_I)
    assert s.phase is Phase.CLOSED
    be(s, NOTIFY)  # may still be in flight
    with pytest.raises(RemoteProtocolError, match="Query .* after Terminate"):
        fe(s, m.Query("select 2"))


def test_fatal_error_closes_and_late_client_messages_are_tolerated() -> None:
    s = connected()
    fe(s, m.Query("select pg_sleep(10)"))
    be(s, FATAL)
    assert s.phase is Phase.CLOSED
    fe(s, m.Query("select 1"))  # sent before the client saw the FATAL
    with pytest.raises(RemoteProtocolError, match="DataRow .* in phase CLOSED"):
        be(s, ROWS[1])


def test_fatal_error_while_idle() -> None:
    s = connected()
    be(s, m.ErrorResponse({"S": "FATAL", "V": "FATAL", "C": "57P05", "M": "idle timeout"}))
    assert s.phase is Phase.CLOSED and not s.is_idle()


# --------------------------------------------------------------------- illegal transitions


ILLEGAL_BACKEND = [
    ([], m.AuthenticationOk(), "Authentication ('R') in phase READY"),
    ([], m.BackendKeyData(1, 2), "BackendKeyData ('K') in phase READY"),
    ([], RFQ_I, "ReadyForQuery ('Z') in phase READY, with no request pending"),
    ([], ERROR, "ErrorResponse ('E') in phase READY, with no request pending"),
    (
        [m.Bind("", "")],
        m.ParseComplete(),
        "ParseComplete ('1') in phase READY, but the request being answered is Bind",
    ),
    (
        [m.Parse("", "")],
        RFQ_I,
        "ReadyForQuery ('Z') in phase READY, but the request being answered is Parse",
    ),
    (
        [m.Query("")],
        m.ParseComplete(),
        "ParseComplete ('1') in phase READY, but the request being answered is Query",
    ),
    (
        [m.Execute("")],
        m.CopyData(b""),
        "CopyData ('d') in phase READY, but the request being answered is Execute",
    ),
    (
        [m.Sync()],
        m.CommandComplete("x"),
        "CommandComplete ('C') in phase READY, but the request being answered is Sync",
    ),
    (
        [m.Close("S", "")],
        m.NoData(),
        "NoData ('n') in phase READY, but the request being answered is Close",
    ),
]


@pytest.mark.parametrize(("requests", "reply", "text"), ILLEGAL_BACKEND)
def test_illegal_backend_messages(requests: list, reply: object, text: str) -> None:
    s = connected()
    fe(s, *requests)
    with pytest.raises(RemoteProtocolError) as info:
        be(s, reply)
    assert info.value.sqlstate == "08P01"
    assert text in info.value.message


def test_illegal_messages_before_and_during_startup() -> None:
    s = SessionState()
    with pytest.raises(RemoteProtocolError, match="client sent Query .* in phase STARTUP"):
        fe(s, m.Query("select 1"))
    with pytest.raises(RemoteProtocolError, match="server sent ReadyForQuery .* in phase STARTUP"):
        be(s, RFQ_I)
    fe(s, STARTUP)
    with pytest.raises(RemoteProtocolError, match="server sent DataRow .* in phase AUTHENTICATING"):
        be(s, ROWS[1])
    with pytest.raises(RemoteProtocolError, match="client sent startup packet in phase AUTH"):
        fe(s, STARTUP)
    be(s, OK)
    with pytest.raises(RemoteProtocolError, match="PasswordMessage .* in phase INITIALIZING"):
        s.frontend_message(ord("p"), b"pw\0")


def test_illegal_messages_in_copy_phases() -> None:
    s = connected()
    fe(s, m.Query("copy t to stdout"))
    be(s, m.CopyOutResponse(0, ()))
    with pytest.raises(RemoteProtocolError, match="CommandComplete .* in phase COPY_OUT"):
        be(s, m.CommandComplete("COPY 0"))
    s = connected()
    fe(s, m.Query("copy t from stdin"))
    be(s, m.CopyInResponse(0, ()))
    with pytest.raises(RemoteProtocolError, match="CopyData .* in phase COPY_IN"):
        be(s, m.CopyData(b"x"))
    fe(s, m.CopyFail("no"))
    with pytest.raises(RemoteProtocolError, match="instead of CopyDone"):
        be(s, m.CommandComplete("COPY 0"))


def test_malformed_backend_bodies_the_session_reads_raise() -> None:
    s = connected()
    fe(s, m.Sync())
    with pytest.raises(RemoteProtocolError, match="malformed ReadyForQuery"):
        s.backend_message(ord("Z"), b"X")
    with pytest.raises(RemoteProtocolError, match="malformed ParameterStatus"):
        s.backend_message(ord("S"), b"a\0b")


def test_unknown_types_pass_in_both_directions() -> None:
    s = connected()
    s.frontend_message(ord("?"), b"whatever")
    s.backend_message(ord("?"), b"whatever")
    assert s.is_idle()


# ------------------------------------------------------ interleavings of the two directions

F, B = "F", "B"
CONVERSATION = [
    (F, STARTUP),
    (B, m.AuthenticationMD5Password(b"salt")),
    (F, m.PasswordMessage(b"md5abc\0")),
    (B, OK),
    (B, m.ParameterStatus("server_version", "16")),
    (B, m.BackendKeyData(1, 2)),
    (B, RFQ_I),
    # extended query with a statement Describe
    (F, m.Parse("s1", "select $1")),
    (F, m.Describe("S", "s1")),
    (F, m.Bind("", "s1", (), (b"1",), ())),
    (F, m.Execute("")),
    (F, m.Sync()),
    (B, m.ParseComplete()),
    (B, m.ParameterDescription((23,))),
    (B, ROWS[0]),
    (B, m.BindComplete()),
    (B, ROWS[1]),
    (B, m.CommandComplete("SELECT 1")),
    (B, RFQ_I),
    # a failing batch, then a good one
    (F, m.Parse("s2", "select 1/0")),
    (F, m.Bind("", "s2")),
    (F, m.Execute("")),
    (F, m.Sync()),
    (F, m.Parse("s3", "select 3")),
    (F, m.Bind("", "s3")),
    (F, m.Execute("")),
    (F, m.Sync()),
    (B, m.ParseComplete()),
    (B, m.BindComplete()),
    (B, ERROR),
    (B, RFQ_I),
    (B, m.ParseComplete()),
    (B, m.BindComplete()),
    (B, ROWS[2]),
    (B, m.CommandComplete("SELECT 1")),
    (B, RFQ_I),
    # libpq-style extended COPY FROM STDIN
    (F, m.Parse("", "copy t from stdin")),
    (F, m.Bind("", "")),
    (F, m.Execute("")),
    (F, m.Sync()),
    (B, m.ParseComplete()),
    (B, m.BindComplete()),
    (B, m.CopyInResponse(0, (0,))),
    (F, m.CopyData(b"1\n")),
    (F, m.CopyData(b"2\n")),
    (F, m.CopyDone()),
    (F, m.Sync()),
    (B, m.CommandComplete("COPY 2")),
    (B, RFQ_I),
    # simple COPY TO STDOUT, a transaction that fails, a function call
    (F, m.Query("copy t to stdout")),
    (B, m.CopyOutResponse(0, (0,))),
    (B, m.CopyData(b"1\n")),
    (B, m.CopyDone()),
    (B, m.CommandComplete("COPY 1")),
    (B, RFQ_I),
    (F, m.Query("begin; select 1/0")),
    (B, m.CommandComplete("BEGIN")),
    (B, ERROR),
    (B, RFQ_E),
    (F, m.Query("rollback")),
    (B, m.CommandComplete("ROLLBACK")),
    (B, RFQ_I),
    (F, m.FunctionCall(1598, (), (), 0)),
    (B, m.FunctionCallResponse(b"0.5")),
    (B, RFQ_I),
    (F, m.Close("S", "s1")),
    (F, m.Sync()),
    (B, m.CloseComplete()),
    (B, RFQ_I),
    (F, m.Terminate()),
]


def snapshot(s: SessionState) -> tuple:
    return (
        s.phase,
        s.tx_status,
        list(s.pending),
        dict(s.prepared_statements),
        dict(s.portals),
        dict(s.parameters),
        s.is_idle(),
    )


def replay(conversation: list, choices: list[bool] | None = None) -> SessionState:
    """Run ``conversation``; ``choices`` decides, whenever both are possible, whether the
    next client message (True) or the next server message (False) is shown first. A server
    message is only ever shown after every client message before it in the conversation."""
    front = [msg for d, msg in conversation if d == F]
    back = []
    sent = 0
    for d, msg in conversation:
        if d == F:
            sent += 1
        else:
            back.append((sent, msg))
    s = SessionState()
    fi = bi = 0
    choices = list(choices or [])
    while fi < len(front) or bi < len(back):
        server_may = bi < len(back) and back[bi][0] <= fi
        if fi < len(front) and (not server_may or (choices.pop() if choices else False)):
            fe(s, front[fi])
            fi += 1
        else:
            be(s, back[bi][1])
            bi += 1
    return s


def test_conversation_in_lockstep() -> None:
    s = replay(CONVERSATION)
    assert s.phase is Phase.CLOSED and not s.pending
    # s2 was parsed before its Execute failed; the Close removed s1
    assert s.prepared_statements == {"s2": "select 1/0", "s3": "select 3"}


def test_conversation_fully_pipelined() -> None:
    s = replay(CONVERSATION, [True] * len(CONVERSATION))
    assert snapshot(s) == snapshot(replay(CONVERSATION))


def test_skipping_client_copy_data_and_server_data_rows_changes_nothing() -> None:
    # the relay does not show these two to the session, for speed
    def noisy(d: str, msg: object) -> bool:
        return (d == F and isinstance(msg, m.CopyData)) or (d == B and isinstance(msg, m.DataRow))

    lean = [(d, msg) for d, msg in CONVERSATION if not noisy(d, msg)]
    assert len(lean) < len(CONVERSATION)
    assert snapshot(replay(lean)) == snapshot(replay(CONVERSATION))
    assert snapshot(replay(lean, [True] * len(lean))) == snapshot(replay(CONVERSATION))


@settings(max_examples=200)
@given(st.lists(st.booleans(), max_size=len(CONVERSATION)))
def test_any_interleaving_gives_the_same_state(choices: list[bool]) -> None:
    assert snapshot(replay(CONVERSATION, choices)) == snapshot(replay(CONVERSATION))


@settings(max_examples=200)
@given(st.data())
def test_async_messages_anywhere_after_startup_change_nothing(data: st.DataObject) -> None:
    first_ready = CONVERSATION.index((B, RFQ_I))
    conversation = list(CONVERSATION[:-1])  # keep Terminate last
    for _ in range(data.draw(st.integers(0, 8))):
        at = data.draw(st.integers(first_ready + 1, len(conversation)))
        conversation.insert(at, (B, data.draw(st.sampled_from([NOTICE, NOTIFY]))))
    expected = replay(CONVERSATION[:-1])
    assert snapshot(replay(conversation)) == snapshot(expected)


# ------------------------------------------------------------------ streamed messages


def test_a_streamed_named_parse_keeps_its_name_but_not_its_text() -> None:
    s = connected()
    s.frontend_streamed(ord("P"), b"big\0SELECT 1 -- xxxxxxxxxxxxxxxx")
    fe(s, m.Sync())
    be(s, m.ParseComplete(), m.ReadyForQuery("I"))
    assert s.prepared_statements == {"big": ""}
    assert s.statements_not_kept == ["big"]
    fe(s, m.Close("S", "big"), m.Sync())
    be(s, m.CloseComplete(), m.ReadyForQuery("I"))
    assert s.statements_not_kept == []


def test_a_streamed_bind_and_query_are_followed_from_their_heads() -> None:
    s = connected()
    fe(s, m.Parse("st", "INSERT INTO t VALUES ($1)"), m.Sync())
    be(s, m.ParseComplete(), m.ReadyForQuery("I"))
    s.frontend_streamed(ord("B"), b"por\0st\0\0\0\0\1\0\x10\0\0xxxx")
    fe(s, m.Execute("por"), m.Sync())
    be(s, m.BindComplete(), m.CommandComplete("INSERT 0 1"), m.ReadyForQuery("I"))
    assert s.is_idle() and s.statements_not_kept == []
    s.frontend_streamed(ord("Q"), b"INSERT INTO t VALUES ('xxxxxxxx")
    assert s.pending[0].kind == "Q" and s.pending[0].sql is None
    be(s, m.CommandComplete("INSERT 0 1"), m.ReadyForQuery("I"))
    assert s.is_idle()


def test_a_streamed_message_after_terminate_is_refused() -> None:
    s = connected()
    fe(s, m.Terminate())
    with pytest.raises(RemoteProtocolError, match="after Terminate"):
        s.frontend_streamed(ord("Q"), b"SELECT 1")


# ------------------------------------------------- whole batches (the relay's hot path)

# the conversation, plus what the batch methods treat specially: DEALLOCATE and DISCARD
# command tags, malformed requests, a notice between replies
BATCHED = CONVERSATION[:-1] + [
    (F, m.Parse("s4", "select 4")),
    (F, m.Bind("p4", "s4")),
    (F, m.Describe("P", "p4")),
    (F, m.Execute("p4", 1)),
    (F, m.Sync()),
    (B, m.ParseComplete()),
    (B, m.BindComplete()),
    (B, ROWS[0]),
    (B, NOTICE),
    (B, ROWS[1]),
    (B, m.PortalSuspended()),
    (B, RFQ_I),
    (F, m.Query("deallocate s3")),
    (B, m.CommandComplete("DEALLOCATE")),
    (B, RFQ_I),
    (F, m.Unknown(ord("E"), b"no terminator")),
    (F, m.Unknown(ord("P"), b"x")),
    (F, m.Sync()),
    (B, ERROR),
    (B, RFQ_I),
    (F, m.Unknown(ord("Q"), b"")),
    (B, ERROR),
    (B, RFQ_I),
    (F, m.Query("begin")),
    (B, m.CommandComplete("BEGIN")),
    (B, RFQ_T),
    (F, m.Query("discard all")),
    (B, m.CommandComplete("DISCARD ALL")),
    (B, RFQ_T),
    (F, m.Terminate()),
]


def frames_of(msgs: list) -> tuple[bytes, list]:
    """The bytes of ``msgs`` back to back and their frames, as shadow.framing.Framer cuts them."""
    buf, frames = b"", []
    for msg in msgs:
        raw = msg.encode()
        head = 4 if isinstance(msg, _UNTYPED) else 5
        frames.append((0 if head == 4 else raw[0], len(buf) + head, len(buf) + len(raw)))
        buf += raw
    return buf, frames


def replay_batched(conversation: list, data: st.DataObject) -> SessionState:
    """As replay, but every turn shows a batch of one or more messages of one direction
    through frontend_frames / backend_frames."""
    front = [msg for d, msg in conversation if d == F]
    back, sent = [], 0
    for d, msg in conversation:
        sent += d == F
        if d == B:
            back.append((sent, msg))
    s = SessionState()
    fi = bi = 0
    while fi < len(front) or bi < len(back):
        server_may = bi < len(back) and back[bi][0] <= fi
        if fi < len(front) and (not server_may or data.draw(st.booleans())):
            n = data.draw(st.integers(1, len(front) - fi))
            s.frontend_frames(*frames_of(front[fi:fi + n]))
            fi += n
        else:
            ready = sum(1 for i in range(bi, len(back)) if back[i][0] <= fi)
            n = data.draw(st.integers(1, ready))
            buf, frames = frames_of([msg for _, msg in back[bi:bi + n]])
            lo = data.draw(st.integers(0, 1)) if n > 1 else 0  # a batch may start inside the frames
            if lo:
                s.backend_frames(buf, frames, 0, lo)
            s.backend_frames(buf, frames, lo)
            bi += n
    return s


def test_batched_conversation_covers_what_it_should() -> None:
    s = replay(BATCHED)
    assert s.phase is Phase.CLOSED
    assert s.prepared_statements == {}  # DEALLOCATE s3, then DISCARD ALL


@settings(max_examples=300)
@given(st.data())
def test_batches_give_the_same_state_as_one_message_at_a_time(data: st.DataObject) -> None:
    assert snapshot(replay_batched(BATCHED, data)) == snapshot(replay(BATCHED))


@pytest.mark.parametrize("requests, reply", [
    ([m.Query("select 1")], m.ParseComplete()),
    ([m.Parse("", "select 1"), m.Sync()], m.BindComplete()),
    ([m.Query("select 1")], m.ReadyForQuery("I")),  # fine: then the next one has nothing to answer
])
def test_batches_raise_where_one_message_at_a_time_raises(requests: list, reply: object) -> None:
    one, batched = connected(), connected()
    fe(one, *requests)
    batched.frontend_frames(*frames_of(requests))
    replies = [reply, m.ReadyForQuery("I")]
    for msg in replies:
        try:
            be(one, msg)
        except RemoteProtocolError as e:
            expected = e.message
            break
    else:
        expected = None
    buf, frames = frames_of(replies)
    if expected is None:
        batched.backend_frames(buf, frames)
        assert snapshot(batched) == snapshot(one)
    else:
        with pytest.raises(RemoteProtocolError) as raised:
            batched.backend_frames(buf, frames)
        assert raised.value.message == expected
