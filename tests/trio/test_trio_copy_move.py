"""Moving a session caught in the middle of a COPY TO STDOUT (connmgr/failover/session_move.py,
used by both the database failover and the host takeover): the COPY is replayed on the new
server, the rows the client already has are compared and swallowed, and the client gets the
rest from the exact byte where it was. Found by the host-kill campaign's COPY out client
(connmgr/embedded/host_workload.py): such a session used to end with 08006 "it is in phase
copy out"."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import trio
import trio.testing

pytest.importorskip("httpx", reason="the [net] extra (httpx) is not installed")

from connmgr.failover import session_move  # noqa: E402
from connmgr.failover.session_move import NotMovable, _move  # noqa: E402
from connmgr.host.resume import _ReplicaRelay  # noqa: E402
from connmgr.pg.backend import BackendSession  # noqa: E402
from replay.session_replica import SessionReplica  # noqa: E402
from shadow import messages as m  # noqa: E402
from shadow.framing import Framer  # noqa: E402
from shadow.session import Phase  # noqa: E402

PARAMS = {"user": "u", "database": "app", "peer": "198.18.0.10:1", "local": "198.18.0.100:5432", "origin": "5",
          "markers": "1", "client_offset": "0", "server_offset": "0"}  # fmt: skip
COPY = m.query("COPY (SELECT g FROM generate_series(1, 3) g) TO STDOUT")


def msg(tag: bytes, body: bytes = b"") -> bytes:
    return tag + (len(body) + 4).to_bytes(4, "big") + body


#: the whole reply to COPY: CopyOutResponse (text, one column), three rows, CopyDone, CommandComplete, ReadyForQuery
REPLY = [msg(b"H", b"\0\0\1\0\0"), msg(b"d", b"1\n"), msg(b"d", b"2\n"), msg(b"d", b"3\n"), msg(b"c"),
         msg(b"C", b"COPY 3\0"), msg(b"Z", b"I")]  # fmt: skip


def frames(buf: bytes) -> list[tuple[int, int, int]]:
    out, i = [], 0
    while i < len(buf):
        end = i + 1 + int.from_bytes(buf[i + 1 : i + 5], "big")
        out.append((buf[i], i + 5, end))
        i = end
    return out


def mid_copy() -> SessionReplica:
    """An autocommit session that sent the COPY and received its CopyOutResponse and first row."""
    replica = SessionReplica(3, PARAMS)
    replica.client_batch(0, COPY, frames(COPY))
    received = b"".join(REPLY[:2])
    replica.server_batch(0, received, frames(received))
    assert replica.session.phase is Phase.COPY_OUT and replica.session.pending
    return replica


async def move(
    replica: SessionReplica, committed: int, monkeypatch
) -> tuple[BackendSession, list[bytes]]:
    """``_move`` the session to a fake server that answers the COPY in full; returns the
    new backend and what the server was sent."""
    ours, theirs = trio.testing.memory_stream_pair()
    sent: list[bytes] = []

    async def server() -> None:
        got = b""
        while len(got) < len(COPY):
            got += await theirs.receive_some(65536)
        sent.append(got)
        await theirs.send_all(b"".join(REPLY))

    async def open_backend(*_a, **_k) -> BackendSession:
        return BackendSession(None, ours, Framer(), 1, 1, {}, [])

    async def committed_seq(database, conn_id):
        return committed

    async def nothing(*_a) -> None:
        pass

    monkeypatch.setattr(session_move, "open_backend", open_backend)
    failover = SimpleNamespace(server=None, config=SimpleNamespace(max_replay_bytes=8 << 20),
                               committed_seq=committed_seq, note=lambda _t: None, commits_acknowledged=0,
                               transactions_replayed=0, replies_compared=0, transactions_rolled_back=Counter(),
                               commit_settled=lambda _c: None, replays_done=nothing, prefixes_replayed=nothing)  # fmt: skip
    conn = SimpleNamespace(id=1, database="app", session=replica.session, journal=replica.journal,
                           recorder=replica.recorder, startup_pairs=(), creds=None, max_message_size=1 << 20)  # fmt: skip
    out: dict = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        try:
            out["backend"] = await _move(conn, _ReplicaRelay(replica), failover, False)
        except NotMovable as e:
            out["error"] = e
        nursery.cancel_scope.cancel()  # the server may still wait for a request
    if "error" in out:
        raise out["error"]
    return out["backend"], sent


async def test_a_session_in_the_middle_of_copy_out_continues_at_the_next_row(
    autojump_clock, monkeypatch
):
    backend, sent = await move(mid_copy(), 0, monkeypatch)
    assert sent == [COPY]  # the client's own request, replayed
    # the row the client has is compared and swallowed; it gets the rest, from its next message on
    assert backend.leftover == b"".join(REPLY[2:])


async def test_a_copy_out_whose_marker_committed_is_not_completed_with_a_bare_ready(
    autojump_clock, monkeypatch
):
    """Its rows after the first died with the old server: ending it with ReadyForQuery (what
    an autocommit write that committed gets) would cut the client's data short."""
    with pytest.raises(NotMovable, match="COPY TO STDOUT committed") as e:
        await move(mid_copy(), 1, monkeypatch)
    assert e.value.kind == "reply unknown" and e.value.sqlstate == "08006"
