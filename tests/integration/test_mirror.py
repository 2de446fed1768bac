"""The mirror stream end to end: a primary connmgr in front of real Postgres mirrors every
session to a secondary connmgr's listener -- in order, exactly once, with TCP offsets and
LSN tags -- also across link cuts."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import psycopg
from connmgr_fixtures import wait_for  # noqa: E402

from replay.mirror_protocol import Data, Resync, SessionClosed, SessionOpened
from shadow.framing import Framer


def settled(primary) -> bool:
    s = primary.app.mirror.sender
    return s.latest_version > 0 and s.acked_version == s.latest_version


def workload(primary, n_sessions: int = 4, n_tx: int = 20) -> list[int]:
    """Each session writes n_tx rows in transactions; returns the virtual pids."""
    info = primary.conninfo(password="postgres")
    with psycopg.connect(info, autocommit=True) as c:
        c.execute("create table if not exists mirror_t (s int, i int)")
    pids = []

    def one(k: int) -> None:
        with psycopg.connect(info, prepare_threshold=None) as conn:  # every statement with its text
            pids.append(conn.info.backend_pid)
            for i in range(n_tx):
                with conn.transaction():
                    conn.execute("insert into mirror_t values (%s, %s)", (k, i))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return pids


def check_stream(received: list) -> dict:
    """The invariants of a mirrored stream; returns per-session client payload bytes."""
    versions = [r.version for r in received if not isinstance(r, Resync)]
    assert versions == list(range(1, len(versions) + 1)), "versions not delivered once each, in order"
    opened, closed = set(), set()
    next_offset: dict[tuple[int, str], int] = {}
    last_lsn: dict[int, int] = defaultdict(int)
    client_bytes: dict[int, bytearray] = defaultdict(bytearray)
    for r in received:
        if isinstance(r, SessionOpened):
            opened.add(r.session_id)
        elif isinstance(r, SessionClosed):
            closed.add(r.session_id)
        elif isinstance(r, Data):
            assert r.session_id in opened and r.session_id not in closed
            key = (r.session_id, r.direction)
            if key in next_offset:
                assert r.offset == next_offset[key], f"offset gap in {key}"
            next_offset[key] = r.offset + len(r.payload)
            assert r.lsn >= last_lsn[r.session_id] > 0 or (r.lsn > 0 and last_lsn[r.session_id] == 0)
            last_lsn[r.session_id] = r.lsn
            if r.direction == "c":
                client_bytes[r.session_id] += r.payload
    return {"opened": opened, "closed": closed, "client_bytes": client_bytes, "lsn": last_lsn}


def queries_in(payload: bytes) -> list[bytes]:
    """Every Parse/Query text in a client byte stream (it must frame cleanly)."""
    buf, frames = Framer().feed(bytes(payload))
    assert sum(end - start + 5 for _t, start, end in frames) == len(payload), "payload is not whole messages"
    out = []
    for tag, start, end in frames:
        if tag in (ord("P"), ord("Q")):
            body = buf[start:end]
            if tag == ord("P"):
                body = body[body.index(0) + 1:]
            out.append(body[: body.index(0)])
    return out


def test_every_message_mirrored_once_in_order_with_offsets_and_lsns(pair, pg):
    primary, _secondary, received = pair
    with pg.connect(dbname="app") as c:
        lsn_before = c.execute("select pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0]
    workload(primary)
    assert wait_for(lambda: settled(primary) and not primary.app.clients)
    assert wait_for(lambda: settled(primary))
    with pg.connect(dbname="app") as c:
        lsn_after = c.execute("select pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0]
        c.execute("drop table mirror_t")
    facts = check_stream(received)
    assert len(facts["opened"]) == 5 and facts["opened"] == facts["closed"]  # 4 workers + setup
    for payload in facts["client_bytes"].values():
        texts = queries_in(payload)
        if any(b"insert into mirror_t" in t for t in texts):
            assert texts.count(b"insert into mirror_t values ($1, $2)") == 20
            assert texts.count(b"BEGIN") == 20 and texts.count(b"COMMIT") == 20
    assert all(lsn_before <= v <= lsn_after for v in facts["lsn"].values())
    stats = primary.app.clients  # all gone
    assert not stats
    # the tap saw exactly what connmgr relayed
    m = primary.app.metrics
    mirrored_c = sum(len(r.payload) for r in received if isinstance(r, Data) and r.direction == "c")
    mirrored_b = sum(len(r.payload) for r in received if isinstance(r, Data) and r.direction == "b")
    assert (mirrored_c, mirrored_b) == (m.closed.bytes_from_client, m.closed.bytes_to_client)


def test_link_cut_mid_stream_loses_and_doubles_nothing(pair, pg):
    primary, _secondary, received = pair
    link = primary.app.mirror
    stop = threading.Event()

    def cutter():
        while not stop.is_set():
            time.sleep(0.01)
            primary.run_sync(link._drop)

    t = threading.Thread(target=cutter)
    t.start()
    try:
        workload(primary, n_sessions=3, n_tx=100)
    finally:
        stop.set()
        t.join()
    assert wait_for(lambda: settled(primary) and not primary.app.clients, timeout=20)
    assert wait_for(lambda: settled(primary), timeout=20)
    with pg.connect(dbname="app") as c:
        c.execute("drop table mirror_t")
    assert link.connects >= 3, f"the cutter cut only {link.connects - 1} times"
    facts = check_stream(received)
    assert facts["opened"] == facts["closed"] and len(facts["opened"]) == 4
    inserts = sum(queries_in(p).count(b"insert into mirror_t values ($1, $2)") for p in facts["client_bytes"].values())
    assert inserts == 300
