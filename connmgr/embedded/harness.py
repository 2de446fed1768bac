"""Run a connection manager inside the current process, in a thread with its own trio loop.

Used by ``connmgr demo``, the tests and the labs: the caller keeps using blocking clients
(psql, pgbench, psycopg) while connmgr serves, and can read its :class:`~connmgr.app.App`
(metrics, registry). :meth:`EmbeddedConnmgr.stop` shuts it down gracefully and re-raises
whatever crashed its loop.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import trio

from connmgr.app import App
from connmgr.config import Config


class EmbeddedConnmgr:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.app = App(config)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._main, name="connmgr", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: self.app.serve(handle_signals=False, task_status=task_status)
                )
                self._started.set()

        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - re-raised by start()/stop()
            self._error = e
        finally:
            self._started.set()

    def start(self, timeout: float = 30) -> EmbeddedConnmgr:
        """Start serving; returns self once listening. Raises what prevented it."""
        self._thread.start()
        self._started.wait(timeout)
        if self._error is not None:
            raise self._error
        return self

    @property
    def host(self) -> str:
        return self.app.listen_addresses[0][0]

    @property
    def port(self) -> int:
        return self.app.listen_addresses[0][1]

    def conninfo(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None, **extra: str) -> str:
        """A libpq connection string that reaches the backend through this connmgr."""
        parts = {"host": self.host, "port": str(self.port), "user": user, "dbname": dbname}
        if password is not None:
            parts["password"] = password
        parts.update(extra)
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def run_sync(self, fn, *args):
        """Run ``fn(*args)`` on connmgr's trio thread and return its result."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stop(self, timeout: float = 30) -> None:
        """Graceful shutdown; waits for the loop to end and re-raises its crash, if any."""
        if self._thread.is_alive() and self._token is not None:
            try:
                self.run_sync(self.app.shutdown)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"connmgr did not stop within {timeout}s")
        if self._error is not None:
            raise self._error


class SupervisedConnmgr:
    """``python -m connmgr serve -c CONF`` as a child process: with ``[server] workers``,
    a supervisor and its worker processes (which cannot run in a thread). Its stderr is
    collected by a thread (:meth:`log`); the listen and metrics ports are read from it.
    ``password`` and ``dbname`` are the defaults of :meth:`connect` and :meth:`console`;
    ``launcher`` goes before the command (``faketime -f +7s``), ``env`` is added to its
    environment. Without workers it is one process (the same log lines are read)."""

    def __init__(self, conf, *, password: str = "postgres", dbname: str = "app", launcher: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        import os
        import subprocess
        import sys
        from pathlib import Path

        self.password = password
        self.dbname = dbname
        self.lines: list[str] = []
        self.host = "127.0.0.1"
        self.port = 0
        self.metrics_port = 0
        self._listening = threading.Event()
        self.proc = subprocess.Popen([*launcher, sys.executable, "-m", "connmgr", "serve", "-c", str(conf)],
                                     cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env} if env else None)  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        import re

        for line in self.proc.stderr:
            self.lines.append(line)
            if found := re.search(r"metrics on http://[\d.]+:(\d+)/", line):
                self.metrics_port = int(found[1])
            # the supervisor's line once every worker listens, or a single process's own
            # (not a worker's: each says so before the others may listen)
            if found := (re.search(r"listening on ([\d.]+):(\d+) with \d+ workers", line)
                         or ("[worker " not in line and re.search(r"listening on ([\d.]+):(\d+), backend", line))):
                self.host, self.port = found[1], int(found[2])
                self._listening.set()

    def start(self, timeout: float = 30) -> SupervisedConnmgr:
        """Wait until every worker listens; OSError (with the log) if it does not."""
        if not self._listening.wait(timeout):
            self.kill_all()
            raise OSError("connmgr did not start:\n" + self.log())
        return self

    def conninfo(self, user: str = "postgres", dbname: str | None = None, password: str | None = None,
                 **extra: str) -> str:  # fmt: skip
        parts = {"host": self.host, "port": str(self.port), "user": user, "dbname": dbname or self.dbname,
                 "password": password or self.password, "connect_timeout": "10", **extra}  # fmt: skip
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def connect(self, **kw):
        import psycopg

        return psycopg.connect(self.conninfo(), **{"autocommit": True, **kw})

    def show(self, what: str) -> tuple[list[str], list[tuple]]:
        return self.console(f"SHOW {what}")

    def console(self, command: str) -> tuple[list[str], list[tuple]]:
        """A command on the admin console (database ``connmgr``): (columns, rows)."""
        import psycopg

        with psycopg.connect(self.conninfo(dbname="connmgr"), autocommit=True) as admin:
            cur = admin.execute(command)
            return [d.name for d in cur.description], cur.fetchall()

    def metrics(self) -> tuple[dict[str, list], str]:
        """({family: samples}, the exposition text) of the metrics endpoint."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {f.name: f.samples for f in text_string_to_metric_families(text)}, text

    def per_worker(self, name: str) -> dict[str, float]:
        """{worker: value} of metric family ``name`` (summed over its other labels)."""
        samples, _text = self.metrics()
        out: dict[str, float] = {}
        for sample in samples.get(name, []):
            if "worker" in sample.labels:
                out[sample.labels["worker"]] = out.get(sample.labels["worker"], 0.0) + sample.value
        return out

    def log(self) -> str:
        return "".join(self.lines)

    def worker_pids(self) -> list[int]:
        """The supervisor's children: its workers."""
        from connmgr.embedded.clusters import child_pids

        return child_pids(self.proc.pid)

    def kill_worker(self, index: int, timeout: float = 20) -> int:
        """SIGKILL worker ``index`` and wait until the supervisor has started it again;
        returns the killed pid (RuntimeError if it is not started again)."""
        import os
        import signal

        import psycopg

        _cols, before = self.show("WORKERS")
        victim = int(before[index][1])
        os.kill(victim, signal.SIGKILL)

        def restarted() -> bool:
            try:
                _cols, rows = self.show("WORKERS")
            except psycopg.OperationalError:  # it landed in the dead worker's accept queue (see README)
                return False
            w = rows[index]
            return int(w[4]) >= 1 and w[1] not in (None, str(victim)) and w[3] is not None

        if not wait_until(restarted, timeout):
            raise RuntimeError(f"worker {index} was not started again within {timeout:g}s")
        return victim

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (graceful, every worker), then SIGKILL what is left after ``timeout``."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every worker (also when a test failed)."""
        import os
        import signal

        pids = self.worker_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_until(predicate, timeout: float) -> bool:
    """Poll ``predicate`` every 20 ms for up to ``timeout`` seconds; its last answer."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def write_users_file(directory, password: str, user: str = "postgres") -> str:
    """A users file (userlist.txt format) with one user, for connmgr's SCRAM toward
    clients; returns its path."""
    from pathlib import Path

    path = Path(directory) / "users.txt"
    path.write_text(f'"{user}" "{password}"\n')
    return str(path)


def start_connmgr_pair(pair, *, database: str, password: str, users_file: str, poster_slot: str,
                       mode: str = "one-phase", sequence_interval: float = 1.0, failover: bool = False,
                       max_wait: float = 20.0, shutdown_timeout: float = 5.0,
                       started: list | None = None, primary_extra: dict | None = None,
                       failover_options: dict | None = None, server_options: dict | None = None,
                       workers: int = 1, config_dir=None, policy_options: dict | None = None) -> tuple:  # fmt: skip
    """The connection managers of a :class:`~connmgr.embedded.cluster_pair.ClusterPair`, as the demo, the
    tests and the fault campaign run them: the secondary one (in front of the secondary
    database, mirror listener, poster slot ``poster_slot`` on the primary) is started first,
    then the primary one (mirroring to it; with ``failover``, moving sessions to the
    secondary database). Returns (primary, secondary); each is appended to ``started`` as
    soon as it runs, so the caller can stop them even if the other does not come up
    (OSError). ``primary_extra``: more config sections for the primary one (e.g. ``tls``);
    ``failover_options``: more keys of its ``[failover]`` section (e.g. ``failback``);
    ``server_options``: more keys of both ``[server]`` sections (e.g. ``max_buffered_message``).
    With ``workers`` > 1 the primary one is ``connmgr serve`` with that many worker
    processes (a :class:`SupervisedConnmgr`, its configuration written in ``config_dir``).
    ``policy_options``: both ``[policy]`` sections (e.g. the store's database)."""
    from connmgr import config as config_mod

    started = [] if started is None else started
    common = common_sections(users_file, shutdown_timeout, server_options)
    if policy_options:
        common["policy"] = dict(policy_options)
    secondary = start_secondary_connmgr(pair, database=database, password=password, poster_slot=poster_slot,
                                        common=common, sequence_interval=sequence_interval, started=started)  # fmt: skip
    sections = primary_sections(pair, secondary, password=password, mode=mode, failover=failover, max_wait=max_wait,
                                failover_options=failover_options)  # fmt: skip
    sections.update(primary_extra or {})
    if workers > 1:
        from pathlib import Path

        conf = Path(config_dir or Path(users_file).parent) / "primary-connmgr.toml"
        conf.write_text(toml_text({**common, "server": {**common["server"], "workers": workers}, **sections,
                                   "metrics": {"listen": "127.0.0.1:0"}}))  # fmt: skip
        primary = SupervisedConnmgr(conf, password=password, dbname=database)
        started.append(primary)
        primary.start()
        receivers = secondary.app.secondary.receivers
        if not wait_until(lambda: len(receivers) == workers and all(r.epoch is not None for r in receivers.values()),
                          15):  # fmt: skip
            raise OSError(f"the mirror links of the {workers} workers did not all come up ({sorted(receivers)})")
        return primary, secondary
    primary = EmbeddedConnmgr(config_mod.load(None, **{**common, **sections})).start()
    started.append(primary)
    if not wait_until(lambda: primary.app.mirror.connected, 15):
        raise OSError("the mirror link between the connection managers did not come up")
    return primary, secondary


def common_sections(users_file: str, shutdown_timeout: float = 5.0, server_options: dict | None = None) -> dict:
    """The configuration both connection managers of a test pair share."""
    return {"server": {"listen": ["127.0.0.1:0"], "shutdown_timeout": shutdown_timeout, "admin_users": ["postgres"],
                       **(server_options or {})},
            "auth": {"users_file": users_file}}  # fmt: skip


def start_secondary_connmgr(pair, *, database: str, password: str, poster_slot: str, common: dict,
                            sequence_interval: float = 1.0, started: list | None = None) -> EmbeddedConnmgr:  # fmt: skip
    """The secondary connmgr of ``pair`` (in front of the secondary database, mirror
    listener, poster slot on the primary), running once its poster slot is open."""
    from connmgr import config as config_mod

    p, s = pair.primary, pair.secondary
    secondary = EmbeddedConnmgr(config_mod.load(
        None, **common,
        primary={"host": s.host, "port": s.port, "name": "secondary"},
        mirror={"listen": "127.0.0.1:0"},
        poster={"host": p.host, "port": p.port, "password": password, "dbname": database,
                "slot": poster_slot, "temporary": True, "sequence_interval": sequence_interval},
    )).start()  # fmt: skip
    if started is not None:
        started.append(secondary)
    if not wait_until(lambda: secondary.app.imports.poster_connected, 15):
        raise OSError("the secondary connmgr could not open its poster slot on the primary")
    return secondary


def primary_sections(pair, secondary: EmbeddedConnmgr, *, password: str, mode: str = "one-phase",
                     failover: bool = False, max_wait: float = 20.0, failover_options: dict | None = None) -> dict:  # fmt: skip
    """The primary connmgr's own sections: mirroring to ``secondary`` and, with
    ``failover``, moving sessions to the secondary database."""
    p, s = pair.primary, pair.secondary
    host, port = secondary.app.mirror_listen_address
    sections = {
        "primary": {"host": p.host, "port": p.port},
        "mirror": {"peer": f"{host}:{port}", "heartbeat_interval": 0.05, "mode": mode},
        "redo": {"password": password},
    }
    if failover:
        sections["failover"] = {"secondary": f"{s.host}:{s.port}", "password": password, "max_wait": max_wait,
                                **(failover_options or {})}  # fmt: skip
    return sections


def toml_text(sections: dict[str, dict]) -> str:
    """A TOML document of ``sections`` (strings, numbers, booleans, lists of strings)."""
    import json

    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        for k, v in values.items():
            if isinstance(v, bool):
                out.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, int | float):
                out.append(f"{k} = {v}")
            else:  # a JSON string or list of strings is a TOML one
                out.append(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}")
        out.append("")
    return "\n".join(out)


@contextlib.contextmanager
def running_pair(base_dir, *, database: str, password: str, poster_slot: str, bindir=None, users_dir=None,
                 strict_stop: bool = True, **options) -> Iterator[tuple]:  # fmt: skip
    """A fresh :class:`~connmgr.embedded.cluster_pair.ClusterPair` in ``base_dir`` (one database) and its
    two connection managers (:func:`start_connmgr_pair` with ``options``); yields
    (pair, primary, secondary). On the way out the connection managers are stopped, all
    of them, and the pair is destroyed; then the first error a stop raised is raised
    (unless ``strict_stop`` is False: a fault campaign's cleanup just goes on)."""
    from connmgr.embedded.cluster_pair import ClusterPair

    pair = ClusterPair.create(base_dir, databases=(database,), password=password, bindir=bindir)
    started: list[EmbeddedConnmgr] = []
    try:
        primary, secondary = start_connmgr_pair(
            pair, database=database, password=password, poster_slot=poster_slot, started=started,
            users_file=write_users_file(users_dir or base_dir, password), **options)  # fmt: skip
        yield pair, primary, secondary
    finally:
        error = None
        for cm in reversed(started):
            try:
                cm.stop()
            except Exception as e:  # noqa: BLE001 - the others are stopped too, then it is raised
                error = error or e
        pair.destroy()
        if error is not None and strict_stop:
            raise error
