"""What pgbench connects to, and the command lines of the proxies the benchmarks start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from connmgr.embedded.clusters import child_pids, server_os_user

from .procs import HOST, REPO, Service, TargetUnavailable, log


@dataclass
class Target:
    """Something pgbench connects to on ``HOST:port``: a Postgres server itself, or a proxy
    run as ``service``. ``prepare``/``release`` wrap every measured run."""

    name: str
    port: int
    description: str = ""
    service: Service | None = None

    def prepare(self, tag: str) -> None:
        """Ready it for the run named ``tag``: restart its service if that died. Raises
        TargetUnavailable."""
        if self.service is None or self.service.alive():
            return
        why = self.service.describe_death() or f"{self.service.name} is not running"
        log(f"  {why}; restarting it")
        try:
            self.service.start()
        except TargetUnavailable as e:
            raise TargetUnavailable(f"{why}; restart failed: {e}") from e

    def release(self) -> list[str]:
        """Undo prepare; return notes worth reporting (its service died during the run)."""
        death = self.service.describe_death() if self.service is not None else ""
        return [death] if death else []

    def proxy_pids(self) -> dict[str, int]:
        """Proxy processes whose CPU per transaction is measured: {name: pid} (with
        connmgr's ``[server] workers``, the supervisor and each worker, ``NAME/wI``)."""
        pid = self.service.pid() if self.service is not None else None
        if pid is None:
            return {}
        return {self.service.name: pid, **{f"{self.service.name}/w{i}": c for i, c in enumerate(child_pids(pid))}}

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


def connmgr_serve(*args: str, launcher: list[str] | None = None) -> list[str]:
    """``python -m connmgr serve ARGS``; ``launcher`` replaces ``python -m`` (a profiler)."""
    return [*(launcher or [sys.executable, "-m"]), "connmgr", "serve", *args]


def connmgr_argv(port: int, pg_port: int, extra: Sequence[str] = (),
                 launcher: list[str] | None = None) -> list[str]:  # fmt: skip
    """connmgr listening on ``HOST:port`` in front of the server on ``HOST:pg_port``."""
    return connmgr_serve("--listen", f"{HOST}:{port}", "--primary", f"{HOST}:{pg_port}", *extra,
                         launcher=launcher)  # fmt: skip


def relay_argv(port: int, pg_port: int) -> list[str]:
    """labs/naive_relay.py listening on ``HOST:port`` in front of ``HOST:pg_port``."""
    return [sys.executable, str(REPO / "labs" / "naive_relay.py"),
            "--listen", f"{HOST}:{port}", "--target", f"{HOST}:{pg_port}"]  # fmt: skip


def find_pgbouncer() -> str:
    """The pgbouncer executable. Raises TargetUnavailable when it is not installed."""
    exe = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)),
        None,
    )
    if exe is None:
        raise TargetUnavailable("pgbouncer is not installed (apt-get install -y pgbouncer)")
    return exe


def pgbouncer_version(exe: str) -> str:
    """The first line of ``pgbouncer --version``; "" if it does not answer."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.split("\n", 1)[0]


def pgbouncer_service(directory: Path, port: int, pg_port: int, log_path: Path,
                      **settings: str | int) -> Service:  # fmt: skip
    """PgBouncer (not started yet) listening on ``HOST:port`` in front of ``HOST:pg_port``,
    its pgbouncer.ini in ``directory`` (made here): ``settings`` (auth_type, auth_file,
    pool_mode, ...) over ours. As root it runs as the server's OS user, since it refuses to
    run as root. Raises TargetUnavailable when it is not installed, ClusterError when that
    user does not exist."""
    exe = find_pgbouncer()
    run_as = server_os_user()
    directory.mkdir()
    ini = directory / "pgbouncer.ini"
    merged = {
        "listen_addr": HOST,
        "listen_port": port,
        "unix_socket_dir": "",
        "max_client_conn": 1000,
        "default_pool_size": 100,
        "max_db_connections": 0,
        "ignore_startup_parameters": "extra_float_digits",
        "log_connections": 0,
        "log_disconnections": 0,
        **settings,
    }
    lines = ["[databases]", f"* = host={HOST} port={pg_port}", "", "[pgbouncer]"]
    ini.write_text("\n".join([*lines, *(f"{k} = {v}".rstrip() for k, v in merged.items())]) + "\n")
    if run_as is not None:
        for path in (directory, ini):
            os.chown(path, run_as.uid, run_as.gid)
    return Service("pgbouncer", [exe, str(ini)], port, log_path, markers=(), cwd=directory,
                   run_as=run_as)  # fmt: skip
