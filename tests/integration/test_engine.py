"""The relay engine (connmgr/proxy/engine.py): flow control, isolation, cleanup -- with real
Postgres and real sockets."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest
from connmgr_fixtures import wait_for
from rawpg import RawPg

from shadow import messages as m


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def pending_links(cm) -> list:
    engine = cm.app.engine
    return [link for link in set(engine._links.values()) if link.down.pending is not None]


def test_slow_reader_holds_back_one_chunk_not_the_result(proxy):
    """A client that stops reading a 100 MB COPY: the engine stops reading the server
    (flow control), connmgr's memory does not grow with the result, and once the client
    reads again every byte arrives."""
    rows, width = 100_000, 1000
    raw = RawPg.connect(proxy.host, proxy.port, timeout=30)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    msgs = raw.login("postgres", password="postgres")
    assert msgs[-1].tag == "Z"
    before = rss_kib()
    raw.send(m.query(f"COPY (SELECT repeat('x', {width}) FROM generate_series(1, {rows})) TO STDOUT"))
    # Not reading: the kernel buffers fill, then the engine must park the rest.
    assert wait_for(lambda: pending_links(proxy), timeout=10), "flow control never engaged"
    time.sleep(0.5)
    grown_while_parked = rss_kib() - before
    got = 0
    while True:
        msg = raw.read_message()
        assert msg is not None, "connection closed mid-COPY"
        if msg.tag == "d":
            got += len(msg.body)
        elif msg.tag == "Z":
            break
    assert got == rows * (width + 1)  # each line plus its newline, exactly
    assert grown_while_parked < 16 * 1024, f"connmgr grew {grown_while_parked} KiB while the client was not reading"
    assert not pending_links(proxy)
    raw.close()


def test_a_failure_in_one_session_costs_no_other(proxy, monkeypatch):
    """An unexpected exception while pumping one session ends that session with XX000;
    the engine and a concurrent session go on."""
    info = proxy.conninfo(password="postgres")
    with psycopg.connect(info, autocommit=True) as healthy, psycopg.connect(info, autocommit=True) as victim:
        conn = next(c for c in list(proxy.app.clients.values()) if c.key and c.key[0] == victim.info.backend_pid)

        def explode(buf, frames):
            raise RuntimeError("boom")

        # the client has its ReadyForQuery a moment before connmgr's thread attaches the link
        assert wait_for(lambda: conn.relay is not None and conn.relay._link is not None)
        link = conn.relay._link
        assert link.attached
        monkeypatch.setattr(link.up, "process", explode)
        with pytest.raises(psycopg.errors.InternalError_) as info:
            victim.execute("select 1")
        assert info.value.sqlstate == "XX000"
        assert "internal error in the relay engine" in str(info.value)
        with pytest.raises(psycopg.OperationalError):  # the session is gone
            victim.execute("select 1")
        assert healthy.execute("select 41 + 1").fetchone() == (42,)
        assert proxy.app.metrics.client_errors["XX000"] == 1


def test_sessions_leave_the_engine(proxy):
    engine = proxy.app.engine
    base = engine.sessions
    conns = [psycopg.connect(proxy.conninfo(password="postgres"), autocommit=True) for _ in range(20)]
    try:
        assert [c.execute("select %s::int", (i,)).fetchone()[0] for i, c in enumerate(conns)] == list(range(20))
        assert engine.sessions == base + 20
    finally:
        for c in conns:
            c.close()
    assert wait_for(lambda: engine.sessions == base)
    assert wait_for(lambda: proxy.app.active_clients == 0)
