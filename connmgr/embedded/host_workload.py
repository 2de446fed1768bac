"""The host-kill campaign's reading, COPY and LISTEN clients (issue 14: "COPY in and out,
long reads, a LISTEN session"; "a client in the middle of a COPY or a large result
continues where it was"; "the bytes a few clients received compared with what a direct
run returns for the same requests").

:func:`start` runs them beside the bank workload of :mod:`connmgr.embedded.host_campaign`
(threads in the client namespace, sharing its ``_Clients`` bookkeeping: errors by
SQLSTATE, stalls, ports for the reset check) and :func:`finish` collects a
:class:`WorkloadResult`:

* ``readers``: psycopg clients running a query of a few thousand 200-byte rows again and
  again, each result compared row for row with what it must be;
* ``raw``: clients speaking the protocol themselves (logged in by psycopg, then the
  socket is theirs) sending one fixed round of requests again and again -- a large
  simple-query result, an extended-protocol query with a parameter, an error, a
  ``COPY ... TO STDOUT``, a two-statement query -- and comparing every round's reply
  bytes with the reply host B's database gives directly to the same round (from the
  client namespace, before the workload). Nothing is masked: every request reads only
  ``generate_series`` (no table, so no table OID in a RowDescription), the two databases
  run the same binaries (same ErrorResponse file/line/routine), nothing in the round
  makes a ParameterStatus, a NotificationResponse (whose pid connmgr rewrites) or
  BackendKeyData (start-up only). A round the kill cut is noted with how many of its
  bytes had been read before the kill;
* ``copy_out``: ``COPY (...) TO STDOUT`` of a few thousand rows, checked byte for byte;
* ``copy_in``: in a transaction, ``COPY ledger (note) FROM STDIN`` of rows named after
  the operation, sent in pieces with pauses (so the kill finds the session in COPY IN),
  then COMMIT: acknowledged rows must all be on host B, and no operation may be there in
  part (checked by :func:`check_copies`; duplicates by the campaign's ledger check);
* one listener: LISTEN before the kill (a notification through the VIP checked then);
  right at the kill a notifier connects to the VIP (retrying until host B serves) and
  sends NOTIFY: the listener must receive it.

A client whose operation fails with an error records it (by SQLSTATE, in the campaign's
errors too) and reconnects; a wrong result, a reply that never came and a missed
notification make the trial fail (``WorkloadResult.ok``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg

from connmgr.embedded import netlab
from connmgr.embedded.host_lab import DB, PASSWORD, PORT
from shadow import messages as m

__all__ = ["WorkloadResult", "Workload", "start", "round_requests", "read_round"]

#: rows of the readers' query, and of the COPY out; rows per COPY in operation
READ_ROWS = 4000
COPY_OUT_ROWS = 4000
COPY_IN_ROWS = 60
#: how long a client waits for a reply (the takeover answers within a few seconds)
REPLY_TIMEOUT = 20.0
CHANNEL = "campaign"

_READ_SQL = f"SELECT g, repeat('x', 200) FROM generate_series(1, {READ_ROWS}) g"
_READ_ROWS = [(g, "x" * 200) for g in range(1, READ_ROWS + 1)]
_COPY_OUT_SQL = (
    f"COPY (SELECT g, repeat('y', 100) FROM generate_series(1, {COPY_OUT_ROWS}) g) TO STDOUT"
)
_COPY_OUT_DATA = b"".join(b"%d\t%s\n" % (g, b"y" * 100) for g in range(1, COPY_OUT_ROWS + 1))


@dataclass
class WorkloadResult:
    #: operations complete and correct, by client kind (reader, raw, copy out, copy in)
    done: Counter = field(default_factory=Counter)
    #: errors by (client kind, SQLSTATE)
    errors: Counter = field(default_factory=Counter)
    #: wrong results (the trial fails on any)
    wrong: list[str] = field(default_factory=list)
    #: operations in flight at the kill that completed after it, by client kind
    spanned: Counter = field(default_factory=Counter)
    #: raw rounds cut by the kill: (bytes read before the kill, bytes of the round)
    cut: list[tuple[int, int]] = field(default_factory=list)
    #: COPY in: acknowledged operations missing rows, and unacknowledged ones present in part
    copy_lost: list[str] = field(default_factory=list)
    copy_partial: list[str] = field(default_factory=list)
    #: what each COPY in client was doing at the kill ("copy": in COPY IN, "commit", "other")
    copy_in_at_kill: Counter = field(default_factory=Counter)
    #: the LISTEN session: None if there was none, else whether both notifications came
    listen: bool | None = None
    listen_detail: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.wrong
            and not self.copy_lost
            and not self.copy_partial
            and self.listen is not False
        )


class Workload:
    """The clients' shared state; ``c`` is the campaign's ``_Clients``."""

    def __init__(self, lab, c) -> None:
        self.lab = lab
        self.c = c
        self.result = WorkloadResult()
        self.threads: list[threading.Thread] = []
        self.reference: bytes | None = None
        #: COPY in: operation -> acknowledged
        self.copies: dict[str, bool] = {}
        #: COPY in client -> what it is doing
        self.stage: dict[int, str] = {}
        self.listener: psycopg.Connection | None = None
        self.notified = threading.Event()

    # ------------------------------------------------------------------ bookkeeping

    def _wrong(self, text: str) -> None:
        with self.c.lock:
            self.result.wrong.append(text)

    def _done(self, kind: str, sent: float) -> None:
        k = self.c.killed_at
        with self.c.lock:
            self.result.done[kind] += 1
            if k is not None and sent < k:
                self.result.spanned[kind] += 1

    def _error(self, kind: str, who: str, e: Exception, port: int | None) -> None:
        """In the campaign's errors too (as its ``_Clients.error`` records them)."""
        state = getattr(e, "sqlstate", None) or type(e).__name__
        c = self.c
        with c.lock:
            c.errors[state] += 1
            c.messages.append(f"{who}: {state} {str(e).splitlines()[0][:160]}")
            if port is not None:
                c.ports_with_errors.add(port)
            self.result.errors[(kind, state)] += 1

    def _loop(self, kind: str, who: str, autocommit: bool, step) -> None:
        """``step(conn, n)`` runs operation ``n``; an error drops the connection, a new
        one goes on."""
        c = self.c
        conn = port = None
        n = 0
        while not c.stop.is_set():
            n += 1
            try:
                if conn is None:
                    conn = self.lab.connect(autocommit=autocommit)
                    port = _port(conn)
                    with c.lock:
                        c.ports.add(port)
                sent = time.monotonic()
                if step(conn, n):
                    c.answered(who, sent)
                    self._done(kind, sent)
            except psycopg.Error as e:
                self._error(kind, f"{who} ({n})", e, port)
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ clients

    def reader(self, i: int) -> None:
        def read(conn: psycopg.Connection, n: int) -> bool:
            rows = conn.execute(_READ_SQL).fetchall()
            if rows != _READ_ROWS:
                bad = next(
                    (j for j, (a, b) in enumerate(zip(rows, _READ_ROWS, strict=False)) if a != b),
                    None,
                )
                self._wrong(
                    f"reader {i} ({n}): {len(rows)} rows of {READ_ROWS}, first wrong row {bad}"
                )
                return False
            return True

        self._loop("reader", f"reader {i}", True, read)

    def copy_out(self, i: int) -> None:
        def copy(conn: psycopg.Connection, n: int) -> bool:
            with conn.cursor() as cur, cur.copy(_COPY_OUT_SQL) as cp:
                data = b"".join(bytes(b) for b in cp)
            if data != _COPY_OUT_DATA:
                at = next((j for j, (a, b) in enumerate(zip(data, _COPY_OUT_DATA, strict=False)) if a != b),
                          min(len(data), len(_COPY_OUT_DATA)))  # fmt: skip
                self._wrong(
                    f"copy out {i} ({n}): {len(data)} bytes of {len(_COPY_OUT_DATA)}, first difference at {at}"
                )
                return False
            return True

        self._loop("copy out", f"copy out {i}", True, copy)

    def copy_in(self, i: int) -> None:
        def copy(conn: psycopg.Connection, n: int) -> bool:
            op = f"ci{i}-{n}"
            with self.c.lock:
                self.copies[op] = False
            self.stage[i] = "copy"
            with conn.cursor() as cur, cur.copy("COPY ledger (note) FROM STDIN") as cp:
                for j in range(COPY_IN_ROWS):
                    cp.write_row((f"{op}-{j}",))
                    if j % 20 == 19:
                        time.sleep(0.01)
            self.stage[i] = "commit"
            conn.commit()
            self.stage[i] = "other"
            with self.c.lock:
                self.copies[op] = True
            return True

        self._loop("copy in", f"copy in {i}", False, copy)

    def raw(self, i: int) -> None:
        c = self.c
        requests, readies = round_requests()
        who = f"raw {i}"
        conn = sock = port = None
        n = 0
        while not c.stop.is_set():
            n += 1
            try:
                if conn is None:
                    conn = self.lab.connect(autocommit=True)
                    port = _port(conn)
                    with c.lock:
                        c.ports.add(port)
                    sock = _raw_socket(conn)
                sent = time.monotonic()
                got, before = read_round(sock, requests, readies, lambda: c.killed_at)
            except (psycopg.Error, _RoundError) as e:
                if isinstance(e, _RoundError) and e.sqlstate is None:
                    self._wrong(f"{who} ({n}): {e}")
                else:
                    self._error("raw", f"{who} ({n})", e, port)
                if sock is not None:
                    sock.close()
                if conn is not None:
                    conn.close()
                conn = sock = None
                time.sleep(0.05)
                continue
            c.answered(who, sent)
            if got != self.reference:
                self._wrong(f"{who} ({n}): " + _difference(got, self.reference))
                continue
            self._done("raw", sent)
            if before is not None and c.killed_at is not None and sent < c.killed_at:
                with c.lock:
                    self.result.cut.append((before, len(got)))
        if sock is not None:
            sock.close()
        if conn is not None:
            conn.close()

    def listen(self) -> None:
        """LISTEN now, and check a notification through the VIP arrives."""
        self.listener = conn = self.lab.connect(autocommit=True)
        self.c.ports.add(_port(conn))
        conn.execute(f"LISTEN {CHANNEL}")
        with self.lab.connect(autocommit=True) as other:
            other.execute(f"NOTIFY {CHANNEL}, 'before'")
        got = [n.payload for n in conn.notifies(timeout=5, stop_after=1)]
        if got != ["before"]:
            self.result.listen = False
            self.result.listen_detail = f"before the kill: got {got}, not ['before']"

    def notify_after_kill(self) -> None:
        """At the kill: NOTIFY through the VIP as soon as a connection is served."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with self.lab.connect(autocommit=True) as other:
                    other.execute(f"NOTIFY {CHANNEL}, 'after'")
                return
            except psycopg.Error:
                time.sleep(0.1)
        self.result.listen = False
        self.result.listen_detail = (
            f"the NOTIFY after the kill was not served within {REPLY_TIMEOUT:g}s"
        )


class _RoundError(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def round_requests() -> tuple[bytes, int]:
    """The raw clients' round: the request bytes and the ReadyForQuery count they get."""
    parts = [
        m.query(f"SELECT g, repeat('x', 200) FROM generate_series(1, {READ_ROWS}) g"),
        m.Parse("", "SELECT $1::int + g, md5(g::text) FROM generate_series(1, 200) g").encode()
        + m.Bind("", "", (), (b"5",)).encode() + m.Describe("P", "").encode() + m.Execute("").encode() + m.sync(),
        m.query("SELECT 1/0"),
        m.query("COPY (SELECT g, md5(g::text) FROM generate_series(1, 2000) g) TO STDOUT"),
        m.query("SELECT 1; SELECT 'two', NULL"),
    ]  # fmt: skip
    return b"".join(parts), len(parts)


def read_round(
    sock: socket.socket, requests: bytes, readies: int, killed_at=lambda: None
) -> tuple[bytes, int | None]:
    """Send ``requests`` on ``sock`` and read up to the ``readies``-th ReadyForQuery;
    returns the reply bytes and, if the kill (``killed_at()``, monotonic) came while they
    were read, how many had been read before it. Raises _RoundError on EOF (with the
    SQLSTATE of a FATAL error before it, if any) or when a reply does not come within
    REPLY_TIMEOUT."""
    sock.sendall(requests)
    buf = bytearray()
    pos = 0
    before = None
    fatal = None
    while readies:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            raise _RoundError(f"no reply for {REPLY_TIMEOUT:g}s ({len(buf)} bytes read)") from None
        except OSError as e:
            raise _RoundError(f"{e} after {len(buf)} bytes", fatal or "reset") from None
        k = killed_at()
        if before is None and k is not None and time.monotonic() > k and buf:
            before = len(buf)
        if not chunk:
            raise _RoundError(f"EOF after {len(buf)} bytes" + (f" (FATAL {fatal})" if fatal else ""),
                              fatal or "EOF")  # fmt: skip
        buf += chunk
        while len(buf) - pos >= 5:
            end = pos + 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if end > len(buf):
                break
            if buf[pos] == ord("Z"):
                readies -= 1
            elif buf[pos] == ord("E") and b"SFATAL\0" in buf[pos:end]:
                body = bytes(buf[pos + 5 : end])
                code = body.find(b"\0C")
                fatal = (
                    body[code + 2 : body.find(b"\0", code + 2)].decode() if code >= 0 else "?????"
                )
            pos = end
    return bytes(buf), before


def _difference(got: bytes, want: bytes | None) -> str:
    if want is None:
        return "no reference"
    at = next(
        (j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )
    return (
        f"{len(got)} reply bytes, the direct run {len(want)}; first difference at byte {at}:"
        f" {got[max(0, at - 16) : at + 16]!r} vs {want[max(0, at - 16) : at + 16]!r}"
    )


def _port(conn: psycopg.Connection) -> int | None:
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as s:
            return s.getsockname()[1]
    except OSError:
        return None


def _raw_socket(conn: psycopg.Connection) -> socket.socket:
    """The socket of the idle, logged-in ``conn``, for the caller to speak the protocol on
    (psycopg is not used again on it, but closes it)."""
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    sock.settimeout(REPLY_TIMEOUT)
    return sock


def direct_round(lab) -> bytes:
    """The raw round's replies from host B's database directly (from the client namespace)."""
    requests, readies = round_requests()
    with netlab.in_netns(lab.net.ns["client"]):
        conn = psycopg.connect(host=netlab.ADDRESSES["hostb"], port=PORT, dbname=DB, user="postgres",
                               password=PASSWORD, sslmode="disable", autocommit=True, connect_timeout=10)  # fmt: skip
    try:
        sock = _raw_socket(conn)
        try:
            return read_round(sock, requests, readies)[0]
        finally:
            sock.close()
    finally:
        conn.close()


def start(lab, c, *, readers: int = 1, raw: int = 2, copy_out: int = 1, copy_in: int = 1,
          listen: bool = True) -> Workload:  # fmt: skip
    """Start the clients (before the kill); :meth:`Workload.at_kill` right after it."""
    w = Workload(lab, c)
    if raw:
        w.reference = direct_round(lab)
    if listen:
        w.listen()
    for kind, count, target in (("reader", readers, w.reader), ("raw", raw, w.raw), ("copy out", copy_out, w.copy_out),
                                ("copy in", copy_in, w.copy_in)):  # fmt: skip
        for i in range(count):
            w.threads.append(
                threading.Thread(target=target, args=(i,), daemon=True, name=f"{kind} {i}")
            )
    for t in w.threads:
        t.start()
    return w


def at_kill(w: Workload) -> None:
    """Right after the kill: the notifier; what the COPY in clients were doing."""
    w.result.copy_in_at_kill.update(w.stage.values())
    if w.listener is not None and w.result.listen is None:
        t = threading.Thread(target=w.notify_after_kill, daemon=True, name="notifier")
        t.start()
        w.threads.append(t)


def join(w: Workload) -> None:
    """After the clients were told to stop (the campaign's ``stop`` event): wait for them."""
    for t in w.threads:
        t.join(30)
    for t in w.threads:
        if t.is_alive():
            w.result.wrong.append(f"{t.name}: still waiting 30 s after the workload stopped")


def finish(w: Workload, notes: Counter) -> WorkloadResult:
    """After :func:`join`: the listener's notification, the direct run again, and the COPY
    in operations against ``notes`` (the ledger notes on host B) -> the result."""
    r = w.result
    if w.listener is not None:
        if r.listen is None:
            try:
                got = [
                    (n.channel, n.payload)
                    for n in w.listener.notifies(timeout=REPLY_TIMEOUT, stop_after=1)
                ]
                r.listen = got == [(CHANNEL, "after")]
                r.listen_detail = (
                    "" if r.listen else f"after the kill: got {got}, not [({CHANNEL!r}, 'after')]"
                )
            except psycopg.Error as e:
                r.listen = False
                r.listen_detail = f"after the kill: {e.sqlstate} {str(e).splitlines()[0][:160]}"
        w.listener.close()
    if w.reference is not None:
        again = direct_round(w.lab)
        if again != w.reference:
            r.wrong.append(
                "the direct run after the trial differs from the one before: "
                + _difference(again, w.reference)
            )
    r.copy_lost, r.copy_partial = check_copies(w.copies, notes)
    return r


def check_copies(copies: dict[str, bool], notes: Counter) -> tuple[list[str], list[str]]:
    """COPY in operations (name -> acknowledged) against the ledger's notes: the
    acknowledged ones missing a row, and any present in part."""
    lost, partial = [], []
    for op, acked in copies.items():
        present = sum(1 for j in range(COPY_IN_ROWS) if notes.get(f"{op}-{j}"))
        if acked and present != COPY_IN_ROWS:
            lost.append(f"{op}: {present} of {COPY_IN_ROWS} rows")
        elif 0 < present < COPY_IN_ROWS:
            partial.append(f"{op}: {present} of {COPY_IN_ROWS} rows")
    return lost, partial
