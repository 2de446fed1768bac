"""Moving one live session to the secondary database (seed 004 [0052]-[0057], [0082]-[0089]).

Called by the client's own task when its backend is lost and failover is configured
(:class:`~connmgr.errors.BackendLost`). The client's socket never closes; it waits while
this runs, bounded by ``[failover] max_wait``.

1. **Deliver** what connmgr had already processed for the client but not yet sent.
2. **Decide** (:meth:`connmgr.failover.controller.Failover.decide`, shared by every session): is the
   primary gone? If not, the session ends with the server's own error, as without a pair.
   Replies the primary sent after the first sign of its death were held, unprocessed
   (``relay.frozen``, see :meth:`Failover.freeze`). If the session's transaction
   committed on the secondary they belong to it and are delivered now; otherwise they
   are dropped, and the replay produces them again from the secondary.
3. **Open** a backend on the secondary with the client's start-up parameters and
   credentials, and **restore** the session: protocol-level prepared statements (the exact
   Parse messages the client sent) and the SQL-level state the
   :class:`~replay.session_recorder.SessionRecorder` followed (SET/RESET, PREPARE, LISTEN,
   advisory locks). What cannot move ends the session with a clear error (57P01 class
   08006), counted by reason.
4. **Interrupted commit** (seed 004 [0055]): the open transaction is number n = the
   transactions the client has seen end + 1. If the secondary's marker row for this session
   says ``seq >= n``, it committed: the client gets the replies it was waiting for
   (:func:`replay.resume.commit_completion`) and it is not replayed. Otherwise it did not
   commit there, and it is replayed. Never both, never neither.
5. **Replay** (seed 004 [0088]): the journal's requests go to the new backend; every reply
   is compared with what the client already received (:class:`replay.resume.ReplayMatcher`)
   and swallowed; the first reply beyond that is live and goes to the client (seed 004
   [0089]). A difference, a transaction too large to have been kept, or a replay that
   does not finish within ``max_wait`` rolls the transaction back: the client gets
   SQLSTATE 40001 on the request it is waiting for (or its next one), and the session
   continues on the new server.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import trio

from connmgr.errors import BackendLost, BackendUnavailable, ClientError
from connmgr.failover.controller import Failover
from connmgr.pg.backend import BackendSession, Credentials, open_backend
from connmgr.pg.wire import MessageReader, PeerClosed
from connmgr.proxy.relay import Relay
from replay.journal import Journal
from replay.resume import (
    ReplayMatcher,
    commit_completion,
    failed_replies,
    move_error_body,
    split_messages,
    sync_groups,
)
from replay.session_recorder import SessionRecorder
from shadow import messages
from shadow.framing import Framer
from shadow.session import Phase, SessionState, TxStatus

log = logging.getLogger("connmgr.move")

_Z = ord("Z")
_READY_IDLE = b"Z\0\0\0\x05I"
_SYNC_POINTS = frozenset(b"QSF")
_COPY_END = frozenset(b"cf")
_Q, _G = ord("Q"), ord("G")
#: a session moves between requests, while the server waits for its COPY data, or while it
#: receives a COPY's data (the COPY is replayed and its rows compared, as a query's are)
_MOVABLE_PHASES = frozenset({Phase.READY, Phase.COPY_IN, Phase.COPY_OUT})
_E = ord("E")
#: puts a fresh backend into a failed transaction block, like the client's
_ABORTED_BLOCK = messages.query(
    "BEGIN; DO $connmgr$ BEGIN RAISE EXCEPTION 'connmgr: transaction rolled back at failover'"
    " USING ERRCODE = '40001'; END $connmgr$"
)


class ClientConnection(Protocol):
    """What a move uses of the client (:class:`connmgr.proxy.client.ClientConnection`)."""

    id: int
    database: str
    stream: trio.abc.Stream
    session: SessionState
    journal: Journal
    recorder: SessionRecorder
    #: the startup parameters the backend gets, in order (repeats included)
    startup_pairs: tuple[tuple[str, str], ...]
    creds: Credentials
    #: the largest message a backend may send this session
    max_message_size: int


class NotMovable(ClientError):
    """The session cannot continue on the secondary; ``kind`` names the reason class
    (the metric's label)."""

    sqlstate = "08006"

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message, hint="Reconnect: new sessions go to the secondary.")
        self.kind = kind


class _Rollback(Exception):
    """Internal: the open transaction cannot move faithfully; the client gets SQLSTATE
    40001 (serialization_failure: retry) on its next answer."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


async def move_session(conn: ClientConnection, relay: Relay, lost: BackendLost, failover: Failover) -> BackendSession:
    """Move ``conn`` to the secondary; returns the new backend, whose ``leftover`` holds
    the replies the client gets next. Raises the ClientError to report if it cannot."""
    failover.moving += 1
    try:
        return await _move_session(conn, relay, lost, failover)
    finally:
        failover.moving -= 1


async def _move_session(conn: ClientConnection, relay: Relay, lost: BackendLost, failover: Failover) -> BackendSession:
    cfg = failover.config
    started = time.monotonic()
    if relay.unsent:
        await conn.stream.send_all(relay.unsent)
        relay.unsent = b""
    with trio.move_on_after(cfg.max_wait) as waited:
        moving = await failover.decide(f"client {conn.id}: {lost.message}")
    if waited.cancelled_caught or not moving:
        if waited.cancelled_caught:
            failover.sessions_failed["max_wait"] += 1
        raise lost
    committer = failover.is_committer(conn.id)
    if relay.frozen:
        await _settle_frozen(conn, relay, failover)
    try:
        if committer:
            await failover.committer_turn(conn.id)
        else:
            await failover.commits_settled()
        with trio.fail_after(cfg.max_wait):
            backend = await _move(conn, relay, failover, committer)
    except trio.TooSlowError:
        failover.sessions_failed["max_wait"] += 1
        raise NotMovable(f"the session could not be moved to the secondary within {cfg.max_wait:g}s"
                         " ([failover] max_wait)", "max_wait") from None  # fmt: skip
    except NotMovable as e:
        failover.sessions_failed[e.kind] += 1
        raise
    except (BackendUnavailable, PeerClosed, OSError, trio.BrokenResourceError) as e:
        failover.sessions_failed["secondary unavailable"] += 1
        raise NotMovable(f"the session could not be moved to the secondary: {e}", "secondary unavailable") from None
    finally:
        if committer:
            failover.commit_settled(conn.id)
        else:
            failover.prefix_replayed(conn.id)
    # the client goes on only when every session is back where its client saw it
    await failover.replays_done()
    failover.sessions_moved += 1
    failover.stalls.append(time.monotonic() - started)
    return backend


async def _settle_frozen(conn: ClientConnection, relay: Relay, failover: Failover) -> None:
    """Deliver or drop the replies held since the primary became suspect."""
    data, relay.frozen = bytes(relay.frozen), bytearray()
    n = relay.transactions + 1
    if not (conn.session.pending and relay.markers and relay.injector.marker_seq == n
            and await failover.committed_seq(conn.database, conn.id) >= n):  # fmt: skip
        failover.replies_dropped += 1
        return
    buf, frames = relay.backend.framer.feed(data)
    # the relay has ended and told the secondary connmgr the session closed: mirroring
    # these now would open it there again, mid-transaction ("ReadyForQuery with no request")
    relay.downstream.mirror = None
    out = relay.downstream.process(buf, frames) if frames else b""
    relay.hold_version = 0  # the mirror is not waited for any more
    relay.lost = None
    if out:
        await conn.stream.send_all(out)


def _commit_barrier(failover, conn_id: int):
    async def between() -> None:
        failover.commit_settled(conn_id)  # the next commit in flight may go
        await failover.replays_done()

    return between


def _prefix_barrier(failover, conn_id: int):
    async def between() -> None:
        await failover.prefixes_replayed(conn_id)

    return between


async def _move(conn: ClientConnection, relay: Relay, failover: Failover, committer: bool) -> BackendSession:
    journal = conn.journal
    shadow = conn.session
    if shadow.phase not in _MOVABLE_PHASES:
        raise NotMovable(f"session not movable: it is in phase {shadow.phase.value}", "phase")
    if not relay.tracking:  # its shadow no longer knows what is in flight: nothing to replay from
        raise NotMovable("session not movable: connmgr lost track of its protocol state earlier"
                         " (logged then), so it cannot tell what to replay", "untracked")  # fmt: skip
    reasons = conn.recorder.not_movable if conn.recorder is not None else []
    if shadow.statements_not_kept:
        reasons = [*reasons, "prepared statements over [server] max_buffered_message, not kept: "
                   + ", ".join(shadow.statements_not_kept)]  # fmt: skip
    if reasons:
        raise NotMovable("session not movable: " + "; ".join(reasons), "session state")
    if relay.client_framer.streaming or relay.backend.framer.streaming:
        which = "the client was sending" if relay.client_framer.streaming else "the client was receiving"
        raise NotMovable(f"session not movable: {which} a message over [server] max_buffered_message, which"
                         " connmgr relays without keeping", "too large")  # fmt: skip
    groups = sync_groups(shadow.pending)
    n = relay.transactions + 1
    committed = False
    if groups and relay.markers and relay.injector.unmarked:
        raise NotMovable("session not movable: a request that may have committed was in flight and carried no"
                         " connmgr marker (a multi-statement write, a function call, or a statement over"
                         " [server] max_buffered_message), so whether it committed cannot be known",
                         "unmarked commit")  # fmt: skip
    if groups:
        if relay.markers:
            committed = await failover.committed_seq(conn.database, conn.id) >= n
        else:  # whatever is in flight may hold a commit nobody can judge
            raise NotMovable("session not movable: a commit was in flight and the database has no connmgr"
                             " markers to tell whether it committed (run connmgr prepare-db)", "no markers")  # fmt: skip
    if committed and shadow.phase is Phase.COPY_OUT:
        # (a COPY TO in autocommit carries a marker, run after its last row: it committed,
        # and the rest of its rows died with the old server)
        raise NotMovable("session not movable: its COPY TO STDOUT committed but the client had not received all"
                         " of its data, which is not known here", "reply unknown")  # fmt: skip
    if committed and journal.overflow and len(groups) > 1:  # what follows the commit was not kept
        raise NotMovable("session not movable: requests pipelined behind a committed transaction too large"
                         " to keep", "too large")  # fmt: skip
    requests = bytes(journal.requests)
    expected = bytes(journal.replies)
    # the statements a replay parses again are not restored first (it would find them)
    if committed:  # its own Parse messages made statements the client now has
        backend = await _open(conn, failover, requests[journal.sync_ends[0]:], requests[:journal.sync_ends[0]])
    else:
        backend = await _open(conn, failover, requests)
    leftover = b""
    try:
        if journal.overflow and not committed:
            raise _Rollback("too large", f"the transaction was larger than [failover] max_replay_bytes"
                                         f" ({failover.config.max_replay_bytes} bytes)")  # fmt: skip
        if committed and relay.injector.stash:  # an autocommit write's results, held until its commit
            done = bytes(relay.injector.stash) + _READY_IDLE
            relay.carry_inject = relay.injector.mode
        elif committed:
            done = commit_completion(groups[0], expected, shadow.request_sql)
        if committed:
            if done is None:
                raise NotMovable("session not movable: its transaction committed but connmgr cannot know the"
                                 " reply it was waiting for", "reply unknown")  # fmt: skip
            failover.commits_acknowledged += 1
            failover.note(f"client {conn.id}: transaction {n} had committed: acknowledged, not replayed")
            leftover = done
            requests = requests[journal.sync_ends[0]:]
            expected = b""
        if requests:
            # what the primary answered goes first (a commit in flight right after it, once
            # that matched); requests beyond wait until every session is there
            commit = b""
            if committed:
                prefix, rest, between = b"", requests, _commit_barrier(failover, conn.id)
            elif committer:
                # what the client saw first, compared; its commit only then: a difference
                # must roll back a transaction that never committed anywhere
                cut = journal.sync_ends[0] if journal.sync_ends else len(requests)
                answered = min(journal.answered, cut)
                prefix, commit, rest = requests[:answered], requests[answered:cut], requests[cut:]
                between = _commit_barrier(failover, conn.id)
            else:
                cut = journal.answered
                prefix, rest = requests[:cut], requests[cut:]
                between = _prefix_barrier(failover, conn.id)
            leftover += await _replay(backend, prefix, rest, expected, failover, between, commit,
                                      getattr(conn, "guard", None))
            failover.transactions_replayed += 1
    except _Rollback as rb:
        backend.close()
        failover.transactions_rolled_back[rb.kind] += 1
        failover.note(f"client {conn.id}: transaction rolled back (40001): {rb.reason}")
        # nothing of the transaction is replayed, but what was pipelined behind it is sent
        backend = await _open(conn, failover, _pipelined_behind(journal))
        try:
            leftover = await _rolled_back(conn, relay, backend, rb.reason, journal, groups)
        except BaseException:  # not movable after all, or cut short: the new session goes
            backend.close()
            raise
    except BaseException:
        backend.close()
        raise
    # complete messages first, then any partial one the framer held: the relay frames them again
    backend.leftover = leftover + backend.leftover + backend.framer.take_pending()
    return backend


async def _open(conn: ClientConnection, failover: Failover, replayed: bytes = b"",
                settled: bytes = b"") -> BackendSession:  # fmt: skip
    """A backend on the secondary, restored; ``replayed``: the requests that will be sent
    on it again (the statements they parse are left to them); ``settled``: requests of a
    transaction that committed, not sent again (the statements they parse are made)."""
    backend = await open_backend(failover.server, conn.startup_pairs, conn.creds,
                                 max_message_size=conn.max_message_size)  # fmt: skip
    await _restore(conn, backend, replayed, settled)
    return backend


async def _restore(conn: ClientConnection, backend: BackendSession, replayed: bytes, settled: bytes = b"") -> None:
    """Rebuild the session's state on ``backend`` before anything is replayed."""
    out = bytearray()
    readies = 0
    # statements the open transaction parsed itself come back with its replay
    # (not every statement the journal parsed: a Parse in a transaction that committed, or
    # that is rolled back, is not sent again, and its statement outlives the transaction)
    again = _parses(replayed)
    # parsed in a committed transaction, their ParseComplete perhaps never seen
    bodies = {**_parses(settled), **conn.session.parse_messages}
    parses = [body for name, body in bodies.items() if name not in again]
    if parses:
        for body in parses:
            out += b"P" + (len(body) + 4).to_bytes(4, "big") + body
        out += messages.Sync().encode()
        readies += 1
    if conn.recorder is not None:
        for sql in conn.recorder.restore_sql():
            out += messages.query(sql)
            readies += 1
    if not readies:
        return
    error = await _run_swallowed(backend, bytes(out), readies)
    if error is not None:
        raise NotMovable(f"session state could not be restored: {error.message}", "restore failed")


def _pipelined_behind(journal: Journal) -> bytes:
    """What :func:`_rolled_back` sends on: the requests behind the transaction's first
    sync group (nothing if the journal overflowed)."""
    if journal.overflow or not journal.sync_ends:
        return b""
    return bytes(journal.requests[journal.sync_ends[0]:])


def _parses(requests: bytes | bytearray) -> dict[str, bytes]:
    """The named statements the Parse messages in ``requests`` create: name -> body."""
    out = {}
    for tag, body in split_messages(requests):
        if tag == 80:  # 'P'
            end = body.find(0)
            if end > 0:
                out[body[:end].decode("utf-8", "replace")] = bytes(body)
    return out


async def _replay(backend: BackendSession, prefix: bytes, rest: bytes, expected: bytes, failover,
                  between=None, commit: bytes = b"", guard=None) -> bytes:  # fmt: skip
    """Replay ``prefix`` (requests whose replies the client has in full), then ``commit``
    (a commit in flight: sent only once the prefix matched), then -- after ``await
    between()``, if given -- ``rest`` (requests still in flight); swallow the replies
    that match ``expected``; return what follows them (live). Raises _Rollback on a
    difference. With a ``guard`` that masks columns (shadow/policy/), the client received
    its rows masked: the replay's are masked the same way before they are compared (the
    live ones are returned as the server sent them; the session's own guard masks them)."""
    matcher = ReplayMatcher(expected)
    masks = guard.replica() if guard is not None and guard.results is not None else None
    framer = backend.framer
    data = backend.leftover
    backend.leftover = b""
    stages = [(prefix, *_sync_points(prefix)), (commit, *_sync_points(commit)), (rest, None, False)]
    live = bytearray()  # replies beyond the matched ones: the client's
    for i, (requests, readies, open_copy) in enumerate(stages):
        if i == 2 and between is not None:
            await between()
        if not requests:
            continue
        if i == 1 and not matcher.matched:
            raise _Rollback("result differs", "replaying it on the secondary gave fewer replies than the client"
                                              " received")  # fmt: skip
        if masks is not None:
            masks.filter(*Framer(frontend=True).feed(requests))
        await backend.stream.send_all(requests)
        while not matcher.matched if readies is None else readies > 0:
            if not data:
                data = await backend.stream.receive_some(64 * 1024)
                if not data:
                    raise BackendUnavailable("the secondary closed the connection during the replay")
            buf, frames = framer.feed(data)
            data = b""
            if not frames:
                continue
            if readies is not None:
                for tag, _s, _e in frames:
                    if tag == _Z:
                        readies -= 1
                    elif tag == _G and open_copy and readies == 1:
                        readies = 0  # the COPY waits for the client's data: the stage is over
            if masks is None:
                live += matcher.feed(buf)
            else:  # compared masked; what is live goes on as sent (the same messages, unmasked)
                seen, seen_frames, _changed = masks.results.filter(buf, frames)
                after = matcher.feed(seen)
                if after:
                    count = len(split_messages(after))
                    live += bytes(buf[frames[len(frames) - count][1] - 5:])
            if matcher.difference is not None:
                failover.replies_compared += matcher.compared
                raise _Rollback("result differs",
                                f"replaying it on the secondary gave a different result: {matcher.difference}")
            if matcher.matched and readies is None:
                break
    if not matcher.matched:
        raise _Rollback("result differs", "replaying it on the secondary gave fewer replies than the client received")
    failover.replies_compared += matcher.compared
    return bytes(live)


def _sync_points(requests: bytes) -> tuple[int, bool]:
    """The ReadyForQuery count ``requests`` get, and whether they end with a Query whose
    COPY FROM STDIN data is not in them (the stage ends at its CopyInResponse)."""
    readies = 0
    open_copy = False
    for tag, _b in split_messages(requests):
        if tag in _SYNC_POINTS:
            readies += 1
            open_copy = tag == _Q
        elif tag in _COPY_END:
            open_copy = False
    return readies, open_copy


async def _rolled_back(conn: ClientConnection, relay: Relay, backend: BackendSession, reason: str, journal,
                       groups) -> bytes:  # fmt: skip
    """Give the client 40001 for its transaction on a fresh ``backend``; returns the
    replies it gets next. The backend is brought to the state the client will believe
    in: a failed transaction block if it was in one, idle otherwise."""
    in_block = conn.session.tx_status is not TxStatus.IDLE
    if journal.overflow and len(groups) > 1:
        raise NotMovable("session not movable: requests pipelined behind a transaction too large to keep",
                         "too large")  # fmt: skip
    if in_block:
        await _run_swallowed(backend, _ABORTED_BLOCK)
    if not groups:  # idle in its block: the next request gets the error
        relay.pending_abort = move_error_body(reason)
        return b""
    replies = failed_replies(reason, b"E" if in_block else b"I")
    rest = _pipelined_behind(journal)
    if rest:
        await backend.stream.send_all(rest)
    return replies


async def _run_swallowed(backend: BackendSession, request: bytes, readies: int = 1):
    """Send ``request`` on the idle ``backend`` and read its replies up to the
    ``readies``-th ReadyForQuery; returns the first ErrorResponse (decoded) or None."""
    await backend.stream.send_all(request)
    reader = MessageReader(backend.stream, backend.framer, 'server "secondary"')
    error = None
    while readies:
        tag, body = await reader.read()
        if tag == _E and error is None:
            error = messages.decode_backend(tag, body)
        elif tag == _Z:
            readies -= 1
    backend.leftover = reader.take_buffered()
    return error
