"""A minimal HTTP/1.0 endpoint serving ``GET /metrics`` in Prometheus text format.

The exposition is ``prometheus_client``'s (a registry per scrape, holding one collector
that returns this process's metric families); the endpoint is ours, on trio: one request
per connection, bounded in size and time; anything else gets 404 or 400.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from connmgr.failover.controller import Failover
from connmgr.metrics import Metrics
from connmgr.pair.mirror import MirrorLink
from connmgr.pair.secondary import Secondary
from connmgr.pair.syncrep_watch import SyncRepWatch
from connmgr.pg.redo_monitor import RedoMonitor
from connmgr.proxy.engine import RelayEngine
from connmgr.proxy.registry import Registry

log = logging.getLogger("connmgr.metrics")

_MAX_REQUEST = 8192


@dataclass(frozen=True, slots=True)
class Exported:
    """What the endpoint reports on: the parts a connmgr runs (None: not in its role).
    Built by :mod:`connmgr.app`."""

    metrics: Metrics
    registry: Registry
    accepting: Callable[[], bool]
    mirror: MirrorLink | None = None
    redo: RedoMonitor | None = None
    syncrep: SyncRepWatch | None = None
    secondary: Secondary | None = None
    failover: Failover | None = None
    engine: RelayEngine | None = None
    #: with [policy] file: statements refused, by client class
    policy_refusals: dict[str, int] | None = None
    #: with [policy] masks: rows with a value masked, by client class
    policy_masked_rows: dict[str, int] | None = None
    #: with [policy] rewrites: statements rewritten, by client class
    policy_rewrites: dict[str, int] | None = None
    #: with [policy] store: the policy versions' cycle (connmgr/proxy/policy_sync.py)
    policy_sync: object | None = None


def render(app: Exported) -> str:
    """The exposition text of every family (prometheus-client's format)."""
    live = [c.stats for c in app.registry]
    gauges = {
        "clients_active": float(len(app.registry)),
        "backends_active": float(sum(1 for c in app.registry if c.backend is not None)),
        "accepting": 1.0 if app.accepting() else 0.0,
    }
    if app.mirror is not None:  # primary role
        snd = app.mirror.sender
        gauges.update({
            "mirror_connected": 1.0 if app.mirror.connected else 0.0,
            "mirror_latest_version": float(snd.latest_version),
            "mirror_acked_version": float(snd.acked_version),
            "mirror_lag_versions": float(snd.latest_version - snd.acked_version),
            "mirror_lag_bytes": float(snd.buffered_bytes),
            "mirror_connects": float(app.mirror.connects),
            "mirror_peer_silent": float(app.mirror.peer_silent),
            "mirror_delta_requests": float(app.mirror.delta_requests),
            "mirror_buffer_overflows": float(snd.overflows),
            "mirror_two_phase_configured": 1.0 if app.mirror.two_phase_configured else 0.0,
            "mirror_two_phase_active": 1.0 if app.mirror.two_phase else 0.0,
            "mirror_two_phase_degradations": float(app.mirror.degradations),
            "mirror_two_phase_holds": float(app.mirror.holds),
            "mirror_two_phase_holds_total": float(app.mirror.holds_total),
        })
    if app.redo is not None and app.syncrep is not None:
        gauges["redo_lsn"] = float(app.redo.lsn)
        gauges["syncrep_waiting"] = float(app.syncrep.waiting)
        gauges["syncrep_longest_wait_seconds"] = app.syncrep.longest
        gauges["syncrep_long_wait_episodes"] = float(app.syncrep.episodes)
        gauges["redo_healthy"] = 1.0 if app.redo.healthy else 0.0
    secondary = app.secondary
    if secondary is not None and secondary.sequences is not None:
        sq = secondary.sequences
        gauges.update({
            "sequence_sync_rounds": float(sq.rounds),
            "sequence_sync_advanced": float(sq.advanced),
            "sequence_sync_errors": float(sq.errors),
            "sequence_sync_missing": float(sq.missing),
            "sequence_sync_unreadable": float(sq.unreadable),
            "sequence_sync_min_margin": float(sq.min_margin if sq.min_margin is not None else sq.lead),
            "sequence_sync_max_lead": float(sq.max_lead),
            "sequence_sync_connected": 1.0 if sq.connected else 0.0,
            "sequence_sync_last_unixtime": float(sq.last_sync),
        })
    if secondary is not None and secondary.imports.ddl is not None:
        d = secondary.imports.ddl
        gauges.update({
            "ddl_replayed": float(d.applied),
            "ddl_replay_errors": float(d.errors),
            "ddl_subscription_refreshes": float(d.refreshes),
            "ddl_tables_fenced": float(d.fenced),
            "ddl_rows_filled": float(d.rows_filled),
            "ddl_guard_worker_cancels": float(d.guard_cancels),
        })
    if secondary is not None:  # secondary role
        imp, q = secondary.imports, secondary.imports.queue
        st = q.stats
        gauges.update({
            "mirror_records_received": float(imp.records),
            "import_sessions_not_movable": float(imp.sessions_not_movable),
            "import_foreign_database_sessions": float(imp.foreign_sessions),
            "replication_poster_lsn": float(imp.poster_lsn),
            "replication_lag_bytes": float(imp.replication_lag_bytes),
            "replication_lag_seconds": imp.poster_delay,
            "import_queue_sessions": float(q.sessions),
            "import_queue_transactions": float(q.transactions),
            "import_queue_messages": float(q.messages),
            "import_queue_bytes": float(q.bytes),
            "import_purged": float(st.purged),
            "import_unmatched_commits": float(st.unmatched_commits),
            "import_not_replayable_sessions": float(len(imp.not_replayable)),
            "poster_connected": 1.0 if imp.poster_connected else 0.0,
            "poster_errors": float(imp.poster_errors),
            "topology_changes": float(secondary.topology_changes),
        })
    if app.policy_sync is not None:
        ps = app.policy_sync
        gauges.update({
            "policy_version": float(ps.runtime.active.number or 0),
            "policy_store_cycles": float(ps.cycles),
            "policy_store_failures": float(ps.failures),
            "policy_clock_offset_seconds": ps.offset.offset,
        })
    labeled = {}
    if app.failover is not None:  # primary role with [failover]
        fo = app.failover
        gauges.update({
            "failover_failed_over": 1.0 if fo.failed_over else 0.0,
            "failover_decisions": float(fo.decisions),
            "failover_false_alarms": float(fo.false_alarms),
            "failover_sessions_moved": float(fo.sessions_moved),
            "failover_commits_acknowledged": float(fo.commits_acknowledged),
            "failover_transactions_replayed": float(fo.transactions_replayed),
            "failover_replies_compared": float(fo.replies_compared),
            "failover_freezes": float(fo.freezes),
            "failover_switchovers": float(fo.switchovers),
            "failover_switchovers_abandoned": float(fo.switchovers_abandoned),
            "failover_reseeds": float(fo.reseeds),
            "failover_reseed_copies": float(fo.reseed_copies),
            "failover_reseed_failures": float(fo.reseed_failures),
            "failover_old_primary_pending": 1.0 if fo.previous is not None else 0.0,
            "failover_sessions_held": float(fo.replies_held),
            "failover_held_replies_dropped": float(fo.replies_dropped),
            "failover_stall_seconds_max": max(fo.stalls, default=0.0),
        })
        labeled["failover_sessions_not_moved_total"] = (
            "reason", "sessions that could not move to the secondary, by reason", dict(fo.sessions_failed))
        labeled["failover_transactions_rolled_back_total"] = (
            "reason", "open transactions rolled back with 40001 at a move, by reason",
            dict(fo.transactions_rolled_back))
    if app.policy_refusals is not None:
        labeled["policy_refusals_total"] = ("class", "statements the policy refused (42501), by client class",
                                            dict(app.policy_refusals))  # fmt: skip
    if app.policy_masked_rows is not None:
        labeled["policy_masked_rows_total"] = ("class", "rows (and COPY rows) sent with values masked, by client"
                                               " class", dict(app.policy_masked_rows))  # fmt: skip
    if app.policy_rewrites is not None:
        labeled["policy_rewrites_total"] = ("class", "statements a rewrite of the policy changed, by client class",
                                            dict(app.policy_rewrites))  # fmt: skip
    if app.engine is not None:
        gauges["relay_engine_sessions"] = float(app.engine.sessions)
        gauges["relay_engine_batches"] = float(app.engine.batches)
        gauges["relay_engine_events"] = float(app.engine.events)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(app.metrics.families(live, gauges, labeled)))
    return generate_latest(registry).decode()


class _Families:
    """A collector of families already made (what a registry asks of a collector)."""

    def __init__(self, families) -> None:
        self._families = families

    def collect(self):
        return iter(self._families)


def merge_workers(texts: dict[int, str], extra: list | None = None) -> str:
    """One exposition of several workers' (``{worker: text}``): each family once, every
    sample labelled ``worker``; ``extra`` families (the supervisor's own) added as they are."""
    merged: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                into.samples.append(sample._replace(labels={**sample.labels, "worker": str(index)}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merged.values(), *(extra or [])]))
    return generate_latest(registry).decode()


async def _handle(render: Callable[[], Awaitable[str]], stream: trio.SocketStream) -> None:
    try:
        with trio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request and b"\n\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
                if len(request) > _MAX_REQUEST:
                    await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                    return
            line = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
            if len(line) < 2 or line[0] != b"GET":
                await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            elif line[1].split(b"?")[0] not in (b"/metrics", b"/"):
                await stream.send_all(b"HTTP/1.0 404 Not Found\r\n\r\n")
            else:
                try:
                    body = (await render()).encode()
                except Exception:  # noqa: BLE001 - a bug in one figure must not stop connmgr
                    log.exception("rendering the metrics failed")
                    await stream.send_all(b"HTTP/1.0 500 Internal Server Error\r\n\r\n")
                    return
                head = (
                    f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def serve_metrics(render: Callable[[], Awaitable[str]], host: str, port: int, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Serve the endpoint on ``host:port`` until cancelled, each scrape answered with what
    ``render()`` returns (:func:`render` of a process, :func:`merge_workers` of a
    supervisor); ``task_status.started`` gets the bound (host, port)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    address = listeners[0].socket.getsockname()[:2]
    log.info("metrics on http://%s:%d/metrics", *address)
    task_status.started(address)
    await trio.serve_listeners(lambda s: _handle(render, s), listeners)
