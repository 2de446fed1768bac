"""Host-kill trials in the lab (issue 14, the proof): a bank workload, host A killed at a
random moment, the invariants checked on host B's database.

One trial (:func:`run_trial`) builds a fresh :class:`~connmgr.embedded.host_lab.HostLab`
and runs from the client namespace:

* ``transfers`` clients moving money between accounts in explicit transactions (two
  UPDATEs and a ledger row, COMMIT), each acknowledged transfer recorded;
* ``writers`` autocommit clients inserting ledger rows (psycopg prepares the statement
  after five uses, so both the extended protocol and prepared statements are exercised);
* ``idle`` sessions carrying a setting and a prepared statement, used after the kill;
* long reads, raw-protocol clients whose reply bytes are compared with a direct run's,
  COPY out, COPY in and a LISTEN session (connmgr/embedded/host_workload.py).

After a random delay host A dies (router port down + SIGKILL of everything in it); the
workload goes on for ``after`` seconds. Then, on host B's database: money conserved,
every acknowledged transfer and insert present exactly once, client errors by SQLSTATE,
and, from the frames the client namespace received, any reset the VIP sent to a
connection whose client got no error. A client that got an error reconnects and
goes on (its unacknowledged transfer may or may not be there; money is conserved either
way).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from connmgr.embedded import host_workload, netlab
from connmgr.embedded.host_lab import PORT, HostLab
from connmgr.embedded.host_workload import WorkloadResult

__all__ = ["TrialResult", "run_trial"]

ACCOUNTS = 20


@dataclass
class TrialResult:
    seed: int
    transfers: int = 0
    inserts: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    money: int = 0
    money_expected: int = ACCOUNTS * 1000
    errors: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    #: resets the VIP sent to connections whose client got no error
    resets: int = 0
    #: per connection alive at the kill: seconds from the kill to its first answer after it
    stalls: list[float] = field(default_factory=list)
    #: per client connection answered after the kill, by name: (its last answer before the
    #: kill, or 0.0 (the kill itself) if it had none, its first answer after the kill),
    #: seconds from the kill (the lanes of connmgr/embedded/timeline_image.py)
    lanes: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: (account, balance minus what the ledger's transfers explain) where they differ
    accounts_off: list[tuple[int, int]] = field(default_factory=list)
    idle_kept: int = 0
    idle: int = 0
    #: seconds from the kill to host B's leader key, and to serving
    detection: float | None = None
    serving: float | None = None
    #: seconds from the kill to each of host B's steps (the names of STEP_PHRASES)
    steps: dict[str, float] = field(default_factory=dict)
    #: host B's connmgr log, and the wall-clock time of the kill (for a timeline)
    b_log: str = field(default="", repr=False)
    #: host B's database server log (with every statement, when the trial logged them)
    survivor_log: str = field(default="", repr=False)
    #: the frames the client namespace saw (kept when the trial logged statements)
    client_frames: list[bytes] = field(default_factory=list, repr=False)
    killed_wall: float = 0.0
    #: the reading, COPY and LISTEN clients (connmgr/embedded/host_workload.py)
    workload: WorkloadResult = field(default_factory=WorkloadResult)

    @property
    def ok(self) -> bool:
        return (not self.lost and not self.duplicated and self.money == self.money_expected and self.resets == 0
                and not self.accounts_off and self.workload.ok)  # fmt: skip


class _Clients:
    """The workload's shared bookkeeping."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.acked: list[str] = []
        self.inserts: list[str] = []
        self.errors: Counter[str] = Counter()
        self.messages: list[str] = []
        self.killed_at: float | None = None
        self.stalls: dict[str, float] = {}
        #: per client: its last answer before the kill, its first after it (time.monotonic())
        self.last: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.ports_with_errors: set[int] = set()
        self.ports: set[int] = set()
        #: transfer -> (from, to, amount, when it started)
        self.attempts: dict[str, tuple[int, int, int, float]] = {}

    def error(self, who: str, e: psycopg.Error, port: int | None) -> None:
        with self.lock:
            self.errors[e.sqlstate or type(e).__name__] += 1
            self.messages.append(f"{who}: {e.sqlstate} {str(e).splitlines()[0][:160]}")
            if port is not None:
                self.ports_with_errors.add(port)

    def answered(self, who: str, sent: float) -> None:
        """An operation sent at ``sent`` was answered now: its stall if it spanned the kill."""
        k, now = self.killed_at, time.monotonic()
        if k is None or now <= k:
            self.last[who] = now
        elif who not in self.stalls:
            self.stalls[who] = now - max(sent, k)
            self.first[who] = now

    def lanes(self) -> dict[str, tuple[float, float]]:
        """Per client answered after the kill: (last answer before it or 0.0, first after
        it), seconds from the kill, in the order of the first answers."""
        k = self.killed_at
        last = {who: t - k for who, t in self.last.items()}
        return {who: (last.get(who, 0.0), t - k) for who, t in self.first.items()}


def _port(conn: psycopg.Connection) -> int | None:
    import os
    import socket

    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as s:
            return s.getsockname()[1]
    except OSError:
        return None


def _client(lab: HostLab, c: _Clients, who: str, prefix: str, autocommit: bool, step, done: list[str]) -> None:
    """One workload client: ``step(conn, key)`` does one operation named ``key`` (its
    ledger note); acknowledged keys go to ``done``. An error is recorded, the connection
    dropped and a new one made (the next key is new: an unacknowledged one is never retried)."""
    conn = None
    port = None
    n = 0
    while not c.stop.is_set():
        key = f"{prefix}-{n}"
        n += 1
        try:
            if conn is None:
                conn = lab.connect(autocommit=autocommit)
                port = _port(conn)
                with c.lock:
                    c.ports.add(port)
            sent = time.monotonic()
            step(conn, key)
            c.answered(who, sent)
            with c.lock:
                done.append(key)
        except psycopg.Error as e:
            c.error(f"{who} ({key})", e, port)
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.05)
    if conn is not None:
        conn.close()


def _transfer_client(lab: HostLab, c: _Clients, i: int, rng: random.Random) -> None:
    def transfer(conn: psycopg.Connection, tid: str) -> None:
        a, b = sorted(rng.sample(range(1, ACCOUNTS + 1), 2))  # locked in id order: no deadlock
        amount = rng.randint(-50, 50)
        with c.lock:
            c.attempts[tid] = (a, b, amount, time.monotonic())
        conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
        conn.execute("INSERT INTO ledger (note, src, dst, amount) VALUES (%s, %s, %s, %s)", (tid, a, b, amount))
        conn.commit()

    _client(lab, c, f"transfer {i}", f"t{i}", False, transfer, c.acked)


def _writer(lab: HostLab, c: _Clients, i: int) -> None:
    def insert(conn: psycopg.Connection, note: str) -> None:
        conn.execute("INSERT INTO ledger (note) VALUES (%s)", (note,))

    _client(lab, c, f"writer {i}", f"w{i}", True, insert, c.inserts)


def run_trial(base: Path, seed: int, *, bindir: Path | None = None, transfers: int = 4, writers: int = 2,
              idle: int = 3, before: tuple[float, float] = (1.0, 3.0), after: float = 3.0,
              mode: str = "two-phase", move_transactions: bool = True,
              log_statements: bool = False, clients: dict | None = None) -> TrialResult:  # fmt: skip
    """One trial; see the module docstring. ``clients``: the counts of the reading, COPY
    and LISTEN clients (:func:`connmgr.embedded.host_workload.start`'s keywords; its
    defaults if None)."""
    from connmgr.host import privileged
    from replay.tcp_state import RST, parse_frame

    rng = random.Random(seed)
    result = TrialResult(seed)
    with HostLab(base, mode=mode, bindir=bindir, accounts=ACCOUNTS, move_transactions=move_transactions,
                 log_statements=log_statements) as lab:
        with netlab.in_netns(lab.net.ns["client"]):
            watch = privileged.open_capture("eth0")
        c = _Clients()
        idle_conns = []
        for i in range(idle):
            conn = lab.connect(autocommit=True)
            conn.execute(f"SET application_name = 'idle-{i}'")
            conn.execute("SELECT balance FROM accounts WHERE id = %s", (i + 1,), prepare=True)
            idle_conns.append(conn)
            c.ports.add(_port(conn))
        threads = [threading.Thread(target=_transfer_client, args=(lab, c, i, random.Random(rng.random())),
                                    daemon=True) for i in range(transfers)]  # fmt: skip
        threads += [threading.Thread(target=_writer, args=(lab, c, i), daemon=True) for i in range(writers)]
        work = host_workload.start(lab, c, **(clients or {}))
        for t in threads:
            t.start()
        time.sleep(rng.uniform(*before))
        c.killed_at = lab.kill_host_a()
        kill_wall = time.time() - (time.monotonic() - c.killed_at)  # the kill, not its return
        host_workload.at_kill(work)
        for i, conn in enumerate(idle_conns):
            sent = time.monotonic()
            try:
                ok = conn.execute("SHOW application_name").fetchone() == (f"idle-{i}",)
                conn.execute("SELECT balance FROM accounts WHERE id = %s", (i + 1,), prepare=True)
                c.answered(f"idle {i}", sent)
                result.idle_kept += ok
            except psycopg.Error as e:
                c.error(f"idle {i}", e, _port(conn))
        result.idle = idle
        time.sleep(after)
        c.stop.set()
        for t in threads:
            t.join(30)
        host_workload.join(work)
        for conn in idle_conns:
            conn.close()
        # the frames the clients received: a reset of a connection whose client got no error
        # (closes are not counted: every client closes its connection at the end)
        going_on = c.ports - c.ports_with_errors
        while True:
            try:
                frame = watch.recv(65536)
            except BlockingIOError:
                break
            if log_statements:
                result.client_frames.append(frame)
            seg = parse_frame(frame)
            if seg is not None and seg.src == (netlab.VIP, PORT) and seg.flags & RST and seg.dst[1] in going_on:
                result.resets += 1
        watch.close()
        notes = Counter(n for (n,) in lab.on_survivor("SELECT note FROM ledger"))
        result.workload = host_workload.finish(work, notes)
        result.money = lab.on_survivor("SELECT sum(balance) FROM accounts")[0][0]
        # each account's balance against the transfers the ledger holds: a transfer applied
        # in part, or applied without its ledger row, shows on its accounts
        result.accounts_off = [tuple(r) for r in lab.on_survivor(
            "SELECT a.id, a.balance - 1000 - coalesce(sum(CASE WHEN l.dst = a.id THEN l.amount"
            " ELSE -l.amount END), 0) AS off FROM accounts a LEFT JOIN ledger l ON a.id IN (l.src, l.dst)"
            " GROUP BY a.id, a.balance HAVING a.balance - 1000 - coalesce(sum(CASE WHEN l.dst = a.id"
            " THEN l.amount ELSE -l.amount END), 0) <> 0 ORDER BY a.id")]  # fmt: skip
        for account, off in result.accounts_off:  # the transfers that would explain it
            fits = [f"{tid} {a}->{b} {amount} at {t - c.killed_at:+.3f}s"
                    f" ({'acknowledged' if tid in c.acked else 'not acknowledged'},"
                    f" {'in' if tid in notes else 'not in'} the ledger)"
                    for tid, (a, b, amount, t) in c.attempts.items()
                    if account in (a, b) and abs(amount) == abs(off) and -3 < t - c.killed_at < 10]  # fmt: skip
            c.messages.append(f"account {account} off by {off}: transfers of that amount near the kill: "
                                   + ("; ".join(fits[-6:]) or "none"))  # fmt: skip
        result.transfers, result.inserts = len(c.acked), len(c.inserts)
        result.lost = [n for n in (*c.acked, *c.inserts) if n not in notes]
        result.duplicated = [n for n, k in notes.items() if k > 1]
        result.errors, result.messages = c.errors, c.messages
        result.stalls, result.lanes = sorted(c.stalls.values()), c.lanes()
        log = lab.log("hostb")
        result.survivor_log = lab.server_log() if log_statements else ""
    result.b_log, result.killed_wall = log, kill_wall
    result.steps = step_times(log, kill_wall)
    result.detection, result.serving = result.steps.get("leader key"), result.steps.get("serving")
    return result


#: host B's takeover steps: (name, a phrase of its log line), in their order
STEP_PHRASES = (("leader key", "leader key won"), ("database alone", "this host's database stands alone"),
                ("repair", "rebuilt in repair mode"), ("VIP", "VIP "), ("ARP", "gratuitous ARP sent"),
                ("serving", "serving as the primary"),
                ("replays done", "every open transaction is back"))  # fmt: skip


def step_times(log: str, kill_wall: float) -> dict[str, float]:
    """Seconds from the kill to the first log line of each of host B's steps after it."""
    import re

    out: dict[str, float] = {}
    for line in log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) connmgr\.host \w+ host takeover: ", line)
        if not m:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 - kill_wall
        if t < 0:
            continue
        for name, phrase in STEP_PHRASES:
            if name not in out and phrase in line:
                out[name] = t
    return out


#: host B's takeover steps as the picture marks them: (a phrase of its timeline note, mark)
_STEPS = (("leader key won", "K"), ("stands alone", "P"), ("rebuilt in repair mode", "R"), ("VIP", "V"),
          ("gratuitous ARP", "A"), ("serving as the primary", "S"))  # fmt: skip


def timeline_picture(events: list[tuple[float, str]], stalls: list[float], width: int = 60) -> str:
    """The takeover drawn on a time axis from the kill: host A, the lease running out in
    etcd, host B's steps (``events``: seconds from the kill, host B's timeline note) and
    the clients waiting (``stalls``: per connection, the kill to its first answer)."""
    marks = [(t, mark) for t, text in events for phrase, mark in _STEPS if phrase in text and t >= 0]
    end = max([*(t for t, _m in marks), *stalls, 1.0]) * 1.08
    col = lambda t: min(width - 1, int(t / end * (width - 1)))  # noqa: E731
    axis = [" "] * width
    ruler = ["-"] * width
    step = 0.5 if end <= 4 else 1.0
    for i in range(int(end / step) + 1):
        label = f"{i * step:g}s"
        c = col(i * step)
        ruler[c] = "|"
        if c + len(label) <= width:
            axis[c:c + len(label)] = label
    host_a = ["X"] + ["."] * (width - 1)
    won = next((t for t, m in marks if m == "K"), None)
    etcd = [" "] * width
    for c in range(col(won) if won is not None else width):
        etcd[c] = "="
    host_b = [" "] * width
    for t, mark in sorted(marks):
        c = col(t)
        while c < width - 1 and host_b[c] != " ":
            c += 1
        host_b[c] = mark
    clients = [" "] * width
    if stalls:
        first, last = min(stalls), max(stalls)
        for c in range(col(last) + 1):
            clients[c] = "~" if c < col(first) else "+"
        for c in range(col(last) + 1, width):
            clients[c] = ">"
    lanes = [("", axis), ("", ruler), ("host A", host_a), ("etcd lease", etcd), ("host B", host_b),
             ("clients", clients)]  # fmt: skip
    out = [f"  {name:<11}{''.join(chars).rstrip()}" for name, chars in lanes]
    out.append("  host A: X killed (port down, every process SIGKILLed), . dead;"
               " etcd: = host A's lease running out")
    out.append("  host B: K leader key won, P database stands alone, R connections rebuilt, V VIP added,"
               " A ARP sent and sockets live, S serving")
    out.append("  clients: ~ every connection waiting (retransmitting into the void), + the first answered,"
               " > all going on")
    return "\n".join(out)
