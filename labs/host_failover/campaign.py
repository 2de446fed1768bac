"""Host-kill campaign (issue 14): ``sudo python labs/host_failover/campaign.py --trials 20``.

Every trial builds the lab afresh (connmgr/embedded/host_lab.py), runs a bank workload
(transfers in explicit transactions, autocommit inserts, idle sessions), kills host A at
a random moment and checks on host B's database (connmgr/embedded/host_campaign.py).
Prints one line per trial and the table: trials, acknowledged, lost, duplicated, money,
client errors by SQLSTATE, resets, stall p50/p99/max, detection and serving times.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from connmgr.embedded import netlab  # noqa: E402
from connmgr.embedded.clusters import temp_base_dir  # noqa: E402
from connmgr.embedded.etcd_cluster import etcd_binary  # noqa: E402
from connmgr.embedded.host_campaign import STEP_PHRASES, run_trial  # noqa: E402


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--transfers", type=int, default=4)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--idle", type=int, default=3)
    ap.add_argument("--mode", default="two-phase", choices=("one-phase", "two-phase"))
    ap.add_argument("--logs", type=Path, help="log every statement host B's database runs, and write host B's connmgr and"
                    " database logs of every failed trial here")
    ap.add_argument("--no-move-transactions", dest="move_transactions", action="store_false",
                    help="[host] move_transactions = false (sessions caught in a transaction end with 08006)")
    args = ap.parse_args()
    lacking = netlab.missing() + ([] if etcd_binary() else ["etcd (apt-get install etcd-server)"])
    if lacking:
        print("the lab needs: " + "; ".join(lacking), file=sys.stderr)
        return 2
    results = []
    for i in range(args.trials):
        base = temp_base_dir("host-trial-")
        try:
            r = run_trial(base, args.seed * 1000 + i, transfers=args.transfers, writers=args.writers, idle=args.idle,
                          mode=args.mode, move_transactions=args.move_transactions,
                          log_statements=args.logs is not None)  # fmt: skip
        finally:
            shutil.rmtree(base, ignore_errors=True)
        results.append(r)
        print(f"trial {i + 1:3d} seed {r.seed}: {'ok  ' if r.ok else 'FAIL'} transfers {r.transfers} inserts"
              f" {r.inserts} lost {len(r.lost)} dup {len(r.duplicated)} money {r.money}/{r.money_expected}"
              f" errors {dict(r.errors) or '-'} resets {r.resets} idle {r.idle_kept}/{r.idle}"
              f" serving +{r.serving or float('nan'):.2f}s", flush=True)  # fmt: skip
        for text in r.messages[:12]:
            print(f"      {text}")
        if r.lost:
            print(f"      lost: {r.lost[:10]}")
        if r.duplicated:
            print(f"      duplicated: {r.duplicated[:10]}")
        if r.accounts_off:
            print(f"      accounts whose balance the ledger does not explain (account, off by): {r.accounts_off}")
        print_workload(r.workload)
        if not r.ok and args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            path = args.logs / f"trial-{r.seed}-hostb.log"
            path.write_text(r.b_log)
            (args.logs / f"trial-{r.seed}-survivor.log").write_text(r.survivor_log)
            if r.client_frames:
                from scapy.all import Ether, wrpcap

                wrpcap(str(args.logs / f"trial-{r.seed}-client.pcap"), [Ether(f) for f in r.client_frames])
            print(f"      host B's logs: {path}, {path.with_name(f'trial-{r.seed}-survivor.log')}"
                  f" (killed at {r.killed_wall:.3f})")  # fmt: skip
    stalls = sorted(s for r in results for s in r.stalls)
    errors: Counter = Counter()
    for r in results:
        errors.update(r.errors)
    det = sorted(r.detection for r in results if r.detection is not None)
    srv = sorted(r.serving for r in results if r.serving is not None)
    print("\n| trials | ok | acknowledged | lost | duplicated | money conserved | client errors | resets |"
          " stall p50 / p99 / max | leader key (p50) | serving (p50) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(results)} | {sum(r.ok for r in results)} | {sum(r.transfers + r.inserts for r in results)} |"
          f" {sum(len(r.lost) for r in results)} | {sum(len(r.duplicated) for r in results)} |"
          f" {sum(r.money == r.money_expected for r in results)}/{len(results)} | {dict(errors) or 0} |"
          f" {sum(r.resets for r in results)} | {pct(stalls, .5):.2f} / {pct(stalls, .99):.2f} /"
          f" {stalls[-1] if stalls else float('nan'):.2f} s | +{pct(det, .5):.2f} s | +{pct(srv, .5):.2f} s |")  # fmt: skip
    print("\nhost B's steps, seconds from the kill (p50 / max over the trials):\n")
    print("| " + " | ".join(name for name, _ in STEP_PHRASES) + " |")
    print("|" + "---|" * len(STEP_PHRASES))
    cells = []
    for name, _ in STEP_PHRASES:
        ts = sorted(r.steps[name] for r in results if name in r.steps)
        cells.append(f"{pct(ts, .5):.2f} / {ts[-1]:.2f}" if ts else "-")
    print("| " + " | ".join(cells) + " |")
    workload_table([r.workload for r in results])
    return 0 if all(r.ok for r in results) else 1


def print_workload(w) -> None:
    """One trial's reading, COPY and LISTEN clients (connmgr/embedded/host_workload.py)."""
    errors = {f"{kind} {state}": n for (kind, state), n in sorted(w.errors.items())}
    print(f"      reads/COPY/LISTEN: done {dict(w.done) or '-'} across the kill {dict(w.spanned) or '-'}"
          f" raw rounds cut {[f'{a}/{b}' for a, b in w.cut] or '-'} copy in at the kill"
          f" {dict(w.copy_in_at_kill) or '-'} errors {errors or '-'}"
          f" LISTEN {'-' if w.listen is None else 'ok' if w.listen else 'MISSED'}")  # fmt: skip
    for text in (*w.wrong[:6], *w.copy_lost[:4], *w.copy_partial[:4], *([w.listen_detail] if w.listen_detail else [])):
        print(f"      {text}")


def workload_table(ws: list) -> None:
    """The reading, COPY and LISTEN clients over all trials: per kind, operations complete
    and correct (of which in flight at the kill), errors by SQLSTATE, wrong results."""
    done, spanned, errors = Counter(), Counter(), Counter()
    for w in ws:
        done.update(w.done)
        spanned.update(w.spanned)
        errors.update(w.errors)
    wrong = Counter(text.split(" (")[0].rstrip("0123456789 ") for w in ws for text in w.wrong)
    print("\n| client | correct (in flight at the kill) | errors by SQLSTATE | wrong |")
    print("|---|---|---|---|")
    for kind in ("reader", "raw", "copy out", "copy in"):
        errs = {state: n for (k, state), n in errors.items() if k == kind}
        print(f"| {kind} | {done[kind]} ({spanned[kind]}) | {errs or 0} | {wrong[kind]} |")
    cut = [c for w in ws for c in w.cut]
    print(f"| raw rounds cut by the kill, continued byte-exact | {len(cut)} | | |")
    at_kill = Counter()
    for w in ws:
        at_kill.update(w.copy_in_at_kill)
    print(f"| copy in clients at the kill: in COPY IN / at COMMIT / between | {at_kill['copy']} /"
          f" {at_kill['commit']} / {at_kill['other']} | | |")  # fmt: skip
    print(f"| copy in: acknowledged missing / present in part | {sum(len(w.copy_lost) for w in ws)} /"
          f" {sum(len(w.copy_partial) for w in ws)} | | |")  # fmt: skip
    listened = [w.listen for w in ws if w.listen is not None]
    print(f"| LISTEN: notified after the kill | {sum(listened)}/{len(listened)} | | |")


if __name__ == "__main__":
    sys.exit(main())
