"""The host-failover lab: a pair on two hosts, each host a network namespace (issue 14).

:class:`HostLab` builds, on top of :class:`~connmgr.embedded.netlab.NetLab`:

* etcd: a member in ``hosta``, ``hostb`` and ``witness`` (raft leadership moved to the
  witness, so a database host's death does not also cost an etcd election);
* Postgres: the primary in ``hosta`` (198.18.0.1:5432) and the secondary in ``hostb``
  (198.18.0.2:5432), joined by synchronous logical replication (``ClusterPair``);
* connmgr: one process per host (``python -m connmgr serve``), each with ``[host]`` for
  the VIP; host A's mirrors to host B's, host B's reads the poster slot on host A's
  database and follows the copies of host A's frames.

Clients run in ``client`` (:meth:`HostLab.connect` gives a psycopg connection made there).
:meth:`HostLab.kill_host_a` is host death: router port down and SIGKILL of everything in
``hosta`` at once. :meth:`HostLab.close` tears everything down (also after a failure).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from connmgr.embedded import netlab
from connmgr.embedded.cluster_pair import ClusterPair
from connmgr.embedded.etcd_cluster import EtcdCluster, EtcdMember
from connmgr.embedded.harness import toml_text

__all__ = ["HostLab", "PASSWORD", "DB"]

DB = "app"
PASSWORD = "postgres"
PORT = 5432
MIRROR_PORT = 7000
SCHEMA = ("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);"
          "CREATE TABLE ledger (id bigserial PRIMARY KEY, note text UNIQUE NOT NULL, src int, dst int, amount int)")  # fmt: skip


class HostLab:
    """See the module docstring. ``base_dir`` holds the clusters, configs and logs."""

    def __init__(self, base_dir: Path, *, mode: str = "two-phase", lease_ttl: float = 2.0,
                 bindir: Path | None = None, accounts: int = 20, move_transactions: bool = True,
                 log_statements: bool = False) -> None:  # fmt: skip
        self.move_transactions = move_transactions
        #: host B's database logs every statement (the campaign's --logs: what the
        #: survivor ran, to explain a failed trial)
        self.log_statements = log_statements
        self.base = Path(base_dir)
        self.mode = mode
        self.lease_ttl = lease_ttl
        self.bindir = bindir
        self.accounts = accounts
        self.net: netlab.NetLab | None = None
        self.etcd: EtcdCluster | None = None
        self.pair: ClusterPair | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.events: list[tuple[float, str]] = []

    def note(self, text: str) -> None:
        self.events.append((time.monotonic(), text))

    def __enter__(self) -> HostLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ building

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.net = net = netlab.NetLab(vip_on=None).build()  # the leader adds it
        self.note("network built")
        self.etcd = etcd = EtcdCluster([EtcdMember(n, netlab.ADDRESSES[h], net.ns[h])
                                        for n, h in (("a", "hosta"), ("b", "hostb"), ("w", "witness"))],
                                       token=f"lab-{os.getpid()}")  # fmt: skip
        etcd.start()
        self._raft_leader_to_witness()
        self.note("etcd up (raft leader on the witness)")
        self.pair = ClusterPair.create(
            self.base / "pair", databases=(DB,), password=PASSWORD, bindir=self.bindir,
            places={"primary": (net.ns["hosta"], netlab.ADDRESSES["hosta"], PORT),
                    "secondary": (net.ns["hostb"], netlab.ADDRESSES["hostb"], PORT)},
            hba_extra=["host all all 198.18.0.0/15 scram-sha-256"],
        )  # fmt: skip
        self.pair.sync_schema(DB, SCHEMA)
        with self.pair.primary.connect(DB) as c:
            c.execute(f"INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, {self.accounts}) g")
        self.pair.wait_caught_up()
        if self.log_statements:
            with self.pair.secondary.connect(DB, autocommit=True) as c:
                c.execute("ALTER SYSTEM SET log_statement = 'all'")
                c.execute("ALTER SYSTEM SET log_line_prefix = '%m [%p] %a '")
                c.execute("SELECT pg_reload_conf()")
        self.note("databases up, replicating")
        # SCRAM pass-through, as a deployment without plaintext passwords has it: connmgr
        # holds the user's verifier (the same on both databases: roles are not replicated)
        # and logs in with the key the client proved; host B recovers that key from the
        # copied frames of the connection's start (connmgr/host/resume.py)
        with self.pair.primary.connect(DB) as c:
            (verifier,) = c.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'").fetchone()
        with self.pair.secondary.connect(DB, autocommit=True) as c:
            c.execute(f"ALTER ROLE postgres PASSWORD '{verifier}'")
        users = self.base / "users.txt"
        users.write_text(f'"postgres" "{verifier}"\n')
        # TLS toward clients is allowed (the lab's clients ask for it only where a test
        # wants it: such sessions are closed at a takeover, not continued)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=connmgr-lab",
                        "-days", "2", "-keyout", str(self.base / "tls.key"), "-out", str(self.base / "tls.crt")],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        self._start_connmgr("hostb", users)
        self._wait_port("hostb", netlab.ADDRESSES["hostb"], MIRROR_PORT, "host B's mirror listener")
        self._start_connmgr("hosta", users)
        self._wait_port("client", netlab.VIP, PORT, "host A serving on the VIP")
        self.note("connmgrs up, host A leads")

    def _raft_leader_to_witness(self) -> None:
        import trio

        from connmgr.host.etcd import Etcd

        async def move() -> None:
            client = Etcd(self.etcd.endpoints)
            try:
                st = await client.status(self.etcd.members[2].client_url)
                await client.move_leader(st["header"]["member_id"])
            finally:
                await client.aclose()

        with netlab.in_netns(self.net.ns["witness"]):
            trio.run(move)

    def _config(self, host: str, users: Path, role: str) -> dict[str, dict]:
        """connmgr's configuration on ``host`` in ``role`` (primary, secondary). Both take
        [mirror] peer, the other host's mirror listener: a secondary mirrors there once it
        has taken over (connmgr/host/rejoin.py)."""
        own = netlab.ADDRESSES[host]
        other = netlab.ADDRESSES["hostb" if host == "hosta" else "hosta"]
        common = {
            "server": {"listen": ["127.0.0.1:6432"], "admin_users": ["postgres"], "shutdown_timeout": 2.0},
            "auth": {"users_file": str(users)},
            "tls": {"mode": "allow", "cert_file": str(self.base / "tls.crt"), "key_file": str(self.base / "tls.key")},
            "host": {"vip": f"{netlab.VIP}/{netlab.PREFIXLEN}", "interface": "eth0", "port": PORT,
                     "etcd": list(self.etcd.endpoints), "name": host, "lease_ttl": self.lease_ttl,
                     "lease_margin": self.lease_ttl / 4, "renew_interval": self.lease_ttl / 4,
                     "move_transactions": self.move_transactions},
        }  # fmt: skip
        mirror = {"peer": f"{other}:{MIRROR_PORT}", "heartbeat_interval": 0.05, "mode": self.mode}
        if role == "primary":
            return {**common,
                    "primary": {"host": own, "port": PORT, "name": host},
                    "mirror": mirror,
                    "redo": {"password": PASSWORD},
                    "failover": {"secondary": f"{other}:{PORT}", "password": PASSWORD, "failback": "manual"}}  # fmt: skip
        return {**common,
                "primary": {"host": own, "port": PORT, "name": host},
                "mirror": {**mirror, "listen": f"{own}:{MIRROR_PORT}"},
                "redo": {"password": PASSWORD},
                "poster": {"host": other, "port": PORT, "password": PASSWORD, "dbname": DB, "slot": "lab_poster",
                           "temporary": True, "sequence_interval": 0.2},
                "failover": {"password": PASSWORD}}  # fmt: skip

    def _start_connmgr(self, host: str, users: Path, role: str | None = None) -> None:
        role = role or ("primary" if host == "hosta" else "secondary")
        cfg = self.base / f"connmgr-{host}.toml"
        cfg.write_text(toml_text(self._config(host, users, role)))
        log = open(self.base / f"connmgr-{host}.log", "ab")  # noqa: SIM115 - the process keeps it
        self.procs[host] = self.net.popen(host, [sys.executable, "-m", "connmgr", "-v", "serve", "-c", str(cfg)],
                                          stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})  # fmt: skip
        log.close()

    def server_log(self, which: str = "secondary") -> str:
        try:
            return getattr(self.pair, which).log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log(self, host: str) -> str:
        try:
            return (self.base / f"connmgr-{host}.log").read_text(errors="replace")
        except OSError:
            return ""

    def _wait_port(self, ns: str, address: str, port: int, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for host, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"connmgr on {host} exited ({p.returncode}):\n{self.log(host)[-3000:]}")
            s = self.net.socket_in(ns)
            s.settimeout(0.5)
            try:
                s.connect((address, port))
                return
            except OSError:
                pass
            finally:
                s.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not up within {timeout:g}s:\n" + "\n".join(
                    f"--- {h} ---\n{self.log(h)[-3000:]}" for h in self.procs))  # fmt: skip
            time.sleep(0.1)

    # ------------------------------------------------------------------ using

    def connect(self, **kw) -> psycopg.Connection:
        """A psycopg connection from the client namespace to the VIP."""
        kw.setdefault("connect_timeout", 10)
        kw.setdefault("sslmode", "disable")
        with netlab.in_netns(self.net.ns["client"]):
            return psycopg.connect(host=netlab.VIP, port=PORT, dbname=DB, user="postgres", password=PASSWORD, **kw)

    def kill_host_a(self) -> float:
        t = self.net.kill_host("hosta")
        self.note("host A killed (port down + SIGKILL)")
        return t

    def on_survivor(self, sql: str, which: str = "secondary") -> list[tuple]:
        """Rows of ``sql`` on a database (host B's, the survivor of the first host failure)."""
        with getattr(self.pair, which).connect(DB) as c:
            return c.execute(sql).fetchall()

    def kill_host_b(self) -> float:
        t = self.net.kill_host("hostb")
        self.note("host B killed (port down + SIGKILL)")
        return t

    def admin_on(self, host: str, command: str) -> list[tuple]:
        """``command`` on the admin console of ``host``'s connmgr (from inside that host)."""
        with netlab.in_netns(self.net.ns[host]):
            with psycopg.connect(host="127.0.0.1", port=6432, dbname="connmgr", user="postgres", password=PASSWORD,
                                 sslmode="disable", autocommit=True, connect_timeout=10) as c:  # fmt: skip
                return c.execute(command).fetchall()

    def rejoin_host_a(self, timeout: float = 90) -> list[tuple]:
        """After host A's death and host B's takeover: host A comes back (a reboot: a new
        network namespace, its etcd member and its database restarted), its database is
        re-seeded as host B's secondary (RESEED on host B's connmgr), host B's frames are
        copied to it, and its connmgr starts as the secondary. Returns when host B's mirror
        link is up to it and it follows host B; the RESEED timeline (ms, event)."""
        self.net.reboot_host("hosta")
        self.etcd.restart("a")
        self.pair.primary.start()
        self.note("host A back (rebooted: etcd and its database up again)")
        timeline = self.admin_on("hostb", "RESEED")
        self.note("host A's database re-seeded as host B's secondary")
        self.net.copy_frames("hostb", "hosta")
        self._start_connmgr("hosta", self.base / "users.txt", role="secondary")
        deadline = time.monotonic() + timeout
        while not ("mirror link up to" in self.log("hostb")
                   and "host takeover: following hostb" in self.log("hosta")):  # fmt: skip
            if self.procs["hosta"].poll() is not None:
                raise RuntimeError(f"connmgr on hosta exited ({self.procs['hosta'].returncode}):\n"
                                   f"{self.log('hosta')[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"host A did not join as the secondary within {timeout:g}s:\n--- hosta ---\n"
                                   f"{self.log('hosta')[-3000:]}\n--- hostb ---\n{self.log('hostb')[-3000:]}")  # fmt: skip
            time.sleep(0.1)
        self.note("host A's connmgr follows host B")
        return timeline

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        if self.pair is not None:
            with contextlib.suppress(Exception):
                self.pair.destroy()
        if self.etcd is not None:
            self.etcd.stop()
        if self.net is not None:
            self.net.close()

