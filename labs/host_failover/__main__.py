"""The host-failover lab in one command (issue 14): ``sudo python -m labs.host_failover``.

Builds the lab (connmgr/embedded/host_lab.py: five network namespaces, etcd in three of
them, the pair across hosta and hostb, a connmgr process per host), runs a workload from
the client namespace -- idle sessions carrying settings and prepared statements, and
autocommit writers that record every insert the database acknowledged -- kills host A
(router port down + SIGKILL of everything in it, at once), and prints the timeline and
the proof read on host B's database: every acknowledged insert present exactly once,
client errors by SQLSTATE, and every connection's stall. Everything is torn down at the
end, also on Ctrl-C or a failure.

What moves today: sessions idle between transactions (and requests they send after the
death). A session caught with a transaction open or a request in flight ends with a
clean 08006; the writers reconnect and go on, and the proof shows nothing acknowledged
was lost or written twice.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

from connmgr.embedded import netlab


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m labs.host_failover", description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=6, help="idle sessions (settings + prepared statements)")
    ap.add_argument("--writers", type=int, default=3, help="autocommit writers")
    ap.add_argument("--before", type=float, default=2.0, help="seconds of workload before the kill")
    ap.add_argument("--after", type=float, default=4.0, help="seconds of workload after the kill")
    ap.add_argument("--mode", default="two-phase", choices=("one-phase", "two-phase"))
    ap.add_argument("--keep", action="store_true", help="keep the lab's directory (logs, configs)")
    ap.add_argument("--move-transactions", action="store_true",
                    help="[host] move_transactions = true (open transactions replayed on host B)")
    args = ap.parse_args()
    lacking = netlab.missing()
    from connmgr.embedded.etcd_cluster import etcd_binary

    if etcd_binary() is None:
        lacking.append("etcd (apt-get install etcd-server)")
    if lacking:
        print("the lab needs: " + "; ".join(lacking), file=sys.stderr)
        return 2
    from connmgr.embedded.clusters import temp_base_dir
    from connmgr.embedded.host_lab import HostLab

    base = temp_base_dir("host-lab-")
    t0 = time.time()
    events: list[tuple[float, str]] = []

    def note(text: str) -> None:
        events.append((time.time(), text))
        print(f"[{time.time() - t0:7.3f}] {text}", flush=True)

    lab = HostLab(base, mode=args.mode, move_transactions=args.move_transactions)
    try:
        note("building the lab")
        lab.start()
        note("lab up: host A leads and serves the VIP")
        result = _run(lab, args, note)
    except KeyboardInterrupt:
        print("interrupted: tearing down", file=sys.stderr)
        return 130
    finally:
        b_log = lab.log("hostb")
        lab.close()
        if args.keep:
            print(f"the lab's directory (logs, configs): {base}")
        else:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    _report(result, events, b_log, t0)
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1


def _run(lab, args, note) -> dict:
    stop = threading.Event()
    acked: list[str] = []
    errors: Counter[str] = Counter()
    messages: list[str] = []
    stalls: dict[str, float] = {}
    lock = threading.Lock()
    killed_at: list[float] = []

    def writer(i: int) -> None:
        n = 0
        conn = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = lab.connect(autocommit=True)
                note_text = f"w{i}-{n}"
                t = time.time()
                conn.execute("INSERT INTO ledger (note) VALUES (%s)", (note_text,))
                with lock:
                    acked.append(note_text)
                    if killed_at and t < killed_at[0] < time.time():
                        stalls[f"writer {i}"] = time.time() - killed_at[0]
                n += 1
            except psycopg.Error as e:
                with lock:
                    errors[e.sqlstate or type(e).__name__] += 1
                    messages.append(f"writer {i}, {note_text}: {e.sqlstate} {str(e).splitlines()[0][:200]}")
                n += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    idle = []
    for i in range(args.idle):
        c = lab.connect(autocommit=True)
        c.execute(f"SET application_name = 'idle-{i}'")
        c.execute("SELECT balance FROM accounts WHERE id = %s", (i % 20 + 1,), prepare=True)
        idle.append(c)
    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(args.writers)]
    for t in threads:
        t.start()
    time.sleep(args.before)
    killed_at.append(lab.kill_host_a())
    kill_wall = time.time()
    note("host A killed: router port down + SIGKILL of everything in its namespace")
    kept = 0
    for i, c in enumerate(idle):
        try:
            t = time.time()
            ok = c.execute("SHOW application_name").fetchone() == (f"idle-{i}",)
            c.execute("SELECT balance FROM accounts WHERE id = %s", (i % 20 + 1,), prepare=True)
            stalls[f"idle {i}"] = max(0.0, time.time() - max(t, kill_wall))
            kept += ok
        except psycopg.Error as e:
            errors[e.sqlstate or type(e).__name__] += 1
    note(f"{kept} of {len(idle)} idle sessions continued with their state")
    time.sleep(args.after)
    stop.set()
    for t in threads:
        t.join(30)
    for c in idle:
        c.close()
    notes = [n for (n,) in lab.on_survivor("SELECT note FROM ledger")]
    counts = Counter(notes)
    lost = [n for n in acked if n not in counts]
    dup = [n for n, k in counts.items() if k > 1]
    return {"acked": len(acked), "lost": len(lost), "duplicated": len(dup), "errors": dict(errors),
            "idle_kept": kept, "idle": len(idle), "stalls": stalls, "killed_wall": kill_wall, "messages": messages}


def _report(r: dict, events, b_log: str, t0: float) -> None:
    kill = r["killed_wall"]
    print("\n== timeline (seconds from the kill) ==")
    rows = [(t - kill, f"lab: {text}") for t, text in events if t >= kill - 0.001]
    for line in b_log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) connmgr\.\w+ \w+ (host takeover: .*|.*leader key now.*)", line)
        if m:
            t = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1000
            if t >= kill - 1:
                rows.append((t - kill, "host B: " + m.group(2)))
    for dt, text in sorted(rows):
        print(f"  {dt:+8.3f}  {text}")
    print("\n== proof (read on host B's database) ==")
    print(f"  acknowledged inserts   {r['acked']}")
    print(f"  lost                   {r['lost']}")
    print(f"  duplicated             {r['duplicated']}")
    print(f"  idle sessions kept     {r['idle_kept']} of {r['idle']}")
    print(f"  client errors          {r['errors'] or 'none'}")
    for text in r["messages"][:10]:
        print(f"    {text}")
    stalls = sorted(r["stalls"].values())
    if stalls:
        print(f"  stall p50/max          {stalls[len(stalls) // 2]:.2f} s / {stalls[-1]:.2f} s ({len(stalls)} sessions)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
