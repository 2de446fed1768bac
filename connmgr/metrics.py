"""Counters, gauges and a latency histogram, rendered for Prometheus.

The hot path never touches a shared structure per message: each client connection counts
its own bytes and messages in plain attributes (see :class:`ConnStats`), and a scrape adds
the live connections to the totals of the closed ones. Events that are rare (a connection,
an error, an authentication failure) are counted directly here.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

#: request latency buckets in seconds (ReadyForQuery after a Query or Sync)
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)


class Histogram:
    """Fixed-bucket histogram (cumulative only when rendered)."""

    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def merge(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.total += other.total
        self.count += other.count

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (0 when empty)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return self.buckets[i] if i < len(self.buckets) else float("inf")
        return float("inf")


@dataclass(slots=True)
class ConnStats:
    """Per-connection counters, bumped on the hot path without any lookup."""

    bytes_from_client: int = 0
    bytes_to_client: int = 0
    messages_from_client: int = 0
    messages_to_client: int = 0
    requests: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def add(self, other: ConnStats) -> None:
        self.bytes_from_client += other.bytes_from_client
        self.bytes_to_client += other.bytes_to_client
        self.messages_from_client += other.messages_from_client
        self.messages_to_client += other.messages_to_client
        self.requests += other.requests
        self.latency.merge(other.latency)


@dataclass
class Metrics:
    started: float = field(default_factory=time.time)
    clients_accepted: int = 0
    clients_rejected: Counter = field(default_factory=Counter)  # reason -> n
    client_errors: Counter = field(default_factory=Counter)  # sqlstate -> n
    backend_connects: int = 0
    backend_connect_errors: int = 0
    cancels: int = 0
    auth_failures: int = 0
    #: database -> whether its sessions are marked (App.markers_enabled)
    marker_databases: dict = field(default_factory=dict)
    #: purge markers that wrote their row (writing transactions marked)
    markers_written: int = 0
    #: DDL statements captured for the secondary, and DDL that could not be
    ddl_captured: int = 0
    ddl_not_captured: int = 0
    synchronous_commit_overridden: int = 0
    closed: ConnStats = field(default_factory=ConnStats)

    def connection_closed(self, stats: ConnStats) -> None:
        self.closed.add(stats)

    def totals(self, live: Iterable[ConnStats]) -> ConnStats:
        t = ConnStats()
        for s in (self.closed, *live):
            t.add(s)
        return t

    def render_prometheus(self, live: list[ConnStats], gauges: dict[str, float],
                          labeled: dict[str, tuple[str, str, dict[str, float]]] | None = None) -> str:  # fmt: skip
        """The text exposition format (version 0.0.4). ``labeled``: counter name ->
        (label name, help, {label value: count})."""
        t = self.totals(live)
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP connmgr_{name} {help_}")
            out.append(f"# TYPE connmgr_{name} {kind}")
            for labels, value in samples:
                out.append(f"connmgr_{name}{labels} {value:g}" if isinstance(value, float) else f"connmgr_{name}{labels} {value}")

        metric("up", "gauge", "1 while connmgr runs", [("", 1)])
        metric("start_time_seconds", "gauge", "Unix time connmgr started", [("", self.started)])
        for name, value in gauges.items():
            metric(name, "gauge", name.replace("_", " "), [("", value)])
        for name, (label, help_, values) in (labeled or {}).items():
            metric(name, "counter", help_,
                   [(f'{{{label}="{_label(k)}"}}', float(n)) for k, n in sorted(values.items())]
                   or [(f'{{{label}="none"}}', 0.0)])  # fmt: skip
        metric("clients_accepted_total", "counter", "client connections accepted", [("", self.clients_accepted)])
        metric(
            "clients_rejected_total", "counter", "client connections refused, by reason",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.clients_rejected.items())] or [('{reason="none"}', 0)],
        )
        metric(
            "client_errors_total", "counter", "errors connmgr reported to clients, by SQLSTATE",
            [(f'{{sqlstate="{s}"}}', n) for s, n in sorted(self.client_errors.items())] or [('{sqlstate="00000"}', 0)],
        )
        metric("backend_connects_total", "counter", "backend sessions opened", [("", self.backend_connects)])
        metric("backend_connect_errors_total", "counter", "backend sessions that failed to open", [("", self.backend_connect_errors)])
        metric("auth_failures_total", "counter", "client authentication failures", [("", self.auth_failures)])
        metric("markers_written_total", "counter", "writing transactions marked for exact purge",
               [("", self.markers_written)])  # fmt: skip
        metric("ddl_captured_total", "counter", "DDL statements captured for replay on the secondary",
               [("", self.ddl_captured)])  # fmt: skip
        metric("synchronous_commit_overridden_total", "counter",
               "client sessions whose startup options asked for a synchronous_commit weaker than on"
               " (the pair starts them with on)", [("", self.synchronous_commit_overridden)])  # fmt: skip
        metric("ddl_not_captured_total", "counter",
               "DDL statements not replicated (outside-block forms, multi-statement Queries)",
               [("", self.ddl_not_captured)])  # fmt: skip
        if self.marker_databases:
            metric("markers_enabled", "gauge", "1 if the database has the marker function",
                   [(f'{{database="{_label(db)}"}}', 1 if ok else 0) for db, ok in sorted(self.marker_databases.items())])  # fmt: skip
        metric("cancels_total", "counter", "cancel requests routed", [("", self.cancels)])
        metric(
            "bytes_total", "counter", "bytes relayed",
            [('{direction="client_to_server"}', t.bytes_from_client), ('{direction="server_to_client"}', t.bytes_to_client)],
        )
        metric(
            "messages_total", "counter", "protocol messages relayed",
            [('{direction="client_to_server"}', t.messages_from_client), ('{direction="server_to_client"}', t.messages_to_client)],
        )
        h = t.latency
        out.append("# HELP connmgr_request_latency_seconds time from a Query or Sync to its ReadyForQuery")
        out.append("# TYPE connmgr_request_latency_seconds histogram")
        cumulative = 0
        for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'connmgr_request_latency_seconds_bucket{{le="{le}"}} {cumulative}')
        out.append(f"connmgr_request_latency_seconds_sum {h.total:.6f}")
        out.append(f"connmgr_request_latency_seconds_count {h.count}")
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
