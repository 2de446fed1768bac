"""The host-failover lab in one command (issue 14): ``sudo python -m labs.host_failover``.

Builds the lab (connmgr/embedded/host_lab.py: five network namespaces, etcd in three of
them, the pair across hosta and hostb, a connmgr process per host), runs a workload from
the client namespace -- transfers in explicit transactions, autocommit inserts, idle
sessions carrying settings and prepared statements (connmgr/embedded/host_campaign.py) --
kills host A (router port down + SIGKILL of everything in it, at once), and prints the
timeline and the proof read on host B's database: money conserved, every acknowledged
commit present exactly once, client errors by SQLSTATE, resets, stalls. Everything is torn
down at the end, also on Ctrl-C or a failure. ``labs/host_failover/campaign.py`` runs
many such trials and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from connmgr.embedded import netlab  # noqa: E402
from connmgr.embedded.timeline_image import INSTALL_HINT  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m labs.host_failover", description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=4, help="clients moving money in explicit transactions")
    ap.add_argument("--writers", type=int, default=2, help="autocommit writers")
    ap.add_argument("--idle", type=int, default=4, help="idle sessions (settings + prepared statements)")
    ap.add_argument("--after", type=float, default=3.0, help="seconds of workload after the kill")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mode", default="two-phase", choices=("one-phase", "two-phase"))
    ap.add_argument("--picture", metavar="PNG", help="also draw the timeline as an image (PNG; the plot extra)")
    ap.add_argument("--no-move-transactions", dest="move_transactions", action="store_false",
                    help="[host] move_transactions = false (sessions caught in a transaction end with 08006)")
    args = ap.parse_args()
    from connmgr.embedded.clusters import temp_base_dir
    from connmgr.embedded.etcd_cluster import etcd_binary
    from connmgr.embedded.host_campaign import run_trial, timeline_picture

    if args.picture and importlib.util.find_spec("matplotlib") is None:
        print(f"--picture needs matplotlib: {INSTALL_HINT}", file=sys.stderr)
        return 2
    lacking = netlab.missing() + ([] if etcd_binary() else ["etcd (apt-get install etcd-server)"])
    if lacking:
        print("the lab needs: " + "; ".join(lacking), file=sys.stderr)
        return 2
    base = temp_base_dir("host-lab-")
    print("building the lab, running the workload, killing host A ...", flush=True)
    try:
        r = run_trial(base, args.seed, transfers=args.transfers, writers=args.writers, idle=args.idle,
                      before=(2.0, 2.0), after=args.after, mode=args.mode,
                      move_transactions=args.move_transactions)  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted: torn down", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n== timeline (seconds from the kill) ==")
    print(f"  {0.0:+8.3f}  host A killed: router port down + SIGKILL of everything in its namespace")
    events: list[tuple[float, str]] = []
    for line in r.b_log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) connmgr\.\w+ \w+ (host takeover: .*)", line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 - r.killed_wall
            if t > -1:
                events.append((t, m.group(3)[len("host takeover: "):]))
                print(f"  {t:+8.3f}  host B: {events[-1][1]}")
    stalls = r.stalls
    print("\n== the picture ==")
    print(timeline_picture(events, stalls))
    if args.picture:
        from connmgr.embedded.timeline_image import host_takeover, render

        kinds = {"transfer": 0, "writer": 1, "idle": 2}  # lanes by kind, then number

        def order(name: str) -> tuple[int, int]:
            kind, _, number = name.partition(" ")
            return kinds.get(kind, 3), int(number) if number.isdigit() else 0

        lanes = {name: r.lanes[name] for name in sorted(r.lanes, key=order)}
        title = (f"Host A killed: host B takes over ({len(lanes)} client connections, stall p50"
                 f" {stalls[len(stalls) // 2]:.2f} s, max {stalls[-1]:.2f} s; {sum(r.errors.values())} client"
                 " errors)") if stalls else "Host A killed: host B takes over"  # fmt: skip
        print(f"\n  the picture, drawn: {render(host_takeover(events, lanes, title=title), args.picture)}")
    print("\n== proof (read on host B's database) ==")
    print(f"  acknowledged           {r.transfers} transfers, {r.inserts} inserts")
    print(f"  lost / duplicated      {len(r.lost)} / {len(r.duplicated)}")
    print(f"  money                  {r.money} of {r.money_expected}")
    print(f"  balances vs ledger     {'every account explained' if not r.accounts_off else r.accounts_off}")
    print(f"  idle sessions kept     {r.idle_kept} of {r.idle}")
    print(f"  resets seen            {r.resets}")
    print(f"  client errors          {dict(r.errors) or 'none'}")
    for text in r.messages[:10]:
        print(f"    {text}")
    if stalls:
        print(f"  stall p50 / max        {stalls[len(stalls) // 2]:.2f} s / {stalls[-1]:.2f} s ({len(stalls)} connections)")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
