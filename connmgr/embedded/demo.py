"""``connmgr demo``: the whole thing on one machine, with nothing to set up.

It creates a primary and a secondary Postgres in a temporary directory (as an unprivileged
user when started as root) joined by synchronous logical replication, starts the pair of
connection managers -- the primary one in front of the primary database, mirroring every
session to the secondary one, which keeps the import queue and purges it by the markers
it reads from the primary's WAL -- drives a mixed bank workload through the primary
connmgr with psycopg (transfers in explicit transactions, autocommit ledger inserts over
the simple protocol, long read transactions, COPY), then checks the data directly on the
servers (balances conserved, every acknowledged insert present once, replica identical,
import queue empty) and prints a summary (or JSON with ``--json``). Everything it created
is removed at the end.

Then the failover: a fresh pair runs the bank workload of the fault campaign
(``connmgr/embedded/fault_campaign.py``: transfers over the simple, extended and prepared protocols,
autocommit inserts, COPY, long reads), the primary postmaster is killed with SIGKILL
mid-workload, and the demo prints the timeline of the move and the proof read on the
survivor: money conserved, every acknowledged commit present once, client errors, stall
of every moved session. ``--json`` carries all of it.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import psycopg

from connmgr import __version__
from connmgr.embedded.cluster_pair import ClusterPair
from connmgr.embedded.clusters import ClusterError, temp_base_dir
from connmgr.embedded.harness import (
    EmbeddedConnmgr,
    start_connmgr_pair,
    wait_until,
    write_users_file,
)
from connmgr.metrics import percentile

ACCOUNTS = 100
INITIAL_BALANCE = 1000
PASSWORD = "demo-password"


@dataclass
class ClientTally:
    transfers: int = 0
    autocommits: int = 0
    ledger_inserts: int = 0
    reads: int = 0
    copies: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def transactions(self) -> int:
        return self.transfers + self.autocommits + self.copies + self.reads


def _say(msg: str, *, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _workload_client(conninfo: str, index: int, stop: threading.Event, tally: ClientTally) -> None:
    rng = random.Random(index)
    simple = index % 2 == 1  # odd clients use the simple query protocol (client-side binding)
    cursor_factory = psycopg.ClientCursor if simple else psycopg.Cursor
    try:
        conn = psycopg.connect(conninfo, cursor_factory=cursor_factory, application_name=f"demo-{index}")
    except psycopg.Error as e:
        tally.errors.append(f"connect: {e}")
        return
    with conn:
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            try:
                if n % 50 == 0:
                    with conn.transaction():
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        total = conn.execute("SELECT sum(balance)::bigint FROM accounts").fetchone()[0]
                        if total != ACCOUNTS * INITIAL_BALANCE:
                            tally.errors.append(f"read saw total {total}")
                    tally.reads += 1
                elif n % 97 == 0:
                    with conn.cursor().copy("COPY ledger (client, amount, note) FROM STDIN") as copy:
                        for i in range(10):
                            copy.write_row((index, 0, f"copy {n}.{i}"))
                    conn.commit()
                    tally.copies += 1
                    tally.ledger_inserts += 10
                elif n % 3 == 0:
                    conn.autocommit = True
                    conn.execute("INSERT INTO ledger (client, amount, note) VALUES (%s, %s, 'auto')", (index, rng.randint(1, 9)))
                    conn.autocommit = False
                    tally.autocommits += 1
                    tally.ledger_inserts += 1
                else:
                    a, b = rng.sample(range(1, ACCOUNTS + 1), 2)
                    amount = rng.randint(1, 20)
                    # lock the two accounts in id order, so concurrent transfers cannot deadlock
                    first, second = (a, b) if a < b else (b, a)
                    delta = {a: -amount, b: amount}
                    with conn.transaction():
                        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (delta[first], first))
                        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (delta[second], second))
                        conn.execute("INSERT INTO ledger (client, amount, note) VALUES (%s, %s, 'transfer')", (index, amount))
                    tally.transfers += 1
                    tally.ledger_inserts += 1
            except psycopg.errors.SerializationFailure:
                conn.rollback()  # a retryable conflict: the demo's workload simply moves on
            except psycopg.Error as e:
                tally.errors.append(f"{type(e).__name__}: {e}".strip())
                if conn.closed:
                    return
                conn.rollback()
            tally.latencies.append(time.perf_counter() - t0)


def run_demo(*, json_output: bool = False, clients: int = 8, seconds: float = 5.0, mode: str = "two-phase",
             picture: str | None = None) -> int:  # fmt: skip
    """Run the demo; prints progress on stderr and the summary on stdout; with ``picture``,
    draws the failover into that PNG (connmgr/embedded/timeline_image.py, needs the plot
    extra). Returns the exit status: 0 when every check passed."""
    quiet = json_output
    t_start = time.perf_counter()
    base = temp_base_dir("connmgr-demo-")
    pair: ClusterPair | None = None
    started: list[EmbeddedConnmgr] = []  # connection managers to stop at the end
    summary: dict = {"connmgr_version": __version__}
    try:
        _say(f"connmgr demo: working in {base}", quiet=quiet)
        t0 = time.perf_counter()
        pair = ClusterPair.create(base, databases=("app",), password=PASSWORD)
        cluster = pair.primary
        version = cluster.psql("SHOW server_version")
        _say(f"  created PostgreSQL {version} primary (port {pair.primary.port}) and secondary (port {pair.secondary.port}),"
             f" synchronous logical replication ({time.perf_counter() - t0:.1f}s)", quiet=quiet)

        users = write_users_file(base, PASSWORD)
        cm, secondary_cm = start_connmgr_pair(pair, database="app", password=PASSWORD, users_file=users,
                                              poster_slot="connmgr_demo_poster", mode=mode, started=started)  # fmt: skip
        _say(f"  primary connmgr {cm.host}:{cm.port} (SCRAM) mirrors every session to the secondary connmgr"
             f" {secondary_cm.host}:{secondary_cm.port}, which purges by markers read from the primary's WAL", quiet=quiet)
        proxied = cm.conninfo(password=PASSWORD, dbname="app")

        # The schema goes through connmgr like everything else: logical replication does
        # not carry DDL, so connmgr captures it and the secondary replays it in order.
        with psycopg.connect(proxied, autocommit=True) as conn:
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            conn.execute("CREATE TABLE ledger (id bigserial PRIMARY KEY, client int, amount int, note text,"
                         " at timestamptz DEFAULT now())")  # fmt: skip
            conn.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g", (INITIAL_BALANCE, ACCOUNTS))
        ddl = secondary_cm.app.imports.ddl
        if not wait_until(lambda: ddl.applied >= 2 and pair.secondary.psql(
                "SELECT count(*) FROM accounts", "app") == str(ACCOUNTS), 15):  # fmt: skip
            raise OSError("the schema created through connmgr did not reach the secondary")
        _say(f"  schema created through connmgr and replayed on the secondary; {ACCOUNTS} accounts of"
             f" {INITIAL_BALANCE} inserted", quiet=quiet)  # fmt: skip

        tallies = [ClientTally() for _ in range(clients)]
        stop = threading.Event()
        threads = [threading.Thread(target=_workload_client, args=(proxied, i, stop, tallies[i]), daemon=True) for i in range(clients)]
        _say(f"  workload: {clients} clients for {seconds:g}s (transfers, autocommit inserts, COPY, long reads)", quiet=quiet)
        t_work = time.perf_counter()
        for t in threads:
            t.start()
        last = 0
        while time.perf_counter() - t_work < seconds:
            time.sleep(min(1.0, max(0.0, seconds - (time.perf_counter() - t_work))))
            done = sum(t.transactions for t in tallies)
            elapsed = time.perf_counter() - t_work
            _say(f"    {elapsed:4.1f}s  transactions {done:7d}  ({(done - last):5d}/s)  errors {sum(len(t.errors) for t in tallies)}", quiet=quiet)
            last = done
        stop.set()
        for t in threads:
            t.join(30)
        work_seconds = time.perf_counter() - t_work

        # Check the data directly on the servers, not through connmgr.
        imports = secondary_cm.app.imports
        sender = cm.app.mirror.sender
        settled = wait_until(lambda: sender.acked_version == sender.latest_version and imports.queue.transactions == 0, 15)
        pair.wait_caught_up(15)
        replica_identical = all(
            pair.table_digest(pair.primary, "app", t) == pair.table_digest(pair.secondary, "app", t)
            for t in ("accounts", "ledger")
        )
        seq_primary = pair.sequence_values(pair.primary, "app")
        sequences_ahead = wait_until(lambda: all(
            (v or 0) <= (pair.sequence_values(pair.secondary, "app").get(k) or 0) for k, v in seq_primary.items()
        ), 5)  # fmt: skip
        with cluster.connect(dbname="app") as direct:
            total = direct.execute("SELECT sum(balance)::bigint FROM accounts").fetchone()[0]
            ledger_rows = direct.execute("SELECT count(*) FROM ledger").fetchone()[0]
            dup_keys = direct.execute("SELECT count(*) - count(DISTINCT id) FROM ledger").fetchone()[0]
        acknowledged = sum(t.ledger_inserts for t in tallies)
        app = cm.app
        totals = app.metrics.totals(c.stats for c in list(app.clients.values()))
        latencies = [x for t in tallies for x in t.latencies]
        errors = [e for t in tallies for e in t.errors]
        checks = {
            "total_conserved": total == ACCOUNTS * INITIAL_BALANCE,
            "acknowledged_commits_present": ledger_rows == acknowledged,
            "lost_commits": max(0, acknowledged - ledger_rows),
            "duplicated_commits": max(0, ledger_rows - acknowledged) + dup_keys,
            "client_errors": len(errors),
            "replica_identical": replica_identical,
            "sequences_ahead": sequences_ahead,
            "import_queue_empty": settled,
            # every writing transaction of the workload was matched by its own marker row
            "every_write_marked": imports.queue.stats.purged >= sum(t.transfers + t.autocommits + t.copies for t in tallies),
        }
        transactions = sum(t.transactions for t in tallies)
        summary.update(
            postgres_version=version,
            clients=clients,
            seconds=round(work_seconds, 2),
            workload={
                "transactions": transactions,
                "tps": round(transactions / work_seconds, 1),
                "transfers": sum(t.transfers for t in tallies),
                "autocommit_inserts": sum(t.autocommits for t in tallies),
                "copies": sum(t.copies for t in tallies),
                "long_reads": sum(t.reads for t in tallies),
                "latency_ms_p50": round(percentile(latencies, 0.5) * 1e3, 2),
                "latency_ms_p99": round(percentile(latencies, 0.99) * 1e3, 2),
                "latency_ms_mean": round(statistics.fmean(latencies) * 1e3, 2) if latencies else 0,
            },
            connmgr={
                "clients_accepted": app.metrics.clients_accepted,
                "requests": totals.requests,
                "messages_in": totals.messages_from_client,
                "messages_out": totals.messages_to_client,
                "bytes_in": totals.bytes_from_client,
                "bytes_out": totals.bytes_to_client,
                "request_latency_ms_p99_le": round(totals.latency.quantile(0.99) * 1e3, 3),
            },
            pair={
                "mirror_versions": sender.latest_version,
                "mirror_reconnects": cm.app.mirror.connects - 1,
                "markers_purged": imports.queue.stats.purged,
                "read_only_or_unmarked_purged": imports.queue.stats.read_only_purges,
                "rolled_back_purged": imports.queue.stats.rollback_purges,
                "unmatched_commits": imports.queue.stats.unmatched_commits,
                "markers_written": cm.app.metrics.markers_written,
                "ddl_replayed": ddl.applied,
                "mode": cm.app.config.mirror.mode,
                "two_phase_holds": cm.app.mirror.holds_total,
                "two_phase_degradations": cm.app.mirror.degradations,
                "import_queue": asdict(imports.queue.stats),
            },
            data={"sum_of_balances": total, "ledger_rows": ledger_rows, "acknowledged_ledger_inserts": acknowledged},
            checks=checks,
            errors=errors[:10],
        )
    except (ClusterError, OSError, psycopg.Error) as e:
        summary["failed"] = f"{type(e).__name__}: {e}"
    finally:
        for proxy in reversed(started):
            if proxy is not None:
                try:
                    proxy.stop()
                except Exception as e:  # noqa: BLE001 - reported, cleanup continues
                    summary.setdefault("failed", f"connmgr stop: {e}")
        if pair is not None:
            pair.destroy()
        import shutil

        shutil.rmtree(base, ignore_errors=True)
        summary["total_seconds"] = round(time.perf_counter() - t_start, 1)

    if "failed" not in summary:
        summary["failover"] = _failover_part(quiet=quiet, picture=picture)
        summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    k = summary.get("checks", {})
    f = summary.get("failover", {})
    ok = f.get("ok", False) and "failed" not in summary and k["total_conserved"] and k["lost_commits"] == 0 and k["duplicated_commits"] == 0 \
        and k["client_errors"] == 0 and k["replica_identical"] and k["import_queue_empty"] \
        and k["sequences_ahead"] and k["every_write_marked"]
    summary["ok"] = bool(ok)
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0 if ok else 1


def _failover_part(*, quiet: bool, picture: str | None = None) -> dict:
    """One fault-campaign trial: kill -9 the primary mid-workload; the figures (and, with
    ``picture``, the move drawn into that PNG)."""
    from connmgr.embedded.fault_campaign import run_trial

    _say("\nfailover: a fresh pair, 6 clients (bank workload), the primary postmaster killed with SIGKILL"
         " mid-workload", quiet=quiet)  # fmt: skip
    base = temp_base_dir("connmgr-demo-failover-")
    # The move logs each step at WARNING (as it should in production) and the dead primary
    # makes the secondary's poster and sequence sync retry; the demo prints the timeline
    # itself, so those stay out of its output unless -v asked for logs.
    logger = logging.getLogger("connmgr")
    level = logger.level
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        logger.setLevel(logging.ERROR)
    try:
        r = run_trial(base / "trial", seed=int(time.time()) % 1000, log=lambda text: _say(text, quiet=quiet))
    finally:
        logger.setLevel(level)
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    if not quiet:
        for at, what in r.timeline:
            _say(f"    +{at * 1e3:7.1f} ms  {what}", quiet=quiet)
    drawn = None
    if picture:
        from connmgr.embedded.timeline_image import database_failover, render

        drawn = str(render(database_failover(r.journal, r.lanes), picture))
        _say(f"  the failover drawn: {drawn}", quiet=quiet)
    return {
        "ok": r.ok,
        "failed": r.failed,
        "killed_after_seconds": r.kill_after,
        "detect_ms": round(r.detect_seconds * 1e3, 1) if r.detect_seconds is not None else None,
        "secondary_ready_ms": round(r.failed_over_seconds * 1e3, 1) if r.failed_over_seconds is not None else None,
        "sessions_moved": r.moved,
        "sessions_not_moved": dict(r.sessions_failed),
        "commits_acknowledged_by_marker": r.commits_acknowledged,
        "transactions_replayed": r.replayed,
        "rolled_back_40001": dict(r.rolled_back),
        "client_errors": dict(r.errors),
        "transfers_acknowledged": r.transfers_acked,
        "ledger_rows_acknowledged": r.ledger_acked,
        "lost_commits": r.lost,
        "duplicated_commits": r.duplicated,
        "total_conserved": r.conserved,
        "balances_explained_by_transfers": r.explained,
        "stall_ms": {"p50": round(percentile(r.stalls, 0.5) * 1e3, 1), "p99": round(percentile(r.stalls, 0.99) * 1e3, 1),
                     "max": round(percentile(r.stalls, 1.0) * 1e3, 1)},  # fmt: skip
        "timeline": [[round(at * 1e3, 1), what] for at, what in r.timeline],
        "picture": drawn,
    }


def _print_summary(s: dict) -> None:
    if "failed" in s:
        print(f"\nconnmgr demo FAILED: {s['failed']}")
        return
    w, c, d, k, p = s["workload"], s["connmgr"], s["data"], s["checks"], s["pair"]
    mark = {True: "ok", False: "FAILED"}
    print(f"""
connmgr {s['connmgr_version']} demo -- PostgreSQL {s['postgres_version']}, {s['clients']} clients, {s['seconds']}s

  workload through connmgr
    transactions        {w['transactions']:>10}   ({w['tps']} per second)
      transfers         {w['transfers']:>10}   explicit transactions, extended protocol
      autocommit        {w['autocommit_inserts']:>10}   ledger inserts, simple and extended protocol
      COPY              {w['copies']:>10}
      long reads        {w['long_reads']:>10}   REPEATABLE READ sums
    client latency      p50 {w['latency_ms_p50']} ms, p99 {w['latency_ms_p99']} ms

  connmgr
    requests            {c['requests']:>10}   (Query/Sync to ReadyForQuery; p99 <= {c['request_latency_ms_p99_le']} ms)
    messages in/out     {c['messages_in']:>10} / {c['messages_out']}
    bytes in/out        {c['bytes_in']:>10} / {c['bytes_out']}

  the pair
    mirror versions     {p['mirror_versions']:>10}   records mirrored to the secondary connmgr (reconnects {p['mirror_reconnects']})
    mirror mode         {p['mode']:>10}   ({p['two_phase_holds']} commit acks held for the secondary, {p['two_phase_degradations']} degradations)
    purged by marker    {p['markers_purged']:>10}   writing transactions matched exactly by their marker row
    purged at ack       {p['read_only_or_unmarked_purged']:>10}   read-only / {p['rolled_back_purged']} rolled back
    every write marked  {str(k['every_write_marked']):>10}   transfers + autocommit inserts + COPYs <= purged by marker
    DDL replayed        {p['ddl_replayed']:>10}   statements captured on the primary, replayed on the secondary
    import queue empty  {str(k['import_queue_empty']):>10}   once the clients left
    replica identical   {str(k['replica_identical']):>10}   accounts and ledger digests, primary = secondary
    sequences ahead     {str(k['sequences_ahead']):>10}   every secondary sequence >= the primary's

  checks (read directly from the server)
    sum of balances     {d['sum_of_balances']:>10}   {mark[k['total_conserved']]}
    ledger rows         {d['ledger_rows']:>10}   = acknowledged inserts {d['acknowledged_ledger_inserts']}: {mark[k['acknowledged_commits_present']]}
    lost commits        {k['lost_commits']:>10}
    duplicated commits  {k['duplicated_commits']:>10}
    client errors       {k['client_errors']:>10}

""")
    f = s.get("failover")
    if f:
        errors = ", ".join(f"{k} x{n}" for k, n in f["client_errors"].items()) or "none"
        print(f"""  failover (primary killed with SIGKILL {f['killed_after_seconds']}s into the workload)
    detected            {f['detect_ms']:>10} ms after the kill; secondary ready {f['secondary_ready_ms']} ms
    sessions moved      {f['sessions_moved']:>10}   not moved: {f['sessions_not_moved'] or 'none'}
    commits resolved    {f['commits_acknowledged_by_marker']:>10}   interrupted commits found committed: acknowledged, not replayed
    replayed            {f['transactions_replayed']:>10}   open transactions replayed and compared
    rolled back (40001) {sum(f['rolled_back_40001'].values()):>10}   replays that truly differed
    client errors       {errors:>10}
    lost / duplicated   {f['lost_commits']:>5} / {f['duplicated_commits']:<4}   of {f['transfers_acknowledged']} transfers and {f['ledger_rows_acknowledged']} ledger rows acknowledged
    money conserved     {str(f['total_conserved'] and f['balances_explained_by_transfers']):>10}   every balance explained by the transfers on the survivor
    stall               p50 {f['stall_ms']['p50']} ms, p99 {f['stall_ms']['p99']} ms, max {f['stall_ms']['max']} ms{'   FAILED: ' + f['failed'] if f['failed'] else ''}
""")
    print(f"  result: {'ok' if s['ok'] else 'FAILED'} in {s['total_seconds']}s")
    for e in s.get("errors", []):
        print(f"    error: {e}")


if __name__ == "__main__":
    sys.exit(run_demo())
