"""Programs the benchmarks start: each in its own process group, its output in a log file.

A :class:`Service` is ready once every marker line has appeared in what it logged since
this start and its port accepts TCP; stopping it signals the whole group (so a child of it
cannot outlive the benchmark) and escalates to SIGKILL. As root, a service may run as the
server's OS user (PgBouncer refuses root, as Postgres does).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from connmgr.embedded.clusters import OsUser

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
TICK = os.sysconf("SC_CLK_TCK")


class TargetUnavailable(Exception):
    """A target could not be started or readied; the message says why (a skip note)."""


def log(msg: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT):
    """Signal the process group of ``proc`` (started with start_new_session) and reap it;
    escalate to SIGKILL after ``timeout``. Safe to call on an exited process."""
    for s in (sig, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, s)
        try:
            proc.wait(timeout=timeout)
            # The leader is gone; make sure no child of it lingers in the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=timeout)


def port_open(port: int, host: str = HOST) -> bool:
    """True if ``host:port`` accepts a TCP connection within half a second."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a text file; "" if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def first_error_line(text: str) -> str:
    """The most telling line of a failed command's output."""
    lines = [ln.strip(" |") for ln in text.splitlines() if ln.strip(" |")]
    if any(ln.startswith("Traceback") for ln in lines):  # a Python crash: its last exception
        raised = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", ln)]
        if raised:
            return raised[-1]
    for ln in lines:
        if re.search(r"error|fatal|could not|abort|fail|refused|timed out|panic", ln, re.I):
            return ln
    return lines[-1] if lines else "(no output)"


def cpu_times(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of ``pid`` so far, from /proc/PID/stat; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) / TICK, int(fields[12]) / TICK


@dataclass
class Service:
    """A program in its own process group, its output appended to ``log_path``."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    #: lines that must appear in its log (since this start) before it counts as ready
    markers: tuple[str, ...] = ("listening on",)
    cwd: Path = REPO
    #: where its Python code comes from (another checkout for connmgr-base)
    pythonpath: Path = REPO
    run_as: OsUser | None = None
    stop_timeout: float = STOP_TIMEOUT
    #: how long it may take to be ready (longer under valgrind)
    ready_timeout: float = READY_TIMEOUT
    #: more environment (CONNMGR_PURE_PYTHON=1 for connmgr-pure)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    #: set once it was ready: a service that is ready and then not alive died on its own
    ready: bool = field(default=False, init=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    def start(self) -> None:
        """Start it and wait until it is ready. Raises TargetUnavailable (the service is
        then stopped) if it cannot run, exits, or is not ready within READY_TIMEOUT."""
        self.stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(
                p for p in (str(self.pythonpath), os.environ.get("PYTHONPATH", "")) if p
            ),
        )
        env.update(self.env)
        kw: dict = {}
        if self.run_as is not None:
            kw.update(user=self.run_as.uid, group=self.run_as.gid, extra_groups=self.run_as.groups)
            env.update(HOME=self.run_as.home, USER=self.run_as.name)
        self._log_offset = self.log_size()
        self.ready = False
        with open(self.log_path, "ab") as out:
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=self.cwd, env=env, start_new_session=True, **kw,
                )  # fmt: skip
            except OSError as e:
                raise TargetUnavailable(f"could not run {self.argv[0]}: {e}") from e
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = first_error_line(tail(self.log_path, 20))
                self.proc = None
                raise TargetUnavailable(f"{self.name} exited at startup ({why}); log: {self.log_path}")
            if not self._missing_markers() and port_open(self.port):
                self.ready = True
                return
            time.sleep(0.05)
        missing = self._missing_markers()
        self.stop()
        lacks = f" (log lacks {missing})" if missing else ""
        raise TargetUnavailable(
            f"{self.name} not ready within {self.ready_timeout:g}s{lacks}; log: {self.log_path}"
        )

    def _missing_markers(self) -> list[str]:
        text = self.log_text()
        return [m for m in self.markers if m not in text]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int | None:
        """Its pid while it runs, else None."""
        return self.proc.pid if self.alive() else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> None:
        """Signal its process group with ``sig`` and reap it (SIGKILL after the timeout)."""
        if self.proc is not None:
            kill_group(self.proc, sig, self.stop_timeout if timeout is None else timeout)
            self.proc = None

    def describe_death(self) -> str:
        """What became of it, if it was started and has exited; "" otherwise."""
        if self.proc is None or self.proc.poll() is None:
            return ""
        return (
            f"{self.name} exited with code {self.proc.returncode}: "
            f"{first_error_line(tail(self.log_path, 20))}"
        )

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self, upto: int | None = None) -> str:
        """What it logged since this start, up to byte ``upto`` of the file (all if None)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read(-1 if upto is None else max(0, upto - self._log_offset))
        except OSError:
            return ""
        return data.decode(errors="replace")

    def log_warnings(self, upto: int | None = None) -> list[str]:
        """WARNING/ERROR/CRITICAL lines (connmgr's logging format) and tracebacks it logged
        since this start, up to byte ``upto`` (e.g. where we began stopping it)."""
        lines = self.log_text(upto).splitlines()
        return [ln for ln in lines if any(f" {lvl} " in ln for lvl in ("WARNING", "ERROR", "CRITICAL"))
                or ln.startswith("Traceback")]  # fmt: skip
