"""The summary of a benchmark: per workload and target the median over rounds, the ratio to
``direct`` and the spread, printed as one table (with rich when it is installed)."""

from __future__ import annotations

import statistics
from collections.abc import Container
from dataclasses import dataclass

from .pgbench import Run

#: the target every ratio is taken against
REFERENCE = "direct"


@dataclass
class Row:
    workload: str
    target: str
    tps: float | None
    latency_ms: float | None
    ratio: float | None
    spread: float | None
    runs: int
    failures: int
    note: str = ""


def summarize(runs: list[Run], wl_names: list[str], target_names: list[str]) -> list[Row]:
    """Median over rounds per (workload, target), the ratio to REFERENCE's median, the
    spread ((max - min) / median of tps), and a note: the first failure, then every
    distinct note of the runs."""
    rows = []
    for wl in wl_names:
        direct = [r.tps for r in runs if r.workload == wl and r.target == REFERENCE and r.ok]
        direct_tps = statistics.median(direct) if direct else None
        for name in target_names:
            mine = [r for r in runs if r.workload == wl and r.target == name]
            if not mine:
                continue
            good = [r for r in mine if r.ok]
            failed = [r for r in mine if not r.ok]
            row = Row(wl, name, None, None, None, None, len(mine), len(failed))
            if good:
                tps = [r.tps for r in good]
                row.tps = statistics.median(tps)
                row.latency_ms = statistics.median(r.latency_ms for r in good)
                if len(tps) > 1 and row.tps:
                    row.spread = (max(tps) - min(tps)) / row.tps
                if direct_tps:
                    row.ratio = row.tps / direct_tps
            if failed:
                prefix = "" if not good else f"{len(failed)}/{len(mine)} runs failed: "
                row.note = prefix + (failed[0].error or "")
            elif any(r.failed_transactions for r in good):
                row.note = "some transactions failed"
            notes = list(dict.fromkeys(n for r in mine for n in r.notes))
            if notes:
                row.note = "; ".join(filter(None, [row.note, *notes]))
            rows.append(row)
    return rows


HEADERS = ["workload", "target", "tps", "lat ms", f"× {REFERENCE}", "spread", "note"]
RIGHT_ALIGNED = {2, 3, 4, 5}


def row_cells(row: Row) -> list[str]:
    if row.tps is None:
        return [row.workload, row.target, "FAILED", "-", "-", "-", row.note]
    return [
        row.workload,
        row.target,
        f"{row.tps:,.0f}",
        f"{row.latency_ms:.3f}",
        f"{row.ratio:.2f}×" if row.ratio is not None else "-",
        f"{row.spread * 100:.1f}%" if row.spread is not None else "-",
        row.note,
    ]


def table_lines(headers: list[str], cells: list[list[str]], right: Container[int],
                ragged_last: bool = False) -> list[str]:  # fmt: skip
    """Plain text table: the header line, a rule, a line per row of ``cells``; columns in
    ``right`` right-aligned, the others left-aligned. ``ragged_last``: the last column (a
    long note) is not padded."""
    padded = headers[:-1] if ragged_last else headers
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(padded)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=False))
        ]
        return "  ".join(parts + values[len(widths):]).rstrip()

    rule = ["-" * w for w in widths] + (["-" * len(headers[-1])] if ragged_last else [])
    return [line(headers), line(rule), *(line(c) for c in cells)]


def print_table(rows: list[Row], title: str) -> None:
    """Print the summary with rich when it is installed, else as plain aligned text; a
    section (a blank line) per workload."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print_plain_table(rows, title)
        return
    table = Table(title=title)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="right" if i in RIGHT_ALIGNED else "left", overflow="fold")
    previous = None
    for row in rows:
        if previous is not None and row.workload != previous:
            table.add_section()
        previous = row.workload
        style = "red" if row.tps is None else None
        table.add_row(*row_cells(row), style=style)
    Console().print(table)


def print_plain_table(rows: list[Row], title: str) -> None:
    lines = table_lines(HEADERS, [row_cells(r) for r in rows], RIGHT_ALIGNED, ragged_last=True)
    print(title)
    print(lines[0])
    print(lines[1])
    previous = None
    for row, text in zip(rows, lines[2:], strict=True):
        if previous is not None and row.workload != previous:
            print()
        previous = row.workload
        print(text)
