"""The supervisor of ``[server] workers = N`` (how it works: :mod:`connmgr.workers`).

:class:`Supervisor` reserves the listen addresses, keeps N worker processes running,
routes cancel requests between them, answers the console's fleet-wide SHOW commands,
serves the one metrics endpoint and shuts them all down on SIGTERM, SIGINT or SHUTDOWN.
It serves no client itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import socket
import sys
import time
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from connmgr.config import Config, parse_hostport
from connmgr.failover.fleet import Coordinator, FreezeFlag
from connmgr.ops.prometheus import merge_workers, serve_metrics
from connmgr.workers import WORKER_COLUMNS
from connmgr.workers.control import Channel, ControlError
from connmgr.workers.sockets import format_address, reserve

log = logging.getLogger("connmgr.workers")

__all__ = ["Supervisor", "WorkerStartError", "worker_config", "worker_share"]

#: how long the supervisor waits for a worker's answer (SHOW, metrics)
ASK_TIMEOUT = 5.0
#: a worker that dies within this many seconds of its start is started again more slowly
STABLE_AFTER = 10.0
#: the longest pause between restarts of a worker that keeps dying
MAX_BACKOFF = 10.0


class WorkerStartError(Exception):
    """A worker could not start (its own log lines above say why): the supervisor stops.
    Internal: ``connmgr serve`` reports it and exits 1; no client is connected yet."""


@dataclasses.dataclass(eq=False)
class _Worker:
    index: int
    process: trio.Process | None = None
    channel: Channel | None = None
    ready: trio.Event = dataclasses.field(default_factory=trio.Event)
    started_at: float = 0.0
    restarts: int = 0
    #: its spec is sent (or queued first on its channel): the failover's events go to it
    joined: bool = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None and self.ready.is_set()


def worker_config(config: Config, addresses: list[str]) -> dict[str, dict[str, Any]]:
    """What a worker is configured with, as ``config.load`` overrides: the supervisor's
    configuration with the reserved addresses (``host:port``, port 0 resolved) and no
    metrics endpoint of its own. (The worker takes its share of the limits itself:
    :func:`worker_share`.)"""
    sections = dataclasses.asdict(config)
    sections["server"]["listen"] = list(addresses)
    sections["metrics"]["listen"] = ""
    return sections


def worker_share(config: Config) -> Config:
    """A worker's own limits: ``ceil(max_clients / workers)`` clients. (Not checked again:
    the total was.)"""
    share = math.ceil(config.server.max_clients / config.server.workers)
    return dataclasses.replace(config, server=dataclasses.replace(config.server, max_clients=share))


class Supervisor:
    """See the module docstring. ``command`` starts a worker given its control descriptor
    (default: this Python running ``connmgr _worker FD``)."""

    def __init__(self, config: Config, command: list[str] | None = None) -> None:
        self.config = config
        self.count = config.server.workers
        self.command = command or [sys.executable, "-m", "connmgr", "_worker"]
        self.workers = [_Worker(i) for i in range(self.count)]
        self.listen_addresses: list[tuple[str, int]] = []
        self.metrics_address: tuple[str, int] | None = None
        self.restarts = 0
        self.started = time.time()
        self._shutdown = trio.Event()
        self._fast = False
        self._nursery: trio.Nursery | None = None
        #: with [failover] secondary: the pair's failover, decided here for every worker
        #: (connmgr/failover/fleet.py)
        self.flag: FreezeFlag | None = None
        self.coordinator: Coordinator | None = None
        if config.failover.secondary:
            self._coordinate()

    def _coordinate(self) -> None:
        from connmgr.failover.controller import Failover
        from connmgr.pg.backend import BackendServer, Route, open_own_session

        p, r = self.config.primary, self.config.redo
        route = Route(BackendServer(p.name, p.host, p.port, p.connect_timeout, p.tls, p.tls_ca_file))
        self.flag = FreezeFlag.create()
        self.coordinator = Coordinator(self._send_to, self._call, self._running, self.flag)
        Failover(self.config.failover, route, (), origin=0, members=self.coordinator,
                 open_primary=lambda purpose: open_own_session(route.server, r.user, r.password, r.dbname, purpose))  # fmt: skip

    async def _send_to(self, index: int, frame: dict[str, Any]) -> None:
        channel = self.workers[index].channel
        if channel is None:
            raise ControlError("not running")
        await channel.send(frame)

    async def _call(self, index: int, op: str, within: float, /, **args: Any) -> dict[str, Any]:
        channel = self.workers[index].channel
        if channel is None:
            raise ControlError("not running")
        with trio.fail_after(within):
            return await channel.call(op, **args)

    def _running(self, ready: bool) -> list[int]:
        """The workers the failover's events go to: those with their spec, ready or not;
        with ``ready``, those that serve clients (asked what their sessions are doing)."""
        return [w.index for w in self.workers if w.joined and w.channel is not None and (w.alive or not ready)]

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self, fast: bool = False) -> None:
        """Shut every worker down (gracefully unless ``fast``) and end :meth:`serve`."""
        self._fast = self._fast or fast
        if self._shutdown.is_set() and fast:
            for w in self.workers:
                self._tell(w, "shutdown", fast=True)
        self._shutdown.set()

    async def serve(self, *, handle_signals: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until shut down; ``task_status.started`` gets the listen addresses once every
        worker listens. Raises :class:`WorkerStartError` if one cannot start, OSError if an
        address cannot be reserved."""
        try:
            await self._serve(handle_signals, task_status)
        except BaseExceptionGroup as group:  # (trio's nurseries wrap what their tasks raise)
            matched = group.subgroup(WorkerStartError)
            while isinstance(matched, BaseExceptionGroup):
                matched = matched.exceptions[0]
            if matched is None:
                raise
            raise matched from None

    async def _serve(self, handle_signals: bool, task_status) -> None:
        reserved: list[socket.socket] = []
        try:
            for addr in self.config.server.listen:
                host, port = parse_hostport(addr, allow_zero=True)
                reserved.extend(reserve(host, port))
            self.listen_addresses = [s.getsockname()[:2] for s in reserved]
            spec = worker_config(self.config, [format_address(s) for s in reserved])
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if handle_signals:
                    nursery.start_soon(self._signals)
                if self.coordinator is not None:
                    await nursery.start(self.coordinator.run)
                    await nursery.start(self.coordinator.failover.run)
                async with trio.open_nursery() as starting:
                    for w in self.workers:
                        starting.start_soon(self._start_kept, nursery, w, spec)
                if self.config.metrics.listen:
                    host, port = parse_hostport(self.config.metrics.listen, allow_zero=True)
                    self.metrics_address = await nursery.start(serve_metrics, self.render_metrics, host, port)
                for host, port in self.listen_addresses:
                    log.info("listening on %s:%d with %d workers (pids %s), backend %s:%d", host, port, self.count,
                             " ".join(str(w.process.pid) for w in self.workers), self.config.primary.host,
                             self.config.primary.port)  # fmt: skip
                task_status.started(self.listen_addresses)
                await self._shutdown.wait()
                await self._stop_workers()
                nursery.cancel_scope.cancel()
        finally:
            for s in reserved:
                s.close()
            if self.flag is not None:
                self.flag.close()

    async def _start_kept(self, nursery: trio.Nursery, w: _Worker, spec: dict) -> None:
        await nursery.start(self._keep, w, spec)

    async def _keep(self, w: _Worker, spec: dict, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run worker ``w`` and start it again whenever it dies, until shutdown."""
        first = True
        backoff = 0.5
        while True:
            ran = await self._run_once(w, spec, task_status if first else None)
            first = False
            if self._shutdown.is_set():
                return
            backoff = 0.5 if ran >= STABLE_AFTER else min(backoff * 2, MAX_BACKOFF)
            await trio.sleep(backoff)  # (and a worker that exited because the whole group got SIGTERM
            if self._shutdown.is_set():  # sees the supervisor's shutdown before it would restart)
                return
            self.restarts += 1
            w.restarts += 1
            log.warning("worker %d: starting it again (restart %d)", w.index, w.restarts)

    async def _run_once(self, w: _Worker, spec: dict, task_status) -> float:
        """One life of worker ``w``: returns how long it ran; raises WorkerStartError if
        it is the first life (``task_status`` given) and it never listened."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (child.fileno(),) if self.flag is None else (child.fileno(), self.flag.fd)
        try:
            process = await trio.lowlevel.open_process([*self.command, str(child.fileno())], pass_fds=fds)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        w.process, w.ready, w.started_at = process, trio.Event(), time.monotonic()
        w.channel = channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(parent)), f"worker {w.index}")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen_to, w, channel)
                frame = {"op": "spec", "index": w.index, "count": self.count, "log_level": logging.getLogger().level,
                         **self._fleet_spec(spec)}  # fmt: skip
                # From the state in its spec on, a starting worker gets every failover event:
                # the channel's FIFO send lock, taken now, puts them behind the spec.
                w.joined = True
                await channel.send(frame)
                with trio.CancelScope() as waiting:
                    nursery.start_soon(_cancel_when_set, w.ready, waiting)
                    await process.wait()
                if not w.ready.is_set():
                    if task_status is not None:
                        raise WorkerStartError(f"worker {w.index} (pid {process.pid}) exited with code"
                                               f" {process.returncode} before it listened")  # fmt: skip
                    log.error("worker %d (pid %d) exited with code %s before it listened", w.index, process.pid,
                              process.returncode)  # fmt: skip
                    nursery.cancel_scope.cancel()
                    return time.monotonic() - w.started_at
                if task_status is not None:
                    task_status.started()
                await process.wait()
                nursery.cancel_scope.cancel()
            ran = time.monotonic() - w.started_at
            if not self._shutdown.is_set():
                log.error("worker %d (pid %d) exited with code %s after %.1f s; its clients lost their connections",
                          w.index, process.pid, process.returncode, ran)  # fmt: skip
            return ran
        finally:
            w.channel, w.joined = None, False
            await channel.stream.aclose()
            if process.returncode is None:  # cancelled: never leave a worker behind
                process.kill()
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await process.wait()

    def _fleet_spec(self, spec: dict) -> dict[str, Any]:
        """The configuration of a worker starting now and, with the pair's failover, the
        shared freeze flag and the failover's state: a worker started after a failover
        gets the servers as they are now."""
        if self.coordinator is None:
            return {"config": spec}
        state = self.coordinator.worker_state()
        config = {**spec, "primary": {**spec["primary"], "host": state["primary"][0], "port": state["primary"][1]},
                  "failover": {**spec["failover"], "secondary": _hostport(*state["secondary"])}}  # fmt: skip
        return {"config": config, "freeze_fd": self.flag.fd, "failover_state": state}

    async def _stop_workers(self) -> None:
        """Tell every worker to shut down; kill those still running after shutdown_timeout
        (+5 s for their last clients to close)."""
        log.info("shutting down %d workers%s", self.count, " (fast)" if self._fast else "")
        for w in self.workers:
            self._tell(w, "shutdown", fast=self._fast)
        with trio.move_on_after(self.config.server.shutdown_timeout + 5):
            for w in self.workers:
                if w.process is not None:
                    await w.process.wait()
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                log.warning("worker %d (pid %d) did not stop; killing it", w.index, w.process.pid)
                w.process.kill()

    def _tell(self, w: _Worker, op: str, **args: Any) -> None:
        """A notification to ``w``, sent in the background (lost if ``w`` is gone)."""
        if w.channel is not None and self._nursery is not None:
            self._nursery.start_soon(_notify, w.channel, op, args)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.shutdown(fast=signum == signal.SIGINT or self._shutdown.is_set())

    # ------------------------------------------------------------------ what workers ask

    async def _listen_to(self, w: _Worker, channel: Channel) -> None:
        async def handle(frame: dict[str, Any]) -> dict[str, Any] | None:
            op = frame["op"]
            if op == "ready":
                w.ready.set()
                return None
            if op == "cancel":
                owner = frame.get("worker")
                target = self.workers[owner].channel if isinstance(owner, int) and 0 <= owner < self.count else None
                try:
                    if target is None:
                        raise ControlError("not running")
                    await target.notify("cancel", pid=frame["pid"], secret=frame["secret"])
                except ControlError as e:
                    log.info("cancel request for worker %r ignored: %s", owner, e)
                return None
            if op == "show":
                return {"answers": await self.show(frame["what"])}
            if op == "shutdown":
                log.info("SHUTDOWN from the console of worker %d", w.index)
                self.shutdown()
                return None
            raise ControlError(f"unknown op {op!r}")

        if self.coordinator is not None:
            coordinated = self.coordinator.handlers()
            inline = self.coordinator.inline_handlers()
        else:
            coordinated, inline = {}, {}

        async def handle_all(frame: dict[str, Any]) -> dict[str, Any] | None:
            handler = coordinated.get(frame["op"])
            return await (handler(frame) if handler is not None else handle(frame))

        try:
            await channel.run(handle_all, inline)
        except ControlError as e:
            log.error("worker %d: %s", w.index, e)

    async def ask_all(self, op: str, **args: Any) -> dict[int, dict[str, Any]]:
        """``op`` asked of every running worker at once: {worker: reply}. A worker that
        does not answer within ASK_TIMEOUT is left out (logged)."""
        replies: dict[int, dict[str, Any]] = {}

        async def ask(w: _Worker) -> None:
            channel = w.channel
            if channel is None or not w.ready.is_set():
                return
            with trio.move_on_after(ASK_TIMEOUT):
                try:
                    replies[w.index] = await channel.call(op, **args)
                except ControlError as e:
                    log.warning("worker %d did not answer %s: %s", w.index, op, e)
                return
            log.warning("worker %d did not answer %s within %g s", w.index, op, ASK_TIMEOUT)

        async with trio.open_nursery() as nursery:
            for w in self.workers:
                nursery.start_soon(ask, w)
        return replies

    async def show(self, what: str) -> list:
        """The console's SHOW ``what`` for every worker: [[worker, columns, rows], ...];
        WORKERS is the supervisor's own table."""
        if what == "WORKERS":
            replies = await self.ask_all("show", what="WORKERS")
            clients = {i: r["rows"][0][WORKER_COLUMNS.index("clients")] for i, r in replies.items()}
            now = time.monotonic()
            rows = [[str(w.index), str(w.process.pid) if w.process else None,
                     str(clients[w.index]) if w.index in clients else None,
                     f"{now - w.started_at:.0f}" if w.alive else None, str(w.restarts)] for w in self.workers]  # fmt: skip
            return [[-1, WORKER_COLUMNS, rows]]
        replies = await self.ask_all("show", what=what)
        return [[i, r["columns"], r["rows"]] for i, r in sorted(replies.items())]

    async def render_metrics(self) -> str:
        """Every worker's metrics, each sample labelled ``worker``, and the supervisor's."""
        replies = await self.ask_all("metrics")
        workers = GaugeMetricFamily("connmgr_workers", "worker processes configured ([server] workers)",
                                    value=self.count)  # fmt: skip
        running = GaugeMetricFamily("connmgr_workers_running", "worker processes listening now",
                                    value=sum(1 for w in self.workers if w.alive))  # fmt: skip
        answered = GaugeMetricFamily("connmgr_workers_answered", "workers whose figures are in this scrape",
                                     value=len(replies))  # fmt: skip
        restarts = CounterMetricFamily("connmgr_worker_restarts", "workers started again after they died",
                                       value=self.restarts)  # fmt: skip
        return merge_workers({i: r["text"] for i, r in replies.items()}, [workers, running, answered, restarts])


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _notify(channel: Channel, op: str, args: dict[str, Any]) -> None:
    try:
        await channel.notify(op, **args)
    except ControlError:
        pass
