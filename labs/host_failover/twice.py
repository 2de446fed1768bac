"""Two host failures in a row (issue 14, step 7): ``sudo python labs/host_failover/twice.py``.

Builds the lab (connmgr/embedded/host_lab.py), runs autocommit writers and transfer
clients through the VIP, kills host A; host B takes over. Host A comes back (a reboot),
RESEED on host B's connmgr re-seeds its database as host B's secondary, its connmgr
starts as the secondary (``HostLab.rejoin_host_a``). New clients start, host B is killed,
host A takes over. Then, on host A's database: every write acknowledged in either life
present exactly once, money conserved; per failure the stall of each connection, its
errors by SQLSTATE, and the takeover's timeline from the winner's log. Clients that moved
at the first takeover are stopped before the second (a moved session is not mirrored
again: README, "Host A comes back").
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg  # noqa: E402

from connmgr.embedded import netlab  # noqa: E402
from connmgr.embedded.clusters import temp_base_dir  # noqa: E402
from connmgr.embedded.etcd_cluster import etcd_binary  # noqa: E402
from connmgr.embedded.host_lab import HostLab  # noqa: E402

ACCOUNTS = 20


class Life:
    """The clients of one host's life as the primary: each writes until told to stop."""

    def __init__(self, lab: HostLab, name: str, writers: int, transfers: int) -> None:
        self.lab, self.name = lab, name
        self.acked: list[str] = []
        self.errors: Counter = Counter()
        self.stalls: dict[str, float] = {}
        self.killed_at: float | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(f"{name}-w{i}", False), daemon=True)
                        for i in range(writers)]  # fmt: skip
        self.threads += [threading.Thread(target=self._client, args=(f"{name}-t{i}", True), daemon=True)
                         for i in range(transfers)]  # fmt: skip

    def start(self) -> Life:
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _client(self, who: str, transfer: bool) -> None:
        n = 0
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = self.lab.connect(autocommit=not transfer)
                n += 1
                note = f"{who}-{n}"
                sent = time.monotonic()
                if transfer:
                    a, b = sorted((n % ACCOUNTS + 1, (n + 7) % ACCOUNTS + 1))  # in id order: no deadlock
                    conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", (a,))
                    conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (b,))
                    conn.execute("INSERT INTO ledger (note, src, dst, amount) VALUES (%s, %s, %s, 1)", (note, a, b))
                    conn.commit()
                else:
                    conn.execute("INSERT INTO ledger (note) VALUES (%s)", (note,))
                with self.lock:
                    self.acked.append(note)
                    if self.killed_at is not None and who not in self.stalls:
                        self.stalls[who] = time.monotonic() - max(sent, self.killed_at)
            except psycopg.Error as e:
                with self.lock:
                    self.errors[e.sqlstate or type(e).__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.2)
        if conn is not None:
            conn.close()


def timeline(log: str, since_wall: float) -> list[str]:
    out = []
    for line in log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) connmgr\.\w+ \w+ (host takeover: .*)", line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 - since_wall
            if t > -0.5:
                out.append(f"  {t:+8.3f}  {m.group(3)[len('host takeover: '):]}")
    return out


def report(life: Life, winner: str, log: str, kill_wall: float) -> None:
    stalls = sorted(life.stalls.values())
    print(f"\n== {life.name}: killed, {winner} took over ==")
    print("\n".join(timeline(log, kill_wall)))
    print(f"  acknowledged {len(life.acked)}; client errors {dict(life.errors) or 'none'}")
    if stalls:
        print(f"  stall p50 / max {stalls[len(stalls) // 2]:.2f} / {stalls[-1]:.2f} s ({len(stalls)} connections)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--transfers", type=int, default=2)
    ap.add_argument("--before", type=float, default=2.0, help="seconds of workload before each kill")
    ap.add_argument("--after", type=float, default=3.0, help="seconds of workload after each kill")
    args = ap.parse_args()
    lacking = netlab.missing() + ([] if etcd_binary() else ["etcd (apt-get install etcd-server)"])
    if lacking:
        print("the lab needs: " + "; ".join(lacking), file=sys.stderr)
        return 2
    base = temp_base_dir("host-twice-")
    try:
        with HostLab(base, accounts=ACCOUNTS) as lab:
            print("lab up; first life: host A is the primary", flush=True)
            first = Life(lab, "hosta", args.writers, args.transfers).start()
            time.sleep(args.before)
            first.killed_at = lab.kill_host_a()
            kill_a = time.time() - (time.monotonic() - first.killed_at)
            time.sleep(args.after)
            first.finish()
            report(first, "host B", lab.log("hostb"), kill_a)
            print("\nhost A comes back (rebooted) and is re-seeded as host B's secondary ...", flush=True)
            started = time.monotonic()
            for ms, event in lab.rejoin_host_a():
                print(f"  RESEED {float(ms):8.1f} ms  {event}")
            print(f"  host A's connmgr follows host B after {time.monotonic() - started:.1f} s")
            second = Life(lab, "hostb", args.writers, args.transfers).start()
            time.sleep(args.before)
            second.killed_at = lab.kill_host_b()
            kill_b = time.time() - (time.monotonic() - second.killed_at)
            time.sleep(args.after)
            second.finish()
            report(second, "host A", lab.log("hosta"), kill_b)
            notes = Counter(n for (n,) in lab.on_survivor("SELECT note FROM ledger", which="primary"))
            money = lab.on_survivor("SELECT sum(balance) FROM accounts", which="primary")[0][0]
    except KeyboardInterrupt:
        print("interrupted: torn down", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    acked = first.acked + second.acked
    lost = [n for n in acked if n not in notes]
    duplicated = [n for n, k in notes.items() if k > 1]
    print("\n== proof (read on host A's database, the primary again) ==")
    print(f"  acknowledged           {len(first.acked)} in host A's life, {len(second.acked)} in host B's")
    print(f"  lost / duplicated      {len(lost)} / {len(duplicated)} {lost[:5] or ''}{duplicated[:5] or ''}")
    print(f"  money                  {money} of {ACCOUNTS * 1000}")
    ok = not lost and not duplicated and money == ACCOUNTS * 1000 and second.stalls
    print(f"  verdict                {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
