# cython: annotation_typing=False
"""Counters, gauges and a latency histogram, rendered for Prometheus.

The hot path never touches a shared structure per message: each client connection counts
its own bytes and messages in plain attributes (see :class:`ConnStats`), and a scrape adds
the live connections to the totals of the closed ones. Events that are rare (a connection,
an error, an authentication failure) are counted directly here.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from shadow.messages import printable


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile of ``values`` (``q`` in 0..1: the smallest value with at
    least ``q`` of them at or below it; ``q = 1`` is the maximum); 0.0 for no values. The one
    percentile of the demo, the campaigns and the benchmarks."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


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
    #: cancel requests for a key of another worker, sent on to it ([server] workers)
    cancels_forwarded: int = 0
    auth_failures: int = 0
    #: database -> whether its sessions are marked (App.markers_enabled)
    marker_databases: dict = field(default_factory=dict)
    #: purge markers that wrote their row (writing transactions marked)
    markers_written: int = 0
    #: DDL statements captured for the secondary, and DDL that could not be
    ddl_captured: int = 0
    ddl_not_captured: int = 0
    synchronous_commit_overridden: int = 0
    sessions_untracked: int = 0
    #: client messages longer than [server] max_buffered_message, relayed as they came
    messages_streamed: int = 0
    closed: ConnStats = field(default_factory=ConnStats)

    def connection_closed(self, stats: ConnStats) -> None:
        self.closed.add(stats)

    def totals(self, live: Iterable[ConnStats]) -> ConnStats:
        t = ConnStats()
        for s in (self.closed, *live):
            t.add(s)
        return t

    def families(self, live: list[ConnStats], gauges: dict[str, float],
                 labeled: dict[str, tuple[str, str, dict[str, float]]] | None = None) -> list[Metric]:  # fmt: skip
        """The metric families a scrape exposes (``prometheus_client`` writes them out):
        ``gauges`` name -> value, ``labeled`` counter name -> (label name, help,
        {label value: count}); every name gets the ``connmgr_`` prefix."""
        t = self.totals(live)
        out: list[Metric] = []

        def gauge(name: str, help_: str, value: float) -> None:
            out.append(GaugeMetricFamily(f"connmgr_{name}", help_, value=value))

        def counter(name: str, help_: str, value: float | None = None, label: str = "",
                    values: dict[str, float] | None = None, empty: str = "none") -> None:  # fmt: skip
            if not label:
                out.append(CounterMetricFamily(f"connmgr_{name}", help_, value=value))
                return
            family = CounterMetricFamily(f"connmgr_{name}", help_, labels=[label])
            for k, n in sorted((values or {empty: 0}).items()):
                family.add_metric([str(k)], float(n))
            out.append(family)

        gauge("up", "1 while connmgr runs", 1)
        gauge("start_time_seconds", "Unix time connmgr started", self.started)
        for name, value in gauges.items():
            gauge(name, name.replace("_", " "), value)
        for name, (label, help_, values) in (labeled or {}).items():
            counter(name, help_, label=label, values=values)
        counter("clients_accepted_total", "client connections accepted", self.clients_accepted)
        counter("clients_rejected_total", "client connections refused, by reason", label="reason",
                values=dict(self.clients_rejected))  # fmt: skip
        counter("client_errors_total", "errors connmgr reported to clients, by SQLSTATE", label="sqlstate",
                values=dict(self.client_errors), empty="00000")  # fmt: skip
        counter("backend_connects_total", "backend sessions opened", self.backend_connects)
        counter("backend_connect_errors_total", "backend sessions that failed to open", self.backend_connect_errors)
        counter("auth_failures_total", "client authentication failures", self.auth_failures)
        counter("markers_written_total", "writing transactions marked for exact purge", self.markers_written)
        counter("ddl_captured_total", "DDL statements captured for replay on the secondary", self.ddl_captured)
        counter("synchronous_commit_overridden_total",
                "client sessions whose startup options asked for a synchronous_commit weaker than on"
                " (the pair starts them with on)", self.synchronous_commit_overridden)  # fmt: skip
        counter("ddl_not_captured_total",
                "DDL statements not replicated (outside-block forms, multi-statement Queries)",
                self.ddl_not_captured)  # fmt: skip
        if self.marker_databases:
            family = GaugeMetricFamily("connmgr_markers_enabled", "1 if the database has the marker function",
                                       labels=["database"])  # fmt: skip
            for db, ok in sorted(self.marker_databases.items()):
                family.add_metric([printable(db)], 1 if ok else 0)  # a name in another encoding
            out.append(family)
        counter("cancels_total", "cancel requests routed", self.cancels)
        counter("cancels_forwarded_total", "cancel requests for a session of another worker, sent on to it",
                self.cancels_forwarded)  # fmt: skip
        counter("sessions_untracked_total", "sessions whose protocol state connmgr lost track of (relayed"
                " untracked: no markers, and they cannot move at a failover)", self.sessions_untracked)  # fmt: skip
        counter("messages_streamed_total", "client messages longer than [server] max_buffered_message, relayed"
                " as they came instead of held whole", self.messages_streamed)  # fmt: skip
        counter("bytes_total", "bytes relayed", label="direction",
                values={"client_to_server": t.bytes_from_client, "server_to_client": t.bytes_to_client})  # fmt: skip
        counter("messages_total", "protocol messages relayed", label="direction",
                values={"client_to_server": t.messages_from_client, "server_to_client": t.messages_to_client})  # fmt: skip
        h = t.latency
        cumulative = 0
        buckets = []
        for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        out.append(HistogramMetricFamily("connmgr_request_latency_seconds",
                                         "time from a Query or Sync to its ReadyForQuery",
                                         buckets=buckets, sum_value=h.total))  # fmt: skip
        return out
