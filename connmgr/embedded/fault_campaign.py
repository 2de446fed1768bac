"""The failover fault campaign: a bank workload through the pair, the primary database
killed with SIGKILL at a random moment, and the proof on the survivor (issue 4).

One *trial* (:func:`run_trial`) creates a fresh pair of clusters and connection managers
(the primary one with ``[failover]``), starts the workload, kills the primary postmaster
after a random delay, lets the clients run on for a while, stops them and checks, directly
on the secondary database:

* the total of the balances is conserved;
* every transfer a client saw committed is there exactly once (by its id), and every
  account's balance is exactly what the transfers on the survivor explain -- nothing
  applied twice, nothing half;
* every acknowledged ledger row (autocommit inserts and COPY) is there exactly once (by
  its note; the table has no unique constraint, so a duplicate would show);
* every client error is counted by SQLSTATE. The target is none; 40001 is allowed only
  where connmgr reports that a replayed result truly differed.

The workload mixes what a kill can interrupt: transfers in explicit transactions over the
simple protocol, the extended protocol and prepared statements (locking their two rows in
id order first), autocommit ledger inserts, COPY into the ledger, and long read
transactions (sum of balances twice, with a pause between). Kill moments are random, so
over many trials they fall between statements, during statements, right after a COMMIT
was sent and during COPY.

Trial *kinds* (issue 12: the ways a real set-up lost commits before):

* ``bank``: the workload above on a schema made before the pair is started;
* ``new-schema``: the schema is created *through connmgr* just before the clients start
  (``accounts`` with its rows in its creating transaction, the others empty) and the kill
  comes 20-300 ms after the first acknowledged write, while the new tables take their
  first writes;
* ``serial``: every client inserts into the ledger (bigserial) as fast as it can, and the
  secondary connmgr's sequence rounds are 10 s apart, so only the point of failure can put
  the survivor's sequences past the keys the primary handed out (a 23505 fails the trial);
* ``sync-off``: every client turns ``synchronous_commit`` off (half in its startup
  options, all with ``SET``): connmgr must keep the commits synchronous anyway.
* ``large`` (issue 13): both connmgrs stream every message over 64 KiB and the journal
  keeps 256 KiB; a third of the transfers also write a 300 KiB ledger row (a transaction
  too large to replay), half the autocommit ledger inserts carry 100-300 KiB (streamed,
  so no marker) and the simple-protocol clients send two inserts in one Query (no marker
  either). A session whose write was in flight unmarked, or half sent, ends with 08006
  (its outcome is unknown, as when Postgres dies mid-commit; the row may or may not be
  there, but never twice); every such 08006 must be one connmgr counted.

With ``failback=True`` the trial goes on after the move: the killed primary is restarted
while the clients keep running, and connmgr (``[failover] failback = "return"``) re-seeds
it with a copy, switches the sessions back over to it and re-seeds the other side without
one. The same checks are then made on the original primary, and both databases must hold
the same rows.

``tests/campaign/test_fault_campaign.py`` runs the short form (5 trials, 2 with fail-back) in CI;
``labs/fault_campaign.py`` runs the long form (100+) and prints the table.
"""

from __future__ import annotations

import datetime
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from connmgr.embedded.harness import SupervisedConnmgr, running_pair, wait_until

__all__ = ["TrialResult", "run_trial", "ACCOUNTS", "INITIAL_BALANCE", "KINDS"]

#: the trial kinds (module docstring)
KINDS = ("bank", "new-schema", "serial", "sync-off", "large")
#: the failed moves a trial of kind "large" may have (each is an 08006 its client got)
LARGE_MOVE_FAILURES = frozenset({"unmarked commit", "too large"})

ACCOUNTS = 20
INITIAL_BALANCE = 1000
DB = "app"
PASSWORD = "campaign-pw"
SCHEMA = (
    "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);"
    "CREATE TABLE transfers (id text PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount int NOT NULL);"
    "CREATE TABLE ledger (id bigserial PRIMARY KEY, note text NOT NULL, pad text)"
)


@dataclass
class TrialResult:
    seed: int
    kind: str = "bank"
    kill_after: float = 0.0
    transfers_acked: int = 0
    ledger_acked: int = 0
    reads: int = 0
    errors: Counter[str] = field(default_factory=Counter)  #: SQLSTATE (or exception type) -> count
    error_texts: list[str] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    #: ids whose transaction the client was told was rolled back (40001) but which are there
    rolled_back_present: list[str] = field(default_factory=list)
    conserved: bool = False
    explained: bool = False
    moved: int = 0
    commits_acknowledged: int = 0
    replayed: int = 0
    rolled_back: Counter[str] = field(default_factory=Counter)
    held: int = 0  #: sessions whose replies were held during the freeze
    held_dropped: int = 0  #: of those, moved sessions whose held replies were dropped (replayed)
    sessions_failed: Counter[str] = field(default_factory=Counter)
    detect_seconds: float | None = None  #: kill -> suspicion
    failed_over_seconds: float | None = None  #: kill -> secondary ready
    stalls: list[float] = field(default_factory=list)  #: per moved session: backend lost -> live
    #: per client answered after the kill, by name: (its last answer before the kill, or
    #: 0.0 if none, its first answer after it), seconds from the kill, client order
    lanes: dict[str, tuple[float, float]] = field(default_factory=dict)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    failed: str = ""
    #: fail-back trials: restart of the old primary -> sessions home again, pair whole
    failback_seconds: float | None = None
    #: fail-back trials: the two databases hold the same rows at the end
    replicas_equal: bool | None = None
    #: on a failed proof: acknowledged ids missing on the survivor (first 20), and the
    #: accounts whose balance the transfers there do not explain (id -> (have, expected))
    #: (each as "id@+seconds", acknowledged that long after the kill, with a transfer's
    #: "(src->dst: amount)")
    missing: list[str] = field(default_factory=list)
    unexplained: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: sessions the secondary connmgr's import queue gave up on (a desync, an overflow)
    not_replayable: int = 0
    #: every failover note of the trial, all moves: (seconds after the kill, text)
    journal: list[tuple[float, str]] = field(default_factory=list)

    @property
    def unknown_outcomes(self) -> int:
        """08006 errors a trial of kind "large" may have: the moves connmgr refused because
        a write was in flight that it could not judge (each counted by reason)."""
        if self.kind != "large":
            return 0
        return sum(n for k, n in self.sessions_failed.items() if k in LARGE_MOVE_FAILURES)

    @property
    def ok(self) -> bool:
        unexplained_errors = sum(n for k, n in self.errors.items() if k not in ("40001", "08006"))
        unexplained_errors += max(0, self.errors.get("08006", 0) - self.unknown_outcomes)
        refused = sum(n for k, n in self.sessions_failed.items() if not (self.kind == "large" and k in LARGE_MOVE_FAILURES))
        return (not self.failed and not refused and self.conserved and self.explained and self.lost == 0 and self.duplicated == 0
                and not self.rolled_back_present
                and unexplained_errors == 0 and self.errors.get("40001", 0) <= sum(self.rolled_back.values())
                and self.moved > 0 and self.replicas_equal is not False)  # fmt: skip


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transfers: list[str] = []
        self.ledger: list[str] = []
        self.reads = 0
        self.acked_at: dict[str, float] = {}  #: id -> time.monotonic() of its acknowledgement
        self.moves: dict[str, tuple[int, int, int]] = {}  #: transfer id -> (src, dst, amount)
        self.rolled_back: list[str] = []  #: ids whose transaction the client saw fail with 40001
        self.errors: Counter[str] = Counter()
        self.texts: list[str] = []
        self.killed_at: float | None = None
        #: per client: its last answer before the kill, its first after it (time.monotonic())
        self.last: dict[str, float] = {}
        self.first: dict[str, float] = {}

    def answered(self, who: str) -> None:
        """An operation of ``who`` was answered now."""
        k, now = self.killed_at, time.monotonic()
        if k is None or now <= k:
            self.last[who] = now
        else:
            self.first.setdefault(who, now)

    def error(self, client: int, e: Exception) -> None:
        code = getattr(e, "sqlstate", None) or type(e).__name__
        with self.lock:
            self.errors[code] += 1
            if len(self.texts) < 20:
                self.texts.append(f"client {client}: {code}: {str(e).strip()[:300]}")


def _client(conninfo: str, index: int, stop: threading.Event, tally: _Tally, kind: str = "bank") -> None:
    rng = random.Random(index * 7919 + int(time.time()))
    if kind == "sync-off" and index % 2 == 0:
        conninfo += " options='-c synchronous_commit=off'"
    protocol = index % 3  # 0 simple, 1 extended, 2 extended + prepared statements
    factory = psycopg.ClientCursor if protocol == 0 else psycopg.Cursor
    prepare = True if protocol == 2 else None
    try:
        conn = psycopg.connect(conninfo, cursor_factory=factory, application_name=f"campaign-{index}")
    except psycopg.Error as e:
        tally.error(index, e)
        return
    with conn:
        if kind == "sync-off":
            conn.execute("SET synchronous_commit = off")
            conn.commit()
        n = 0
        while not stop.is_set():
            n += 1
            tag = f"{index}.{n}"
            try:
                pick = 0.6 if kind == "serial" else rng.random()
                if pick < 0.55:
                    src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
                    amount = rng.randint(1, 9)
                    with conn.transaction():
                        conn.execute("SELECT id, balance FROM accounts WHERE id IN (%s, %s) ORDER BY id FOR UPDATE",
                                     (src, dst), prepare=prepare).fetchall()  # fmt: skip
                        conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, src),
                                     prepare=prepare)  # fmt: skip
                        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, dst),
                                     prepare=prepare)  # fmt: skip
                        conn.execute("INSERT INTO transfers VALUES (%s, %s, %s, %s)", (tag, src, dst, amount),
                                     prepare=prepare)  # fmt: skip
                        padded = kind == "large" and rng.random() < 0.3
                        if padded:  # the transaction outgrows [failover] max_replay_bytes
                            conn.execute("INSERT INTO ledger (note, pad) VALUES (%s, %s)", (f"{tag}.pad", "p" * 300_000))
                    with tally.lock:
                        if padded:
                            tally.ledger.append(f"{tag}.pad")
                            tally.acked_at[f"{tag}.pad"] = time.monotonic()
                        tally.transfers.append(tag)
                        tally.acked_at[tag] = time.monotonic()
                        tally.moves[tag] = (src, dst, amount)
                elif pick < 0.80:
                    conn.autocommit = True
                    notes = [tag]
                    try:
                        shape = rng.random() if kind == "large" else 1.0
                        if shape < 0.5:  # streamed: no marker
                            conn.execute("INSERT INTO ledger (note, pad) VALUES (%s, %s)",
                                         (tag, "q" * rng.randint(100_000, 300_000)), prepare=prepare)  # fmt: skip
                        elif shape < 0.8 and protocol == 0:  # two statements in one Query: no marker
                            notes.append(f"{tag}.2")
                            conn.execute("INSERT INTO ledger (note) VALUES (%s); INSERT INTO ledger (note) VALUES (%s)",
                                         notes)  # fmt: skip
                        else:
                            conn.execute("INSERT INTO ledger (note) VALUES (%s)", (tag,), prepare=prepare)
                    finally:
                        if not conn.broken:
                            conn.autocommit = False
                    with tally.lock:
                        tally.ledger.extend(notes)
                        tally.acked_at.update((n, time.monotonic()) for n in notes)
                elif pick < 0.90:
                    conn.autocommit = True
                    try:
                        with conn.cursor().copy("COPY ledger (note) FROM STDIN") as copy:
                            for i in range(5):
                                copy.write_row((f"{tag}.{i}",))
                    finally:
                        conn.autocommit = False
                    with tally.lock:
                        tally.ledger.extend(f"{tag}.{i}" for i in range(5))
                        tally.acked_at.update((f"{tag}.{i}", time.monotonic()) for i in range(5))
                else:
                    with conn.transaction():
                        first = conn.execute("SELECT sum(balance)::bigint FROM accounts").fetchone()[0]
                        time.sleep(0.02)
                        second = conn.execute("SELECT sum(balance)::bigint FROM accounts").fetchone()[0]
                    if first != second or first != ACCOUNTS * INITIAL_BALANCE:
                        tally.error(index, AssertionError(f"a read saw totals {first}, {second}"))
                    with tally.lock:
                        tally.reads += 1
            except psycopg.Error as e:
                tally.error(index, e)
                if getattr(e, "sqlstate", None) == "40001":  # rolled back: nothing of it may be anywhere
                    with tally.lock:
                        if pick < 0.55:
                            tally.rolled_back += [tag, f"{tag}.pad"]
                        elif pick < 0.80:
                            tally.rolled_back += [tag, f"{tag}.2"]
                        elif pick < 0.90:
                            tally.rolled_back.extend(f"{tag}.{i}" for i in range(5))
                if conn.closed or conn.broken:
                    return
                try:
                    conn.rollback()
                except psycopg.Error:
                    return
            else:
                tally.answered(f"client {index}")


def run_trial(base_dir: Path, *, seed: int, clients: int = 6, kill_window: tuple[float, float] = (0.5, 1.5),
              after: float = 1.0, bindir: Path | None = None, log=None, failback: bool = False,
              kind: str = "bank", workers: int = 1) -> TrialResult:  # fmt: skip
    """One trial of ``kind`` (:data:`KINDS`) in ``base_dir`` (created and removed); see
    the module docstring. ``log(text)`` gets progress lines. With ``workers`` > 1 the
    primary connmgr runs that many worker processes (``[server] workers``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown trial kind {kind!r} (one of {', '.join(KINDS)})")
    say = log or (lambda _text: None)
    rng = random.Random(seed)
    if kind == "new-schema":
        kill_window = (0.02, 0.3)
    result = TrialResult(seed=seed, kind=kind, kill_after=round(rng.uniform(*kill_window), 3))
    try:
        with running_pair(base_dir, database=DB, password=PASSWORD, poster_slot="campaign_poster", bindir=bindir,
                          strict_stop=False, sequence_interval=10.0 if kind == "serial" else 0.2,
                          failover=True, shutdown_timeout=2.0,
                          failover_options={"failback": "return" if failback else "manual", "reseed_interval": 0.2,
                                            **({"max_replay_bytes": 256 << 10} if kind == "large" else {})},
                          server_options={"max_buffered_message": 64 << 10} if kind == "large" else None,
                          workers=workers) as (pair, primary, secondary):  # fmt: skip
            _trial(pair, primary, secondary, result, say, clients=clients, after=after, failback=failback, kind=kind)
    except Exception as e:  # noqa: BLE001 - a trial that cannot run is a failed trial, with the reason
        result.failed = f"{type(e).__name__}: {e}"
    return result


def _trial(pair, primary, secondary, result: TrialResult, say, *, clients: int, after: float, failback: bool,
           kind: str) -> None:  # fmt: skip
    """The trial itself, on the running pair (see run_trial)."""
    conninfo = primary.conninfo("postgres", DB, PASSWORD)
    view = _FleetView(primary) if isinstance(primary, SupervisedConnmgr) else _AppView(primary.app.failover)
    if kind == "new-schema":  # through connmgr, right before the writes: each table is fenced
        with psycopg.connect(conninfo, autocommit=True) as c:
            accounts, *others = SCHEMA.split(";")
            with c.transaction():  # a table with rows of its own creating transaction
                c.execute(accounts)
                c.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
                          (INITIAL_BALANCE, ACCOUNTS))  # fmt: skip
            for statement in others:  # and empty ones
                c.execute(statement)
    else:
        pair.sync_schema(DB, SCHEMA)
        with pair.primary.connect(DB) as c:
            c.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g", (INITIAL_BALANCE, ACCOUNTS))
        pair.wait_caught_up()
        pair.sync_sequences(DB)

    tally = _Tally()
    stop = threading.Event()
    threads = [threading.Thread(target=_client, args=(conninfo, i, stop, tally, kind), daemon=True)
               for i in range(clients)]  # fmt: skip
    for t in threads:
        t.start()
    if kind == "new-schema":  # the window opens with the first acknowledged write to a new table
        wait_until(lambda: tally.transfers or tally.ledger, 10)
    time.sleep(result.kill_after)
    killed_at = tally.killed_at = time.monotonic()
    view.killed(killed_at)
    pair.primary.kill()
    say(f"  primary postmaster killed (SIGKILL) {result.kill_after:.2f}s into the workload")
    wait_until(view.decided, 15)
    result.detect_seconds, result.failed_over_seconds = view.timing()
    time.sleep(after)
    if failback:
        restarted = time.monotonic()
        pair.primary.start()
        if not wait_until(view.home_again, 60):
            raise RuntimeError(f"fail-back did not complete within 60 s: {view.timeline()[-5:]}")
        result.failback_seconds = time.monotonic() - restarted
        say(f"  old primary restarted, re-seeded, sessions home again in {result.failback_seconds:.2f}s")
        time.sleep(after)
    stop.set()
    for t in threads:
        t.join(30)

    result.transfers_acked = len(tally.transfers)
    result.ledger_acked = len(tally.ledger)
    result.reads = tally.reads
    result.errors = tally.errors
    result.error_texts = tally.texts
    view.counts(result)
    last = {who: t - killed_at for who, t in tally.last.items()}
    result.lanes = {who: (last.get(who, 0.0), tally.first[who] - killed_at)
                    for who in sorted(tally.first, key=lambda w: int(w.split()[-1]))}  # fmt: skip
    result.timeline = view.timeline()
    if secondary.app.imports is not None:
        result.not_replayable = len(secondary.app.imports.not_replayable)
    result.journal = view.journal(killed_at)
    _check(pair.primary if failback else pair.secondary, tally, result, killed_at)
    if failback:
        pair.wait_caught_up()
        result.replicas_equal = all(_digest(pair.primary, t) == _digest(pair.secondary, t)
                                    for t in ("accounts", "transfers", "ledger", "connmgr.markers"))  # fmt: skip


class _AppView:
    """What a trial reads of an embedded primary connmgr: its Failover."""

    def __init__(self, failover) -> None:
        self.fo = failover
        self.killed_at = 0.0

    def killed(self, at: float) -> None:
        self.killed_at = at

    def decided(self) -> bool:
        return self.fo.failed_over or self.fo.failed is not None

    def timing(self) -> tuple[float | None, float | None]:
        """(kill -> suspicion, kill -> secondary ready), seconds."""
        fo = self.fo
        return (None if fo.suspected_at is None else fo.suspected_at - self.killed_at,
                None if fo.failed_over_at is None else fo.failed_over_at - self.killed_at)  # fmt: skip

    def home_again(self) -> bool:
        fo = self.fo
        return fo.reseeds == 2 and not fo.failed_over and fo.previous is None and fo.route.server is fo.home

    def counts(self, result: TrialResult) -> None:
        fo = self.fo
        result.moved = fo.sessions_moved
        result.commits_acknowledged = fo.commits_acknowledged
        result.replayed = fo.transactions_replayed
        result.rolled_back = Counter(fo.transactions_rolled_back)
        result.held, result.held_dropped = fo.replies_held, fo.replies_dropped
        result.sessions_failed = Counter(fo.sessions_failed)
        result.stalls = list(fo.stalls)

    def timeline(self) -> list[tuple[float, str]]:
        return list(self.fo.timeline)

    def journal(self, killed_at: float) -> list[tuple[float, str]]:
        return [(round(t - killed_at, 4), what) for t, what in self.fo.journal]


class _FleetView:
    """What a trial reads of a primary connmgr with ``[server] workers``: its merged
    metrics (summed over the workers) and its log (the supervisor's failover notes give
    the decision's times; every process's notes make the journal). Stalls are each
    worker's longest (the metrics keep only that)."""

    _NOTE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) connmgr\.failover(\[worker \d+\])? WARNING"
                       r" failover: \+[\d.]+s (.*)$")  # fmt: skip

    def __init__(self, primary: SupervisedConnmgr) -> None:
        self.primary = primary
        self.killed_wall = 0.0
        self.killed_at = 0.0

    def killed(self, at: float) -> None:
        self.killed_at, self.killed_wall = at, time.time()

    def _sum(self, name: str) -> float:
        return sum(self.primary.per_worker(name).values())

    def decided(self) -> bool:
        moved = self.primary.per_worker("connmgr_failover_failed_over")
        return (bool(moved) and all(moved.values())) or any("FAILED" in what for _t, what in self._notes(False))

    def _notes(self, workers: bool) -> list[tuple[float, str]]:
        """(wall time, text) of the failover notes: the supervisor's, and the workers' too."""
        out = []
        for line in self.primary.log().splitlines():
            found = self._NOTE.match(line)
            if found and (workers or not found[2]):
                stamp = datetime.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((stamp, f"{found[2].strip('[]') + ': ' if found[2] else ''}{found[3]}"))
        return out

    def timing(self) -> tuple[float | None, float | None]:
        notes = self._notes(False)
        suspected = next((t for t, what in notes if what.startswith("primary suspected")), None)
        moved = next((t for t, what in notes if what.startswith("secondary is the primary now")), None)
        return (None if suspected is None else suspected - self.killed_wall,
                None if moved is None else moved - self.killed_wall)  # fmt: skip

    def home_again(self) -> bool:
        reseeds = self.primary.per_worker("connmgr_failover_reseeds")
        return (bool(reseeds) and all(n == 2 for n in reseeds.values())
                and not self._sum("connmgr_failover_failed_over")
                and not self._sum("connmgr_failover_old_primary_pending"))  # fmt: skip

    def counts(self, result: TrialResult) -> None:
        samples, _text = self.primary.metrics()

        def labelled(name: str) -> Counter[str]:
            out: Counter[str] = Counter()
            for sample in samples.get(name, []):
                if "reason" in sample.labels:
                    out[sample.labels["reason"]] += int(sample.value)
            return +out

        result.moved = int(self._sum("connmgr_failover_sessions_moved"))
        result.commits_acknowledged = int(self._sum("connmgr_failover_commits_acknowledged"))
        result.replayed = int(self._sum("connmgr_failover_transactions_replayed"))
        result.rolled_back = labelled("connmgr_failover_transactions_rolled_back")
        result.held = int(self._sum("connmgr_failover_sessions_held"))
        result.held_dropped = int(self._sum("connmgr_failover_held_replies_dropped"))
        result.sessions_failed = labelled("connmgr_failover_sessions_not_moved")
        result.stalls = [v for v in self.primary.per_worker("connmgr_failover_stall_seconds_max").values() if v]

    def timeline(self) -> list[tuple[float, str]]:
        notes = self._notes(False)
        return [(round(t - notes[0][0], 4), what) for t, what in notes] if notes else []

    def journal(self, killed_at: float) -> list[tuple[float, str]]:
        return [(round(t - self.killed_wall, 4), what) for t, what in self._notes(True)]


def _digest(cluster, table: str) -> str:
    with cluster.connect(DB) as c:
        return c.execute(f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t").fetchone()[0]


def _check(survivor, tally: _Tally, r: TrialResult, killed_at: float) -> None:
    """The proof, on the database the sessions are on at the end."""
    with survivor.connect(DB) as c:
        transfers = c.execute("SELECT id, src, dst, amount FROM transfers").fetchall()
        notes = Counter(row[0] for row in c.execute("SELECT note FROM ledger"))
        balances = dict(c.execute("SELECT id, balance FROM accounts").fetchall())
    ids = {t[0] for t in transfers}
    r.lost = sum(1 for t in tally.transfers if t not in ids) + sum(1 for n in tally.ledger if notes[n] == 0)
    r.duplicated = sum(n - 1 for n in notes.values() if n > 1)
    r.rolled_back_present = [t for t in tally.rolled_back if t in ids or notes[t] > 0]
    missing = [t for t in tally.transfers if t not in ids] + [n for n in tally.ledger if notes[n] == 0]
    r.missing = [f"{m}@{tally.acked_at[m] - killed_at:+.3f}s" + _transfer(tally.moves.get(m)) for m in missing[:20]]
    r.conserved = sum(balances.values()) == ACCOUNTS * INITIAL_BALANCE
    expect = dict.fromkeys(range(1, ACCOUNTS + 1), INITIAL_BALANCE)
    for _id, src, dst, amount in transfers:
        expect[src] -= amount
        expect[dst] += amount
    r.explained = balances == expect
    r.unexplained = {a: (balances.get(a), expect[a]) for a in expect if balances.get(a) != expect[a]}


def _transfer(move: tuple[int, int, int] | None) -> str:
    return "" if move is None else f" ({move[0]}->{move[1]}: {move[2]})"
