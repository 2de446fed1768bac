"""A throwaway etcd cluster for the lab and the tests (Debian's ``etcd-server``).

:class:`EtcdCluster` starts one ``etcd`` process per member, each with its data directory
in a temporary directory removed at :meth:`EtcdCluster.stop`. A member may run inside a
network namespace (``ip netns exec``; the lab puts one in ``hosta``, ``hostb`` and
``witness``) or on loopback (one member, for the tests of the client). Settings:
heartbeat 50 ms, election timeout 400 ms (a LAN's; the lab's 2 s leases must outlast a new
raft leader's election, up to twice the timeout: with etcd's default 1 s the death of the
witness, the raft leader, made host A step down -- found by the partition table),
``--pre-vote`` (a member that cannot see the leader does not disrupt the others; off by
default in 3.4).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass

__all__ = ["EtcdCluster", "EtcdMember", "etcd_binary"]


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class EtcdMember:
    name: str
    host: str
    netns: str | None = None
    client_port: int = 2379
    peer_port: int = 2380
    process: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


class EtcdCluster:
    """See the module docstring. ``members``: the members to start; use as a context
    manager or call :meth:`start` and :meth:`stop`."""

    def __init__(self, members: list[EtcdMember], *, token: str = "connmgr-lab",
                 election_timeout_ms: int = 400, heartbeat_ms: int = 50) -> None:  # fmt: skip
        self.members = members
        self.token = token
        self.election_timeout_ms = election_timeout_ms
        self.heartbeat_ms = heartbeat_ms
        self.dir: str | None = None

    @classmethod
    def on_loopback(cls) -> EtcdCluster:
        return cls([EtcdMember("m1", "127.0.0.1", client_port=free_port(), peer_port=free_port())])

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        self.dir = tempfile.mkdtemp(prefix="connmgr-etcd-")
        try:
            for m in self.members:
                self._launch(binary, m)
            deadline = time.monotonic() + timeout
            for m in self.members:
                self._wait_healthy(m, deadline)
        except BaseException:
            self.stop()
            raise

    def _launch(self, binary: str, m: EtcdMember) -> None:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [binary, "--name", m.name, "--data-dir", os.path.join(self.dir, m.name),
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.token, "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_timeout_ms), "--pre-vote", "--log-level", "warn"]  # fmt: skip
        if m.netns:
            argv = ["ip", "netns", "exec", m.netns, *argv]
        log = open(os.path.join(self.dir, f"{m.name}.log"), "ab")  # noqa: SIM115 - the process keeps it
        m.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def restart(self, name: str, timeout: float = 30) -> None:
        """Start member ``name`` again after it died, from its data directory (it rejoins
        the cluster it was in: the initial-cluster flags are ignored then)."""
        (m,) = [m for m in self.members if m.name == name]
        if m.process is not None and m.process.poll() is None:
            return
        self._launch(etcd_binary(), m)
        self._wait_healthy(m, time.monotonic() + timeout)

    def _wait_healthy(self, m: EtcdMember, deadline: float) -> None:
        while True:
            if m.process.poll() is not None:
                raise RuntimeError(f"etcd member {m.name} exited ({m.process.returncode}): {self.log(m)[-2000:]}")
            try:
                with self._in(m):
                    with urllib.request.urlopen(f"{m.client_url}/health", timeout=1) as r:
                        if b'"true"' in r.read():
                            return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd member {m.name} not healthy in time: {self.log(m)[-2000:]}")
            time.sleep(0.1)

    @staticmethod
    def _in(m: EtcdMember):
        if m.netns is None:
            return contextlib.nullcontext()
        from connmgr.embedded.netlab import in_netns

        return in_netns(m.netns)

    def log(self, m: EtcdMember) -> str:
        try:
            with open(os.path.join(self.dir, f"{m.name}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self, name: str) -> None:
        for m in self.members:
            if m.name == name and m.process is not None and m.process.poll() is None:
                os.killpg(m.process.pid, signal.SIGKILL)
                m.process.wait(5)

    def stop(self) -> None:
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(m.process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.process.wait(5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
