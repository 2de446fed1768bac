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


def test_the_engine_waits_in_trios_place_and_trio_keeps_its_times(start_connmgr):
    """connmgr/proxy/idle_wait.py: while one client queries without a pause, the engine
    waits on its own sets instead of trio's scheduler -- and everything trio does meanwhile
    is on time: another client's idle timeout (a trio deadline) fires after 1 s with 57P05,
    new clients are accepted and served, the metrics endpoint answers."""
    import threading
    import urllib.request

    from rawpg import error_of

    cm = start_connmgr(server={"client_idle_timeout": 1.0}, metrics={"listen": "127.0.0.1:0"})
    idle = cm.app.engine.idle_wait
    assert idle is not None, "the engine waits through trio's scheduler"
    stop = threading.Event()
    done: list[int] = []

    def busy() -> None:
        with psycopg.connect(cm.conninfo(password="postgres"), autocommit=True) as c:
            n = 0
            while not stop.is_set():
                assert c.execute("SELECT %s::int", (n,)).fetchone() == (n,)
                n += 1
            done.append(n)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        wait_for(lambda: idle.waits > 200, timeout=10, what="the engine to wait in trio's place")
        raw = RawPg.connect(cm.host, cm.port, timeout=10)
        msgs = raw.login("postgres", password="postgres")
        assert msgs[-1].tag == "Z", msgs
        started = time.monotonic()
        for i in range(10):  # accepted and served while the busy client runs
            with psycopg.connect(cm.conninfo(password="postgres"), connect_timeout=5) as c:
                assert c.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        body = urllib.request.urlopen(f"http://127.0.0.1:{cm.app.metrics_address[1]}/metrics", timeout=5).read()
        assert b"connmgr_clients_active" in body
        msg = raw.read_message()  # the idle client's timeout, on trio's clock
        elapsed = time.monotonic() - started
        assert msg is not None and error_of([msg]).fields["C"] == "57P05", msg
        assert 0.8 < elapsed < 2.5, f"idle timeout of 1 s fired after {elapsed:.2f} s"
        raw.close()
        before = idle.waits
        time.sleep(0.3)
        assert idle.waits > before, "the busy client's wakeups went through trio"
    finally:
        stop.set()
        worker.join(10)
    assert done and done[0] > 100


def test_the_engine_can_wait_through_trio(start_connmgr, monkeypatch):
    """CONNMGR_ENGINE_IDLE_WAIT=0: every wakeup goes through trio's scheduler, as before."""
    monkeypatch.setenv("CONNMGR_ENGINE_IDLE_WAIT", "0")
    cm = start_connmgr()
    assert cm.app.engine.idle_wait is None
    with psycopg.connect(cm.conninfo(password="postgres"), autocommit=True) as c:
        assert [c.execute("SELECT %s::int", (i,)).fetchone()[0] for i in range(50)] == list(range(50))


# ---- connmgr/proxy/idle_wait.py on its own: a real trio run, real descriptors, short times


def _with_idle_wait(body) -> object:
    """Run ``body(idle, feed, drain)`` in a trio run with an IdleWait on a fresh epoll set
    holding one socket (``feed()`` makes it readable, ``drain()`` not)."""
    import select

    import trio

    from connmgr.proxy.idle_wait import open_idle_wait

    async def main():
        engine = select.epoll()
        a, b = socket.socketpair()
        engine.register(a.fileno(), select.EPOLLIN)
        idle, why = open_idle_wait(engine.fileno())
        assert idle is not None, why
        try:
            return await body(idle, lambda: b.send(b"x"), lambda: a.recv(4096))
        finally:
            idle.close()
            engine.close()
            a.close()
            b.close()

    return trio.run(main)


def test_idle_wait_returns_for_the_engine_and_for_trio():
    import threading

    import trio

    async def body(idle, feed, drain):
        await trio.sleep(0.01)  # (woken alone: the last of its batch)
        idle.step()
        feed()
        assert idle.wait() is True  # the engine's set is ready, trio has nothing to do
        drain()
        got = []
        lst = trio.socket.socket()
        await lst.bind(("127.0.0.1", 0))
        lst.listen()

        async def accept():
            got.append(await lst.accept())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            await trio.sleep(0.05)
            idle.step()
            # a connection for trio's listener while the engine's set is quiet: trio's turn
            port = lst.getsockname()[1]
            threading.Timer(0.1, lambda: socket.create_connection(("127.0.0.1", port)).close()).start()
            started = time.monotonic()
            assert idle.wait() is False
            assert 0.05 < time.monotonic() - started < 0.9
        assert got
        lst.close()

    _with_idle_wait(body)


def test_idle_wait_leaves_the_thread_to_trio_for_a_deadline_or_a_runnable_task():
    import trio

    async def body(idle, feed, drain):
        await trio.sleep(0.01)  # (woken alone: the last of its batch)
        idle.step()
        with trio.move_on_after(0.2):  # the next deadline: it waits no longer
            started = time.monotonic()
            assert idle.wait() is False
            assert 0.15 < time.monotonic() - started < 0.6
        event = trio.Event()

        async def sleeper():
            await event.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            await trio.sleep(0.01)
            event.set()  # sleeper is runnable now: never wait
            idle.step()
            started = time.monotonic()
            assert idle.wait() is False
            assert time.monotonic() - started < 0.05

    _with_idle_wait(body)


def test_idle_wait_never_blocks_with_tasks_left_in_its_batch():
    """Two tasks woken together run in one batch, in either order. The one that runs first
    must not wait: the other is in neither the run queue nor trio's epoll set."""
    import trio

    outcomes = []

    async def body(idle, feed, drain):
        for _ in range(20):
            go = trio.Event()
            ran = []

            async def first(go, ran):
                await go.wait()
                idle.step()
                other_done = bool(ran)
                started = time.monotonic()
                with trio.move_on_after(0.3):
                    result = idle.wait()
                outcomes.append((other_done, result, time.monotonic() - started))

            async def second(go, ran):
                await go.wait()
                ran.append(True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first, go, ran)
                nursery.start_soon(second, go, ran)
                await trio.sleep(0.01)
                go.set()

    _with_idle_wait(body)
    not_last = [o for o in outcomes if not o[0]]
    assert not_last, "the other task always ran first (20 tries)"
    assert all(result is False and took < 0.05 for _done, result, took in not_last), not_last
