"""The activation skew of policy versions between connmgrs (issue 16, seed 001).

Two ``connmgr serve`` processes in front of one local Postgres (a trust cluster this
script creates), the policy store in it; connmgr B runs under libfaketime with its clock
``--ahead`` seconds ahead (default 7). Each trial pushes a new version with the real
``connmgr policy push``; every version rewrites ``SELECT policy_probe()`` to ``SELECT
<its number>``, and one client per connmgr polls it without pause. The moment each
connmgr switched lies between the last reply of the old version and the first of the new
one (the "window"); the skew is the distance between the two windows' midpoints. Prints a
row per trial and the summary against the target (10 ms): a connmgr that ignored its
clock offset would switch ``--ahead`` seconds early. Meanwhile four more clients run
transactions of two probes each on connmgr A without pause: none may see two versions
(a connmgr that switched sessions inside their transactions is caught by about every
other trial: a transaction straddles the switch when its second probe is its session's
first request after the activation).

    python labs/policy_skew.py [--trials 10] [--interval 1] [--ahead 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from connmgr.embedded.clusters import Cluster, temp_base_dir  # noqa: E402
from connmgr.embedded.harness import SupervisedConnmgr  # noqa: E402

TARGET_MS = 10.0
_COUNT = threading.Lock()


def policy_text(number: int) -> str:
    return (f'[[class]]\nname = "probe"\nusers = ["postgres"]\n'
            f'[[class.rewrite]]\nmatch = "SELECT policy_probe()"\nreplace = "SELECT {number}"\n')  # fmt: skip


def start_connmgr(conf: Path, ahead: int) -> SupervisedConnmgr:
    """``connmgr serve -c CONF``, its clock ``ahead`` seconds ahead under faketime."""
    cm = SupervisedConnmgr(conf, password="", dbname="postgres", launcher=["faketime", "-f", f"+{ahead}s"] if ahead else ())
    try:
        return cm.start()
    except OSError as e:
        raise SystemExit(str(e)) from None


def probe(c: psycopg.Connection) -> int:
    try:
        return c.execute("SELECT policy_probe()", prepare=False).fetchone()[0]
    except psycopg.errors.UndefinedFunction:
        return 0


def watch(c: psycopg.Connection, old: int, new: int, out: dict, key: str, deadline: float) -> None:
    last_old = None
    polls = 0
    while time.monotonic() < deadline:
        sent = time.time()
        v = probe(c)
        got = time.time()
        polls += 1
        if v == old:
            last_old = sent
        elif v == new and last_old is not None:
            out[key] = (last_old, got, polls)
            return


def transactions(c: psycopg.Connection, stop: threading.Event, out: dict) -> None:
    """Transactions of two probes each, without pause, through the switch: each must see
    one version (a transaction begun under n finishes under n)."""
    while not stop.is_set():
        with c.transaction():
            first = probe(c)
            second = probe(c)
        with _COUNT:
            out["transactions"] = out.get("transactions", 0) + 1
            if first != second:
                out["mixed"] = out.get("mixed", 0) + 1


def push(conninfo: str, directory: Path, number: int, interval: float) -> None:
    path = directory / f"v{number}.toml"
    path.write_text(policy_text(number))
    r = subprocess.run([sys.executable, "-m", "connmgr", "policy", "push", str(path), conninfo, "--interval",
                        str(interval)], cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    if r.returncode:
        raise SystemExit(f"connmgr policy push failed: {r.stderr}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between activations (default 1)")
    ap.add_argument("--ahead", type=int, default=7, help="seconds connmgr B's clock is ahead (default 7)")
    args = ap.parse_args()
    if shutil.which("faketime") is None:
        raise SystemExit("needs libfaketime: apt install faketime")
    base = temp_base_dir("connmgr-skew-")
    work = Path(tempfile.mkdtemp(prefix="connmgr-skew-work-"))
    cluster = Cluster.create(base, "skew", host_auth="trust")
    fleet: list[SupervisedConnmgr] = []
    rows = []
    try:
        cluster.start()
        conninfo = f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres"
        push(conninfo, work, 1, args.interval)
        for name, ahead in (("a", 0), ("b", args.ahead)):
            conf = work / f"{name}.toml"
            conf.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\nshutdown_timeout = 2\n'
                            f'[primary]\nhost = "127.0.0.1"\nport = {cluster.port}\n'
                            f'[policy]\nstore_poll = 0.2\nmember = "{name}"\n')  # fmt: skip
            fleet.append(start_connmgr(conf, ahead))
        clients = [cm.connect() for cm in fleet]
        mixers = [fleet[0].connect() for _ in range(4)]
        deadline = time.monotonic() + 10 * args.interval + 20
        while not all(probe(c) == 1 for c in clients):
            if time.monotonic() > deadline:
                raise SystemExit("version 1 did not become active on both")
            time.sleep(0.05)
        print(f"{'trial':>5} {'version':>7} {'skew ms':>8} {'window a ms':>11} {'window b ms':>11} {'polls a':>8}"
              f" {'polls b':>8} {'tx':>6} {'mixed':>5}")  # fmt: skip
        for trial in range(1, args.trials + 1):
            old, new = trial, trial + 1
            flips: dict = {}
            end = time.monotonic() + 4 * args.interval + 15
            threads = [threading.Thread(target=watch, args=(c, old, new, flips, k, end))
                       for c, k in zip(clients, "ab", strict=True)]  # fmt: skip
            stop, mixed = threading.Event(), {}
            threads += [threading.Thread(target=transactions, args=(m, stop, mixed)) for m in mixers]
            for t in threads:
                t.start()
            push(conninfo, work, new, args.interval)
            for t in threads[:2]:
                t.join()
            stop.set()
            for t in threads[2:]:
                t.join()
            if set(flips) != {"a", "b"}:
                raise SystemExit(f"trial {trial}: version {new} did not switch on both: {flips}")
            (a0, a1, pa), (b0, b1, pb) = flips["a"], flips["b"]
            skew = abs((a0 + a1) / 2 - (b0 + b1) / 2) * 1000
            rows.append((skew, (a1 - a0) * 1000, (b1 - b0) * 1000, mixed.get("transactions", 0), mixed.get("mixed", 0)))
            print(f"{trial:5d} {new:7d} {skew:8.2f} {(a1 - a0) * 1000:11.2f} {(b1 - b0) * 1000:11.2f} {pa:8d} {pb:8d}"
                  f" {rows[-1][3]:6d} {rows[-1][4]:5d}", flush=True)  # fmt: skip
        for c in [*clients, *mixers]:
            c.close()
    finally:
        for cm in fleet:
            cm.stop()
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    skews = [r[0] for r in rows]
    worst = max(max(r[0] + r[1] / 2 + r[2] / 2 for r in rows), 0.0)
    print(f"\nskew over {len(rows)} trials: median {statistics.median(skews):.2f} ms, max {max(skews):.2f} ms"
          f" (bounded by the windows: at most {worst:.2f} ms); target {TARGET_MS:g} ms;"
          f" connmgr b's clock {args.ahead} s ahead ({args.ahead * 1000 / TARGET_MS:.0f}x the target)")  # fmt: skip
    print(f"transactions of two statements through the switches: {sum(r[3] for r in rows)},"
          f" under a mixture of versions: {sum(r[4] for r in rows)}")  # fmt: skip
    return 0 if max(skews) <= TARGET_MS and not sum(r[4] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
