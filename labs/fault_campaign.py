"""Failover fault campaign, long form: N trials of connmgr/embedded/fault_campaign.py (a fresh pair
per trial, the primary postmaster killed with SIGKILL at a random moment), then a table:
trials, client errors by SQLSTATE, lost and duplicated commits, detection time and the
stall of every moved session (p50/p99/max).

    python labs/fault_campaign.py --trials 100 [--clients 6] [--failback] [--kinds bank,new-schema,...]
                                  [--workers N] [--json]

``--kinds``: the trial kinds to rotate through (connmgr/embedded/fault_campaign.py: bank, new-schema,
serial, sync-off, large; default all of them).

``--workers N``: the primary connmgr runs N worker processes (``[server] workers``; its
figures then come from its metrics and log, and the stalls are each worker's longest).

``--failback``: every trial then restarts the killed primary under load and waits for
connmgr to re-seed it, switch the sessions home and re-seed the other side; the proof is
made on the original primary and both databases must be equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connmgr.embedded.clusters import stop_leftovers, temp_base_dir  # noqa: E402
from connmgr.embedded.fault_campaign import KINDS, TrialResult, run_trial  # noqa: E402
from connmgr.metrics import percentile  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--failback", action="store_true", help="restart the old primary and go home (failback = return)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="trial kinds to rotate through")
    ap.add_argument("--workers", type=int, default=1, help="the primary connmgr's [server] workers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in KINDS:
            ap.error(f"unknown trial kind {kind!r} (one of {', '.join(KINDS)})")
    base = temp_base_dir("connmgr-campaign-")
    results = []
    try:
        for i in range(args.trials):
            results.append(run_trial(base / f"t{i}", seed=args.seed + i, clients=args.clients, failback=args.failback,
                                     kind=kinds[i % len(kinds)], workers=args.workers))
            _report(i, args.trials, results[-1])
    finally:
        stop_leftovers(base)  # an interrupted trial's servers
        shutil.rmtree(base, ignore_errors=True)
    return _summary(results, args)


def _report(i: int, trials: int, r: TrialResult) -> None:
    state = "ok" if r.ok else "FAILED"
    print(f"trial {i + 1:4d}/{trials} seed {r.seed} {r.kind}: {state}  kill at {r.kill_after:.2f}s  moved {r.moved}"
          f"  acked-by-marker {r.commits_acknowledged}  replayed {r.replayed}  held {r.held}/{r.held_dropped}"
          f"  errors {dict(r.errors)}"
          f"{f'  home again {r.failback_seconds:.2f}s' if r.failback_seconds is not None else ''}"
          f"{'  ' + r.failed if r.failed else ''}", file=sys.stderr, flush=True)  # fmt: skip
    if r.ok:
        return
    print(f"  lost {r.lost} {r.missing}  duplicated {r.duplicated}  40001 but present {r.rolled_back_present}"
          f"  conserved {r.conserved}  unexplained balances {r.unexplained}  replicas equal {r.replicas_equal}",
          file=sys.stderr)  # fmt: skip
    for t, what in r.journal:
        print(f"  {t:+9.3f}s  {what}", file=sys.stderr)
    for text in r.error_texts:
        print(f"  {text}", file=sys.stderr, flush=True)


def _summary(results: list[TrialResult], args: argparse.Namespace) -> int:
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    stalls = [s for r in results for s in r.stalls]
    detect = [r.detect_seconds for r in results if r.detect_seconds is not None]
    summary = {
        "trials": len(results),
        "trials_ok": sum(r.ok for r in results),
        "ok_by_kind": {k: f"{sum(r.ok for r in results if r.kind == k)}/{sum(r.kind == k for r in results)}"
                       for k in dict.fromkeys(r.kind for r in results)},
        "errors_by_sqlstate": dict(errors),
        "rolled_back_40001_by_reason": dict(sum((r.rolled_back for r in results), Counter())),
        "sessions_not_moved": dict(sum((r.sessions_failed for r in results), Counter())),
        "lost": sum(r.lost for r in results),
        "duplicated": sum(r.duplicated for r in results),
        "rolled_back_but_present": sum(len(r.rolled_back_present) for r in results),
        "not_conserved": sum(not r.conserved for r in results),
        "transfers_acked": sum(r.transfers_acked for r in results),
        "ledger_rows_acked": sum(r.ledger_acked for r in results),
        "sessions_moved": sum(r.moved for r in results),
        "commits_acknowledged_by_marker": sum(r.commits_acknowledged for r in results),
        "transactions_replayed": sum(r.replayed for r in results),
        "sessions_held_in_freeze": sum(r.held for r in results),
        "held_replies_dropped": sum(r.held_dropped for r in results),
        "import_queue_not_replayable": sum(r.not_replayable for r in results),
        "detect_ms": {q: round(percentile(detect, v) * 1e3, 1) for q, v in (("p50", .5), ("p99", .99), ("max", 1))},
        "stall_ms": {q: round(percentile(stalls, v) * 1e3, 1) for q, v in (("p50", .5), ("p99", .99), ("max", 1))},
    }
    if args.failback:
        home = [r.failback_seconds for r in results if r.failback_seconds is not None]
        summary["failed_back"] = len(home)
        summary["replicas_unequal"] = sum(r.replicas_equal is False for r in results)
        summary["restart_to_home_s"] = {q: round(percentile(home, v), 2) for q, v in (("p50", .5), ("max", 1))}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(len(k) for k in summary)
        for k, v in summary.items():
            print(f"{k:<{width}}  {v}")
    return 0 if summary["trials_ok"] == summary["trials"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
