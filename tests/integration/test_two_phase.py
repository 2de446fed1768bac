"""Two-phase mirroring (connmgr/pair/mirror.py): a writing transaction's commit acknowledgement
reaches the client only after the secondary connmgr acknowledged the mirrored reply; when
the secondary is gone, the written policy degrades to one-phase (metric, WARNING) and
two-phase comes back once the secondary has caught up."""

from __future__ import annotations

import logging
import random
import threading
import time

import psycopg
import pytest
from connmgr_fixtures import wait_for

from connmgr.ops.prometheus import render
from replay.mirror_protocol import Data

TIMEOUT = 0.5


@pytest.fixture(params=["engine"])
def two_phase(request, start_connmgr):
    """(primary in two-phase mode, secondary, received records, start_secondary)."""
    received: list = []
    lock = threading.Lock()

    def consume(records):
        with lock:
            received.extend(records)

    def start_secondary(listen: str = "127.0.0.1:0"):
        cm = start_connmgr(mirror={"listen": listen})
        cm.app.mirror_consumers.append(consume)
        return cm

    secondary = start_secondary()
    host, port = secondary.app.mirror_listen_address
    primary = start_connmgr(
        mirror={"peer": f"{host}:{port}", "heartbeat_interval": 0.05, "mode": "two-phase",
                "two_phase_timeout": TIMEOUT},
        redo={"user": "postgres", "password": "postgres", "interval": 0.002},
        server={"listen": ["127.0.0.1:0"], "shutdown_timeout": 5.0, "relay": request.param},
    )  # fmt: skip
    assert wait_for(lambda: primary.app.mirror.connected), "mirror link never came up"
    return primary, secondary, received, start_secondary, f"{host}:{port}"


def _ack_mirrored(received, sid: int, offset: int) -> bool:
    """The secondary holds the server-to-client bytes of session ``sid`` up to ``offset``."""
    return any(
        isinstance(r, Data) and r.session_id == sid and r.direction == "b" and r.offset + len(r.payload) >= offset
        for r in list(received)
    )


def gauges(cm) -> dict[str, float]:
    out = {}
    for line in render(cm.app.exported).splitlines():
        if line.startswith("connmgr_mirror_two_phase"):
            name, value = line.split()
            out[name.removeprefix("connmgr_mirror_")] = float(value)
    return out


@pytest.mark.parametrize("two_phase", ["engine", "tasks"], indirect=True)
def test_a_commit_ack_waits_for_the_secondary(two_phase):
    primary, _secondary, received, _start, _addr = two_phase
    with psycopg.connect(primary.conninfo(password="postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS tp_t (v int)")
        client = next(c for c in primary.app.clients.values() if c.key and c.key[0] == conn.info.backend_pid)
        for v in range(20):
            if v % 2:
                with conn.transaction():
                    conn.execute("INSERT INTO tp_t VALUES (%s)", (v,))
            else:
                conn.execute("INSERT INTO tp_t VALUES (%s)", (v,))
            # no waiting: the acknowledgement the client just got is already on the secondary
            assert _ack_mirrored(received, client.id, client.relay.downstream.offset)
        conn.execute("SELECT count(*) FROM tp_t").fetchone()  # a reader is not held
    g = gauges(primary)
    assert g["two_phase_active"] == 1 and g["two_phase_degradations"] == 0
    assert g["two_phase_holds_total"] >= 20 and g["two_phase_holds"] == 0


def test_secondary_gone_degrades_to_one_phase_and_recovers(two_phase, caplog):
    primary, secondary, received, start_secondary, addr = two_phase
    caplog.set_level(logging.WARNING, logger="connmgr.mirror")
    with psycopg.connect(primary.conninfo(password="postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS tp_t (v int)")
        conn.execute("INSERT INTO tp_t VALUES (1)")
        secondary.stop()
        stalls = []
        base = random.randrange(1 << 20, 1 << 30)  # this test's rows in the shared table
        for v in range(10):  # the primary keeps serving
            t0 = time.monotonic()
            conn.execute("INSERT INTO tp_t VALUES (%s)", (base + v,))
            stalls.append(time.monotonic() - t0)
        assert conn.execute("SELECT count(*) FROM tp_t WHERE v BETWEEN %s AND %s",
                            (base, base + 9)).fetchone()[0] == 10  # fmt: skip
        # one commit waited out the timeout; after the degrade nobody waits
        assert TIMEOUT * 0.9 < max(stalls) < TIMEOUT + 1.0
        assert sorted(stalls)[-2] < TIMEOUT / 2
        g = gauges(primary)
        assert g["two_phase_active"] == 0 and g["two_phase_degradations"] == 1
        assert any("DEGRADED to one-phase" in r.getMessage() for r in caplog.records)

        # a secondary comes back on the same address: resync, catch up, two-phase again
        start_secondary(addr)
        assert wait_for(lambda: primary.app.mirror.connected, timeout=10)
        conn.execute("INSERT INTO tp_t VALUES (100)")
        assert wait_for(lambda: gauges(primary)["two_phase_active"] == 1, timeout=10)
        assert any("two-phase restored" in r.getMessage() for r in caplog.records)
        client = next(c for c in primary.app.clients.values() if c.key and c.key[0] == conn.info.backend_pid)
        conn.execute("INSERT INTO tp_t VALUES (101)")
        assert _ack_mirrored(received, client.id, client.relay.downstream.offset)
