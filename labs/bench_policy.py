"""The policy's added latency per statement, cached and uncached (issue 16).

Decides a set of statements for a client class, in-process, as the guard does for each
Query (shadow/policy/guard.py ``decide``), and prints a table: microseconds per statement

* ``uncached``  every cache empty: split, classify, parse, resolve against the catalog,
                trace the outputs (a class with masks), check;
* ``by shape``  the same statement's shape seen before with other values (a tokenization
                and a lookup);
* ``by values`` a text that differs only in its numbers (a regular expression and a
                lookup; what pgbench's select-only costs);
* ``by text``   the very same text again (one lookup).

for three classes (refuses objects; masks a column the statements do not read; masks
one they read), against the cost of doing nothing (a dict lookup), and the ratio of each
to a round trip measured by ``labs/bench_proxy.py`` is left to that benchmark.

    python labs/bench_policy.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shadow.policy import decision as decision_mod  # noqa: E402
from shadow.policy import guard as guard_mod  # noqa: E402
from shadow.policy.catalog import Catalog  # noqa: E402
from shadow.policy.rules import parse_policy  # noqa: E402

STATEMENTS = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 48213",
    "UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 981",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 981, -1234, CURRENT_TIMESTAMP)",
    "SELECT a.aid, a.abalance, b.bbalance FROM pgbench_accounts a JOIN pgbench_branches b ON b.bid = a.bid"
    " WHERE a.aid IN (1, 2, 3) AND b.bid = 1",
    "WITH t AS (SELECT bid, sum(abalance) AS s FROM pgbench_accounts GROUP BY bid) SELECT * FROM t WHERE s > 0",
    "SELECT count(*) FROM pgbench_tellers t, LATERAL (SELECT max(delta) FROM pgbench_history h"
    " WHERE h.tid = t.tid) m",
]
POLICIES = {
    "refuses objects": '[[class]]\nname = "r"\nrefuse_objects = ["secret.*", "function:query_to_xml"]\n',
    "masks, not read": '[[class]]\nname = "m"\n[[class.mask]]\ncolumn = "pgbench_accounts.filler"\nmask = "full"\n',
    "masks a column read": '[[class]]\nname = "m"\n[[class.mask]]\ncolumn = "pgbench_accounts.abalance"\n'
                           'mask = "full"\nallow_predicates = true\n',
}
COLUMNS = {
    "pgbench_accounts": [("aid", 23), ("bid", 23), ("abalance", 23), ("filler", 1042)],
    "pgbench_branches": [("bid", 23), ("bbalance", 23), ("filler", 1042)],
    "pgbench_tellers": [("tid", 23), ("bid", 23), ("tbalance", 23), ("filler", 1042)],
    "pgbench_history": [("tid", 23), ("bid", 23), ("aid", 23), ("delta", 23), ("mtime", 1114), ("filler", 1042)],
}


def catalog() -> Catalog:
    rows = [("r", "public", t, None) for t in COLUMNS]
    cols = [("public", t, c, oid) for t, cs in COLUMNS.items() for c, oid in cs]
    return Catalog.from_rows(rows, cols)


def clear() -> None:
    guard_mod._BY_TEXT.clear()
    guard_mod._BY_VALUES.clear()
    decision_mod._BY_SHAPE.clear()


def other_values(text: str, n: int) -> str:
    return re.sub(r"(?<![A-Za-z0-9_.])[0-9]+", lambda m: str(int(m.group(0)) + n), text)


def per_statement(cls, cat, texts: list[bytes], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            guard_mod.decide(cls, cat, text)
    return (time.perf_counter() - start) / (repeat * len(texts)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    cat = catalog()
    base = [s.encode() for s in STATEMENTS]
    lookup = {t: t for t in base}
    start = time.perf_counter()
    for _ in range(args.repeat * 10):
        for t in base:
            lookup.get(t)
    nothing = (time.perf_counter() - start) / (args.repeat * 10 * len(base)) * 1e6
    print(f"{'class':22} {'uncached':>10} {'by shape':>10} {'by values':>10} {'by text':>10}   (µs per statement)")
    for name, text in POLICIES.items():
        cls = parse_policy(text).classes[0]
        uncached = []
        for _ in range(max(args.repeat // 20, 3)):
            clear()
            uncached.append(per_statement(cls, cat, base, 1))
        clear()
        per_statement(cls, cat, base, 1)
        shape_texts = [other_values(s, 7).replace(" = ", " =  ", 1).encode() for s in STATEMENTS]  # (new text)
        shape = per_statement(cls, cat, shape_texts, 1)
        value_texts = [[other_values(s, 100 + k).encode() for s in STATEMENTS] for k in range(args.repeat)]
        clear()
        per_statement(cls, cat, base, 1)
        start = time.perf_counter()
        for texts in value_texts:
            for t in texts:
                guard_mod.decide(cls, cat, t)
        values = (time.perf_counter() - start) / (len(value_texts) * len(base)) * 1e6
        same = per_statement(cls, cat, base, args.repeat)
        uncached.sort()
        print(f"{name:22} {uncached[len(uncached) // 2]:10.1f} {shape:10.1f} {values:10.1f} {same:10.2f}")
    print(f"{'(a dict lookup)':22} {'':10} {'':10} {'':10} {nothing:10.2f}")


if __name__ == "__main__":
    main()
