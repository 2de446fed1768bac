"""The partition table (issue 14): ``sudo python labs/host_failover/partitions.py``.

Each scenario builds the lab afresh, cuts part of its network (a link, a host, the
witness, host A off etcd while its clients still reach it, host A's death) and watches
from the client namespace who answers ARP for the VIP every 50 ms, from inside host A and
host B which connmgr accepts connections on the VIP every 50 ms, and one session asking
every 100 ms which database answers it (connmgr/embedded/host_partitions.py). Prints one
row per scenario: whether host B took over, host A stepped down, the ARP answerers over
time, requests two hosts answered, the connmgrs accepting over time, moments two
accepted, the session's answers and its longest wait.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from connmgr.embedded import netlab  # noqa: E402
from connmgr.embedded.clusters import temp_base_dir  # noqa: E402
from connmgr.embedded.etcd_cluster import etcd_binary  # noqa: E402
from connmgr.embedded.host_partitions import SCENARIOS, run_scenario  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--after", type=float, default=6.0, help="seconds watched after the cut")
    ap.add_argument("--only", help="run the scenarios whose name contains this")
    args = ap.parse_args()
    lacking = netlab.missing() + ([] if etcd_binary() else ["etcd (apt-get install etcd-server)"])
    if lacking:
        print("the lab needs: " + "; ".join(lacking), file=sys.stderr)
        return 2
    rows = []
    for scenario in SCENARIOS:
        if args.only and args.only not in scenario.name:
            continue
        print(f"{scenario.name}: {scenario.expected} ...", flush=True)
        base = temp_base_dir("host-partition-")
        try:
            r = run_scenario(base, scenario, after=args.after)
        except KeyboardInterrupt:
            print("interrupted: torn down", file=sys.stderr)
            return 130
        finally:
            shutil.rmtree(base, ignore_errors=True)
        rows.append(r)
        print(f"  {'ok' if r.ok else 'FAIL'}: takeover {r.took_over}, A stepped down {r.a_stepped_down},"
              f" ARP {r.arp}, two answers {r.overlaps}, accepting {r.accepting} ({r.accepting_summary()}),"
              f" two accepting {r.accept_overlaps}, session {r.probe}", flush=True)  # fmt: skip
        for note in r.notes:
            print(f"    {note}")
    print("\n| scenario | expected | host B took over | host A stepped down | who answered ARP for the VIP"
          " (from the cut) | requests two hosts answered | which connmgr accepted on the VIP (from the cut) |"
          " moments two accepted | the session (every 100 ms) | its longest wait | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.scenario.name} | {r.scenario.expected} | {'yes' if r.took_over else 'no'} |"
              f" {'yes' if r.a_stepped_down else 'no'} | {r.arp} | {r.overlaps} |"
              f" {r.accepting_summary()} ({r.accepting}) | {r.accept_overlaps} | {r.probe} |"
              f" {r.longest_wait:.2f} s | {'ok' if r.ok else 'FAIL'} |")  # fmt: skip
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
